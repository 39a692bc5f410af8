"""Batch-1 channel pruning run straight from each layer's kept indices (the index plan).

:class:`~lightning_dance.execution.CompactPruner`'s general plan turns each layer's controller
scores into a 0/1 mask and the mask back into sorted kept indices, gathers and weight slices:
some 30 small ops per layer, which do not get faster with a second thread and cost R(2+1)D
as much as a fifth of its pruned latency on a 2-core CPU. With channels the only pruned dim,
one clip and a policy that decides from the controller's scores (``topk``: the ``k`` highest;
``threshold``, ``width``: what the eval gate keeps), the kept indices of each layer say
everything:

- a layer gathers its kept input channels, and its kept block of the weight straight into
  the contiguous layout the kernel reads (:func:`~lightning_dance.execution.compact.kept_weight`:
  rows then columns of an NCDHW copy, or of a ``channels_last_3d`` one for large weights); a
  1x1x1 conv is one gather and one GEMM on the pixels x channels view;
- a channel-chain producer (:mod:`~lightning_dance.execution.chains`) computes only its
  consumer's kept channels (sorted, like every index here); each BatchNorm in between applies its
  precomputed scale and shift, gathered once (:func:`indexed_norm`: one ``index_select`` and
  one ``addcmul``, in both plans); the consumer reads its input as it comes;
- a depthwise layer convolves only its kept channels (:func:`indexed_depthwise`: as a chain's
  consumer straight from the producer's output, e.g. X3D's ``conv_a -> conv_b``) and scatters
  them into its output, whose other channels are the bias;
- the stem runs dense; other grouped layers and ``"same"`` or non-zero padding modes go
  through :func:`~lightning_dance.execution.compact_conv3d`'s plan, as in the general plan.

The indices come from the policy's decision on the same scores as the pruner's masks
(:meth:`~lightning_dance.decision.DecisionPlan.channel_indices`; one call per group of layers
of equal width and kept count,
:meth:`~lightning_dance.controller.Controller.stacked_channel_logits`: 12 calls instead of 115
on X3D-XS), so the kept channels, the result (up to float rounding) and the multiply-adds are
the general plan's. Kept channels that are a prefix ``0 .. k-1`` (the ``width`` policy) are
slices: a producer's first weight rows are a view, a consumer's first columns a weight block
kept ready (:func:`~lightning_dance.execution.weights.prefix_block`), nothing gathered per
call. :class:`CompactPruner` picks this plan
by itself where it applies (:func:`index_plan_applies`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.execution.activations import bias_filled, gather_kept, place_channels
from lightning_dance.execution.compact import (
    compact_conv3d_unchecked as _compact_conv3d,  # a module attribute: tests patch it
)
from lightning_dance.execution.compact import kept_weight, output_features, skip_unread
from lightning_dance.execution.folding import folded_conv
from lightning_dance.execution.kernels import (
    conv3d_fast_forward,
    is_pointwise,
    pointwise_from_columns,
)
from lightning_dance.execution.recording import counted_conv3d, record_macs
from lightning_dance.execution.weights import (
    depthwise_rows,
    derived_tensor,
    gatherable_weight,
    prefix_length,
)
from lightning_dance.geometry import cached_geometry

if TYPE_CHECKING:
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.decision import DecisionPlan
    from lightning_dance.execution.chains import ChannelChain

__all__ = [
    "IndexedRun",
    "index_plan_applies",
    "indexed_conv3d",
    "indexed_depthwise",
    "indexed_norm",
    "norm_scale_shift",
    "topk_indices",
]


def index_plan_applies(pruner: AdaptivePruner, clip: torch.Tensor) -> bool:
    """Whether the index plan can run ``clip``: a pruner whose policy decides from the
    controller's scores (``topk``, ``threshold``, ``width``; not ``attention``, which scores
    each layer's input), one clip. Frames and features may be pruned too: a layer whose clip
    drops some goes through the general compact conv (:class:`IndexedRun`)."""
    return not pruner.policy.needs_layer_input and clip.shape[0] == 1


def _indexable(conv: nn.Conv3d, depthwise: bool = False) -> bool:
    """A conv :func:`indexed_conv3d` (``depthwise``: :func:`indexed_depthwise`) runs:
    ``groups == 1`` (depthwise: ``groups == in_channels``), explicit zero padding."""
    groups = conv.in_channels if depthwise else 1
    padding_ok = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    return conv.groups == groups and padding_ok


def topk_indices(pruner: AdaptivePruner, plan: DecisionPlan) -> dict[str, torch.Tensor | None]:
    """``{layer: kept input channels [k]}`` of one clip, sorted (``None``: all kept), from the
    clip's decision plan (:meth:`~lightning_dance.decision.DecisionPlan.channel_indices`)."""
    return plan.channel_indices({n: c.in_channels for n, c in pruner._layers.items()})


def norm_scale_shift(bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BatchNorm as a per-channel affine map ``x * scale + shift`` (``[C]`` each; plain
    tensor ops, traceable for export)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _norm_affine(bn: nn.BatchNorm3d) -> torch.Tensor:
    """``[2, C]``: :func:`norm_scale_shift` stacked (cached)."""
    tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    return derived_tensor(bn, "affine", tensors, lambda: torch.stack(norm_scale_shift(bn)))


def indexed_conv3d(
    conv: nn.Conv3d,
    x: torch.Tensor,
    in_idx: torch.Tensor | None,
    out_idx: torch.Tensor | None = None,
    gathered: bool = False,
) -> torch.Tensor:
    """``conv`` on the input channels ``in_idx`` of ``x`` (``None``: all), computing the output
    channels ``out_idx`` in that order (``None``: all); ``gathered``: ``x`` holds only the
    channels ``in_idx``, in that order. ``groups == 1`` and explicit zero padding, batch 1;
    the output is ``channels_last_3d``."""
    g = cached_geometry(conv, (conv.in_channels, *x.shape[2:]))
    g, x, _, _ = skip_unread(g, x, None, None)
    b = conv.bias
    if out_idx is not None and b is not None:
        rows = prefix_length(out_idx)
        b = b[:rows] if rows is not None else b.index_select(0, out_idx)
    w = kept_weight(conv, in_idx, out_idx)
    if in_idx is not None:
        if g.stride == (1, 1, 1) and is_pointwise(x, conv.weight, g.pad_lo, 1):
            # one gather + one GEMM on the pixels x channels view
            columns = w.view(w.shape[0], w.shape[1]).t()
            y = pointwise_from_columns(x, columns, b, None if gathered else in_idx)
            return record_macs(y, w.shape[1])
        if not gathered:
            x = gather_kept(x.contiguous(memory_format=torch.channels_last_3d), None, in_idx)
    return counted_conv3d(x, w, b, g.stride, g.pad_lo, g.dilation, 1)


def indexed_depthwise(
    conv: nn.Conv3d, x: torch.Tensor, in_idx: torch.Tensor, gathered: bool = False
) -> torch.Tensor:
    """A depthwise ``conv`` (``groups == in_channels``, explicit zero padding, batch 1) on the
    input channels ``in_idx`` of ``x``: only their output channels are computed, the others are
    the bias (or 0); ``gathered``: ``x`` holds only the channels ``in_idx``, in that order (a
    channel chain's producer computed just those). The output is ``channels_last_3d``."""
    g = cached_geometry(conv, (conv.in_channels, *x.shape[2:]))
    g, x, _, _ = skip_unread(g, x, None, None)
    if not gathered:
        x = gather_kept(x.contiguous(memory_format=torch.channels_last_3d), None, in_idx)
    rows = depthwise_rows(in_idx, conv.out_channels // conv.in_channels)
    b = conv.bias.index_select(0, rows) if conv.bias is not None else None
    w = gatherable_weight(conv).index_select(0, rows)
    y = counted_conv3d(x, w, b, g.stride, g.pad_lo, g.dilation, len(in_idx))
    out = bias_filled((1, conv.out_channels, *y.shape[2:]), conv.bias, y)
    place_channels(out, rows, y)
    return out


def indexed_norm(bn: nn.BatchNorm3d, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``bn(x)``, or, when ``x`` holds only the channels ``idx`` of the full input (in that
    order), ``bn(full)[:, idx]`` (eval mode; both plans of ``CompactPruner``)."""
    if idx is None or (x.shape[1] == bn.num_features and len(idx) == bn.num_features):
        return type(bn).forward(bn, x)
    if bn.training:
        raise RuntimeError(f"BatchNorm {bn} is in training mode: CompactPruner needs eval mode")
    if bn.running_mean is None:  # track_running_stats=False: per-channel batch statistics
        w, b = (None if t is None else t.index_select(0, idx) for t in (bn.weight, bn.bias))
        return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)
    k = prefix_length(idx)
    affine = _norm_affine(bn)[:, :k] if k is not None else _norm_affine(bn).index_select(1, idx)
    shape = (1, len(idx), 1, 1, 1)
    return torch.addcmul(affine[1].view(shape), x, affine[0].view(shape))


class IndexedRun:
    """One clip's routing for :class:`~lightning_dance.execution.CompactPruner`'s index plan:
    ``run(name, module, x)`` is the forward of every routed Conv3d and chain BatchNorm;
    ``folds``: as ``CompactPruner._folds`` (folded BatchNorms pass their input through)."""

    def __init__(
        self,
        pruner: AdaptivePruner,
        chains: dict[str, ChannelChain],
        folds: dict[str, nn.BatchNorm3d] | None = None,
    ) -> None:
        self.pruner, self.chains = pruner, chains
        self.folds = folds or {}  # conv / BatchNorm name -> the BatchNorm the conv computes
        self.idx: dict[str, torch.Tensor | None] | None = None  # set when the stem ran
        self.plan: DecisionPlan | None = None  # the clip's decisions, made when the stem ran
        self.held: dict[str, torch.Tensor] = {}  # consumer / norm -> the channels x holds

    def __call__(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = self.pruner
        if isinstance(module, nn.BatchNorm3d):
            held = self.held.pop(name, None)
            return x if name in self.folds else indexed_norm(module, x, held)
        conv = folded_conv(module, self.folds[name]) if name in self.folds else module
        if name not in p._layers:
            y = conv3d_fast_forward(conv, x)
            if name == p.stem_name and self.idx is None:
                # masks are asked for only where frames or features are pruned
                self.plan = p.decide(y, prefetch=any(d in p.dims for d in ("frame", "feature")))
                pruned = "channel" in p.dims
                self.idx = topk_indices(p, self.plan) if pruned else dict.fromkeys(p._layers)
            return y
        if self.idx is None:
            raise RuntimeError(f"instrumented layer {name!r} ran before the stem {p.stem_name!r}")
        in_idx = self.idx[name]
        held = self.held.pop(name, None)  # == in_idx: x holds only the kept channels
        out_idx = None
        chain = self.chains.get(name)
        if chain is not None and self.idx[chain.consumer] is not None:
            out_idx = self.idx[chain.consumer]
            for key in (chain.consumer, *chain.norms):
                self.held[key] = out_idx
        values = self.frames_features(name, conv, x)
        if not values and _indexable(conv):
            return indexed_conv3d(conv, x, in_idx, out_idx, held is not None)
        if not values and in_idx is not None and _indexable(conv, depthwise=True):
            return indexed_depthwise(conv, x, in_idx, held is not None)
        # frames or features dropped, grouped, "same" or non-zero padding: the general plan
        if in_idx is not None:
            mask = torch.zeros(1, conv.in_channels, dtype=x.dtype, device=x.device)
            values["channel"] = mask.index_fill_(1, in_idx, 1.0)
        at_out = "feature" in values and p.features_at_outputs
        masks = self.plan.masks(name, p.mask_shape(name, (conv.in_channels, *x.shape[2:])))
        return _compact_conv3d(conv, x, values, None, "group", held, out_idx,
                               *output_features(masks, at_out))  # fmt: skip

    def frames_features(
        self, name: str, conv: nn.Conv3d, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The clip's frame and feature masks of layer ``name`` that the general compact conv
        must apply: those that drop something, and the frame mask of a conv that would read
        temporal padding (the executed count leaves taps on padding frames out, so the dense
        conv would compute more than counted); ``{}``: the layer runs from its indices."""
        p = self.pruner
        if not any(d in p.dims for d in ("frame", "feature")):
            return {}
        shape = (conv.in_channels, *x.shape[2:])
        masks = self.plan.masks(name, p.mask_shape(name, shape)).values
        out = {d: v for d, v in masks.items() if d != "channel" and not bool((v > 0.5).all())}
        if "frame" in masks and "frame" not in out:  # every frame kept: still exact if the
            g = cached_geometry(conv, shape)  # conv reads no temporal padding (the counter
            if g.kernel[0] > 1 and (g.pad_lo[0] or g.pad_hi[0]):  # skips those taps)
                out["frame"] = masks["frame"]
        return out
