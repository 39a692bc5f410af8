"""Run a whole model with per-layer masks, each masked Conv3d computed compactly.

:class:`CompactExecutor` routes the instrumented Conv3d layers of a model through
:func:`~lightning_dance.execution.compact.compact_conv3d` with the masks of one forward pass
(``{layer name: {dim: mask}}``), and every other Conv3d (the stem, unmasked layers) through
:func:`~lightning_dance.execution.kernels.fast_conv3d`: the same kernels as
:func:`~lightning_dance.execution.kernels.accelerate_dense` gives the dense model, so a
dense / compact latency ratio measures pruning only.

:class:`CompactPruner` does the same for an :class:`~lightning_dance.aap.AdaptivePruner`: the stem
runs dense, the controller reads its output, and every instrumented layer gets its masks from
the controller and runs compactly: DANCE's inference with the savings made real. Its outputs
equal ``pruner(clip)`` (the masked model) in eval mode.

Both take optional per-layer :class:`~lightning_dance.execution.tuning.LayerTuning` (``.tune``):
measured kernel costs that let a layer snap its kept counts to faster kernel sizes or fall back
to the dense conv where compact would be slower (same outputs; see
:mod:`lightning_dance.execution.tuning`).

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1))
    >>> ex = CompactExecutor(net)
    >>> clip = torch.randn(1, 3, 4, 16, 16)
    >>> masks = {"2": {"channel": torch.tensor([[1., 0, 1, 0, 1, 1, 0, 0]])}}
    >>> y = ex(clip, masks)
    >>> y.shape
    torch.Size([1, 8, 4, 16, 16])
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from lightning_dance.execution.chains import ChannelChain
from lightning_dance.execution.compact import (
    check_batch_mode,
    compact_conv3d,
    compact_conv3d_unchecked,
    output_features,
)
from lightning_dance.execution.folding import foldable_norms, folded_conv, norm_is_foldable
from lightning_dance.execution.indexed import IndexedRun, index_plan_applies, indexed_norm
from lightning_dance.execution.kernels import (
    accelerate_dense,
    conv3d_fast_forward,
    route_conv3d,
    to_fast_layout,
)
from lightning_dance.execution.tuning import LayerTuning, best_ms, tune_layers
from lightning_dance.geometry import cached_geometry
from lightning_dance.layers import LayerSelector, all_conv3d, select_conv3d
from lightning_dance.masks import DIMS

if TYPE_CHECKING:
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.decision import DecisionPlan

__all__ = ["CompactExecutor", "CompactPruner", "compact_forward", "profile_layers", "random_masks"]


def compact_forward(
    conv: nn.Conv3d,
    x: torch.Tensor,
    values: dict[str, torch.Tensor] | None,
    tuning: LayerTuning | None = None,
    batch_mode: str = "group",
) -> torch.Tensor:
    """What a masked Conv3d's forward should return in ``execution="compact"`` mode.

    ``values``: the layer's hard masks for this batch (``{dim: [N, ...]}``, as
    :class:`~lightning_dance.masks.LayerMasks` ``.values``); ``None`` or ``{}``: the layer runs
    dense on the fast kernel. Equals ``conv(apply_masks(x, values))``.
    """
    if not values:
        return conv3d_fast_forward(conv, x)
    return compact_conv3d(conv, x, values, tuning=tuning, batch_mode=batch_mode)


class CompactExecutor:
    """Run ``model`` with the given per-layer masks, computing only the kept work.

    Args:
        model: a 3D CNN (``model(clip)``).
        layers: the instrumented Conv3d layers masks may name (default: all but the stem, as
            :func:`lightning_dance.layers.select_conv3d`).
        tunings: per-layer measured kernel costs (see :meth:`tune`); ``None``: the exact plan.
        batch_mode: how batches with per-sample masks run (see
            :func:`~lightning_dance.execution.compact.compact_conv3d`).

    ``executor(clip, masks)`` equals the model run with each named layer reading
    ``apply_masks(x, masks[name])`` (up to float rounding); layers without masks run dense.
    Use it in eval mode under ``torch.no_grad()`` (an inference path). The model is only
    modified inside the call.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector = None,
        tunings: dict[str, LayerTuning] | None = None,
        batch_mode: str = "group",
    ) -> None:
        self.model = model
        self.layer_names = list(select_conv3d(model, layers))
        self.tunings: dict[str, LayerTuning] = dict(tunings or {})
        self.batch_mode = check_batch_mode(batch_mode)

    def tune(
        self, clip: torch.Tensor, dims: Iterable[str] = DIMS, **kwargs: object
    ) -> dict[str, LayerTuning]:
        """Measure every instrumented layer at its input shape on ``clip`` (see
        :func:`~lightning_dance.execution.tuning.tune_conv3d`; ``kwargs`` go there) and use the
        tunings from now on. Tune in the threads, layout and machine you will run on."""
        self.tunings = tune_layers(self.model, clip, self.layer_names, dims, **kwargs)
        return self.tunings

    def _check(self, masks: dict[str, dict[str, torch.Tensor]]) -> None:
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict layer -> {{dim: mask}}, got {type(masks)}")
        unknown = sorted(set(masks) - set(self.layer_names))
        if unknown:
            raise KeyError(
                f"masks name layers that are not instrumented: {unknown[:5]}; instrumented "
                f"layers are e.g. {self.layer_names[:5]}"
            )

    @contextlib.contextmanager
    def route(self, masks: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
        """Inside the context, ``model(clip)`` runs compactly with ``masks``."""
        self._check(masks)

        def forward(name: str, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
            return compact_forward(
                conv, x, masks.get(name), self.tunings.get(name), self.batch_mode
            )

        with route_conv3d(all_conv3d(self.model), forward):
            yield

    def __call__(
        self, clip: torch.Tensor, masks: dict[str, dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        with self.route(masks):
            return self.model(to_fast_layout(clip))


class CompactPruner:
    """DANCE inference that skips the pruned work: an ``AdaptivePruner`` run compactly.

    Per clip: the stem runs dense (fast kernel), the pruner's controller reads the stem output,
    and each instrumented Conv3d gets its masks from the controller
    (the clip's :class:`~lightning_dance.decision.DecisionPlan`, ``pruner.decide``) and runs through
    :func:`~lightning_dance.execution.compact.compact_conv3d`; every other Conv3d runs dense on
    the fast kernel. The result equals ``pruner(clip)`` in eval mode (the masked model), for any
    policy, dims, budget and calibration; batches are fine (samples with equal masks run
    together, the others one by one).

    Output skipping (``skip_outputs=True``, default): where a conv's output reaches the next
    conv only through per-channel ops (a :class:`~lightning_dance.execution.chains.ChannelChain`,
    e.g. R(2+1)D's spatial -> temporal convs), the next conv's channel mask is made first and
    the conv computes only the channels it keeps (weight rows sliced); BatchNorm and activations
    in between run on those channels, and the next conv reads them without a gather. The
    result is unchanged (a dropped channel is never read); the multiply-adds fall below the
    pruner's count, which only credits each layer's own input masks
    (:func:`~lightning_dance.execution.count_executed_macs` reports what ran). Needs a model
    ``torch.fx`` can trace (otherwise only input channels are skipped, with a warning).

    Args:
        pruner: an :class:`~lightning_dance.aap.AdaptivePruner` (eval mode).
        tunings: per-layer measured kernel costs (see :meth:`tune`); ``None``: the exact plan
            (multiply-adds equal the pruner's executed count).
        batch_mode: how batches with per-sample masks run (see
            :func:`~lightning_dance.execution.compact.compact_conv3d`).
        skip_outputs: also skip the output channels the next conv drops (above). With a
            batch, a producer computes the union of the samples' kept channels.
        index_plan: for a pruner of channels only whose policy takes the controller's scores
            (``topk``, ``threshold``, ``width``), at batch 1 and without ``tunings``, run
            straight from each layer's kept indices (:mod:`~lightning_dance.execution.indexed`:
            far fewer small ops; same result and multiply-adds). ``False``: always the general
            mask-based plan.
        fold_norms: each eval BatchNorm3d that alone reads a conv's output (not the stem's:
            the controller reads it raw) is computed by that conv
            (:mod:`~lightning_dance.execution.folding`: folded weights, cached) and passes its
            input through; same result up to float rounding, one pass over each such output
            fewer. :meth:`compare_dense` and :func:`lightning_dance.bytes.compare_traffic`
            give the dense baseline the same folding. On by default (measured: the per-clip
            path of a trained R(2+1)D 15-20% faster at 8x112x112, dense as much,
            ``docs/execution.md``); ``False``: BatchNorms run as they are.

    Example:
        >>> import torch
        >>> from lightning_dance.aap import AdaptivePruner
        >>> from lightning_dance.models import create_model
        >>> pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), budget=0.5).eval()
        >>> fast = CompactPruner(pruner)
        >>> clip = torch.randn(1, 3, 8, 32, 32)
        >>> with torch.no_grad():
        ...     torch.allclose(fast(clip), pruner(clip), atol=1e-4)
        True
    """

    def __init__(
        self,
        pruner: AdaptivePruner,
        tunings: dict[str, LayerTuning] | None = None,
        batch_mode: str = "group",
        skip_outputs: bool = True,
        index_plan: bool = True,
        fold_norms: bool = True,
    ) -> None:
        flags = (("skip_outputs", skip_outputs), ("index_plan", index_plan),
                 ("fold_norms", fold_norms))  # fmt: skip
        for arg, value in flags:
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be a bool, got {value!r}")
        self.pruner = pruner
        self.index_plan = index_plan
        self.tunings: dict[str, LayerTuning] = dict(tunings or {})
        self.batch_mode = check_batch_mode(batch_mode)
        self.skip_outputs = skip_outputs
        self.fold_norms = fold_norms
        self._routed_modules: dict[str, nn.Module] | None = None
        self._fold_pairs: dict[str, str] | None = None

    @property
    def chains(self) -> dict[str, ChannelChain]:
        """The channel chains whose producer skips the outputs its consumer drops: those of
        :func:`~lightning_dance.execution.chains.channel_chains` whose consumer prunes channels
        and whose producer is instrumented too (never the stem, whose whole output the
        controller reads), so that :func:`~lightning_dance.execution.count_executed_macs` sees
        every skipped output (:meth:`AdaptivePruner.output_chains`). Empty with
        ``skip_outputs=False``."""
        return self.pruner.output_chains() if self.skip_outputs else {}

    def tune(self, clip: torch.Tensor, **kwargs: object) -> dict[str, LayerTuning]:
        """Measure every instrumented layer for the pruner's dims at its input shape on ``clip``
        (see :func:`~lightning_dance.execution.tuning.tune_conv3d`) and use the tunings."""
        p = self.pruner
        kwargs.setdefault("grid", p.controller.grid)
        kwargs.setdefault("feature_site", p.feature_site)
        self.tunings = tune_layers(p.model, clip, p.layer_names, p.dims, **kwargs)
        return self.tunings

    def compare_dense(
        self, clip: torch.Tensor, repeats: int = 3, *, compiled: bool = False
    ) -> dict[str, float]:
        """Time this fast path against the dense model (every conv on the same fast kernels,
        :func:`~lightning_dance.execution.kernels.accelerate_dense`) on ``clip``: after one
        warm-up each, ``repeats`` interleaved rounds, best of each (the statistic least
        disturbed by other jobs). Returns ``{"dense_ms", "compact_ms", "speedup"}``.

        ``compiled=True`` also times the dense model compiled
        (:func:`~lightning_dance.compiled.compile_for_inference`, ``channels_last_3d``; seconds
        to compile, a C++ compiler needed), often dense's fastest form on a CPU (R(2+1)D: 1.3-1.4x
        faster than eager; X3D-XS: 1.8x), and adds ``"dense_compiled_ms"`` and
        ``"speedup_compiled"`` (over it).

        On some models and machines skipping the work costs more than it saves (X3D-XS at batch
        1 on a CPU: many tiny depthwise / 1x1x1 convs where gathers and per-call costs exceed
        the saved multiply-adds; ``docs/execution.md``): check before deploying.
        """
        model, fast_clip = self.pruner.model, to_fast_layout(clip)

        def dense() -> object:
            with accelerate_dense(model, fold_norms=self.fold_norms):
                return model(fast_clip)

        runs = {"dense_ms": dense, "compact_ms": lambda: self(clip)}
        if compiled:
            from lightning_dance.compiled import compile_for_inference

            graph = compile_for_inference(model, clip, channels_last=True)
            runs["dense_compiled_ms"] = lambda: graph(clip)
        best = dict.fromkeys(runs, float("inf"))
        with torch.no_grad():
            for fn in runs.values():
                fn()
            for _ in range(max(1, repeats)):
                for key, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    best[key] = min(best[key], (time.perf_counter() - t0) * 1e3)
        out = {**best, "speedup": best["dense_ms"] / best["compact_ms"]}
        if compiled:
            out["speedup_compiled"] = best["dense_compiled_ms"] / best["compact_ms"]
        return out

    def _prepare(self, clip: torch.Tensor) -> None:
        """What ``AdaptivePruner.forward`` sets up before its hooks run (the topk keep ratio
        depends on the dense share of the instrumented layers for this clip shape)."""
        self.pruner.prepare(clip)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        p = self.pruner
        if p.training:
            raise RuntimeError(
                "CompactPruner is an inference path: call pruner.eval() first (training masks "
                "are stochastic and need gradients through the masked model)"
            )
        self._prepare(clip)
        chains = self.chains
        folds = self._folds()
        if self.index_plan and not self.tunings and index_plan_applies(p, clip):
            run = IndexedRun(p, chains, folds)
            with torch.no_grad(), route_conv3d(self._routed(), run):
                return p.model(to_fast_layout(clip))
        stem, layers = p.stem_name, set(p.layer_names)
        at_outputs = p.features_at_outputs
        plans: list[DecisionPlan] = []  # the clip's decisions, made when the stem first ran
        held: dict[str, torch.Tensor] = {}  # consumer / norm -> the channels its input holds

        def forward(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if isinstance(module, nn.BatchNorm3d):
                return x if name in folds else indexed_norm(module, x, held.get(name))
            conv = folded_conv(module, folds[name]) if name in folds else module
            shape = (conv.in_channels, *x.shape[2:])  # x may hold only the kept channels
            out_idx = None
            chain = chains.get(name)
            if chain is not None and plans:  # compute only what the consumer keeps
                g = cached_geometry(conv, shape)
                q = plans[0].masks(
                    chain.consumer, p.mask_shape(chain.consumer, (conv.out_channels, *g.output))
                )
                out_idx = (q.values["channel"].detach() > 0.5).any(0).nonzero().flatten()
                if len(out_idx) < conv.out_channels:
                    for key in (chain.consumer, *chain.norms):
                        held[key] = out_idx
                else:
                    out_idx = None
            if name in layers:  # masks and channel subsets are well-formed by construction
                if not plans:
                    raise RuntimeError(f"instrumented layer {name!r} ran before the stem {stem!r}")
                decide = p.mask_shape(name, shape)
                masks = plans[0].masks(name, decide, inputs=x)  # x: input-scoring policies
                return compact_conv3d_unchecked(
                    conv,
                    x,
                    masks.values,
                    self.tunings.get(name),
                    self.batch_mode,
                    held.pop(name, None),
                    out_idx,
                    *output_features(masks, at_outputs),
                )
            y = conv3d_fast_forward(conv, x)
            if name == stem and not plans:
                plans.append(p.decide(y, prefetch=True))
            return y

        with torch.no_grad(), route_conv3d(self._routed(), forward):
            return p.model(to_fast_layout(clip))

    def _routed(self) -> dict[str, nn.Module]:
        """Every Conv3d, the BatchNorm3d modules inside the chains (they run on the computed
        channels only) and the folded ones; found once."""
        if self._routed_modules is None:
            modules = dict(self.pruner.model.named_modules())
            norms = {n: modules[n] for c in self.chains.values() for n in c.norms}
            folded = {n: modules[n] for n in self._fold_names().values()}
            self._routed_modules = {**all_conv3d(self.pruner.model), **norms, **folded}
        return self._routed_modules

    def _fold_names(self) -> dict[str, str]:
        """``{conv: BatchNorm}`` names folded with ``fold_norms`` (found once; not the stem)."""
        if not self.fold_norms:
            return {}
        if self._fold_pairs is None:
            p = self.pruner
            self._fold_pairs = foldable_norms(p.model, keep=(p.stem_name,))
        return self._fold_pairs

    def _folds(self) -> dict[str, nn.BatchNorm3d]:
        """For this call: conv name -> the BatchNorm it computes, and each such BatchNorm's
        name -> itself (both sides: :func:`norm_is_foldable` now)."""
        modules = dict(self.pruner.model.named_modules()) if self.fold_norms else {}
        folds: dict[str, nn.BatchNorm3d] = {}
        for conv_name, norm_name in self._fold_names().items():
            if norm_is_foldable(modules[norm_name]):
                folds[conv_name] = folds[norm_name] = modules[norm_name]
        return folds


def random_masks(
    shapes: dict[str, tuple[int, int, int, int]],
    keep: dict[str, float],
    *,
    batch_size: int = 1,
    grid: int = 4,
    generator: torch.Generator | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Random per-sample masks with exact kept fractions, for tests and benchmarks.

    Args:
        shapes: ``{layer: (C, T, H, W)}`` input shapes (``lightning_dance.geometry.conv3d_input_shapes``).
        keep: ``{dim: kept fraction}``; each sample keeps ``max(1, round(f * size))`` random
            channels / frames, or blocks of a ``grid x grid`` block grid for features.

    Example:
        >>> m = random_masks({"a": (8, 4, 8, 8)}, {"channel": 0.5})
        >>> int(m["a"]["channel"].sum())
        4
    """
    from lightning_dance.masks import expand_blocks

    def pick(n: int, size: int, frac: float) -> torch.Tensor:
        k = max(1, min(size, round(frac * size)))
        out = torch.zeros(n, size)
        for i in range(n):
            out[i, torch.randperm(size, generator=generator)[:k]] = 1.0
        return out

    masks = {}
    for name, (c, t, h, w) in shapes.items():
        m = {}
        if "frame" in keep:
            m["frame"] = pick(batch_size, t, keep["frame"])
        if "channel" in keep:
            m["channel"] = pick(batch_size, c, keep["channel"])
        if "feature" in keep:
            gh, gw = min(grid, h), min(grid, w)
            blocks = pick(batch_size, gh * gw, keep["feature"]).view(batch_size, gh, gw)
            m["feature"] = expand_blocks(blocks, (h, w))
        masks[name] = m
    return masks


def profile_layers(
    model: nn.Module,
    clip: torch.Tensor,
    masks: dict[str, dict[str, torch.Tensor]],
    *,
    repeats: int = 5,
) -> dict[str, dict[str, float]]:
    """Per masked layer: best-of-``repeats`` ms of the dense fast conv and of the compact conv on
    the layer's real input (captured from one dense forward pass of ``clip``).

    Returns ``{layer: {"dense_ms", "compact_ms", "ratio"}}`` (``ratio`` = compact / dense). Use
    it to find layers where pruning does not pay on this machine (``ratio >= 1``: memory-bound
    convs such as depthwise or 1x1x1 ones with few channels, tiny maps where fixed per-call
    costs dominate) and leave them, or a dim of them, out of the pruner's ``layers=``.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1))
        >>> masks = {"1": {"channel": torch.tensor([[1.0, 0, 1, 0, 1, 0, 1, 0]])}}
        >>> sorted(profile_layers(net, torch.randn(1, 3, 4, 8, 8), masks, repeats=1)["1"])
        ['compact_ms', 'dense_ms', 'ratio']
    """
    mods = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        mods[name].register_forward_pre_hook(
            lambda m, a, name=name: inputs.__setitem__(name, to_fast_layout(a[0].detach()))
        )
        for name in masks
    ]
    try:
        with torch.no_grad():
            model(clip)
    finally:
        for h in handles:
            h.remove()

    out = {}
    with torch.no_grad():
        for name, x in inputs.items():
            conv = mods[name]
            d = best_ms(lambda conv=conv, x=x: conv3d_fast_forward(conv, x), repeats)
            c = best_ms(
                lambda conv=conv, x=x, name=name: compact_conv3d(conv, x, masks[name]), repeats
            )
            out[name] = {"dense_ms": d, "compact_ms": c, "ratio": c / d}
    return out
