"""MAC accounting: dense counts (fvcore), executed counts of pruned Conv3d layers, memory traffic.

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

Executed counts (:func:`conv3d_executed_macs`, :func:`conv3d_executed_macs_batch`) give what the
fast execution path computes for a Conv3d whose *input* is masked per sample along frames
``m_t[T]``, channels ``m_c[C]`` and features ``m_f[H, W]``:

    executed = (C_out / groups) * kept_channels * kh * kw * pairs_t * active_hw

- ``kept_channels``: kept input channels (all ``C_in`` if channels are not masked). Each output
  channel of a group reads that group's kept channels; summed over groups this is
  ``C_out/groups * kept``.
- ``pairs_t``: frames masked: the number of (output frame ``t'``, temporal tap ``k``) pairs whose
  input frame ``t = t'*s - pad + k*d`` lies inside the clip (for ``padding_mode='zeros'``) and is
  kept. The fast path skips zero-padding taps, so an all-kept frame mask counts *less* than the
  dense conv when the temporal padding is non-zero. Frames not masked: ``T_out * kT`` (padding
  taps included, as fvcore). Non-zero padding modes (reflect, replicate, circular) read a real,
  possibly masked, frame in the padding: its mask decides.
- ``active_hw``: features masked: the output positions whose spatial receptive field (stride,
  dilation, padding) holds at least one kept input position; each costs all ``kh*kw`` taps. The
  other positions equal ``conv(0) = bias`` and are filled. Features not masked: ``H_out*W_out``.

:func:`conv3d_mac_factors` splits the executed/dense ratio into its three factors.
:func:`conv3d_expected_macs` is the differentiable expectation of that count under independent
Bernoulli keep decisions (exact for the channel and frame terms, and for the feature term when
block probabilities are given); it equals the hard count at 0/1 probabilities.
:func:`conv3d_memory_traffic` models the bytes moved, dense and executed (gather and scatter
copies of the fast path included), see :class:`Traffic`. docs/accounting.md has the details and
the cross-checks.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(4, 8, 3, padding=1)
    >>> conv3d_executed_macs(conv, (4, 2, 4, 4))  # dense: 8*4*27*2*4*4
    27648
    >>> conv3d_executed_macs(conv, (4, 2, 4, 4), channel=torch.tensor([1, 1, 0, 0]))
    13824
    >>> conv3d_executed_macs(conv, (4, 2, 4, 4), frame=torch.ones(2))  # padding taps skipped
    18432
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.errors import DanceError
from lightning_dance.layers import all_conv3d
from lightning_dance.masks import DIMS

__all__ = [
    "quiet_fvcore",
    "MacCount",
    "MacCountError",
    "count_macs",
    "count_module_macs",
    "ConvGeometry",
    "conv3d_input_shapes",
    "conv3d_executed_macs",
    "conv3d_executed_macs_batch",
    "conv3d_expected_macs",
    "conv3d_mac_factors",
    "Traffic",
    "conv3d_memory_traffic",
]

# --------------------------------------------------------------------------------------------
# Part A: dense counting
# --------------------------------------------------------------------------------------------


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


def _numel(shape: Any) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _pool_window(kernel: Any, rank: int) -> int:
    """``prod(kernel_size)`` of a pooling op; an int or a 1-element list means a cube."""
    ks = [int(kernel)] if isinstance(kernel, int) else [int(k) for k in kernel]
    if len(ks) == 1:
        ks = ks * rank
    return int(math.prod(ks))


# Canonical operator key of every op we give a formula to (fvcore jit names / aten packets).
_ELEMENTWISE = {
    "add": "add", "add_": "add", "sub": "add", "sub_": "add", "rsub": "add",
    "mul": "mul", "mul_": "mul", "div": "mul", "div_": "mul",
    "sigmoid": "activation", "sigmoid_": "activation", "silu": "activation",
    "silu_": "activation", "hardswish": "activation", "hardswish_": "activation",
    "hardsigmoid": "activation", "hardsigmoid_": "activation", "gelu": "activation",
    "gelu_": "activation", "tanh": "activation", "tanh_": "activation", "exp": "activation",
    "exp_": "activation", "softmax": "activation", "_softmax": "activation",
    "log_softmax": "activation", "_log_softmax": "activation",
}  # fmt: skip
_REDUCE = ("mean", "sum")
_POOL = {"avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "max_pool1d": 1, "max_pool2d": 2,
         "max_pool3d": 3, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3}  # fmt: skip
_ADAPTIVE = ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
             "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
             "adaptive_max_pool2d", "adaptive_max_pool3d")  # fmt: skip
_SWISH_FUNCTIONS = ("SwishFunction",)  # custom autograd Functions computing x * sigmoid(x)

# fvcore jit op -> canonical key for fvcore's own handles.
_FVCORE_KEYS = {
    "aten::_convolution": "conv", "aten::addmm": "linear", "aten::bmm": "linear",
    "aten::einsum": "linear", "aten::matmul": "linear", "aten::mm": "linear",
    "aten::linear": "linear", "aten::batch_norm": "batch_norm",
    "aten::group_norm": "group_norm", "aten::layer_norm": "layer_norm",
    "aten::instance_norm": "instance_norm", "aten::upsample_nearest2d": "upsample",
    "aten::upsample_bilinear2d": "upsample", "aten::adaptive_avg_pool2d": "reduce",
    "aten::grid_sampler": "upsample",
}  # fmt: skip

# Dispatch-level ops that cost no MACs by our convention (views, copies, comparisons, ReLU...).
_FREE_DISPATCH_OPS = frozenset(
    """view _unsafe_view reshape _reshape_alias t transpose permute expand expand_as squeeze
    unsqueeze flatten unflatten clone _to_copy copy_ detach alias empty empty_like empty_strided
    zeros zeros_like ones ones_like full full_like fill_ zero_ new_zeros new_empty new_full
    new_ones cat stack split split_with_sizes chunk unbind narrow slice select index index_select
    gather scatter scatter_ index_put_ masked_fill masked_fill_ where relu relu_ threshold
    threshold_ clamp clamp_ clamp_min clamp_min_ clamp_max hardtanh hardtanh_ max min amax amin
    maximum minimum eq ne gt ge lt le logical_not logical_and bitwise_not constant_pad_nd pad
    reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d lift_fresh lift_fresh_copy arange as_strided contiguous dropout
    native_dropout floor floor_divide remainder _local_scalar_dense scalar_tensor item topk sort
    argmax argmin nonzero roll repeat abs neg sign _unsafe_index linspace rand rand_like randn
    randn_like randint randint_like randperm bernoulli bernoulli_ normal_ uniform_ exponential_
    to type_as""".split()
)


def _jit_ints(value: Any) -> list[int]:
    """The int list of a jit graph value: a constant, or a ``prim::ListConstruct`` of constants."""
    ival = value.toIValue()
    if ival is None and value.node().kind() == "prim::ListConstruct":
        ival = [v.toIValue() for v in value.node().inputs()]
    if ival is None or (not isinstance(ival, int) and None in ival):
        raise ValueError(f"cannot read a constant kernel size from the trace: {value}")
    return ival


def _jit_handles() -> dict[str, Any]:
    """fvcore handles for every op we count, returning ``Counter({key: MACs})``."""
    from fvcore.nn.jit_handles import get_shape

    handles: dict[str, Any] = {}

    def per_output(key: str, scale: int = 1):
        return lambda inputs, outputs: Counter({key: scale * _numel(get_shape(outputs[0]))})

    def per_input(key: str):
        return lambda inputs, outputs: Counter({key: _numel(get_shape(inputs[0]))})

    def pool(rank: int):
        def handle(inputs, outputs):
            window = _pool_window(_jit_ints(inputs[1]), rank)
            return Counter({"pool": window * _numel(get_shape(outputs[0]))})

        return handle

    for op, key in _ELEMENTWISE.items():
        if not op.startswith("_"):
            handles[f"aten::{op}"] = per_output(key)
    for op in _REDUCE:
        handles[f"aten::{op}"] = per_input("reduce")
    for op, rank in _POOL.items():
        if "indices" not in op:
            handles[f"aten::{op}"] = pool(rank)
    for op in _ADAPTIVE:
        if not op.startswith("_"):
            handles[f"aten::{op}"] = per_input("reduce")

    def conv_mode(inputs, outputs):  # convs with padding="same"/"valid": fvcore skips them
        w_shape, out_shape = get_shape(inputs[1]), get_shape(outputs[0])
        return Counter({"conv": _numel(w_shape) * out_shape[0] * _numel(out_shape[2:])})

    handles["aten::_convolution_mode"] = conv_mode

    def free(inputs, outputs):
        return Counter()

    for op in _FREE_DISPATCH_OPS:  # same zero-cost ops as the dispatch counter
        handles.setdefault(f"aten::{op}", free)

    def swish(inputs, outputs):  # x * sigmoid(x), as the dispatch counter sees it
        n = _numel(get_shape(outputs[0]))
        return Counter({"activation": n, "mul": n})

    for name in _SWISH_FUNCTIONS:
        handles[f"prim::PythonOp.{name}"] = swish
    return handles


def _dispatch_mapping() -> dict[Any, Any]:
    """``FlopCounterMode`` formulas (in FLOPs = 2 x MACs, torch's unit) for the extra ops."""
    aten = torch.ops.aten

    def per_output(*args, out_shape=None, **kwargs):
        return 2 * _numel(out_shape)

    def per_input(x_shape, *args, out_shape=None, **kwargs):
        return 2 * _numel(x_shape)

    def pool(rank: int):
        def formula(x_shape, kernel, *args, out_shape=None, **kwargs):
            out = (
                out_shape[0]
                if isinstance(out_shape, (tuple, list)) and not isinstance(out_shape[0], int)
                else out_shape
            )
            return 2 * _pool_window(kernel, rank) * _numel(out)

        return formula

    def batch_norm(x_shape, weight_shape, *args, out_shape=None, **kwargs):
        training = next((a for a in args if isinstance(a, bool)), False)
        affine = weight_shape is not None
        return 2 * _numel(x_shape) * ((5 if affine else 4) if training else (2 if affine else 1))

    def group_norm(x_shape, weight_shape, *args, out_shape=None, **kwargs):
        return 2 * _numel(x_shape) * (5 if weight_shape is not None else 4)

    def layer_norm(x_shape, normalized_shape, weight_shape, *args, out_shape=None, **kwargs):
        return 2 * _numel(x_shape) * (5 if weight_shape is not None else 4)

    def upsample(scale: int):
        return lambda *args, out_shape=None, **kwargs: 2 * scale * _numel(out_shape)

    mapping: dict[Any, Any] = {}

    def put(name: str, formula: Any) -> None:
        packet = getattr(aten, name, None)
        if packet is not None:
            mapping[packet] = formula

    for op in _ELEMENTWISE:
        put(op, per_output)
    for op in (*_REDUCE, *_ADAPTIVE):
        put(op, per_input)
    for op, rank in _POOL.items():
        put(op, pool(rank))
    for op in ("native_batch_norm", "_native_batch_norm_legit",
               "_native_batch_norm_legit_no_training"):  # fmt: skip
        put(op, batch_norm)
    put("native_group_norm", group_norm)
    put("native_layer_norm", layer_norm)
    put("upsample_nearest2d", upsample(1))
    put("upsample_bilinear2d", upsample(4))
    return mapping


def _dispatch_key(name: str) -> str:
    """Canonical operator key of an aten packet name (``aten.convolution`` -> ``conv``)."""
    op = name.split(".")[-1]
    if op in ("convolution", "_convolution", "cudnn_convolution", "mkldnn_convolution"):
        return "conv"
    if op in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear"):
        return "linear"
    if op in _ELEMENTWISE:
        return _ELEMENTWISE[op]
    if op in _REDUCE or op in _ADAPTIVE:
        return "reduce"
    if op in _POOL:
        return "pool"
    if "batch_norm" in op:
        return "batch_norm"
    if op == "native_group_norm":
        return "group_norm"
    if op == "native_layer_norm":
        return "layer_norm"
    if op.startswith("upsample"):
        return "upsample"
    return op


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
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
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
        for op, key in _FVCORE_KEYS.items():
            base = analysis._op_handles.get(op)
            if base is not None:
                analysis.set_op_handle(op, _renamed(base, key))
        analysis.set_op_handle(**_jit_handles())
        with _module_stack(model) as stack:
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
                if op not in _FREE_DISPATCH_OPS:
                    seen[op] += 1
            return super()._count_flops(func_packet, out, args, kwargs)

    counter = _Counter(display=False, custom_mapping=_dispatch_mapping())
    with quiet_fvcore(), _module_stack(model) as stack, counter:
        try:
            model(*inputs)
        except Exception as exc:
            raise _CountFailure(stack) from exc
    counts = counter.get_flop_counts()
    root = type(model).__name__
    by_op: Counter[str] = Counter()
    for packet, flops in counts.get("Global", {}).items():
        by_op[_dispatch_key(str(packet))] += flops // 2
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
def _module_stack(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Track the modules whose forward is running (qualified name, module), innermost last.

    A forward that raises leaves its entry on the stack, so after an exception the stack ends
    with the module that failed.
    """
    stack: list[tuple[str, nn.Module]] = []

    def push(name: str):
        return lambda module, args: stack.append((name, module))

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if stack and stack[-1][1] is module:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
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
    with _eval_no_grad(module):
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


def _as_clip(clip: torch.Tensor | tuple[int, ...] | list[int], model: nn.Module) -> torch.Tensor:
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
    return count_module_macs(model, _as_clip(clip, model), per_module=per_module, backend=backend)


# --------------------------------------------------------------------------------------------
# Part B: executed MACs and memory traffic of a pruned Conv3d
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Everything the counts need about one Conv3d applied to an input ``(C, T, H, W)``.

    ``pad_lo``/``pad_hi`` are per-dim (T, H, W) paddings before/after (``padding='same'`` puts
    the odd extra on the ``hi`` side, as PyTorch does); ``output`` is ``(T_out, H_out, W_out)``.
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    dilation: tuple[int, int, int]
    pad_lo: tuple[int, int, int]
    pad_hi: tuple[int, int, int]
    padding_mode: str
    input: tuple[int, int, int, int]
    output: tuple[int, int, int]
    bias: bool

    @classmethod
    def of(cls, conv: nn.Conv3d, input_shape: tuple[int, ...]) -> ConvGeometry:
        """Validate ``conv`` and ``input_shape = (C, T, H, W)`` and compute the geometry."""
        if not isinstance(conv, nn.Conv3d):
            raise TypeError(f"expected an nn.Conv3d, got {type(conv).__name__}")
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(
                f"input_shape must be one sample's (C, T, H, W), got {tuple(input_shape)}"
            )
        if shape[0] != conv.in_channels:
            raise ValueError(
                f"input_shape {shape} has {shape[0]} channels but the conv expects "
                f"{conv.in_channels}"
            )
        k, s, d = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                lo = hi = (0, 0, 0)
            else:  # "same"
                total = [di * (ki - 1) for di, ki in zip(d, k, strict=True)]
                lo = tuple(t // 2 for t in total)
                hi = tuple(t - t // 2 for t in total)
        else:
            lo = hi = tuple(conv.padding)
        out = []
        for size, ki, si, di, pl, ph in zip(shape[1:], k, s, d, lo, hi, strict=True):
            o = (size + pl + ph - di * (ki - 1) - 1) // si + 1
            if o < 1:
                raise ValueError(f"input {shape} is too small for {conv}: output size would be {o}")
            out.append(o)
        return cls(
            conv.in_channels, conv.out_channels, conv.groups, k, s, d, lo, hi,
            conv.padding_mode, shape, tuple(out), conv.bias is not None,
        )  # fmt: skip

    @property
    def dense_macs(self) -> int:
        """fvcore's count: ``C_out * C_in/groups * prod(kernel) * T_out*H_out*W_out``."""
        return (
            self.out_channels * (self.in_channels // self.groups)
            * math.prod(self.kernel) * math.prod(self.output)
        )  # fmt: skip

    @property
    def weight_numel(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel)


def _source_index(q: int, size: int, mode: str) -> int | None:
    """Input index read at padded offset ``q - pad_lo`` (None: a zero-padding position)."""
    if 0 <= q < size:
        return q
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -q if q < 0 else 2 * (size - 1) - q
    if mode == "replicate":
        return min(max(q, 0), size - 1)
    if mode == "circular":
        return q % size
    raise ValueError(f"unsupported padding_mode {mode!r}")


@functools.lru_cache(maxsize=1024)
def _temporal_reads_cpu(
    size: int, out: int, k: int, s: int, d: int, lo: int, mode: str
) -> torch.Tensor:
    reads = torch.zeros(k, size, dtype=torch.float64)
    for t_out in range(out):
        for tap in range(k):
            src = _source_index(t_out * s - lo + tap * d, size, mode)
            if src is not None:
                reads[tap, src] += 1
    return reads


def _temporal_reads(g: ConvGeometry, device: torch.device) -> torch.Tensor:
    """``R[k, t]``: number of output frames whose temporal tap ``k`` reads input frame ``t``."""
    reads = _temporal_reads_cpu(
        g.input[1], g.output[0], g.kernel[0], g.stride[0], g.dilation[0], g.pad_lo[0],
        g.padding_mode,
    )  # fmt: skip
    return reads.to(device)


def _pad_hw(x: torch.Tensor, g: ConvGeometry, zero_value: float = 0.0) -> torch.Tensor:
    """Pad ``[N, 1, H, W]`` spatially like the conv pads its input."""
    pad = (g.pad_lo[2], g.pad_hi[2], g.pad_lo[1], g.pad_hi[1])
    if not any(pad):
        return x
    if g.padding_mode == "zeros":
        return F.pad(x, pad, mode="constant", value=zero_value)
    return F.pad(x, pad, mode=g.padding_mode)


def _check_mask(
    name: str, mask: torch.Tensor | None, size: tuple[int, ...], what: str
) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"the {name} mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() == len(size):  # one sample
        mask = mask.unsqueeze(0)
    if mask.dim() != len(size) + 1 or tuple(mask.shape[1:]) != size:
        raise ValueError(
            f"the {name} mask must be [N, {what}] = [N, {', '.join(map(str, size))}] "
            f"(or one sample's [{what}]) for this layer, got shape {tuple(mask.shape)}"
        )
    return mask


def _batch_size(masks: list[torch.Tensor | None], batch_size: int | None) -> int:
    sizes = {m.shape[0] for m in masks if m is not None}
    if batch_size is not None:
        sizes.add(int(batch_size))
    if len(sizes) > 1:
        raise ValueError(f"masks disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def _device(masks: list[torch.Tensor | None]) -> torch.device:
    return next((m.device for m in masks if m is not None), torch.device("cpu"))


@dataclass
class _HardTerms:
    kept_channels: torch.Tensor  # [N] int64
    kept_frames: torch.Tensor  # [N] int64
    kept_positions: torch.Tensor  # [N] int64
    temporal_pairs: torch.Tensor  # [N] int64: computed (t', k) pairs
    taps_used: torch.Tensor  # [N] int64: temporal taps with >= 1 computed pair
    active_positions: torch.Tensor  # [N] int64: computed output (h', w')
    out_channels: torch.Tensor  # [N] int64: output channels computed (groups with kept inputs)


def _hard_terms(
    g: ConvGeometry,
    frame: torch.Tensor | None,
    channel: torch.Tensor | None,
    feature: torch.Tensor | None,
    n: int,
    device: torch.device,
) -> _HardTerms:
    c, t, h, w = g.input
    t_out, h_out, w_out = g.output
    kt = g.kernel[0]

    def full(value: int) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.int64, device=device)

    if channel is not None:
        m_c = channel.detach() > 0.5
        kept_c = m_c.sum(1)
        groups_on = m_c.view(n, g.groups, c // g.groups).any(2).sum(1)
        out_c = groups_on * (g.out_channels // g.groups)
    else:
        kept_c, out_c = full(c), full(g.out_channels)
    if frame is not None:
        m_t = (frame.detach() > 0.5).to(torch.float64)
        reads = _temporal_reads(g, device)  # [kT, T]
        per_tap = m_t @ reads.T  # [N, kT]: computed pairs per tap
        pairs = per_tap.sum(1).round().long()
        taps = (per_tap > 0).sum(1)
        kept_t = m_t.sum(1).round().long()
    else:
        pairs, taps, kept_t = full(t_out * kt), full(kt), full(t)
    if feature is not None:
        m_f = (feature.detach() > 0.5).to(torch.float32).unsqueeze(1)  # [N, 1, H, W]
        active = F.max_pool2d(
            _pad_hw(m_f, g), g.kernel[1:], stride=g.stride[1:], dilation=g.dilation[1:]
        )
        act = active.sum((1, 2, 3)).round().long()
        kept_p = m_f.sum((1, 2, 3)).round().long()
    else:
        act, kept_p = full(h_out * w_out), full(h * w)
    return _HardTerms(kept_c, kept_t, kept_p, pairs, taps, act, out_c)


def _mask_terms(
    conv: nn.Conv3d,
    input_shape: tuple[int, ...],
    frame: torch.Tensor | None,
    channel: torch.Tensor | None,
    feature: torch.Tensor | None,
    batch_size: int | None = None,
) -> tuple[ConvGeometry, _HardTerms, set[str]]:
    """Validate the layer, its input shape and masks; the hard terms and the masked dims."""
    g = ConvGeometry.of(conv, input_shape)
    c, t, h, w = g.input
    frame = _check_mask("frame", frame, (t,), "T")
    channel = _check_mask("channel", channel, (c,), "C")
    feature = _check_mask("feature", feature, (h, w), "H, W")
    masks = [frame, channel, feature]
    n = _batch_size(masks, batch_size)
    terms = _hard_terms(g, frame, channel, feature, n, _device(masks))
    return g, terms, {d for d, m in zip(DIMS, masks, strict=True) if m is not None}


def conv3d_executed_macs_batch(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Executed MACs ``[N]`` (int64) of ``conv`` for each sample's input masks.

    Args:
        conv: the layer.
        input_shape: one sample's input ``(C, T, H, W)``.
        frame, channel, feature: 0/1 masks ``[N, T]``, ``[N, C]``, ``[N, H, W]`` (entries > 0.5
            count as kept), or ``None`` where the dim is not masked for this layer. Straight-
            through masks are fine (they are detached).
        batch_size: ``N`` when all masks are ``None`` (default 1).

    Vectorized (a matmul for frames, a max-pool for features): cheap enough for every forward.
    """
    g, terms, _ = _mask_terms(conv, input_shape, frame, channel, feature, batch_size)
    per_out = (g.out_channels // g.groups) * g.kernel[1] * g.kernel[2]
    return per_out * terms.kept_channels * terms.temporal_pairs * terms.active_positions


def conv3d_executed_macs(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
) -> int:
    """Executed MACs of ``conv`` for ONE sample: masks ``[T]``, ``[C]``, ``[H, W]`` or None.

    See the module docstring for what the fast path computes; with every mask ``None`` this is
    the dense (fvcore) count.
    """
    for name, mask in (("frame", frame), ("channel", channel), ("feature", feature)):
        if mask is not None and mask.dim() != (2 if name == "feature" else 1):
            raise ValueError(
                f"conv3d_executed_macs counts one sample: the {name} mask must be "
                f"{'[H, W]' if name == 'feature' else '[T]' if name == 'frame' else '[C]'}, "
                f"got shape {tuple(mask.shape)} (use conv3d_executed_macs_batch for [N, ...])"
            )
    out = conv3d_executed_macs_batch(conv, input_shape, frame=frame, channel=channel,
                                     feature=feature)  # fmt: skip
    return int(out[0])


def conv3d_mac_factors(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The executed/dense MAC ratio of ``conv`` split by dim: ``{dim: [N] float64}``.

    ``channel``: kept channels / ``C_in``; ``frame``: computed (output frame, tap) pairs /
    ``T_out * kT`` (below the kept-frame fraction when padding taps are skipped); ``feature``:
    computed output positions / ``H_out * W_out`` (above the kept-position fraction: a field
    touching one kept position is computed). Their product times the dense MACs is
    :func:`conv3d_executed_macs_batch`. Masks as there; an unmasked dim gives 1.

    Example:
        >>> import torch, torch.nn as nn
        >>> f = conv3d_mac_factors(nn.Conv3d(4, 8, 3, padding=1), (4, 2, 4, 4),
        ...                        frame=torch.ones(2), channel=torch.tensor([1., 1, 1, 0]))
        >>> {k: round(float(v), 4) for k, v in f.items()}
        {'frame': 0.6667, 'channel': 0.75, 'feature': 1.0}
    """
    g, terms, _ = _mask_terms(conv, input_shape, frame, channel, feature, batch_size)
    t_out, h_out, w_out = g.output
    return {
        "frame": terms.temporal_pairs.double() / (t_out * g.kernel[0]),
        "channel": terms.kept_channels.double() / g.in_channels,
        "feature": terms.active_positions.double() / (h_out * w_out),
    }


@functools.lru_cache(maxsize=256)
def _block_touch_cpu(g: ConvGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """``[L, B]`` 0/1: output position ``l``'s receptive field touches feature block ``b``."""
    _, _, h, w = g.input
    gh, gw = grid
    ids = torch.arange(gh * gw, dtype=torch.float64).view(1, 1, gh, gw)
    ids = F.interpolate(ids, size=(h, w), mode="nearest")  # as masks.expand_blocks
    ids = _pad_hw(ids, g, zero_value=-1.0)
    cols = F.unfold(ids, g.kernel[1:], dilation=g.dilation[1:], stride=g.stride[1:])[0]
    cols = cols.round().long().T  # [L, kh*kw] block ids (-1 = zero padding)
    touch = torch.zeros(cols.shape[0], gh * gw + 1, dtype=torch.float64)
    touch.scatter_(1, torch.where(cols < 0, gh * gw, cols), 1.0)
    return touch[:, : gh * gw]


def _expected_active(
    g: ConvGeometry, feature_p: torch.Tensor | None, blocks_p: torch.Tensor | None, n: int
) -> torch.Tensor:
    h_out, w_out = g.output[1:]
    if feature_p is not None:  # positions independent: 1 - prod over the field of (1 - p)
        p = _pad_hw(feature_p.to(torch.float64).unsqueeze(1), g)
        cols = F.unfold(p, g.kernel[1:], dilation=g.dilation[1:], stride=g.stride[1:])
        return (1 - torch.prod(1 - cols, dim=1)).sum(1)
    if blocks_p is not None:  # one independent gate per block: exact for block masks
        touch = _block_touch_cpu(g, tuple(blocks_p.shape[1:])).to(blocks_p.device)
        log_q = torch.log(torch.clamp(1 - blocks_p.to(torch.float64).flatten(1), min=1e-30))
        return (1 - torch.exp(log_q @ touch.T)).sum(1)
    return torch.full((n,), float(h_out * w_out), dtype=torch.float64)


def conv3d_expected_macs(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame_p: torch.Tensor | None = None,
    channel_p: torch.Tensor | None = None,
    feature_p: torch.Tensor | None = None,
    feature_blocks_p: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Differentiable expected executed MACs ``[N]`` (float64) from keep probabilities.

    Keep decisions are taken as independent Bernoulli draws, independent across dims. Then:

    - channels: ``C_out/groups * sum(p_c)`` (exact);
    - frames: ``sum_t p_t * reads[t]`` with ``reads[t]`` the (t', k) pairs reading frame t (exact);
    - features from ``feature_p [N, H, W]`` (positions independent): each output position is
      computed with probability ``1 - prod_{field}(1 - p)``. When the feature mask is constant
      over spatial blocks (the controller's case), positions in a block are *not* independent
      and this overestimates; pass ``feature_blocks_p [N, gh, gw]`` (the block probabilities,
      expanded to ``H x W`` like :func:`lightning_dance.masks.expand_blocks`) instead: the
      probability is then ``1 - prod`` over the distinct blocks the field touches (exact).

    It equals :func:`conv3d_executed_macs_batch` when probabilities are exactly 0/1 and has
    non-zero gradients for probabilities strictly inside (0, 1) that can change the count.
    """
    if feature_p is not None and feature_blocks_p is not None:
        raise ValueError("pass feature_p (per position) or feature_blocks_p (per block), not both")
    g = ConvGeometry.of(conv, input_shape)
    c, t, h, w = g.input
    frame_p = _check_mask("frame probability", frame_p, (t,), "T")
    channel_p = _check_mask("channel probability", channel_p, (c,), "C")
    feature_p = _check_mask("feature probability", feature_p, (h, w), "H, W")
    if feature_blocks_p is not None:
        if feature_blocks_p.dim() != 3:
            raise ValueError(
                "feature_blocks_p must be [N, gh, gw] block probabilities, got shape "
                f"{tuple(feature_blocks_p.shape)}"
            )
        if feature_blocks_p.shape[1] > h or feature_blocks_p.shape[2] > w:
            raise ValueError(
                f"a block grid {tuple(feature_blocks_p.shape[1:])} is finer than the layer's "
                f"input ({h}, {w})"
            )
    masks = [frame_p, channel_p, feature_p, feature_blocks_p]
    n = _batch_size(masks, batch_size)
    device = _device(masks)
    t_out, h_out, w_out = g.output
    if channel_p is not None:
        chans = channel_p.to(torch.float64).sum(1)
    else:
        chans = torch.full((n,), float(c), dtype=torch.float64, device=device)
    if frame_p is not None:
        pairs = frame_p.to(torch.float64) @ _temporal_reads(g, device).sum(0)
    else:
        pairs = torch.full((n,), float(t_out * g.kernel[0]), dtype=torch.float64, device=device)
    active = _expected_active(g, feature_p, feature_blocks_p, n).to(device)
    per_out = (g.out_channels // g.groups) * g.kernel[1] * g.kernel[2]
    return per_out * chans * pairs * active


@dataclass
class Traffic:
    """Memory traffic (bytes) of one Conv3d: dense, and executed per sample.

    A data-flow model of the execution: each tensor a conv reads or writes is moved once (no
    cache, no re-reads), plus the copies the fast path makes. Terms (elements x
    ``bytes_per_element``):

    - ``input_read``: dense: the whole input ``C*T*H*W``. Executed: kept channels x kept frames
      x kept positions (masked-out entries are known zeros and never loaded).
    - ``weight_read``: dense: the whole weight (+ bias). Executed: the weight slice of the kept
      input channels and of the temporal taps that compute at least one output (+ bias).
    - ``output_write``: the whole output, in both cases (computed positions are written, the
      others filled with the bias).
    - ``gather_overhead`` (executed only): when channels or frames are masked, the fast path
      gathers the kept channels/frames into a compact tensor (read ``kept_c*kept_t*H*W`` and
      write as much) and, when channels are masked, copies the kept weight slice (read + write).
    - ``scatter_overhead`` (executed only): when the output is assembled from partial results,
      each partial output element is read and written once more: frames masked: one partial
      (``C_out'`` x computed positions) per computed (output frame, tap) pair, accumulated;
      otherwise, features masked or a grouped conv with masked channels: the computed outputs
      (``C_out' x T_out`` x computed positions) copied into the bias-filled output.
      ``C_out'``: the output channels of groups with a kept input channel.
    """

    dense_bytes: int
    executed_bytes: torch.Tensor  # [N] int64, copies included
    dense_breakdown: dict[str, int]
    breakdown: dict[str, torch.Tensor]  # [N] int64 each

    @property
    def copy_bytes(self) -> torch.Tensor:
        """``[N]``: the gather + scatter copies (part of ``executed_bytes``)."""
        return self.breakdown["gather_overhead"] + self.breakdown["scatter_overhead"]


def _terms_from_kept(
    g: ConvGeometry, kept: Mapping[str, torch.Tensor], executed: torch.Tensor, n: int
) -> _HardTerms:
    """Traffic terms from kept fractions and executed MACs (see ``conv3d_memory_traffic``)."""
    c, t, h, w = g.input
    t_out = g.output[0]
    device = executed.device
    sizes = {"frame": t, "channel": c, "feature": h * w}
    counts = {
        d: (kept[d].detach().to(device, torch.float64).reshape(n) * size).round().long()
        if d in kept
        else torch.full((n,), size, dtype=torch.int64, device=device)
        for d, size in sizes.items()
    }
    zeros = torch.zeros(n, dtype=torch.int64, device=device)
    # executed = (C_out/groups) * kept_c * kh * kw * pairs * active: recover pairs * active
    per = (g.out_channels // g.groups) * g.kernel[1] * g.kernel[2] * counts["channel"]
    pairs_act = torch.where(per > 0, executed.detach().long() // per.clamp(min=1), zeros)
    if "frame" in kept:  # only the product matters to the traffic: put it all in "pairs"
        pairs, act = pairs_act, torch.ones_like(pairs_act)
    else:
        dense_pairs = t_out * g.kernel[0]
        pairs, act = torch.full_like(zeros, dense_pairs), pairs_act // dense_pairs
    return _HardTerms(
        counts["channel"], counts["frame"], counts["feature"], pairs,
        torch.full_like(zeros, g.kernel[0]), act, torch.full_like(zeros, g.out_channels),
    )  # fmt: skip


def conv3d_memory_traffic(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
    kept: Mapping[str, torch.Tensor] | None = None,
    executed_macs: torch.Tensor | None = None,
    bytes_per_element: int = 4,
    batch_size: int | None = None,
) -> Traffic:
    """Dense and executed memory traffic of ``conv`` (see :class:`Traffic` for each term).

    Masks as in :func:`conv3d_executed_macs_batch` (``[N, ...]``, or one sample's mask). With all
    masks kept, executed = dense + gather/scatter overhead, minus the weight taps that only
    ever read zero padding when frames are masked.

    Instead of masks, ``kept`` (per-dim kept *fractions* ``{dim: [N]}``, a dim that is absent
    is not masked) with ``executed_macs`` ``[N]``, what :class:`lightning_dance.aap.LayerStats`
    holds. Every term is then exact except two upper bounds: the weight slice of frame-masked
    layers counts all ``kT`` taps (which taps read only padding depends on *which* frames are
    kept) and grouped convs with masked channels count all output channels as computed.

    Example:
        >>> import torch, torch.nn as nn
        >>> conv = nn.Conv3d(4, 8, 1, bias=False)
        >>> tr = conv3d_memory_traffic(conv, (4, 2, 4, 4), channel=torch.tensor([1., 1, 0, 0]))
        >>> tr.dense_bytes, {k: int(v) for k, v in tr.breakdown.items()}  # doctest: +NORMALIZE_WHITESPACE
        (1664, {'input_read': 256, 'weight_read': 64, 'output_write': 1024,
                'gather_overhead': 640, 'scatter_overhead': 0})
        >>> int(tr.executed_bytes)  # the gathered copy costs more than half the channels save
        1984
    """
    if kept is not None:
        if any(m is not None for m in (frame, channel, feature)):
            raise ValueError("pass masks (frame/channel/feature) or kept fractions, not both")
        if executed_macs is None:
            raise ValueError("kept fractions need executed_macs ([N]) as well")
        unknown = [d for d in kept if d not in DIMS]
        if unknown:
            raise ValueError(f"unknown dims in kept: {unknown}; use {list(DIMS)}")
        g = ConvGeometry.of(conv, input_shape)
        n = _batch_size([*kept.values(), executed_macs.reshape(-1, 1)], batch_size)
        terms = _terms_from_kept(g, kept, executed_macs.reshape(n), n)
        masked = set(kept)
    else:
        if executed_macs is not None:
            raise ValueError("executed_macs goes with kept fractions; masks give them already")
        g, terms, masked = _mask_terms(conv, input_shape, frame, channel, feature, batch_size)
    c, t, h, w = g.input
    b = int(bytes_per_element)
    bias = g.out_channels if g.bias else 0
    out_numel = g.out_channels * math.prod(g.output)
    dense = {
        "input_read": c * t * h * w * b,
        "weight_read": (g.weight_numel + bias) * b,
        "output_write": out_numel * b,
    }
    kept_c = terms.kept_channels
    sliced_w = (g.out_channels // g.groups) * kept_c * terms.taps_used * g.kernel[1] * g.kernel[2]
    zero = torch.zeros_like(kept_c)
    gather = zero
    if masked & {"frame", "channel"}:
        gather = 2 * kept_c * terms.kept_frames * h * w
        gather = gather + (2 * sliced_w if "channel" in masked else zero)
    scatter = zero
    partial = terms.out_channels * terms.active_positions
    if "frame" in masked:
        scatter = 2 * partial * terms.temporal_pairs
    elif "feature" in masked or ("channel" in masked and g.groups > 1):
        scatter = 2 * partial * g.output[0]
    executed = {
        "input_read": kept_c * terms.kept_frames * terms.kept_positions * b,
        "weight_read": (sliced_w + bias) * b,
        "output_write": torch.full_like(kept_c, out_numel * b),
        "gather_overhead": gather * b,
        "scatter_overhead": scatter * b,
    }
    return Traffic(sum(dense.values()), sum(executed.values()), dense, executed)


def conv3d_input_shapes(
    model: nn.Module, clip: torch.Tensor | tuple[int, ...]
) -> dict[str, tuple[int, int, int, int]]:
    """One sample's input shape ``(C, T, H, W)`` of every Conv3d that runs on ``clip``.

    Runs one dense forward pass of one clip (eval mode, no grad, training flags restored) with
    forward pre-hooks. Conv3d layers that do not run are absent. A Conv3d called several times
    with different shapes is an error (per-layer masks assume one call per forward).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, stride=2, padding=1), nn.Conv3d(8, 8, 1))
        >>> conv3d_input_shapes(net, (3, 4, 16, 16))
        {'0': (3, 4, 16, 16), '1': (8, 2, 8, 8)}
    """
    x = _as_clip(clip, model)[:1]
    shapes: dict[str, tuple[int, int, int, int]] = {}
    errors: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            shape = tuple(int(s) for s in args[0].shape[1:])
            if name in shapes and shapes[name] != shape:
                errors.append(f"{name}: {shapes[name]} then {shape}")
            shapes.setdefault(name, shape)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in all_conv3d(model).items()]
    try:
        with _eval_no_grad(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise ValueError(f"Conv3d layers called several times with different shapes: {errors}")
    return shapes
