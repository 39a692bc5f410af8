"""``TargetedDropoutCallback``: the training phase of the DATE'20 attention method (seed 004) on
an unmodified LightningModule.

In every training batch, each selected Conv3d's input is ranked by the attention policy
(:meth:`~lightning_dance.policies.AttentionPolicy.layer_scores`: mean magnitude per channel,
per spatial column block, per frame); the lowest-ranked ``fraction`` of each dim are the
candidates, and each candidate is zeroed with probability ``rate`` (targeted dropout, Gomez et
al. 2019; kept units are not rescaled, as the pruned network is not). The network learns to
leave what the attention ranks low unimportant, so that pruning it at test time
(``policy="attention"``) costs little accuracy.

The mechanics are :class:`~lightning_dance.ava_callback.AVACallback`'s, minus the loss: forward
pre-hooks are put on the layers at fit start and removed at teardown and on exception; they act
only between ``on_train_batch_start`` and ``on_train_batch_end`` and only in training mode
(validation, test and predict run the unmodified network). The loss is not touched, so any
precision, gradient accumulation, DDP and manual optimization work as they do without it. The
decisions of one batch come from one :class:`~lightning_dance.decision.DecisionPlan` with the
attention policy, the very code ``policy="attention"`` prunes with; the dropout draws come from a
checkpointed generator (:class:`~lightning_dance.noise.GateNoise`), so a resumed fit drops what
an uninterrupted one would.

Example:
    >>> cb = TargetedDropoutCallback(rate=0.5, fraction=0.6, warmup_steps=100)
    >>> cb.fraction_at(0), cb.fraction_at(50), cb.fraction_at(1000)
    (0.0, 0.3, 0.6)
    >>> trainer = L.Trainer(callbacks=[cb])            # doctest: +SKIP
    >>> trainer.fit(my_unmodified_module, datamodule)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_dance.controller import NoController
from lightning_dance.decision import DecisionPlan
from lightning_dance.fit_steps import FitSteps
from lightning_dance.layers import LayerSelector, NoConv3dError, select_conv3d
from lightning_dance.masks import apply_masks, check_dims, keep_count
from lightning_dance.noise import GateNoise
from lightning_dance.policies import AttentionPolicy

__all__ = ["TargetedDropoutCallback"]


class _Dropping:
    """What the hooks share during one fit: the decision rules and the generator (a plain
    object: no trainer, no callback, so that a copy of the module does not copy them)."""

    def __init__(self, policy: AttentionPolicy, dims: tuple[str, ...], grid: int) -> None:
        self.policy, self.dims, self.grid = policy, dims, grid
        self.noise = GateNoise()
        self.fraction: float | None = None  # the candidate share; set during a training batch
        self.kept: dict[str, list[torch.Tensor]] = {}  # dim -> kept fractions [N] per layer

    def plan(self, device: torch.device | str, fraction: float) -> DecisionPlan:
        """See :meth:`TargetedDropoutCallback.plan`."""

        def counts(layer: str, dim: str, size: int) -> int:
            return keep_count(1.0 - fraction, size)

        return DecisionPlan(
            NoController(self.grid, self.policy.name),
            None,
            self.policy,
            counts=counts,
            training=True,
            generator=self.noise.generator(device),
            dims=self.dims,
        )


class _DropHook:
    """Forward pre-hook on a Conv3d: in a training batch, its input with the batch's targeted
    dropout masks applied."""

    def __init__(self, shared: _Dropping, name: str) -> None:
        self.shared, self.name = shared, name

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        shared = self.shared
        if shared.fraction is None or not module.training:
            return None
        x = args[0]
        # a plan per call: a step that runs the layer twice (two clips) ranks each input
        plan = shared.plan(x.device, shared.fraction)
        masks = plan.masks(self.name, tuple(x.shape[1:]), inputs=x)
        for dim, frac in masks.kept_fraction().items():
            self.shared.kept.setdefault(dim, []).append(frac)
        return (apply_masks(x, masks.values), *args[1:])


class TargetedDropoutCallback(Callback):
    """Targeted dropout of the units the attention ranks lowest, in every selected Conv3d's
    input, while training an unmodified LightningModule (see the module docstring).

    Args:
        rate: probability that each candidate is dropped, in ``[0, 1]`` (Gomez et al.'s
            ``alpha``).
        fraction: share of each layer's units per dim, the lowest ranked, that are candidates,
            in ``[0, 1)`` (``gamma``; match the share ``policy="attention"`` will prune at your
            budget). With ``warmup_steps`` it ramps linearly from 0.
        dims: which units: any of ``("frame", "channel", "feature")``; default the paper's
            channels and (spatial) columns.
        layers: which Conv3d (see :func:`lightning_dance.layers.select_conv3d`; default all
            but the stem).
        grid: spatial column blocks per side at most (as the pruner's ``grid``).
        warmup_steps: optimizer steps over which ``fraction`` ramps up (0: from the start);
            the step count continues across resumed fits (``state_dict``).
        log: log ``targeted_dropout/dropped_<dim>`` (mean share of units zeroed per layer) and
            ``targeted_dropout/fraction`` every training step.

    Raises:
        ValueError: bad arguments (at construction), or at fit start an empty layer
            selection.
        TypeError: arguments of the wrong type (at construction).
        NoConv3dError: at fit start, for a model without Conv3d.

    Example:
        >>> TargetedDropoutCallback(rate=0.75, dims=("channel",)).state_dict()["step"]
        0
    """

    def __init__(
        self,
        rate: float = 0.5,
        fraction: float = 0.5,
        *,
        dims: Iterable[str] = ("channel", "feature"),
        layers: LayerSelector = None,
        grid: int = 4,
        warmup_steps: int = 0,
        log: bool = True,
    ) -> None:
        self.policy = AttentionPolicy(drop_rate=rate)  # validates the rate
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"fraction must be a float in [0, 1), got {fraction!r}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"fraction must be in [0, 1) (1 would drop every unit), got {fraction}"
            )
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be an int >= 1, got {grid!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.rate, self.fraction = float(rate), float(fraction)
        self.dims = check_dims(tuple(dims))
        self.layers, self.grid, self.warmup_steps = layers, grid, warmup_steps
        self.log_metrics = log
        self._steps = FitSteps()
        self._shared = _Dropping(self.policy, self.dims, grid)
        self._handles: list[Any] = []
        self.layer_names: list[str] = []

    # ----------------------------------------------------------------- schedule and state
    def fraction_at(self, step: int) -> float:
        """The candidate share at optimizer step ``step`` (the warm-up ramp)."""
        if self.warmup_steps:
            return self.fraction * min(1.0, step / self.warmup_steps)
        return self.fraction

    @property
    def step(self) -> int:
        """Optimizer steps taken with this callback (continues across resumed fits)."""
        return self._steps.value

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "noise_rng": self._shared.noise.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps.offset = int(state_dict["step"])
        if "noise_rng" in state_dict:
            self._shared.noise.set_state(state_dict["noise_rng"])

    # ----------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            convs = select_conv3d(pl_module, self.layers)
        except NoConv3dError as err:
            raise NoConv3dError(f"TargetedDropoutCallback: {err}") from err
        self._detach()
        self.layer_names = list(convs)
        self._handles = [
            conv.register_forward_pre_hook(_DropHook(self._shared, name))
            for name, conv in convs.items()
        ]
        rank_zero_info(
            f"Targeted dropout: rate {self.rate} of the lowest-ranked {self.fraction:.0%} of "
            f"{list(self.dims)} in the inputs of {len(convs)} Conv3d layers"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps.start(trainer)  # after a checkpoint's global_step is restored

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._shared.kept.clear()
        self._shared.fraction = self.fraction_at(self.step)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._shared.fraction = None
        if self.log_metrics:
            pl_module.log("targeted_dropout/fraction", self.fraction_at(self.step), on_step=True)
            for dim, fracs in self._shared.kept.items():
                dropped = 1.0 - float(torch.cat(fracs).float().mean())
                pl_module.log(f"targeted_dropout/dropped_{dim}", dropped, on_step=True)
        self._shared.kept.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        self._steps.stop()
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._shared.fraction = None
        self._shared.kept.clear()

    # ----------------------------------------------------------------- decisions
    def plan(self, device: torch.device | str, fraction: float | None = None) -> DecisionPlan:
        """The decision plan of one training batch: the attention policy's training gates
        (targeted dropout at ``rate``) keeping the top ``1 - fraction`` of every layer and dim
        (at least one unit), drawing from this callback's generator on ``device``."""
        fraction = self.fraction if fraction is None else fraction
        return self._shared.plan(device, fraction)
