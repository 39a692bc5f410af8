"""lightning-dance: DANCE (AVA + AAP) dynamic pruning of 3D CNNs for PyTorch Lightning.

Example:
    >>> import lightning as L, torch
    >>> from lightning_dance import (AVACallback, DANCEWrapper, SyntheticVideoDataModule,
    ...                              VideoClassifier)
    >>> dm = SyntheticVideoDataModule(num_classes=6, frames=8, size=32,
    ...                               train_size=8, val_size=4, batch_size=4)  # tiny demo sizes
    >>> model = VideoClassifier("tiny_c3d", num_classes=6)
    >>> quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...              enable_model_summary=False)
    >>> L.Trainer(max_epochs=1, callbacks=[AVACallback()], **quiet).fit(model, dm)  # AVA
    >>> dance = DANCEWrapper(model, budget=0.5)                                    # AAP
    >>> L.Trainer(max_epochs=1, **quiet).fit(dance, dm)
    >>> dance.eval()(torch.randn(1, 3, 8, 32, 32)).shape
    torch.Size([1, 6])

The top level has the names for the steps a user takes: AVA (:class:`AVACallback`), AAP
(:class:`DANCEWrapper` over an :class:`AdaptivePruner`), the attention method's training
phase (:class:`TargetedDropoutCallback`), counting (:func:`count_macs`,
:class:`MacReport`), fast execution (:class:`CompactPruner`), export (:func:`export_model`,
:class:`ExportCallback`), models (:func:`create_model`, :func:`list_models`) and data; every error
the package raises on purpose derives from :class:`DanceError`. The rest lives in the modules:
policies (:mod:`lightning_dance.policies`), the per-clip decision plan
(:mod:`lightning_dance.decision`), masks, the controller, the accounting (:mod:`~lightning_dance.macs`,
:mod:`~lightning_dance.executed`, :mod:`~lightning_dance.traffic`, :mod:`~lightning_dance.energy`),
:mod:`lightning_dance.execution` and :mod:`lightning_dance.export` (loaded on first use).
"""

import warnings
from importlib import import_module
from typing import Any

from lightning_dance.aap import AdaptivePruner
from lightning_dance.ava_callback import AVACallback
from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule, VideoFolderDataModule
from lightning_dance.errors import DanceError
from lightning_dance.kernel_cache import raise_default as _raise_kernel_cache
from lightning_dance.macs import count_macs
from lightning_dance.models import create_model, list_models
from lightning_dance.report import MacReport
from lightning_dance.targeted_dropout import TargetedDropoutCallback
from lightning_dance.wrapper import DANCEWrapper

__version__ = "0.1.0"

_raise_kernel_cache()  # before any model runs: per-clip shapes outgrow oneDNN's default cache

# loaded on first use (the execution and export stacks import more)
_LAZY = {
    "CompactPruner": "lightning_dance.execution",
    "ExportCallback": "lightning_dance.export",
    "export_model": "lightning_dance.export",
}

# names that lived at the top level before the API was tiered: they still resolve, with a
# DeprecationWarning naming their module
_MOVED = {
    "ArchitectureMismatchError": "lightning_dance.checkpoints",
    "CheckpointError": "lightning_dance.models",
    "CompactExecutor": "lightning_dance.execution",
    "EnergyModel": "lightning_dance.energy",
    "InflationError": "lightning_dance.models",
    "MacCount": "lightning_dance.macs",
    "MacCountError": "lightning_dance.macs",
    "NoConv3dError": "lightning_dance.layers",
    "PruningStats": "lightning_dance.stats",
    "VideoDecodeError": "lightning_dance.data",
    "accelerate_dense": "lightning_dance.execution",
    "all_conv3d": "lightning_dance.layers",
    "ava_loss_term": "lightning_dance.ava_callback",
    "ava_penalty": "lightning_dance.ava",
    "budget_loss": "lightning_dance.losses",
    "compact_conv3d": "lightning_dance.execution",
    "distillation_loss": "lightning_dance.losses",
    "rewrite_conv3d_to_conv2d": "lightning_dance.export",
    "select_conv3d": "lightning_dance.layers",
    "stem_names": "lightning_dance.layers",
}

__all__ = [
    "AVACallback",
    "AdaptivePruner",
    "DANCEWrapper",
    "DanceError",
    "MacReport",
    "SyntheticVideoDataModule",
    "TargetedDropoutCallback",
    "VideoClassifier",
    "VideoFolderDataModule",
    "__version__",
    "count_macs",
    "create_model",
    "list_models",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        warnings.warn(
            f"lightning_dance.{name} moved: import it from {_MOVED[name]} "
            f"(from {_MOVED[name]} import {name})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lightning_dance' has no attribute {name!r}")
