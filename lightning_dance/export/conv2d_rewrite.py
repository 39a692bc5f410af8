"""Conv3d -> Conv2d-only rewrite: run a 3D CNN on runtimes without 3D convolution.

NNAPI has no 3D op at all, and ExecuTorch's XNNPACK / portable kernels have no Conv3d. A 3D
convolution is a sum over its temporal taps of 2D convolutions on (shifted) frames::

    y[:, :, t'] = bias + sum_k conv2d(x[:, :, t' * s_t + k * d_t - p_t], W[:, :, k])

so with time folded into the batch (``[N, C, T, H, W] -> [N * T, C, H, W]``) a Conv3d becomes
one ``conv2d`` per temporal tap on a strided *slice* of the frames, shifted into place by a
``cat`` with zero frames, and the taps are *added*. Frames that fall into the temporal padding
are never computed (taps only read the frames they use), so no MAC is spent on zero padding.
Every tensor in the folded path has rank <= 4.

Three levels, each usable alone:

- :func:`conv3d_as_conv2d` (functional, 5-d in / 5-d out) and :func:`conv3d_folded`
  (folded in / folded out): any kernel, stride, padding (ints, ``"same"``, ``"valid"``),
  dilation, groups and padding mode; weights may be computed at run time;
- :class:`Conv3dAs2d`: a drop-in ``nn.Module`` for one ``nn.Conv3d`` (optionally with an eval
  ``BatchNorm3d`` folded in); :func:`replace_conv3d` swaps every Conv3d of a model for it;
- :func:`rewrite_conv3d_to_conv2d`: a whole-model rewrite on the ``torch.export`` graph. The
  activations stay folded between layers: Conv3d -> per-tap conv2d (BatchNorm folded into the
  weights where it directly follows a conv), BatchNorm / activations / residual adds / channel
  concatenation run on the folded tensor as they are, global average pooling becomes a 2D mean
  plus a mean over frames, and 3D max/avg pooling becomes a 2D pooling plus a max/sum over
  frame slices. An op that cannot run folded gets its input unfolded back to 5-d (recorded in
  :attr:`RewriteInfo.unfolded_ops`); with ``strict=True`` (what NNAPI needs)
  :class:`UnsupportedOpError` names it instead.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(4, 6, (3, 3, 3), stride=(2, 1, 1), padding=1, groups=2)
    >>> x = torch.randn(2, 4, 5, 8, 8)
    >>> m = Conv3dAs2d.from_conv3d(conv)
    >>> bool(torch.allclose(m(x), conv(x), atol=1e-5))
    True
    >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8).eval(), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    >>> flat = rewrite_conv3d_to_conv2d(net, torch.randn(1, 3, 4, 16, 16))
    >>> flat.rewrite_info.conv3d_replaced, flat.rewrite_info.bn_folded
    (1, 1)

Limits: pooling with ``ceil_mode=True``, ``AvgPool3d(count_include_pad=False)`` with padding and
adaptive pooling to sizes other than 1 are not folded (non-strict: they run unfolded, in 5-d);
``padding_mode`` other than ``"zeros"`` pads with ``cat`` of frame slices and ``F.pad`` (the
rewrite is exact, but NNAPI may lack the reflect/replicate pad op).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lightning_dance.errors import DanceError
from lightning_dance.export.conv2d_ops import (
    Conv3dAs2d,
    broadcast_frames,
    conv3d_as_conv2d,
    conv3d_folded,
    fold_bn_weights,
    fold_like,
    fold_time,
    global_pool_folded,
    pad_folded,
    pool3d_folded,
    replace_conv3d,
    triple,
    unfold_time,
)

__all__ = [
    "Conv3dAs2d",
    "RewriteInfo",
    "UnsupportedOpError",
    "conv3d_as_conv2d",
    "conv3d_folded",
    "fold_time",
    "global_pool_folded",
    "pad_folded",
    "pool3d_folded",
    "replace_conv3d",
    "rewrite_conv3d_to_conv2d",
    "unfold_time",
]


class UnsupportedOpError(DanceError, RuntimeError):
    """An op of the model cannot be represented by an export target; ``op`` names it."""

    def __init__(self, op: str, message: str) -> None:
        super().__init__(message)
        self.op = op


# ------------------------------------------------------------------------------ graph rewrite
@dataclass
class RewriteInfo:
    """What :func:`rewrite_conv3d_to_conv2d` did."""

    batch: int
    frames: int
    input_layout: str
    conv3d_replaced: int = 0
    bn_folded: int = 0
    pools_folded: int = 0
    unfolded_ops: list[str] = field(default_factory=list)
    max_abs_error: float = float("nan")


_ATEN = torch.ops.aten
_ELEMENTWISE_UNARY = {
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
    _ATEN.batch_norm.default,
    _ATEN._native_batch_norm_legit_no_training.default,
}
_ELEMENTWISE_BINARY = {
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
}
_CONV = {_ATEN.conv3d.default, _ATEN.conv3d.padding, _ATEN.convolution.default}
_BN = {_ATEN.batch_norm.default, _ATEN._native_batch_norm_legit_no_training.default}


_POOL3D = {
    _ATEN.max_pool3d.default,
    _ATEN.avg_pool3d.default,
    _ATEN.max_pool3d_with_indices.default,
}
_RESHAPES = {
    _ATEN.flatten.using_ints,
    _ATEN.view.default,
    _ATEN.reshape.default,
    _ATEN.squeeze.dims,
    _ATEN.squeeze.dim,
    _ATEN.squeeze.default,
}


def _fold_pool(graph: fx.Graph, node: fx.Node, folded: dict[fx.Node, tuple[int, ...]]) -> Any:
    """Replace a 3D pooling node reading a folded tensor by :func:`pool3d_folded` (or None)."""
    a = list(node.args)
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
        return None
    nb = folded[a[0]][0]
    with graph.inserting_before(node):
        new = graph.call_function(pool3d_folded, (a[0], nb, kind, kernel, stride, padding, dil))
    v = _val(node)
    v = v[0] if isinstance(v, (tuple, list)) else v
    folded[new] = tuple(v.shape)
    for old in list(node.users) if with_indices else [node]:
        old.replace_all_uses_with(new)
    return new


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _conv_args(node: fx.Node) -> dict[str, Any] | None:
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
    wv = _val(w)
    if wv is None or wv.dim() != 5:
        return None
    return dict(x=x, w=w, b=b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _get_attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def plain_graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """An eval-mode ``GraphModule`` of ``graph`` holding only the attributes it uses (the module
    ``ExportedProgram.module()`` returns forbids ``train()`` / ``eval()``)."""
    attrs: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            obj: Any = root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            attrs[str(node.target)] = obj
    gm = fx.GraphModule(attrs, graph)
    gm.graph._codegen = graph._codegen
    gm.recompile()
    return gm.eval()


def _op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def rewrite_conv3d_to_conv2d(
    model: nn.Module,
    example_clip: torch.Tensor,
    *,
    fold_bn: bool = True,
    input_layout: str = "clip",
    strict: bool = False,
    check: bool = True,
    atol: float = 1e-4,
) -> fx.GraphModule:
    """A Conv2d-only version of ``model`` for the static shape of ``example_clip``.

    Args:
        model: a 3D CNN in eval mode (any module ``torch.export`` can capture, including a
            DANCE export module from :mod:`lightning_dance.export.modes`).
        example_clip: ``[N, C, T, H, W]``; the rewrite is valid for this shape only.
        fold_bn: fold an eval BatchNorm that directly follows a conv into its weights.
        input_layout: ``"clip"``: the result takes ``[N, C, T, H, W]`` (folded inside);
            ``"folded"``: it takes ``[N * T, C, H, W]`` (frames stacked as a batch of images:
            no 5-d tensor in the graph at all), and a 5-d output stays folded too.
        strict: raise :class:`UnsupportedOpError` naming the first op that cannot run on the
            folded layout, instead of unfolding its input to 5-d.
        check: compare with ``model`` on ``example_clip`` (raises if the error exceeds ``atol``)
            and store it in ``rewrite_info.max_abs_error``.

    Returns:
        a ``torch.fx.GraphModule`` with a ``rewrite_info`` (:class:`RewriteInfo`) attribute.

    Raises:
        UnsupportedOpError: ``strict`` and an op cannot run folded, or ``torch.export`` cannot
            capture the model (the message names the failure).
    """
    if input_layout not in ("clip", "folded"):
        raise ValueError(f"input_layout must be 'clip' or 'folded', got {input_layout!r}")
    if not isinstance(example_clip, torch.Tensor) or example_clip.dim() != 5:
        raise ValueError("example_clip must be a 5-d tensor [N, C, T, H, W]")
    model = model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (example_clip,), strict=False)
    except Exception as exc:  # export failures carry long messages: keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOpError(
            "torch.export", f"torch.export cannot capture the model: {first}"
        ) from exc
    gm = ep.module()
    graph = gm.graph
    for node in graph.nodes:  # e.g. threshold gathers: sizes known only at run time
        val = _val(node)
        if isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape):
            raise UnsupportedOpError(
                _op_name(node),
                f"the Conv2d rewrite needs static shapes; op {_op_name(node)!r} (node "
                f"{node.name!r}) has an input-dependent size (export mode='topk' or 'masked')",
            )
    n, _, t, _, _ = example_clip.shape
    info = RewriteInfo(batch=int(n), frames=int(t), input_layout=input_layout)
    folded: dict[fx.Node, tuple[int, ...]] = {}  # node -> logical 5-d shape of its value
    counter = [0]

    def new_attr(tensor: torch.Tensor, hint: str) -> str:
        counter[0] += 1
        name = f"_c2d_{hint}_{counter[0]}"
        gm.register_buffer(name, tensor.detach().clone())
        return name

    def unfold(arg: fx.Node, user: fx.Node) -> fx.Node:
        if strict:
            raise UnsupportedOpError(
                _op_name(user),
                f"op {_op_name(user)!r} (node {user.name!r}) cannot run on time-folded 4-d "
                "tensors; the target needs a Conv2d-only graph without 5-d tensors",
            )
        with graph.inserting_before(user):
            return graph.call_function(unfold_time, (arg, folded[arg][0]))

    # 1. the input
    placeholders = [p for p in graph.nodes if p.op == "placeholder"]
    clip_node = next(p for p in placeholders if _val(p) is not None and _val(p).dim() == 5)
    if input_layout == "clip":
        with graph.inserting_after(clip_node):
            f = graph.call_function(fold_time, (clip_node,))
        clip_node.replace_all_uses_with(
            f, delete_user_cb=lambda u: u is not f and not str(u.target).startswith("_guards")
        )
        folded[f] = tuple(example_clip.shape)
    else:
        folded[clip_node] = tuple(example_clip.shape)
        for node in list(graph.nodes):  # shape guards of the 5-d input no longer apply
            if node.op == "call_module" and str(node.target).startswith("_guards"):
                graph.erase_node(node)

    # 2. layout propagation
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr", "output") or node in folded:
            continue
        target = node.target
        conv = _conv_args(node) if target in _CONV else None
        if conv is not None and conv["x"] not in folded and not strict:
            xv = _val(conv["x"])
            if xv is not None and xv.dim() == 5:  # computed in 5-d (e.g. a gather): fold it
                with graph.inserting_before(node):
                    f = graph.call_function(fold_time, (conv["x"],))
                node.replace_input_with(conv["x"], f)
                folded[f] = tuple(xv.shape)
                conv = _conv_args(node)
        ins = [a for a in node.all_input_nodes if a in folded]
        if not ins:
            continue
        out_val = _val(node)
        if target is _ATEN._assert_tensor_metadata.default:  # export's dtype check: 5-d only
            graph.erase_node(node)
            continue
        if conv is not None and conv["x"] in folded:
            nb = folded[conv["x"]][0]
            weight, bias = _get_attr(gm, conv["w"]), _get_attr(gm, conv["b"])
            bn_node = None
            users = list(node.users)
            if (
                fold_bn
                and weight is not None
                and (conv["b"] is None or bias is not None)
                and len(users) == 1
                and users[0].target in _BN
            ):
                bn_node = users[0]
                ba = list(bn_node.args)
                if bn_node.target is _ATEN.batch_norm.default:
                    _, g, b_, rm, rv, training, _, eps = ba[:8]
                else:
                    _, g, b_, rm, rv, _, eps = ba[:7]
                    training = False
                tensors = [_get_attr(gm, v) if v is not None else None for v in (g, b_, rm, rv)]
                if (
                    training
                    or tensors[2] is None
                    or tensors[3] is None
                    or any(
                        v is not None and tt is None
                        for v, tt in zip((g, b_), tensors[:2], strict=True)
                    )
                ):
                    bn_node = None
                else:
                    weight, bias = fold_bn_weights(weight, bias, *tensors, eps)
            if weight is not None:
                tap_nodes = []
                with graph.inserting_before(node):
                    for k in range(weight.shape[2]):
                        tap_nodes.append(graph.get_attr(new_attr(weight[:, :, k], "tap")))
                    b_node = graph.get_attr(new_attr(bias, "bias")) if bias is not None else None
            else:  # weights computed at run time
                with graph.inserting_before(node):
                    tap_nodes = graph.call_function(torch.unbind, (conv["w"], 2))
                b_node = conv["b"]
            with graph.inserting_before(node):
                new = graph.call_function(
                    conv3d_folded,
                    (
                        conv["x"],
                        nb,
                        tap_nodes,
                        b_node,
                        conv["stride"],
                        conv["padding"],
                        conv["dilation"],
                        conv["groups"],
                    ),
                )
            out_t = _val(bn_node) if bn_node is not None else out_val
            if isinstance(out_t, (tuple, list)):
                out_t = out_t[0]
            folded[new] = tuple(out_t.shape)
            info.conv3d_replaced += 1
            if bn_node is not None:
                if bn_node.target is _ATEN.batch_norm.default:
                    bn_node.replace_all_uses_with(new)
                else:  # returns a tuple: its getitem(0) users read the conv
                    for u in list(bn_node.users):
                        if u.target is operator.getitem and u.args[1] == 0:
                            u.replace_all_uses_with(new)
                info.bn_folded += 1
            else:
                node.replace_all_uses_with(new)
            continue
        if (
            target in _ELEMENTWISE_UNARY
            and node.args
            and node.args[0] in folded
            and all(a is node.args[0] or a not in folded for a in node.all_input_nodes)
        ):
            folded[node] = folded[node.args[0]]
            continue
        if target is operator.getitem and node.args[0] in folded and node.args[1] == 0:
            folded[node] = folded[node.args[0]]
            continue
        if target is _ATEN.index_select.default and node.args[0] in folded:
            x_node, dim, index = node.args
            shape5 = tuple(out_val.shape)
            if dim % 5 == 1:  # channels: the same op on [N * T, C, H, W]
                folded[node] = shape5
                continue
            if dim % 5 == 2 and folded[x_node][0] == 1:  # frames of one clip: rows
                node.args = (x_node, 0, index)
                folded[node] = shape5
                continue
        if (
            target is _ATEN.slice.Tensor
            and node.args[0] in folded
            and len(node.args) > 1
            and node.args[1] % 5 == 0
            and (len(node.args) < 5 or node.args[4] == 1)
        ):  # whole clips [a:b] = rows [a * T: b * T]
            x_node = node.args[0]
            nb, tb = folded[x_node][0], folded[x_node][2]
            start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            end = min(node.args[3] if len(node.args) > 3 else nb, nb)
            node.args = (x_node, 0, start * tb, end * tb, 1)
            folded[node] = tuple(out_val.shape)
            continue
        if target in _ELEMENTWISE_BINARY and out_val is not None and out_val.dim() == 5:
            shape5 = tuple(out_val.shape)
            nb, tb = shape5[0], shape5[2]
            ok = True
            for a in node.all_input_nodes:
                v = _val(a)
                if a in folded:
                    if folded[a][2] != tb:  # one frame broadcast over T frames
                        with graph.inserting_before(node):
                            fa = graph.call_function(broadcast_frames, (a, nb, tb))
                        node.replace_input_with(a, fa)
                elif v is not None and v.dim() >= 3:
                    with graph.inserting_before(node):
                        fa = graph.call_function(fold_like, (a, nb, tb))
                    node.replace_input_with(a, fa)
                elif v is None:
                    ok = False
            if ok and all(folded[a][0] == nb for a in ins):
                folded[node] = shape5
                continue
        if target in (_ATEN.mean.dim, _ATEN.adaptive_avg_pool3d.default):
            x_node = node.args[0]
            if target is _ATEN.mean.dim:
                dims = {d % 5 for d in node.args[1]}
                keepdim = (
                    bool(node.args[2])
                    if len(node.args) > 2
                    else bool(node.kwargs.get("keepdim", False))
                )
                is_global = dims == {2, 3, 4}
            else:
                keepdim, is_global = True, tuple(triple(node.args[1])) == (1, 1, 1)
            if is_global and x_node in folded:
                nb, c = folded[x_node][0], folded[x_node][1]
                with graph.inserting_before(node):
                    new = graph.call_function(global_pool_folded, (x_node, nb))
                    if keepdim:  # a folded [N * 1, C, 1, 1]
                        new = graph.call_function(torch.reshape, (new, (nb, c, 1, 1)))
                        folded[new] = (nb, c, 1, 1, 1)
                node.replace_all_uses_with(new)
                info.pools_folded += 1
                continue
        if target in _POOL3D and node.args[0] in folded:
            new = _fold_pool(graph, node, folded)
            if new is not None:
                info.pools_folded += 1
                continue
        if target in (_ATEN.pad.default, _ATEN.constant_pad_nd.default) and len(node.args[1]) == 6:
            mode = "constant"
            value = 0.0
            if target is _ATEN.pad.default:
                mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
                value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
            else:
                value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
            x_node = node.args[0]
            with graph.inserting_before(node):
                new = graph.call_function(
                    pad_folded,
                    (
                        x_node,
                        folded[x_node][0],
                        list(node.args[1]),
                        mode,
                        0.0 if value is None else value,
                    ),
                )
            folded[new] = tuple(out_val.shape)
            node.replace_all_uses_with(new)
            continue
        if target is _ATEN.cat.default:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else 0
            batches = {folded[a][0] if a in folded else None for a in tensors}
            frames = {folded[a][2] if a in folded else None for a in tensors}
            if dim % 5 == 1 and len(batches) == 1 and len(frames) == 1 and None not in batches:
                folded[node] = tuple(out_val.shape)
                continue
            if dim % 5 == 0 and len(frames) == 1 and None not in batches:  # clips: rows
                node.args = (tensors, 0)
                folded[node] = tuple(out_val.shape)
                continue
        if (
            target in _RESHAPES
            and node.args[0] in folded
            and folded[node.args[0]][2:] == (1, 1, 1)
            and out_val is not None
            and out_val.dim() == 2
        ):  # flatten of a globally pooled [N, C, 1, 1, 1]
            node.target, node.args, node.kwargs = (
                torch.reshape,
                (node.args[0], tuple(out_val.shape)),
                {},
            )
            continue
        # fallback: this op reads 5-d tensors
        for a in ins:
            node.replace_input_with(a, unfold(a, node))
        info.unfolded_ops.append(_op_name(node))

    # 3. outputs
    out_node = next(nd for nd in graph.nodes if nd.op == "output")
    for a in list(out_node.all_input_nodes):
        if a in folded and input_layout == "clip":
            out_node.replace_input_with(a, unfold(a, out_node))
    graph.eliminate_dead_code()
    graph.lint()
    gm = plain_graph_module(gm, graph)
    gm.rewrite_info = info
    leftover = [nd.name for nd in graph.nodes if nd.target in _CONV and _conv_args(nd) is not None]
    if leftover:
        raise UnsupportedOpError(
            "conv3d", f"Conv3d nodes could not be rewritten (their input is not folded): {leftover}"
        )
    if check:
        x = fold_time(example_clip) if input_layout == "folded" else example_clip
        with torch.no_grad():
            ref = model(example_clip)
            got = gm(x)
        err = _max_error(ref, got)
        info.max_abs_error = err
        if not err <= atol:
            raise RuntimeError(f"the Conv2d rewrite differs from the model by {err:.3g} > {atol}")
    return gm


def _max_error(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        if a.dim() == 5 and b.dim() == 4:  # a folded output of input_layout="folded"
            a = fold_time(a)
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_error(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, dict):
        return max((_max_error(a[k], b[k]) for k in a), default=0.0)
    return 0.0
