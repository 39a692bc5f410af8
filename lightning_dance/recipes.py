"""Recipes: the few Trainer runs that the demo, the benchmarks and the notebooks share.

Each is a short function around ``lightning.Trainer`` so that every script trains and measures
the same way (CPU, no checkpoint clutter, optional progress bar and CSV logs).

Example:
    >>> from lightning_dance import SyntheticVideoDataModule, VideoClassifier
    >>> from lightning_dance.recipes import fit, train_controller, evaluate_dance
    >>> dm = SyntheticVideoDataModule(frames=4, size=16, train_size=8, val_size=8,
    ...                               test_size=8, batch_size=4)    # tiny, to run as a test
    >>> dense = VideoClassifier("tiny_c3d", dm.num_classes)
    >>> trainer = fit(dense, dm, epochs=1)
    >>> wrapper = train_controller(dense, dm, budget=0.5, epochs=1)
    >>> 0.0 < evaluate_dance(wrapper, dm)["mac_ratio"] <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.loggers import CSVLogger

from lightning_dance.report import MacReport
from lightning_dance.wrapper import DANCEWrapper

__all__ = ["fit", "accuracy", "train_controller", "calibrate", "evaluate_dance", "track"]


def fit(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    epochs: int | None = None,
    max_steps: int = -1,
    callbacks: Sequence[L.Callback] = (),
    out: str | Path | None = None,
    name: str = "run",
    progress: bool = False,
    validate: bool = True,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """Fit ``module`` on CPU; CSV logs under ``out/name`` when ``out`` is given."""
    trainer = L.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=CSVLogger(str(out), name=name) if out is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=progress,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=str(out) if out is not None else None,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``model(clip)`` over ``(clip, label)`` batches (eval mode, restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for clip, label in loader:
            correct += int((model(clip).argmax(-1) == label).sum())
            total += int(label.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy over an empty loader")
    return correct / total


def train_controller(
    model: nn.Module,
    datamodule: L.LightningDataModule,
    *,
    epochs: int | None = 2,
    max_steps: int = -1,
    calibrate_batches: int = 4,
    out: str | Path | None = None,
    name: str = "dance",
    progress: bool = False,
    prepare: Callable[[DANCEWrapper], None] | None = None,
    callbacks: Sequence[L.Callback] = (),
    **wrapper_kwargs: Any,
) -> DANCEWrapper:
    """Wrap ``model`` in a :class:`DANCEWrapper`, train its controller, calibrate on val batches.

    ``calibrate_batches=0`` skips the calibration (a budget-conditioned controller is calibrated
    per budget by the caller, see :meth:`AdaptivePruner.calibrate`). ``prepare(wrapper)`` runs
    before training (e.g. :func:`lightning_dance.priors.apply_channel_prior`); ``callbacks``
    go to the Trainer.
    """
    wrapper = DANCEWrapper(model, **wrapper_kwargs)
    if prepare is not None:
        prepare(wrapper)
    fit(wrapper, datamodule, epochs=epochs, max_steps=max_steps, callbacks=callbacks, out=out,
        name=name, progress=progress, validate=False)  # fmt: skip
    if calibrate_batches:
        calibrate(wrapper, datamodule, calibrate_batches)
    return wrapper


def calibrate(
    wrapper: DANCEWrapper, datamodule: L.LightningDataModule, batches: int = 4, **kwargs: Any
) -> float:
    """Calibrate the wrapper's keep decisions to its budget on the first val batches (``kwargs``:
    ``iters``, ``tol`` of :meth:`~lightning_dance.aap.AdaptivePruner.calibrate`)."""
    clips = []
    for i, (clip, _) in enumerate(datamodule.val_dataloader()):
        if i >= batches:
            break
        clips.append(clip)
    return wrapper.pruner.calibrate(clips, **kwargs)


@torch.no_grad()
def evaluate_dance(
    wrapper: DANCEWrapper,
    datamodule: L.LightningDataModule,
    split: str = "test",
    *,
    report: MacReport | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """Accuracy and executed/dense MAC ratio (mean, p5, p95 over clips) on ``split``; every
    batch's statistics also go to ``report`` when given (see :class:`MacReport`); ``progress``:
    a progress bar with this description."""
    loader = getattr(datamodule, f"{split}_dataloader")()
    wrapper.eval()
    correct = total = 0
    ratios = []
    for clip, label in track(loader, progress) if progress else loader:
        logits = wrapper(clip)
        correct += int((logits.argmax(-1) == label).sum())
        total += int(label.numel())
        ratios.append(wrapper.last_stats.mac_ratio())
        if report is not None:
            report.update_stats(wrapper.last_stats)
    r = torch.cat(ratios).double()
    return {
        "acc": correct / max(1, total),
        "mac_ratio": float(r.mean()),
        "mac_ratio_p5": float(torch.quantile(r, 0.05)),
        "mac_ratio_p95": float(torch.quantile(r, 0.95)),
    }


def track(items: Iterable[Any], description: str) -> Iterable[Any]:
    """``items`` with a progress bar on the console (rich)."""
    from rich.progress import track as rich_track

    total = len(items) if hasattr(items, "__len__") else None
    return rich_track(items, description=description, total=total)
