"""Per-clip width: keep the first ``k`` channels of a layer, ``k`` decided per clip.

The controller scores every channel as for the threshold policy; the width policy keeps as many
channels as those scores add up to (``sum(sigmoid(scores))``, snapped to a multiple of
``multiple``), and always the *first* ones: a clip's kept channels are a prefix
``[0, k)``, nested like the widths of a slimmable network. The number kept varies per clip
(DANCE's input adaptivity); which ones never does, so the fast path slices instead of gathering:
a producer computes the first ``k`` output channels from a view of its weight rows, the consumer
reads them with no gather, and a channel count from a small set of multiples lets a runtime
keep each layer's few weight blocks ready (see
:func:`lightning_dance.execution.weights.prefix_length`). Fine-tuning teaches the network to
put what matters first (as slimmable networks are trained); from a dense model whose channel
order is arbitrary, accuracy at a low width starts lower than with a policy that may pick any
channel.

Training: straight-through. The forward keeps exactly the first ``k`` channels; the gradient
flows to the scores through a soft prefix ``sigmoid((c - j - 0.5) / (tau * multiple / 4))`` of
the soft count ``c`` (logistic noise on the scores, scaled by ``noise``, explores). Calibration
shifts every score, as for the threshold policy. Channels only: a prefix of frames or of
spatial blocks means nothing.

Example:
    >>> import torch
    >>> p = WidthPolicy(multiple=2)
    >>> p.gate(torch.tensor([[3.0, -3.0, 3.0, 3.0, -3.0, -3.0]]), training=False)  # ~3 -> 4
    tensor([[1., 1., 1., 1., 0., 0.]])
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lightning_dance.masks import _logistic_noise
from lightning_dance.policies.base import Policy, register_policy

__all__ = ["WidthPolicy", "soft_count"]


def soft_count(logits: torch.Tensor) -> torch.Tensor:
    """The number of entries ``[N, K]`` scores keep, as a real number ``[N]``:
    ``sum(sigmoid(logits))``."""
    return torch.sigmoid(logits).sum(-1)


@register_policy
class WidthPolicy(Policy):
    """Keep the first ``k`` channels, ``k`` per clip: the rounded soft count of the scores
    (:func:`soft_count`), snapped to a multiple of ``multiple`` (to the layer's size when that
    is nearer; sizes up to ``multiple`` are not snapped), at least ``min_keep``.

    Args:
        multiple: kept counts are multiples of it (kernels are fast at multiples of 8 channels;
            fewer distinct counts also means fewer weight blocks to keep ready).
    """

    name = "width"
    fixed_counts = False
    calibration_span = 8.0
    supported_dims: ClassVar[tuple[str, ...]] = ("channel",)

    def __init__(self, multiple: int = 8) -> None:
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
        self.multiple = multiple

    def counts(self, logits: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
        """Kept counts ``[N]`` (long) of scores ``[N, K]``."""
        size = logits.shape[-1]
        c = soft_count(logits.detach())
        m = self.multiple
        if m > 1 and size > m:
            snapped = (c / m).round() * m
            k = torch.where(
                (size - c).abs() < (snapped - c).abs(), torch.full_like(c, size), snapped
            )
            k = k.clamp(min=m)
        else:
            k = c.round()
        return k.clamp(min=min(min_keep, size), max=size).long()

    def gate(self, logits, *, training, k=None, tau=1.0, noise=1.0, min_keep=1, generator=None):
        if training and noise:
            logits = logits + float(noise) * _logistic_noise(logits, generator)
        counts = self.counts(logits, min_keep)
        j = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        hard = (j < counts[:, None]).to(logits.dtype)
        if not training:
            return hard
        width = tau * max(1.0, self.multiple / 4)
        soft = torch.sigmoid((soft_count(logits)[:, None] - j - 0.5) / width)
        return hard + (soft - soft.detach())  # exactly 0/1 in value

    def logit_offset(self, calibration: float) -> float:
        return calibration

    def margin(self, logits: torch.Tensor, k: int | None = None) -> float:
        """How far each row's soft count is from where its snapped count changes, relative to
        the row's size (a runtime computing the scores slightly differently keeps as many)."""
        if not logits.numel():
            return math.inf
        c = soft_count(logits)
        step = self.multiple if logits.shape[-1] > self.multiple else 1
        frac = torch.remainder(c / step, 1.0)
        return float(((frac - 0.5).abs() * step / logits.shape[-1]).min())
