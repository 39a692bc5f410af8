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
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

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


def _require_qnn() -> None:
    if not qnn_available():
        raise ImportError(
            "the snapdragon QNN path needs the optional package onnxruntime-qnn "
            "(pip install onnxruntime-qnn)"
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _qnn_session(action: str, onnx_path: Path, soc: str, arch: str, out: Path, *extra: str):
    """Run :mod:`~lightning_dance.export._qnn_worker` in a child process; raise
    :class:`UnsupportedOpError` naming the unsupported nodes if it fails or crashes."""
    _require_qnn()
    worker = Path(__file__).with_name("_qnn_worker.py")
    cmd = [sys.executable, str(worker), action, str(onnx_path), soc or "", arch or "", str(out)]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    if proc.returncode == 0:
        return
    log = _ANSI.sub("", proc.stderr)
    types = set(re.findall(r"type: (\w+) \}", log))
    if not types and "All nodes placed on [CPUExecutionProvider]" in log:
        from lightning_dance.export.onnx import onnx_op_types

        types = set(onnx_op_types(onnx_path))  # the QNN EP took no node at all
    types = sorted(types)
    errors = re.findall(r"QNN-ERROR: (.*)", log)
    why = errors[0][:300] if errors else (log.strip().splitlines() or ["no message"])[-1][:300]
    if proc.returncode < 0:
        why = f"the QNN backend crashed (signal {-proc.returncode})"
    op = types[0] if types else "qnn"
    listed = f"; ops the HTP does not run: {types}" if types else ""
    raise UnsupportedOpError(
        op, f"the QNN HTP backend cannot {action} {onnx_path.name}: {why}{listed}"
    )


def run_qnn_htp(
    onnx_path: str | os.PathLike,
    clip: torch.Tensor,
    *,
    soc_model: str | None = DEFAULT_SOC_MODEL,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
) -> np.ndarray:
    """Run an ONNX model (or a QNN EP-context ONNX) on the HTP backend, CPU fallback disabled.

    The session runs in a child process: onnxruntime-qnn can crash on a graph it cannot
    compile, and that must not take the caller (e.g. a training run) with it.
    """
    onnx_path = Path(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        x, y = Path(tmp) / "clip.npy", Path(tmp) / "out.npy"
        np.save(x, clip.detach().cpu().float().numpy())
        _qnn_session("run", onnx_path, soc_model, htp_arch, y, str(x))
        return np.load(y)


def compile_qnn_context(
    onnx_path: str | os.PathLike,
    context_path: str | os.PathLike,
    *,
    soc_model: str | None = DEFAULT_SOC_MODEL,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
) -> Path:
    """Compile ``onnx_path`` for the HTP of ``soc_model`` into an EP-context ONNX file (the QNN
    context binary embedded): the phone loads it without recompiling. Runs in a child process
    (see :func:`run_qnn_htp`)."""
    onnx_path, context_path = Path(onnx_path), Path(context_path)
    _qnn_session("compile", onnx_path, soc_model, htp_arch, context_path)
    if not context_path.exists():
        raise RuntimeError(f"onnxruntime-qnn did not write the context model {context_path}")
    return context_path


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
