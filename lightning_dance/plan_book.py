"""A plan book: DANCE's per-clip channel decisions served by a few static sub-networks.

A trained ``threshold`` controller decides, per clip, which input channels every layer keeps.
The compact path (:class:`~lightning_dance.execution.CompactPruner`) runs each clip's own
decision, and pays for it on every call (weight and activation gathers, a new shape per kept
count, Python per conv): on R(2+1)D it runs near the speed of dense, where the static
projection of the same model (every clip the channels kept most often,
:func:`~lightning_dance.priors.freeze_channels` and
:func:`~lightning_dance.materialize.materialize`) is a plain narrow model, fast and exportable,
but gives up the choice per clip.

A :class:`PlanBook` sits between the two. :func:`plan_book` records the channel decisions of
calibration clips, clusters them into ``plans`` groups (k-means on the clips' keep masks,
each channel weighted by the square root of its layer's MACs per channel, so that a distance
is about the MACs two plans disagree on), freezes each group to the channels its clips keep
most often at their mean count, and materializes each as its own sub-network. A clip then runs:

1. the stem (the first conv) and the controller, as in DANCE;
2. its decision (:meth:`~lightning_dance.decision.DecisionPlan.channel_indices`), assigned to
   the nearest plan (:meth:`PlanBook.assign`);
3. that plan's sub-network, a plain model reading the stem's output (the stem runs once).

``plans=1`` is the static projection; more plans follow the per-clip decisions more closely,
and each is a static model: oneDNN's kernels for its shapes are made once, and its weights
are gathered once. Measured on R(2+1)D (``docs/benchmarks.md``, "A plan book"): 2-8 plans were
no more accurate than one, and below the per-clip model where it led (the choice lives in a
fringe of channels that vary from clip to clip, which a cluster's majority set does not
follow); at 112x112 a book ran 1.33-1.40x of dense eager, the per-clip path 1.25x, the
projection without a controller 1.6x. Compiled (:meth:`PlanBook.compiled`), against the
compiled dense model: the book 1.40-1.46x, the projection 1.66-1.81x, while the per-clip path,
which cannot be compiled, falls to 0.73-0.75x. Use it to measure what K plans keep on your
task. What it costs: the weights of ``plans`` narrow copies, and the controller
(a few kMACs) on every clip. Counted MACs per clip (:meth:`PlanBook.macs`): the stem, the
controller and the assigned plan's sub-network (fvcore), the figure a benchmark compares.

Limits: channels only (``dims=("channel",)`` and a policy that keeps the top scores:
``topk``, ``threshold``); what :func:`~lightning_dance.materialize.materialize` supports; the
model must feed its input straight to the stem (the sub-networks take the stem's output; a
model that transforms the clip first is refused at build time, with ``share_stem=False`` as
the fix, which runs the stem again inside each sub-network).

Example:
    >>> import torch
    >>> from lightning_dance.aap import AdaptivePruner
    >>> from lightning_dance.models import create_model
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), dims=("channel",),
    ...                         policy="threshold", budget=0.5).eval()
    >>> clips = [torch.randn(4, 3, 8, 32, 32) for _ in range(2)]
    >>> book = plan_book(pruner, clips, plans=4)
    >>> len(book.networks)  # an untrained controller decides alike on every clip: one plan
    1
    >>> torch.allclose(book(clips[0]), pruner(clips[0]), atol=1e-4), book.last_plans.tolist()
    (True, [0, 0, 0, 0])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.channel_maps import ChannelGather
from lightning_dance.errors import DanceError
from lightning_dance.execution.indexed import topk_indices
from lightning_dance.execution.kernels import accelerate_dense
from lightning_dance.macs import count_macs
from lightning_dance.materialize import materialize
from lightning_dance.priors import channel_decisions, freeze_channels

__all__ = ["PlanBook", "PlanBookError", "plan_book"]


class PlanBookError(DanceError, ValueError):
    """A plan book cannot be built for this pruner or model (the message names the fix)."""


def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50):
    """Centroids ``[k', D]`` (``k' <= k``: empty clusters are dropped) of ``points`` ``[N, D]``
    (k-means++ seeding, then Lloyd's iterations until no point moves)."""
    first = torch.randint(len(points), (1,), generator=generator)
    centroids = points[first]
    for _ in range(k - 1):
        d2 = torch.cdist(points, centroids).min(1).values.pow(2)
        if float(d2.sum()) == 0.0:  # fewer distinct points than clusters
            break
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centroids = torch.cat([centroids, points[pick]])
    assign = None
    for _ in range(iters):
        new = torch.cdist(points, centroids).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack(
            [
                points[assign == j].mean(0) if (assign == j).any() else centroids[j]
                for j in range(len(centroids))
            ]  # fmt: skip
        )
    used = torch.unique(torch.cdist(points, centroids).argmin(1))
    return centroids[used]


class _Router(nn.Module):
    """A book's stem and choice of plan as one module (what :meth:`PlanBook.compiled`
    compiles): ``clip -> (stem output, plan of each clip)``."""

    def __init__(self, book: PlanBook) -> None:
        super().__init__()
        self.book = book

    def forward(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stem_out = self.book.stem(clip)
        return stem_out, self.book._assign(stem_out)


class _StemReached(Exception):
    """Stops a forward pass once the stem has run (:meth:`PlanBook._stem_output`)."""


class PlanBook(nn.Module):
    """Per-clip channel decisions served by ``len(networks)`` static sub-networks (see the
    module docstring; built by :func:`plan_book`). Inference only: ``forward`` runs under
    ``torch.no_grad()``.

    Attributes:
        networks: the plans' sub-networks (plain models taking the stem's output, or the clip
            with ``share_stem=False``).
        centroids: ``[plans, D]`` the plans' mean decisions in the weighted space.
        layers: the instrumented layers in the order of the decision vector.
        last_plans: ``[N]`` the plan each clip of the last forward ran (``None`` before).
    """

    _graphs: dict[int, Any] | None = None  # module id -> its compiled form, inside compiled()
    _graph_shapes: dict[int, torch.Size]

    def __init__(
        self,
        pruner: nn.Module,
        networks: list[nn.Module],
        centroids: torch.Tensor,
        weights: dict[str, float],
        share_stem: bool,
    ) -> None:
        super().__init__()
        self.pruner = pruner  # the stem, the controller and the policy: the decisions
        self.networks = nn.ModuleList(networks)
        self.register_buffer("centroids", centroids)
        self.layers = list(weights)
        self._widths = {n: pruner.model.get_submodule(n).in_channels for n in self.layers}
        self._weights = weights
        self._ones = {n: torch.ones(c) for n, c in self._widths.items()}
        self._scale = torch.cat([torch.full((self._widths[n],), weights[n]) for n in self.layers])
        self._fast = False
        self._compiled: dict[tuple, Any] = {}  # per example shape: compiled(), see there
        self.share_stem = share_stem
        self.last_plans: torch.Tensor | None = None
        self._plan_macs: dict[tuple[int, ...], list[int]] = {}

    def train(self, mode: bool = True) -> PlanBook:
        """A plan book is for inference: it stays in eval mode (the controller's decisions
        without exploration noise, BatchNorms on their running statistics) whatever ``mode``."""
        return super().train(False)

    @property
    def stem(self) -> nn.Module:
        """The first conv, whose output the controller reads (and the sub-networks take)."""
        return self.pruner.model.get_submodule(self.pruner.stem_name)

    def decisions(self, stem_out: torch.Tensor) -> torch.Tensor:
        """``[N, D]``: each clip's kept channels of every layer (1 kept, 0 dropped), weighted as
        the centroids are (the square root of the layer's MACs per channel)."""
        rows = []
        for i in range(stem_out.shape[0]):
            masks = self.pruner.decide(stem_out[i : i + 1]).channel_masks(self._widths)
            rows.append(
                torch.cat(
                    [
                        self._ones[n] if masks[n] is None else masks[n].to(self._ones[n])
                        for n in self.layers
                    ]
                )
            )
        return torch.stack(rows).to(self.centroids) * self._scale

    @torch.no_grad()
    def assign(self, clip: torch.Tensor) -> torch.Tensor:
        """``[N]``: the plan each clip of ``clip`` ``[N, 3, T, H, W]`` runs."""
        return self._assign(self._stem_output(self._checked(clip)))

    def _assign(self, stem_out: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.decisions(stem_out), self.centroids).argmin(1)

    def _checked(self, clip: torch.Tensor) -> torch.Tensor:
        self.pruner.check_clip(clip)
        return clip

    def _run(self, module: nn.Module, x: torch.Tensor, fold_norms: bool) -> torch.Tensor:
        if self._graphs is not None and x.shape == self._graph_shapes.get(id(module)):
            return self._graphs[id(module)](x)
        if not self._fast:
            return module(x)
        with accelerate_dense(module, fold_norms=fold_norms):
            return module(x)

    def _stem_output(self, clip: torch.Tensor) -> torch.Tensor:
        """The stem's output on ``clip`` as the model computes it: the stem on the clip where
        the model feeds it straight in (``share_stem``, checked at build time); else the
        model's forward up to the stem (whatever it does to the clip first), stopped there."""
        if self.share_stem:
            return self._run(self.stem, clip, fold_norms=False)
        seen: list[torch.Tensor] = []

        def stop(module: nn.Module, args: object, out: torch.Tensor) -> None:
            seen.append(out)
            raise _StemReached

        handle = self.stem.register_forward_hook(stop)
        try:
            self.pruner.model(clip)
        except _StemReached:
            pass
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"the stem {self.pruner.stem_name!r} did not run in the forward")
        return seen[0]

    @torch.no_grad()
    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        self._checked(clip)
        if self._graphs is not None and clip.shape == self._graph_shapes.get(id(self)):
            stem_out, plans = self._graphs[id(self)](clip)  # stem and choice: one graph
        else:
            stem_out = self._stem_output(clip)
            plans = self._assign(stem_out)
        source = stem_out if self.share_stem else clip
        self.last_plans = plans
        if len(set(plans.tolist())) == 1:
            return self._run(self.networks[int(plans[0])], source, fold_norms=True)
        outs: list[torch.Tensor | None] = [None] * len(plans)
        for j in plans.unique().tolist():
            idx = (plans == j).nonzero().flatten()
            ys = self._run(self.networks[j], source[idx], fold_norms=True)
            for i, y in zip(idx.tolist(), ys, strict=True):
                outs[i] = y
        return torch.stack(outs)  # type: ignore[arg-type]

    def plan_macs(self, clip: torch.Tensor | tuple[int, ...]) -> list[int]:
        """MACs per clip of each plan on clips of ``clip``'s shape: the stem, the controller and
        the plan's sub-network (fvcore, :func:`~lightning_dance.macs.count_macs`)."""
        shape = tuple(clip.shape[1:]) if isinstance(clip, torch.Tensor) else tuple(clip)
        if shape not in self._plan_macs:
            x = torch.zeros(1, *shape)
            stem = count_macs(self.stem, x, per_module=False).total
            with torch.no_grad():
                stem_out = self.stem(x)
            control = self.pruner.decision_macs(tuple(stem_out.shape[1:]), {})
            source = stem_out if self.share_stem else x
            self._plan_macs[shape] = [
                stem
                + control  # without a shared stem, the network runs its own too
                + count_macs(net, source, per_module=False).total
                for net in self.networks
            ]
        return self._plan_macs[shape]

    def macs(self, clip: torch.Tensor) -> torch.Tensor:
        """``[N]`` (int64): MACs each clip of ``clip`` runs (:meth:`plan_macs` of its plan)."""
        table = torch.tensor(self.plan_macs(clip), dtype=torch.long)
        return table[self.assign(clip)]

    @contextlib.contextmanager
    def accelerated(self) -> Iterator[PlanBook]:
        """Inside: each forward runs the stem and the plans it picks on the fast CPU kernels
        (:func:`~lightning_dance.execution.accelerate_dense`, routed per call as
        :func:`~lightning_dance.timing.dense_fast` routes the dense model), each plan's eval
        BatchNorms folded into their convs (the stem's raw output stays: the controller reads
        it): the book's form to time against ``dense_fast``. (``accelerate_dense`` on the book
        itself would fold nothing: its forward branches per clip, so ``torch.fx`` cannot trace
        it.)"""
        was, self._fast = self._fast, True
        try:
            yield self
        finally:
            self._fast = was

    @contextlib.contextmanager
    def compiled(self, example: torch.Tensor, *, channels_last: bool = False) -> Iterator[PlanBook]:
        """Inside: the book runs as frozen inductor graphs
        (:func:`~lightning_dance.compiled.compile_for_inference`): one for the stem, the
        controller and the choice of plan, one per plan; only the dispatch to the chosen plan
        is Python. The book's form to time against the compiled dense model.

        The graphs are compiled on the first entry for ``example``'s shape (seconds per plan)
        and kept for later entries (not saved with the book). Clips of another shape, and the
        groups of a batch whose clips pick different plans, run eager. With
        ``share_stem=False`` only the plans are compiled (the stem runs inside the model's
        forward).

        Raises:
            lightning_dance.compiled.CompileError: no C++ compiler, or a plan does not compile.
        """
        from lightning_dance.compiled import compile_for_inference

        key = (tuple(example.shape), example.dtype, example.device, channels_last)
        cache = self.__dict__.setdefault("_compiled", {})  # books saved before compiled() existed
        if key not in cache:
            with torch.no_grad():
                self._checked(example)
                graphs, shapes = {}, {}
                if self.share_stem:  # the plans compiled on what the compiled router gives
                    router = compile_for_inference(_Router(self).eval(), example,
                                                   channels_last=channels_last)  # fmt: skip
                    graphs[id(self)], shapes[id(self)] = router, example.shape
                    source = router(example)[0]
                else:
                    source = example
                for net in self.networks:
                    graphs[id(net)] = compile_for_inference(net, source, channels_last=channels_last)
                    shapes[id(net)] = source.shape
            cache[key] = (graphs, shapes)
        was = self._graphs, self.__dict__.get("_graph_shapes", {})
        self._graphs, self._graph_shapes = cache[key]
        try:
            yield self
        finally:
            self._graphs, self._graph_shapes = was

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save``, ``copy.deepcopy``) without the compiled graphs."""
        state = dict(self.__dict__)
        state.update(_graphs=None, _graph_shapes={}, _compiled={})
        return state

    def extra_repr(self) -> str:
        return f"plans={len(self.networks)}, share_stem={self.share_stem}"


def _stem_input(pruner: Any, frozen: Any, example: torch.Tensor) -> nn.Module:
    """What replaces the stem in a plan's sub-network: the stem output's channels that the
    sub-network's narrowed stem computed (a chain from the stem to its consumer), else all."""
    stem = pruner.stem_name
    for chain in frozen.output_chains().values():
        if chain.producer == stem:
            with torch.no_grad():
                kept = topk_indices(
                    frozen, frozen.decide(frozen.model.get_submodule(stem)(example))
                )
            idx = kept.get(chain.consumer)
            if idx is not None:
                return ChannelGather(idx)
    return nn.Identity()


def plan_book(
    target: Any,
    clips: Iterable[torch.Tensor],
    plans: int = 4,
    *,
    seed: int = 0,
    share_stem: bool = True,
    atol: float = 1e-4,
) -> PlanBook:
    """A :class:`PlanBook` of ``target`` (an :class:`~lightning_dance.aap.AdaptivePruner` or
    :class:`~lightning_dance.wrapper.DANCEWrapper` pruning channels only) with at most ``plans``
    sub-networks, from the decisions it makes on ``clips`` (batches ``[N, 3, T, H, W]`` of one
    clip shape, e.g. the validation set; fewer distinct decisions than ``plans`` give fewer
    plans). ``seed``: the k-means seeding. Each sub-network is checked against the frozen
    pruner it stands for (``atol``, see :func:`~lightning_dance.materialize.materialize`).
    ``target`` is not changed (the book holds copies)."""
    pruner = getattr(target, "pruner", target)
    if pruner.pruned_dims() != ("channel",):
        raise PlanBookError(
            "a plan book serves channel decisions only; this pruner also decides "
            f"{[d for d in pruner.pruned_dims() if d != 'channel']}: build it with "
            "dims=('channel',)"
        )
    if isinstance(plans, bool) or not isinstance(plans, int) or plans < 1:
        raise PlanBookError(f"plans must be an int >= 1, got {plans!r}")
    clips = list(clips)
    if not clips:
        raise PlanBookError("plan_book needs at least one batch of calibration clips")
    decided = channel_decisions(pruner, clips)
    layers = list(decided)
    dense_macs = {n: pruner.last_stats.layers[n].dense_macs for n in layers}
    weights = {n: (dense_macs[n] / decided[n].shape[1]) ** 0.5 for n in layers}
    points = torch.cat([decided[n].double() * weights[n] for n in layers], 1)
    centroids = _kmeans(points, plans, torch.Generator().manual_seed(seed))
    assign = torch.cdist(points, centroids).argmin(1)

    example = clips[0][:1]
    networks = []
    base = copy.deepcopy(pruner).eval()
    for j in range(len(centroids)):
        members = assign == j
        frozen = copy.deepcopy(base)
        freeze_channels(
            frozen, {n: decided[n][members].double().mean(0) for n in layers}, standalone=True
        )
        net = materialize(frozen, example, atol=atol)
        if share_stem:
            net.set_submodule(pruner.stem_name, _stem_input(pruner, frozen, example))
            with torch.no_grad():
                want = frozen(example)
                got = net(base.model.get_submodule(pruner.stem_name)(example))
            if got.shape != want.shape or float((got - want).abs().max()) > atol * (
                1.0 + float(want.abs().max())
            ):
                raise PlanBookError(
                    "the model does not feed its input straight to the stem "
                    f"{pruner.stem_name!r}, so a sub-network cannot start from the stem's "
                    "output: pass share_stem=False (each sub-network then runs the stem again)"
                )
        networks.append(net)
    return PlanBook(base, networks, centroids.float(), weights, share_stem).eval()
