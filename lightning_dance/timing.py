"""Side-by-side latency: interleaved runs, medians, and the machine they ran on.

Every speed figure the project reports (benchmarks, the demo, the Pareto harness) is a ratio of
medians measured here: the variants run round robin in one process after a warm-up, so a drift
in machine load hits every variant alike, and :func:`machine` records what the figure depends
on (CPU model, its vector extensions, threads, load average).

The baseline of every speedup is the dense model in its fastest form. In eager PyTorch that is
:func:`dense_fast`: the same weights with every Conv3d through oneDNN on ``channels_last_3d``
(:func:`~lightning_dance.execution.accelerate_dense`), so a kernel gain is never credited to
pruning. Compiled (:func:`~lightning_dance.compiled.compile_for_inference`), dense runs about
1.4x faster still on R(2+1)D; the benchmarks time that form too and divide by the fastest.

Example:
    >>> import torch
    >>> from lightning_dance.models import create_model
    >>> net = create_model("tiny_c3d", num_classes=4).eval()
    >>> clip = torch.randn(1, 3, 4, 16, 16)
    >>> times = interleaved({"plain": lambda: net(clip), "fast": dense_fast(net, clip)},
    ...                     warmup=1, repeats=3)
    >>> sorted(times), len(times["fast"].samples_ms)
    (['fast', 'plain'], 3)
    >>> times["plain"].median_ms > 0
    True
    >>> {'cpu', 'threads', 'loadavg'} <= set(machine())
    True
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_dance import kernel_cache

__all__ = ["Timing", "cpu_model", "dense_fast", "interleaved", "loadavg", "machine"]


@dataclass(frozen=True)
class Timing:
    """Latency samples of one variant, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p90_ms(self) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]

    def speedup_over(self, base: Timing) -> float:
        """``base.median / self.median``: above 1 when this variant is faster."""
        return base.median_ms / self.median_ms


def interleaved(
    runs: Mapping[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 11
) -> dict[str, Timing]:
    """Time every callable round robin (``warmup`` untimed rounds first), under ``no_grad``."""
    if not runs:
        raise ValueError("interleaved() needs at least one variant to time")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(warmup):
            for run in runs.values():
                run()
        for _ in range(repeats):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def dense_fast(
    model: nn.Module, clip: torch.Tensor, *, fold_norms: bool = True
) -> Callable[[], torch.Tensor]:
    """A callable running ``model`` in its fastest dense form on ``clip`` (the speed baseline).

    The model should be in eval mode; its weights are not changed (only the layout of the
    activations, the Conv3d kernels used and, with ``fold_norms``, eval BatchNorms computed by
    the conv before them, as :class:`~lightning_dance.execution.CompactPruner` does by default).
    """
    from lightning_dance.execution import accelerate_dense, to_fast_layout

    clip_fast = to_fast_layout(clip)

    def run() -> torch.Tensor:
        with accelerate_dense(model, fold_norms=fold_norms):
            return model(clip_fast)

    return run


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``"n/a"`` where the OS does not say)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if info:
                break  # the first processor is enough
            continue
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What a timing depends on: CPU model and vector extensions, torch threads, load, versions."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {
        "cpu": cpu_model(),
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": loadavg(),
        "torch": torch.__version__,
        "onednn_cache": kernel_cache.capacity(),
    }
