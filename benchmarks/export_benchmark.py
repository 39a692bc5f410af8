"""Do DANCE's savings survive export? Batch-1 latency of the exported ONNX models in onnxruntime.

For each model (random init, as in ``latency_benchmark.py``) and budget, an untrained
controller calibrated to the budget (``policy="topk"`` for ``topk``/``masked``, a second one
with ``policy="threshold"`` for ``threshold``), exported with
:func:`lightning_dance.export.onnx.export_onnx` from
:func:`lightning_dance.export.modes.build_export_module`:

- ``dense``: the plain model (the baseline of every speedup);
- ``masked``: controller + masks multiplied in (static shapes, runs on every target);
- ``topk``: kept channels and frames gathered to fixed counts (static shapes: the NPU path),
  and along channel chains the producer computes only the channels the next conv keeps
  (``topk inputs-only``: the same without that, ``skip_outputs=False``);
- ``threshold``: the gates' kept entries gathered (``NonZero``: dynamic shapes).

All sessions run interleaved in one process (onnxruntime CPU, ``--threads`` intra-op threads,
graph optimizations on), medians and p90 over ``--repeats``. ``MAC ratio`` = what the exported
graph computes / dense (controller included; :class:`~lightning_dance.export.modes.ExportPlan`),
``real/ideal`` = speedup x MAC ratio. Each exported model is checked against eager on the clip.

Usage::

    .venv/bin/python benchmarks/export_benchmark.py                 # full run (~10 min)
    .venv/bin/python benchmarks/export_benchmark.py --smoke         # seconds

Writes ``benchmarks/results/export_latency.json`` (``--out``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_benchmark import MODELS, build, calibrated_pruner, loadavg, p90  # noqa: E402

from lightning_dance.export.modes import build_export_module  # noqa: E402
from lightning_dance.export.onnx import export_onnx, quiet_session  # noqa: E402


def session(path: Path, threads: int):
    # spinning off: an idle spinning pool would slow the variant timed after it
    return quiet_session(path, threads)


def bench_model(name: str, args, folder: Path) -> dict:
    _, clip_shape = MODELS[name]
    model, clip = build(name, clip_shape)
    model = model.to(memory_format=torch.contiguous_format)
    feed = {"clip": clip.numpy()}
    variants: dict[str, tuple[object, float, float]] = {}  # name -> (session, MAC ratio, err)

    def add(label: str, module: torch.nn.Module, ratio: float, ref: torch.Tensor) -> None:
        path = export_onnx(module, clip, folder / f"{name}-{label}.onnx")
        sess = session(path, args.threads)
        got = sess.run(None, feed)[0]
        err = float(np.abs(got - ref.numpy()).max() / (ref.abs().max().item() + 1e-12))
        variants[label] = (sess, ratio, err)

    with torch.no_grad():
        add("dense", model, 1.0, model(clip))
        for budget in args.budgets:
            for policy, modes in (("topk", ("masked", "topk")), ("threshold", ("threshold",))):
                args.policy = policy
                pruner = calibrated_pruner(model, tuple(args.dims), budget, clip, args)
                ref = pruner(clip)
                for mode in modes:
                    if mode not in args.modes:
                        continue
                    module, plan = build_export_module(pruner, mode, clip, skip_outputs=True)
                    add(f"{mode} {budget:g}", module, plan.executed_macs / plan.dense_macs, ref)
                    if mode == "topk" and "channel" in args.dims:
                        module, plan = build_export_module(pruner, mode, clip, skip_outputs=False)
                        add(f"{mode} inputs-only {budget:g}", module,
                            plan.executed_macs / plan.dense_macs, ref)  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.repeats):
        for label, (sess, _, _) in variants.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            if i >= args.warmup:
                times[label].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for label, (_, ratio, err) in variants.items():
        speed = med["dense"] / med[label]
        rows.append({
            "variant": label, "mac_ratio": round(ratio, 4), "median_ms": round(med[label], 2),
            "p90_ms": round(p90(times[label]), 2), "speedup": round(speed, 3),
            "realized_over_ideal": round(speed * ratio, 3), "max_rel_error": err,
        })  # fmt: skip
    return {"model": name, "clip": list(clip.shape), "loadavg": loadavg(), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--dims", nargs="+", default=["channel", "frame"])
    p.add_argument("--modes", nargs="+", default=["masked", "topk", "threshold"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-clips", type=int, default=2)
    p.add_argument("--calib-iters", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny_c3d, one budget, 2 repeats")
    p.add_argument("--out", default="benchmarks/results/export_latency.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.budgets, args.repeats, args.warmup = ["tiny_c3d"], [0.5], 2, 1
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "dims": args.dims, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            res = bench_model(name, args, Path(tmp))
            results["models"].append(res)
            print(f"\n{name} {res['clip']} (load {res['loadavg']}), onnxruntime CPU")
            print(f"{'variant':<24}{'MAC ratio':>10}{'median ms':>11}{'p90 ms':>9}"
                  f"{'speedup':>9}{'real/ideal':>11}{'rel err':>10}")  # fmt: skip
            for r in res["rows"]:
                print(f"{r['variant']:<24}{r['mac_ratio']:>10.3f}{r['median_ms']:>11.2f}"
                      f"{r['p90_ms']:>9.2f}{r['speedup']:>9.2f}{r['realized_over_ideal']:>11.2f}"
                      f"{r['max_rel_error']:>10.1e}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
