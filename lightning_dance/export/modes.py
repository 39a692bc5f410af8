"""Export-friendly modules for each export mode of a DANCE model.

An :class:`~lightning_dance.aap.AdaptivePruner` computes its masks inside hooks that also count
MACs, validate clips and read buffers as Python floats: fine in eager mode, not capturable by
``torch.export``. :func:`build_export_module` turns a model, an ``AdaptivePruner`` or a
``DANCEWrapper`` into a plain ``nn.Module`` ``clip -> logits`` for one mode:

- ``"dense"``: the user's model, unchanged (no controller).
- ``"masked"``: controller + eval masks multiplied into each instrumented Conv3d's input,
  exactly what ``pruner(clip)`` computes in eval mode (any policy). Static shapes, runs on every
  target, saves nothing.
- ``"topk"`` (``policy="topk"`` pruners): channels and frames are *gathered* to the fixed
  keep-counts (:func:`lightning_dance.execution.static.static_topk_conv3d`): static shapes,
  real savings; features (if pruned) are still multiplied by their mask; layers the static path
  does not support (grouped, non-depthwise convs with channel pruning) fall back to masked
  multiplication and are listed in :attr:`ExportPlan.masked_layers`.
- ``"threshold"`` (``policy="threshold"`` pruners): the kept channels and frames, as many as
  the gates keep for each clip, are gathered (``nonzero`` + ``index_select``): *dynamic*
  shapes, for runtimes that allow them (onnxruntime, TensorRT, not the Hexagon NPU); the
  plan's ``executed_macs`` are those of the first example clip.

In every mode but ``"dense"`` the module runs a copy of the model in which each eval BatchNorm3d
that alone reads a Conv3d's output (not the stem's: the controller reads that raw) is folded
into the conv's weights and bias (:attr:`ExportPlan.folded_norms`). Exporters fold such pairs
themselves only when the conv weight is a constant; a gathered (``topk``, ``threshold``) weight
is not, and the BatchNorm would stay in the graph as a multiply and an add over the layer's
output. ``topk`` layers take their kept indices straight from a ``TopK`` of the controller's
scores (no 0/1 mask in between).

The budget, the calibration offset and the ``topk`` keep-counts are baked in as constants for
the example clip's shape: no Python branch depends on data, so ``torch.export`` captures the
module faithfully (it raises on a data-dependent branch instead of baking it in, unlike
``torch.jit.trace``).

Example:
    >>> import torch
    >>> from lightning_dance.aap import AdaptivePruner
    >>> from lightning_dance.models import create_model
    >>> pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), policy="topk").eval()
    >>> clip = torch.randn(1, 3, 4, 16, 16)
    >>> module, plan = build_export_module(pruner, "topk", clip)
    >>> bool(torch.allclose(module(clip), pruner(clip), atol=1e-5))
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lightning_dance.aap import AdaptivePruner
from lightning_dance.decision import DecisionPlan, LayerInputError
from lightning_dance.feature_sites import INPUTS
from lightning_dance.macs import count_macs

__all__ = ["MODES", "DANCEExportModule", "ExportPlan", "build_export_module", "unwrap_pruner"]

MODES = ("dense", "masked", "topk", "threshold")


@dataclass
class ExportPlan:
    """What an export module computes for the example clip's shape (per clip, ``N = 1``)."""

    mode: str
    policy: str | None
    dims: tuple[str, ...] = ()
    budget: float | None = None
    dense_macs: int = 0
    executed_macs: int = 0  # what the exported graph computes (controller included)
    policy_macs: float | None = None  # what DANCE's policy counts on the example clip (mean)
    keep_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # topk: layer -> dim -> k
    masked_layers: list[str] = field(default_factory=list)  # topk: layers multiplied, not gathered
    #: smallest gap behind a keep/drop decision on the example clip, relative to the largest
    #: |score| of its layer and dim (threshold: |logit|; topk: k-th minus (k+1)-th score): a
    #: runtime computing the controller in fp16 (the Hexagon NPU) flips decisions closer than
    #: its rounding (a few percent, measured on the HTP simulator)
    gate_margin: float | None = None
    #: BatchNorm3d modules folded into the conv before them (name -> conv name)
    folded_norms: dict[str, str] = field(default_factory=dict)


def unwrap_pruner(model: nn.Module) -> AdaptivePruner | None:
    """The :class:`AdaptivePruner` of a DANCE model (a pruner or a ``DANCEWrapper``), else None."""
    if isinstance(model, AdaptivePruner):
        return model
    pruner = getattr(model, "pruner", None)
    return pruner if isinstance(pruner, AdaptivePruner) else None


class _Route:
    """What the stem tap hands to the gated convs during one forward (a plain object, so that
    ``torch.export`` in strict mode traces the hand-over as ordinary Python data flow):
    ``plan``, the clip's decisions; ``early``: chain consumer -> its kept channels ``[N, k]``,
    handed over when its producer ran."""

    plan: DecisionPlan | None = None
    early: dict[str, torch.Tensor] | None = None


class _StemTap(nn.Module):
    """The stem module, plus: its output feeds the controller (once per forward)."""

    def __init__(self, stem: nn.Module, owner: DANCEExportModule) -> None:
        super().__init__()
        self.stem = stem
        self._owner = (owner,)  # a tuple: not registered as a submodule (no cycle)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.stem(*args, **kwargs)
        owner = self._owner[0]
        if owner.route.plan is None:
            budget = None
            if owner.budget_value is not None:
                budget = torch.full((), owner.budget_value, dtype=out.dtype)
            owner.route.plan = owner.decide(owner.controller(out, budget))
        return out


class _GatedConv3d(nn.Module):
    """An instrumented Conv3d: its input masked by the controller's eval masks, or (``topk`` and
    ``threshold`` modes, supported layers) its kept channels / frames gathered
    (``static_topk_conv3d``: ``k`` fixed for ``topk``, input-dependent for ``threshold``)."""

    def __init__(
        self,
        conv: nn.Conv3d,
        name: str,
        owner: DANCEExportModule,
        gather: bool,
        consumer: str | None = None,
    ):
        super().__init__()
        self.conv, self.name, self.gather = conv, name, gather
        self.consumer = consumer  # topk channel chain: compute only what this conv keeps
        self._owner = (owner,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:

        owner = self._owner[0]
        plan, shape = owner.route.plan, owner.mask_shape(self.name, tuple(x.shape[1:]))
        if self.gather and owner.mode == "topk":  # kept channels / frames as indices
            masks = dict(plan.indices(self.name, shape))
        else:
            masks = dict(plan.masks(self.name, shape).values)
        site = owner.feature_site
        if site.at_outputs and "feature" in masks:  # selects outputs: applied to the result
            selected = masks.pop("feature")
            return site.mask_output(self._run(x, masks, plan, owner), selected, self.conv.bias)
        return self._run(x, masks, plan, owner)

    def _run(self, x: torch.Tensor, masks: dict, plan: Any, owner: Any) -> torch.Tensor:
        from lightning_dance.execution.static import static_topk_conv3d
        from lightning_dance.masks import apply_masks

        if not self.gather:
            return self.conv(apply_masks(x, masks))
        if "feature" in masks:
            x = apply_masks(x, {"feature": masks["feature"]})
        if owner.mode == "threshold":  # kept entries of input-dependent number, per clip
            outs = []
            for i in range(x.shape[0]):
                idx = {}
                for dim in ("channel", "frame"):
                    if dim in masks:
                        kept = masks[dim][i].nonzero()[:, 0]
                        torch._check(kept.shape[0] >= 1)  # min_keep >= 1: never empty
                        idx[f"{dim}_idx"] = kept.unsqueeze(0)
                outs.append(static_topk_conv3d(self.conv, x[i : i + 1], **idx))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        idx: dict[str, Any] = {f"{d}_idx": masks[d] for d in ("channel", "frame") if d in masks}
        early = owner.route.early
        if early is not None and self.name in early:  # x holds only the kept channels
            idx["channel_idx"], idx["input_gathered"] = early.pop(self.name), True
        if self.consumer is not None and early is not None:
            consumer_shape = owner.mask_shape(self.consumer, owner.shapes[self.consumer])
            kept = plan.indices(self.consumer, consumer_shape)["channel"]
            idx["out_idx"] = early[self.consumer] = kept
        return static_topk_conv3d(self.conv, x, **idx)


class _GatheredNorm(nn.Module):
    """An eval BatchNorm3d inside a channel chain: its input holds, per sample, only the
    channels the chain's consumer keeps (``route.early[consumer]``, ``[N, k]``), so the
    per-channel scale and shift are gathered to them."""

    def __init__(self, norm: nn.BatchNorm3d, consumer: str, owner: DANCEExportModule) -> None:
        super().__init__()
        self.norm, self.consumer = norm, consumer
        self._owner = (owner,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lightning_dance.execution.indexed import norm_scale_shift

        scale, shift = norm_scale_shift(self.norm)
        idx = self._owner[0].route.early[self.consumer]  # [N, k]
        n, k = idx.shape
        flat = idx.reshape(-1)
        s = scale.index_select(0, flat).view(n, k, 1, 1, 1)
        b = shift.index_select(0, flat).view(n, k, 1, 1, 1)
        return x * s + b


class DANCEExportModule(nn.Module):
    """A capturable ``clip -> logits`` module running a pruner's controller and eval masks.

    Built by :func:`build_export_module` (``mode`` ``"masked"`` or ``"topk"``) from a *copy* of
    the pruner's model, whose stem and instrumented Conv3d modules are replaced by modules that
    run the controller and the masks (no hooks, no patched methods): ``torch.export`` captures
    it in strict and non-strict mode. The controller is shared with the pruner.
    """

    def __init__(
        self,
        pruner: AdaptivePruner,
        mode: str,
        shapes: dict[str, tuple[int, int, int, int]],
        keep_counts: dict[str, dict[str, int]],
        gathered: set[str],
        chains: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.controller = pruner.controller
        self.mode, self.policy, self.dims = mode, pruner.policy, pruner.dims
        self.stem_name, self.layer_names = pruner.stem_name, list(pruner.layer_names)
        self.min_keep = pruner.min_keep
        self.offset = pruner.policy.logit_offset(float(pruner.calibration))
        self.budget_value = float(pruner.budget) if pruner.budget_conditioned else None
        self.shapes, self.keep_counts, self.gathered = shapes, keep_counts, set(gathered)
        self.route = _Route()
        self.feature_site = pruner.feature_site if "feature" in self.dims else INPUTS
        self.layer_dims = dict(getattr(pruner, "layer_dims", {}))  # layers pruning fewer dims
        self._margins: list[float] | None = None
        self.chains = dict(chains or {})  # producer -> ChannelChain (topk output skipping)
        model = copy.deepcopy(pruner.model)
        self.folded_norms = _fold_norms(model, pruner)
        _replace(model, self.stem_name, _StemTap(model.get_submodule(self.stem_name), self))
        for name in self.layer_names:
            conv = model.get_submodule(name)
            chain = self.chains.get(name)
            consumer = chain.consumer if chain is not None else None
            _replace(model, name, _GatedConv3d(conv, name, self, name in self.gathered, consumer))
        for chain in self.chains.values():
            for norm in chain.norms:
                if norm in self.folded_norms:  # folded into the producer's gathered rows
                    continue
                bn = model.get_submodule(norm)
                _replace(model, norm, _GatheredNorm(bn, chain.consumer, self))
        self.model = model

    def mask_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``name``'s masks are decided on (as ``AdaptivePruner.mask_shape``)."""
        if not self.feature_site.at_outputs:
            return shape
        return self.feature_site.decision_shape(self.model.get_submodule(name).conv, shape)

    def decide(self, ctx: Any) -> DecisionPlan:
        """The eval decisions of one forward from the controller's context: the pruner's
        policy with this module's baked-in offset and keep counts."""
        counts = self.keep_counts if self.policy.fixed_counts else None
        plan = DecisionPlan(
            self.controller, ctx, self.policy, counts=counts, offset=self.offset,
            min_keep=self.min_keep, layer_dims=self.layer_dims,
        )  # fmt: skip
        plan.margins = self._margins  # eager, in build_export_module only
        return plan

    def gate_margin(self, clip: torch.Tensor) -> float:
        """The smallest decision gap (:attr:`ExportPlan.gate_margin`) on ``clip`` (eager)."""
        self._margins = []
        try:
            with torch.no_grad():
                self(clip)
            return min(self._margins, default=math.inf)
        finally:
            self._margins = None

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        self.route.plan, self.route.early = None, {}
        try:
            return self.model(clip)
        finally:
            self.route.plan, self.route.early = None, None


def _fold_norms(model: nn.Module, pruner: AdaptivePruner) -> dict[str, str]:
    """Fold, in ``model`` (a copy of ``pruner.model``), each eval BatchNorm3d with running
    statistics that alone reads a Conv3d's output into that conv (``torch.nn.utils.fusion``),
    the BatchNorm becoming an ``nn.Identity``; never the stem's, whose raw output the controller
    reads. Returns ``{BatchNorm name: conv name}``."""
    from lightning_dance.execution.folding import foldable_norms, norm_is_foldable

    folded = {}
    for conv_name, norm_name in foldable_norms(pruner.model, keep=(pruner.stem_name,)).items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(norm_name)
        if not norm_is_foldable(bn):
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        _replace(model, norm_name, nn.Identity())
        folded[norm_name] = conv_name
    return folded


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _static_supported(conv: nn.Conv3d, dims: tuple[str, ...]) -> bool:
    if "channel" in dims and conv.groups not in (1, conv.in_channels):
        return False
    if conv.padding_mode != "zeros" and conv.padding not in (0, (0, 0, 0), "valid"):
        return False
    if isinstance(conv.padding, str) and conv.padding == "same":
        return all(
            d * (k - 1) % 2 == 0 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        )
    return True


@torch.no_grad()
def build_export_module(
    model: nn.Module, mode: str, example_clip: torch.Tensor, *, skip_outputs: bool | None = None
) -> tuple[nn.Module, ExportPlan]:
    """The module to export for ``mode`` and its :class:`ExportPlan` (MACs per clip).

    Args:
        model: a plain 3D CNN (``"dense"`` only), an ``AdaptivePruner`` or a ``DANCEWrapper``.
        mode: one of :data:`MODES`.
        example_clip: ``[N, C, T, H, W]``; keep-counts and MACs are for this shape.
        skip_outputs: ``topk`` mode: along each channel chain
            (:meth:`AdaptivePruner.output_chains`) the producer computes only the channels its
            consumer keeps (its weight rows gathered, with the BatchNorm after it folded in;
            the parameters of any other BatchNorm in between gathered too),
            and the consumer reads them without a gather. Chains through a BatchNorm that
            normalizes with batch statistics keep every output. Verified in onnxruntime,
            ``torch.export`` and the QNN HTP simulator (``False``: every producer computes all
            its outputs, as the pruner's uncredited count assumes). Default (``None``): on,
            except for a pruner whose feature masks select outputs
            (``feature_site="outputs"``): its skipped positions hold the conv's bias, which a
            producer with a folded BatchNorm no longer has; ``True`` there raises.

    Raises:
        ValueError: unknown mode, or a mode that needs a DANCE model / the matching policy.
        LayerInputError: a non-dense mode for a policy that scores layer inputs (``attention``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pruner = unwrap_pruner(model)
    one = example_clip[:1]
    if pruner is None:
        if mode != "dense":
            raise ValueError(
                f"mode={mode!r} needs a DANCE model (AdaptivePruner or DANCEWrapper); "
                f"{type(model).__name__} has no controller: use mode='dense'"
            )
        model = model.eval()
        dense = int(count_macs(model, one, per_module=False).total)
        return model, ExportPlan("dense", None, dense_macs=dense, executed_macs=dense)
    policy = pruner.policy
    if mode != "dense" and policy.needs_layer_input:
        raise LayerInputError(
            f"mode={mode!r}: the {policy.name!r} policy decides each layer from that layer's "
            "input, inside the network, which the export graphs (decisions made from the stem "
            "output) do not express yet: export mode='dense', or a pruner with policy='topk' "
            "(docs/attention.md)"
        )
    if mode == "threshold" and policy.fixed_counts:
        raise ValueError(
            f"mode='threshold' needs a pruner trained with policy='threshold' (input-dependent "
            f"counts), this one uses {policy.name!r}: export mode='topk' instead"
        )
    if mode == "topk" and not policy.fixed_counts:
        raise ValueError(
            f"mode='topk' needs a pruner trained with policy='topk' (fixed counts), this one "
            f"uses {policy.name!r}: export mode='masked' instead"
        )
    outputs = pruner.features_at_outputs
    if mode == "topk" and skip_outputs and outputs:
        raise ValueError(
            "mode='topk' with skip_outputs=True folds BatchNorms into the chain producers, "
            "whose skipped output positions (feature_site='outputs') would then need the "
            "folded bias: leave skip_outputs at its default (off for such a pruner), or export "
            "mode='masked'"
        )
    if skip_outputs is None:
        skip_outputs = not outputs
    pruner.eval()
    pruner(one)  # sets the fixed MAC fraction (topk keep ratio) and the statistics
    stats = pruner.last_stats
    plan = ExportPlan(mode, policy.name, pruner.dims, float(pruner.budget))
    plan.dense_macs = int(stats.dense_total)
    plan.policy_macs = float(stats.executed_macs().double().mean())
    shapes = {name: tuple(s.input_shape) for name, s in stats.layers.items()}
    modules = dict(pruner.model.named_modules())
    gathered: set[str] = set()
    if policy.fixed_counts:
        plan.keep_counts = pruner.topk_counts(shapes)
    chains: dict[str, Any] = {}
    if mode in ("topk", "threshold"):
        from lightning_dance.execution.static import static_executed_macs

        for name in shapes:
            k = plan.keep_counts[name] if mode == "topk" else stats.layers[name].masks
            if ("channel" in k or "frame" in k) and _static_supported(modules[name], pruner.dims):
                gathered.add(name)
            else:
                plan.masked_layers.append(name)
        if mode == "topk" and skip_outputs:  # producers compute only what consumers keep
            chains = {
                p: c for p, c in pruner.output_chains().items()
                if p in gathered and c.consumer in gathered
                and all(modules[n].track_running_stats for n in c.norms)
            }  # fmt: skip
        executed = stats.fixed_macs + stats.controller_macs
        for name, shape in shapes.items():
            if name not in gathered:
                executed += stats.layers[name].dense_macs
                continue
            if mode == "topk":
                k = plan.keep_counts[name]
            else:  # what the first example clip keeps (input-dependent)
                k = {d: int(m[0].sum()) for d, m in stats.layers[name].masks.items()}
            k_out = plan.keep_counts[chains[name].consumer]["channel"] if name in chains else None
            executed += static_executed_macs(
                modules[name], shape, k_channel=k.get("channel"), k_frame=k.get("frame"),
                k_out=k_out,
            )  # fmt: skip
        plan.executed_macs = int(executed)
    else:  # masked: everything is computed, plus the controller
        plan.executed_macs = int(stats.dense_total + stats.controller_macs)
    module = DANCEExportModule(pruner, mode, shapes, plan.keep_counts, gathered, chains).eval()
    plan.gate_margin = module.gate_margin(example_clip)
    plan.folded_norms = dict(module.folded_norms)
    return module, plan


def copy_for_export(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode deep copy (exports never touch the training model)."""
    return copy.deepcopy(model).cpu().eval()
