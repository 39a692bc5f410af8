"""Cross-check the byte counter (:mod:`lightning_dance.bytes`) against independent instruments.

On ``tiny_c3d`` (clip 1x3x8x32x32, one thread, a ``topk`` channel pruner at budget 0.35 with
a seeded random controller), for the dense fast path and the compact path:

1. the byte counter: bytes read + written by the executed aten ops;
2. the torch profiler (``profile_memory=True``): bytes the ops allocate, i.e. the outputs
   they write (in-place ops and views allocate nothing), against the counter's bytes written
   to freshly allocated outputs;
3. with ``--cachegrind``: valgrind's cache simulator (cachegrind's, run as
   ``--tool=callgrind --cache-sim=yes`` so that instrumentation can be switched on for just
   the measured forward with ``callgrind_control``; imports and warm-up run uninstrumented)
   with a 32 KB L1d and a 2 MB last-level cache (Jetson Nano's L2): data references, D1 misses
   and LL misses (x 64 B lines) of one forward of each path. Slow: minutes.

The dense/compact *ratios* are what should agree (the instruments count different things:
bytes per op vs cache lines vs accesses). Results: printed, and written as JSON to ``--json``.

Example:
    $ python benchmarks/traffic_crosscheck.py                  # counter + profiler, seconds
    $ python benchmarks/traffic_crosscheck.py --cachegrind --json runs/crosscheck.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
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


def _control(*args: str) -> None:
    """``callgrind_control ARGS <this pid>``; the process keeps running guest code (a spin)
    while it waits, so that valgrind sees the command."""
    proc = subprocess.Popen(["callgrind_control", *args, str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None:
        pass


def child() -> None:
    """Under callgrind (instrumentation off at start): warm up both paths, then one forward of
    each with the cache simulation on, each dumped as its own file."""
    model, compact, clip = build()
    run = runners(model, compact, clip)
    with torch.no_grad():
        run["dense"](), run["compact"]()
        for path in ("dense", "compact"):
            _control("-z")
            _control("-i", "on")
            run[path]()
            _control("-i", "off")
            _control("-d", path)


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


def cache_simulation() -> dict[str, dict[str, int]]:
    """Run :func:`child` under valgrind's cache simulator; events of each path's forward."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
               f"--callgrind-out-file={tmp}/cg.out", *CACHES, sys.executable, __file__,
               "--child"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"valgrind failed: {proc.stderr[-2000:]}")
        out = {}
        for dump in Path(tmp).glob("cg.out.*"):
            text = dump.read_text()
            trigger = re.search(r"^desc: Trigger: dump (\w+)", text, re.M)
            if trigger is None:
                continue
            names = re.search(r"^events: (.*)$", text, re.M).group(1).split()
            values = map(int, re.search(r"^totals: (.*)$", text, re.M).group(1).split())
            ev = dict(zip(names, values, strict=False))
            out[trigger.group(1)] = {
                "D_refs": ev["Dr"] + ev["Dw"],
                "D1_misses": ev["D1mr"] + ev["D1mw"],
                "LLd_misses": ev["DLmr"] + ev["DLmw"],
                "D1_miss_bytes": (ev["D1mr"] + ev["D1mw"]) * LINE,
                "LL_miss_bytes": (ev["DLmr"] + ev["DLmw"]) * LINE,
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cachegrind", action="store_true", help="also run cachegrind (minutes)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child()
        return
    results = counter_and_profiler()
    if args.cachegrind:
        t0 = time.time()
        for path, stats in cache_simulation().items():
            results[path]["cachegrind"] = stats
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
