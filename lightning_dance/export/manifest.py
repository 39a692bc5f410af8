"""``manifest.json``: what each exported artifact is, how it was checked, and with what.

Example:
    >>> m = Manifest(mode="dense", policy=None, input_shape=[1, 3, 4, 16, 16])
    >>> m.artifacts.append(Artifact(target="jetson", format="onnx", file="jetson/model.onnx"))
    >>> sorted(m.to_dict())[:3]
    ['artifacts', 'budget', 'created']
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Artifact", "Manifest", "package_versions"]

_PACKAGES = (
    "torch",
    "lightning-dance",
    "lightning",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-qnn",
    "executorch",
)


def package_versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages an export depends on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Artifact:
    """One exported file (paths relative to the export folder)."""

    target: str
    format: str
    file: str | None = None
    status: str = "ok"  # "ok" or "skipped"
    reason: str | None = None  # why it was skipped
    input_shape: list[int] = field(default_factory=list)
    input_layout: str = "clip"  # "clip" [N, C, T, H, W] or "folded" [N * T, C, H, W]
    opset: int | None = None
    runtime: str | None = None  # what ran it here for the parity check
    parity_max_abs_error: float | None = None  # measured vs the eager model, same clip
    parity_tolerance: float | None = None
    ops: dict[str, int] = field(default_factory=dict)  # ONNX op types (ONNX-based formats)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """The whole export: mode, MACs per clip, artifacts, package versions."""

    mode: str
    policy: str | None
    input_shape: list[int]
    budget: float | None = None
    dims: list[str] = field(default_factory=list)
    dense_macs: int = 0
    executed_macs: int = 0
    policy_macs: float | None = None
    keep_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    masked_layers: list[str] = field(default_factory=list)
    gate_margin: float | None = None  # smallest keep/drop score gap on the example clip
    folded_norms: dict[str, str] = field(default_factory=dict)  # BatchNorm -> conv folded into
    artifacts: list[Artifact] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=package_versions)
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / "manifest.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> dict[str, Any]:
        """The manifest of an export folder, as a dict."""
        return json.loads((Path(folder) / "manifest.json").read_text())
