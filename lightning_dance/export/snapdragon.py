"""Snapdragon artifacts: QNN (Hexagon NPU) through onnxruntime-qnn, NNAPI and ExecuTorch.

- **QNN**: the optional package ``onnxruntime-qnn`` (an onnxruntime plugin EP; its Linux x86-64
  wheel ships the HTP backend, which on x86 runs as a simulator of the Hexagon NPU).
  :func:`run_qnn_htp` runs an ONNX file on it with ``session.disable_cpu_ep_fallback=1`` (every
  node must run on the NPU, or session creation fails); :func:`compile_qnn_context` writes an
  EP-context ONNX with the compiled QNN context binary embedded, for a given SoC. An HTP
  architecture / SoC must be named (the default backend setting failed to finalize Conv3d graphs
  here). The simulator computes in fp16 (errors ~1e-4 to 1e-3 for unit-scale logits).
- **NNAPI** (deprecated since Android 15, runs on the device only: it needs
  ``libneuralnetworks.so``): the Conv2d-only rewrite with time folded into the batch
  (``input_layout="folded"``, NCHW), converted with ``torch.backends._nnapi``; conversion is
  checked on the host. Dense models only (no gates, gathers or top-k in NNAPI).
- **ExecuTorch** (optional package ``executorch``): the Conv2d-only rewrite, lowered to XNNPACK
  and run in the ExecuTorch Python runtime for parity (Conv3d itself has no ExecuTorch kernel).

Example:
    >>> import torch, torch.nn as nn, tempfile, os  # doctest: +SKIP
    >>> from lightning_dance.export.onnx import export_onnx
    >>> net = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU()).eval()
    >>> clip = torch.randn(1, 3, 4, 8, 8)
    >>> path = export_onnx(net, clip, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> run_qnn_htp(path, clip).shape
    (1, 4, 2, 6, 6)
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightning_dance.export.capture import capture, scriptable
from lightning_dance.export.conv2d_rewrite import (
    UnsupportedOpError,
    fold_time,
    rewrite_conv3d_to_conv2d,
)

__all__ = [
    "DEFAULT_HTP_ARCH",
    "DEFAULT_SOC_MODEL",
    "compile_qnn_context",
    "executorch_available",
    "export_executorch",
    "export_nnapi",
    "qnn_available",
    "run_executorch",
    "run_qnn_htp",
]

#: QNN SoC id and HTP architecture used when none is configured (QNN's numbering; pick the
#: values of your phone's SoC from Qualcomm's QNN documentation).
DEFAULT_SOC_MODEL = "57"
DEFAULT_HTP_ARCH = "75"


# ------------------------------------------------------------------------------ QNN
def qnn_available() -> bool:
    """True if the optional ``onnxruntime-qnn`` package is installed."""
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False
    return True


def _qnn_options(soc_model: str | None, htp_arch: str | None, context_path: str | None) -> Any:
    try:
        import onnxruntime as ort
        import onnxruntime_qnn as oq
    except ImportError as exc:
        raise ImportError(
            "the snapdragon QNN path needs the optional package onnxruntime-qnn "
            "(pip install onnxruntime-qnn)"
        ) from exc
    name = oq.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, oq.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_path is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_path))
        so.add_session_config_entry("ep.context_embed_mode", "1")
    options = {"backend_type": "htp"}
    if soc_model:
        options["soc_model"] = str(soc_model)
    if htp_arch:
        options["htp_arch"] = str(htp_arch)
    so.add_provider_for_devices(devices, options)
    return so


def run_qnn_htp(
    onnx_path: str | os.PathLike,
    clip: torch.Tensor,
    *,
    soc_model: str | None = DEFAULT_SOC_MODEL,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
) -> np.ndarray:
    """Run an ONNX model (or a QNN EP-context ONNX) on the HTP backend, CPU fallback disabled."""
    import onnxruntime as ort

    so = _qnn_options(soc_model, htp_arch, None)
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=so)
    except Exception as exc:
        raise UnsupportedOpError(
            "qnn",
            f"the QNN HTP backend cannot run {Path(onnx_path).name}: "
            f"{str(exc).strip().splitlines()[0][:400]}",
        ) from exc
    return sess.run(None, {sess.get_inputs()[0].name: clip.detach().cpu().numpy()})[0]


def compile_qnn_context(
    onnx_path: str | os.PathLike,
    context_path: str | os.PathLike,
    *,
    soc_model: str | None = DEFAULT_SOC_MODEL,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
) -> Path:
    """Compile ``onnx_path`` for the HTP of ``soc_model`` into an EP-context ONNX file (the QNN
    context binary embedded): the phone loads it without recompiling."""
    import onnxruntime as ort

    so = _qnn_options(soc_model, htp_arch, str(context_path))
    try:
        ort.InferenceSession(str(onnx_path), sess_options=so)
    except Exception as exc:
        raise UnsupportedOpError(
            "qnn",
            f"QNN cannot compile {Path(onnx_path).name}: {str(exc).strip().splitlines()[0][:400]}",
        ) from exc
    if not Path(context_path).exists():
        raise RuntimeError(f"onnxruntime-qnn did not write the context model {context_path}")
    return Path(context_path)


# ------------------------------------------------------------------------------ NNAPI
def export_nnapi(
    model: nn.Module, example_clip: torch.Tensor, path: str | os.PathLike
) -> tuple[Path, float]:
    """Convert ``model`` for NNAPI through the Conv2d-only rewrite; returns the path of the
    lite-interpreter file and the rewrite's measured error on the host.

    The artifact takes the frames folded into the batch, ``[N * T, C, H, W]`` in NCHW (frame
    ``t`` of clip ``n`` at row ``n * T + t``). It runs on an Android device only.

    Raises:
        UnsupportedOpError: an op has no NNAPI equivalent (e.g. a gated DANCE model's top-k).
    """
    from torch.backends._nnapi.prepare import convert_model_to_nnapi

    flat = rewrite_conv3d_to_conv2d(model, example_clip, input_layout="folded", strict=True)
    x = fold_time(example_clip).contiguous()
    script = torch.jit.script(scriptable(capture(flat, x), mobile=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_model_to_nnapi(script, x)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        op = text.split("'")[1] if "Unsupported node kind" in text else "nnapi"
        raise UnsupportedOpError(op, f"NNAPI cannot represent the model: {text}") from exc
    converted._save_for_lite_interpreter(str(path))
    return Path(path), flat.rewrite_info.max_abs_error


# ------------------------------------------------------------------------------ ExecuTorch
def executorch_available() -> bool:
    """True if the optional ``executorch`` package (with its XNNPACK backend) imports."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (  # noqa: F401
            XnnpackPartitioner,
        )
        from executorch.runtime import Runtime  # noqa: F401
    except ImportError:
        return False
    return True


def export_executorch(
    model: nn.Module, example_clip: torch.Tensor, path: str | os.PathLike
) -> tuple[Path, float]:
    """Write an ExecuTorch ``.pte`` (XNNPACK) of the Conv2d-only rewrite of ``model``; returns
    the path and the rewrite's measured error. The ``.pte`` takes clips ``[N, C, T, H, W]``."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ImportError(
            "the snapdragon ExecuTorch path needs the optional package executorch "
            "(pip install executorch)"
        ) from exc
    flat = rewrite_conv3d_to_conv2d(model, example_clip, input_layout="clip")
    ep = capture(flat, example_clip)
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = to_edge_transform_and_lower(
                ep, partitioner=[XnnpackPartitioner()]
            ).to_executorch()
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOpError(
            "executorch", f"ExecuTorch cannot lower the model: {text}"
        ) from exc
    Path(path).write_bytes(program.buffer)
    return Path(path), flat.rewrite_info.max_abs_error


def run_executorch(path: str | os.PathLike, clip: torch.Tensor) -> torch.Tensor:
    """Run a ``.pte`` in the ExecuTorch Python runtime (portable + XNNPACK kernels)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return method.execute([clip.contiguous()])[0]
