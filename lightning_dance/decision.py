"""The decision plan: what one batch of clips keeps in every instrumented layer.

DANCE decides everything right after the stem: the controller reads the stem's output once, and
from its context (:class:`~lightning_dance.controller.ControllerContext`) follow the keep
decisions of every layer. A :class:`DecisionPlan` holds that context with the rules that turn
scores into decisions (the :class:`~lightning_dance.policies.Policy`, the calibration offset,
the fixed keep counts) and hands out each layer's decisions, made once and cached, in the form
each runtime needs:

- :meth:`DecisionPlan.masks`: 0/1 masks over the layer's input (frames ``[N, T]``, channels
  ``[N, C]``, spatial blocks expanded to ``[N, H, W]``), read by the masked forward
  (:class:`~lightning_dance.aap.AdaptivePruner`, which also counts MACs from them), by the
  general plan of the compact path (:class:`~lightning_dance.execution.CompactPruner`) and by the
  masked and ``threshold`` export graphs;
- :meth:`DecisionPlan.indices`: kept channels / frames as indices ``[N, k]`` (fixed-count
  policies), read by the ``topk`` export graph;
- :meth:`DecisionPlan.channel_indices`: one clip's kept channels of many layers, sorted, with one
  ``topk`` per group of equal-width layers (the compact path's batch-1 index plan).

A policy that scores each layer from that layer's own input
(:attr:`~lightning_dance.policies.Policy.needs_layer_input`: ``"attention"``) decides a layer
only when its input arrives: every runtime passes it (``masks(layer, shape, inputs=x)``), and the
plan asks the policy (:meth:`~lightning_dance.policies.Policy.layer_scores`) instead of the
controller; the rest (counts, calibration, gates, caching) is shared.

Every runtime asks the same plan, so a chain producer that looks ahead at its consumer's
decision (to compute only the channels it keeps) gets the very masks the consumer then reads.
A plan's decisions are valid for one forward pass; make a new one per batch
(:meth:`~lightning_dance.aap.AdaptivePruner.decide`).

Example:
    >>> import torch
    >>> from lightning_dance.aap import AdaptivePruner
    >>> from lightning_dance.models import create_model
    >>> pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), budget=0.5).eval()
    >>> clip = torch.randn(2, 3, 8, 32, 32)
    >>> stem = pruner.model.get_submodule(pruner.stem_name)
    >>> plan = pruner.decide(stem(clip))      # the controller runs once, here
    >>> name = pruner.layer_names[0]          # "conv2.0", whose input is [N, 16, 8, 16, 16]
    >>> masks = plan.masks(name, (16, 8, 16, 16))
    >>> sorted(masks.values), masks.values["channel"].shape
    (['channel', 'feature', 'frame'], torch.Size([2, 16]))
    >>> plan.masks(name, (16, 8, 16, 16)) is masks    # decided once
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from lightning_dance.controller import ControllerLike
from lightning_dance.errors import DanceError
from lightning_dance.masks import DIMS, LayerMasks, expand_blocks
from lightning_dance.policies import Policy

__all__ = ["DecisionPlan", "LayerInputError"]


class LayerInputError(DanceError, RuntimeError):
    """A decision of a policy that scores layer inputs was asked for without that input."""


#: ``(layer, dim, size) -> k``: how many entries a fixed-count policy keeps
KeepCounts = Callable[[str, str, int], int]


class DecisionPlan:
    """The keep decisions of one batch in every instrumented layer (see the module docstring).

    Args:
        controller: the score source (:class:`~lightning_dance.controller.ControllerLike`).
        ctx: its context for this batch (the controller's output on the stem output).
        policy: how scores become decisions.
        counts: ``(layer, dim, size) -> k`` for a :attr:`~Policy.fixed_counts` policy: a
            callable, or a mapping ``{layer: {dim: k}}`` (an export's baked-in counts).
        offset: added to every score (the policy's share of the calibration).
        training, tau, noise, min_keep: the gates' settings (training: straight-through
            masks with gradients to the controller).
        generator: where the training gates draw their noise (default: the global RNG).
        dense: every mask all ones (the controller still ran): outputs equal the dense model.
        dims: the pruned dims, for a policy that scores layer inputs (default: all).
        layer_dims: ``{layer: dims}`` for layers that prune only some of the dims (the others
            keep everything along the rest); absent layers prune every dim scored.
    """

    def __init__(
        self,
        controller: ControllerLike,
        ctx: Any,
        policy: Policy,
        *,
        counts: KeepCounts | Mapping[str, Mapping[str, int]] | None = None,
        offset: float = 0.0,
        training: bool = False,
        tau: float = 1.0,
        noise: float = 1.0,
        min_keep: int = 1,
        dense: bool = False,
        generator: torch.Generator | None = None,
        dims: tuple[str, ...] = DIMS,
        layer_dims: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        if policy.fixed_counts and counts is None:
            raise ValueError(f"the {policy.name!r} policy keeps fixed counts: pass counts=")
        self.controller, self.ctx, self.policy = controller, ctx, policy
        self.offset, self.training, self.dense = float(offset), training, dense
        self.tau, self.noise, self.min_keep = tau, noise, min_keep
        self.generator, self.dims = generator, tuple(dims)
        self.layer_dims = dict(layer_dims or {})
        self._counts = counts
        self._masks: dict[tuple[str, tuple[int, ...]], LayerMasks] = {}
        self._indices: dict[tuple[str, tuple[int, ...]], dict[str, torch.Tensor]] = {}
        #: when a list: every decision's margin (:meth:`Policy.margin`) is appended to it
        self.margins: list[float] | None = None
        #: when a dict: every layer decided one by one is noted in it as ``{layer: shape}`` (a
        #: later plan for the same clip shape :meth:`prefetch`-es them)
        self.record: dict[str, tuple[int, ...]] | None = None

    def keep_count(self, layer: str, dim: str, size: int) -> int | None:
        """How many of ``size`` entries a fixed-count policy keeps (``None``: input-dependent)."""
        counts = self._counts
        if counts is None or not self.policy.fixed_counts:
            return None
        return counts(layer, dim, size) if callable(counts) else int(counts[layer][dim])

    def scores(
        self, layer: str, shape: tuple[int, ...], inputs: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{dim: scores}`` of ``layer`` whose input is ``(C, T, H, W)``: the controller's
        logits plus the offset (channels ``[N, C]``, frames ``[N, T]``, blocks ``[N, gh, gw]``),
        or, for a policy that scores layer inputs, its scores of ``inputs`` (the layer's input
        ``[N, C, T, H, W]``, required then)."""
        if self.policy.needs_layer_input:
            if inputs is None:
                raise LayerInputError(
                    f"the {self.policy.name!r} policy decides {layer!r} from the layer's own "
                    "input: pass it as inputs= (a runtime that decides before the input exists, "
                    "e.g. output skipping along channel chains or an export graph, cannot run "
                    "this policy)"
                )
            if tuple(inputs.shape[1:]) != tuple(shape):
                raise ValueError(
                    f"inputs of {layer!r} have shape {tuple(inputs.shape[1:])}, expected {shape}"
                )
            logits = self.policy.layer_scores(inputs, self.dims, self.controller.grid)
        else:
            logits = self.controller.layer_logits(self.ctx, layer, tuple(shape))
        only = self.layer_dims.get(layer)
        if only is not None:
            logits = {d: lg for d, lg in logits.items() if d in only}
        if self.offset:
            logits = {d: lg + self.offset for d, lg in logits.items()}
        return logits

    def masks(
        self, layer: str, shape: tuple[int, ...], inputs: torch.Tensor | None = None
    ) -> LayerMasks:
        """The 0/1 masks of ``layer`` whose input is ``(C, T, H, W)`` (made once per layer and
        shape): ``values`` at full resolution, ``probs`` per block for features. ``inputs``:
        the layer's input, which a policy that scores layer inputs needs (others ignore it)."""
        key = (layer, tuple(shape))
        made = self._masks.get(key)
        if made is None:
            made = self._masks[key] = self._decide(layer, tuple(shape), inputs)
            if self.record is not None:
                self.record[layer] = key[1]
        return made

    def _decide(
        self, layer: str, shape: tuple[int, ...], inputs: torch.Tensor | None
    ) -> LayerMasks:
        h, w = shape[2:]
        values: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        for dim, lg in self.scores(layer, shape, inputs).items():
            flat = lg.flatten(1)
            k = self.keep_count(layer, dim, flat.shape[1])
            if self.margins is not None:
                self.margins.append(self.policy.margin(flat, k))
            if self.dense:
                value = torch.ones_like(flat)
            else:
                value = self.policy.gate(
                    flat, training=self.training, k=k, tau=self.tau, noise=self.noise,
                    min_keep=self.min_keep, generator=self.generator,
                )  # fmt: skip
            # straight-through: hard in value, soft in gradient; features stay per block in
            # probs, so that the MAC count is exact for blocks
            value = value.view_as(lg)
            probs[dim] = value
            values[dim] = expand_blocks(value, (h, w)) if dim == "feature" else value
        return LayerMasks(values, probs)

    def prefetch(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Make the eval masks of many layers at once (``{layer: (C, T, H, W)}``, the shapes
        :meth:`masks` will be asked for): one score op and one gate per group of layers whose
        dim has the same size (and, for a fixed-count policy, the same count) instead of some
        fifteen small ops per layer, which cost R(2+1)D's threshold path ~10 ms per clip. The
        masks are those :meth:`masks` makes one by one. Does nothing in training (the gates'
        noise is drawn layer by layer), for policies that score layer inputs or whose gate is
        not row-wise (:attr:`~lightning_dance.policies.Policy.rowwise_eval`), with margins
        recorded, or for a controller without ``stacked_logits``. Returns the layers decided.
        """
        stacked = getattr(self.controller, "stacked_logits", None)
        dims = getattr(self.controller, "dims", None)
        if (
            self.training or self.dense or self.margins is not None or stacked is None
            or dims is None or self.policy.needs_layer_input or not self.policy.rowwise_eval
        ):  # fmt: skip
            return 0
        todo = {n: tuple(s) for n, s in shapes.items() if (n, tuple(s)) not in self._masks}
        grid = self.controller.grid
        groups: dict[tuple, list[str]] = {}  # (dim, input size, count) -> layers
        for name, (c, t, h, w) in todo.items():
            only = self.layer_dims.get(name, dims)
            for dim in (d for d in dims if d in only):
                size, scores = {"channel": ((c,), c), "frame": ((t,), t),
                                "feature": ((h, w), min(grid, h) * min(grid, w))}[dim]  # fmt: skip
                k = self.keep_count(name, dim, scores)
                groups.setdefault((dim, size, k), []).append(name)
        made: dict[str, tuple[dict, dict]] = {n: ({}, {}) for n in todo}
        for (dim, size, k), names in groups.items():
            lg = stacked(self.ctx, names, dim, size)  # [N, L, ...]
            if self.offset:
                lg = lg + self.offset
            n, count = lg.shape[0], len(names)
            rows = lg.transpose(0, 1).reshape(count * n, -1)  # layer-major rows
            value = self.policy.gate(rows, training=False, k=k, tau=self.tau, noise=self.noise,
                                     min_keep=self.min_keep)  # fmt: skip
            value = value.view(count, n, *lg.shape[2:])
            full = value
            if dim == "feature":
                full = expand_blocks(value.flatten(0, 1), size).view(count, n, *size)
            for i, name in enumerate(names):
                made[name][0][dim], made[name][1][dim] = full[i], value[i]
        for name, (values, probs) in made.items():  # in the order layer_logits gives the dims
            order = [d for d in ("frame", "channel", "feature") if d in values]
            self._masks[(name, todo[name])] = LayerMasks(
                {d: values[d] for d in order}, {d: probs[d] for d in order}
            )
        return len(made)

    def indices(
        self, layer: str, shape: tuple[int, ...], inputs: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """A fixed-count policy's decisions of ``layer`` with channels and frames as kept
        indices ``[N, k]`` (``TopK``'s order, unsorted: the entries :meth:`masks` keeps) and
        features as a mask ``[N, H, W]`` (made once per layer and shape); for graphs that
        gather (exports)."""
        if not self.policy.fixed_counts:
            raise ValueError(f"indices need a fixed-count policy, not {self.policy.name!r}")
        key = (layer, tuple(shape))
        if key in self._indices:
            return self._indices[key]
        out: dict[str, torch.Tensor] = {}
        self._indices[key] = out
        for dim, lg in self.scores(layer, shape, inputs).items():
            flat = lg.flatten(1)
            k = self.keep_count(layer, dim, flat.shape[1])
            if self.margins is not None:
                self.margins.append(self.policy.margin(flat, k))
            if dim == "feature":
                mask = self.policy.gate(flat, training=False, k=k, min_keep=self.min_keep)
                out[dim] = expand_blocks(mask.view_as(lg), tuple(shape[2:]))
            else:
                out[dim] = flat.topk(k, dim=1).indices
        return out

    def channel_indices(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor | None]:
        """One clip's kept input channels ``[k]`` of each layer in ``widths`` (``{layer: C}``),
        sorted; ``None`` where all are kept; the same entries :meth:`masks` keeps. Layers of
        equal width (and, for a fixed-count policy, equal kept count) are decided together:
        one ``topk`` or one gate per group (12 calls instead of 115 on X3D-XS). For policies
        that take the controller's scores (``topk``, ``threshold``, ``width``)."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(widths)
        for names, k, rows in self._channel_groups(widths):
            if k is not None:
                kept = rows.topk(k, dim=1).indices.sort(dim=1).values.unbind(0)
            else:  # input-dependent counts: the eval gate, row by row
                mask = self.policy.gate(rows, training=False, min_keep=self.min_keep) > 0.5
                kept = [None if bool(m.all()) else m.nonzero().flatten() for m in mask]
            out.update(zip(names, kept, strict=True))
        return out

    def channel_masks(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor | None]:
        """One clip's kept input channels of each layer in ``widths`` as a bool mask ``[C]``
        (``None`` where the layer keeps all by construction: a full count, a layer that does
        not prune channels, a dense plan): :meth:`channel_indices` without turning masks into
        indices (one gate or ``topk`` per group of layers, no per-layer index ops)."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(widths)
        for names, k, rows in self._channel_groups(widths):
            if k is not None:
                mask = torch.zeros_like(rows, dtype=torch.bool)
                mask.scatter_(1, rows.topk(k, dim=1).indices, True)
            else:
                mask = self.policy.gate(rows, training=False, min_keep=self.min_keep) > 0.5
            out.update(zip(names, mask.unbind(0), strict=True))
        return out

    def _channel_groups(
        self, widths: Mapping[str, int]
    ) -> Iterator[tuple[list[str], int | None, torch.Tensor]]:
        """``(layers, kept count or None, scores [layers, C])`` of one clip, for each group of
        the layers in ``widths`` that prune channels with equal width and count (layers that
        keep every channel are left out)."""
        if self.policy.needs_layer_input:
            raise ValueError(
                "channel indices of many layers at once need a policy that takes the "
                f"controller's scores, not {self.policy.name!r}"
            )
        if self.dense:  # every mask forced to ones (AdaptivePruner.dense)
            return
        groups: dict[tuple[int, int | None], list[str]] = {}
        for name, c in widths.items():
            if "channel" not in self.layer_dims.get(name, ("channel",)):
                continue  # this layer keeps every channel
            k = self.keep_count(name, "channel", c)
            if k is None or k < c:
                groups.setdefault((c, k), []).append(name)
        for (_, k), names in groups.items():
            rows = self.controller.stacked_channel_logits(self.ctx, names)[0]  # [layers, C]
            if self.offset:
                rows = rows + self.offset
            yield names, k, rows
