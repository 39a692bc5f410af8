"""Training schedules of DANCE's fine-tuning, as functions of the fraction of steps done.

:class:`~lightning_dance.wrapper.DANCEWrapper` and the
:class:`~lightning_dance.static_first.StaticFirst` callback read them; they hold no state:

- :func:`training_progress`: the fraction of a Trainer's steps done (``None`` without a finite
  step count);
- :func:`noise_scale`: the gates' exploration noise, falling linearly from 1 to 0 over
  ``anneal`` of the steps;
- :func:`warmup_budget`: gradual pruning, the budget falling from 1 to its target over
  ``warmup`` of the steps along Zhu & Gupta's cubic schedule;
- :func:`check_schedules`: the wrapper's schedule arguments, checked together (each error names
  the fix).

Example:
    >>> noise_scale(0.7, 0.35), noise_scale(0.7, 0.9), noise_scale(0.0, 0.1)
    (0.5, 0.0, 0.0)
    >>> [round(warmup_budget(0.35, 0.3, p), 4) for p in (0.0, 0.15, 0.3, 0.5)]
    [1.0, 0.4312, 0.35, 0.35]
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_schedules", "noise_scale", "training_progress", "warmup_budget"]

LR_SCHEDULES = ("constant", "cosine")


def training_progress(trainer: Any, step: int | None = None) -> float | None:
    """``step`` (default: the trainer's ``global_step``) over the trainer's estimated training
    steps, at most 1; ``None`` without a trainer or without a finite number of steps."""
    if trainer is None:
        return None
    total = trainer.estimated_stepping_batches
    if not total or total == float("inf"):
        return None
    step = trainer.global_step if step is None else step
    return min(1.0, step / float(total))


def noise_scale(anneal: float, progress: float | None) -> float:
    """The gates' noise scale: ``1 - progress / anneal`` down to 0 (0 throughout when
    ``anneal`` is 0; 1 when the progress is unknown)."""
    if anneal <= 0:
        return 0.0
    return 1.0 if progress is None else max(0.0, 1.0 - progress / anneal)


def warmup_budget(budget: float, warmup: float, progress: float | None) -> float:
    """The training budget for target ``budget``: ``b + (1 - b) * (1 - progress / warmup) ** 3``
    during the first ``warmup`` of the steps, then ``budget`` (also without a warmup or a
    known progress)."""
    if warmup <= 0 or progress is None or progress >= warmup:
        return budget
    return budget + (1.0 - budget) * (1.0 - progress / warmup) ** 3


def check_schedules(
    *,
    noise_anneal: float,
    budget_warmup: float,
    calibrate_every: int,
    budget_feedback: float,
    lr_schedule: str,
    budget_range: tuple[float, float] | None,
) -> None:
    """Raise ``ValueError`` naming the fix for a schedule argument of
    :class:`~lightning_dance.wrapper.DANCEWrapper` out of range, or for one that steers toward
    one target budget given with ``budget_range`` (a controller that samples its budget per
    batch)."""
    if not 0.0 <= noise_anneal <= 1.0:
        raise ValueError(f"noise_anneal must be in [0, 1], got {noise_anneal}")
    if not 0.0 <= budget_warmup < 1.0:
        raise ValueError(f"budget_warmup must be in [0, 1), got {budget_warmup}")
    if (
        isinstance(calibrate_every, bool)
        or not isinstance(calibrate_every, int)
        or (calibrate_every < 0)
    ):
        raise ValueError(f"calibrate_every must be an int >= 0, got {calibrate_every!r}")
    if isinstance(budget_feedback, bool) or not (
        isinstance(budget_feedback, (int, float)) and budget_feedback >= 0
    ):
        raise ValueError(f"budget_feedback must be a number >= 0, got {budget_feedback!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if budget_range is None:
        return
    for name, value, what in (
        ("budget_warmup", budget_warmup, "schedules one target budget"),
        ("calibrate_every", calibrate_every, "calibrates to one target budget"),
        ("budget_feedback", budget_feedback, "steers toward one target budget"),
    ):
        if value:
            raise ValueError(
                f"{name} {what}; a budget-conditioned controller (budget_range) samples its "
                "budget per batch: use one or the other"
            )
