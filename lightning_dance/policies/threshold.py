"""DANCE's policy: keep what scores above zero, so the number kept varies per clip.

Example:
    >>> import torch
    >>> ThresholdPolicy().gate(torch.tensor([[2.0, -1.0, -0.5]]), training=False)
    tensor([[1., 0., 0.]])
    >>> ThresholdPolicy().logit_offset(0.5)
    0.5
"""

from __future__ import annotations

import math

import torch

from lightning_dance.masks import threshold_gate
from lightning_dance.policies.base import Policy, register_policy

__all__ = ["ThresholdPolicy"]


@register_policy
class ThresholdPolicy(Policy):
    """Keep an entry where its score is above 0 (:func:`~lightning_dance.masks.threshold_gate`:
    straight-through Gumbel-sigmoid in training). Input-dependent counts: dynamic shapes.
    Calibration adds an offset to every score."""

    name = "threshold"
    fixed_counts = False
    keeps_top_scores = True
    calibration_span = 8.0

    def gate(self, logits, *, training, k=None, tau=1.0, noise=1.0, min_keep=1, generator=None):
        return threshold_gate(
            logits, training=training, tau=tau, min_keep=min_keep, noise=noise, generator=generator
        )

    def logit_offset(self, calibration: float) -> float:
        return calibration

    def margin(self, logits: torch.Tensor, k: int | None = None) -> float:
        scale = logits.abs().amax(dim=1).clamp_min(1e-12)
        return float((logits.abs().amin(dim=1) / scale).min()) if logits.numel() else math.inf
