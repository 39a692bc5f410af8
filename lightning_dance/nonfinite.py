"""Guards against NaN / inf in training: find them in a batch or a loss before an optimizer step.

Used by :class:`~lightning_dance.ava_callback.AVACallback` and
:class:`~lightning_dance.wrapper.DANCEWrapper` (``on_nonfinite=``). One non-finite loss that
reaches ``backward`` and the optimizer turns every weight it touches into NaN for good; checking
inside ``training_step`` stops it before the step:

Gradients are checked too, right before each optimizer step (:meth:`NonFiniteGuard.check_gradients`):
a finite loss can still back-propagate NaN (seen with PyTorch's bf16 conv3d backward on CPU).

- ``"raise"`` (default): raise :class:`NonFiniteError` naming the batch index and what was
  non-finite; the exception leaves ``trainer.fit`` before the optimizer applies the batch.
- ``"skip"``: warn, count the batch and return ``None`` from ``training_step``, which Lightning's
  automatic optimization treats as "no backward": the optimizer step of that batch updates
  nothing (parameters without a gradient are left alone by torch optimizers; ``global_step``
  and step-interval LR schedulers still advance). Under DDP every rank must skip the same batches
  (Lightning does not support ``None`` from ``training_step`` there): use ``"raise"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dance.errors import DanceError

__all__ = ["NONFINITE_MODES", "NonFiniteError", "NonFiniteGuard", "check_nonfinite_mode"]

NONFINITE_MODES = ("raise", "skip")


class NonFiniteError(DanceError, ValueError):
    """A training batch or loss holds NaN or inf; raised before the optimizer applied it."""


def check_nonfinite_mode(mode: str) -> str:
    """Validate an ``on_nonfinite`` argument."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
    return mode


def is_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN / inf (integer tensors always do).

    One reduction first: a NaN / inf makes the sum non-finite; only then (or when a sum of huge
    finite values overflows) every element is looked at. Synchronizes with the device once.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def nonfinite_parts(batch: Any, name: str = "batch") -> list[str]:
    """Where ``batch`` (a tensor or nested tuples / lists / mappings of them) holds NaN / inf:
    e.g. ``["batch[0]"]``; empty when all is finite."""
    if isinstance(batch, torch.Tensor):
        return [] if is_finite(batch) else [name]
    found: list[str] = []
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            found += nonfinite_parts(value, f"{name}[{key!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            found += nonfinite_parts(value, f"{name}[{i}]")
    return found


class NonFiniteGuard:
    """Raises or counts-and-warns for one non-finite batch (see the module docstring)."""

    def __init__(self, mode: str, owner: str) -> None:
        self.mode = check_nonfinite_mode(mode)
        self.owner = owner
        self.skipped = 0

    def skip(
        self,
        what: str,
        batch_idx: int | str | None,
        trainer: Any = None,
        *,
        can_skip: bool = True,
    ) -> bool:
        """Handle a non-finite ``what`` (e.g. ``"task loss"``) in batch ``batch_idx``: raise
        :class:`NonFiniteError` in ``"raise"`` mode (or when ``can_skip`` is False), else warn,
        count it and return True (the caller returns ``None`` from ``training_step``)."""
        where = f"training batch {batch_idx}" if not isinstance(batch_idx, str) else batch_idx
        if trainer is not None:
            where += f" (epoch {trainer.current_epoch}, global step {trainer.global_step})"
        if self.mode == "raise" or not can_skip:
            fix = (
                f"or pass on_nonfinite='skip' to {self.owner} to skip such batches with a warning"
                if can_skip
                else "(this one cannot be skipped: the training_step runs the optimizer itself)"
            )
            raise NonFiniteError(
                f"{self.owner}: non-finite {what} (NaN or inf) at {where}. Stopped before the "
                "optimizer step applied it. Check the data of this batch (and the learning rate "
                f"/ loss scale if the loss diverged), {fix}."
            )
        self.skipped += 1
        rank_zero_warn(
            f"{self.owner}: skipped {where}: non-finite {what} (NaN or inf); no optimizer update "
            f"from it ({self.skipped} skipped so far)"
        )
        return True

    def check_gradients(self, module: torch.nn.Module, trainer: Any = None) -> None:
        """Before an optimizer step: a finite loss can still give NaN / inf gradients (seen:
        PyTorch's bf16 conv3d backward on CPU, sporadically). ``"raise"``: raise
        :class:`NonFiniteError` naming the parameters; ``"skip"``: warn, count the batch and
        drop every gradient (torch optimizers leave parameters without a gradient alone), so the
        step updates nothing. Not under ``16-mixed``: its GradScaler skips such steps itself."""
        if trainer is not None and str(getattr(trainer, "precision", "")) == "16-mixed":
            return
        bad = [
            n for n, p in module.named_parameters() if p.grad is not None and not is_finite(p.grad)
        ]
        if not bad:
            return
        step = None if trainer is None else trainer.global_step
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        self.skip(f"gradients ({names})", None if step is None else f"step {step}", trainer)
        for p in module.parameters():
            p.grad = None
