"""BatchNorm folding for the fast paths: an eval BatchNorm that alone reads a conv's output is a
per-output-channel affine map, so it can be computed by the conv itself.

``bn(conv(x)) = conv'(x)`` with ``W' = W * s`` (per output channel) and ``b' = (b - mean) * s +
beta``, ``s = gamma / sqrt(var + eps)`` (:func:`torch.nn.utils.fusion.fuse_conv_bn_weights`).
The BatchNorm then moves no bytes at all: one read and one write of the conv's output fewer
per pair (R(2+1)D at 8x32x32: 10.4 of 64.5 MB, see ``docs/accounting.md``).

- :func:`foldable_norms`: the ``{conv: BatchNorm}`` pairs of a model
  (:func:`~lightning_dance.execution.chains.conv_norms`), minus convs whose raw output something
  else needs (the stem: the controller reads it);
- :func:`folded_conv`: the folded stand-in of a conv (cached, renewed when a weight or a
  statistic changes), what :func:`~lightning_dance.execution.accelerate_dense` and
  :class:`~lightning_dance.execution.CompactPruner` run with ``fold_norms=True``.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8), nn.ReLU()).eval()
    >>> net[1].running_mean.uniform_(); net[1].running_var.uniform_(1, 2)  # doctest: +ELLIPSIS
    tensor(...
    >>> foldable_norms(net)
    {'0': '1'}
    >>> x = torch.randn(1, 3, 4, 6, 6)
    >>> torch.allclose(folded_conv(net[0], net[1])(x), net[1](net[0](x)), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lightning_dance.execution.chains import conv_norms

__all__ = ["foldable_norms", "folded_conv", "norm_is_foldable"]

_pairs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_folded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def norm_is_foldable(bn: nn.Module) -> bool:
    """An eval ``BatchNorm3d`` normalizing with running statistics (a fixed affine map)."""
    return isinstance(bn, nn.BatchNorm3d) and not bn.training and bn.running_mean is not None


def foldable_norms(model: nn.Module, keep: Iterable[str] = ()) -> dict[str, str]:
    """``{conv name: BatchNorm name}``: each BatchNorm3d that alone reads a Conv3d's output
    (:func:`~lightning_dance.execution.chains.conv_norms`, found once per model), except for
    the convs in ``keep`` (whose raw output is needed, e.g. the stem's). Whether a BatchNorm
    can be folded right now (:func:`norm_is_foldable`) is checked where it runs."""
    if model not in _pairs:
        _pairs[model] = conv_norms(model)
    keep = set(keep)
    return {c: n for c, n in _pairs[model].items() if c not in keep}


def folded_stand_in(conv: nn.Module) -> nn.Conv3d | None:
    """The Conv3d :func:`folded_conv` last made for ``conv`` (``None``: none)."""
    hit = _folded.get(conv)
    return None if hit is None else hit[1]


def folded_conv(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    """A Conv3d computing ``bn(conv(x))`` (``bn`` in eval mode, with running statistics):
    cached per conv, made again when a weight, bias or statistic changes. No autograd (an
    inference path); the weight keeps the conv weight's memory format."""
    if not norm_is_foldable(bn):
        raise ValueError(
            f"{bn} cannot be folded: it must be an eval-mode BatchNorm3d with running "
            "statistics (call model.eval(); track_running_stats=True)"
        )
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
                for t in sources)  # fmt: skip
    hit = _folded.get(conv)
    if hit is None or hit[0] != key or hit[2] is not bn:
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                        bn.running_var, bn.eps, bn.weight, bn.bias)  # fmt: skip
            fmt = (torch.channels_last_3d if conv.weight.is_contiguous(
                memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
                else torch.contiguous_format)  # fmt: skip
            stand_in = copy.copy(conv)  # same hyper-parameters; own parameter dict
            stand_in._parameters = {
                "weight": nn.Parameter(w.detach().contiguous(memory_format=fmt), False),
                "bias": nn.Parameter(b.detach(), False),
            }
            stand_in._forward_hooks = stand_in._forward_pre_hooks = {}
            stand_in.__dict__.pop("forward", None)
        hit = _folded[conv] = (key, stand_in, bn)
    return hit[1]
