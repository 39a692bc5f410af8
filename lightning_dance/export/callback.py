"""``ExportCallback``: export parity-checked deployment artifacts when training ends.

Example:
    >>> import lightning as L, tempfile
    >>> from lightning_dance import SyntheticVideoDataModule, VideoClassifier
    >>> model = VideoClassifier("tiny_c3d", num_classes=4)
    >>> dm = SyntheticVideoDataModule(num_classes=4, frames=4, size=16, train_size=4,
    ...                               val_size=4, batch_size=4)          # tiny, to run as a test
    >>> cb = ExportCallback(targets=("jetson",), formats=("onnx",), mode="dense",
    ...                     out_dir=tempfile.mkdtemp() + "/export", clip_shape=(3, 4, 16, 16))
    >>> trainer = L.Trainer(callbacks=[cb], max_epochs=1, logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(model, dm)                                  # exports at on_fit_end
    >>> sorted(cb.result.files())
    ['jetson/onnx']
    >>> result = cb.export(model)                               # or on demand
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_dance.export.api import TARGETS, ExportResult, export_model, validate_export_args

__all__ = ["ExportCallback"]


class ExportCallback(L.Callback):
    """Run :func:`~lightning_dance.export.api.export_model` at ``on_fit_end`` (rank 0 only).

    Args:
        targets: any of ``("jetson", "snapdragon")``.
        mode: ``"dense"``, ``"masked"``, ``"topk"`` (see :func:`export_model`).
        out_dir: export folder; relative paths are under the trainer's ``default_root_dir``.
        clip_shape: ``(C, T, H, W)`` of the static input (batch 1); the parity clip is a seeded
            random clip of that shape. Alternatively ``example_clip``.
        example_clip: an explicit ``[N, C, T, H, W]`` clip (overrides ``clip_shape``).
        formats, opset, soc_model, htp_arch, tolerances: passed to :func:`export_model`.
        on_fit_end: export automatically when ``fit`` ends (else only :meth:`export`).
        overwrite: replace an existing export folder.

    The last result is in :attr:`result` (``None`` before the first export, and on ranks > 0).
    """

    def __init__(
        self,
        *,
        targets: Sequence[str] = TARGETS,
        mode: str = "dense",
        out_dir: str | os.PathLike = "export",
        clip_shape: Sequence[int] | None = None,
        example_clip: torch.Tensor | None = None,
        formats: Sequence[str] | None = None,
        opset: int = 18,
        soc_model: str | None = None,
        htp_arch: str | None = None,
        tolerances: dict[str, float] | None = None,
        on_fit_end: bool = True,
        overwrite: bool = True,
    ) -> None:
        super().__init__()
        targets, _, _ = validate_export_args(targets, mode, opset, formats)
        if example_clip is None:
            if clip_shape is None:
                raise ValueError("pass clip_shape=(C, T, H, W) or example_clip=[N, C, T, H, W]")
            shape = tuple(int(s) for s in clip_shape)
            if len(shape) != 4 or min(shape) < 1:
                raise ValueError(
                    f"clip_shape must be 4 positive ints (C, T, H, W), got {clip_shape}"
                )
            example_clip = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
        elif not isinstance(example_clip, torch.Tensor) or example_clip.dim() != 5:
            raise ValueError("example_clip must be a tensor [N, C, T, H, W]")
        if isinstance(formats, str):
            formats = (formats,)
        self.targets, self.mode, self.out_dir = targets, mode, Path(out_dir)
        self.example_clip, self.formats, self.opset = example_clip, formats, opset
        self.soc_model, self.htp_arch, self.tolerances = soc_model, htp_arch, tolerances
        self.auto, self.overwrite = on_fit_end, overwrite
        self.result: ExportResult | None = None
        self._root: Path | None = None

    def _resolve(self) -> Path:
        if self.out_dir.is_absolute() or self._root is None:
            return self.out_dir
        return self._root / self.out_dir

    def export(self, model: torch.nn.Module) -> ExportResult:
        """Export ``model`` now (any rank that calls it; the trainer hook calls it on rank 0)."""
        self.result = export_model(
            model,
            self.example_clip,
            targets=self.targets,
            mode=self.mode,
            out_dir=self._resolve(),
            formats=self.formats,
            opset=self.opset,
            soc_model=self.soc_model,
            htp_arch=self.htp_arch,
            tolerances=self.tolerances,
            overwrite=self.overwrite,
        )
        done = [
            f"{a['target']}/{a['format']}"
            for a in self.result.manifest["artifacts"]
            if a["status"] == "ok"
        ]
        rank_zero_info(f"ExportCallback: wrote {done} to {self.result.out_dir}")
        return self.result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._root = Path(trainer.default_root_dir)
        if self.auto and trainer.is_global_zero:
            self.export(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_export": str(self.result.out_dir) if self.result else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = state_dict.get("last_export")
