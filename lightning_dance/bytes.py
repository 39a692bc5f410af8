"""Memory traffic MEASURED from the aten ops that really run: bytes read and written per op.

:class:`ByteCounter` is a ``TorchDispatchMode`` (like the dispatch MAC counter of
:mod:`lightning_dance.macs`) that sees every aten op a forward issues, below autograd and after
composite ops are decomposed, and adds up, per op:

- **read**: the bytes of every tensor input (activations, weights, biases, running stats,
  index tensors), except that a gather (``index_select``, ``gather``, ``index``...) reads only
  the selected elements of its source (as many as it writes) and its index; an in-place op
  that only overwrites its destination (``copy_``, ``fill_``,
  ``zero_``, ``index_copy_``, ``index_put_``, ``scatter_``, ``out=`` variants) does not read it;
- **written**: the bytes of every output; an op that writes only part of its destination
  (``index_copy_``, ``index_put_``, ``index_add_``, ``scatter_``...) writes as many bytes as its
  source, not the whole destination;
- **views move nothing**: ops whose schema says they alias their input without writing
  (``view``, ``permute``, ``expand``, ``slice``, ``select``, ``detach``, ``as_strided``...) and
  ``_unsafe_view`` count 0, as do allocations (``empty*``). A view read by a later op counts
  its own extent there.

A tensor's bytes are its *distinct* elements times the element size: a broadcast (stride-0)
dim counts once (an expanded bias is 1 row, not the whole output). Each op is attributed to
the innermost module whose forward is running (forward pre-/post-hooks, as the MAC counters
do: a routed Conv3d's ops go to that conv, a functional op in a parent's forward to the parent)
and to an op kind (:func:`lightning_dance.mac_formulas.dispatch_key`: ``conv``, ``batch_norm``,
``add``, ``index_select``, ``copy_``...).

What it is and is not: the data each op *must* move, from its operands' sizes: a first-order
measure of DRAM/cache traffic in which every operand is loaded and every result stored once per
op. Not seen: re-reads inside a kernel (a conv's input rows read once per filter tap), layout
reorders a kernel does internally (``F.conv3d`` on an NCDHW input through oneDNN), caches (an
operand still in cache costs no DRAM access: price that with
:meth:`lightning_dance.energy.EnergyModel.for_target`, which uses the tensor sizes recorded in
:attr:`TrafficMeasurement.by_tensor_size`). ``docs/accounting.md`` compares it with the
analytic per-layer model :mod:`lightning_dance.traffic` and with cachegrind.

:func:`measure_traffic` runs a model (dense, on the fast kernels) or a
:class:`~lightning_dance.execution.CompactPruner` (the compact path) on one clip under the
counter; :func:`compare_traffic` measures both for a pruner.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(2, 4, 1), nn.ReLU())
    >>> m = measure_traffic(net, torch.randn(1, 2, 2, 3, 3), fast=False)
    >>> m.by_kind["conv"]  # input 36 + weight 8 + bias 4 elements read, 72 written (x 4 B)
    (192, 288)
    >>> m.by_layer["1"]  # ReLU: reads and writes the conv output
    (288, 288)
    >>> m.total  # 192 + 288 + 288 + 288
    1056
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_dance.mac_formulas import dispatch_key
from lightning_dance.macs import eval_no_grad, module_stack

if TYPE_CHECKING:  # pragma: no cover
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.execution import CompactPruner

__all__ = [
    "ByteCounter",
    "TrafficComparison",
    "TrafficMeasurement",
    "compare_traffic",
    "count_bytes",
    "measure_traffic",
    "tensor_bytes",
]

#: Ops that move no data although their schema does not mark them as views.
_NO_TRAFFIC = frozenset(
    """_unsafe_view empty empty_like empty_strided new_empty new_empty_strided resize_ set_
    lift_fresh _local_scalar_dense""".split()
)
#: In-place ops that overwrite their destination without reading it.
_OVERWRITE = frozenset(
    """copy_ fill_ zero_ index_copy_ index_put_ _index_put_impl_ scatter_ masked_scatter_
    index_fill_ masked_fill_ normal_ uniform_ bernoulli_ exponential_ random_""".split()
)
#: In-place ops that write (and, for accumulating ones, read) only part of the destination:
#: as many bytes as their source argument.
_PARTIAL = {"index_copy_": "source", "index_put_": "values", "_index_put_impl_": "values",
            "index_add_": "source", "scatter_": "src", "scatter_add_": "src",
            "masked_scatter_": "source"}  # fmt: skip
#: Gathers: read only the selected elements of their source (as many as they write) + the
#: index, not the whole source.
_SELECT = frozenset("index_select gather index _unsafe_index take embedding".split())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: a broadcast (stride-0) dim counts once.

    Example:
        >>> tensor_bytes(torch.zeros(3, 4)), tensor_bytes(torch.zeros(4).expand(3, 4))
        (48, 16)
    """
    if t.numel() == 0:
        return 0
    distinct = math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0)
    return int(distinct) * t.element_size()


def _macs(kind: str, name: str, reads: list[torch.Tensor], writes: list[torch.Tensor]) -> int:
    """Multiply-adds of a conv (input, weight, ...) or matrix product (as fvcore counts)."""
    if not writes:
        return 0
    if kind == "conv" and len(reads) > 1 and reads[1].dim() >= 3:
        return writes[0].numel() * math.prod(reads[1].shape[1:])
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        return writes[0].numel() * reads[-1].shape[-2]
    return 0


def _whole(t: torch.Tensor) -> tuple[int, int]:
    size = tensor_bytes(t)
    return size, size


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


@dataclass
class TrafficMeasurement:
    """Bytes the executed ops moved (one forward; see the module docstring for the rules).

    Attributes:
        read, written: total bytes read / written.
        by_layer: innermost module name -> ``(read, written)``; ``""`` is the top-level forward.
        by_kind: op kind (``conv``, ``batch_norm``, ``index_select``, ``copy_``...) ->
            ``(read, written)``.
        by_tensor_size: tensor size in bytes -> bytes moved by accesses to tensors of that size
            (what a cache-aware energy model prices; a gather from a big weight counts the
            bytes it selects under the weight's size).
        ops: number of ops that moved data; ``calls``: op name -> calls (views included).
        macs: multiply-adds of the executed convolutions (``out.numel() * C_in/groups *
            prod(kernel)``, as fvcore) and matrix products (``mm``, ``addmm``, ``bmm``): what an
            energy estimate of the same run charges for arithmetic.
    """

    read: int = 0
    written: int = 0
    by_layer: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_tensor_size: dict[int, int] = field(default_factory=dict)
    ops: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    macs: int = 0

    @property
    def total(self) -> int:
        """Bytes read + written."""
        return self.read + self.written

    def layer_total(self, prefix: str) -> int:
        """Bytes moved by module ``prefix`` and everything inside it (``""``: all)."""
        return sum(r + w for name, (r, w) in self.by_layer.items()
                   if not prefix or name == prefix or name.startswith(prefix + "."))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly totals and breakdowns."""
        return {
            "read_bytes": self.read,
            "written_bytes": self.written,
            "total_bytes": self.total,
            "ops": self.ops,
            "macs": self.macs,
            "by_layer": {k: list(v) for k, v in self.by_layer.items()},
            "by_kind": {k: list(v) for k, v in self.by_kind.items()},
        }


class ByteCounter(TorchDispatchMode):
    """Count the bytes every aten op reads and writes (rules: module docstring).

    ``stack``: the running modules ``[(name, module), ...]`` (innermost last) to attribute ops
    to, as :func:`lightning_dance.macs.module_stack` keeps it; ``None``: everything goes to
    ``""``. Results accumulate in :attr:`result` (a :class:`TrafficMeasurement`).

    Example:
        >>> x = torch.zeros(4, 8)
        >>> with ByteCounter() as bc:
        ...     y = x + 1.0          # reads 128 B, writes 128 B
        ...     z = y.view(8, 4)     # a view: nothing
        >>> bc.result.read, bc.result.written, bc.result.calls["view"]
        (128, 128, 1)
    """

    def __init__(self, stack: list[tuple[str, nn.Module]] | None = None) -> None:
        super().__init__()
        self.stack = stack
        self.result = TrafficMeasurement()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = func.overloadpacket.__name__
        res = self.result
        res.calls[name] = res.calls.get(name, 0) + 1
        if func.is_view or name in _NO_TRAFFIC:
            return
        schema = func._schema
        bound = dict(zip((a.name for a in schema.arguments), args, strict=False))
        bound.update(kwargs)
        mutated = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
        # accesses as (size of the tensor accessed, bytes moved): the size decides the memory
        # level an energy model prices them at
        reads: list[tuple[int, int]] = []
        writes: list[tuple[int, int]] = []
        inputs: list[torch.Tensor] = []
        for arg_name, value in bound.items():
            tensors = _tensors(value)
            if arg_name not in mutated:
                inputs += tensors
                reads += [_whole(t) for t in tensors]
                continue
            for dst in tensors:
                if name in _PARTIAL:  # writes (and reads) as much as its source, in dst
                    part = sum(tensor_bytes(t) for t in _tensors(bound.get(_PARTIAL[name])))
                    writes.append((tensor_bytes(dst), part))
                    if name not in _OVERWRITE:
                        reads.append((tensor_bytes(dst), part))
                else:
                    writes.append(_whole(dst))
                    if name not in _OVERWRITE and arg_name != "out":
                        reads.append(_whole(dst))
        outputs = _tensors(out) if not mutated else []
        writes += [_whole(t) for t in outputs]
        if name in _SELECT and inputs:  # the source is read only where selected
            reads[0] = (reads[0][0], sum(b for _, b in writes))
        r, w = sum(b for _, b in reads), sum(b for _, b in writes)
        if r + w == 0:
            return
        res.read += r
        res.written += w
        res.ops += 1
        for size, moved in (*reads, *writes):
            res.by_tensor_size[size] = res.by_tensor_size.get(size, 0) + moved
        layer = self.stack[-1][0] if self.stack else ""
        kind = dispatch_key(name)
        res.macs += _macs(kind, name, inputs, outputs)
        for table, key in ((res.by_layer, layer), (res.by_kind, kind)):
            old = table.get(key, (0, 0))
            table[key] = (old[0] + r, old[1] + w)


@contextmanager
def count_bytes(
    model: nn.Module | None = None, extra: dict[str, nn.Module] | None = None
) -> Iterator[TrafficMeasurement]:
    """Count the bytes of every op run inside the block, attributed to ``model``'s modules
    (and to those of ``extra`` modules, named ``key.name``).

    Example:
        >>> net, x = nn.Linear(3, 2), torch.zeros(1, 3)
        >>> with count_bytes(net) as m:
        ...     _ = net(x)
        >>> m.by_layer  # addmm: bias 2 + input 3 + weight 6 floats read, 2 written
        {'': (44, 8)}
    """
    if model is None:
        with ByteCounter() as counter:
            yield counter.result
        return
    with ExitStack() as ctx:
        stack = ctx.enter_context(module_stack(model))
        for prefix, module in (extra or {}).items():
            ctx.enter_context(module_stack(module, prefix=prefix, stack=stack))
        yield ctx.enter_context(ByteCounter(stack)).result


def _runner(
    target: nn.Module | CompactPruner, clip: torch.Tensor, fast: bool, fold_norms: bool
) -> tuple[nn.Module, dict[str, nn.Module], Callable[[], Any], nn.Module]:
    """(model whose modules name the ops, other named modules, the forward to run, the module
    to put in eval mode)."""
    from lightning_dance.aap import AdaptivePruner
    from lightning_dance.execution import CompactPruner, accelerate_dense, to_fast_layout

    if isinstance(target, CompactPruner):
        controller = {"controller": target.pruner.controller}
        return target.pruner.model, controller, lambda: target(clip), target.pruner
    if isinstance(target, AdaptivePruner):
        raise TypeError(
            "measure_traffic of an AdaptivePruner is ambiguous: its forward multiplies masks "
            "into a dense run. Pass CompactPruner(pruner) for the compact path, or "
            "pruner.unwrap() for the dense model"
        )
    if not isinstance(target, nn.Module):
        raise TypeError(
            f"measure_traffic needs an nn.Module or a CompactPruner, got {type(target).__name__}"
        )
    if not fast:
        return target, {}, lambda: target(clip), target

    def dense() -> Any:
        with accelerate_dense(target, fold_norms=fold_norms):
            return target(to_fast_layout(clip))

    return target, {}, dense, target


def measure_traffic(
    target: nn.Module | CompactPruner,
    clip: torch.Tensor,
    *,
    fast: bool = True,
    fold_norms: bool = False,
    warmup: Sequence[torch.Tensor] | None = None,
) -> TrafficMeasurement:
    """Bytes moved by one forward on ``clip``, measured from the ops that run.

    Args:
        target: an ``nn.Module`` (the dense model; with ``fast=True`` run as the project's dense
            baseline: every Conv3d on :func:`~lightning_dance.execution.fast_conv3d`, the clip in
            ``channels_last_3d``, as :func:`~lightning_dance.execution.accelerate_dense`), or a
            :class:`~lightning_dance.execution.CompactPruner` (the compact path; ops are named
            by its pruner's model, the controller's modules as ``controller.*``; ops of the
            decision code outside them count for the module that runs it: the stem for the
            controller's input statistics, each layer for its keep decisions).
        clip: the input batch (per-clip figures: batch 1).
        fast: dense models only: ``False`` runs ``model(clip)`` as is.
        fold_norms: dense models with ``fast=True``: fold BatchNorms into their convs
            (:func:`~lightning_dance.execution.accelerate_dense`), the baseline of a
            ``CompactPruner(fold_norms=True)``; a ``CompactPruner`` folds as configured.

    Steady state: warm-up forwards run first, uncounted, so that what the fast paths cache
    across clips (weights in another layout, per-shape set-up) is not charged to every clip.
    ``warmup``: the clips run before ``clip``, as in a stream (the compact path then reuses
    the weight blocks of channel sets that recur, see
    :func:`~lightning_dance.execution.weights.recurring_block`); by default one warm-up on
    ``clip`` itself, after which those blocks are dropped, so that ``clip`` pays for its
    gathers as a clip with new channel sets does. All runs are in eval mode under
    ``torch.no_grad()`` (training flags restored). Per-layer names are the model's module names.
    """
    from lightning_dance.execution.weights import forget_recurring_blocks

    model, extra, run, root = _runner(target, clip, fast, fold_norms)
    with eval_no_grad(root):
        if warmup is None:
            run()
            forget_recurring_blocks(model)
        else:
            for other in warmup:
                _runner(target, other, fast, fold_norms)[2]()
        with count_bytes(model, extra) as result:
            run()
    return result


@dataclass
class TrafficComparison:
    """Measured traffic of the dense fast path and the compact path on the same clip."""

    dense: TrafficMeasurement
    compact: TrafficMeasurement

    @property
    def saving(self) -> float:
        """Dense / compact bytes (> 1: the compact path moves less)."""
        return self.dense.total / max(self.compact.total, 1)

    def energy_saving(self, model: Any) -> float:  # an EnergyModel (energy imports bytes)
        """Estimated energy dense / compact under ``model`` (e.g.
        :meth:`EnergyModel.for_target <lightning_dance.energy.EnergyModel.for_target>`): each
        run's executed MACs (:attr:`TrafficMeasurement.macs`) and measured bytes, priced by
        tensor size (:meth:`~lightning_dance.energy.EnergyModel.measured_energy_pj`)."""
        dense = model.measured_energy_pj(self.dense.macs, self.dense)
        return dense / model.measured_energy_pj(self.compact.macs, self.compact)

    def to_dict(self) -> dict[str, Any]:
        """Totals, the saving and per-kind breakdowns of both runs."""
        return {
            "dense_bytes": self.dense.total,
            "compact_bytes": self.compact.total,
            "saving": self.saving,
            "dense_macs": self.dense.macs,
            "compact_macs": self.compact.macs,
            "dense_by_kind": {k: sum(v) for k, v in self.dense.by_kind.items()},
            "compact_by_kind": {k: sum(v) for k, v in self.compact.by_kind.items()},
        }


def compare_traffic(
    pruner: AdaptivePruner | CompactPruner, clip: torch.Tensor
) -> TrafficComparison:
    """Measured bytes of the dense model (fast kernels) and of the compact path on ``clip``.

    ``pruner``: an :class:`~lightning_dance.aap.AdaptivePruner` (run through a default
    :class:`~lightning_dance.execution.CompactPruner`) or a configured ``CompactPruner``; the
    dense run folds BatchNorms when the compact one does (``fold_norms``).
    """
    from lightning_dance.execution import CompactPruner

    compact = pruner if isinstance(pruner, CompactPruner) else CompactPruner(pruner)
    dense = measure_traffic(compact.pruner.unwrap(), clip, fold_norms=compact.fold_norms)
    return TrafficComparison(dense, measure_traffic(compact, clip))
