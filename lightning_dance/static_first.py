"""``StaticFirst``: train a channel controller as a static pruner first, then per clip.

Why: a per-clip gate trained from the start has to work for every channel subset it may pick,
and its backbone fine-tunes under subsets that change from clip to clip; a statically pruned
model fine-tunes on one structure. On the benchmark (R(2+1)D, 0.35 of the MACs, three seeds,
``docs/benchmarks.md``) this schedule raised ``topk`` from 83.6 +- 4.0% to 85.6 +- 3.0% top-1,
on every seed, level with Torch-Pruning plus fine-tuning (85.9 +- 3.0%); 87.3 +- 1.6% on
cross-entropy only. The controller it trains stays almost static (the same channels for
82-92% of the clips): its static projection (:func:`~lightning_dance.priors.freeze_channels`)
is as accurate and runs as a statically pruned model does. For the ``threshold`` policy it did
not help: on a channel-only selection of R(2+1)D's layers (three seeds, 0.35, cross-entropy)
it lost 6.7 pp against the same pruner trained per clip from the start.

What it does, in the wrapper's training:

1. at the start of a fit (not again when it resumes), the controller's channel biases get the
   magnitude prior (:func:`~lightning_dance.priors.apply_channel_prior`) and the channel head's
   input weights are zeroed: every clip keeps the channels a magnitude ranking keeps;
2. until ``until`` of the training steps, the trunk and the head's input weights are frozen, so
   the decisions stay input-independent while the backbone (and the biases) train;
3. then they train too, starting from zero: the per-clip part grows from the static solution.

The wrapper must train without exploration noise (``DANCEWrapper(..., noise_anneal=0)``: noise
would reshuffle the static decisions) and prune channels only (``dims=("channel",)``, or
``layer_dims`` that give every layer channels or nothing), with a policy that keeps the
highest-scoring channels: ``topk`` (a fixed count per layer) or DANCE's ``threshold`` (the
static phase keeps the same channels for every clip; after it, the count varies per clip too).

Example:
    >>> import lightning as L, torch
    >>> from lightning_dance import DANCEWrapper, SyntheticVideoDataModule, create_model
    >>> dm = SyntheticVideoDataModule(num_classes=4, frames=4, size=16, train_size=8,
    ...                               val_size=4, test_size=4, batch_size=4)
    >>> wrapper = DANCEWrapper(create_model("tiny_c3d", num_classes=4), budget=0.5,
    ...                        policy="topk", dims=("channel",), noise_anneal=0.0,
    ...                        freeze_backbone=False)
    >>> trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False,
    ...                     limit_val_batches=0, callbacks=[StaticFirst(until=0.5)])
    >>> trainer.fit(wrapper, dm)
    >>> float(wrapper.pruner.controller.channel_head.weight.abs().sum()) > 0  # per clip now
    True
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback

from lightning_dance.priors import apply_channel_prior
from lightning_dance.schedules import training_progress

__all__ = ["StaticFirst"]


class StaticFirst(Callback):
    """Static channel decisions (a magnitude prior) for the first ``until`` of the training
    steps, per-clip decisions after (see the module's docs).

    Args:
        until: the fraction of the training steps with static decisions, in ``(0, 1)``.
        prior_scale: the prior's strength in logits (``scale`` of
            :func:`~lightning_dance.priors.apply_channel_prior`), ``>= 0``.
        log: log ``dance/static_phase`` (1 while static) every step.
    """

    def __init__(self, until: float = 0.5, prior_scale: float = 2.0, log: bool = True) -> None:
        if not 0.0 < until < 1.0:
            raise ValueError(f"until must be in (0, 1), got {until}")
        if not prior_scale >= 0:
            raise ValueError(f"prior_scale must be >= 0, got {prior_scale}")
        self.until, self.prior_scale, self.log_phase = float(until), float(prior_scale), log
        self.prepared = False  # the prior is applied once per training run, not on resume
        self.frozen = False

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check(wrapper: L.LightningModule) -> None:
        pruner = getattr(wrapper, "pruner", None)
        head = getattr(getattr(pruner, "controller", None), "channel_head", None)
        if head is None:
            raise TypeError(
                f"StaticFirst trains a DANCEWrapper's channel controller, got "
                f"{type(wrapper).__name__} without one (build DANCEWrapper(..., policy='topk', "
                "dims=('channel',)))"
            )
        pruned = pruner.pruned_dims()
        if pruned != ("channel",) or not pruner.policy.keeps_top_scores:
            raise ValueError(
                "StaticFirst makes channel decisions static; it needs a policy that keeps the "
                "highest-scoring channels (policy='topk' or 'threshold') pruning channels only "
                "(dims=('channel',), or layer_dims giving every layer ('channel',) or ()), got "
                f"policy={pruner.policy.name!r} pruning {list(pruned)}"
            )
        if wrapper.hparams.get("noise_anneal", 0.0) > 0:
            raise ValueError(
                "StaticFirst needs training without exploration noise, which would reshuffle the "
                "static decisions: build DANCEWrapper(..., noise_anneal=0)"
            )
        if wrapper.hparams.get("freeze_backbone"):
            raise ValueError(
                "StaticFirst fine-tunes the backbone on the static structure first: build "
                "DANCEWrapper(..., freeze_backbone=False)"
            )

    @staticmethod
    def _input_part(wrapper: L.LightningModule) -> list[nn.Parameter]:
        ctrl = wrapper.pruner.controller
        return [*ctrl.trunk.parameters(), ctrl.channel_head.weight]

    def _progress(self, trainer: L.Trainer) -> float:
        progress = training_progress(trainer)
        if progress is None:
            raise ValueError(
                "StaticFirst needs a finite number of training steps: give the Trainer "
                "max_epochs or max_steps"
            )
        return progress

    def _set_frozen(self, wrapper: L.LightningModule, frozen: bool) -> None:
        for p in self._input_part(wrapper):
            p.requires_grad_(not frozen)
        self.frozen = frozen

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.prepared:
            apply_channel_prior(pl_module, scale=self.prior_scale)
            with torch.no_grad():
                pl_module.pruner.controller.channel_head.weight.zero_()
            self.prepared = True
        self._set_frozen(pl_module, self._progress(trainer) < self.until)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.frozen and self._progress(trainer) >= self.until:
            self._set_frozen(pl_module, False)
        if self.log_phase:
            pl_module.log("dance/static_phase", float(self.frozen), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.frozen:  # a run shorter than ``until``: leave the controller trainable
            self._set_frozen(pl_module, False)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self.frozen:  # an interrupted fit leaves the controller as it found it: trainable
            self._set_frozen(pl_module, False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"prepared": self.prepared, "until": self.until, "prior_scale": self.prior_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.prepared = bool(state_dict.get("prepared", False))
