"""CNN Mixture-of-Depths style policy: keep the ``k`` best-scored entries of every layer.

Example:
    >>> import torch
    >>> TopKPolicy().gate(torch.tensor([[2.0, -1.0, 0.5]]), k=2, training=False)
    tensor([[1., 0., 1.]])
"""

from __future__ import annotations

import math

import torch

from lightning_dance.masks import topk_gate
from lightning_dance.policies.base import Policy, register_policy

__all__ = ["TopKPolicy"]


@register_policy
class TopKPolicy(Policy):
    """Keep exactly ``k`` entries per layer and dim (:func:`~lightning_dance.masks.topk_gate`),
    ``k`` from the pruner's budget: static shapes, exportable as a static graph. Calibration
    scales the keep ratio by ``exp(offset)``."""

    name = "topk"
    fixed_counts = True
    keeps_top_scores = True
    calibration_span = 4.0

    def gate(self, logits, *, training, k=None, tau=1.0, noise=1.0, min_keep=1, generator=None):
        if k is None:
            raise ValueError("the topk policy needs the number of entries to keep (k)")
        return topk_gate(logits, k, training=training, tau=tau, noise=noise, generator=generator)

    def ratio_scale(self, calibration: float) -> float:
        return math.exp(calibration)

    def margin(self, logits: torch.Tensor, k: int | None = None) -> float:
        if k is None or k >= logits.shape[1]:
            return math.inf
        scale = logits.abs().amax(dim=1).clamp_min(1e-12)
        top = logits.topk(k + 1, dim=1).values
        return float(((top[:, k - 1] - top[:, k]) / scale).min())
