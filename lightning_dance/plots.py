"""PNG pictures of DANCE results (matplotlib): accuracy vs cost, kept fractions, masks, latency.

Every function takes plain data (numbers, mappings, numpy arrays or tensors), draws one figure
and writes it as a PNG; it returns the path. Figures are made with :class:`matplotlib.figure.Figure`
and its Agg canvas, never through ``pyplot``: no window opens, no global figure state is touched
(safe in scripts, tests, notebooks and worker processes).

- :func:`accuracy_vs_cost`: one line per method, accuracy with error bars against a cost
  (executed MACs, latency, ...): the Pareto picture of the demo and the benchmarks;
- :func:`kept_heatmap`: per instrumented layer, the mean kept fraction of each pruned dim;
- :func:`clip_overlays`: a few clips, frame by frame, with the dropped frames and spatial blocks
  shaded;
- :func:`latency_bars`: median latencies (p90 whiskers) and speedups over a baseline.

Example:
    >>> import tempfile, matplotlib.image
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp())
    >>> p = accuracy_vs_cost({"dense": [(1.0, 0.80, 0.02)],
    ...                       "DANCE": [(0.3, 0.70, 0.02), (0.5, 0.78, 0.02)]},
    ...                      "executed / dense MACs", out / "acc.png")
    >>> matplotlib.image.imread(p).ndim     # a decodable RGBA image
    3
    >>> p = kept_heatmap({"conv2": {"frame": 0.7, "channel": 0.6}, "conv3": {"frame": 0.9}},
    ...                  out / "kept.png")
    >>> p = latency_bars({"dense fast": (10.0, 11.0), "DANCE": (6.0, 7.0)}, out / "lat.png",
    ...                  baseline="dense fast")
    >>> sorted(f.name for f in out.iterdir())
    ['acc.png', 'kept.png', 'lat.png']
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["accuracy_vs_cost", "clip_overlays", "kept_heatmap", "latency_bars", "to_grid"]

DIMS = ("frame", "channel", "feature")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the pictures are PNG files: give a path ending in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def accuracy_vs_cost(
    series: Mapping[str, Sequence[tuple[float, float, float]]],
    xlabel: str,
    path: str | Path,
    *,
    ylabel: str = "top-1 accuracy",
    title: str | None = None,
    chance: float | None = None,
    logx: bool = False,
) -> Path:
    """Accuracy against a cost, one line (points sorted by cost) per method, with error bars.

    Args:
        series: ``{method: [(cost, accuracy_mean, accuracy_std), ...]}``; a method with one
            point is drawn as a marker (e.g. the dense model at cost 1.0). Use ``std=0`` where
            there is no spread to show (one seed: the binomial standard error
            ``sqrt(p * (1 - p) / n)`` over ``n`` test clips is a fair bar).
        xlabel: what the cost is (``"executed / dense MACs"``, ``"latency (ms)"``, ...).
        path: the ``.png`` file to write (its folder is created).
        ylabel, title: axis label and title.
        chance: draw a dotted line at the chance accuracy.
        logx: logarithmic cost axis.

    Returns the path. Raises ``ValueError`` for an empty ``series`` or a malformed point.
    """
    if not series:
        raise ValueError("accuracy_vs_cost needs at least one method in series")
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    for name, points in series.items():
        pts = [tuple(float(v) for v in p) for p in points]
        if not pts or any(len(p) != 3 for p in pts):
            raise ValueError(
                f"series[{name!r}] must be a non-empty list of (cost, accuracy_mean, "
                f"accuracy_std) triples, got {points!r}"
            )
        pts.sort()
        x, y, e = (np.array(v) for v in zip(*pts, strict=True))
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name,
                    linestyle="-" if len(pts) > 1 else "none")  # fmt: skip
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def kept_heatmap(
    kept: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    dims: Sequence[str] = DIMS,
    title: str = "mean kept fraction of each layer's input",
) -> Path:
    """Heatmap of kept fractions: one row per layer, one column per dim (``frame``, ``channel``,
    ``feature``), each cell annotated; a dim a layer does not prune is left blank.

    ``kept`` is ``{layer: {dim: fraction in [0, 1]}}``, e.g. the ``kept`` entries of
    :meth:`~lightning_dance.report.MacReport.to_dict`'s layers, or
    :meth:`~lightning_dance.stats.PruningStats.kept_fractions`.
    """
    if not kept:
        raise ValueError("kept_heatmap needs at least one layer")
    layers = list(kept)
    grid = np.full((len(layers), len(dims)), np.nan)
    for i, name in enumerate(layers):
        for j, dim in enumerate(dims):
            if dim in kept[name]:
                grid[i, j] = float(kept[name][dim])
    fig = _figure(1.6 + 1.3 * len(dims), 1.2 + 0.45 * len(layers))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis",
                      aspect="auto")  # fmt: skip
    for i in range(len(layers)):
        for j in range(len(dims)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="white" if grid[i, j] < 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(dims)), list(dims))
    ax.set_yticks(range(len(layers)), layers)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="kept fraction")
    return _save(fig, path)


def to_grid(mask: Any, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a mask ``[..., a, b, ...]`` onto ``size`` (the last
    ``len(size)`` axes): maps a layer's input mask to the input clip's frames or pixels.

    >>> to_grid(np.array([1, 0]), (4,)).tolist()
    [1, 1, 0, 0]
    """
    m = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    for k, n in enumerate(size):
        axis = m.ndim - len(size) + k
        idx = (np.arange(n) * m.shape[axis]) // n
        m = np.take(m, idx, axis=axis)
    return m


def clip_overlays(
    clips: Any,
    path: str | Path,
    *,
    frame_masks: Any = None,
    feature_masks: Any = None,
    titles: Sequence[str] | None = None,
    caption: str | None = None,
    max_frames: int = 8,
) -> Path:
    """A few clips frame by frame (one row per clip), with what DANCE dropped shaded.

    Args:
        clips: ``[K, C, T, H, W]`` (tensor or array); shown as the mean over channels, each
            clip scaled to its own range.
        frame_masks: ``[K, T']`` 0/1 (kept = 1) or None; resampled to the clip's ``T`` frames
            (:func:`to_grid`): a dropped frame is drawn dimmed with a red border.
        feature_masks: ``[K, H', W']`` or ``[K, T', H', W']`` 0/1 or None; resampled to the
            clip's pixels: dropped spatial blocks are tinted red.
        titles: one per clip (e.g. its label and prediction).
        caption: text under the figure (say which layer's masks are shown).
        max_frames: at most this many frames per clip (evenly spaced).
    """
    x = np.asarray(clips.detach().cpu() if hasattr(clips, "detach") else clips, dtype=np.float32)
    if x.ndim != 5:
        raise ValueError(f"clips must be [K, C, T, H, W], got shape {x.shape}")
    k, _, t, h, w = x.shape
    frames = to_grid(frame_masks, (t,)) if frame_masks is not None else np.ones((k, t))
    if feature_masks is None:
        feats = np.ones((k, t, h, w))
    else:
        f = np.asarray(feature_masks.detach().cpu() if hasattr(feature_masks, "detach")
                       else feature_masks)  # fmt: skip
        feats = to_grid(f, (t, h, w)) if f.ndim == 4 else to_grid(f, (h, w))[:, None]
        feats = np.broadcast_to(feats, (k, t, h, w))
    shown = sorted({int(round(i)) for i in np.linspace(0, t - 1, min(t, max_frames))})
    lines = 1 + len(caption or "") // int(1.3 * len(shown) * 17) if caption else 0
    fig = _figure(1.3 * len(shown) + 0.4, 1.45 * k + 0.2 + 0.18 * lines)
    axes = fig.subplots(k, len(shown), squeeze=False)
    for i in range(k):
        gray = x[i].mean(0)
        gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
        for j, tt in enumerate(shown):
            ax = axes[i, j]
            rgb = np.repeat(gray[tt][..., None], 3, axis=-1)
            dropped = feats[i, tt] < 0.5
            rgb[dropped] = 0.55 * rgb[dropped] + 0.45 * np.array([1.0, 0.1, 0.1])
            kept_frame = frames[i, tt] >= 0.5
            ax.imshow(rgb if kept_frame else 0.3 * rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("tab:green" if kept_frame else "red")
                spine.set_linewidth(1.5 if kept_frame else 3)
            if i == 0:
                ax.set_title(f"t={tt}", fontsize=8)
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    if caption:
        width = int(1.3 * len(shown) * 17)  # characters per line at fontsize 8
        fig.supxlabel(textwrap.fill(caption, width), fontsize=8)
    return _save(fig, path)


def latency_bars(
    timings: Mapping[str, tuple[float, float]],
    path: str | Path,
    *,
    baseline: str | None = None,
    title: str = "batch-1 latency (median, whisker: p90)",
    note: str | None = None,
) -> Path:
    """Horizontal bars of median latency (ms) with a whisker to the p90, one per variant.

    ``timings`` is ``{variant: (median_ms, p90_ms)}`` (e.g. from
    :func:`lightning_dance.timing.interleaved`: ``(t.median_ms, t.p90_ms)``); with ``baseline``
    each bar is labelled with its speedup ``median(baseline) / median(variant)``; ``note`` is
    a line under the axis (e.g. the threads and the load average of the machine).
    """
    if not timings:
        raise ValueError("latency_bars needs at least one variant")
    if baseline is not None and baseline not in timings:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(timings)}")
    names = list(timings)
    med = np.array([float(timings[n][0]) for n in names])
    p90 = np.array([float(timings[n][1]) for n in names])
    fig = _figure(6.0, 1.0 + 0.5 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, med, xerr=[np.zeros_like(med), np.maximum(p90 - med, 0)], capsize=3,
            color=["tab:grey" if n == baseline else "tab:blue" for n in names])  # fmt: skip
    for yi, (m, top) in enumerate(zip(med, p90, strict=True)):
        label = f" {m:.1f} ms"
        if baseline is not None:
            label += f"  ({float(timings[baseline][0]) / m:.2f}x)"
        ax.text(max(m, top), yi, label, va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per clip" + (f"\n{note}" if note else ""))
    ax.set_xlim(0, float(max(p90.max(), med.max())) * 1.6)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
