"""``export_model``: parity-checked deployment artifacts for Jetson and Snapdragon.

One call writes, into a fresh folder (built in a temporary sibling folder and moved into place
only when everything succeeded), the artifacts of each target, a ``manifest.json`` and, for
Jetson, a TensorRT build script:

=============  ===============  ==========================================================
target         format           file, check run here
=============  ===============  ==========================================================
``jetson``     ``onnx``         ``jetson/model.onnx`` (static shapes, opset <= 20),
                                ``jetson/build_engine.sh`` (trtexec, run on the device);
                                onnxruntime CPU parity
``jetson``     ``torchscript``  ``jetson/model.pt``: ``torch.jit.script`` (never trace) of
                                the model, or of its ``torch.export`` graph when the Python
                                forward is not scriptable; libtorch parity (load + run)
``snapdragon`` ``qnn``          ``snapdragon/model.onnx`` + ``snapdragon/model_qnn_ctx.onnx``
                                (QNN context binary for ``soc_model``); HTP simulator parity,
                                CPU fallback disabled, no NonZero / If (optional extra
                                ``onnxruntime-qnn``)
``snapdragon`` ``nnapi``        ``snapdragon/model_nnapi.ptl``: Conv2d-only rewrite, frames
                                folded into the batch; conversion checked on the host, runs on
                                the device only (dense mode; NNAPI is deprecated)
``snapdragon`` ``executorch``   ``snapdragon/model.pte``: Conv2d-only rewrite lowered to
                                XNNPACK; ExecuTorch runtime parity (optional extra
                                ``executorch``)
=============  ===============  ==========================================================

A format asked for explicitly (``formats=``) that cannot represent the model raises
:class:`~lightning_dance.export.conv2d_rewrite.UnsupportedOpError` naming the op; a default
format that cannot (or whose optional package is missing) is recorded in the manifest as
``"skipped"`` with the reason.

Example:
    >>> import torch, tempfile
    >>> from lightning_dance.models import create_model
    >>> net = create_model("tiny_c3d", num_classes=4)
    >>> out = export_model(net, torch.randn(1, 3, 4, 16, 16), targets=("jetson",),
    ...                    formats=("onnx",), out_dir=tempfile.mkdtemp() + "/export")
    >>> out.manifest["artifacts"][0]["parity_max_abs_error"] < 1e-4
    True

Each format is an entry of :data:`~lightning_dance.export.formats.FORMATS` (what it needs, how
it is built, how parity is checked); :func:`~lightning_dance.export.formats.register_format`
adds one.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.export import snapdragon as sd
from lightning_dance.export.conv2d_rewrite import UnsupportedOpError
from lightning_dance.export.formats import FORMATS, ExportJob, formats_for
from lightning_dance.export.manifest import Artifact, Manifest
from lightning_dance.export.modes import MODES, build_export_module, unwrap_pruner
from lightning_dance.export.onnx import MAX_OPSET

__all__ = ["DEFAULT_FORMATS", "TARGETS", "ExportResult", "export_model"]

#: the targets and their formats as built in (:mod:`lightning_dance.export.formats`; what
#: ``export_model`` accepts is the registry's content when it is called)
TARGETS = tuple(dict.fromkeys(f.target for f in FORMATS.values()))
DEFAULT_FORMATS: dict[str, tuple[str, ...]] = {t: formats_for(t) for t in TARGETS}
#: default parity tolerances (max abs error vs eager), each format's own
#: (:attr:`~lightning_dance.export.formats.ExportFormat.tolerance`; fp32 formats: absolute,
#: for unit-scale logits; ``qnn``: *relative* to the largest eager logit, the HTP computes in
#: fp16); ``gated``: for masked / topk modes, a floor relative to the largest eager logit (float
#: differences can flip a gate near its threshold; a different keep set is still an error)
DEFAULT_TOLERANCES: dict[str, float] = {n: f.tolerance for n, f in FORMATS.items()} | {
    "gated": 1e-2
}


@dataclass
class ExportResult:
    """Where the export went and what its manifest says."""

    out_dir: Path
    manifest: dict[str, Any]

    def files(self) -> dict[str, Path]:
        """``{"target/format": path}`` of the written artifacts."""
        return {
            f"{a['target']}/{a['format']}": self.out_dir / a["file"]
            for a in self.manifest["artifacts"]
            if a["status"] == "ok" and a["file"]
        }


def validate_export_args(
    targets: Sequence[str], mode: str, opset: int, formats: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], set[str]]:
    """Checked ``(targets, {target: formats}, formats named explicitly)`` against the format
    registry as it is now; ValueError if bad."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    known_targets = tuple(dict.fromkeys(f.target for f in FORMATS.values()))
    unknown = [t for t in targets if t not in known_targets]
    if not targets or unknown:
        raise ValueError(f"targets must be a non-empty subset of {known_targets}, got {targets!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(opset, int) or not 7 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [7, {MAX_OPSET}] (TensorRT 10.3), got {opset!r}")
    plan = {t: formats_for(t) for t in targets}
    explicit: set[str] = set()
    if formats is not None:
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        known = {f for t in targets for f in plan[t]}
        bad = [f for f in formats if f not in known]
        if bad:
            raise ValueError(f"formats {bad} are not formats of targets {targets}: {sorted(known)}")
        plan = {t: tuple(f for f in plan[t] if f in formats) for t in targets}
        explicit = set(formats)
    return targets, plan, explicit


def export_model(
    model: nn.Module,
    example_clip: torch.Tensor,
    *,
    targets: Sequence[str] = TARGETS,
    mode: str = "dense",
    out_dir: str | os.PathLike = "export",
    formats: Sequence[str] | None = None,
    opset: int = 18,
    soc_model: str | None = None,
    htp_arch: str | None = None,
    tolerances: dict[str, float] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` for ``targets`` in ``mode`` and check every artifact that runs here.

    Args:
        model: a 3D CNN (``mode="dense"``), an ``AdaptivePruner`` or a ``DANCEWrapper``.
        example_clip: ``[N, C, T, H, W]``: the artifacts' static input shape; also the parity
            clip (N = 1 is what a device usually runs).
        targets: any of ``("jetson", "snapdragon")``.
        mode: ``"dense"``, ``"masked"`` (controller + masks, no savings, everywhere), ``"topk"``
            (gathered static top-k, ``policy="topk"`` pruners) or ``"threshold"`` (the gates'
            kept entries gathered, dynamic shapes: ONNX / TorchScript only).
        out_dir: the folder to create (must not exist, unless ``overwrite``).
        formats: restrict to these formats (see the module table); named formats that fail
            raise instead of being skipped.
        opset: ONNX opset (<= 20 for TensorRT 10.3 on JetPack 6).
        soc_model, htp_arch: QNN SoC id / HTP architecture for the context binary (defaults
            :data:`~lightning_dance.export.snapdragon.DEFAULT_SOC_MODEL` / ``_HTP_ARCH``).
        tolerances: per-format max abs error allowed against eager (``DEFAULT_TOLERANCES``).
        overwrite: replace an existing ``out_dir``.

    Returns:
        :class:`ExportResult` (the folder and the manifest as a dict).

    Raises:
        ValueError: bad arguments.
        FileExistsError: ``out_dir`` exists.
        UnsupportedOpError: an explicitly requested format cannot represent the model.
        RuntimeError: an artifact's parity error exceeds its tolerance.

    Nothing is left in ``out_dir`` when an error is raised.
    """
    targets, plan, explicit = validate_export_args(targets, mode, opset, formats)
    if not isinstance(example_clip, torch.Tensor) or example_clip.dim() != 5:
        raise ValueError("example_clip must be a tensor [N, C, T, H, W]")
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        manifest = _export_into(
            model,
            example_clip.detach().cpu().float(),
            targets,
            plan,
            explicit,
            mode,
            opset,
            soc_model,
            htp_arch,
            tol,
            tmp,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, manifest.to_dict())


def _export_into(
    model, clip, targets, plan, explicit, mode, opset, soc_model, htp_arch, tol, folder: Path
) -> Manifest:
    source = copy.deepcopy(model).cpu().eval()
    pruner = unwrap_pruner(source)
    module, eplan = build_export_module(source, mode, clip)
    with torch.no_grad():
        reference = (pruner(clip) if pruner is not None else module(clip)).detach()
    manifest = Manifest(
        mode=mode,
        policy=eplan.policy,
        input_shape=list(clip.shape),
        budget=eplan.budget,
        dims=list(eplan.dims),
        dense_macs=eplan.dense_macs,
        executed_macs=eplan.executed_macs,
        policy_macs=eplan.policy_macs,
        keep_counts=eplan.keep_counts,
        masked_layers=eplan.masked_layers,
        gate_margin=None
        if eplan.gate_margin is None or math.isinf(eplan.gate_margin)
        else eplan.gate_margin,
        folded_norms=eplan.folded_norms,
    )
    job = ExportJob(
        module, clip, reference, mode, manifest, tol, gated=pruner is not None, opset=opset,
        soc_model=soc_model or sd.DEFAULT_SOC_MODEL, htp_arch=htp_arch or sd.DEFAULT_HTP_ARCH,
    )  # fmt: skip
    for target in targets:
        sub = folder / target
        sub.mkdir(exist_ok=True)
        for fmt in plan[target]:
            art = Artifact(target=target, format=fmt, input_shape=list(clip.shape))
            try:
                FORMATS[fmt].build(job, art, sub)
            except (UnsupportedOpError, ImportError) as exc:
                if fmt in explicit:
                    raise
                art.status, art.reason, art.file = "skipped", str(exc), None
            manifest.artifacts.append(art)
    manifest.write(folder)
    return manifest
