"""Soak: many clips of random sizes through the masked and the compact path; resident memory.

A DANCE pruner (``tiny_c3d`` by default, all three dims, untrained controller with its logits
spread so that masks vary per clip) runs ``--clips`` clips of random batch size, length and
resolution, alternately on the masked path (``AdaptivePruner`` in eval mode; every
``--grad-every``-th call in train mode with a backward pass, whose graph ``last_stats`` holds
until the next call) and on the compact path (``CompactPruner``). Every clip shape is run once
during the warm-up (per-shape MAC counts, plans and kernel caches fill there); the resident set
size (``VmRSS`` from ``/proc/self/status``, Linux, after ``gc`` and glibc ``malloc_trim``) is
read after the warm-up and every ``--report-every`` clips. A leak shows as steady growth; the
test (``tests/test_soak.py``) runs a short version and asserts the growth stays under 20 MB.

The warm-up is long (``--warmup`` random clips after one pass over every shape) because the
compact path's memory grows while it meets new mask patterns, and so new conv shapes: native
per-shape caches fill (about half of it is oneDNN's primitive cache: the growth halves with
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``; the package's Python-side caches stay under 100 kB).
Measured on tiny_c3d, threshold policy, compact path only, 2-core x86 CPU: +42 MB over the
first 1000 clips after the shape pass, then +5 MB over the next 3000 (+1 MB over the last
1000), i.e. bounded; the masked path (eval or train with backward) stays within 0.3 MB.

    .venv/bin/python benchmarks/soak.py                  # 3000 clips (a few minutes on 2 cores)
    .venv/bin/python benchmarks/soak.py --clips 300      # what the test runs
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_dance.aap import AdaptivePruner
from lightning_dance.execution import CompactPruner
from lightning_dance.models import create_model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny_c3d")
    p.add_argument("--policy", default="threshold", choices=("threshold", "topk"))
    p.add_argument("--clips", type=int, default=3000, help="clips after the warm-up")
    p.add_argument(
        "--warmup", type=int, default=1000,
        help="random clips after the pass over every shape, before the baseline is read",
    )  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frames", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32])
    p.add_argument("--grad-every", type=int, default=10, help="0: never a training step")
    p.add_argument(
        "--paths", nargs="+", default=["masked", "compact"], choices=("masked", "compact"),
        help="the inference paths to alternate between",
    )  # fmt: skip
    p.add_argument("--report-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p.parse_args(argv)


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that RSS counts live memory rather than what the allocator keeps for reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes free heap pages
        pass


def rss_mb() -> float:
    """Resident set size of this process in MB (``VmRSS``, Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError as err:
        raise RuntimeError("the soak reads VmRSS from /proc/self/status: Linux only") from err
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS line in /proc/self/status")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    net = create_model(args.model, num_classes=4)
    pruner = AdaptivePruner(net, policy=args.policy, budget=0.5)
    with torch.no_grad():
        for p in pruner.controller.parameters():  # spread the logits: masks vary per clip
            p.normal_(0, 0.5)
    fast = CompactPruner(pruner.eval())
    shapes = list(itertools.product(args.batches, args.frames, args.sizes))
    paths = [{"masked": pruner, "compact": fast}[p] for p in args.paths]

    def step(i: int, shape: tuple[int, int, int]) -> None:
        n, t, s = shape
        clip = torch.randn(n, 3, t, s, s)
        if args.grad_every and i % args.grad_every == 0:
            pruner.train()
            pruner(clip).sum().backward()
            pruner.zero_grad(set_to_none=True)
            pruner.eval()
            return
        with torch.no_grad():
            paths[i % len(paths)](clip)

    start = time.perf_counter()
    for i, shape in enumerate(shapes * 4):  # every shape on both paths, with and without grad
        step(i, shape)
    for i in range(args.warmup):
        step(i, rng.choice(shapes))
    _trim()
    base = rss_mb()
    trace = [(0, base)]
    for i in range(1, args.clips + 1):
        step(i, rng.choice(shapes))
        if i % args.report_every == 0 or i == args.clips:
            _trim()
            trace.append((i, rss_mb()))
            print(f"{i:6d} clips  RSS {trace[-1][1]:8.1f} MB  (+{trace[-1][1] - base:6.1f} MB)")
    growth = trace[-1][1] - base
    result = {
        "model": args.model,
        "policy": args.policy,
        "clips": args.clips,
        "shapes": len(shapes),
        "rss_after_warmup_mb": round(base, 1),
        "growth_mb": round(growth, 2),
        "trace": [(i, round(m, 1)) for i, m in trace],
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"growth after warm-up: {growth:+.1f} MB over {args.clips} clips")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run(parse_args())
