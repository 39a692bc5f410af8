"""Device check: parity of the compact path and the exported ONNX, and batch-1 GPU timings.

Run by ``benchmarks/device_check.sh`` (see there). With CUDA (and not ``--cpu``):

- model: ``r2plus1d_18`` width 0.5, clip 1x3x8x112x112, a ``topk`` channel pruner at budget
  0.35 (seeded random controller, calibrated on the clip);
- parity on the GPU: :class:`~lightning_dance.execution.CompactPruner` vs the masked model
  (``pruner(clip)``); the ``topk`` ONNX export (:func:`~lightning_dance.export.modes.
  build_export_module` + :func:`~lightning_dance.export.onnx.export_onnx`) in onnxruntime (CUDA
  provider if installed, else the CPU provider, said so in the JSON) vs the masked model;
- batch-1 latency, interleaved, medians: dense (cuDNN), compact, exported topk (onnxruntime
  CUDA provider only; without it ``"onnx_cuda": "CUDAExecutionProvider not available"``);
- the static projection of the pruner made physical (:mod:`lightning_dance.materialize`): its
  parity on the device against the frozen pruner on the CPU, and its latency (``materialized``);
- measured traffic (:func:`lightning_dance.bytes.compare_traffic`) of dense vs compact.

Without CUDA (or with ``--cpu``): the CPU part only, tiny sizes (``tiny_c3d``, 1x3x8x32x32):
parity of the compact path, of the ONNX export (onnxruntime CPU) and of the materialized
projection, no timings: what
``tests/test_device_check.py`` runs in CI. Relative errors above ``--tol`` fail (exit 1).

Example:
    $ python benchmarks/device_check.py --cpu --json /tmp/device_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def rel_err(got: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got)
    ref = ref.detach().float().cpu()
    return float((got.float().cpu() - ref).abs().max() / (ref.abs().max() + 1e-12))


def build(gpu: bool):
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.macs import quiet_fvcore

    with quiet_fvcore():
        from lightning_dance.models import create_model

    torch.manual_seed(0)
    if gpu:
        model = create_model("r2plus1d_18", num_classes=6, width=0.5)
        clip = torch.randn(1, 3, 8, 112, 112)
    else:
        model = create_model("tiny_c3d", num_classes=6)
        clip = torch.randn(1, 3, 8, 32, 32)
    pruner = AdaptivePruner(model.eval(), dims=("channel",), policy="topk", budget=0.35).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        pruner.calibrate(clip, iters=8)
    return pruner, clip


def materialized(pruner, clip: torch.Tensor):
    """A copy of ``pruner`` frozen to the channels it keeps on ``clip`` (its static projection)
    made physical (:func:`~lightning_dance.materialize.materialize`), with its output on
    ``clip`` (the reference of the copy)."""
    import copy

    from lightning_dance.materialize import materialize
    from lightning_dance.priors import channel_frequencies, freeze_channels

    frozen = copy.deepcopy(pruner).cpu()
    freeze_channels(frozen, channel_frequencies(frozen, [clip]), standalone=True)
    return materialize(frozen, clip), frozen(clip)


def onnx_session(path: Path, want_cuda: bool):
    import onnxruntime as ort

    from lightning_dance.export.onnx import quiet_session

    available = ort.get_available_providers()
    if want_cuda and "CUDAExecutionProvider" in available:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    sess = quiet_session(path, providers=providers)
    return sess, sess.get_providers()[0], available


def median_ms(fns: dict, repeats: int, sync) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 3):
        for key, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 3:
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    from lightning_dance.bytes import compare_traffic
    from lightning_dance.execution import CompactPruner
    from lightning_dance.export.modes import build_export_module
    from lightning_dance.export.onnx import export_onnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the CPU part only, even with CUDA")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--tol", type=float, default=1e-3, help="max relative error allowed")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    pruner, clip = build(gpu)
    out: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu",
                 "torch": torch.__version__, "clip": list(clip.shape)}  # fmt: skip
    with torch.no_grad():
        ref = pruner(clip)  # the masked model on the CPU: the reference
        pruner.to(device)
        x = clip.to(device)
        compact = CompactPruner(pruner)
        out["compact_rel_err"] = rel_err(compact(x), ref)
        out["masked_on_device_rel_err"] = rel_err(pruner(x), ref)
        pruner.cpu()
        with tempfile.TemporaryDirectory() as tmp:
            module, plan = build_export_module(pruner, "topk", clip)
            path = export_onnx(module, clip, Path(tmp) / "topk.onnx")
            sess, provider, available = onnx_session(path, gpu)
            feed = {"clip": clip.numpy()}
            out["onnx_provider"] = provider
            out["onnx_rel_err"] = rel_err(sess.run(None, feed)[0], ref)
            out["onnx_mac_ratio"] = plan.executed_macs / plan.dense_macs
            small = materialized(pruner, clip)  # the static projection, made physical
            out["materialized_rel_err"] = rel_err(small[0].to(device)(x), small[1])
            if gpu:
                pruner.to(device)
                model = pruner.unwrap()
                fns = {"dense": lambda: model(x), "compact": lambda: compact(x),
                       "materialized": lambda: small[0](x)}  # fmt: skip
                if provider == "CUDAExecutionProvider":
                    fns["onnx_topk"] = lambda: sess.run(None, feed)
                else:
                    out["onnx_cuda"] = f"CUDAExecutionProvider not available ({available})"
                ms = median_ms(fns, args.repeats, torch.cuda.synchronize)
                out["median_ms"] = ms
                out["speedup_vs_dense"] = {k: round(ms["dense"] / v, 3) for k, v in ms.items()}
    traffic = compare_traffic(compact, x)
    out["traffic"] = {k: v for k, v in traffic.to_dict().items() if not k.endswith("by_kind")}
    errors = {k: v for k, v in out.items() if k.endswith("rel_err")}
    out["ok"] = all(v <= args.tol for v in errors.values())
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
