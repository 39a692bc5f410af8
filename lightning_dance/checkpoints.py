"""Rebuilding a LightningModule from its checkpoint file, whichever class wrote it.

:func:`load_module` reads a Lightning ``.ckpt`` once, tells a DANCE checkpoint (written by a
:class:`~lightning_dance.wrapper.DANCEWrapper`: it has a ``"dance"`` section) from a dense one,
and loads it with the class that wrote it: the class LightningCLI recorded (``_class_path`` in
the hyperparameters, for an already imported class), else
:class:`~lightning_dance.classifier.VideoClassifier` for a dense checkpoint. Errors name the
file and the fix (missing file, unreadable or truncated file, a checkpoint without the
hyperparameters needed to rebuild the model). The CLI uses it for ``DANCEWrapper(model=path)``
and ``lightning-dance export --ckpt path``.

Example:
    >>> import os, tempfile
    >>> import lightning as L
    >>> from lightning_dance import VideoClassifier
    >>> model = VideoClassifier("tiny_c3d", num_classes=4)
    >>> trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
    >>> trainer.strategy.connect(model)
    >>> path = os.path.join(tempfile.mkdtemp(), "dense.ckpt")
    >>> trainer.save_checkpoint(path)
    >>> loaded = load_module(path)
    >>> type(loaded).__name__, loaded.hparams.num_classes
    ('VideoClassifier', 4)
    >>> is_dance_checkpoint(path)
    False
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch.nn as nn

from lightning_dance.errors import DanceError
from lightning_dance.models.checkpoint import CheckpointError, load_tensors

__all__ = [
    "ArchitectureMismatchError",
    "CheckpointError",
    "check_architecture",
    "check_num_classes",
    "is_dance_checkpoint",
    "load_module",
    "model_from_name",
    "read_checkpoint",
]

#: file endings taken for checkpoint paths (not factory names) where a model name is expected
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def looks_like_path(name: str) -> bool:
    """Whether a model string names a file rather than a factory model (``"tiny_c3d"``)."""
    return (
        name.endswith(CHECKPOINT_SUFFIXES) or os.sep in name or "/" in name or Path(name).is_file()
    )


def _read(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder: name the .ckpt file inside it)" if path.is_dir() else ""
        raise FileNotFoundError(
            f"checkpoint file not found: {path}{hint}. Lightning writes checkpoints under "
            "<default_root_dir>/lightning_logs/version_*/checkpoints/*.ckpt (or where a "
            "ModelCheckpoint callback's dirpath says)"
        )
    data = path.read_bytes()
    ckpt = load_tensors(
        io.BytesIO(data),
        path,
        ". The file is corrupt or truncated (copy it again, or use an earlier checkpoint), or "
        "it is not a Lightning checkpoint written by Trainer.save_checkpoint / ModelCheckpoint",
    )
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'; found {keys}): a bare "
            "state_dict loads into a factory model with create_model(name, num_classes, "
            "checkpoint=path) instead"
        )
    return data, ckpt


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict stored in ``path`` (tensors and plain containers only)."""
    return _read(path)[1]


def is_dance_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by a :class:`~lightning_dance.wrapper.DANCEWrapper`."""
    return "dance" in read_checkpoint(path)


def _module_class(ckpt: dict[str, Any], path: Path) -> type[L.LightningModule]:
    from lightning_dance.classifier import VideoClassifier
    from lightning_dance.wrapper import DANCEWrapper

    if "dance" in ckpt:
        return DANCEWrapper
    class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if not class_path:
        return VideoClassifier
    module_name, _, name = str(class_path).rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise CheckpointError(
            f"checkpoint {path} was written by {class_path}, which is not an imported "
            f"LightningModule: import {module_name} first (classes named by a checkpoint are "
            "never imported on their own), or load it with that class's load_from_checkpoint"
        )
    return cls


def load_module(path: str | os.PathLike, *, dance: bool | None = None) -> L.LightningModule:
    """Load the LightningModule saved in the Lightning checkpoint ``path`` (on the CPU, eval mode).

    Args:
        path: a ``.ckpt`` file written by ``Trainer.save_checkpoint`` or ``ModelCheckpoint``.
        dance: ``True`` to require a DANCE checkpoint, ``False`` to require a dense one (the
            error says which one it is), ``None`` to accept both.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is unreadable, not a Lightning checkpoint, of the wrong kind,
            or without the hyperparameters to rebuild its model.
    """
    path = Path(path)
    data, ckpt = _read(path)
    is_dance = "dance" in ckpt
    if dance is not None and is_dance != dance:
        if is_dance:
            raise CheckpointError(
                f"{path} is a DANCE checkpoint (a trained controller), but a dense model's "
                "checkpoint is expected here: wrap the checkpoint of the model DANCE was "
                "trained on, or load this one with DANCEWrapper.load_from_checkpoint"
            )
        raise CheckpointError(
            f"{path} is a dense model's checkpoint, not a DANCE one: train a controller on it "
            "first (lightning-dance fit --model DANCEWrapper --model.model PATH)"
        )
    cls = _module_class(ckpt, path)
    hparams = ckpt.get("hyper_parameters") or {}
    if is_dance and "model" not in hparams:
        raise CheckpointError(
            f"DANCE checkpoint {path} does not record the model it wraps (it was wrapped around "
            "a module object, not a factory name or checkpoint path): rebuild it in Python with "
            "DANCEWrapper.load_from_checkpoint(path, model=YourModel(...))"
        )
    wrapped = hparams.get("model")
    if is_dance and isinstance(wrapped, str) and looks_like_path(wrapped):
        if not Path(wrapped).is_file():
            raise CheckpointError(
                f"DANCE checkpoint {path} wraps the dense checkpoint {wrapped}, which is not "
                "there: its hyperparameters rebuild the model's architecture (the weights come "
                f"from {path}). Put it back at that path, or load in Python with "
                "DANCEWrapper.load_from_checkpoint(path, model=<the dense model>)"
            )
    try:
        module = cls.load_from_checkpoint(io.BytesIO(data), map_location="cpu")
    except TypeError as exc:
        raise CheckpointError(
            f"cannot rebuild {cls.__name__} from {path}: {exc}. The checkpoint's "
            "hyperparameters do not give every constructor argument: call "
            f"{cls.__name__}.load_from_checkpoint(path, <missing arguments>) in Python"
        ) from exc
    return module.eval()


def model_from_name(
    name: str, model_kwargs: dict[str, Any] | None, num_classes: int | None
) -> nn.Module:
    """The user's model for a model string (``DANCEWrapper(model="...")``, the CLI): a
    checkpoint path (rebuilt by :func:`load_module`) or a factory name (``create_model``)."""
    kwargs = dict(model_kwargs or {})
    if looks_like_path(name):
        if kwargs:
            raise ValueError(
                f"model_kwargs only apply to a factory name; {name!r} is a checkpoint path "
                "(the checkpoint's hyperparameters rebuild its model)"
            )
        module = load_module(name, dance=False)
        check_num_classes(module, num_classes, f"checkpoint {name}")
        return module
    from lightning_dance.models import create_model

    if num_classes is not None:
        if kwargs.setdefault("num_classes", num_classes) != num_classes:
            raise ValueError(
                f"num_classes={num_classes} (on the command line: the data's) but "
                f"model_kwargs['num_classes']={kwargs['num_classes']}: drop num_classes from "
                "model_kwargs, or make the two match"
            )
    if "num_classes" not in kwargs:
        raise ValueError(
            "a factory model name needs num_classes=... (or model_kwargs={'num_classes': ...})"
        )
    return create_model(name, **kwargs)


def check_num_classes(model: nn.Module, num_classes: int | None, what: str) -> None:
    """Refuse a ``num_classes`` that contradicts the one ``model`` records in its hparams."""
    hparams = getattr(model, "hparams", None) or {}
    known = hparams.get("num_classes") if hasattr(hparams, "get") else None
    if num_classes is not None and known is not None and int(known) != int(num_classes):
        raise ValueError(
            f"{what} classifies {known} classes but num_classes={num_classes} (the data's, on "
            "the command line): train on data with the same classes, or set the data's "
            "num_classes to match"
        )


class ArchitectureMismatchError(DanceError, ValueError):
    """A DANCE checkpoint was made for a different model architecture."""


def check_architecture(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first differences."""
    if saved == current:
        return
    diffs = []
    if saved.get("stem") != current.get("stem"):
        diffs.append(f"stem {saved.get('stem')} != {current.get('stem')}")
    if saved.get("dims") != current.get("dims"):
        diffs.append(f"dims {saved.get('dims')} != {current.get('dims')}")
    s_layers, c_layers = saved.get("layers", {}), current.get("layers", {})
    for name in list(dict.fromkeys([*s_layers, *c_layers])):
        if s_layers.get(name) != c_layers.get(name):
            diffs.append(
                f"layer {name!r}: saved {s_layers.get(name)} vs model {c_layers.get(name)}"
            )
    raise ArchitectureMismatchError(
        "this DANCE controller was trained for a different architecture: "
        + "; ".join(diffs[:5])
        + (" ..." if len(diffs) > 5 else "")
    )
