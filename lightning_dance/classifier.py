"""A plain video-classification LightningModule: the kind of module DANCE users already have.

Nothing in it knows about DANCE; the AVA callback and the DANCE wrapper work on it (and on any
other LightningModule) unmodified.

Example:
    >>> import lightning as L
    >>> from lightning_dance import SyntheticVideoDataModule, VideoClassifier
    >>> model = VideoClassifier("tiny_c3d", num_classes=10, lr=3e-3)
    >>> dm = SyntheticVideoDataModule(num_classes=10, frames=4, size=16, train_size=8,
    ...                               val_size=4, test_size=4, batch_size=4)
    >>> L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
    ...           enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_dance.losses import distillation_loss
from lightning_dance.teacher import TeacherCheck
from lightning_dance.train_mode import train_at_fit_start

__all__ = ["VideoClassifier"]


class VideoClassifier(L.LightningModule):
    """Cross-entropy video classifier with top-1/top-5 accuracy and AdamW + cosine schedule.

    Args:
        model: a factory name for :func:`lightning_dance.models.create_model` (e.g. ``"tiny_c3d"``,
            ``"r2plus1d_18"``, ``"x3d_xs"``, ``"timm:resnet18"``) or an ``nn.Module`` mapping a clip
            ``[N, 3, T, H, W]`` to logits ``[N, num_classes]``.
        num_classes: number of classes.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        model_kwargs: extra keyword arguments for ``create_model`` (e.g. ``{"width": 0.5}``).
        teacher: a trained model to distil from while training (e.g. the dense model a pruned
            one was cut from): the training loss adds
            :func:`~lightning_dance.losses.distillation_loss` of the teacher's logits to the
            cross-entropy, as ``DANCEWrapper(task="both")`` does for DANCE. A frozen copy is
            kept (the teacher you pass is not changed), outside the state dict and the
            checkpoints; validation and test losses stay plain cross-entropy. The teacher's
            top-1 on the training batches is logged (``train/teacher_acc``) and a warning names
            the fix when it is below 95%: a weak teacher's mistakes are copied too
            (:mod:`lightning_dance.teacher`).
        distill_temperature: softmax temperature of the distillation loss.

    Batches are ``(clip, label)`` pairs. Logs ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc``, ``val/acc_top5`` (and the ``test/`` equivalents; with a teacher also
    ``train/loss_distill`` and ``train/teacher_acc``).

    Example (distilling a slimmed model from a dense one):
        >>> dense = VideoClassifier("tiny_c3d", num_classes=4).model
        >>> student = VideoClassifier("tiny_c3d", num_classes=4, teacher=dense,
        ...                           model_kwargs={"width": 0.5})
        >>> "teacher" in student.hparams, any("teacher" in k for k in student.state_dict())
        (False, False)
    """

    def __init__(
        self,
        model: str | nn.Module = "tiny_c3d",
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        teacher: nn.Module | None = None,
        distill_temperature: float = 2.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module (a trained model), got {teacher!r}")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        ignore = ["teacher"] + (["model"] if isinstance(model, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        # not a submodule: a frozen copy that stays out of the state dict and the optimizer
        frozen = None if teacher is None else copy.deepcopy(teacher).requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", frozen)
        self._teacher_check = TeacherCheck("VideoClassifier")
        if isinstance(model, str):
            from lightning_dance.models import create_model

            model = create_model(model, num_classes, **(model_kwargs or {}))
        elif model_kwargs:
            raise ValueError("model_kwargs only apply when `model` is a factory name")
        self.model = model
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train", "val", "test")
            }
            | {
                f"{stage}_acc_top5": MulticlassAccuracy(num_classes, top_k=top5, average="micro")
                for stage in ("val", "test")
            }
        )

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.model(clip)

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        clip, label = batch
        logits = self(clip)
        loss = F.cross_entropy(logits, label, label_smoothing=self.hparams.label_smoothing)
        on_step = stage == "train"
        if on_step and self._teacher is not None:
            self._teacher.to(clip.device)
            with torch.no_grad():
                target = self._teacher(clip)
            distill = distillation_loss(logits, target, self.hparams.distill_temperature)
            self.log("train/loss_distill", distill, on_step=True, on_epoch=True)
            acc = self._teacher_check.update(target, label)
            self.log("train/teacher_acc", acc, on_epoch=True, batch_size=len(label))
            loss = loss + distill
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True)
        for name, metric in self.metrics.items():
            if name.startswith(f"{stage}_"):
                metric(logits, label)
                key = f"{stage}/{name.removeprefix(stage + '_')}"
                self.log(key, metric, prog_bar=name == f"{stage}_acc", on_step=False, on_epoch=True)
        return loss

    def on_fit_start(self) -> None:
        # Lightning keeps a submodule's own eval flag through fit (train_mode)
        train_at_fit_start(self, "VideoClassifier", " (to keep modules in eval mode on purpose, "
                           "override on_fit_start)")  # fmt: skip
        self._teacher_check.reset()

    def on_train_epoch_end(self) -> None:
        self._teacher_check.warn_if_weak()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        clip = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(clip).argmax(-1)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
