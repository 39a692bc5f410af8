"""Dense MAC counting of whole models: fvcore, with a dispatch-counter fallback.

Dense counting (:func:`count_macs`) is fvcore's ``FlopCountAnalysis`` (one fused multiply-add =
one MAC) with extra handles for the ops fvcore skips on video models. If fvcore cannot trace the
model (``torch.jit.trace`` fails, or a custom ``torch.autograd.Function`` hides its ops from the
trace), counting falls back to a dispatch counter built on ``torch.utils.flop_counter``'s
``FlopCounterMode`` with the same conventions, and warns once, naming the module where tracing
failed; a model neither can run raises :class:`MacCountError` naming the failing module. fvcore's
import and tracing warnings (``torch.jit`` deprecations, ``TracerWarning``, unsupported-op logs)
are silenced inside counts only (:func:`quiet_fvcore`). What is counted, per operator key of
:attr:`MacCount.by_operator` (N = number of elements):

==================  =========================================================================
key                 MACs
==================  =========================================================================
``conv``            fvcore's formula: ``out.numel() * C_in/groups * prod(kernel)`` (padding
                    taps included, bias not counted); transposed convs by input size. Convs
                    with ``padding="same"/"valid"`` (``aten::_convolution_mode``, which fvcore
                    does not count) get the same formula
``linear``          ``linear``/``addmm``/``mm``/``matmul``/``bmm``/``einsum`` as fvcore counts them
``batch_norm``      fvcore: eval ``2 N`` (affine) or ``N``; training ``5 N`` / ``4 N``
``group_norm``,     fvcore: ``5 N`` (affine) or ``4 N``
``layer_norm``
``add``, ``mul``    1 per output element (``add``/``sub``, ``mul``/``div``, in place or not):
                    residual sums, SE scaling
``activation``      1 per output element: sigmoid, silu, hardswish, hardsigmoid, gelu, tanh,
                    exp, softmax, log_softmax; pytorchvideo's ``SwishFunction`` (a custom
                    autograd Function, ``x * sigmoid(x)``) counts 2
``reduce``          ``mean``/``sum`` and adaptive avg/max pooling (1d-3d): 1 per *input*
                    element (PyTorch runs a global adaptive average pool as a ``mean``)
``pool``            ``avg_pool``/``max_pool`` (1d-3d): ``prod(kernel)`` per output element
``upsample``        fvcore: nearest 1, bilinear 4 per output element (2d only)
==================  =========================================================================

Not counted (0 MACs): ReLU / clamp / max / comparisons (fvcore ignores them too), shape and
memory ops (view, permute, cat, pad, copy, gather/index, dropout), conv/linear biases, random
number generation. Any other op that is seen but has no formula is listed, with its number of
calls, in :attr:`MacCount.uncounted` (never silently dropped). Counting runs the model once in
eval mode under ``torch.no_grad()`` and counts the path taken for that clip and shape only.

Limits (as for any tracing counter): ops inside a custom ``torch.autograd.Function`` are invisible
to the jit trace (such models are counted by the dispatch fallback, except pytorchvideo's
``SwishFunction``, which has a handle); the dispatch fallback sees aten ops, so a fused or
custom kernel without a formula shows up in ``uncounted``, not in the total; per-module counts
attribute an op to the module whose ``forward`` ran it (functional code in a parent's forward
counts for the parent).

The per-operator formulas live in :mod:`lightning_dance.mac_formulas`; the geometry of one
Conv3d in :mod:`lightning_dance.geometry`; executed and expected counts of masked Conv3d layers
in :mod:`lightning_dance.executed`; their memory traffic in :mod:`lightning_dance.traffic`
(importing those names from here still works for one release, with a ``DeprecationWarning``).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.errors import DanceError
from lightning_dance.mac_formulas import (
    FREE_DISPATCH_OPS,
    FVCORE_KEYS,
    dispatch_key,
    dispatch_mapping,
    jit_handles,
)

__all__ = [
    "quiet_fvcore",
    "MacCount",
    "MacCountError",
    "as_clip",
    "count_macs",
    "count_module_macs",
    "eval_no_grad",
    "module_stack",
]

#: Names that moved out of this module (-> their module), importable from here for one release.
_MOVED = {
    "ConvGeometry": "lightning_dance.geometry",
    "conv3d_input_shapes": "lightning_dance.geometry",
    "conv3d_executed_macs": "lightning_dance.executed",
    "conv3d_executed_macs_batch": "lightning_dance.executed",
    "conv3d_expected_macs": "lightning_dance.executed",
    "conv3d_mac_factors": "lightning_dance.executed",
    "Traffic": "lightning_dance.traffic",
    "conv3d_memory_traffic": "lightning_dance.traffic",
}


def __getattr__(name: str) -> Any:
    """A name that moved (:data:`_MOVED`) from its new module, with a ``DeprecationWarning``."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_dance.macs.{name} moved to {module}.{name}; import it from {module} "
        "(the old path will be removed in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(import_module(module), name)


class MacCountError(DanceError, RuntimeError):
    """A model could be counted neither by fvcore nor by the dispatch counter."""


@dataclass
class MacCount:
    """MACs of one forward pass (for the whole batch given; pass one clip for per-clip counts).

    Attributes:
        total: all counted MACs.
        by_module: MACs per qualified module name (``""`` is the whole model); empty when
            counted with ``per_module=False``.
        by_operator: MACs per operator key (see the module docstring for the keys).
        uncounted: ops that ran but have no formula, with their number of calls (not MACs).
        method: ``"fvcore"`` (jit trace) or ``"dispatch"`` (``FlopCounterMode`` fallback).
    """

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_operator: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)
    method: str = "fvcore"


@contextmanager
def quiet_fvcore() -> Iterator[None]:
    """Silence, inside the ``with`` block only, what jit tracing and fvcore emit.

    ``FutureWarning``/``DeprecationWarning``/``UserWarning`` raised from ``torch.jit`` or
    ``fvcore`` (e.g. "`torch.jit.script` is deprecated", which ``import fvcore.nn`` triggers
    seven times), ``TracerWarning`` and fvcore's logger warnings about unsupported ops (counts
    return them in :attr:`MacCount.uncounted` instead). Other warnings pass through. Every
    count uses it; wrap imports of packages that import fvcore (pytorchvideo) with it too.

    Example:
        >>> with quiet_fvcore():
        ...     import fvcore.nn
    """
    fv_logger = logging.getLogger("fvcore")
    old_level = fv_logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for cat in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=cat, module=r"(torch\.jit|fvcore)")
        fv_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            fv_logger.setLevel(old_level)


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode under ``torch.no_grad()``; restore every training flag."""
    modes = {m: m.training for m in model.modules()}
    model.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _count_fvcore(model: nn.Module, inputs: tuple, per_module: bool) -> MacCount:
    with quiet_fvcore():
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("no_tracer_warning")
        for op, key in FVCORE_KEYS.items():
            base = analysis._op_handles.get(op)
            if base is not None:
                analysis.set_op_handle(op, _renamed(base, key))
        analysis.set_op_handle(**jit_handles())
        with module_stack(model) as stack:
            try:
                total = int(analysis.total())  # the trace runs here
            except Exception as exc:
                raise _CountFailure(stack) from exc
        by_op = {k: int(v) for k, v in analysis.by_operator().items()}
        by_module = {k: int(v) for k, v in analysis.by_module().items()} if per_module else {}
        unsupported = dict(analysis.unsupported_ops())
    uncounted = {_simple_op(k): int(v) for k, v in unsupported.items()}
    return MacCount(total, by_module, by_op, uncounted, "fvcore")


def _renamed(handle: Any, key: str) -> Any:
    def wrapped(inputs, outputs):
        out = handle(inputs, outputs)
        value = sum(out.values()) if isinstance(out, Counter) else out
        return Counter({key: int(value)})

    return wrapped


def _simple_op(name: str) -> str:
    for prefix in ("aten::", "aten.", "prim::"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _count_dispatch(model: nn.Module, inputs: tuple, per_module: bool) -> MacCount:
    from torch.utils.flop_counter import FlopCounterMode

    seen: Counter[str] = Counter()

    class _Counter(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):  # noqa: D401 (torch hook)
            if func_packet not in self.flop_registry:
                op = str(func_packet).split(".")[-1]
                if op not in FREE_DISPATCH_OPS:
                    seen[op] += 1
            return super()._count_flops(func_packet, out, args, kwargs)

    counter = _Counter(display=False, custom_mapping=dispatch_mapping())
    with quiet_fvcore(), module_stack(model) as stack, counter:
        try:
            model(*inputs)
        except Exception as exc:
            raise _CountFailure(stack) from exc
    counts = counter.get_flop_counts()
    root = type(model).__name__
    by_op: Counter[str] = Counter()
    for packet, flops in counts.get("Global", {}).items():
        by_op[dispatch_key(str(packet))] += flops // 2
    by_module: dict[str, int] = {}
    if per_module:
        called = {"": sum(by_op.values())}
        for name, ops in counts.items():
            if name not in ("Global", root):
                qual = name[len(root) + 1 :] if name.startswith(root + ".") else name
                called[qual] = sum(v // 2 for v in ops.values())
        by_module = _fill_containers(model, called)
    return MacCount(int(sum(by_op.values())), by_module, dict(by_op), dict(seen), "dispatch")


def _fill_containers(model: nn.Module, called: dict[str, int]) -> dict[str, int]:
    """Per-module MACs for every module: containers that are never called themselves
    (``ModuleList``...) get the sum of their topmost called descendants, as fvcore reports."""
    out: dict[str, int] = {}
    for name, _ in model.named_modules():
        if name in called:
            out[name] = called[name]
            continue
        prefix = name + "."
        inside = [n for n in called if n.startswith(prefix)]
        top = [n for n in inside if not any(n.startswith(o + ".") for o in inside if o != n)]
        out[name] = sum(called[n] for n in top)
    return out


class _CountFailure(Exception):
    """A backend could not run/trace the model; ``where`` names the module that was running."""

    def __init__(self, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__("count failed")
        self.where = _describe_module(stack)


@contextmanager
def module_stack(
    model: nn.Module, *, prefix: str = "", stack: list[tuple[str, nn.Module]] | None = None
) -> Iterator[list[tuple[str, nn.Module]]]:
    """Track the modules whose forward is running (qualified name, module), innermost last.

    Shared by the MAC counters and the byte counter (:mod:`lightning_dance.bytes`) to attribute
    ops to modules. ``prefix`` is put before every name (``prefix.name``; the root is named
    ``prefix``); ``stack``: track into this list (several models in one stack).

    A forward that raises leaves its entry on the stack, so after an exception the stack ends
    with the module that failed.
    """
    stack = [] if stack is None else stack

    def push(name: str):
        return lambda module, args: stack.append((name, module))

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if stack and stack[-1][1] is module:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        name = ".".join(n for n in (prefix, name) if n)
        handles.append(module.register_forward_pre_hook(push(name)))
        handles.append(module.register_forward_hook(pop))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _describe_module(stack: list[tuple[str, nn.Module]]) -> str:
    if not stack:
        return "after the forward returned (in handling the model's output)"
    name, module = stack[-1]
    kind = type(module).__name__
    return f"in module '{name}' ({kind})" if name else f"in the top-level forward of {kind}"


def _opaque_functions(count: MacCount) -> list[str]:
    """Custom autograd Functions fvcore saw as opaque ``PythonOp`` nodes (their ops are hidden)."""
    return sorted(k for k in count.uncounted if k.startswith("PythonOp"))


def count_module_macs(
    module: nn.Module, *inputs: Any, per_module: bool = True, backend: str = "auto"
) -> MacCount:
    """Dense MACs of ``module(*inputs)`` (any module, any inputs), see :func:`count_macs`.

    Args:
        backend: ``"auto"`` (fvcore, falling back to dispatch with a warning), ``"fvcore"``
            (no fallback: a trace failure raises :class:`MacCountError`) or ``"dispatch"``
            (``FlopCounterMode`` only, no jit).

    Example:
        >>> import torch, torch.nn as nn
        >>> count_module_macs(nn.Linear(6, 2), torch.randn(3, 6)).total
        36
    """
    if backend not in ("auto", "fvcore", "dispatch"):
        raise ValueError(f"backend must be 'auto', 'fvcore' or 'dispatch', got {backend!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_macs needs an nn.Module, got {type(module).__name__}")
    shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    name = type(module).__name__
    why = None
    with eval_no_grad(module):
        if backend in ("auto", "fvcore"):
            try:
                result = _count_fvcore(module, inputs, per_module)
            except _CountFailure as failure:
                cause = failure.__cause__
                why = (
                    f"torch.jit tracing failed {failure.where} ({type(cause).__name__}: "
                    f"{_first_line(cause)})"
                )
                if backend == "fvcore":
                    raise MacCountError(
                        f"fvcore cannot count {name} for inputs of shape {shapes}: {why}. "
                        "backend='auto' or 'dispatch' counts it without jit tracing."
                    ) from cause
            else:
                opaque = _opaque_functions(result)
                if backend == "fvcore" or not opaque:
                    return result
                why = (
                    f"custom autograd Function(s) {opaque} are opaque to the jit trace, so "
                    "the ops inside them would be missed"
                )
        try:
            result = _count_dispatch(module, inputs, per_module)
        except _CountFailure as failure:
            cause = failure.__cause__
            msg = (
                f"cannot count the MACs of {name}: its forward failed {failure.where} for "
                f"inputs of shape {shapes}: {type(cause).__name__}: {_first_line(cause)}"
            )
            if why:
                msg += f" (fvcore could not count it either: {why})"
            raise MacCountError(msg) from cause
    if why is not None:
        warnings.warn(
            f"count_macs: fvcore could not count {name}: {why}; counted with "
            "torch.utils.flop_counter.FlopCounterMode (dispatch) and the same conventions instead.",
            UserWarning,
            stacklevel=3,
        )
    return result


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def as_clip(clip: torch.Tensor | tuple[int, ...] | list[int], model: nn.Module) -> torch.Tensor:
    """A clip tensor ``[N, C, T, H, W]`` from a tensor or a shape (``(C,T,H,W)`` or 5-d)."""
    if isinstance(clip, torch.Tensor):
        if clip.dim() != 5:
            raise ValueError(
                f"a clip must be a 5-d tensor [N, C, T, H, W], got shape {tuple(clip.shape)}"
            )
        return clip
    shape = tuple(clip)
    if len(shape) == 4:
        shape = (1, *shape)
    if len(shape) != 5 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(
            f"a clip shape must be (C, T, H, W) or (N, C, T, H, W) positive ints, got {clip!r}"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def count_macs(
    model: nn.Module,
    clip: torch.Tensor | tuple[int, ...],
    *,
    per_module: bool = True,
    backend: str = "auto",
) -> MacCount:
    """Dense MACs of a video model on ``clip`` (fvcore, with the conventions of this module).

    Counted: convs and linear/matmul (fvcore), norms (fvcore), elementwise ``add``/``mul``,
    activations, reductions (mean/sum/adaptive pools) and windowed pooling (ours). Not counted:
    ReLU/clamp/comparisons, shape and memory ops, biases. The full table is in the module
    docstring and docs/accounting.md; ops without a formula are listed in ``uncounted``.

    Counts are for the batch given: pass one clip (``N = 1``, or a shape ``(C, T, H, W)``) for
    per-clip MACs. The model runs once, in eval mode, under ``torch.no_grad()``; its training
    flags are restored. If fvcore cannot trace it, the dispatch counter is used and one
    ``UserWarning`` says so; if neither can run it, :class:`MacCountError` names the module
    whose forward failed.

    Args:
        model: any ``nn.Module`` taking a clip ``[N, C, T, H, W]``.
        clip: a clip tensor, or its shape (a seeded random clip of that shape is used).
        per_module: also fill :attr:`MacCount.by_module`.
        backend: ``"auto"``, ``"fvcore"`` or ``"dispatch"`` (see :func:`count_module_macs`).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> c = count_macs(net, (3, 4, 8, 8))
        >>> c.by_operator["conv"], c.by_operator["reduce"], c.by_operator["linear"]
        (165888, 2048, 16)
    """
    return count_module_macs(model, as_clip(clip, model), per_module=per_module, backend=backend)
