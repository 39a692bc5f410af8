"""A report of dense vs executed MACs, memory traffic and energy, accumulated over a dataset.

:class:`MacReport` collects, batch after batch, what the instrumented Conv3d layers of a
DANCE-pruned model executed for each clip, and reports per clip:

- dense MACs of the whole model (:func:`lightning_dance.macs.count_macs`, one clip);
- executed MACs: dense MACs of everything that is not instrumented + executed MACs of the
  instrumented layers + the controller's MACs (the same for every clip); mean, p5, p95 over all
  clips seen;
- memory traffic of the Conv3d layers from the analytic model :mod:`lightning_dance.traffic`
  (instrumented ones executed, the others dense; other ops' traffic is not modeled) and an
  energy ESTIMATE (:class:`lightning_dance.energy.EnergyModel`), both also as savings dense /
  executed: what masks or pruning statistics allow without running the fast path;
- with :meth:`MacReport.measure`, the traffic MEASURED from the ops the dense fast path and the
  compact path really run (:mod:`lightning_dance.bytes`: every op, the controller and the
  gathers included) and the energy estimate of those runs under each target of
  :data:`lightning_dance.energy.TARGETS` and this machine (LLC-aware pricing);
- per layer: input shape, dense MACs, mean executed MACs, kept fraction per dim and, when the
  masks themselves were seen, the executed/dense MAC factor per dim
  (:func:`lightning_dance.executed.conv3d_mac_factors`).

Three ways to feed it, all per batch (they can be mixed):

- :meth:`MacReport.update_stats` with an :class:`~lightning_dance.aap.AdaptivePruner`'s
  ``last_stats`` (build the report with :meth:`MacReport.for_pruner`);
- :meth:`MacReport.update` with the masks ``{layer: {dim: [N, ...]}}`` (exact traffic);
- :meth:`MacReport.update_executed` with per-sample executed MACs and kept fractions per layer.

Output: ``print(report)`` (a rich table, plain text without rich), :meth:`MacReport.to_dict` /
:meth:`MacReport.to_json`, :meth:`MacReport.metrics` and :meth:`MacReport.log_to` (a
LightningModule, a Trainer or a Lightning logger).

Accumulation is plain Python/torch: each process keeps its own clips. Under DDP, call it on every
rank and gather the ``to_dict()`` results (or report rank 0's share); it does no collective
communication by itself, on purpose: it runs outside the training step and must never hang a job.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1))
    >>> report = MacReport(net, (3, 4, 8, 8))
    >>> report.update({"1": {"channel": torch.tensor([[1.0] * 4 + [0.0] * 4])}})
    >>> d = report.to_dict()  # the stem runs dense, layer "1" reads half its channels
    >>> d["dense_macs"], d["executed_macs_mean"], round(d["macs_ratio"], 4)
    (608256, 387072.0, 0.6364)

With an :class:`~lightning_dance.aap.AdaptivePruner`::

    report = MacReport.for_pruner(pruner, (3, 8, 112, 112))
    for clip, _ in loader:
        pruner(clip)
        report.update_stats(pruner.last_stats)
    print(report); report.to_json("macs.json"); report.log_to(trainer_or_logger)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from lightning_dance.energy import TARGETS, EnergyModel
from lightning_dance.executed import conv3d_executed_macs_batch, conv3d_mac_factors
from lightning_dance.geometry import ConvGeometry, conv3d_input_shapes
from lightning_dance.layers import LayerSelector, select_conv3d
from lightning_dance.macs import MacCount, as_clip, count_macs, count_module_macs
from lightning_dance.masks import DIMS
from lightning_dance.report_table import render_table
from lightning_dance.traffic import conv3d_memory_traffic

if TYPE_CHECKING:  # pragma: no cover
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.bytes import TrafficComparison
    from lightning_dance.execution import CompactPruner
    from lightning_dance.stats import PruningStats

__all__ = ["MacReport"]

_MASK_RANK = {"frame": 2, "channel": 2, "feature": 3}


@dataclass
class _Layer:
    """Accumulated per-sample figures of one instrumented layer (one tensor per batch)."""

    name: str
    conv: nn.Conv3d
    geometry: ConvGeometry
    dense_bytes: int
    executed: list[torch.Tensor] = field(default_factory=list)  # [N] int64
    executed_bytes: list[torch.Tensor] = field(default_factory=list)  # [N] int64, copies incl.
    copy_bytes: list[torch.Tensor] = field(default_factory=list)  # [N] int64 gather + scatter
    kept: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # dim -> [N] float64
    factors: list[dict[str, torch.Tensor] | None] = field(default_factory=list)
    masked_dims: set[str] = field(default_factory=set)  # dims masked in at least one batch

    @property
    def dense_macs(self) -> int:
        return self.geometry.dense_macs

    def describe(self) -> str:
        g = self.geometry
        groups = f" g={g.groups}" if g.groups > 1 else ""
        kernel, stride = "x".join(map(str, g.kernel)), "x".join(map(str, g.stride))
        return f"{g.in_channels}->{g.out_channels} k{kernel} s{stride}{groups}"

    def clear(self) -> None:
        self.executed.clear()
        self.executed_bytes.clear()
        self.copy_bytes.clear()
        self.kept.clear()
        self.factors.clear()
        self.masked_dims.clear()


@dataclass
class _Batch:
    """One batch of one layer, measured and validated, not yet recorded."""

    executed: torch.Tensor  # [N] int64
    executed_bytes: torch.Tensor  # [N] int64
    copy_bytes: torch.Tensor  # [N] int64
    kept: dict[str, torch.Tensor]  # every dim, [N] float64
    factors: dict[str, torch.Tensor] | None
    masked: set[str]


def _mask_values(spec: Any) -> Mapping[str, torch.Tensor]:
    """A layer's ``{dim: mask}``; objects with a ``values`` dict (``LayerMasks``) are accepted."""
    values = spec if isinstance(spec, Mapping) else getattr(spec, "values", None)
    if not isinstance(values, Mapping):
        raise TypeError(
            f"a layer's masks must be a {{dim: tensor}} mapping, got {type(spec).__name__}"
        )
    return values


def _cpu(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to("cpu", dtype)


class MacReport:
    """Dense vs executed MACs / traffic / energy of a DANCE-pruned model over many clips.

    Args:
        model: the (unwrapped) model.
        clip: one clip ``[1, C, T, H, W]`` or its shape ``(C, T, H, W)``; all clips reported
            must have this shape.
        layers: the instrumented layers (a selector as in
            :func:`lightning_dance.layers.select_conv3d`; default: every Conv3d but the stem).
        controller: the controller's MACs per clip: an ``int``, or an ``nn.Module`` counted with
            :func:`lightning_dance.macs.count_module_macs` on ``controller_input`` (a tensor or a
            tuple of inputs whose first dim is the batch; the count is divided by it). ``None``:
            taken from the first :class:`~lightning_dance.aap.PruningStats` given to
            :meth:`update_stats` (0 until then).
        energy: the energy model (default: fp32 MACs, DRAM traffic); its
            ``bytes_per_element`` sizes the traffic.

    Attributes:
        dense: the model's dense :class:`~lightning_dance.macs.MacCount` for one clip.
        input_shapes: every Conv3d's input ``(C, T, H, W)`` for one clip.
        samples: number of clips seen.
    """

    def __init__(
        self,
        model: nn.Module,
        clip: torch.Tensor | tuple[int, ...],
        *,
        layers: LayerSelector = None,
        controller: nn.Module | int | None = None,
        controller_input: torch.Tensor | tuple | None = None,
        energy: EnergyModel | None = None,
    ) -> None:
        x = as_clip(clip, model)[:1]
        self.clip_shape: tuple[int, ...] = tuple(x.shape[1:])
        self.energy = energy or EnergyModel()
        self.dense: MacCount = count_macs(model, x)
        self.input_shapes = conv3d_input_shapes(model, x)
        convs = select_conv3d(model, layers)
        not_run = [n for n in convs if n not in self.input_shapes]
        if not_run:
            raise ValueError(f"instrumented Conv3d layers that never ran on the clip: {not_run}")
        self._controller_known = controller is not None
        self.controller_macs = self._controller_macs(controller, controller_input)
        bpe = self.energy.bytes_per_element
        self.conv_dense_bytes = {
            n: conv3d_memory_traffic(m, self.input_shapes[n], bytes_per_element=bpe).dense_bytes
            for n, m in model.named_modules()
            if n in self.input_shapes
        }
        self.layers: dict[str, _Layer] = {
            name: _Layer(
                name,
                conv,
                ConvGeometry.of(conv, self.input_shapes[name]),
                self.conv_dense_bytes[name],
            )
            for name, conv in convs.items()
        }
        self.samples = 0
        self.measured: list[TrafficComparison] = []

    @staticmethod
    def _controller_macs(controller: nn.Module | int | None, inputs: Any) -> int:
        if controller is None:
            return 0
        if isinstance(controller, bool) or not isinstance(controller, (int, nn.Module)):
            raise TypeError(
                f"controller must be an nn.Module or an int, got {type(controller).__name__}"
            )
        if isinstance(controller, int):
            if controller < 0:
                raise ValueError(f"controller MACs must be >= 0, got {controller}")
            return controller
        if inputs is None:
            raise ValueError("a controller module needs controller_input to be counted")
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor)), 1)
        return count_module_macs(controller, *inputs, per_module=False).total // max(batch, 1)

    # ------------------------------------------------------------------------ construction
    @classmethod
    def from_masks(
        cls,
        model: nn.Module,
        clip: torch.Tensor | tuple[int, ...],
        masks: Mapping[str, Any],
        **kwargs: Any,
    ) -> MacReport:
        """A report of one batch of masks ``{layer: {dim: [N, ...]}}`` (see :meth:`update`).

        Layers not in ``masks`` count as dense; pass ``layers=`` to choose the instrumented set
        (default: every Conv3d but the stem).
        """
        report = cls(model, clip, **kwargs)
        report.update(masks)
        return report

    @classmethod
    def for_pruner(
        cls,
        pruner: AdaptivePruner,
        clip: torch.Tensor | tuple[int, ...],
        *,
        energy: EnergyModel | None = None,
    ) -> MacReport:
        """An empty report for an :class:`~lightning_dance.aap.AdaptivePruner`: its model,
        its instrumented layers and the MACs of its decisions (``pruner.decision_macs``: the
        controller at the stem's output shape for ``clip``, and the attention policy's scoring
        of each layer's input). Feed it with :meth:`update_stats`."""
        model = pruner.unwrap()
        shapes = conv3d_input_shapes(model, as_clip(clip, model))
        stem = dict(model.named_modules())[pruner.stem_name]
        stem_out = (stem.out_channels, *ConvGeometry.of(stem, shapes[pruner.stem_name]).output)
        return cls(
            model,
            clip,
            layers=list(pruner.layer_names),
            controller=pruner.decision_macs(stem_out, shapes),
            energy=energy,
        )

    def reset(self) -> None:
        """Forget every clip seen (the controller MACs and dense counts stay)."""
        for layer in self.layers.values():
            layer.clear()
        self.samples = 0
        self.measured = []

    def measure(
        self, pruner: AdaptivePruner | CompactPruner, clip: torch.Tensor
    ) -> TrafficComparison:
        """Measure and record the bytes the dense fast path and the compact path move on each
        clip of ``clip`` ``[N, C, T, H, W]`` (:func:`lightning_dance.bytes.compare_traffic`;
        ``pruner``: an ``AdaptivePruner``, run compactly, or a configured ``CompactPruner``).
        Independent of the MAC updates; :meth:`to_dict` reports them under ``"measured"``.
        Returns the comparison of the last clip.

        Example:
            >>> import torch
            >>> from lightning_dance.aap import AdaptivePruner
            >>> from lightning_dance.models import create_model
            >>> pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), budget=0.5)
            >>> report = MacReport.for_pruner(pruner.eval(), (3, 8, 32, 32))
            >>> c = report.measure(pruner, torch.randn(1, 3, 8, 32, 32))
            >>> sorted(report.measured_dict())[:3]
            ['clips', 'compact_bytes_mean', 'compact_macs_mean']
        """
        from lightning_dance.bytes import compare_traffic

        if clip.dim() != 5 or tuple(clip.shape[1:]) != self.clip_shape:
            raise ValueError(
                f"measure needs clips [N, {', '.join(map(str, self.clip_shape))}] (this "
                f"report's clip shape), got {tuple(clip.shape)}"
            )
        for one in clip.split(1):
            comparison = compare_traffic(pruner, one)
            self.measured.append(comparison)
        return comparison

    def measured_dict(self) -> dict[str, Any] | None:
        """Means over the clips given to :meth:`measure` (``None`` if none): bytes and MACs of
        the dense fast path and the compact path, the controller's bytes, the traffic saving
        and the energy saving under each target (plus ``dram``: every byte at DRAM energy)."""
        if not self.measured:
            return None
        n = len(self.measured)

        def mean(values: list[float]) -> float:
            return float(sum(values)) / n

        models = {"dram": EnergyModel.preset(self.energy_arithmetic)}
        for target in (*TARGETS, "this_machine"):
            models[target] = EnergyModel.for_target(target, self.energy_arithmetic)
        energy = {}
        for key, model in models.items():
            dense = mean([model.measured_energy_pj(c.dense.macs, c.dense) for c in self.measured])
            compact = [model.measured_energy_pj(c.compact.macs, c.compact) for c in self.measured]
            energy[key] = dense / mean(compact)
        dense_bytes = mean([c.dense.total for c in self.measured])
        compact_bytes = mean([c.compact.total for c in self.measured])
        return {
            "clips": n,
            "dense_bytes": dense_bytes,
            "compact_bytes_mean": compact_bytes,
            "controller_bytes_mean": mean(
                [c.compact.layer_total("controller") for c in self.measured]
            ),
            "traffic_saving": dense_bytes / compact_bytes,
            "dense_macs": mean([c.dense.macs for c in self.measured]),
            "compact_macs_mean": mean([c.compact.macs for c in self.measured]),
            "energy_saving": energy,
        }

    @property
    def energy_arithmetic(self) -> str:
        """The arithmetic (fp32/fp16/int8) of this report's energy model, by element size."""
        return {4: "fp32", 2: "fp16", 1: "int8"}.get(self.energy.bytes_per_element, "fp32")

    # ------------------------------------------------------------------------------ updates
    def update(self, masks: Mapping[str, Any], *, batch_size: int | None = None) -> None:
        """Add one batch from its masks: ``masks[layer][dim]`` is ``[N, T]``, ``[N, C]`` or
        ``[N, H, W]`` (0/1, > 0.5 = kept) for dims ``frame``/``channel``/``feature``; a layer's
        value may also be a :class:`~lightning_dance.masks.LayerMasks`. Instrumented layers
        absent from ``masks`` ran dense for this batch (``batch_size`` gives ``N`` when no layer
        has masks). Executed MACs, traffic and MAC factors are computed from the masks."""
        self._check_layers(masks, "masks")
        values = {name: dict(_mask_values(spec)) for name, spec in masks.items()}
        for name, v in values.items():
            bad = [d for d in v if d not in DIMS]
            if bad:
                raise ValueError(f"layer {name!r}: unknown mask dims {bad}; use {DIMS}")
            for d, m in v.items():
                if m.dim() != _MASK_RANK[d]:
                    raise ValueError(
                        f"layer {name!r}: the {d} mask must be batched ({_MASK_RANK[d]}-d, "
                        f"[N, ...]), got shape {tuple(m.shape)}"
                    )
        n = self._batch([m for v in values.values() for m in v.values()], batch_size)
        measured = {
            name: self._measure(layer, n, values.get(name, {}), executed=None, kept=None)
            for name, layer in self.layers.items()
        }
        self._commit(n, measured)

    def update_stats(self, stats: PruningStats) -> None:
        """Add one batch from an :class:`~lightning_dance.aap.AdaptivePruner`'s ``last_stats``.

        Executed MACs and kept fractions are taken from ``stats``; the controller's MACs too
        (the first time, when the report was built without ``controller=``; later batches must
        agree). Traffic is exact when ``stats.layers[name]`` carries its hard masks (a
        ``masks`` attribute ``{dim: [N, ...]}``); otherwise it is derived from the kept
        fractions and executed MACs (exact but for two documented upper bounds, see
        :func:`lightning_dance.traffic.conv3d_memory_traffic`) and the per-dim MAC factors are
        not reported.

        Raises:
            ValueError: the stats come from another model, layer selection or clip shape.
        """
        if int(stats.dense_total) != self.dense.total:
            raise ValueError(
                f"the stats' dense MACs ({stats.dense_total}) differ from this report's "
                f"({self.dense.total} for clips {self.clip_shape}): another model or clip shape"
            )
        self._check_layers(stats.layers, "stats")
        controller = int(stats.controller_macs)
        if self._controller_known and controller != self.controller_macs:
            raise ValueError(
                f"the stats' controller MACs ({controller}) differ from this report's "
                f"({self.controller_macs})"
            )
        n = self._batch([s.executed_macs for s in stats.layers.values()], None)
        measured = {}
        for name, layer in self.layers.items():
            s = stats.layers.get(name)
            if s is None:
                measured[name] = self._measure(layer, n, {}, executed=None, kept=None)
                continue
            if tuple(s.input_shape) != layer.geometry.input:
                raise ValueError(
                    f"layer {name!r}: the stats' input shape {tuple(s.input_shape)} differs "
                    f"from this report's {layer.geometry.input}"
                )
            masks = getattr(s, "masks", None)
            if getattr(s, "feature_at_output", False):
                masks = None  # output feature masks: traffic from the kept fractions
            measured[name] = self._measure(layer, n, dict(masks) if masks else {},
                                           executed=s.executed_macs,
                                           kept=None if masks else dict(s.kept))  # fmt: skip
        self._commit(n, measured)
        self.controller_macs, self._controller_known = controller, True

    def update_executed(
        self,
        executed: Mapping[str, torch.Tensor],
        kept: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        batch_size: int | None = None,
    ) -> None:
        """Add one batch from per-sample counts: ``executed[layer]`` is ``[N]`` executed MACs
        and ``kept[layer][dim]`` ``[N]`` kept fractions (a dim that is absent was not masked).
        Instrumented layers absent from ``executed`` ran dense. Traffic comes from the kept
        fractions (as in :meth:`update_stats` without masks)."""
        kept = kept or {}
        self._check_layers(executed, "executed")
        self._check_layers(kept, "kept")
        missing = [n for n in kept if n not in executed]
        if missing:
            raise ValueError(f"kept fractions for layers without executed MACs: {missing}")
        n = self._batch(list(executed.values()), batch_size)
        measured = {}
        for name, layer in self.layers.items():
            if name not in executed:
                measured[name] = self._measure(layer, n, {}, executed=None, kept=None)
                continue
            kd = dict(kept.get(name, {}))
            bad = [d for d in kd if d not in DIMS]
            if bad:
                raise ValueError(f"layer {name!r}: unknown dims {bad}; use {DIMS}")
            measured[name] = self._measure(layer, n, {}, executed=executed[name], kept=kd)
        self._commit(n, measured)

    def _check_layers(self, names: Mapping[str, Any], what: str) -> None:
        unknown = [n for n in names if n not in self.layers]
        if unknown:
            raise ValueError(
                f"{what} for layers that are not instrumented in this report: {unknown}; "
                f"instrumented layers: {list(self.layers)}"
            )

    @staticmethod
    def _batch(tensors: list[torch.Tensor], batch_size: int | None) -> int:
        sizes = {int(t.shape[0]) for t in tensors}
        if batch_size is not None:
            sizes.add(int(batch_size))
        if len(sizes) > 1:
            raise ValueError(f"the layers disagree on the batch size: {sorted(sizes)}")
        if not sizes:
            raise ValueError(
                "nothing given for any layer: pass batch_size= to record a dense batch"
            )
        return sizes.pop()

    def _measure(
        self,
        layer: _Layer,
        n: int,
        masks: dict[str, torch.Tensor],
        *,
        executed: torch.Tensor | None,
        kept: dict[str, torch.Tensor] | None,
    ) -> _Batch:
        """One batch of one layer: from masks (``kept is None``) or from counts + fractions."""
        bpe = self.energy.bytes_per_element
        shape = layer.geometry.input
        factors = None
        if kept is None:
            kw = {d: masks.get(d) for d in DIMS}
            traffic = conv3d_memory_traffic(layer.conv, shape, bytes_per_element=bpe,
                                            batch_size=n, **kw)  # fmt: skip
            if masks:
                factors = conv3d_mac_factors(layer.conv, shape, batch_size=n, **kw)
                factors = {d: _cpu(f, torch.float64) for d, f in factors.items()}
            if executed is None:
                executed = conv3d_executed_macs_batch(layer.conv, shape, batch_size=n, **kw)
            kept = {d: (m.detach() > 0.5).flatten(1).double().mean(1) for d, m in masks.items()}
        else:
            if executed.shape != (n,):
                raise ValueError(
                    f"layer {layer.name!r}: executed MACs must be [N] = [{n}], got shape "
                    f"{tuple(executed.shape)}"
                )
            traffic = conv3d_memory_traffic(layer.conv, shape, kept=kept, executed_macs=executed,
                                            bytes_per_element=bpe)  # fmt: skip
        full = {
            d: _cpu(kept[d], torch.float64) if d in kept else torch.ones(n, dtype=torch.float64)
            for d in DIMS
        }
        return _Batch(
            _cpu(executed, torch.int64),
            _cpu(traffic.executed_bytes, torch.int64),
            _cpu(traffic.copy_bytes, torch.int64),
            full,
            factors,
            set(kept),
        )

    def _commit(self, n: int, measured: dict[str, _Batch]) -> None:
        """Append one validated batch to every layer (all or nothing)."""
        for name, batch in measured.items():
            layer = self.layers[name]
            layer.executed.append(batch.executed)
            layer.executed_bytes.append(batch.executed_bytes)
            layer.copy_bytes.append(batch.copy_bytes)
            layer.factors.append(batch.factors)
            layer.masked_dims.update(batch.masked)
            for d, value in batch.kept.items():
                layer.kept.setdefault(d, []).append(value)
        self.samples += n

    # ------------------------------------------------------------------------------ results
    def per_sample(self) -> dict[str, torch.Tensor]:
        """Whole-model per-clip figures over all clips seen: ``macs``, ``bytes`` (Conv3d
        traffic, copies included) and ``copy_bytes`` (the gather/scatter part of it) ([S]
        int64), ``energy_pj`` ([S] float64, an estimate)."""
        if self.samples == 0:
            raise RuntimeError("MacReport has no samples: call update_stats() or update() first")
        fixed = self.dense.total - sum(x.dense_macs for x in self.layers.values())
        macs = torch.full((self.samples,), fixed + self.controller_macs, dtype=torch.int64)
        other_bytes = sum(b for n, b in self.conv_dense_bytes.items() if n not in self.layers)
        moved = torch.full((self.samples,), other_bytes, dtype=torch.int64)
        copies = torch.zeros(self.samples, dtype=torch.int64)
        for layer in self.layers.values():
            macs += torch.cat(layer.executed)
            moved += torch.cat(layer.executed_bytes)
            copies += torch.cat(layer.copy_bytes)
        energy = self.energy.energy_pj(macs, moved - copies, copies)
        return {"macs": macs, "bytes": moved, "copy_bytes": copies, "energy_pj": energy}

    def _layer_dict(self, layer: _Layer) -> dict[str, Any]:
        executed = torch.cat(layer.executed).double()
        out: dict[str, Any] = {
            "name": layer.name,
            "conv": layer.describe(),
            "input_shape": list(layer.geometry.input),
            "dense_macs": layer.dense_macs,
            "executed_macs_mean": float(executed.mean()),
            "macs_ratio": float(executed.mean()) / max(layer.dense_macs, 1),
            "kept": {d: float(torch.cat(v).mean()) for d, v in layer.kept.items()},
            "masked_dims": [d for d in DIMS if d in layer.masked_dims],
            "mac_factor": None,
            "dense_bytes": layer.dense_bytes,
            "executed_bytes_mean": float(torch.cat(layer.executed_bytes).double().mean()),
            "copy_bytes_mean": float(torch.cat(layer.copy_bytes).double().mean()),
        }
        if all(f is not None for f in layer.factors):
            out["mac_factor"] = {
                d: float(torch.cat([f[d] for f in layer.factors]).mean()) for d in DIMS
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """All figures, JSON-friendly: per-clip totals (``dense_macs``, ``executed_macs_mean``,
        ``_p5``, ``_p95``, ``macs_ratio`` = mean executed / dense, savings dense / executed of
        MACs, Conv3d traffic and estimated energy) and a ``layers`` list (see the module doc)."""
        per = self.per_sample()
        macs = per["macs"].double()
        q = torch.quantile(macs, torch.tensor([0.05, 0.95], dtype=torch.float64))
        dense_bytes = sum(self.conv_dense_bytes.values())
        dense_energy = float(self.energy.energy_pj(self.dense.total, dense_bytes))
        mean_macs = float(macs.mean())
        mean_bytes = float(per["bytes"].double().mean())
        mean_energy = float(per["energy_pj"].mean())
        return {
            "samples": self.samples,
            "clip_shape": list(self.clip_shape),
            "count_method": self.dense.method,
            "dense_macs": self.dense.total,
            "controller_macs": self.controller_macs,
            "executed_macs_mean": mean_macs,
            "executed_macs_p5": float(q[0]),
            "executed_macs_p95": float(q[1]),
            "macs_ratio": mean_macs / self.dense.total,
            "macs_saving": self.dense.total / mean_macs,
            "dense_bytes": dense_bytes,
            "executed_bytes_mean": mean_bytes,
            "copy_bytes_mean": float(per["copy_bytes"].double().mean()),
            "traffic_saving": dense_bytes / mean_bytes,
            "energy_model": self.energy.name,
            "dense_energy_pj": dense_energy,
            "executed_energy_pj_mean": mean_energy,
            "energy_saving": dense_energy / mean_energy,
            "measured": self.measured_dict(),
            "layers": [self._layer_dict(layer) for layer in self.layers.values()],
        }

    compute = to_dict  # torchmetrics-style name

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def metrics(self, prefix: str = "dance/", *, per_layer: bool = False) -> dict[str, float]:
        """Flat scalar metrics (``{prefix}macs_ratio`` ...) for a logger; ``per_layer`` adds
        ``{prefix}{layer}/macs_ratio`` and ``{prefix}{layer}/kept_{dim}`` for masked dims."""
        d = self.to_dict()
        keys = ("executed_macs_mean", "executed_macs_p5", "executed_macs_p95", "macs_ratio",
                "macs_saving", "traffic_saving", "energy_saving")  # fmt: skip
        out = {f"{prefix}{k}": float(d[k]) for k in keys}
        if d["measured"] is not None:
            out[f"{prefix}measured_traffic_saving"] = d["measured"]["traffic_saving"]
            for target, saving in d["measured"]["energy_saving"].items():
                out[f"{prefix}measured_energy_saving/{target}"] = saving
        if per_layer:
            for layer in d["layers"]:
                out[f"{prefix}{layer['name']}/macs_ratio"] = layer["macs_ratio"]
                for dim in layer["masked_dims"]:
                    out[f"{prefix}{layer['name']}/kept_{dim}"] = layer["kept"][dim]
        return out

    def log_to(
        self,
        target: Any,
        prefix: str = "dance/",
        *,
        per_layer: bool = False,
        step: int | None = None,
    ) -> dict[str, float]:
        """Log :meth:`metrics` and return them. ``target``: a LightningModule (``log_dict``;
        call it from a hook where ``self.log`` is allowed, e.g. ``on_validation_epoch_end``),
        a Trainer (each of its loggers, at ``trainer.global_step`` unless ``step``) or a
        Lightning logger (``log_metrics``)."""
        from lightning.pytorch import LightningModule, Trainer

        metrics = self.metrics(prefix, per_layer=per_layer)
        if isinstance(target, LightningModule):
            target.log_dict(metrics, sync_dist=False)
        elif isinstance(target, Trainer):
            for logger in target.loggers:
                logger.log_metrics(metrics, step=target.global_step if step is None else step)
        elif hasattr(target, "log_metrics"):
            target.log_metrics(metrics, step=step)
        else:
            raise TypeError(
                "log_to needs a LightningModule, a Trainer or a logger with log_metrics, got "
                f"{type(target).__name__}"
            )
        return metrics

    # ------------------------------------------------------------------------------ display
    def render(self, *, rich: bool = True, width: int = 140) -> str:
        """The per-layer table and the totals as text: a rich table (``rich=True`` and rich
        installed) or plain aligned columns (see :mod:`lightning_dance.report_table`)."""
        if self.samples == 0:
            return f"MacReport({len(self.layers)} layers, no samples yet)"
        return render_table(self.to_dict(), rich=rich, width=width)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"MacReport(layers={len(self.layers)}, samples={self.samples})"
