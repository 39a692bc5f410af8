"""Per-operator MAC formulas: the tables behind :func:`lightning_dance.macs.count_macs`.

The operator-key tables (which op counts as ``add``, ``activation``, ``reduce``, ``pool``...),
the extra fvcore jit handles (:func:`jit_handles`, like fvcore's ``jit_handles.py``), the
``FlopCounterMode`` formulas of the dispatch fallback (:func:`dispatch_mapping`) and the ops
that cost no MACs by convention (:data:`FREE_DISPATCH_OPS`). The counting engine that runs
them is :mod:`lightning_dance.macs`; the conventions are tabled in its module docstring.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

__all__ = ["FREE_DISPATCH_OPS", "FVCORE_KEYS", "dispatch_key", "dispatch_mapping", "jit_handles"]


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

#: fvcore jit op -> canonical key for fvcore's own handles.
FVCORE_KEYS = {
    "aten::_convolution": "conv", "aten::addmm": "linear", "aten::bmm": "linear",
    "aten::einsum": "linear", "aten::matmul": "linear", "aten::mm": "linear",
    "aten::linear": "linear", "aten::batch_norm": "batch_norm",
    "aten::group_norm": "group_norm", "aten::layer_norm": "layer_norm",
    "aten::instance_norm": "instance_norm", "aten::upsample_nearest2d": "upsample",
    "aten::upsample_bilinear2d": "upsample", "aten::adaptive_avg_pool2d": "reduce",
    "aten::grid_sampler": "upsample",
}  # fmt: skip

#: Dispatch-level ops that cost no MACs by our convention (views, copies, comparisons, ReLU...).
FREE_DISPATCH_OPS = frozenset(
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


def jit_handles() -> dict[str, Any]:
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

    for op in FREE_DISPATCH_OPS:  # same zero-cost ops as the dispatch counter
        handles.setdefault(f"aten::{op}", free)

    def swish(inputs, outputs):  # x * sigmoid(x), as the dispatch counter sees it
        n = _numel(get_shape(outputs[0]))
        return Counter({"activation": n, "mul": n})

    for name in _SWISH_FUNCTIONS:
        handles[f"prim::PythonOp.{name}"] = swish
    return handles


def dispatch_mapping() -> dict[Any, Any]:
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


def dispatch_key(name: str) -> str:
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
