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

This module is the driver of the graph rewrite: it exports the model, folds the input, walks
the graph and hands each node that reads a folded value to its rule in
:data:`~lightning_dance.export.conv2d_rules.RULES` (one function per op family, keyed by fx
target: supporting an op is one new rule). The folded tensor ops live in :mod:`.conv2d_ops`;
their public names are re-exported here.

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

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lightning_dance.errors import DanceError
from lightning_dance.export.conv2d_ops import (  # the folded ops, re-exported here
    Conv3dAs2d,
    broadcast_frames,  # noqa: F401
    conv3d_as_conv2d,
    conv3d_folded,
    fold_time,
    global_pool_folded,
    pad_folded,
    pool3d_folded,
    replace_conv3d,
    unfold_time,
)
from lightning_dance.export.conv2d_rules import (
    RULES,
    RewriteContext,
    RewriteInfo,
    is_conv3d,
    node_value,
    op_name,
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
    gm = _export_static(model, example_clip)
    n, _, t, _, _ = example_clip.shape
    info = RewriteInfo(batch=int(n), frames=int(t), input_layout=input_layout)
    ctx = RewriteContext(gm, info, fold_bn=fold_bn, strict=strict)
    _fold_input(ctx, tuple(example_clip.shape), input_layout)
    for node in list(ctx.graph.nodes):
        if node.op not in ("placeholder", "get_attr", "output") and node not in ctx.folded:
            _rewrite_node(ctx, node)
    out_node = next(nd for nd in ctx.graph.nodes if nd.op == "output")
    for a in list(out_node.all_input_nodes):
        if a in ctx.folded and input_layout == "clip":
            out_node.replace_input_with(a, _unfold(ctx, a, out_node))
    graph = ctx.graph
    graph.eliminate_dead_code()
    graph.lint()
    gm = plain_graph_module(gm, graph)
    gm.rewrite_info = info
    leftover = [nd.name for nd in graph.nodes if is_conv3d(nd)]
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


def _export_static(model: nn.Module, example_clip: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` of ``model`` on ``example_clip``; every value must have a static shape."""
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (example_clip,), strict=False)
    except Exception as exc:  # export failures carry long messages: keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOpError(
            "torch.export", f"torch.export cannot capture the model: {first}"
        ) from exc
    gm = ep.module()
    for node in gm.graph.nodes:  # e.g. threshold gathers: sizes known only at run time
        val = node_value(node)
        if isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape):
            raise UnsupportedOpError(
                op_name(node),
                f"the Conv2d rewrite needs static shapes; op {op_name(node)!r} (node "
                f"{node.name!r}) has an input-dependent size (export mode='topk' or 'masked')",
            )
    return gm


def _fold_input(ctx: RewriteContext, clip_shape: tuple[int, ...], input_layout: str) -> None:
    """Mark the clip input folded: behind a :func:`fold_time` (``"clip"``) or as it is."""
    graph = ctx.graph
    placeholders = [p for p in graph.nodes if p.op == "placeholder"]
    clip_node = next(
        p for p in placeholders if node_value(p) is not None and node_value(p).dim() == 5
    )
    if input_layout == "clip":
        with graph.inserting_after(clip_node):
            f = graph.call_function(fold_time, (clip_node,))
        clip_node.replace_all_uses_with(
            f, delete_user_cb=lambda u: u is not f and not str(u.target).startswith("_guards")
        )
        ctx.folded[f] = clip_shape
    else:
        ctx.folded[clip_node] = clip_shape
        for node in list(graph.nodes):  # shape guards of the 5-d input no longer apply
            if node.op == "call_module" and str(node.target).startswith("_guards"):
                graph.erase_node(node)


def _rewrite_node(ctx: RewriteContext, node: fx.Node) -> None:
    """Dispatch ``node`` to its rule in :data:`RULES`; without one that applies, its folded
    inputs are unfolded to 5-d (``strict``: :class:`UnsupportedOpError`)."""
    ins = ctx.folded_inputs(node)
    rule = RULES.get(node.target)
    if rule is not None and (ins or getattr(rule, "takes_clips", False)) and rule(ctx, node):
        return
    if ins:  # this op reads 5-d tensors
        for a in ins:
            node.replace_input_with(a, _unfold(ctx, a, node))
        ctx.info.unfolded_ops.append(op_name(node))


def _unfold(ctx: RewriteContext, arg: fx.Node, user: fx.Node) -> fx.Node:
    """An :func:`unfold_time` of folded ``arg`` before ``user`` (``strict``: raise instead)."""
    if ctx.strict:
        raise UnsupportedOpError(
            op_name(user),
            f"op {op_name(user)!r} (node {user.name!r}) cannot run on time-folded 4-d "
            "tensors; the target needs a Conv2d-only graph without 5-d tensors",
        )
    return ctx.call_before(user, unfold_time, (arg, ctx.folded[arg][0]))


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
