"""Deployment export for Jetson and Snapdragon: see ``docs/export.md``.

- :func:`export_model` / :class:`ExportCallback`: parity-checked artifacts + ``manifest.json``;
- :func:`export_checkpoint`: the same from a Lightning checkpoint (``lightning-dance export``);
- :mod:`.conv2d_rewrite`: the Conv3d -> Conv2d-only rewrite (usable alone);
- :mod:`.onnx`, :mod:`.snapdragon`: per-format helpers.
"""

from lightning_dance.export.api import DEFAULT_FORMATS, TARGETS, ExportResult, export_model
from lightning_dance.export.callback import ExportCallback
from lightning_dance.export.conv2d_rewrite import (
    Conv3dAs2d,
    RewriteInfo,
    UnsupportedOpError,
    conv3d_as_conv2d,
    fold_time,
    replace_conv3d,
    rewrite_conv3d_to_conv2d,
    unfold_time,
)
from lightning_dance.export.from_checkpoint import export_checkpoint
from lightning_dance.export.modes import MODES, ExportPlan, build_export_module

__all__ = [
    "DEFAULT_FORMATS",
    "MODES",
    "TARGETS",
    "Conv3dAs2d",
    "ExportCallback",
    "ExportPlan",
    "ExportResult",
    "RewriteInfo",
    "UnsupportedOpError",
    "build_export_module",
    "conv3d_as_conv2d",
    "export_checkpoint",
    "export_model",
    "fold_time",
    "replace_conv3d",
    "rewrite_conv3d_to_conv2d",
    "unfold_time",
]
