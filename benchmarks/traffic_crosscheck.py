"""Cross-check the byte counter (:mod:`lightning_dance.bytes`) against independent instruments.

On ``tiny_c3d`` (clip 1x3x8x32x32, one thread, a ``topk`` channel pruner at budget 0.35 with
a seeded random controller), for the dense fast path and the compact path:

1. the byte counter: bytes read + written by the executed aten ops;
2. the torch profiler (``profile_memory=True``): bytes the ops allocate, i.e. the outputs
   they write (in-place ops and views allocate nothing), against the counter's bytes written
   to freshly allocated outputs;
3. with ``--cachegrind``: valgrind's cachegrind simulating a 32 KB L1d and a 2 MB last-level
   cache (Jetson Nano's L2): data references, D1 misses and LL misses (x 64 B lines) of one
   forward, from the difference between a run with that forward and one without (the same
   imports, model building and warm-up forwards). Slow: ~minutes per run (three runs).

The dense/compact *ratios* are what should agree (the instruments count different things:
bytes per op vs cache lines vs accesses). Results: printed, and written as JSON to ``--json``.

Example:
    $ python benchmarks/traffic_crosscheck.py                  # counter + profiler, seconds
    $ python benchmarks/traffic_crosscheck.py --cachegrind --json runs/crosscheck.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

LINE = 64  # bytes per cache line
CACHES = ("--D1=32768,8,64", "--LL=2097152,16,64", "--I1=32768,8,64")


def build():
    """The seeded model, a compact pruner and the clip (identical in every process)."""
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.execution import CompactPruner
    from lightning_dance.macs import quiet_fvcore

    with quiet_fvcore():
        from lightning_dance.models import create_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("tiny_c3d", num_classes=6).eval()
    pruner = AdaptivePruner(model, dims=("channel",), policy="topk", budget=0.35).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    clip = torch.randn(1, 3, 8, 32, 32, generator=gen)
    return model, CompactPruner(pruner), clip


def runners(model, compact, clip):
    from lightning_dance.execution import accelerate_dense, to_fast_layout

    def dense():
        with accelerate_dense(model):
            return model(to_fast_layout(clip))

    return {"dense": dense, "compact": lambda: compact(clip)}


def child(path: str) -> None:
    """One cachegrind run: warm up both paths, then one more forward of ``path`` (or none)."""
    model, compact, clip = build()
    run = runners(model, compact, clip)
    with torch.no_grad():
        run["dense"](), run["compact"]()
        if path != "none":
            run[path]()


def counter_and_profiler() -> dict:
    from torch.profiler import ProfilerActivity, profile

    from lightning_dance.bytes import measure_traffic

    model, compact, clip = build()
    out: dict = {}
    for path, target in (("dense", model), ("compact", compact)):
        m = measure_traffic(target, clip)
        fn = runners(model, compact, clip)[path]
        with torch.no_grad():
            fn()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages()
                        if e.self_cpu_memory_usage > 0)  # fmt: skip
        out[path] = {"counter_bytes": m.total, "counter_read": m.read,
                     "counter_written": m.written, "profiler_allocated": allocated}  # fmt: skip
    return out


def cachegrind(path: str) -> dict[str, int]:
    cmd = ["valgrind", "--tool=cachegrind", "--cachegrind-out-file=/dev/null", *CACHES,
           sys.executable, __file__, "--child", path]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cachegrind failed for {path}: {proc.stderr[-2000:]}")
    stats = {}
    for key, label in (("D_refs", "D   refs"), ("D1_misses", "D1  misses"),
                       ("LLd_misses", "LLd misses")):  # fmt: skip
        match = re.search(rf"{label}:\s+([\d,]+)", proc.stderr)
        stats[key] = int(match.group(1).replace(",", "")) if match else -1
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cachegrind", action="store_true", help="also run cachegrind (minutes)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--child", choices=("none", "dense", "compact"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    results = counter_and_profiler()
    if args.cachegrind:
        t0 = time.time()
        base = cachegrind("none")
        for path in ("dense", "compact"):
            stats = cachegrind(path)
            per = {k: stats[k] - base[k] for k in stats}
            per["D1_miss_bytes"] = per["D1_misses"] * LINE
            per["LL_miss_bytes"] = per["LLd_misses"] * LINE
            results[path]["cachegrind"] = per
        results["cachegrind_config"] = list(CACHES)
        results["cachegrind_seconds"] = time.time() - t0
    keys = ["counter_bytes", "counter_written", "profiler_allocated"]
    ratios = {k: results["dense"][k] / max(results["compact"][k], 1) for k in keys}
    if args.cachegrind:
        for k in ("D_refs", "D1_miss_bytes", "LL_miss_bytes"):
            d, c = results["dense"]["cachegrind"][k], results["compact"]["cachegrind"][k]
            ratios[f"cachegrind_{k}"] = d / max(c, 1)
    results["dense_over_compact"] = ratios
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
