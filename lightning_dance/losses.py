"""AAP's training losses: the MAC budget terms and distillation from the dense model.

Example:
    >>> import torch
    >>> round(float(distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3))), 6)
    0.0
"""

from __future__ import annotations

import torch

from lightning_dance.stats import PruningStats

__all__ = ["budget_loss", "clip_distillation", "distillation_loss"]


def budget_loss(
    stats: PruningStats,
    budget: float | torch.Tensor,
    *,
    min_layer_keep: float = 0.05,
    targets: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The AAP budget terms from one forward pass's statistics.

    - ``ratio``: expected executed/dense MACs per clip, averaged over the batch (differentiable);
    - ``budget``: ``(ratio - budget) ** 2``: the MAC-weighted budget loss; with per-clip
      ``targets`` ``[N]`` (:func:`~lightning_dance.allocation.difficulty_targets`), the mean of
      ``(ratio_i - targets_i) ** 2`` over the clips instead;
    - ``bounds``: ``sum_l relu(min_layer_keep - kept_l) ** 2`` where ``kept_l`` is layer ``l``'s
      expected executed/dense MAC fraction: keeps any single layer from collapsing.
    """
    per_clip = stats.expected_macs() / max(1, stats.dense_total)
    ratio = per_clip.mean()
    terms = [
        torch.relu(min_layer_keep - (s.expected_macs.mean() / max(1, s.dense_macs))) ** 2
        for s in stats.layers.values()
    ]
    bounds = torch.stack(terms).sum() if terms else ratio.new_zeros(())
    if targets is None:
        term = (ratio - budget) ** 2
    else:
        if targets.shape != per_clip.shape:
            raise ValueError(
                f"targets must hold one MAC ratio per clip {tuple(per_clip.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        term = ((per_clip - targets.to(per_clip)) ** 2).mean()
    return {"ratio": ratio, "budget": term, "bounds": bounds}


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by ``T^2`` (Hinton et al.),
    averaged over the clips."""
    return clip_distillation(student, teacher, temperature).mean()


def clip_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """:func:`distillation_loss` of each clip ``[N]`` (the teacher detached)."""
    t = temperature
    log_p = torch.log_softmax(student / t, dim=-1)
    q = torch.softmax(teacher.detach() / t, dim=-1)
    return torch.nn.functional.kl_div(log_p, q, reduction="none").sum(-1) * (t * t)
