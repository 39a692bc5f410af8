"""A static projection made physical: the user's model with the channels DANCE drops removed
from its weights, a plain ``nn.Module`` with no controller, no hooks and no runtime of ours.

A pruner whose channel decisions are the same for every clip (a
:class:`~lightning_dance.controller.StaticController`, what
:func:`lightning_dance.priors.freeze_channels` puts in with ``standalone=True``) computes the
same sub-network on every clip. :func:`materialize` builds that sub-network once:

- along a channel chain (``producer conv -> BatchNorm / activations -> consumer conv``,
  :meth:`~lightning_dance.aap.AdaptivePruner.output_chains`), the producer keeps only the output
  channels its consumer reads (weight rows, bias), the BatchNorms between them only those
  channels, and the consumer only those input channels: the activation between them is
  narrow, with no gather and no copy;
- a layer whose input is read elsewhere too (a block input, which the shortcut reads) keeps its
  input channels through a :class:`ChannelGather` (one ``index_select``) before a narrower conv;
- a depthwise layer computes only its kept channels and writes them into a full-width output
  whose dropped channels hold the bias (:class:`~lightning_dance.channel_maps.ChannelScatter`), as the masked model computes;
  in pytorchvideo's bottleneck blocks (X3D) the tail after the depthwise conv (BatchNorm,
  squeeze-excitation, Swish, the 1x1x1 ``conv_c``) runs on the kept channels instead, the
  dropped ones as one value per clip and channel
  (:mod:`lightning_dance.models.bottleneck_tail`).

The copy computes what the pruner computes (checked on ``clip`` before it is returned) and runs
the MACs the compact path counts (the credited count of every instrumented layer, tested
against fvcore; fewer in narrowed bottleneck tails), so ``count_macs``,
:func:`~lightning_dance.execution.accelerate_dense`, ``torch.onnx.export`` and Torch-Pruning
treat it as any static model. The target is not changed.

Limits: channels only (frames and features vary per clip); groups of 1 and depthwise convs;
an inference copy: BatchNorm running statistics are sliced, not recomputed, and a narrowed
bottleneck tail has its BatchNorm folded into the depthwise conv.

Example:
    >>> import torch
    >>> from lightning_dance.aap import AdaptivePruner
    >>> from lightning_dance.models import create_model
    >>> from lightning_dance.priors import channel_frequencies, freeze_channels
    >>> pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), dims=("channel",),
    ...                         policy="topk", budget=0.5).eval()
    >>> clips = [torch.randn(2, 3, 8, 32, 32)]
    >>> freeze_channels(pruner, channel_frequencies(pruner, clips), standalone=True)
    >>> small = materialize(pruner, clips[0])
    >>> torch.allclose(small(clips[0]), pruner(clips[0]), atol=1e-4)
    True
    >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in pruner.model.parameters())
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.channel_maps import ChannelGather, ChannelScatter
from lightning_dance.controller import StaticController
from lightning_dance.errors import DanceError
from lightning_dance.execution.indexed import topk_indices
from lightning_dance.models.bottleneck_tail import narrow_bottleneck_tails

__all__ = ["MaterializeError", "materialize"]


class MaterializeError(DanceError, ValueError):
    """A pruner whose decisions cannot be made physical (they vary per clip, or a layer is of a
    kind the copy cannot slice), or a copy that does not compute what the pruner computes."""


def _depthwise_rows(conv: nn.Conv3d, inputs: torch.Tensor) -> torch.Tensor:
    """The output channels of depthwise ``conv`` that read the kept ``inputs``: channel ``c``
    feeds outputs ``c*m .. c*m + m - 1`` (``m`` the channel multiplier)."""
    m = conv.out_channels // conv.in_channels
    return (inputs.view(-1, 1) * m + torch.arange(m, device=inputs.device)).flatten()


def _sliced_conv(conv: nn.Conv3d, inputs: torch.Tensor | None,
                 outputs: torch.Tensor | None) -> nn.Conv3d:  # fmt: skip
    """``conv`` reading only ``inputs`` and computing only ``outputs`` (``None``: all)."""
    depthwise = conv.groups == conv.in_channels > 1
    w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    groups = conv.groups
    if depthwise:  # a kept input channel c is computed by output rows c*m .. c*m + m - 1
        assert outputs is None, "a depthwise conv is never a chain producer"
        if inputs is not None:
            rows = _depthwise_rows(conv, inputs)
            w, b = w.index_select(0, rows), None if b is None else b.index_select(0, rows)
            groups = inputs.numel()
    else:
        if outputs is not None:
            w, b = w.index_select(0, outputs), None if b is None else b.index_select(0, outputs)
        if inputs is not None:
            w = w.index_select(1, inputs)
    fmt = (torch.channels_last_3d if conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
           and not conv.weight.is_contiguous() else torch.contiguous_format)  # fmt: skip
    new = copy.deepcopy(conv)  # the same class and hyper-parameters (a subclass stays one)
    new.weight = nn.Parameter(w.contiguous(memory_format=fmt).clone(), conv.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.clone(), conv.bias.requires_grad)
    new.out_channels, new.in_channels, new.groups = w.shape[0], w.shape[1] * groups, groups
    return new


def _slice_norm(bn: nn.BatchNorm3d, keep: torch.Tensor) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(bn, name)
            if p is not None:
                setattr(bn, name, nn.Parameter(p.detach().index_select(0, keep).clone(),
                                               p.requires_grad))  # fmt: skip
        for name in ("running_mean", "running_var"):
            t = getattr(bn, name)
            if t is not None:
                setattr(bn, name, t.index_select(0, keep).clone())
    bn.num_features = keep.numel()


def _check(pruner: Any) -> None:
    if not isinstance(pruner.controller, StaticController) or pruner.pruned_dims() != ("channel",):
        raise MaterializeError(
            "materialize needs channel decisions that are the same for every clip: freeze "
            "them first with lightning_dance.priors.freeze_channels(target, "
            "channel_frequencies(target, clips), standalone=True) on a pruner with "
            f"dims=('channel',) (this one prunes {list(pruner.pruned_dims())}, controller "
            f"{type(pruner.controller).__name__})"
        )
    for name in pruner.layer_names:
        conv = pruner.model.get_submodule(name)
        if conv.groups not in (1, conv.in_channels):
            raise MaterializeError(
                f"{name!r} is a grouped conv (groups={conv.groups} of {conv.in_channels} "
                "channels): materialize slices groups=1 and depthwise convs only"
            )


@torch.no_grad()
def materialize(target: Any, clip: torch.Tensor, *, atol: float = 1e-4) -> nn.Module:
    """A copy of the model inside ``target`` (an :class:`~lightning_dance.aap.AdaptivePruner`
    or a :class:`~lightning_dance.wrapper.DANCEWrapper` with a static channel controller) with
    the dropped channels removed (see the module docstring), in eval mode.

    ``clip`` ``[N, 3, T, H, W]``: the clip size the kept counts were set for (a ``topk`` count
    depends on the layer shapes). The copy's output on it is checked against ``target``'s
    (``atol``, relative to the largest logit): a mismatch raises :class:`MaterializeError`
    and nothing is returned. ``target`` keeps its weights and mode."""
    pruner = getattr(target, "pruner", target)
    _check(pruner)
    was_training = pruner.training
    pruner.eval()
    try:
        pruner.prepare(clip)  # validates the clip; fixes the counts for its shape
        stem = pruner.model.get_submodule(pruner.stem_name)
        plan = pruner.decide(stem(clip[:1]))
        kept = topk_indices(pruner, plan)  # the index plan's kept channels, one clip
        want = pruner(clip)
    finally:
        pruner.train(was_training)

    chains = {c.consumer: c for c in pruner.output_chains().values()}
    inputs: dict[str, torch.Tensor] = {}  # conv -> the input channels it reads
    outputs: dict[str, torch.Tensor] = {}  # chain producer -> the output channels it computes
    gathered: set[str] = set()
    for name, idx in kept.items():
        if idx is None:
            continue
        inputs[name] = idx
        if name in chains:
            outputs[chains[name].producer] = idx
        else:
            gathered.add(name)

    model = copy.deepcopy(pruner.model).eval()
    modules = dict(model.named_modules())
    for chain in chains.values():
        if chain.producer in outputs:
            for norm in chain.norms:
                _slice_norm(modules[norm], outputs[chain.producer])
    for name in sorted(set(inputs) | set(outputs)):
        conv = modules[name]
        new: nn.Module = _sliced_conv(conv, inputs.get(name), outputs.get(name))
        if conv.groups == conv.in_channels > 1 and name in inputs:
            fill = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(
                conv.out_channels)  # fmt: skip
            new = nn.Sequential(new, ChannelScatter(_depthwise_rows(conv, inputs[name]), fill))
        if name in gathered:
            new = nn.Sequential(ChannelGather(inputs[name]), new)
        model.set_submodule(name, new)

    narrow_bottleneck_tails(model)
    try:
        got = model(clip)
    except RuntimeError as err:  # e.g. a channel count that no longer fits
        raise MaterializeError(
            f"the materialized copy does not run on the clip ({err}): a layer between a "
            "chain's convs that mixes channels? please report it"
        ) from err
    error = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not error <= atol * (1.0 + float(want.abs().max())):
        raise MaterializeError(
            f"the materialized copy differs from the pruner by {error:.3g} on the clip "
            "(a layer between a chain's convs that mixes channels?): please report it"
        )
    return model
