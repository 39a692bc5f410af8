"""ONNX export (``torch.onnx.export(..., dynamo=True)``, static shapes), onnxruntime parity, the
per-target operator check, and the TensorRT build script for Jetson.

Example:
    >>> import torch, torch.nn as nn, tempfile, os
    >>> net = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU()).eval()
    >>> clip = torch.randn(1, 3, 4, 8, 8)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> _ = export_onnx(net, clip, path, opset=18)
    >>> sorted(onnx_op_types(path))
    ['Conv', 'Relu']
    >>> run_onnxruntime(path, clip).shape
    (1, 4, 2, 6, 6)
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightning_dance.export.conv2d_rewrite import UnsupportedOpError

__all__ = [
    "DENIED_OPS",
    "MAX_OPSET",
    "check_ops",
    "export_onnx",
    "onnx_op_types",
    "quiet_session",
    "run_onnxruntime",
    "write_trtexec_script",
]

#: JetPack 6 ships TensorRT 10.3, whose ONNX parser reads opsets up to 20.
MAX_OPSET = 20

#: ONNX ops each target cannot run. ``qnn``: the Hexagon NPU needs static shapes and no control
#: flow (observed on the onnxruntime-qnn HTP simulator: it rejects NonZero and If).
DENIED_OPS: dict[str, frozenset[str]] = {
    "qnn": frozenset({"NonZero", "If", "Loop", "Scan", "Unique", "Compress", "SequenceConstruct"}),
    "tensorrt": frozenset({"SequenceConstruct", "SequenceAt", "ConcatFromSequence"}),
    "onnxruntime": frozenset(),
}


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    example_clip: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    input_name: str = "clip",
    output_name: str = "logits",
) -> Path:
    """Write ``model`` as a self-contained ONNX file with the static shape of ``example_clip``.

    Uses the dynamo exporter (``torch.export`` underneath). ``opset`` must be <= 20
    (:data:`MAX_OPSET`, TensorRT 10.3 on JetPack 6).
    """
    if not isinstance(opset, int) or not 7 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [7, {MAX_OPSET}] (TensorRT 10.3), got {opset!r}")
    path = Path(path)
    if isinstance(model, nn.Module):
        model.eval()
    quiet = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example_clip,),
                dynamo=True,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                external_data=False,
                optimize=True,
            )
        program.save(str(path))
        _standalone_batchnorm_to_affine(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOpError("onnx", f"the ONNX exporter failed: {first}") from exc
    return path


def _standalone_batchnorm_to_affine(path: Path) -> None:
    """Rewrite, in place, every inference ``BatchNormalization`` the exporter did not fuse into
    a ``Conv`` as ``x * scale + shift`` (constants): a DANCE model reads the stem conv's output
    before its BatchNorm, so that BatchNorm stays standalone, and the Hexagon NPU (QNN HTP)
    cannot run a standalone 5D BatchNormalization. Exact up to float rounding."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred}
    changed = False
    for node in list(graph.node):
        if node.op_type != "BatchNormalization" or len(node.output) != 1:
            continue
        if not all(name in inits for name in node.input[1:5]):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]) for n in node.input[1:5])
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        rank = ranks.get(node.input[0], 5)
        bshape = (-1,) + (1,) * (rank - 2)  # [C, 1, ...]: broadcasts against [N, C, ...]
        s_name, b_name, mid = (f"{node.name}_{x}" for x in ("scale", "shift", "scaled"))
        graph.initializer.extend(
            [
                numpy_helper.from_array(scale.reshape(bshape).astype(gamma.dtype), s_name),
                numpy_helper.from_array(shift.reshape(bshape).astype(gamma.dtype), b_name),
            ]
        )
        index = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("Mul", [node.input[0], s_name], [mid]))
        graph.node.insert(index + 1, helper.make_node("Add", [mid, b_name], [node.output[0]]))
        changed = True
    if changed:  # drop the BatchNorm constants no node reads any more
        used = {i for n in graph.node for i in n.input}
        for init in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(init)
        onnx.save(model, str(path))


def onnx_op_types(path: str | os.PathLike) -> Counter:
    """How often each ONNX op type occurs in the model (subgraphs and functions included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Counter = Counter()

    def visit(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    for fn in model.functions:
        for node in fn.node:
            counts[node.op_type] += 1
    return counts


def check_ops(ops: Iterable[str], runtime: str, *, where: str = "") -> None:
    """Raise :class:`UnsupportedOpError` naming the first op ``runtime`` cannot run."""
    denied = DENIED_OPS.get(runtime)
    if denied is None:
        raise ValueError(f"unknown runtime {runtime!r}; known: {sorted(DENIED_OPS)}")
    bad = sorted(set(ops) & denied)
    if bad:
        raise UnsupportedOpError(
            bad[0],
            f"{runtime} cannot run ONNX op(s) {bad}{where}: it needs static shapes and no "
            "control flow (export mode='topk' or 'masked' instead of data-dependent gathers)",
        )


def quiet_session(
    path: str | os.PathLike, threads: int | None = None, providers: list[Any] | None = None
) -> Any:
    """An onnxruntime ``InferenceSession`` for timing next to other code: ``threads`` intra-op
    threads (default: torch's), one inter-op thread, and the pool's spinning off. An idle
    onnxruntime pool spins by default (``session.intra_op.allow_spinning``) and steals the CPU
    from whatever runs next, so an interleaved benchmark would slow the variant after it.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> net = torch.nn.Conv3d(3, 4, 1)
        >>> path = export_onnx(net, torch.zeros(1, 3, 2, 4, 4), Path(tempfile.mkdtemp()) / "c.onnx")
        >>> sess = quiet_session(path, threads=1)
        >>> sess.run(None, {sess.get_inputs()[0].name: torch.zeros(1, 3, 2, 4, 4).numpy()})[0].shape
        (1, 4, 2, 4, 4)
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=providers if providers is not None else ["CPUExecutionProvider"],
    )


def run_onnxruntime(
    path: str | os.PathLike,
    clip: torch.Tensor,
    *,
    session_options: Any = None,
    providers: list[Any] | None = None,
) -> np.ndarray:
    """Run the ONNX model on ``clip`` with onnxruntime (CPU by default); the first output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(path),
        sess_options=session_options,
        providers=providers if providers is not None else ["CPUExecutionProvider"],
    )
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: clip.detach().cpu().numpy()})[0]


def write_trtexec_script(
    folder: str | os.PathLike,
    onnx_name: str,
    input_name: str,
    shape: tuple[int, ...],
    *,
    fp16: bool = True,
) -> Path:
    """Write ``build_engine.sh``: builds a TensorRT engine from the ONNX file on the Jetson.

    Engines are specific to the GPU and TensorRT version, so they are built on the device
    (``trtexec`` ships with JetPack at ``/usr/src/tensorrt/bin/trtexec``).
    """
    engine = Path(onnx_name).with_suffix(".engine").name
    dims = "x".join(str(int(s)) for s in shape)
    flags = " --fp16" if fp16 else ""
    text = f"""#!/usr/bin/env bash
# Build a TensorRT engine from {onnx_name} on the Jetson itself (engines are specific to the
# device's GPU and TensorRT version). JetPack 6 ships TensorRT 10.3 (ONNX opset <= 20).
# Usage: bash build_engine.sh [extra trtexec flags, e.g. --int8 --calib=...]
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
"$TRTEXEC" --onnx={shlex.quote(onnx_name)} --saveEngine={shlex.quote(engine)} \\
  --shapes={shlex.quote(input_name)}:{dims}{flags} "$@"
# Then time it on the device:  "$TRTEXEC" --loadEngine={engine} --iterations=100
"""
    path = Path(folder) / "build_engine.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path
