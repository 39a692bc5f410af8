"""lightning-dance: DANCE (AVA + AAP) dynamic pruning of 3D CNNs for PyTorch Lightning.

Example:
    >>> import lightning as L
    >>> from lightning_dance import (AVACallback, DANCEWrapper, SyntheticVideoDataModule,
    ...                              VideoClassifier)
    >>> dm = SyntheticVideoDataModule(num_classes=6, frames=8, size=32)
    >>> model = VideoClassifier("tiny_c3d", num_classes=6)
    >>> L.Trainer(max_epochs=2, callbacks=[AVACallback()]).fit(model, dm)  # doctest: +SKIP
    >>> dance = DANCEWrapper(model, budget=0.5)                              # AAP
    >>> L.Trainer(max_epochs=2).fit(dance, dm)                               # doctest: +SKIP

The execution (:mod:`lightning_dance.execution`) and export (:mod:`lightning_dance.export`)
subpackages load on first use of their names here.
"""

from importlib import import_module
from typing import Any

from lightning_dance.aap import AdaptivePruner, PruningStats, budget_loss, distillation_loss
from lightning_dance.ava import ava_penalty
from lightning_dance.ava_callback import AVACallback, ava_loss_term
from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import (
    SyntheticVideoDataModule,
    VideoDecodeError,
    VideoFolderDataModule,
)
from lightning_dance.energy import EnergyModel
from lightning_dance.layers import NoConv3dError, all_conv3d, select_conv3d, stem_names
from lightning_dance.macs import MacCount, MacCountError, count_macs
from lightning_dance.models import CheckpointError, InflationError, create_model, list_models
from lightning_dance.nonfinite import NonFiniteError
from lightning_dance.report import MacReport
from lightning_dance.wrapper import ArchitectureMismatchError, DANCEWrapper

__version__ = "0.1.0"

_LAZY = {
    "CompactExecutor": "lightning_dance.execution",
    "CompactPruner": "lightning_dance.execution",
    "compact_conv3d": "lightning_dance.execution",
    "accelerate_dense": "lightning_dance.execution",
    "ExportCallback": "lightning_dance.export",
    "export_model": "lightning_dance.export",
    "rewrite_conv3d_to_conv2d": "lightning_dance.export",
}

__all__ = [
    "AVACallback",
    "AdaptivePruner",
    "ArchitectureMismatchError",
    "CheckpointError",
    "DANCEWrapper",
    "EnergyModel",
    "InflationError",
    "MacCount",
    "MacCountError",
    "MacReport",
    "NoConv3dError",
    "NonFiniteError",
    "PruningStats",
    "SyntheticVideoDataModule",
    "VideoClassifier",
    "VideoDecodeError",
    "VideoFolderDataModule",
    "__version__",
    "all_conv3d",
    "ava_loss_term",
    "ava_penalty",
    "budget_loss",
    "count_macs",
    "create_model",
    "distillation_loss",
    "list_models",
    "select_conv3d",
    "stem_names",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_dance' has no attribute {name!r}")
