"""Kernel awareness: time the exact pruned shapes of each layer once, then pick per call the
fastest way to get the *same* result.

The compact plan of :func:`~lightning_dance.execution.compact.compact_conv3d` computes exactly
the counted multiply-adds, but fewer multiply-adds are not always less time on a CPU:

- oneDNN's speed is not monotone in the channel count (measured here, 1x3x3 conv, 72 outputs,
  8x56x56, one thread: 24 input channels 12.5 ms, 20 channels 7.4 ms; 12 channels 7.5 ms,
  16 channels 6.0 ms): reading a few *more* channels can be faster;
- the temporal-tap decomposition that skips dropped frames runs ``kT`` convs with ``(1, kh, kw)``
  kernels, each less efficient than one ``kT x kh x kw`` conv, plus frame adds: with most frames
  kept it is slower than the dense conv (e.g. 3x3x3, 16 -> 32 channels, 16x32x32 input: 1.9x
  slower with half of the frames kept);
- small maps / small channel counts are dominated by fixed per-call costs.

:func:`tune_conv3d` measures, for one layer and input shape on this machine, the dense conv and
the compact conv at a grid of kept channel counts, kept frame counts and kept feature fractions
(best of ``repeats`` runs each, batch 1) into a :class:`LayerTuning`. Given a tuning,
``compact_conv3d`` then

- snaps a kept channel count ``k`` UP to the measured count ``k' >= k`` with the lowest time
  (the ``k' - k`` extra channels are read with a zeroed weight: the result is unchanged; ``k' =
  C`` is the dense conv with masked weights),
- uses the tap decomposition only when it is estimated faster than the dense conv for this many
  kept frames (else the dense conv reads the masked input: same result, all frames' work),
- uses feature rectangles only when estimated faster than the dense conv.

So a pruned layer is (within measurement noise) never slower than its dense version; the price
is that it may then compute more than the MAC counter of :mod:`lightning_dance.executed` says
(``count_executed_macs`` reports what really ran). Without a tuning the compact plan is exact.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(16, 32, 3, padding=1)
    >>> tuning = tune_conv3d(conv, (16, 8, 12, 12), dims=("channel",), repeats=1)
    >>> 1 <= tuning.snap_channels(5, 16) <= 16
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lightning_dance.execution.chains import ChannelChain
from lightning_dance.execution.compact import compact_conv3d
from lightning_dance.execution.kernels import conv3d_fast_forward, to_fast_layout
from lightning_dance.execution.spatial import active_outputs
from lightning_dance.feature_sites import FeatureSite, get_feature_site
from lightning_dance.geometry import cached_geometry
from lightning_dance.masks import DIMS, check_dims, expand_blocks

__all__ = [
    "LayerTuning",
    "best_ms",
    "channel_grid",
    "profitable_dims",
    "profitable_layers",
    "tune_conv3d",
    "tune_layers",
]


def best_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``fn()`` in milliseconds over ``repeats`` runs, after one warm-up.

    The minimum is the statistic least disturbed by other jobs on a shared machine.
    """
    fn()
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _interp(table: dict[float, float], x: float) -> float:
    """Piecewise-linear interpolation of ``table`` at ``x`` (clamped to its end points)."""
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]]
    if x >= keys[-1]:
        return table[keys[-1]]
    for a, b in zip(keys, keys[1:], strict=False):
        if a <= x <= b:
            return table[a] + (table[b] - table[a]) * (x - a) / (b - a)
    raise AssertionError("unreachable")


def channel_grid(size: int) -> list[int]:
    """Kept channel counts at which :func:`tune_conv3d` times a layer of ``size`` channels.

    Every count up to 8, then steps of 4 up to 32, 8 up to 64, 16 up to 128, 32 up to 256 and
    64 beyond, plus ``size``: dense where kernels change most, about 30 points at 576 channels.

    Example:
        >>> channel_grid(40)
        [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 32, 40]
    """
    counts = set(range(1, min(size, 8) + 1))
    for lo, hi, step in ((8, 32, 4), (32, 64, 8), (64, 128, 16), (128, 256, 32)):
        counts.update(range(lo, min(size, hi) + 1, step))
    counts.update(range(256, size + 1, 64))
    counts.add(size)
    return sorted(c for c in counts if c <= size)


def _frame_grid(size: int) -> list[int]:
    if size <= 8:
        return list(range(1, size + 1))
    return sorted({c for c in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if c < size} | {size})


@dataclass
class LayerTuning:
    """Measured costs (ms, batch 1, best of a few runs) of one layer at one input shape.

    Attributes:
        dense_ms: the dense conv on the fast kernel.
        channel_ms: kept input channels -> compact conv (channels only pruned). Empty: the
            channel count is never snapped.
        frame_ms: kept frames -> compact conv through the tap decomposition (frames only).
            Empty: the tap decomposition is always used.
        feature_ms: kept fraction of output positions -> compact conv over the feature
            rectangles (features only). Empty: rectangles are always used.
        joint_ms: kept fraction along every tuned dim at once -> compact conv (measured where
            two or more dims are tuned: the per-dim costs do not multiply, each carries the
            layer's fixed costs). Empty: :meth:`estimate_ms` multiplies the per-dim ratios.
    """

    dense_ms: float
    channel_ms: dict[int, float] = field(default_factory=dict)
    frame_ms: dict[int, float] = field(default_factory=dict)
    feature_ms: dict[float, float] = field(default_factory=dict)
    joint_ms: dict[float, float] = field(default_factory=dict)

    def snap_channels(self, kept: int, size: int) -> int:
        """The channel count to read for ``kept`` kept channels of ``size``: ``kept`` itself or a
        larger measured count that is faster (``size``: the dense conv, masked weights).

        Example:
            >>> t = LayerTuning(10.0, channel_ms={8: 4.0, 12: 6.0, 16: 3.0, 32: 10.0})
            >>> t.snap_channels(10, 32), t.snap_channels(17, 32), t.snap_channels(30, 32)
            (16, 17, 30)
        """
        if not self.channel_ms or kept >= size:
            return kept
        options = {kept: _interp(self.channel_ms, kept)}
        options.update({k: ms for k, ms in self.channel_ms.items() if kept < k < size})
        options[size] = min(self.dense_ms, self.channel_ms.get(size, self.dense_ms))
        return min(options, key=lambda k: (options[k], k))

    def frames_pay(self, kept: int) -> bool:
        """Whether the tap decomposition over ``kept`` frames is estimated faster than dense."""
        return not self.frame_ms or _interp(self.frame_ms, kept) < self.dense_ms

    def features_pay(self, active_fraction: float) -> bool:
        """Whether rectangles over ``active_fraction`` of the outputs beat the dense conv."""
        return not self.feature_ms or _interp(self.feature_ms, active_fraction) < self.dense_ms

    def estimate_ms(self, keep: float) -> float:
        """Estimated compact time with a fraction ``keep`` kept along every tuned dim: the
        measured joint cost where there is one (:attr:`joint_ms`), else the per-dim
        slowdowns/speedups multiplied (dims without a table change nothing).

        Example:
            >>> t = LayerTuning(10.0, channel_ms={1: 1.0, 4: 5.0, 8: 10.0}, frame_ms={1: 6.0, 2: 10.0})
            >>> round(t.estimate_ms(0.5), 3)  # 10 ms * (5 / 10) * (6 / 10)
            3.0
            >>> t.joint_ms = {0.25: 2.0, 0.75: 8.0}
            >>> t.estimate_ms(0.5)  # measured with half of both kept: 5 ms
            5.0
        """
        if self.joint_ms:
            return _interp(self.joint_ms, keep)
        ms = self.dense_ms
        for table, scale in ((self.channel_ms, max(self.channel_ms, default=0)),
                             (self.frame_ms, max(self.frame_ms, default=0))):  # fmt: skip
            if table:
                ms *= _interp(table, max(1.0, keep * scale)) / self.dense_ms
        if self.feature_ms:
            ms *= _interp(self.feature_ms, keep) / self.dense_ms
        return ms

    def dim_estimate_ms(self, dim: str, keep: float) -> float:
        """Estimated compact time with a fraction ``keep`` kept along ``dim`` only (its measured
        table; ``dense_ms`` where the dim was not tuned).

        Example:
            >>> LayerTuning(10.0, frame_ms={2: 4.0, 4: 6.0, 8: 12.0}).dim_estimate_ms("frame", 0.5)
            6.0
        """
        table = {"channel": self.channel_ms, "frame": self.frame_ms, "feature": self.feature_ms}[
            dim
        ]
        if not table:
            return self.dense_ms
        size = 1.0 if dim == "feature" else max(table)
        return _interp(table, max(1.0, keep * size) if dim != "feature" else keep)

    def break_even(self) -> dict[str, float]:
        """Largest measured kept fraction per dim at which the compact conv still beats dense
        (0.0: never; a coarse summary for reports)."""
        out = {}
        for dim, table in (("channel", self.channel_ms), ("frame", self.frame_ms)):
            if table:
                size = max(table)
                good = [k / size for k, ms in table.items() if ms < self.dense_ms and k < size]
                out[dim] = max(good, default=0.0)
        if self.feature_ms:
            good = [f for f, ms in self.feature_ms.items() if ms < self.dense_ms]
            out["feature"] = max(good, default=0.0)
        return out


def _random_keep(size: int, k: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(1, size)
    mask[0, torch.randperm(size, generator=gen)[:k]] = 1.0
    return mask


@torch.no_grad()
def tune_conv3d(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    dims: Iterable[str] = DIMS,
    *,
    repeats: int = 3,
    grid: int = 4,
    seed: int = 0,
    feature_site: str | FeatureSite = "inputs",
) -> LayerTuning:
    """Time ``conv`` on this machine at the kept counts the compact path may meet.

    Args:
        conv: the layer (its weights and layout as they will run; convert the model to
            ``channels_last_3d`` first if it will run so).
        input_shape: one sample's input ``(C, T, H, W)``.
        dims: the masked dims to tune (channels: only ``groups == 1`` and depthwise layers;
            frames: only with more than one input frame).
        repeats: timed runs per point (best kept).
        grid: feature block grid (as the controller's ``grid``).
        seed: masks are random with this seed.
        feature_site: where the feature masks act (:mod:`lightning_dance.feature_sites`):
            ``"outputs"`` times the kept output tiles
            (:mod:`~lightning_dance.execution.tiles`) instead of input rectangles.

    Costs, per point, ``repeats + 1`` compact runs and ``repeats`` dense runs, alternated so
    that both see the same machine load (a point's time is its ratio to the dense conv times
    the layer's dense time): about 30 channel points at 576 channels, up to 12 frame points,
    4 feature points, and, with two or more dims, 4 points with every dim cut at once
    (:attr:`LayerTuning.joint_ms`).
    """
    dims = check_dims(tuple(dims))
    site = get_feature_site(feature_site)
    c, t, h, w = input_shape
    gen = torch.Generator().manual_seed(seed)
    x = to_fast_layout(torch.randn(1, *input_shape, generator=gen).to(conv.weight.dtype))
    dense = best_ms(lambda: conv3d_fast_forward(conv, x), repeats)

    def time_masks(values: dict[str, torch.Tensor], **kw: object) -> float:
        """The compact conv's time, as ``dense * best(compact) / best(dense)`` with the dense
        conv run alternately with it: both bests see the same machine load and the same number
        of samples (an unbiased ratio on a shared machine)."""
        compact_conv3d(conv, x, values, **kw)  # warm-up (plans, oneDNN primitives)
        best_d = best_c = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            conv3d_fast_forward(conv, x)
            t1 = time.perf_counter()
            compact_conv3d(conv, x, values, **kw)
            t2 = time.perf_counter()
            best_d, best_c = min(best_d, t1 - t0), min(best_c, t2 - t1)
        return dense * best_c / best_d

    channel_ms: dict[int, float] = {}
    frame_ms: dict[int, float] = {}
    feature_ms: dict[float, float] = {}
    if "channel" in dims and conv.groups in (1, c) and c > 1:
        for k in channel_grid(c)[:-1]:
            channel_ms[k] = time_masks({"channel": _random_keep(c, k, gen)})
    if "frame" in dims and t > 1:
        for k in _frame_grid(t):
            frame_ms[k] = time_masks({"frame": _random_keep(t, k, gen)})
    g = cached_geometry(conv, tuple(input_shape))
    fh, fw = g.output[1:] if site.at_outputs else (h, w)  # the positions the mask covers
    if "feature" in dims and fh * fw > 1:
        gh, gw = min(grid, fh), min(grid, fw)
        kw = {"feature_at_output": True, "feature_grid": (gh, gw)} if site.at_outputs else {}
        for frac in (0.25, 0.5, 0.75, 1.0):
            k = max(1, round(frac * gh * gw))
            blocks = _random_keep(gh * gw, k, gen).view(1, gh, gw)
            m_f = expand_blocks(blocks, (fh, fw))
            if site.at_outputs:
                active = float((m_f > 0.5).float().mean())
            else:
                active = float(active_outputs(g, m_f[0] > 0.5).float().mean())
            ms = time_masks({"feature": m_f}, **kw)
            feature_ms[active] = min(ms, feature_ms.get(active, ms))
    joint_ms: dict[float, float] = {}
    if sum(map(bool, (channel_ms, frame_ms, feature_ms))) >= 2:  # every tuned dim at once
        for frac in (0.25, 0.5, 0.75, 1.0):
            values: dict[str, torch.Tensor] = {}
            if channel_ms:
                values["channel"] = _random_keep(c, max(1, round(frac * c)), gen)
            if frame_ms:
                values["frame"] = _random_keep(t, max(1, round(frac * t)), gen)
            kw = {}
            if feature_ms:
                k = max(1, round(frac * gh * gw))
                values["feature"] = expand_blocks(
                    _random_keep(gh * gw, k, gen).view(1, gh, gw), (fh, fw)
                )
                if site.at_outputs:
                    kw = {"feature_at_output": True, "feature_grid": (gh, gw)}
            joint_ms[frac] = time_masks(values, **kw)
    if channel_ms:
        channel_ms[c] = dense
    tuning = LayerTuning(dense, channel_ms, frame_ms, feature_ms, joint_ms)
    return tuning


def profitable_layers(
    tunings: dict[str, LayerTuning], keep: float, *, margin: float = 0.9
) -> list[str]:
    """The layers worth pruning on this machine: those whose compact conv with ``keep`` of
    every tuned dim kept is estimated at most ``margin`` times their dense time.

    Pass them as ``AdaptivePruner(model, layers=...)``: the other layers then run dense and
    cost neither masks nor gathers, and the MAC count stays exact (the pruner knows which
    layers it prunes). ``keep``: the per-dim kept fraction you expect (e.g. a ``topk``
    pruner's ``keep_ratio()``). Layers not worth it are typically convs on tiny maps or with
    few channels, where fixed per-call costs dominate, and squeeze-excitation 1x1x1 convs.

    Example:
        >>> fast = LayerTuning(10.0, channel_ms={1: 1.0, 8: 10.0})
        >>> slow = LayerTuning(1.0, channel_ms={1: 1.5, 8: 1.0})
        >>> profitable_layers({"a": fast, "b": slow}, keep=0.5)
        ['a']
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return [n for n, t in tunings.items() if t.estimate_ms(keep) <= margin * t.dense_ms]


def profitable_dims(
    tunings: dict[str, LayerTuning],
    keep: float,
    *,
    margin: float = 0.9,
    chains: Mapping[str, ChannelChain] | None = None,
    max_dims: int | None = None,
) -> dict[str, tuple[str, ...]]:
    """Per layer, the dims worth pruning on this machine: those whose compact conv with ``keep``
    of that dim kept (the others whole) is estimated at most ``margin`` times the layer's dense
    time; ``()`` where none is. Pass it as ``AdaptivePruner(model, layer_dims=...)`` (with
    ``layers=`` the layers that have some): cuts then go only where they pay, and calibration
    concentrates them there.

    ``chains`` (``{producer: ChannelChain}``, e.g.
    :func:`~lightning_dance.execution.channel_chains` of the model) adds what a layer's own
    timing does not see: a chain's consumer that prunes channels spares its producer the
    outputs it drops (``CompactPruner``'s output skipping). Where the producer is pruned
    anyway (it has dims here) and the consumer's channels were tuned, the consumer also prunes
    channels when its channel cut plus ``1 - keep`` of the producer's estimated time pays. On R(2+1)D this is each cheap temporal
    conv after an expensive spatial one (``docs/execution.md``, "Dims per layer").

    ``max_dims``: keep at most this many dims per layer, those estimated fastest (the chain
    credit included). Each dim's estimate is measured with the other dims whole and carries
    the layer's fixed costs, so two dims that each pay alone may not pay together: on
    R(2+1)D at 8x112x112, ``max_dims=1`` (channels on every layer there) ran 1.52-1.55x faster
    than dense at 0.36 of the MACs where all paying dims ran 1.40-1.42x.

    Example:
        >>> t = LayerTuning(10.0, channel_ms={4: 4.0, 8: 10.0}, frame_ms={1: 3.0, 2: 6.0, 4: 10.0})
        >>> small = LayerTuning(1.0, channel_ms={4: 1.2, 8: 1.0})  # its own cut never pays
        >>> profitable_dims({"a": t, "b": small}, keep=0.5)
        {'a': ('frame', 'channel'), 'b': ()}
        >>> from lightning_dance.execution import ChannelChain
        >>> profitable_dims({"a": t, "b": small}, keep=0.5, chains={"a": ChannelChain("a", "b")})
        {'a': ('frame', 'channel'), 'b': ('channel',)}
        >>> profitable_dims({"a": t, "b": small}, keep=0.5, max_dims=1)  # 4 ms against 6 ms
        {'a': ('channel',), 'b': ()}
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if max_dims is not None and (isinstance(max_dims, bool) or not isinstance(max_dims, int)
                                 or max_dims < 1):  # fmt: skip
        raise ValueError(f"max_dims must be a positive int or None, got {max_dims!r}")
    chains = {} if chains is None else chains
    if not hasattr(chains, "items") or not all(
        isinstance(c, ChannelChain) for c in chains.values()
    ):
        raise TypeError(
            "chains must map producer names to ChannelChain objects, e.g. "
            f"channel_chains(model) or pruner.output_chains(); got {type(chains).__name__}"
        )
    est = {n: {d: t.dim_estimate_ms(d, keep) for d in DIMS} for n, t in tunings.items()}
    out = {
        name: tuple(d for d in DIMS if est[name][d] <= margin * t.dense_ms)
        for name, t in tunings.items()
    }
    for producer, chain in chains.items():
        own, consumer = out.get(producer), tunings.get(chain.consumer)
        if not own or consumer is None or not consumer.channel_ms:  # channels not tuned there
            continue
        spared = (1.0 - keep) * min(tunings[producer].dim_estimate_ms(d, keep) for d in own)
        est[chain.consumer]["channel"] -= spared  # the producer's own time, not its credit
        if est[chain.consumer]["channel"] <= margin * consumer.dense_ms:
            dims = {*out[chain.consumer], "channel"}
            out[chain.consumer] = tuple(d for d in DIMS if d in dims)
    if max_dims is not None:
        for name, dims in out.items():
            best = sorted(dims, key=lambda d: est[name][d])[:max_dims]
            out[name] = tuple(d for d in DIMS if d in best)
    return out


def tune_layers(
    model: nn.Module,
    clip: torch.Tensor,
    layers: Iterable[str],
    dims: Iterable[str] = DIMS,
    **kwargs: object,
) -> dict[str, LayerTuning]:
    """:func:`tune_conv3d` for each named Conv3d of ``model`` at its input shape on ``clip``.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1))
        >>> tunings = tune_layers(net, torch.randn(1, 3, 4, 8, 8), ["1"], ("channel",), repeats=1)
        >>> sorted(tunings)
        ['1']
    """
    from lightning_dance.geometry import conv3d_input_shapes

    names = list(layers)
    shapes = conv3d_input_shapes(model, clip[:1])
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in shapes]
    if missing:
        raise KeyError(f"layers {missing[:5]} did not run on this clip (or are not Conv3d)")
    dims = tuple(dims)
    return {n: tune_conv3d(modules[n], shapes[n], dims, **kwargs) for n in names}
