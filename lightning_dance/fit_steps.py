"""Counting a callback's optimizer steps across fits and resumed checkpoints.

A callback's schedule (AVA's weight warm-up, targeted dropout's ramp) runs on the optimizer steps
taken *with that callback*: ``trainer.global_step`` minus where the callback started, plus what
earlier fits or a checkpoint (``state_dict``) had counted. The start is read in
``on_train_start``, after Lightning restored a checkpoint's ``global_step``.

Example:
    >>> from types import SimpleNamespace
    >>> steps = FitSteps()
    >>> steps.offset = 10                      # restored from a checkpoint
    >>> trainer = SimpleNamespace(global_step=500)
    >>> steps.start(trainer)                   # on_train_start
    >>> trainer.global_step += 3
    >>> steps.value
    13
    >>> steps.stop(); steps.value              # teardown / on_exception: keeps counting later
    13
"""

from __future__ import annotations

from typing import Any

__all__ = ["FitSteps"]


class FitSteps:
    """Optimizer steps taken with a callback (see the module docstring)."""

    def __init__(self) -> None:
        self.offset = 0  # steps done before this fit (checkpoint or an earlier fit)
        self._trainer: Any = None
        self._origin: int | None = None  # trainer.global_step at which the count was offset

    @property
    def value(self) -> int:
        if self._trainer is not None and self._origin is not None:
            return int(self._trainer.global_step) - self._origin
        return self.offset

    def start(self, trainer: Any) -> None:
        """In ``on_train_start`` (after a checkpoint's ``global_step`` is restored)."""
        self._trainer = trainer
        self._origin = int(trainer.global_step) - self.offset

    def stop(self) -> None:
        """At the end of a fit (teardown, on_exception): keep the count, forget the trainer."""
        self.offset = self.value
        self._trainer, self._origin = None, None
