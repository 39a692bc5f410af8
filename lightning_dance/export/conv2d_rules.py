"""The rule table of the Conv3d -> Conv2d rewrite: one function per op family, keyed by fx target.

:func:`~lightning_dance.export.conv2d_rewrite.rewrite_conv3d_to_conv2d` walks the
``torch.export`` graph and, for each node that reads a time-folded value, calls
``RULES[node.target](ctx, node)`` (a :data:`Rule`). A rule either rewrites the node to run on
the folded layout ``[N * T, C, H, W]`` (recording the logical 5-d shape of each folded value
it makes in ``ctx.folded``) and returns ``True``, or leaves the graph as it is and returns
``False``; the driver then unfolds the node's inputs back to 5-d (with ``strict=True`` it
raises ``UnsupportedOpError`` naming the op). A target without a rule is handled the same way.
Supporting a new op is one new entry::

    RULES[torch.ops.aten.softplus.default] = rule_elementwise

A rule marked with :func:`takes_clips` is also called on nodes without a folded input (the
Conv3d rule folds a clip computed in 5-d, e.g. by a gather).

Example:
    >>> RULES[torch.ops.aten.relu.default] is rule_elementwise
    True
    >>> RULES[torch.ops.aten.max_pool3d.default].__name__
    'rule_pool3d'
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from lightning_dance.export.conv2d_ops import (
    broadcast_frames,
    conv3d_folded,
    fold_bn_weights,
    fold_like,
    fold_time,
    global_pool_folded,
    pad_folded,
    pool3d_folded,
    triple,
)

__all__ = [
    "RULES",
    "RewriteContext",
    "RewriteInfo",
    "Rule",
    "attr_tensor",
    "conv_args",
    "is_conv3d",
    "node_value",
    "op_name",
    "takes_clips",
]


@dataclass
class RewriteInfo:
    """What :func:`~lightning_dance.export.conv2d_rewrite.rewrite_conv3d_to_conv2d` did."""

    batch: int
    frames: int
    input_layout: str
    conv3d_replaced: int = 0
    bn_folded: int = 0
    pools_folded: int = 0
    unfolded_ops: list[str] = field(default_factory=list)
    max_abs_error: float = float("nan")


@dataclass
class RewriteContext:
    """What a rule reads and updates: the graph module, the folded values and the counts.

    ``folded`` maps each node holding a folded tensor to the logical 5-d shape of its value.
    """

    gm: fx.GraphModule
    info: RewriteInfo
    fold_bn: bool = True
    strict: bool = False
    folded: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    constants: int = 0

    @property
    def graph(self) -> fx.Graph:
        """The graph being rewritten."""
        return self.gm.graph

    def folded_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that hold folded values."""
        return [a for a in node.all_input_nodes if a in self.folded]

    def call_before(self, node: fx.Node, fn: Callable[..., Any], args: tuple) -> fx.Node:
        """A new ``fn(*args)`` node inserted before ``node``."""
        with self.graph.inserting_before(node):
            return self.graph.call_function(fn, args)

    def constant_before(self, node: fx.Node, tensor: torch.Tensor, hint: str) -> fx.Node:
        """A ``get_attr`` node before ``node`` reading a new buffer holding a copy of ``tensor``."""
        self.constants += 1
        name = f"_c2d_{hint}_{self.constants}"
        self.gm.register_buffer(name, tensor.detach().clone())
        with self.graph.inserting_before(node):
            return self.graph.get_attr(name)


Rule = Callable[[RewriteContext, fx.Node], bool]


def takes_clips(rule: Rule) -> Rule:
    """Mark ``rule`` to be called on nodes without a folded input too."""
    rule.takes_clips = True  # type: ignore[attr-defined]
    return rule


# ------------------------------------------------------------------------------ graph helpers
def node_value(node: Any) -> Any:
    """The example value ``torch.export`` recorded for ``node`` (None for a non-node)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def op_name(node: fx.Node) -> str:
    """The name of the op of ``node`` as errors and ``RewriteInfo.unfolded_ops`` give it."""
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for any other node or value)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


_ATEN = torch.ops.aten
_CONV = {_ATEN.conv3d.default, _ATEN.conv3d.padding, _ATEN.convolution.default}
_BN = {_ATEN.batch_norm.default, _ATEN._native_batch_norm_legit_no_training.default}


def conv_args(node: fx.Node) -> dict[str, Any] | None:
    """Normalized Conv3d arguments of a conv node, or None if it is not a 5-d forward conv."""
    a = list(node.args)
    if node.target is _ATEN.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = a[:9]
        if transposed:
            return None
    else:
        defaults = [None, None, None, 1, 0, 1, 1]
        a = a + defaults[len(a) :]
        x, w, b, stride, padding, dilation, groups = a[:7]
        for k, v in node.kwargs.items():
            idx = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"].index(k)
            a[idx] = v
        x, w, b, stride, padding, dilation, groups = a[:7]
    wv = node_value(w)
    if wv is None or wv.dim() != 5:
        return None
    return dict(x=x, w=w, b=b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def is_conv3d(node: fx.Node) -> bool:
    """Whether ``node`` is a 5-d forward convolution (what :func:`rule_conv3d` rewrites)."""
    return node.target in _CONV and conv_args(node) is not None


# ------------------------------------------------------------------------------ rules
def rule_drop(ctx: RewriteContext, node: fx.Node) -> bool:
    """Export's metadata checks of a 5-d tensor no longer apply to its folded form: erase."""
    ctx.graph.erase_node(node)
    return True


def _following_bn(ctx: RewriteContext, node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """The eval BatchNorm that is the only user of conv ``node`` and its (gamma, beta, mean,
    var, eps) tensors, if it can be folded into the conv's weights."""
    users = list(node.users)
    if not ctx.fold_bn or len(users) != 1 or users[0].target not in _BN:
        return None
    bn_node = users[0]
    ba = list(bn_node.args)
    if bn_node.target is _ATEN.batch_norm.default:
        _, g, b_, rm, rv, training, _, eps = ba[:8]
    else:
        _, g, b_, rm, rv, _, eps = ba[:7]
        training = False
    tensors = [attr_tensor(ctx.gm, v) if v is not None else None for v in (g, b_, rm, rv)]
    if (
        training
        or tensors[2] is None
        or tensors[3] is None
        or any(v is not None and tt is None for v, tt in zip((g, b_), tensors[:2], strict=True))
    ):
        return None
    return bn_node, (*tensors, eps)


@takes_clips
def rule_conv3d(ctx: RewriteContext, node: fx.Node) -> bool:
    """Conv3d -> :func:`conv3d_folded` (one conv2d per temporal tap); an eval BatchNorm that
    directly follows is folded into the weights. A 5-d input (e.g. a gather's) is folded first
    unless ``strict``."""
    conv = conv_args(node) if node.target in _CONV else None
    if conv is None:
        return False
    if conv["x"] not in ctx.folded and not ctx.strict:
        xv = node_value(conv["x"])
        if xv is not None and xv.dim() == 5:  # computed in 5-d (e.g. a gather): fold it
            f = ctx.call_before(node, fold_time, (conv["x"],))
            node.replace_input_with(conv["x"], f)
            ctx.folded[f] = tuple(xv.shape)
            conv = conv_args(node)
    if conv["x"] not in ctx.folded:
        return False
    weight, bias = attr_tensor(ctx.gm, conv["w"]), attr_tensor(ctx.gm, conv["b"])
    bn = None
    if weight is not None and (conv["b"] is None or bias is not None):
        bn = _following_bn(ctx, node)
        if bn is not None:
            weight, bias = fold_bn_weights(weight, bias, *bn[1])
    if weight is not None:
        taps: Any = [
            ctx.constant_before(node, weight[:, :, k], "tap") for k in range(weight.shape[2])
        ]
        b_node = ctx.constant_before(node, bias, "bias") if bias is not None else None
    else:  # weights computed at run time
        taps, b_node = ctx.call_before(node, torch.unbind, (conv["w"], 2)), conv["b"]
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    new = ctx.call_before(
        node, conv3d_folded, (conv["x"], ctx.folded[conv["x"]][0], taps, b_node, *args)
    )
    out_t = node_value(bn[0] if bn is not None else node)
    if isinstance(out_t, (tuple, list)):
        out_t = out_t[0]
    ctx.folded[new] = tuple(out_t.shape)
    ctx.info.conv3d_replaced += 1
    if bn is None:
        node.replace_all_uses_with(new)
    elif bn[0].target is _ATEN.batch_norm.default:
        bn[0].replace_all_uses_with(new)
        ctx.info.bn_folded += 1
    else:  # returns a tuple: its getitem(0) users read the conv
        for u in list(bn[0].users):
            if u.target is operator.getitem and u.args[1] == 0:
                u.replace_all_uses_with(new)
        ctx.info.bn_folded += 1
    return True


def rule_elementwise(ctx: RewriteContext, node: fx.Node) -> bool:
    """Ops elementwise on one folded tensor (activations, eval BatchNorm, scalar arithmetic,
    casts, copies) run on it as they are."""
    x = node.args[0] if node.args else None
    if x not in ctx.folded or any(a is not x and a in ctx.folded for a in node.all_input_nodes):
        return False
    ctx.folded[node] = ctx.folded[x]
    return True


def rule_getitem(ctx: RewriteContext, node: fx.Node) -> bool:
    """Item 0 of a folded op's tuple output (an unfolded BatchNorm's) is that folded value."""
    if node.args[0] not in ctx.folded or node.args[1] != 0:
        return False
    ctx.folded[node] = ctx.folded[node.args[0]]
    return True


def rule_index_select(ctx: RewriteContext, node: fx.Node) -> bool:
    """A gather of channels (the same op on ``[N * T, C, H, W]``) or of the frames of one clip
    (a gather of rows)."""
    x_node, dim, index = node.args
    if x_node not in ctx.folded:
        return False
    shape5 = tuple(node_value(node).shape)
    if dim % 5 == 1:
        ctx.folded[node] = shape5
        return True
    if dim % 5 == 2 and ctx.folded[x_node][0] == 1:
        node.args = (x_node, 0, index)
        ctx.folded[node] = shape5
        return True
    return False


def rule_slice(ctx: RewriteContext, node: fx.Node) -> bool:
    """Whole clips ``[a:b]`` (unit step) are the rows ``[a * T : b * T]`` of the folded tensor."""
    a = node.args
    if a[0] not in ctx.folded or len(a) < 2 or a[1] % 5 != 0 or (len(a) >= 5 and a[4] != 1):
        return False
    nb, tb = ctx.folded[a[0]][0], ctx.folded[a[0]][2]
    start = a[2] if len(a) > 2 and a[2] is not None else 0
    end = min(a[3] if len(a) > 3 else nb, nb)
    node.args = (a[0], 0, start * tb, end * tb, 1)
    ctx.folded[node] = tuple(node_value(node).shape)
    return True


def rule_broadcast(ctx: RewriteContext, node: fx.Node) -> bool:
    """Binary elementwise ops (residual adds, gates): a one-frame operand is repeated over the
    frames, a plain tensor that broadcasts over the clip is folded to match."""
    out_val = node_value(node)
    if out_val is None or out_val.dim() != 5:
        return False
    ins = ctx.folded_inputs(node)
    shape5 = tuple(out_val.shape)
    nb, tb = shape5[0], shape5[2]
    ok = True
    for a in node.all_input_nodes:
        v = node_value(a)
        if a in ctx.folded:
            if ctx.folded[a][2] != tb:  # one frame broadcast over T frames
                node.replace_input_with(a, ctx.call_before(node, broadcast_frames, (a, nb, tb)))
        elif v is not None and v.dim() >= 3:
            node.replace_input_with(a, ctx.call_before(node, fold_like, (a, nb, tb)))
        elif v is None:
            ok = False
    if not ok or any(ctx.folded[a][0] != nb for a in ins):
        return False
    ctx.folded[node] = shape5
    return True


def rule_global_pool(ctx: RewriteContext, node: fx.Node) -> bool:
    """A mean over (T, H, W) or ``AdaptiveAvgPool3d(1)`` -> :func:`global_pool_folded`."""
    x_node = node.args[0]
    if node.target is _ATEN.mean.dim:
        dims = {d % 5 for d in node.args[1]}
        keepdim = (
            bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        )
        is_global = dims == {2, 3, 4}
    else:
        keepdim, is_global = True, tuple(triple(node.args[1])) == (1, 1, 1)
    if not is_global or x_node not in ctx.folded:
        return False
    nb, c = ctx.folded[x_node][0], ctx.folded[x_node][1]
    new = ctx.call_before(node, global_pool_folded, (x_node, nb))
    if keepdim:  # a folded [N * 1, C, 1, 1]
        new = ctx.call_before(node, torch.reshape, (new, (nb, c, 1, 1)))
        ctx.folded[new] = (nb, c, 1, 1, 1)
    node.replace_all_uses_with(new)
    ctx.info.pools_folded += 1
    return True


def rule_pool3d(ctx: RewriteContext, node: fx.Node) -> bool:
    """Max/AvgPool3d -> :func:`pool3d_folded` (not ``ceil_mode``, nor an average that excludes
    padding, nor a divisor override)."""
    a = list(node.args)
    if a[0] not in ctx.folded:
        return False
    kernel = triple(a[1])
    stride = triple(a[2]) if len(a) > 2 and a[2] else kernel
    padding = triple(a[3]) if len(a) > 3 else (0, 0, 0)
    if node.target is _ATEN.avg_pool3d.default:
        ceil = bool(a[4]) if len(a) > 4 else False
        include = bool(a[5]) if len(a) > 5 else True
        ok = not ceil and (include or padding == (0, 0, 0)) and (len(a) <= 6 or a[6] is None)
        kind, dil = "avg", (1, 1, 1)
    else:
        dil = triple(a[4]) if len(a) > 4 else (1, 1, 1)
        ceil = bool(a[5]) if len(a) > 5 else False
        ok, kind = not ceil, "max"
    with_indices = node.target is _ATEN.max_pool3d_with_indices.default
    if not ok or (with_indices and any(u.args[1] != 0 for u in node.users)):
        return False
    nb = ctx.folded[a[0]][0]
    new = ctx.call_before(node, pool3d_folded, (a[0], nb, kind, kernel, stride, padding, dil))
    v = node_value(node)
    v = v[0] if isinstance(v, (tuple, list)) else v
    ctx.folded[new] = tuple(v.shape)
    for old in list(node.users) if with_indices else [node]:
        old.replace_all_uses_with(new)
    ctx.info.pools_folded += 1
    return True


def rule_pad(ctx: RewriteContext, node: fx.Node) -> bool:
    """A 3D pad (6 entries: W, H, T) -> :func:`pad_folded` (any mode)."""
    if len(node.args[1]) != 6:
        return False
    if node.target is _ATEN.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    else:
        mode = "constant"
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    x_node = node.args[0]
    args = (
        x_node,
        ctx.folded[x_node][0],
        list(node.args[1]),
        mode,
        0.0 if value is None else value,
    )
    new = ctx.call_before(node, pad_folded, args)
    ctx.folded[new] = tuple(node_value(node).shape)
    node.replace_all_uses_with(new)
    return True


def rule_cat(ctx: RewriteContext, node: fx.Node) -> bool:
    """Concatenating channels runs folded as it is; concatenating clips is a ``cat`` of rows."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    batches = {ctx.folded[a][0] if a in ctx.folded else None for a in tensors}
    frames = {ctx.folded[a][2] if a in ctx.folded else None for a in tensors}
    if dim % 5 == 1 and len(batches) == 1 and len(frames) == 1 and None not in batches:
        ctx.folded[node] = tuple(node_value(node).shape)
        return True
    if dim % 5 == 0 and len(frames) == 1 and None not in batches:  # clips: rows
        node.args = (tensors, 0)
        ctx.folded[node] = tuple(node_value(node).shape)
        return True
    return False


def rule_flatten(ctx: RewriteContext, node: fx.Node) -> bool:
    """A flatten / view / reshape / squeeze of a globally pooled ``[N, C, 1, 1, 1]`` to
    ``[N, C]`` is a reshape of the folded ``[N, C, 1, 1]`` (the linear head then reads it)."""
    x_node, out_val = node.args[0], node_value(node)
    if (
        x_node not in ctx.folded
        or ctx.folded[x_node][2:] != (1, 1, 1)
        or out_val is None
        or out_val.dim() != 2
    ):
        return False
    node.target, node.args, node.kwargs = torch.reshape, (x_node, tuple(out_val.shape)), {}
    return True


# ------------------------------------------------------------------------------ the table
_ELEMENTWISE_UNARY = (
    _ATEN.relu.default,
    _ATEN.relu_.default,
    _ATEN.sigmoid.default,
    _ATEN.sigmoid_.default,
    _ATEN.tanh.default,
    _ATEN.hardswish.default,
    _ATEN.hardswish_.default,
    _ATEN.hardsigmoid.default,
    _ATEN.hardsigmoid_.default,
    _ATEN.silu.default,
    _ATEN.silu_.default,
    _ATEN.gelu.default,
    _ATEN.hardtanh.default,
    _ATEN.hardtanh_.default,
    _ATEN.clamp.default,
    _ATEN.clamp_.default,
    _ATEN.leaky_relu.default,
    _ATEN.leaky_relu_.default,
    _ATEN.elu.default,
    _ATEN.dropout.default,
    _ATEN.clone.default,
    _ATEN.contiguous.default,
    _ATEN.alias.default,
    _ATEN.detach.default,
    _ATEN.abs.default,
    _ATEN.exp.default,
    _ATEN.neg.default,
    _ATEN.sqrt.default,
    _ATEN.relu6.default,
    _ATEN.log.default,
    _ATEN.pow.Tensor_Scalar,
    _ATEN.to.dtype,
    _ATEN.mul.Scalar,
    _ATEN.add.Scalar,
    _ATEN.sub.Scalar,
    _ATEN.div.Scalar,
    *_BN,  # not directly after a conv (or fold_bn=False): eval BatchNorm is elementwise
)
_ELEMENTWISE_BINARY = (
    _ATEN.add.Tensor,
    _ATEN.add_.Tensor,
    _ATEN.mul.Tensor,
    _ATEN.mul_.Tensor,
    _ATEN.sub.Tensor,
    _ATEN.sub_.Tensor,
    _ATEN.div.Tensor,
    _ATEN.div_.Tensor,
    _ATEN.maximum.default,
    _ATEN.minimum.default,
)
_RESHAPES = (
    _ATEN.flatten.using_ints,
    _ATEN.view.default,
    _ATEN.reshape.default,
    _ATEN.squeeze.dims,
    _ATEN.squeeze.dim,
    _ATEN.squeeze.default,
)

#: fx target -> the rule that runs the op on the folded layout (a missing target: unfold)
RULES: dict[Any, Rule] = {
    _ATEN._assert_tensor_metadata.default: rule_drop,
    **dict.fromkeys(_CONV, rule_conv3d),
    **dict.fromkeys(_ELEMENTWISE_UNARY, rule_elementwise),
    operator.getitem: rule_getitem,
    _ATEN.index_select.default: rule_index_select,
    _ATEN.slice.Tensor: rule_slice,
    **dict.fromkeys(_ELEMENTWISE_BINARY, rule_broadcast),
    _ATEN.mean.dim: rule_global_pool,
    _ATEN.adaptive_avg_pool3d.default: rule_global_pool,
    _ATEN.max_pool3d.default: rule_pool3d,
    _ATEN.avg_pool3d.default: rule_pool3d,
    _ATEN.max_pool3d_with_indices.default: rule_pool3d,
    _ATEN.pad.default: rule_pad,
    _ATEN.constant_pad_nd.default: rule_pad,
    _ATEN.cat.default: rule_cat,
    **dict.fromkeys(_RESHAPES, rule_flatten),
}
