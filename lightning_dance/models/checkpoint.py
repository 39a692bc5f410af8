"""Loading local weight files into factory models (``create_model(..., checkpoint=path)``).

Accepted files (read with ``torch.load(path, map_location="cpu", weights_only=True)``, so only
tensors and plain containers, never arbitrary pickled objects):

- a raw ``state_dict`` (``torch.save(model.state_dict(), path)``);
- a dict with ``"state_dict"`` (Lightning checkpoints), ``"model_state"`` (pytorchvideo /
  PySlowFast) or ``"model"`` holding the state_dict.

Key prefixes (``"model."`` of a LightningModule attribute, ``"module."`` of DDP,
``"_orig_mod."`` of ``torch.compile``, or nested ones such as ``"pruner.model."``) are detected:
the prefix under which the most keys match the model's own keys is stripped, and keys outside it
(other attributes of the LightningModule) are ignored. Missing or unexpected keys under the
prefix, and shape mismatches, raise a :class:`CheckpointError` listing them.

Example:
    >>> import torch, tempfile, os
    >>> net = torch.nn.Linear(2, 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"state_dict": {"model." + k: v for k, v in net.state_dict().items()}}, path)
    >>> load_checkpoint(torch.nn.Linear(2, 3), path).weight.equal(net.weight)
    True
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.errors import DanceError

__all__ = ["CheckpointError", "load_checkpoint", "read_state_dict"]

_NESTED = ("state_dict", "model_state", "model")


class CheckpointError(DanceError, ValueError):
    """A checkpoint file cannot be read or does not match the model."""


def _short(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def load_tensors(source: Any, path: str | Path, hint: str) -> Any:
    """``torch.load(source, weights_only=True)`` on CPU; a file it cannot read raises
    :class:`CheckpointError` naming ``path``, the error's first line and ``hint``."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {first}{hint}"
        ) from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict stored in ``path`` (raw, or nested under one of ``_NESTED`` keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    obj = load_tensors(
        path,
        path,
        " (expected a file written by torch.save holding tensors: a state_dict or a Lightning "
        "checkpoint; the file may be corrupt or truncated, or hold pickled Python objects that "
        "torch.load(weights_only=True) refuses)",
    )
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    for key in _NESTED:
        inner = obj.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors or not all(isinstance(k, str) for k in tensors):
        raise CheckpointError(
            f"checkpoint {path} holds no state_dict: a dict with keys {_short(list(obj))}; "
            f"expected tensors by parameter name, or one of {list(_NESTED)} holding them"
        )
    if len(tensors) != len(obj):
        others = [k for k in obj if k not in tensors]
        raise CheckpointError(
            f"checkpoint {path} mixes tensors and other entries: {_short(others)}"
        )
    return tensors


def _best_prefix(keys: list[str], model_keys: set[str], path: Path) -> str:
    votes: Counter[str] = Counter()
    for k in keys:
        if k in model_keys:
            votes[""] += 1
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1 :] in model_keys:
                votes[k[: i + 1]] += 1
    if not votes:
        return ""
    best = max(votes.values())
    winners = sorted(p for p, v in votes.items() if v == best)
    if len(winners) > 1 and "" not in winners:
        raise CheckpointError(
            f"checkpoint {path}: ambiguous key prefix, {winners} match the model equally well; "
            "pass the prefix explicitly (load_checkpoint(..., prefix=...) or "
            "create_model(..., checkpoint_prefix=...))"
        )
    return "" if "" in winners else winners[0]


def load_checkpoint(
    model: nn.Module, path: str | Path, *, prefix: str | None = None, name: str | None = None
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (strictly) and return it.

    Args:
        model: the freshly built model.
        path: a local file (see the module docstring for the accepted layouts).
        prefix: the key prefix to strip (``""`` for none); auto-detected when ``None``.
        name: the model's name in error messages.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, no state_dict in it, or keys / shapes that do not
            match the model (every mismatch is listed).
    """
    path = Path(path)
    label = name or type(model).__name__
    state = read_state_dict(path)
    own = model.state_dict()
    if prefix is None:
        prefix = _best_prefix(list(state), set(own), path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"checkpoint {path} has no key starting with {prefix!r}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"checkpoint {path} does not match {label}"]
        if prefix:
            parts.append(f"(after stripping the key prefix {prefix!r})")
        if missing:
            parts.append(f"; missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"; unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if wrong:
            parts.append(
                f"; shape mismatches ({len(wrong)}): {_short(wrong, 4)} "
                "(was it saved with another width or num_classes?)"
            )
        raise CheckpointError(" ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
