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
    ...                    out_dir=tempfile.mkdtemp() + "/export")  # doctest: +SKIP
    >>> out.manifest["artifacts"][0]["parity_max_abs_error"] < 1e-4  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.export.capture import capture, max_abs_error, scriptable
from lightning_dance.export.conv2d_rewrite import UnsupportedOpError, fold_time
from lightning_dance.export.manifest import Artifact, Manifest
from lightning_dance.export.modes import MODES, build_export_module, unwrap_pruner
from lightning_dance.export.onnx import (
    MAX_OPSET,
    check_ops,
    export_onnx,
    onnx_op_types,
    run_onnxruntime,
    write_trtexec_script,
)

__all__ = ["DEFAULT_FORMATS", "TARGETS", "ExportResult", "export_model"]

TARGETS = ("jetson", "snapdragon")
DEFAULT_FORMATS: dict[str, tuple[str, ...]] = {
    "jetson": ("onnx", "torchscript"),
    "snapdragon": ("qnn", "nnapi", "executorch"),
}
#: default parity tolerances (max abs error vs eager); fp32 formats: absolute (unit-scale
#: logits); ``qnn``: *relative* to the largest eager logit (the HTP computes in fp16);
#: ``gated``: for masked / topk modes, a floor relative to the largest eager logit (float
#: differences can flip a gate near its threshold; a different keep set is still an error)
DEFAULT_TOLERANCES: dict[str, float] = {
    "onnx": 1e-4,
    "torchscript": 1e-4,
    "executorch": 1e-4,
    "nnapi": 1e-4,
    "qnn": 2e-2,
    "gated": 1e-2,
}
#: formats whose tolerance is a fraction of the largest eager logit
RELATIVE_TOLERANCES = frozenset({"qnn"})


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
    """Checked ``(targets, {target: formats}, formats named explicitly)``; ValueError if bad."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {targets!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(opset, int) or not 7 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [7, {MAX_OPSET}] (TensorRT 10.3), got {opset!r}")
    plan = {t: DEFAULT_FORMATS[t] for t in targets}
    explicit: set[str] = set()
    if formats is not None:
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        known = {f for t in targets for f in DEFAULT_FORMATS[t]}
        bad = [f for f in formats if f not in known]
        if bad:
            raise ValueError(f"formats {bad} are not formats of targets {targets}: {sorted(known)}")
        plan = {t: tuple(f for f in DEFAULT_FORMATS[t] if f in formats) for t in targets}
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
        ValueError: bad arguments; FileExistsError: ``out_dir`` exists.
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
    from lightning_dance.export import snapdragon as sd

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
    shape = list(clip.shape)
    soc_model = soc_model or sd.DEFAULT_SOC_MODEL
    htp_arch = htp_arch or sd.DEFAULT_HTP_ARCH
    onnx_cache: dict[str, Any] = {}
    gated_tolerance = tol.get("gated", 1e-2)

    def check(art: Artifact, got: Any) -> None:
        err = max_abs_error(reference, torch.as_tensor(got))
        art.parity_max_abs_error = err
        art.parity_tolerance = tol.get(art.format)
        scale = float(reference.detach().abs().max())
        if art.format in RELATIVE_TOLERANCES and art.parity_tolerance is not None:
            art.parity_tolerance *= max(scale, 1e-6)
        if mode != "dense" and art.parity_tolerance is not None:
            # gates amplify float differences (a logit near 0 can flip); relative to the
            # logits' scale, so that tiny logits cannot hide a different keep set
            art.parity_tolerance = max(art.parity_tolerance, gated_tolerance * scale)
        if art.parity_tolerance is not None and not err <= art.parity_tolerance:
            hint = ""
            if mode != "dense" and manifest.gate_margin is not None:
                hint = (
                    f" (the closest keep/drop decision on the example clip is "
                    f"{manifest.gate_margin:.3g} apart: lower-precision runtimes flip near-ties; "
                    "a controller trained with a wider margin, or another example clip, helps)"
                )
            raise RuntimeError(
                f"{art.target}/{art.format}: parity error {err:.3g} vs eager exceeds "
                f"{art.parity_tolerance:g}{hint}"
            )

    def onnx_file(sub: Path) -> Path:
        sub.mkdir(exist_ok=True)
        path = sub / "model.onnx"
        if "path" not in onnx_cache:
            export_onnx(module, clip, path, opset=opset)
            onnx_cache["path"] = path
        elif onnx_cache["path"] != path:
            shutil.copyfile(onnx_cache["path"], path)
        return path

    for target in targets:
        sub = folder / target
        sub.mkdir(exist_ok=True)
        for fmt in plan[target]:
            art = Artifact(target=target, format=fmt, input_shape=shape)
            try:
                if fmt == "onnx":
                    path = onnx_file(sub)
                    art.file, art.opset = f"{target}/{path.name}", opset
                    art.ops = dict(onnx_op_types(path))
                    check_ops(art.ops, "tensorrt", where=" (TensorRT)")
                    import onnxruntime as ort

                    art.runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider"
                    check(art, run_onnxruntime(path, clip))
                    write_trtexec_script(sub, path.name, "clip", tuple(shape))
                    art.extra["build_script"] = f"{target}/build_engine.sh"
                elif fmt == "torchscript":
                    path = sub / "model.pt"
                    script, how = _script(module, clip, gated=pruner is not None)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        script.save(str(path))
                        loaded = torch.jit.load(str(path))
                    art.file, art.runtime = f"{target}/model.pt", f"libtorch {torch.__version__}"
                    art.extra["scripted_from"] = how
                    with torch.no_grad():
                        check(art, loaded(clip))
                elif fmt == "qnn":
                    if not sd.qnn_available():
                        raise ImportError("optional package onnxruntime-qnn is not installed")
                    path = onnx_file(sub)
                    art.ops = dict(onnx_op_types(path))
                    check_ops(art.ops, "qnn", where=" (QNN HTP)")
                    ctx = sub / "model_qnn_ctx.onnx"
                    sd.compile_qnn_context(path, ctx, soc_model=soc_model, htp_arch=htp_arch)
                    art.file, art.opset = f"{target}/{ctx.name}", opset
                    art.extra.update(
                        source_onnx=f"{target}/{path.name}", soc_model=soc_model, htp_arch=htp_arch
                    )
                    art.runtime = "onnxruntime-qnn HTP simulator (x86), CPU fallback disabled"
                    check(art, sd.run_qnn_htp(ctx, clip, soc_model=soc_model, htp_arch=htp_arch))
                elif fmt == "nnapi":
                    if mode != "dense":
                        raise UnsupportedOpError(
                            "topk" if mode == "topk" else "controller",
                            f"NNAPI cannot represent mode={mode!r}: the DANCE controller's "
                            "statistics, top-k and gathers have no NNAPI op (export "
                            "mode='dense' for NNAPI)",
                        )
                    path, err = sd.export_nnapi(module, clip, sub / "model_nnapi.ptl")
                    art.file, art.input_layout = f"{target}/{path.name}", "folded"
                    art.input_shape = list(fold_time(clip).shape)
                    art.runtime = "host: Conv2d rewrite only (NNAPI runs on the device)"
                    art.parity_max_abs_error, art.parity_tolerance = err, tol.get("nnapi")
                    art.extra["note"] = "NNAPI is deprecated since Android 15; device-only"
                elif fmt == "executorch":
                    if not sd.executorch_available():
                        raise ImportError("optional package executorch is not installed")
                    path, _ = sd.export_executorch(module, clip, sub / "model.pte")
                    art.file, art.runtime = f"{target}/{path.name}", "ExecuTorch runtime (XNNPACK)"
                    check(art, sd.run_executorch(path, clip))
            except (UnsupportedOpError, ImportError) as exc:
                if fmt in explicit:
                    raise
                art.status, art.reason, art.file = "skipped", str(exc), None
            manifest.artifacts.append(art)
    manifest.write(folder)
    return manifest


def _script(module: nn.Module, clip: torch.Tensor, *, gated: bool) -> tuple[Any, str]:
    """``torch.jit.script`` of the module, else of its ``torch.export`` graph (never a trace)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not gated:
            try:
                return torch.jit.script(module), "module"
            except Exception:  # not scriptable Python: script the captured graph instead
                pass
        return torch.jit.script(scriptable(capture(module, clip))), "torch.export graph"
