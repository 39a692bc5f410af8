"""Export formats as a registry: one :class:`ExportFormat` entry per format.

Each entry says which target it deploys to, what it needs (an optional package), its parity
tolerance against eager, and how it is built and checked (``build(job, artifact, folder)``, which
writes the file, fills the manifest's :class:`~lightning_dance.export.manifest.Artifact` and
calls :meth:`ExportJob.check` on the outputs it ran here). :func:`~lightning_dance.export.export_model`
walks the registry; a new format (or target) is one :func:`register_format` call.

=============  ===============  =========================================================
target         format           what is built, and the check run here
=============  ===============  =========================================================
``jetson``     ``onnx``         ``model.onnx`` + ``build_engine.sh`` (trtexec); onnxruntime
``jetson``     ``torchscript``  ``model.pt`` (scripted, never traced); libtorch
``snapdragon`` ``qnn``          QNN context binary; the HTP simulator, CPU fallback off
``snapdragon`` ``nnapi``        Conv2d-only ``.ptl`` (dense only); conversion on the host
``snapdragon`` ``executorch``   Conv2d-only ``.pte`` on XNNPACK; the ExecuTorch runtime
=============  ===============  =========================================================

Example:
    >>> sorted(FORMATS)
    ['executorch', 'nnapi', 'onnx', 'qnn', 'torchscript']
    >>> formats_for("jetson")
    ('onnx', 'torchscript')
    >>> FORMATS["qnn"].relative_tolerance, FORMATS["qnn"].requires
    (True, 'onnxruntime-qnn')
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.export import snapdragon as sd
from lightning_dance.export.capture import capture, max_abs_error, scriptable
from lightning_dance.export.conv2d_rewrite import UnsupportedOpError, fold_time
from lightning_dance.export.manifest import Artifact, Manifest
from lightning_dance.export.onnx import (
    check_ops,
    export_onnx,
    onnx_op_types,
    run_onnxruntime,
    write_trtexec_script,
)

__all__ = ["FORMATS", "ExportFormat", "ExportJob", "formats_for", "register_format"]


@dataclass
class ExportJob:
    """What every format of one export shares: the module to export and its plan's mode, the
    example clip, the eager reference outputs, the tolerances and the target settings."""

    module: nn.Module
    clip: torch.Tensor
    reference: torch.Tensor
    mode: str
    manifest: Manifest
    tolerances: dict[str, float]
    gated: bool  # a DANCE model (controller + gates), not a plain network
    opset: int = 18
    soc_model: str = sd.DEFAULT_SOC_MODEL
    htp_arch: str = sd.DEFAULT_HTP_ARCH
    _onnx: dict[str, Path] = field(default_factory=dict)

    def check(self, art: Artifact, got: Any) -> None:
        """Record ``got``'s max abs error against eager in ``art``; raise past the tolerance."""
        reference, tol = self.reference, self.tolerances
        err = max_abs_error(reference, torch.as_tensor(got))
        art.parity_max_abs_error = err
        art.parity_tolerance = tol.get(art.format, FORMATS[art.format].tolerance)
        scale = float(reference.detach().abs().max())
        if FORMATS[art.format].relative_tolerance and art.parity_tolerance is not None:
            art.parity_tolerance *= max(scale, 1e-6)
        if self.mode != "dense" and art.parity_tolerance is not None:
            # gates amplify float differences (a logit near 0 can flip); relative to the
            # logits' scale, so that tiny logits cannot hide a different keep set
            art.parity_tolerance = max(art.parity_tolerance, tol.get("gated", 1e-2) * scale)
        if art.parity_tolerance is not None and not err <= art.parity_tolerance:
            hint = ""
            margin = self.manifest.gate_margin
            if self.mode != "dense" and margin is not None:
                hint = (
                    f" (the closest keep/drop decision on the example clip is {margin:.3g} "
                    "apart: lower-precision runtimes flip near-ties; a controller trained with "
                    "a wider margin, or another example clip, helps)"
                )
            raise RuntimeError(
                f"{art.target}/{art.format}: parity error {err:.3g} vs eager exceeds "
                f"{art.parity_tolerance:g}{hint}"
            )

    def onnx_file(self, sub: Path) -> Path:
        """``sub/model.onnx``: exported once per job, copied for a second target."""
        sub.mkdir(exist_ok=True)
        path = sub / "model.onnx"
        if "path" not in self._onnx:
            export_onnx(self.module, self.clip, path, opset=self.opset)
            self._onnx["path"] = path
        elif self._onnx["path"] != path:
            shutil.copyfile(self._onnx["path"], path)
        return path


#: ``build(job, artifact, folder)``: write the artifact into ``folder`` (the target's
#: sub-folder) and fill ``artifact``; raise ``ImportError`` / ``UnsupportedOpError`` when the
#: format cannot be made here (a default format is then skipped, a requested one raises)
Builder = Callable[[ExportJob, Artifact, Path], None]


@dataclass(frozen=True)
class ExportFormat:
    """One export format (see the module docstring)."""

    name: str
    target: str
    build: Builder
    tolerance: float = 1e-4  # max abs error vs eager (relative to the largest logit if ...)
    relative_tolerance: bool = False  # ... this is set: runtimes that compute in fp16
    requires: str | None = None  # an optional package it needs, for the error message


FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to :data:`FORMATS` (a target's formats run in registration order)."""
    if fmt.name in FORMATS:
        raise ValueError(f"an export format named {fmt.name!r} is registered already")
    FORMATS[fmt.name] = fmt
    return fmt


def formats_for(target: str) -> tuple[str, ...]:
    """The registered formats of ``target``, in registration order."""
    return tuple(name for name, f in FORMATS.items() if f.target == target)


# ------------------------------------------------------------------ the formats
def _onnx(job: ExportJob, art: Artifact, sub: Path) -> None:
    import onnxruntime as ort

    path = job.onnx_file(sub)
    art.file, art.opset = f"{art.target}/{path.name}", job.opset
    art.ops = dict(onnx_op_types(path))
    check_ops(art.ops, "tensorrt", where=" (TensorRT)")
    art.runtime = f"onnxruntime {ort.__version__} CPUExecutionProvider"
    job.check(art, run_onnxruntime(path, job.clip))
    write_trtexec_script(sub, path.name, "clip", tuple(job.clip.shape))
    art.extra["build_script"] = f"{art.target}/build_engine.sh"


def _torchscript(job: ExportJob, art: Artifact, sub: Path) -> None:
    path = sub / "model.pt"
    script, how = _script(job.module, job.clip, gated=job.gated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script.save(str(path))
        loaded = torch.jit.load(str(path))
    art.file, art.runtime = f"{art.target}/model.pt", f"libtorch {torch.__version__}"
    art.extra["scripted_from"] = how
    with torch.no_grad():
        job.check(art, loaded(job.clip))


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


def _qnn(job: ExportJob, art: Artifact, sub: Path) -> None:
    if not sd.qnn_available():
        raise ImportError("optional package onnxruntime-qnn is not installed")
    path = job.onnx_file(sub)
    art.ops = dict(onnx_op_types(path))
    check_ops(art.ops, "qnn", where=" (QNN HTP)")
    ctx = sub / "model_qnn_ctx.onnx"
    soc, arch = job.soc_model, job.htp_arch
    sd.compile_qnn_context(path, ctx, soc_model=soc, htp_arch=arch)
    art.file, art.opset = f"{art.target}/{ctx.name}", job.opset
    art.extra.update(source_onnx=f"{art.target}/{path.name}", soc_model=soc, htp_arch=arch)
    art.runtime = "onnxruntime-qnn HTP simulator (x86), CPU fallback disabled"
    job.check(art, sd.run_qnn_htp(ctx, job.clip, soc_model=soc, htp_arch=arch))


def _nnapi(job: ExportJob, art: Artifact, sub: Path) -> None:
    if job.mode != "dense":
        raise UnsupportedOpError(
            "topk" if job.mode == "topk" else "controller",
            f"NNAPI cannot represent mode={job.mode!r}: the DANCE controller's statistics, "
            "top-k and gathers have no NNAPI op (export mode='dense' for NNAPI)",
        )
    path, err = sd.export_nnapi(job.module, job.clip, sub / "model_nnapi.ptl")
    art.file, art.input_layout = f"{art.target}/{path.name}", "folded"
    art.input_shape = list(fold_time(job.clip).shape)
    art.runtime = "host: Conv2d rewrite only (NNAPI runs on the device)"
    art.parity_max_abs_error, art.parity_tolerance = err, job.tolerances.get("nnapi")
    art.extra["note"] = "NNAPI is deprecated since Android 15; device-only"


def _executorch(job: ExportJob, art: Artifact, sub: Path) -> None:
    if not sd.executorch_available():
        raise ImportError("optional package executorch is not installed")
    path, _ = sd.export_executorch(job.module, job.clip, sub / "model.pte")
    art.file, art.runtime = f"{art.target}/{path.name}", "ExecuTorch runtime (XNNPACK)"
    job.check(art, sd.run_executorch(path, job.clip))


register_format(ExportFormat("onnx", "jetson", _onnx))
register_format(ExportFormat("torchscript", "jetson", _torchscript))
register_format(
    ExportFormat(
        "qnn", "snapdragon", _qnn, 2e-2, relative_tolerance=True, requires="onnxruntime-qnn"
    )
)
register_format(ExportFormat("nnapi", "snapdragon", _nnapi))
register_format(ExportFormat("executorch", "snapdragon", _executorch, requires="executorch"))
