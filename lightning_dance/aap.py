"""AAP, adaptive activation pruning, in plain PyTorch: a model + a controller + mask hooks.

:class:`AdaptivePruner` wraps any 3D CNN. On each forward pass it

1. runs the stem conv densely and hands its output to the :class:`~lightning_dance.controller.Controller`;
2. masks the *input* of every instrumented Conv3d per sample (frames, channels, spatial blocks),
   with gates chosen by the policy (``threshold``: DANCE, input-dependent counts; ``topk``: fixed
   keep-count per layer, static shapes);
3. records a :class:`PruningStats` (kept fractions, executed and expected MACs per layer and
   sample) in ``pruner.last_stats``.

Hooks live only for the duration of a forward call, so the user's model is never left modified:
it deep-copies, pickles, and loads its own checkpoints as before, and :meth:`AdaptivePruner.unwrap`
hands it back as it was. This masked execution computes what DANCE decides but multiplies pruned
activations by zero; the savings it *counts* are the ones the fast execution path realizes.

Example:
    >>> import torch
    >>> from lightning_dance.models import create_model
    >>> net = create_model("tiny_c3d", num_classes=4)
    >>> pruner = AdaptivePruner(net, dims=("frame", "channel"), budget=0.5)
    >>> logits = pruner(torch.randn(2, 3, 8, 32, 32))
    >>> pruner.last_stats.mac_ratio().shape
    torch.Size([2])
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from lightning_dance.clips import check_clip
from lightning_dance.controller import Controller, NoController, check_controller
from lightning_dance.decision import DecisionPlan
from lightning_dance.feature_sites import FeatureSite, get_feature_site
from lightning_dance.instrument import ForwardState, MaskHook, StemHook
from lightning_dance.keep_counts import credited_keep_ratio, memo, rounded_channels
from lightning_dance.layers import LayerSelector, select_conv3d, stem_names
from lightning_dance.losses import budget_loss, distillation_loss  # noqa: F401 (re-exported)
from lightning_dance.macs import count_macs
from lightning_dance.masks import DIMS, check_dims, check_layer_dims, keep_count
from lightning_dance.noise import GateNoise
from lightning_dance.policies import Policy, available_policies, get_policy
from lightning_dance.stats import LayerStats, PruningStats

if TYPE_CHECKING:
    from lightning_dance.execution.chains import ChannelChain

__all__ = [
    "POLICIES",
    "AdaptivePruner",
    "LayerStats",
    "PruningStats",
    "budget_loss",
    "distillation_loss",
]

#: the registered policy names when this module was imported (see
#: :func:`lightning_dance.policies.available_policies` for the current list)
POLICIES = available_policies()


class AdaptivePruner(nn.Module):
    """A 3D CNN with a DANCE controller masking the inputs of its Conv3d layers.

    Args:
        model: any ``nn.Module`` containing ``nn.Conv3d`` layers (called as ``model(clip)``).
        dims: which input dims to prune, any subset of ``("frame", "channel", "feature")``.
        policy: how scores become keep decisions: ``"threshold"`` (input-dependent keep
            counts), ``"topk"`` (fixed counts), ``"attention"`` (fixed shares ranked by
            attention on each layer's own input, no controller: ``docs/attention.md``), or any
            :class:`~lightning_dance.policies.Policy` (name, class or instance;
            ``pruner.policy`` is the object, equal to its name).
        budget: target executed/dense MAC ratio in (0, 1] (``topk`` derives its keep-counts from
            it; ``threshold`` is trained toward it; a budget-conditioned controller reads it).
        layers: which Conv3d layers to instrument (see :func:`lightning_dance.layers.select_conv3d`;
            default: all but the stem).
        budget_conditioned: the controller takes the budget as input, so one trained controller
            serves any budget (see :meth:`set_budget`).
        grid: spatial block grid for feature masks (``grid x grid`` blocks per layer at most).
        hidden: controller width.
        min_keep: entries always kept per dim, layer and sample (>= 1, so nothing is ever empty).
        tau: temperature of the training gates.
        noise: scale of the logistic (Gumbel) noise of the training gates; 0 makes training
            decisions equal to eval ones (:class:`~lightning_dance.wrapper.DANCEWrapper` anneals
            it to 0 so that the budget met in training is the one met at eval). The noise comes
            from the pruner's own generator (one per device type, seeded from the global RNG at
            first use, so ``seed_everything`` fixes it), whose state checkpoints carry
            (:meth:`noise_rng_state`): a resumed fit draws the noise an uninterrupted one would,
            whatever else used the global RNG (data loaders do) in between. Copies and pickles
            of the pruner do not carry it (they reseed at first use).
        init_keep: initial keep probability of the controller.
        controller: a controller of your own instead of DANCE's
            (:class:`~lightning_dance.controller.Controller`, built from ``hidden``, ``grid``,
            ``budget_conditioned`` and ``init_keep``, which are then not used): any
            ``nn.Module`` with the members of
            :class:`~lightning_dance.controller.ControllerLike` (it maps the stem output to a
            context, and the context to per-layer scores for this pruner's ``dims``).
        credit_outputs: count MACs as the fast path executes them with output skipping
            (:class:`~lightning_dance.execution.CompactPruner`, ``skip_outputs=True``): along a
            channel chain (see :meth:`output_chains`) the producer computes only the channels
            its consumer keeps, so its MACs are scaled by the consumer's kept-channel fraction,
            per clip and differentiably. The budget (training loss, ``topk`` keep counts,
            :meth:`calibrate`) is then the fast path's real cost, so the controller keeps more
            channels for the same cost. What the masked model computes does not change (it
            multiplies by zero either way); a batch on the fast path computes the union of its
            clips' kept channels, so this per-clip count is exact at batch 1 (and equals the
            static ``topk`` export's count). Default (``None``): on wherever it applies
            (``"channel"`` in ``dims`` and a policy with a controller), so that a budget is
            what the model runs; ``False`` counts every producer in full (the earlier default:
            at the same budget it runs about half the MACs and keeps fewer channels; on the
            benchmark it cost the dynamic methods 7-16 pp top-1 at 0.35, ``docs/budgets.md``).
            ``True`` where it cannot apply raises.
        channel_multiple: ``topk`` only: each layer keeps a multiple of this many input
            channels (or all of them; layers of at most this many channels are not rounded),
            so that the compact path's kept sizes are the ones its kernels are fast at (oneDNN
            on x86: 8; measured on R(2+1)D, ``benchmarks/latency_benchmark.py``). Each layer
            rounds down or up so that the total stays near the unrounded count (see
            :meth:`topk_count`); the MAC count and training use the rounded counts, and
            :meth:`calibrate` brings the total to the budget. Small layers cannot keep fewer
            than one multiple, which raises the lowest budget reachable.
        feature_site: ``"inputs"`` (default: input positions zeroed) or ``"outputs"`` (the
            mask selects the output positions computed: every dropped block is skipped work),
            see :mod:`lightning_dance.feature_sites`.
        layer_dims: ``{layer: dims}``: layers that prune only some of ``dims`` (possibly none;
            the others prune all), so that calibration and the budget loss put the cuts where
            skipping pays (:func:`~lightning_dance.execution.profitable_dims`). ``threshold``
            and ``attention`` only.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dims: tuple[str, ...] | list[str] = DIMS,
        policy: str | Policy | type[Policy] = "threshold",
        budget: float = 0.5,
        layers: LayerSelector = None,
        budget_conditioned: bool = False,
        grid: int = 4,
        hidden: int = 64,
        min_keep: int = 1,
        tau: float = 1.0,
        noise: float = 1.0,
        init_keep: float = 0.9,
        credit_outputs: bool | None = None,
        channel_multiple: int = 1,
        controller: nn.Module | None = None,
        feature_site: str | FeatureSite = "inputs",
        layer_dims: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        policy = get_policy(policy)
        self.feature_site = get_feature_site(feature_site)
        if min_keep < 1:
            raise ValueError(f"min_keep must be >= 1 (no empty layer input), got {min_keep}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.dims = check_dims(dims)
        if credit_outputs is None:  # on wherever it applies
            credit_outputs = "channel" in self.dims and not policy.needs_layer_input
        if not isinstance(credit_outputs, bool):
            raise TypeError(f"credit_outputs must be a bool or None, got {credit_outputs!r}")
        if credit_outputs and "channel" not in self.dims:
            raise ValueError(
                "credit_outputs=True credits the output channels a consumer's channel mask lets "
                f"its producer skip: it needs 'channel' in dims, got {self.dims}"
            )
        self.credit_outputs = credit_outputs
        if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int):
            raise TypeError(f"channel_multiple must be an int, got {channel_multiple!r}")
        if channel_multiple < 1:
            raise ValueError(f"channel_multiple must be >= 1, got {channel_multiple}")
        if channel_multiple > 1 and (not policy.fixed_counts or "channel" not in self.dims):
            raise ValueError(
                "channel_multiple rounds the number of channels a fixed-count policy keeps: it "
                f"needs policy='topk' and 'channel' in dims, got policy={policy.name!r}, "
                f"dims={self.dims}"
            )
        self.channel_multiple = channel_multiple
        unsupported = [d for d in self.dims if d not in (policy.supported_dims or self.dims)]
        if unsupported:
            raise ValueError(
                f"the {policy.name!r} policy decides {list(policy.supported_dims or ())} only, "
                f"not {unsupported}: pass dims={policy.supported_dims}"
            )
        if self.features_at_outputs and policy.needs_layer_input:
            raise ValueError(
                f"the {policy.name!r} policy scores each layer's input, so it decides features "
                "on the input's positions: use feature_site='inputs' with it"
            )
        self.policy, self.min_keep, self.tau = policy, min_keep, tau
        self.model = model
        self.stem_name = stem_names(model)[0]
        self.layer_names = list(select_conv3d(model, layers))
        modules = dict(model.named_modules())
        self._stem = modules[self.stem_name]
        self._layers = {name: modules[name] for name in self.layer_names}
        self.layer_dims = check_layer_dims(layer_dims or {}, self.layer_names, self.dims, policy)
        if policy.needs_layer_input:
            controller = NoController.checked(
                policy.name, controller=controller, grid=grid,
                budget_conditioned=budget_conditioned, credit_outputs=credit_outputs,
            )  # fmt: skip
        elif controller is None:
            controller = Controller(
                self._stem.out_channels,
                {name: m.in_channels for name, m in self._layers.items()},
                dims=self.dims,
                hidden=hidden,
                grid=grid,
                budget_conditioned=budget_conditioned,
                init_keep=init_keep,
            )
        else:
            check_controller(controller)
        self.controller = controller
        self.register_buffer("budget", torch.tensor(0.5, dtype=torch.float64))
        # post-hoc shift of every keep decision, set by calibrate(); the policy says what it
        # shifts (threshold: the logits; topk: the log of the keep ratio)
        self.register_buffer("calibration", torch.tensor(0.0, dtype=torch.float64))
        self.set_budget(budget)
        self.last_stats: PruningStats | None = None
        self._dense_cache: dict[tuple[int, ...], tuple[int, dict[str, int]]] = {}
        self._fixed_fraction = 0.0
        self._layer_share: dict[str, float] = {}
        self._credited: dict[tuple[float, ...], float] = {}  # (target, shares) -> keep ratio
        self._rounded: dict[tuple[float, ...], dict[str, int]] = {}  # (ratio, shares) -> counts
        self._chains: dict | None = None
        self._force_dense = False
        self.gate_noise = GateNoise()  # the training gates' noise stream (checkpointed)
        policy.prepare(self)

    def __getstate__(self) -> dict:
        # the last forward's statistics hold autograd graphs: not part of a copy or a pickle
        state = self.__dict__.copy()
        state["last_stats"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("gate_noise", GateNoise())  # pickles made before the noise stream
        state.setdefault("feature_site", get_feature_site("inputs"))  # before feature sites
        state.setdefault("layer_dims", {})  # before per-layer dims
        super().__setstate__(state)

    # ------------------------------------------------------------------ training noise RNG
    def noise_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of the training gates' noise on ``device`` (see ``noise``)."""
        return self.gate_noise.generator(device)

    def noise_rng_state(self) -> dict[str, torch.Tensor]:
        """The noise generators' states, for checkpoints (:meth:`GateNoise.state`)."""
        return self.gate_noise.state()

    def set_noise_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`noise_rng_state`."""
        self.gate_noise.set_state(states)

    # ------------------------------------------------------------------ configuration
    @property
    def budget_conditioned(self) -> bool:
        return self.controller.budget_conditioned

    def set_budget(self, budget: float) -> None:
        """Set the target executed/dense MAC ratio (in (0, 1])."""
        budget = float(budget)
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.budget.fill_(budget)

    def architecture(self) -> dict[str, object]:
        """What a trained controller is tied to: stem and instrumented layers with their shapes."""

        def sig(m: nn.Conv3d) -> list[int]:
            return [m.in_channels, m.out_channels, *m.kernel_size, *m.stride, m.groups]

        return {
            "stem": [self.stem_name, sig(self._stem)],
            "layers": {n: sig(m) for n, m in self._layers.items()},
            "dims": list(self.dims),
        }

    def unwrap(self) -> nn.Module:
        """The user's model, unmodified (hooks only exist during a forward call)."""
        return self.model

    def output_chains(self) -> dict[str, ChannelChain]:
        """``{producer: ChannelChain}``: the channel chains (see
        :func:`lightning_dance.execution.channel_chains`, found once with ``torch.fx``) whose
        producer and consumer are both instrumented and whose consumer prunes channels (the
        producer may prune any dims or none): there the producer need not compute the channels
        its consumer drops. Never the stem (the controller reads its whole output)."""
        if self._chains is None and self.policy.needs_layer_input:
            self._chains = {}  # a consumer's decision needs its input: nothing to look ahead at
        if self._chains is None:
            from lightning_dance.execution.chains import channel_chains  # execution imports aap

            consumers = {n for n in self.layer_names if "channel" in self.dims_of(n)}
            self._chains = {
                name: c for name, c in channel_chains(self.model).items()
                if c.consumer in consumers and name in self._layers
            }  # fmt: skip
        return self._chains

    def dims_of(self, layer: str) -> tuple[str, ...]:
        """The dims ``layer`` prunes (``layer_dims``, else every one of ``dims``)."""
        return self.layer_dims.get(layer, self.dims)

    def pruned_dims(self) -> tuple[str, ...]:
        """The dims some layer prunes (a subset of ``dims`` under ``layer_dims``), in order."""
        return tuple(d for d in self.dims if any(d in self.dims_of(n) for n in self.layer_names))

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Run with every mask forced to ones (the controller still runs): outputs = the model's."""
        previous, self._force_dense = self._force_dense, True
        try:
            yield
        finally:
            self._force_dense = previous

    # ------------------------------------------------------------------ forward
    def check_clip(self, clip: torch.Tensor) -> None:
        """Clear errors for clips the model cannot take (wrong rank, dtype or device, channel
        count, too few frames, NaN): :func:`lightning_dance.clips.check_clip` against the stem."""
        check_clip(clip, self._stem, self.stem_name)

    def prepare(self, clip: torch.Tensor) -> tuple[int, dict[str, int]]:
        """Validate ``clip`` and set what this clip shape's masks depend on; returns the dense
        MACs per clip (whole model, per instrumented layer). Called by :meth:`forward` and by
        external executors (:class:`lightning_dance.execution.CompactPruner`)."""
        self.check_clip(clip)
        dense_total, layer_dense = self._dense_counts(clip)
        self._fixed_fraction = 1.0 - sum(layer_dense.values()) / max(1, dense_total)
        self._layer_share = {n: m / max(1, dense_total) for n, m in layer_dense.items()}
        return dense_total, layer_dense

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        dense_total, layer_dense = self.prepare(clip)
        state = ForwardState()
        with self._hooks(state):
            out = self.model(clip)
        if state.plan is None:
            raise RuntimeError(f"the stem {self.stem_name!r} did not run in the forward pass")
        if self.credit_outputs:
            self._credit_skipped_outputs(state)
        shapes = {name: layer.input_shape for name, layer in state.layers.items()}
        self.last_stats = PruningStats(
            state.layers, dense_total, self.decision_macs(state.stem_shape, shapes)
        )
        return out

    def decision_macs(
        self, stem_shape: tuple[int, ...], layer_shapes: dict[str, tuple[int, ...]]
    ) -> int:
        """Multiply-adds per clip of making the keep decisions: the controller's at the stem's
        output shape ``(C0, T0, H0, W0)``, plus, for a policy that scores layer inputs, its
        scoring of each instrumented layer's input (``{layer: (C, T, H, W)}``); counted in
        ``last_stats.controller_macs`` and so in every executed figure."""
        grid = self.controller.grid
        scoring = sum(
            self.policy.scoring_macs(tuple(layer_shapes[n]), self.dims, grid)
            for n in self.layer_names
            if n in layer_shapes
        )
        return int(self.controller.macs(tuple(stem_shape))) + int(scoring)

    def _credit_skipped_outputs(self, state: ForwardState) -> None:
        """Scale each chain producer's MACs by its consumer's kept-channel fraction (per clip;
        a ``groups == 1`` conv spends the same MACs on every output channel)."""
        for name, chain in self.output_chains().items():
            producer, consumer = state.layers.get(name), state.layers.get(chain.consumer)
            if producer is None or consumer is None or "channel" not in consumer.masks:
                continue
            keep = state.channel_probs[chain.consumer]  # [N, C_out] straight-through 0/1
            c_out = keep.shape[1]
            kept = consumer.masks["channel"].flatten(1).sum(1).round().long()
            producer.executed_macs = producer.executed_macs // c_out * kept
            producer.expected_macs = producer.expected_macs * keep.flatten(1).mean(1)

    def _dense_counts(self, clip: torch.Tensor) -> tuple[int, dict[str, int]]:
        """Whole-model dense MACs (fvcore) and the instrumented layers' share, per clip shape."""
        key = tuple(clip.shape[1:])
        if key not in self._dense_cache:
            example = torch.zeros(1, *key, dtype=clip.dtype, device=clip.device)
            was_training = self.model.training
            self.model.eval()
            try:
                count = count_macs(self.model, example)
            finally:
                self.model.train(was_training)
            layer_dense = {n: int(count.by_module.get(n, 0)) for n in self.layer_names}
            self._dense_cache[key] = (int(count.total), layer_dense)
        return self._dense_cache[key]

    @property
    def features_at_outputs(self) -> bool:
        """Whether feature masks select layer outputs (``feature_site="outputs"``, pruned)."""
        return self.feature_site.at_outputs and "feature" in self.dims

    def mask_shape(self, layer: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``(C, T, H, W)`` every runtime asks the decision plan for when ``layer``'s
        input is ``input_shape``: the input's, with the output's ``(H_out, W_out)`` when
        :attr:`features_at_outputs` (:mod:`lightning_dance.feature_sites`)."""
        if not self.features_at_outputs:
            return tuple(input_shape)
        return self.feature_site.decision_shape(self._layers[layer], tuple(input_shape))

    @contextlib.contextmanager
    def _hooks(self, state: ForwardState) -> Iterator[None]:
        handles = [self._stem.register_forward_hook(StemHook(self, state))]
        for name, module in self._layers.items():
            hook = MaskHook(self, state, name)
            handles.append(module.register_forward_pre_hook(hook))
            if self.features_at_outputs:
                handles.append(module.register_forward_hook(hook.mask_output))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ masks
    def keep_ratio(self) -> float:
        """Per-dim keep ratio used by the ``topk`` policy for the current budget.

        The budget is a ratio of whole-model MACs; the instrumented layers must absorb all of the
        saving, so the per-dim ratio is ``(budget_of_instrumented_part) ** (1 / len(dims))``
        (channel and frame pruning multiply; feature pruning roughly so).
        """
        fixed_fraction = self._fixed_fraction
        b = float(self.budget)
        inst = (b - fixed_fraction) / max(1e-9, 1.0 - fixed_fraction)
        inst = min(1.0, max(1e-3, inst))
        ratio = inst ** (1.0 / len(self.dims))
        if self.credit_outputs and self._layer_share:
            ratio = self._credited_keep_ratio(b - fixed_fraction)
        ratio *= self.policy.ratio_scale(float(self.calibration))
        return min(1.0, max(1e-3, ratio))

    def topk_counts(
        self, shapes: dict[str, tuple[int, int, int, int]]
    ) -> dict[str, dict[str, int]]:
        """``{layer: {dim: k}}``: what the ``topk`` policy keeps of each layer whose input is
        ``shapes[layer] = (C, T, H, W)``, at the current budget (:meth:`topk_count`, the keep
        ratio computed once; features count the layer's blocks)."""
        ratio = self.keep_ratio()
        grid = self.controller.grid
        counts = {}
        for name, shape in shapes.items():
            c, t, h, w = self.mask_shape(name, shape)  # features: the grid they decide on
            sizes = {"frame": t, "channel": c, "feature": min(grid, h) * min(grid, w)}
            counts[name] = {d: self.topk_count(d, sizes[d], name, ratio) for d in self.dims}
        return counts

    def topk_count(
        self, dim: str, size: int, layer: str | None = None, ratio: float | None = None
    ) -> int:
        """How many of ``layer``'s ``size`` entries along ``dim`` the ``topk`` policy keeps at
        the current budget.

        With ``channel_multiple > 1`` a layer's channel count is the multiple just below or
        just above ``keep_ratio() * size`` (or all ``size`` channels), chosen layer by layer in
        network order so that the MACs rounded away so far and those added cancel (error
        diffusion, weighted by each layer's MAC share): every layer runs at a fast size while
        the total stays near the unrounded budget, instead of jumping when many equal-sized
        layers round the same way. Without ``layer`` (or before the first forward) the nearest
        multiple. ``ratio``: :meth:`keep_ratio`, when the caller has it already."""
        ratio = self.keep_ratio() if ratio is None else ratio
        if dim != "channel" or self.channel_multiple == 1:
            return keep_count(ratio, size, self.min_keep)
        plan = self._rounded_channels(ratio) if layer is not None else {}
        if layer in plan and self._layers[layer].in_channels == size:
            return plan[layer]
        return keep_count(ratio, size, self.min_keep, self.channel_multiple)

    def _rounded_channels(self, ratio: float) -> dict[str, int]:
        """``{layer: kept channels}`` for :meth:`topk_count` (cached per ratio and shares)."""
        return memo(self._rounded, (ratio, *self._layer_share.values()), lambda: rounded_channels(
            self._layer_share, {n: m.in_channels for n, m in self._layers.items()}, ratio,
            dims=len(self.dims), multiple=self.channel_multiple, min_keep=self.min_keep,
        ))  # fmt: skip

    def _credited_keep_ratio(self, target: float) -> float:
        """The per-dim keep ratio whose instrumented MACs, a chain producer's scaled by its
        consumer's ratio of the channels, are ``target`` (asked once per layer and forward:
        solved once per budget)."""

        def solve() -> float:
            producers, d = set(self.output_chains()), len(self.dims)
            shares = [(f, d + (n in producers)) for n, f in self._layer_share.items()]
            return credited_keep_ratio(shares, target)

        return memo(self._credited, (target, *self._layer_share.values()), solve)

    @torch.no_grad()
    def calibrate(
        self, clips: torch.Tensor | list[torch.Tensor], *, iters: int = 20, tol: float = 0.002
    ) -> float:
        """Shift the keep decisions so that eval MACs meet the budget on ``clips``; returns the
        mean executed/dense ratio reached.

        Hard eval masks of a trained controller rarely hit the budget exactly (training sees
        noisy gates); a bisection on one offset (added to every logit for ``threshold``, scaling
        the keep ratio for ``topk``) fixes that on a calibration set, e.g. a few validation
        batches. The ratio is monotone in the offset, so bisection converges. The offset is a
        buffer: saved with the checkpoint, valid for the current budget.
        """
        batches = [clips] if isinstance(clips, torch.Tensor) else list(clips)
        if not batches:
            raise ValueError("calibrate needs at least one batch of clips")
        was_training = self.training
        self.eval()
        target = float(self.budget)

        def ratio_at(offset: float) -> float:
            self.calibration.fill_(offset)
            ratios = []
            for clip in batches:
                self(clip)
                ratios.append(self.last_stats.mac_ratio())
            return float(torch.cat(ratios).mean())

        span = self.policy.calibration_span
        lo, hi = -span, span
        try:
            while ratio_at(lo) > target and lo > -1e3:
                lo *= 2
            while ratio_at(hi) < target and hi < 1e3:
                hi *= 2
            floor = ratio_at(lo)
            if floor > target + tol:
                warnings.warn(
                    f"budget {target:.3f} is out of reach: keeping the minimum of every "
                    f"instrumented layer still executes {floor:.3f} of the dense MACs (the stem, "
                    "the head and the layers DANCE does not prune stay dense); calibrated to the "
                    "floor",
                    stacklevel=2,
                )
            best, best_err = 0.0, float("inf")
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                r = ratio_at(mid)
                if abs(r - target) < best_err:
                    best, best_err = mid, abs(r - target)
                if abs(r - target) <= tol:
                    break
                lo, hi = (mid, hi) if r < target else (lo, mid)
            return ratio_at(best)
        finally:
            self.train(was_training)

    def decide(self, stem_out: torch.Tensor, prefetch: bool = False) -> DecisionPlan:
        """The :class:`~lightning_dance.decision.DecisionPlan` of a batch from its stem output
        ``[N, C0, T0, H0, W0]``: the controller runs once here; every layer's keep decisions
        follow from the plan (by this pruner's policy, budget, calibration and mode).

        ``prefetch`` (runtimes that ask every layer, in eval): the layers a plan for this stem
        shape was asked for before are decided at once (:meth:`DecisionPlan.prefetch`), the
        others noted for the next plan."""
        plan = self._plan(stem_out)
        if prefetch and not self.training:
            known = self.__dict__.setdefault("_asked_shapes", {})
            asked = known.setdefault(tuple(stem_out.shape[1:]), {})
            plan.prefetch(asked)
            plan.record = asked
        return plan

    def _plan(self, stem_out: torch.Tensor) -> DecisionPlan:
        """:meth:`decide` without prefetching."""
        budget = self.budget.to(stem_out.dtype) if self.budget_conditioned else None
        ctx = self.controller(stem_out, budget)
        noisy = self.training and self.noise and not self._force_dense
        counts = None
        if self.policy.fixed_counts:
            ratio = self.keep_ratio()  # fixed for this forward: computed once

            def counts(layer: str, dim: str, size: int) -> int:
                return self.topk_count(dim, size, layer, ratio)

        return DecisionPlan(
            self.controller,
            ctx,
            self.policy,
            counts=counts,
            offset=self.policy.logit_offset(float(self.calibration)),
            training=self.training,
            tau=self.tau,
            noise=self.noise,
            min_keep=self.min_keep,
            dense=self._force_dense,
            generator=self.noise_generator(stem_out.device) if noisy else None,
            dims=self.dims,
            layer_dims=self.layer_dims,
        )
