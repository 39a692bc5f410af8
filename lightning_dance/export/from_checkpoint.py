"""``export_checkpoint``: :func:`~lightning_dance.export.api.export_model` from a checkpoint file.

What ``lightning-dance export --ckpt PATH`` runs. The checkpoint may be a dense model's (a
:class:`~lightning_dance.classifier.VideoClassifier`, or any imported LightningModule that
LightningCLI recorded) or a :class:`~lightning_dance.wrapper.DANCEWrapper`'s; it is rebuilt with
:func:`~lightning_dance.checkpoints.load_module`. The input shape comes from ``clip_shape``, or
from the data's ``frames`` and ``size`` that LightningCLI saved into the checkpoint.

Example:
    >>> import os, tempfile
    >>> import lightning as L
    >>> from lightning_dance import VideoClassifier
    >>> trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> trainer.strategy.connect(VideoClassifier("tiny_c3d", num_classes=4))
    >>> folder = tempfile.mkdtemp()
    >>> trainer.save_checkpoint(os.path.join(folder, "dense.ckpt"))
    >>> result = export_checkpoint(os.path.join(folder, "dense.ckpt"), formats=["onnx"],
    ...                            clip_shape=(3, 4, 16, 16), out_dir=os.path.join(folder, "x"))
    >>> result.manifest["mode"], sorted(result.files())
    ('dense', ['jetson/onnx'])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_dance.export.api import ExportResult, export_model
from lightning_dance.export.formats import FORMATS
from lightning_dance.export.modes import MODES

__all__ = ["AUTO_MODE", "export_checkpoint", "checkpoint_clip_shape"]

#: ``mode`` value that picks the mode from the checkpoint: ``"dense"`` for a dense model,
#: ``"topk"`` for a DANCE controller with the ``topk`` policy, ``"masked"`` for any other
AUTO_MODE = "auto"


def checkpoint_clip_shape(ckpt: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """``(3, frames, H, W)`` from the data hyperparameters saved in ``ckpt``, if any: ``frames``
    and ``size`` (:class:`~lightning_dance.data.SyntheticVideoDataModule`) or ``crop_size``
    (:class:`~lightning_dance.data.VideoFolderDataModule`), an int or ``(H, W)``.

    Example:
        >>> checkpoint_clip_shape({"datamodule_hyper_parameters": {"frames": 8, "crop_size": 112}})
        (3, 8, 112, 112)
    """
    data = ckpt.get("datamodule_hyper_parameters") or {}
    frames = data.get("frames")
    size = data.get("size", data.get("crop_size"))
    if isinstance(frames, int) and isinstance(size, int):
        return (3, frames, size, size)
    if isinstance(frames, int) and isinstance(size, (list, tuple)) and len(size) == 2:
        return (3, frames, int(size[0]), int(size[1]))
    return None


def _targets_of(formats: Sequence[str]) -> tuple[str, ...]:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(
            f"unknown export format {unknown[0]!r}: the registered formats are "
            f"{sorted(FORMATS)} (lightning_dance.export.formats.register_format adds one)"
        )
    return tuple(dict.fromkeys(FORMATS[f].target for f in formats))


def export_checkpoint(
    ckpt: str | os.PathLike,
    *,
    formats: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    mode: str = AUTO_MODE,
    clip_shape: Sequence[int] | None = None,
    out_dir: str | os.PathLike = "export",
    overwrite: bool = False,
    opset: int = 18,
) -> ExportResult:
    """Export the model of the Lightning checkpoint ``ckpt`` (see the module docstring).

    Args:
        ckpt: a ``.ckpt`` file of a dense LightningModule or of a ``DANCEWrapper``.
        formats: formats to build (registry names: ``onnx``, ``torchscript``, ``qnn``,
            ``nnapi``, ``executorch``); their targets follow. Formats named here must succeed.
        targets: ``jetson`` and/or ``snapdragon`` (all their formats; a format whose optional
            package is missing is skipped and listed in the manifest). Default: the formats'
            targets, or every target.
        mode: one of :data:`~lightning_dance.export.modes.MODES`, or ``"auto"``
            (:data:`AUTO_MODE`).
        clip_shape: ``(C, T, H, W)`` of the exported input (batch 1). Default: from the
            checkpoint's data hyperparameters.
        out_dir, overwrite, opset: as for :func:`~lightning_dance.export.api.export_model`.

    Raises:
        FileNotFoundError, CheckpointError: the checkpoint cannot be loaded (the message says
            why and what to do).
        ValueError: unknown format, target or mode; no input shape known.
    """
    from lightning_dance.checkpoints import load_module, read_checkpoint

    if mode != AUTO_MODE and mode not in MODES:
        raise ValueError(f"mode must be {AUTO_MODE!r} or one of {MODES}, got {mode!r}")
    formats = [formats] if isinstance(formats, str) else list(formats or [])
    if targets is None and formats:
        targets = _targets_of(formats)
    elif formats:
        _targets_of(formats)
    info = read_checkpoint(ckpt)
    if clip_shape is None:
        clip_shape = checkpoint_clip_shape(info)
        if clip_shape is None:
            raise ValueError(
                f"the input shape of {ckpt} is unknown (its data hyperparameters were not "
                "saved): pass clip_shape=(C, T, H, W), on the command line --clip_shape "
                "'[3, 8, 112, 112]'"
            )
    clip_shape = tuple(int(s) for s in clip_shape)
    if len(clip_shape) != 4 or min(clip_shape) < 1:
        raise ValueError(f"clip_shape must be (C, T, H, W) of positive sizes, got {clip_shape}")
    module = load_module(ckpt)
    if mode == AUTO_MODE:
        mode = "dense"
        if "dance" in info:
            mode = "topk" if module.pruner.policy.name == "topk" else "masked"
    generator = torch.Generator().manual_seed(0)
    clip = torch.randn(1, *clip_shape, generator=generator)
    kwargs: dict[str, Any] = {"formats": formats or None, "opset": opset}
    if targets is not None:
        kwargs["targets"] = tuple(targets)
    return export_model(
        module, clip, mode=mode, out_dir=Path(out_dir), overwrite=overwrite, **kwargs
    )
