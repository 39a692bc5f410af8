"""Static channel decisions for a DANCE controller, both ways: a static prior to start from
(the channels a magnitude ranking keeps, what static pruning would keep), and a trained
controller frozen to the channels it keeps most often (its static projection: how much of its
accuracy comes from choosing per clip).

An untrained controller scores every channel alike (its head's biases are equal and its
weights small), so at the start of fine-tuning ``topk`` keeps a near-random subset that also
changes from clip to clip. :func:`apply_channel_prior` adds ``scale * z`` to the bias of each
instrumented layer's channel logits, ``z`` the standardized log importance of its input
channels (:func:`magnitude_importance`: the L2 norm of the weights that read the channel, the
criterion of Torch-Pruning's ``MagnitudeImportance``), so the first decisions are the static
ranking's for every clip. :func:`channel_frequencies` measures how often a trained pruner keeps
each channel over clips, and :func:`freeze_channels` makes its channel decisions those most
frequent channels for every clip (input-independent), at the same kept counts.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(3, 2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]).view(2, 3, 1, 1, 1))
    >>> magnitude_importance(conv)
    tensor([1.4142, 0.0000, 2.8284])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.controller import StaticController

__all__ = [
    "apply_channel_prior",
    "channel_decisions",
    "channel_frequencies",
    "freeze_channels",
    "magnitude_importance",
]


def magnitude_importance(conv: nn.Conv3d) -> torch.Tensor:
    """``[C_in]``: the L2 norm of ``conv``'s weights that read each input channel."""
    w = conv.weight.detach()
    groups = conv.groups
    og, cg = w.shape[0] // groups, w.shape[1]
    # [groups, out per group, in per group, taps] -> norm over outputs and taps per input
    per_input = w.reshape(groups, og, cg, -1).pow(2).sum(dim=(1, 3)).sqrt()
    return per_input.reshape(-1)


def apply_channel_prior(
    target: Any,
    *,
    scale: float = 2.0,
    importance: Callable[[nn.Conv3d], torch.Tensor] = magnitude_importance,
) -> None:
    """Add ``scale * z`` to the channel-logit biases of every instrumented layer of
    ``target`` (an :class:`~lightning_dance.aap.AdaptivePruner` or a
    :class:`~lightning_dance.wrapper.DANCEWrapper`), ``z`` the standardized log of
    ``importance(conv)`` over the layer's input channels. Needs DANCE's
    :class:`~lightning_dance.controller.Controller` with channel scores."""
    pruner = getattr(target, "pruner", target)
    ctrl = pruner.controller
    head = getattr(ctrl, "channel_head", None)
    if head is None:
        raise ValueError(
            "apply_channel_prior needs a controller that scores channels: build the pruner "
            "with 'channel' in dims and a policy with a controller (topk, threshold, width)"
        )
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    modules = dict(pruner.model.named_modules())
    shifts = {}
    with torch.no_grad():
        for name in ctrl.layer_names:  # all scored and checked before any bias changes
            bias = ctrl.channel_bias(name)
            score = importance(modules[name]).to(bias)
            if score.shape != bias.shape:
                raise ValueError(
                    f"importance of {name!r} has shape {tuple(score.shape)}, expected "
                    f"{tuple(bias.shape)}: one score per input channel"
                )
            log = score.clamp_min(1e-12).log()
            shifts[name] = scale * (log - log.mean()) / log.std(unbiased=False).clamp_min(1e-6)
        for name, shift in shifts.items():
            ctrl.channel_bias(name).add_(shift)


def _channel_head(pruner: Any) -> nn.Linear:
    head = getattr(pruner.controller, "channel_head", None)
    if head is None:
        raise ValueError(
            "this needs a controller that scores channels: build the pruner with 'channel' in "
            "dims and a policy with a controller (topk, threshold, width)"
        )
    return head


@torch.no_grad()
def channel_decisions(target: Any, clips: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{layer: [N, C_in]}`` (bool): which input channels ``target`` (a pruner or wrapper, run
    in eval mode) keeps on each of the ``N`` clips of ``clips`` (batches ``[N, 3, T, H, W]``),
    in the order given; layers that prune other dims only are left out."""
    pruner = getattr(target, "pruner", target)
    _channel_head(pruner)
    was_training = pruner.training
    pruner.eval()
    kept: dict[str, list[torch.Tensor]] = {}
    try:
        for clip in clips:
            pruner(clip)
            for name, stats in pruner.last_stats.layers.items():
                if "channel" in stats.masks:  # a layer that prunes other dims only is left out
                    kept.setdefault(name, []).append(stats.masks["channel"].bool().cpu())
    finally:
        pruner.train(was_training)
    if not kept:
        raise ValueError("channel_decisions needs at least one clip")
    return {name: torch.cat(masks) for name, masks in kept.items()}


def channel_frequencies(target: Any, clips: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{layer: [C_in]}``: the fraction of ``clips`` (batches ``[N, 3, T, H, W]``) on which
    ``target`` (a pruner or wrapper, run in eval mode) keeps each input channel
    (:func:`channel_decisions`, averaged)."""
    try:
        decided = channel_decisions(target, clips)
    except ValueError as err:
        raise ValueError("channel_frequencies needs at least one clip") from err
    return {name: masks.double().mean(0) for name, masks in decided.items()}


def freeze_channels(
    target: Any, frequencies: dict[str, torch.Tensor], *, standalone: bool = False
) -> None:
    """Make the channel decisions of ``target`` (a ``topk`` or ``threshold`` pruner or wrapper)
    the same for every clip: the channels most often kept (:func:`channel_frequencies`; ties
    broken by :func:`magnitude_importance`), as many as before (``topk``: its fixed count;
    ``threshold``: the mean count per clip of ``frequencies``, rounded, at least ``min_keep``).
    The channel head's input weights are zeroed, its biases set to the ranking (``threshold``:
    shifted so that, with the pruner's calibration offset, exactly those channels score above
    0; a later ``calibrate`` moves the cut); frames and features (if pruned) stay per clip.

    ``standalone=True`` (channels only) replaces the controller by a
    :class:`~lightning_dance.controller.StaticController` holding the ranking: no statistics of
    the stem output are computed any more (0 controller MACs), and an export holds the kept
    indices as constants; a checkpoint of the wrapper then no longer loads into a wrapper with
    DANCE's controller (the architecture differs)."""
    pruner = getattr(target, "pruner", target)
    head = _channel_head(pruner)
    if standalone and pruner.pruned_dims() != ("channel",):
        raise ValueError(
            "freeze_channels(standalone=True) replaces the whole controller, which also decides "
            f"{[d for d in pruner.pruned_dims() if d != 'channel']}: use it with "
            "dims=('channel',) (or layer_dims pruning channels only)"
        )
    if not pruner.policy.keeps_top_scores:
        raise ValueError(
            "freeze_channels ranks the channels of a policy that keeps the highest-scoring ones "
            f"(topk, threshold), not of {pruner.policy.name!r}"
        )
    fixed = pruner.policy.fixed_counts  # topk: the count stays; threshold: the ranking sets it
    offset = pruner.policy.logit_offset(float(pruner.calibration))
    ctrl = pruner.controller
    modules = dict(pruner.model.named_modules())
    names = [n for n in ctrl.layer_names if "channel" in pruner.dims_of(n)]
    for name in names:  # all checked before anything changes
        expected = tuple(ctrl.channel_bias(name).shape)
        got = tuple(frequencies[name].shape) if name in frequencies else None
        if got != expected:
            raise ValueError(
                f"frequencies of {name!r} have shape {got}, expected {expected}: pass "
                "channel_frequencies(target, clips) of this pruner"
            )
    with torch.no_grad():
        head.weight.zero_()
        for name in names:
            bias = ctrl.channel_bias(name)
            freq = frequencies[name].to(bias)
            tie = magnitude_importance(modules[name]).tolist()
            order = sorted(range(len(tie)), key=lambda c: (float(freq[c]), tie[c]))
            rank = torch.empty_like(bias)
            rank[order] = torch.arange(len(order), dtype=bias.dtype, device=bias.device)
            c = len(order)
            if fixed:
                bias.copy_(rank / c)  # the most frequent channel scores highest
            else:  # the k most frequent score above 0 once the offset is added
                k = min(c, max(pruner.min_keep, round(float(freq.sum()))))
                bias.copy_((rank - (c - k) + 0.5) / c - offset)
    if standalone:
        pruner.controller = StaticController(
            {name: ctrl.channel_bias(name).detach() for name in ctrl.layer_names}, grid=ctrl.grid
        )
