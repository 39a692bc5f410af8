"""How a training batch's MAC budget is shared among its clips.

AAP's budget loss (:func:`~lightning_dance.losses.budget_loss`) asks only that the batch's
*mean* MAC ratio meet the budget: a controller may spend more on some clips and less on others,
but nothing in training tells it which. Measured on the pareto benchmark (R(2+1)D, budget 0.35,
three seeds), the ``threshold`` controller trained that way spends the same MACs on the easiest
and the hardest third of the clips.

:func:`difficulty_targets` gives each clip its own target instead: the budget scaled by the
clip's rank in the batch by the model's own loss on it (:func:`clip_difficulty`), from
``budget * (1 - spread)`` for the easiest clip to ``budget * (1 + spread)`` for the hardest, so
that the batch still averages the budget (before targets above 1 are capped). The budget loss
then pulls each clip's MACs toward its target, and the controller, which sees only the stem's
statistics, learns which clips to spend on. At inference nothing changes: the controller decides
from the clip alone; the calibration after training still sets the mean.

Example:
    >>> import torch
    >>> t = difficulty_targets(0.4, torch.tensor([0.1, 2.0, 0.5, 1.0, 0.3]), spread=0.5)
    >>> [round(v, 2) for v in t.tolist()]
    [0.2, 0.6, 0.4, 0.5, 0.3]
    >>> round(float(t.mean()), 6)
    0.4
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_dance.losses import clip_distillation

__all__ = ["clip_difficulty", "difficulty_targets"]


def clip_difficulty(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """The model's loss on each clip ``[N]`` (detached): cross-entropy against ``labels`` plus
    the KL divergence from ``teacher``'s softened logits, whichever are given."""
    if labels is None and teacher is None:
        raise ValueError("clip_difficulty needs labels or teacher logits (or both)")
    logits = logits.detach().float()
    loss = logits.new_zeros(logits.shape[0])
    if labels is not None:
        loss = loss + F.cross_entropy(logits, labels, reduction="none")
    if teacher is not None:
        loss = loss + clip_distillation(logits, teacher.float(), temperature)
    return loss


def difficulty_targets(budget: float, difficulty: torch.Tensor, spread: float) -> torch.Tensor:
    """Per-clip MAC-ratio targets ``[N]``: ``budget * (1 + spread * (2 r - 1))`` with ``r`` the
    clip's rank by ``difficulty`` scaled to [0, 1] (0 the easiest in the batch), capped at 1.

    Ranks, not loss values: one clip with a huge loss takes no more than the hardest share.
    A batch of one clip gets the budget. ``spread`` in [0, 1); 0 gives every clip the budget.
    """
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"spread must be in [0, 1), got {spread}")
    if difficulty.dim() != 1:
        raise ValueError(
            f"difficulty must be one value per clip [N], got {tuple(difficulty.shape)}"
        )
    n = difficulty.numel()
    if n < 2 or spread == 0.0:
        return torch.full((n,), float(budget), device=difficulty.device)
    rank = difficulty.argsort().argsort().float() / (n - 1)
    return (budget * (1.0 + spread * (2.0 * rank - 1.0))).clamp(max=1.0)
