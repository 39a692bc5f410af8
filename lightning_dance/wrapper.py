"""``DANCEWrapper``: the Lightning shell that trains an AAP controller on a user's 3D CNN.

The functional core lives in :mod:`lightning_dance.aap` (:class:`AdaptivePruner`: hooks, gates,
statistics; losses); this module only wires it into the Trainer: optimizers, logging, metrics,
checkpoints.

Example:
    >>> import lightning as L
    >>> from lightning_dance import DANCEWrapper, SyntheticVideoDataModule, VideoClassifier
    >>> user_model = VideoClassifier("tiny_c3d", num_classes=10)        # already trained
    >>> wrapper = DANCEWrapper(user_model, budget=0.5)                   # backbone frozen
    >>> dm = SyntheticVideoDataModule(num_classes=10, frames=8, size=32, train_size=8,
    ...                               val_size=4, batch_size=4)      # tiny, to run as a test
    >>> L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
    ...           enable_progress_bar=False, enable_model_summary=False).fit(wrapper, dm)
    >>> original = wrapper.unwrap()  # the user's module, unchanged
    >>> original is user_model
    True
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torchmetrics import MeanMetric

from lightning_dance.aap import AdaptivePruner
from lightning_dance.allocation import clip_difficulty, difficulty_targets
from lightning_dance.checkpoints import (
    ArchitectureMismatchError,
    check_architecture,
    check_num_classes,
    model_from_name,
)
from lightning_dance.errors import DanceError
from lightning_dance.layers import LayerSelector
from lightning_dance.losses import budget_loss, distillation_loss
from lightning_dance.masks import DIMS
from lightning_dance.nonfinite import NonFiniteGuard, is_finite
from lightning_dance.policies import Policy, available_policies, get_policy
from lightning_dance.schedules import (
    check_schedules,
    noise_scale,
    training_progress,
    warmup_budget,
)
from lightning_dance.stats import PruningStats
from lightning_dance.teacher import TASKS, TeacherCheck, task_losses
from lightning_dance.train_mode import train_at_fit_start

__all__ = ["DANCEWrapper", "ArchitectureMismatchError"]

EXECUTIONS = ("masked", "compact")


class DANCEWrapper(L.LightningModule):
    """Instrument every Conv3d of ``model`` and train the DANCE controller (AAP).

    Args:
        model: the user's network: an ``nn.Module`` or LightningModule mapping a clip
            ``[N, C, T, H, W]`` to logits, or a factory name (with ``num_classes`` or
            ``model_kwargs``), or the path of a dense model's Lightning checkpoint (a
            ``.ckpt`` file, loaded with :func:`~lightning_dance.checkpoints.load_module`: the
            form a YAML config uses), or an :class:`~lightning_dance.aap.AdaptivePruner`
            configured already (then the pruner's own arguments below, from ``budget`` to
            ``channel_multiple`` but ``budget_range``, stay at their defaults: the pruner has
            them).
        budget: target executed/dense MAC ratio in (0, 1].
        dims: which input dims to prune (subset of ``("frame", "channel", "feature")``).
        policy: ``"threshold"`` (DANCE, input-dependent), ``"topk"`` (fixed counts,
            exportable), ``"attention"`` (DATE'20: no controller, each layer ranks its own input;
            trained by fine-tuning the backbone under targeted dropout, ``docs/attention.md``)
            or any :class:`~lightning_dance.policies.Policy` (name, class or instance).
        layers: which Conv3d to instrument (default: all but the stem).
        budget_range: train one budget-conditioned controller for budgets in ``(low, high)``
            (sampled per batch); pick one at inference with :meth:`set_budget`.
        task: ``"auto"`` (the default: cross-entropy on labelled batches, distillation on
            unlabelled ones), ``"labels"`` (cross-entropy), ``"distill"`` (match the dense
            model's outputs: no labels needed) or ``"both"``. The teacher is the model you wrap,
            mistakes included: with labels, distilling from a teacher trained 8 epochs cost the
            ``threshold`` pruner 6-13 pp on the benchmark, so ``"auto"`` distils only where
            there are no labels (:mod:`lightning_dance.teacher`). With ``"distill"`` or
            ``"both"`` on labelled batches the teacher's top-1 on them is logged
            (``dance/train_teacher_acc``) and a warning names the fix when it is below 95%.
        distill_temperature: softmax temperature of the distillation loss.
        freeze_backbone: train only the controller; ``False`` fine-tunes jointly. Default
            (``None``): frozen, unless the policy has no controller to train
            (:attr:`~lightning_dance.policies.Policy.trains_controller`: ``"attention"``), whose
            training is fine-tuning the backbone under its training gates (targeted dropout).
        lr, weight_decay: AdamW settings (the controller's learning rate).
        backbone_lr: with ``freeze_backbone=False``, the backbone's learning rate (default
            ``lr / 10``: the controller starts from scratch, the backbone is already trained).
        budget_weight: weight of ``(E[executed]/dense - budget)^2`` (per clip, against each
            clip's own target, with ``difficulty_spread``).
        bound_weight, min_layer_keep: per-layer lower bound on the kept MAC fraction (so that no
            layer collapses) and its weight.
        grid, hidden, tau, init_keep, min_keep, credit_outputs, channel_multiple, feature_site: see
            :class:`~lightning_dance.aap.AdaptivePruner` (``credit_outputs``, on by default
            where it applies: the budget is the cost of the output-skipping fast path,
            :meth:`compile_sparse`; ``False``: every producer counted in full, the earlier default;
            ``channel_multiple=8``: ``topk`` keeps multiples of 8 channels, the sizes the CPU
            fast path is fastest at; ``feature_site="outputs"``: feature masks select the
            layers' output positions, :mod:`lightning_dance.feature_sites`).
        layer_dims: ``{layer: dims}`` for layers that prune only some of ``dims`` (see
            :class:`~lightning_dance.aap.AdaptivePruner`; ``threshold`` and ``attention`` only).
        noise_anneal: the gates' exploration noise falls linearly from 1 to 0 over this fraction
            of the training steps, then training decisions are the eval ones, so the budget met
            in training is met at eval (0: no noise at all; 1: noise until the last step).
        budget_warmup: gradual pruning: over this fraction of the training steps the training
            budget falls from 1 (dense) to ``budget`` along Zhu & Gupta's cubic schedule
            ``b + (1 - b) * (1 - step / warmup_steps) ** 3``, so that the backbone adapts to the
            pruning step by step (0: the target budget from the first step). Not with
            ``budget_range``. Validation, test and inference always use ``budget``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (both parameter groups decay to 0 over the
            training steps, stepped per batch).
        calibrate_every: every this many training batches, calibrate the keep decisions on the
            batch to the step's training budget (:meth:`AdaptivePruner.calibrate`, eval masks,
            no gradient), so that training keeps what the budget allows. Without it the
            ``threshold`` policy's training ratio can settle above the budget (the squared budget
            loss pushes weakly near it), and the calibration after training then cuts more at
            test time than training ever saw. Measured, one seed each (``docs/aap.md``,
            ``docs/benchmarks.md``): on ``tiny_c3d`` at budget 0.6, 5 joint epochs gave 52-55%
            top-1 without it and 79.7-81.8% with ``calibrate_every=10`` (dense 73%); on
            ``r2plus1d_18`` at budget 0.35 it *collapsed* training (22.9% vs 76.6% without).
            An option to try, not a default. Costs about 10 forward passes a calibration. 0:
            never (the default). Not with ``budget_range``.
        budget_feedback: after every training batch, move the calibration offset toward the
            step's training budget by ``budget_feedback x (batch MAC ratio - budget)`` (an
            integral controller, as a dual variable of the budget constraint: smooth where
            ``calibrate_every`` jumps). Training then runs at the budget the model will be
            calibrated to, and the calibration after training moves little. Measured (one
            seed, ``r2plus1d_18`` width 0.25, ``width`` policy at budget 0.5, 2 joint epochs): the
            training ratio settled at 0.69 without it, and calibrating to 0.5 afterwards
            collapsed top-1 from 85% to 17%. 0: off (the default). Not with ``budget_range``.
        difficulty_spread: share the training batch's budget by difficulty
            (:mod:`lightning_dance.allocation`): each clip's target is the budget scaled by its
            rank in the batch by the model's own loss, from ``budget * (1 - spread)`` (easiest)
            to ``budget * (1 + spread)`` (hardest), and the budget loss pulls every clip toward
            its own target, so that the controller learns to spend on the clips that need it.
            0 (the default): one budget for the batch mean.
        execution: ``"masked"`` (multiply by the masks: the training path) or ``"compact"``
            (inference skips the pruned work, see :meth:`compile_sparse`).
        model_kwargs: for a factory name: ``create_model`` arguments (``num_classes`` here or
            as ``num_classes``).
        num_classes: for a factory name, its number of classes; for a checkpoint or a module
            that records ``num_classes`` in its hyperparameters, checked against it (the CLI
            links it from the data).
        on_nonfinite: what to do with a training batch whose clip, task loss (cross-entropy /
            distillation), budget loss or total loss holds NaN / inf: ``"raise"`` (default) a
            :class:`~lightning_dance.nonfinite.NonFiniteError` naming the batch index and the
            culprit, before any optimizer step applies it; or ``"skip"`` it with a warning
            (``training_step`` returns ``None``: no update from that batch), counted in
            ``skipped_batches`` (saved in checkpoints) and logged as ``dance/skipped_batches``.
            ``"skip"`` is for single-process training (under DDP all ranks must skip together:
            use ``"raise"``); the skipped batch's step still counts in ``global_step`` and so in
            the noise / budget / LR schedules. Validation and test batches are not affected.

    Logs ``dance/mac_ratio`` (executed/dense, hard masks), ``dance/expected_ratio``,
    ``dance/kept_<dim>``, ``dance/loss_*`` and ``train|val|test/acc`` when labels are present.
    """

    def __init__(
        self,
        model: nn.Module | str | AdaptivePruner,
        *,
        budget: float = 0.5,
        dims: tuple[str, ...] | list[str] = DIMS,
        policy: str | Policy | type[Policy] = "threshold",
        layers: LayerSelector = None,
        budget_range: tuple[float, float] | None = None,
        task: str = "auto",
        distill_temperature: float = 2.0,
        freeze_backbone: bool | None = None,
        lr: float = 3e-3,
        backbone_lr: float | None = None,
        weight_decay: float = 0.0,
        budget_weight: float = 10.0,
        bound_weight: float = 1.0,
        min_layer_keep: float = 0.05,
        grid: int = 4,
        hidden: int = 64,
        tau: float = 1.0,
        init_keep: float = 0.9,
        min_keep: int = 1,
        credit_outputs: bool | None = None,
        channel_multiple: int = 1,
        feature_site: str = "inputs",
        layer_dims: dict[str, list[str]] | None = None,
        noise_anneal: float = 0.7,
        budget_warmup: float = 0.0,
        lr_schedule: str = "constant",
        calibrate_every: int = 0,
        budget_feedback: float = 0.0,
        difficulty_spread: float = 0.0,
        execution: str = "masked",
        model_kwargs: dict[str, Any] | None = None,
        on_nonfinite: str = "raise",
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        guard = NonFiniteGuard(on_nonfinite, "DANCEWrapper")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self._teacher_check = TeacherCheck("DANCEWrapper")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if backbone_lr is not None and backbone_lr <= 0:
            raise ValueError(f"backbone_lr must be > 0, got {backbone_lr}")
        if budget_weight < 0 or bound_weight < 0:
            raise ValueError("budget_weight and bound_weight must be >= 0")
        if not 0.0 <= min_layer_keep < 1.0:
            raise ValueError(f"min_layer_keep must be in [0, 1), got {min_layer_keep}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        check_schedules(noise_anneal=noise_anneal, budget_warmup=budget_warmup,
                        calibrate_every=calibrate_every, budget_feedback=budget_feedback,
                        lr_schedule=lr_schedule, budget_range=budget_range)  # fmt: skip
        if not 0.0 <= difficulty_spread < 1.0:
            raise ValueError(f"difficulty_spread must be in [0, 1), got {difficulty_spread}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        if budget_range is not None:
            low, high = (float(b) for b in budget_range)
            if not 0.0 < low < high <= 1.0:
                raise ValueError(
                    f"budget_range must satisfy 0 < low < high <= 1, got {budget_range}"
                )
            budget_range = (low, high)
        pruner_args = {
            "budget": budget, "dims": dims, "policy": policy, "layers": layers, "grid": grid,
            "hidden": hidden, "min_keep": min_keep, "tau": tau, "init_keep": init_keep,
            "credit_outputs": credit_outputs, "channel_multiple": channel_multiple,
            "feature_site": feature_site, "layer_dims": layer_dims,
        }  # fmt: skip
        pruner = None
        # an unset num_classes is not a hyperparameter: a logger merging the data's
        # num_classes with the model's would refuse None against the data's value
        unset = ["num_classes"] if num_classes is None else []
        if isinstance(model, AdaptivePruner):
            self.save_hyperparameters(ignore=["model", *unset])
            pruner = _configured_pruner(model, pruner_args, budget_range)
            model = model.model
        elif isinstance(model, str):
            self.save_hyperparameters(ignore=unset)  # before `model` is rebound to the module
            model = model_from_name(model, model_kwargs, num_classes)
        else:
            if not isinstance(model, nn.Module):
                raise TypeError(
                    "model must be an nn.Module, a factory name or a checkpoint path, got "
                    f"{type(model)}"
                )
            check_num_classes(model, num_classes, "the model")
            self.save_hyperparameters(ignore=["model", *unset])
        if pruner is None:
            pruner = AdaptivePruner(
                model, budget_conditioned=budget_range is not None, **pruner_args
            )
        if not isinstance(policy, str) and _registered_as(pruner.policy):
            # checkpoints keep the name (they load without unpickling a class)
            self.hparams["policy"] = pruner.policy.name
        self.pruner = pruner
        self.budget_range = budget_range
        if freeze_backbone is None:
            freeze_backbone = pruner.policy.trains_controller
        self.freeze_backbone = bool(freeze_backbone)
        self._guard = guard
        self.execution = execution
        object.__setattr__(self, "_compact", None)  # not a submodule: stays out of checkpoints
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        if freeze_backbone:
            model.requires_grad_(False)
        self._teacher: nn.Module | None = None
        if not freeze_backbone and task != "labels":
            # the dense teacher must not drift with the student: a frozen copy, kept out of the
            # state dict (it equals the user's model at wrap time); task="labels" never needs it
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
            object.__setattr__(self, "_teacher", teacher)
        self.metrics = nn.ModuleDict(
            {f"{s}_{m}": MeanMetric() for s in ("train", "val", "test") for m in ("acc", "ratio")}
        )

    # ------------------------------------------------------------------ user-facing
    @property
    def model(self) -> nn.Module:
        """The user's network (shared with the pruner, never modified)."""
        return self.pruner.model

    def set_budget(self, budget: float) -> None:
        """Choose the target MAC ratio (a budget-conditioned controller adapts without training)."""
        self.pruner.set_budget(budget)
        if self.budget_range is not None:
            low, high = self.budget_range
            if not low <= budget <= high:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"budget {budget} is outside the range the controller was trained for "
                    f"{self.budget_range}: expect a larger budget error"
                )

    def unwrap(self) -> nn.Module:
        """Give back the user's model as it was wrapped (requires_grad flags restored)."""
        model = self.pruner.unwrap()
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        return model

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped for NaN / inf (``on_nonfinite="skip"``)."""
        return self._guard.skipped

    @property
    def last_stats(self) -> PruningStats | None:
        """Statistics of the last forward pass (see :class:`~lightning_dance.aap.PruningStats`)."""
        return self.pruner.last_stats

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if self.execution == "compact" and not self.training:
            return (self._compact or self.compile_sparse())(clip)
        return self.pruner(clip)

    def compile_sparse(
        self,
        example: torch.Tensor | None = None,
        *,
        tune: bool = False,
        batch_mode: str = "group",
        skip_outputs: bool = True,
    ) -> Any:
        """Switch inference to the fast path that skips the pruned work (same outputs as the
        masked model; see :class:`lightning_dance.execution.CompactPruner`). ``tune=True`` times
        the layers on ``example`` and keeps a layer dense where pruning it would be slower
        (for a ``topk`` pruner of channels at batch 1 it also times the untuned index plan and
        keeps whichever runs faster), then times the whole fast path against the dense model
        and warns when it is slower
        (:meth:`~lightning_dance.execution.CompactPruner.compare_dense`; small depthwise nets
        such as X3D-XS are, on CPUs); ``skip_outputs`` also skips the output channels the next
        conv drops (channel chains).
        Training steps always use the masked path; ``last_stats`` is not filled by the fast path.

        Example:
            >>> from lightning_dance.models import create_model
            >>> wrapper = DANCEWrapper(create_model("tiny_c3d", num_classes=4), budget=0.5)
            >>> clip = torch.randn(1, 3, 8, 32, 32)
            >>> masked = wrapper.eval()(clip)
            >>> fast = wrapper.compile_sparse()
            >>> torch.allclose(wrapper(clip), masked, atol=1e-4)   # now runs compactly
            True
        """
        from lightning_dance.execution import CompactPruner
        from lightning_dance.execution.indexed import index_plan_applies

        fast = CompactPruner(self.pruner, batch_mode=batch_mode, skip_outputs=skip_outputs)
        if tune:
            if example is None:
                raise ValueError("tune=True needs an example clip to time the layers on")
            plain = None
            if index_plan_applies(self.pruner, example):  # tunings would disable it
                plain = CompactPruner(self.pruner, batch_mode=batch_mode, skip_outputs=skip_outputs)
            fast.tune(example)
            timing = fast.compare_dense(example)
            if plain is not None:
                untuned = plain.compare_dense(example)
                if untuned["compact_ms"] < timing["compact_ms"]:
                    fast, timing = plain, untuned
            if timing["speedup"] < 1.0:
                warnings.warn(
                    f"the fast path is slower than the dense model on this machine: "
                    f"{timing['compact_ms']:.1f} ms vs {timing['dense_ms']:.1f} ms per call on "
                    f"the example ({timing['speedup']:.2f}x). Skipping the pruned work costs more "
                    "than it saves here (small convs, per-call costs): deploy the dense model on "
                    "this machine, or prune only the layers where it pays "
                    "(lightning_dance.execution.profitable_layers, docs/execution.md).",
                    stacklevel=2,
                )
        object.__setattr__(self, "_compact", fast)
        self.execution = "compact"
        return fast

    def train(self, mode: bool = True) -> DANCEWrapper:
        super().train(mode)
        if self.freeze_backbone:
            self.pruner.model.eval()  # frozen BatchNorm statistics: the backbone is not trained
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores each submodule's own train/eval flag around validation, bypassing
        # train(); a frozen backbone must never update its BatchNorm statistics
        if self.freeze_backbone:
            self.pruner.model.eval()
        self.pruner.noise = self._noise_scale()
        every = self.hparams.get("calibrate_every", 0)
        if every and batch_idx % every == 0:
            self._calibrate_on(_split_batch(batch)[0])

    @torch.no_grad()
    def _calibrate_on(self, clip: torch.Tensor) -> None:
        """Calibrate the keep decisions on ``clip`` to this step's training budget (a clip the
        step will skip or refuse, empty or not finite, is not calibrated on)."""
        if clip.numel() == 0 or not torch.isfinite(clip).all():
            return
        pruner, target = self.pruner, float(self.pruner.budget)
        modes = {m: m.training for m in self.modules()}
        pruner.set_budget(self.training_budget(target))
        try:
            self.eval()
            pruner.calibrate(clip, iters=10, tol=0.01)
        finally:
            pruner.set_budget(target)
            for m, mode in modes.items():
                m.training = mode

    def _progress(self) -> float | None:
        """Fraction of the training steps done, or None without a finite step count."""
        return training_progress(self._trainer)

    def _noise_scale(self) -> float:
        return noise_scale(self.hparams.noise_anneal, self._progress())

    def training_budget(self, budget: float) -> float:
        """The budget of the current training step for target ``budget`` (see ``budget_warmup``)."""
        warmup = self.hparams.get("budget_warmup", 0.0)
        return warmup_budget(budget, warmup, self._progress() if warmup > 0 else None)

    # ------------------------------------------------------------------ steps
    def _teacher_logits(self, clip: torch.Tensor) -> torch.Tensor:
        teacher = self._teacher if self._teacher is not None else self.pruner.model
        with torch.no_grad():
            return teacher(clip)

    def _skip(self, what: str, batch_idx: int | None) -> bool:
        return self._guard.skip(what, batch_idx, self._trainer)

    def _step(self, batch: Any, stage: str, batch_idx: int | None = None) -> torch.Tensor | None:
        clip, label = _split_batch(batch)
        train = stage == "train"
        if train and isinstance(clip, torch.Tensor) and not is_finite(clip):
            if self._skip("input clip", batch_idx):
                return None
        if self.budget_range is not None and stage == "train":
            low, high = self.budget_range
            gen = self.pruner.noise_generator("cpu")  # checkpointed, unlike the global RNG
            self.pruner.set_budget(low + (high - low) * float(torch.rand((), generator=gen)))
        target = float(self.pruner.budget)
        budget = self.training_budget(target) if stage == "train" else target
        self.pruner.set_budget(budget)
        try:
            logits = self.pruner(clip)  # the masked path: it records last_stats
        finally:
            self.pruner.set_budget(target)  # outside a step the pruner holds the target
        stats = self.pruner.last_stats
        gain = self.hparams.get("budget_feedback", 0.0)
        if train and gain:  # the dual variable of the budget: keep fewer if over it
            error = float(stats.mac_ratio().mean()) - budget
            with torch.no_grad():
                self.pruner.calibration.sub_(gain * error)
        losses: dict[str, torch.Tensor] = {}
        use_ce, use_distill = task_losses(self.hparams.task, label is not None)
        teacher = None
        if use_ce:
            losses["ce"] = nn.functional.cross_entropy(logits, label)
        if use_distill:
            teacher = self._teacher_logits(clip)
            losses["distill"] = distillation_loss(logits, teacher, self.hparams.distill_temperature)
            if train and label is not None:
                acc = self._teacher_check.update(teacher, label)
                self.log("dance/train_teacher_acc", acc, on_epoch=True, batch_size=len(label))
        spread, targets = self.hparams.get("difficulty_spread", 0.0), None
        if train and spread:
            hard = clip_difficulty(logits, label if use_ce else None, teacher,
                                   self.hparams.distill_temperature)  # fmt: skip
            targets = difficulty_targets(budget, hard, spread)
        parts = budget_loss(stats, budget, min_layer_keep=self.hparams.min_layer_keep,
                            targets=targets)  # fmt: skip
        losses["budget"] = self.hparams.budget_weight * parts["budget"]
        losses["bounds"] = self.hparams.bound_weight * parts["bounds"]
        loss = sum(losses.values())
        if train and not is_finite(loss.detach()):
            names = {"ce": "task loss", "distill": "task loss", "budget": "budget loss"}
            bad = [k for k, v in losses.items() if not is_finite(v.detach())]
            parts_ = ", ".join(f"{names.get(k, 'budget loss')} ({k})" for k in bad)
            if self._skip(parts_ or "total loss", batch_idx):
                return None
        n = clip.shape[0]
        on_step = stage == "train"
        for key, value in losses.items():
            self.log(
                f"dance/{stage}_loss_{key}", value, on_step=on_step, on_epoch=True, batch_size=n
            )
        ratio = stats.mac_ratio().float()
        self.metrics[f"{stage}_ratio"](ratio)
        self.log(
            f"dance/{stage}_mac_ratio",
            self.metrics[f"{stage}_ratio"],
            prog_bar=True,
            on_step=False,
            on_epoch=True,
        )
        self.log(
            f"dance/{stage}_expected_ratio",
            parts["ratio"].detach(),
            on_step=on_step,
            on_epoch=True,
            batch_size=n,
        )
        self.log("dance/budget", budget, on_step=on_step, on_epoch=True, batch_size=n)
        for dim, frac in _mean_kept(stats).items():
            self.log(f"dance/{stage}_kept_{dim}", frac, on_step=False, on_epoch=True, batch_size=n)
        if label is not None:
            self.metrics[f"{stage}_acc"]((logits.argmax(-1) == label).float())
            self.log(
                f"{stage}/acc",
                self.metrics[f"{stage}_acc"],
                prog_bar=True,
                on_step=False,
                on_epoch=True,
            )
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            batch_size=n,
            prog_bar=stage == "train",
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train", batch_idx)
        if self._guard.mode == "skip":
            self.log("dance/skipped_batches", float(self.skipped_batches), on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self._guard.check_gradients(self, self._trainer)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        clip, _ = _split_batch(batch)
        return self(clip).argmax(-1)

    def on_fit_start(self) -> None:
        hint = " (to keep the backbone frozen, pass freeze_backbone=True)"
        train_at_fit_start(self, "DANCEWrapper", hint)  # Lightning keeps submodules' eval flags
        if self._teacher is not None:
            self._teacher.to(self.device)
        self._teacher_check.reset()

    def on_train_epoch_end(self) -> None:
        self._teacher_check.warn_if_weak()

    def configure_optimizers(self) -> Any:
        backbone = {id(p) for p in self.model.parameters()}
        groups = [
            {"params": [p for p in self.parameters() if p.requires_grad and id(p) not in backbone]},
        ]
        tuned = [p for p in self.model.parameters() if p.requires_grad]
        if tuned:  # joint fine-tuning
            lr = self.hparams.get("backbone_lr") or self.hparams.lr / 10
            groups.append({"params": tuned, "lr": lr})
        if not groups[0]["params"] and not tuned:
            raise DanceError(
                f"nothing to train: the {self.pruner.policy.name!r} policy has no controller and "
                "the backbone is frozen. Pass freeze_backbone=False (fine-tune under the policy's "
                "training gates), or skip fit and only calibrate (wrapper.pruner.calibrate)"
            )
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return opt
        total = self.trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            raise ValueError(
                "lr_schedule='cosine' needs a finite number of training steps: set max_epochs "
                "or max_steps on the Trainer"
            )
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dance"] = {
            "architecture": self.pruner.architecture(),
            "budget": float(self.pruner.budget),
            "budget_range": self.budget_range,
            "skipped_batches": self.skipped_batches,
            "noise_rng": self.pruner.noise_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("dance")
        if saved is None:
            raise ArchitectureMismatchError(
                "this checkpoint has no DANCE section: it was not written by a DANCEWrapper "
                "(to load the user's own model checkpoint, load it into the model before wrapping)"
            )
        check_architecture(saved["architecture"], self.pruner.architecture())
        self._guard.skipped = int(saved.get("skipped_batches", 0))
        if "noise_rng" in saved:  # a resumed fit continues the gates' noise stream
            self.pruner.set_noise_rng_state(saved["noise_rng"])

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own = self.state_dict()
        mismatched = [
            k
            for k, v in state_dict.items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        ]
        if mismatched:
            raise ArchitectureMismatchError(
                "the checkpoint was trained for a different architecture; mismatched tensors: "
                f"{mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _configured_pruner(
    pruner: AdaptivePruner, args: dict[str, Any], budget_range: tuple[float, float] | None
) -> AdaptivePruner:
    """``pruner``, after checking that the wrapper's pruner arguments were left at their
    defaults (the pruner has its own) and that ``budget_range`` matches its controller."""
    defaults = inspect.signature(DANCEWrapper.__init__).parameters
    given = [k for k, v in args.items() if not _same(v, defaults[k].default)]
    if given:
        raise ValueError(
            f"DANCEWrapper got an AdaptivePruner and also {given}: configure these on the "
            "pruner (AdaptivePruner(model, ...)), or pass the model instead of a pruner"
        )
    if (budget_range is not None) != pruner.budget_conditioned:
        raise ValueError(
            "budget_range trains a budget-conditioned controller: build the pruner with "
            f"budget_conditioned={budget_range is not None} to match budget_range={budget_range}"
        )
    return pruner


def _registered_as(policy: Policy) -> bool:
    """Whether ``policy`` is what its registered name gives (the name alone restores it)."""
    return policy.name in available_policies() and get_policy(policy.name) == policy


def _same(value: Any, default: Any) -> bool:
    return (
        value is default
        or (type(value) is type(default) and value == default)
        or (isinstance(value, (tuple, list)) and tuple(value) == default)
    )


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict) and "video" in batch:
        return batch["video"], batch.get("label")
    raise TypeError(
        "a DANCE batch is a clip tensor, a (clip, label) pair or a dict with 'video' (and "
        f"'label'); got {type(batch).__name__}"
    )


def _mean_kept(stats: PruningStats) -> dict[str, float]:
    per_dim: dict[str, list[float]] = {}
    for layer in stats.layers.values():
        for dim, frac in layer.kept.items():
            per_dim.setdefault(dim, []).append(float(frac.float().mean()))
    return {d: sum(v) / len(v) for d, v in per_dim.items()}
