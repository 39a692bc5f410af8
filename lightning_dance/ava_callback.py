"""``AVACallback``: AVA on an unmodified LightningModule (a thin shell over ``AVARecorder``).

Automatic optimization (the usual case): nothing changes in the user's module. At fit start the
callback puts forward pre-hooks on the selected Conv3d layers and wraps the module *instance's*
``training_step`` in a small picklable object that records during the step and returns
``loss + weight(step) * penalty`` (``out["loss"]`` for dict returns). Lightning then applies
gradient accumulation, AMP scaling and DDP to that loss as usual. Everything is undone in
``teardown`` and ``on_exception``.

Manual optimization: Lightning ignores what ``training_step`` returns, so the user adds the term
explicitly; the callback raises at the first step that lacks it::

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        loss = loss + ava_loss_term(self)          # or: my_ava_callback.penalty(self)
        self.manual_backward(loss)
        ...

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(max_epochs=1, callbacks=[AVACallback(weight=2.0, warmup_steps=50)])
    >>> trainer.fit(my_unmodified_module, datamodule)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_dance.ava import AVARecorder, check_measure, validate_dims
from lightning_dance.fit_steps import FitSteps
from lightning_dance.layers import LayerSelector, NoConv3dError
from lightning_dance.masks import DIMS
from lightning_dance.nonfinite import NonFiniteGuard, is_finite, nonfinite_parts

__all__ = ["DEFAULT_WARMUP_STEPS", "DEFAULT_WEIGHT", "AVACallback", "ava_loss_term"]

Schedule = float | Callable[[int], float]

#: Default lambda and warm-up: the setting measured in ``docs/ava.md`` (tiny_c3d, synthetic data:
#: no accuracy cost, top-1 with 50% of the channels zeroed per input 29% -> 57%). 0.1 barely
#: changes the spread; 3 is more robust still but costs 0.5 pp.
DEFAULT_WEIGHT = 2.0
DEFAULT_WARMUP_STEPS = 50


class _AVATrainingStep:
    """Replaces ``pl_module.training_step`` on the instance during fit.

    Holds only the module and the callback's state key (no bound method, no callback, no
    trainer), so deepcopy/pickle of the module stay cheap and work while fitting.
    """

    def __init__(self, module: L.LightningModule, key: str, previous: Any) -> None:
        self.module, self.key, self.previous = module, key, previous

    @property
    def __wrapped__(self) -> Any:  # what Lightning's is_overridden("training_step") inspects
        if self.previous is None:
            return type(self.module).training_step
        return getattr(self.previous, "__wrapped__", self.previous)

    def original(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).training_step(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer = self.module._trainer
        callbacks = [] if trainer is None else trainer.callbacks
        for cb in callbacks:
            if isinstance(cb, AVACallback) and cb.state_key == self.key:
                return cb._training_step(self, args, kwargs)
        return self.original(*args, **kwargs)  # a copy of the module outside its fit


class AVACallback(Callback):
    """Adds ``weight(step) * AVA penalty`` to the loss of an unmodified LightningModule.

    Args:
        weight: lambda; a float >= 0, or a callable ``step -> float`` where ``step`` counts the
            optimizer steps taken with this callback (restored from checkpoints).
        warmup_steps: with a float ``weight``, ramp linearly: ``weight * min(1, step /
            warmup_steps)`` (0 = constant; default ``DEFAULT_WARMUP_STEPS`` for a float
            weight, 0 for a callable).
        layers, dims, dim_weights, measure: see :class:`lightning_dance.ava.AVARecorder`.
        log: log ``ava/penalty``, ``ava/weight`` and ``ava/spread_<dim>`` every step.
        prog_bar: show ``ava/penalty`` in the progress bar.
        on_nonfinite: what to do with a training batch whose input, task loss (what
            ``training_step`` returns), AVA penalty or total loss holds NaN / inf: ``"raise"``
            (default) a :class:`~lightning_dance.nonfinite.NonFiniteError` naming the batch
            index and the culprit, before any optimizer step applies it; or ``"skip"`` it with a
            warning (``training_step`` returns ``None``: no update from that batch), counted in
            ``skipped_batches`` (saved in ``state_dict``) and logged as ``ava/skipped_batches``.
            Limits: under manual optimization only the input batch is checked before the user's
            step (and a non-finite penalty always raises), since the user's code runs backward
            and the optimizer; ``"skip"`` is for single-process training (under DDP all ranks
            must skip together: use ``"raise"``); the optimizer step of a skipped batch still
            counts in ``global_step`` and in this callback's ``step``.

    Raises:
        ValueError: bad arguments (at construction); ``NoConv3dError`` / ``ValueError`` at fit
            start for a model without Conv3d or an empty layer selection;
            :class:`~lightning_dance.nonfinite.NonFiniteError` (a ``ValueError``) during fit,
            see ``on_nonfinite``.

    Example:
        >>> cb = AVACallback(weight=0.2, warmup_steps=50, dims=("frame", "channel"))
        >>> cb.weight_at(25)
        0.1
    """

    def __init__(
        self,
        weight: Schedule = DEFAULT_WEIGHT,
        *,
        warmup_steps: int | None = None,
        layers: LayerSelector = None,
        dims: Iterable[str] = DIMS,
        dim_weights: Mapping[str, float] | Iterable[float] | None = None,
        measure: str = "gini",
        log: bool = True,
        prog_bar: bool = False,
        on_nonfinite: str = "raise",
    ) -> None:
        self._guard = NonFiniteGuard(on_nonfinite, "AVACallback")
        if warmup_steps is None:
            warmup_steps = 0 if callable(weight) else DEFAULT_WARMUP_STEPS
        if callable(weight):
            if warmup_steps:
                raise ValueError(
                    "warmup_steps applies to a float weight; fold it into the callable"
                )
        elif isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"weight must be a float or a callable step -> float, got {weight!r}")
        elif not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        check_measure(measure)
        self.dim_weights = validate_dims(dims, dim_weights)
        self.weight, self.warmup_steps = weight, warmup_steps
        self.layers, self.measure = layers, measure
        self.log_metrics, self.prog_bar = log, prog_bar
        self.recorder: AVARecorder | None = None
        self._trainer: L.Trainer | None = None
        self._steps = FitSteps()
        self._manual = False
        self._batch_idx: int | None = None

    # ----------------------------------------------------------------- schedule and state
    def weight_at(self, step: int) -> float:
        """The lambda applied at ``step`` (optimizer steps taken with this callback)."""
        if callable(self.weight):
            w = float(self.weight(step))
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"the weight schedule returned {w} at step {step}; need >= 0")
            return w
        if self.warmup_steps:
            return self.weight * min(1.0, step / self.warmup_steps)
        return float(self.weight)

    @property
    def step(self) -> int:
        """Optimizer steps taken with this callback (continues across resumed fits)."""
        return self._steps.value

    @property
    def on_nonfinite(self) -> str:
        return self._guard.mode

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped for NaN / inf (``on_nonfinite="skip"``), across fits."""
        return self._guard.skipped

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps.offset = int(state_dict["step"])
        self._guard.skipped = int(state_dict.get("skipped_batches", 0))

    # ----------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self.recorder = AVARecorder(
                pl_module,
                self.layers,
                dims=self.dim_weights,
                dim_weights=self.dim_weights,
                measure=self.measure,
            ).attach()
        except NoConv3dError as err:
            raise NoConv3dError(f"AVACallback: {err}") from err
        self._trainer = trainer
        self._manual = not pl_module.automatic_optimization
        previous = pl_module.__dict__.get("training_step")
        pl_module.training_step = _AVATrainingStep(pl_module, self.state_key, previous)
        rank_zero_info(
            f"AVA: regularizing the inputs of {len(self.recorder.layers)} Conv3d layers over "
            f"{list(self.dim_weights)} ({self.measure})"
            + (
                " -- manual optimization: add ava_loss_term(self) to your loss"
                if self._manual
                else ""
            )
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the checkpoint's global_step is restored (on_fit_start comes before it)
        self._steps.start(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        self._steps.stop()
        self._trainer = None
        if self.recorder is not None:
            self.recorder.detach()
            self.recorder.clear()
            self.recorder = None
        wrapper = pl_module.__dict__.get("training_step")
        if isinstance(wrapper, _AVATrainingStep) and wrapper.key == self.state_key:
            if wrapper.previous is None:
                del pl_module.__dict__["training_step"]
            else:
                pl_module.training_step = wrapper.previous
        elif wrapper is not None and not isinstance(wrapper, _AVATrainingStep):
            rank_zero_warn(
                "AVACallback: training_step was re-wrapped after AVA wrapped it; left it in place"
            )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self._guard.check_gradients(pl_module, trainer)

    # ----------------------------------------------------------------- the step
    def _training_step(self, wrapper: _AVATrainingStep, args: tuple, kwargs: dict) -> Any:
        self._batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx")
        out = self._checked_step(wrapper, args, kwargs)
        if self._guard.mode == "skip" and self.log_metrics:
            wrapper.module.log(
                "ava/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False
            )
        return out

    def _checked_step(self, wrapper: _AVATrainingStep, args: tuple, kwargs: dict) -> Any:
        rec = self.recorder
        assert rec is not None
        module = wrapper.module
        bad = nonfinite_parts(args[0] if args else kwargs.get("batch"))
        if bad and self._skip(f"input clip ({', '.join(bad)})"):
            return None  # the user's step does not run: no forward, no optimizer update
        rec.start()
        try:
            out = wrapper.original(*args, **kwargs)
        finally:
            rec.stop()
        calls = rec._records.penalty_calls
        if self._manual:
            rec.clear()
            if calls == 0:
                raise RuntimeError(
                    "AVACallback with manual optimization: Lightning ignores the loss returned by "
                    "training_step, so AVA cannot add its penalty. Add it yourself before "
                    "manual_backward: `loss = loss + ava_loss_term(self)` "
                    "(from lightning_dance.ava_callback import ava_loss_term)."
                )
            return out
        if calls:
            rec.clear()
            raise RuntimeError(
                "AVACallback: the penalty was requested inside training_step under automatic "
                "optimization, where AVA adds it to the returned loss itself; remove the "
                "ava_loss_term / penalty call (it would be counted twice)."
            )
        if out is None:  # the user skipped this batch
            rec.clear()
            return out
        if isinstance(out, Tensor):
            loss = out
        elif isinstance(out, Mapping) and "loss" in out:
            loss = out["loss"]
        else:
            rec.clear()
            raise TypeError(
                "AVACallback: training_step must return a loss tensor or a dict with a 'loss' "
                f"key, got {type(out).__name__}"
            )
        try:
            if not is_finite(loss.detach()) and self._skip("task loss"):
                return None
            term = self._term(module)
        finally:
            rec.clear()
        if term is None:
            return None
        total = loss + term
        if not is_finite(total.detach()) and self._skip("total loss"):
            return None
        return total if isinstance(out, Tensor) else {**out, "loss": total}

    def _skip(self, what: str) -> bool:
        # under manual optimization the user's code steps the optimizer: only the input batch
        # (checked before the user's step runs) can be skipped
        can_skip = not self._manual or what.startswith("input")
        return self._guard.skip(what, self._batch_idx, self._trainer, can_skip=can_skip)

    def _term(self, pl_module: L.LightningModule) -> Tensor | None:
        """``weight(step) * penalty``, or None when a non-finite penalty skips the batch."""
        rec = self.recorder
        assert rec is not None
        pen = rec.penalty()
        if not is_finite(pen.detach()) and self._skip("AVA penalty"):
            return None
        w = self.weight_at(self.step)
        if self.log_metrics:
            pl_module.log(
                "ava/penalty", pen.detach(), on_step=True, on_epoch=False, prog_bar=self.prog_bar
            )
            pl_module.log("ava/weight", w, on_step=True, on_epoch=False)
            for dim, value in rec.spreads().items():
                pl_module.log(f"ava/spread_{dim}", value, on_step=True, on_epoch=False)
        return w * pen

    def penalty(self, pl_module: L.LightningModule) -> Tensor:
        """``weight(step) * penalty`` of the current step, for manual optimization.

        Call it inside ``training_step`` after the forward pass and add it to the loss.
        """
        if self.recorder is None or not self.recorder._records.active:
            raise RuntimeError(
                "AVACallback.penalty() must be called inside training_step during fit"
            )
        if not self._manual:
            self.recorder._records.penalty_calls += 1  # makes the wrapper raise a clear error
            return torch.zeros((), device=pl_module.device)
        term = self._term(pl_module)
        assert term is not None  # under manual optimization a non-finite penalty raises
        return term


def ava_loss_term(pl_module: L.LightningModule) -> Tensor:
    """The AVA term to add to the loss in a manual-optimization ``training_step``.

    Finds the (single) :class:`AVACallback` of the module's trainer and returns its
    ``weight(step) * penalty``.
    """
    found = [c for c in pl_module.trainer.callbacks if isinstance(c, AVACallback)]
    if len(found) != 1:
        raise RuntimeError(
            f"ava_loss_term needs exactly one AVACallback on the trainer, found {len(found)}; "
            "with several, call penalty(self) on the one you mean"
        )
    return found[0].penalty(pl_module)
