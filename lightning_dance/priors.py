"""A static prior for the controller's channel scores: start from the channels a magnitude
ranking keeps (what static pruning would keep), let training learn the per-clip deviations.

An untrained controller scores every channel alike (its head's biases are equal and its
weights small), so at the start of fine-tuning ``topk`` keeps a near-random subset that also
changes from clip to clip. :func:`apply_channel_prior` adds ``scale * z`` to the bias of each
instrumented layer's channel logits, ``z`` the standardized log importance of its input
channels (:func:`magnitude_importance`: the L2 norm of the weights that read the channel, the
criterion of Torch-Pruning's ``MagnitudeImportance``), so the first decisions are the static
ranking's for every clip.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(3, 2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]).view(2, 3, 1, 1, 1))
    >>> magnitude_importance(conv)
    tensor([1.4142, 0.0000, 2.8284])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["apply_channel_prior", "magnitude_importance"]


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
    with torch.no_grad():
        for name in ctrl.layer_names:
            bias = ctrl.channel_bias(name)
            score = importance(modules[name]).to(bias)
            if score.shape != bias.shape:
                raise ValueError(
                    f"importance of {name!r} has shape {tuple(score.shape)}, expected "
                    f"{tuple(bias.shape)}: one score per input channel"
                )
            log = score.clamp_min(1e-12).log()
            z = (log - log.mean()) / log.std(unbiased=False).clamp_min(1e-6)
            bias += scale * z
