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

import copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lightning_dance.errors import DanceError

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


# ------------------------------------------------------------------------------ layout helpers
def fold_time(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, T, H, W] -> [N * T, C, H, W]`` (frames become batch entries)."""
    n, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[N * T, C, H, W] -> [N, C, T, H, W]`` (inverse of :func:`fold_time`)."""
    nt, c, h, w = x.shape
    return x.reshape(batch, nt // batch, c, h, w).permute(0, 2, 1, 3, 4).contiguous()


def _fold_like(x: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """A plain tensor broadcastable to ``[N, C, T, H, W]``, folded to broadcast with a folded one."""
    while x.dim() < 5:
        x = x.unsqueeze(0)
    x = x.expand(n, x.shape[1], t, x.shape[3], x.shape[4])
    return fold_time(x)


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(i) for i in v)
    return v * 3 if len(v) == 1 else v  # type: ignore[return-value]


def _pads(
    padding: int | str | Sequence[int],
    kernel: tuple[int, int, int],
    dilation: tuple[int, int, int],
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(pad_lo, pad_hi)`` per (T, H, W); ``"same"`` puts the odd extra on the hi side."""
    if padding == "valid":
        return (0, 0, 0), (0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        lo = tuple(p // 2 for p in total)
        return lo, tuple(p - q for p, q in zip(total, lo, strict=True))  # type: ignore[return-value]
    if isinstance(padding, str):
        raise ValueError(f"unknown padding {padding!r}")
    p = _triple(padding)
    return p, p


def _temporal_plan(
    frames: int, k_t: int, s_t: int, d_t: int, p_lo: int, p_hi: int
) -> tuple[int, list[tuple[int, int, int, int]]]:
    """``(T_out, [(tap, first source frame, count, first output frame)])``: the taps that read
    at least one real frame (padding frames are never computed)."""
    t_out = (frames + p_lo + p_hi - d_t * (k_t - 1) - 1) // s_t + 1
    if t_out < 1:
        raise ValueError(
            f"temporal kernel {k_t} (dilation {d_t}, padding {p_lo}+{p_hi}) is larger than the "
            f"{frames} input frames"
        )
    plan = []
    for k in range(k_t):
        off = k * d_t - p_lo  # source frame of output 0
        lo = max(0, math.ceil(-off / s_t))
        hi = min(t_out - 1, (frames - 1 - off) // s_t)
        if hi >= lo:
            plan.append((k, lo * s_t + off, hi - lo + 1, lo))
    return t_out, plan


def _pad_indices(frames: int, lo: int, hi: int, mode: str) -> list[int]:
    idx = []
    for i in range(-lo, frames + hi):
        if mode == "reflect":
            j = -i if i < 0 else (2 * (frames - 1) - i if i >= frames else i)
        elif mode == "replicate":
            j = min(max(i, 0), frames - 1)
        elif mode == "circular":
            j = i % frames
        else:
            raise ValueError(f"unknown padding_mode {mode!r}")
        idx.append(j)
    return idx


def _zeros(like: torch.Tensor, shape: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """A constant tensor (``torch.full``, no tensor input: frozen graphs fold it)."""
    return torch.full(shape, value, dtype=like.dtype, device=like.device)


def _strided_frames(xs: torch.Tensor, start: int, count: int, step: int) -> torch.Tensor:
    """``xs[:, start : start + (count - 1) * step + 1 : step]`` for ``xs [N, T, X, W]`` with
    unit-step slices and rank-4 reshapes only (NNAPI's converter mis-sizes strided slices)."""
    frames = xs.shape[1]
    if step == 1:
        return xs if (start, count) == (0, frames) else xs[:, start : start + count]
    batch, _, x_dim, w = xs.shape
    full = count if start + count * step <= frames else count - 1
    parts = []
    if full:
        block = xs[:, start : start + full * step]
        block = block.reshape(batch * full, step, x_dim, w)[:, :1]
        parts.append(block.reshape(batch, full, x_dim, w))
    if full < count:
        last = start + (count - 1) * step
        parts.append(xs[:, last : last + 1])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _shift_combine(
    parts: list[tuple[torch.Tensor, int, int]], t_out: int, combine: Any
) -> torch.Tensor:
    """Combine per-tap outputs ``(y [N, count, ...], first output frame, count)`` into
    ``[N, t_out, ...]`` with ``combine`` (add / maximum), by output-frame segments with the same
    set of contributing taps: only slices, ``combine`` and ``cat`` (no zero frames, which
    NNAPI could not take as ``cat`` operands). Segments with no tap are zeros."""
    cuts = sorted({0, t_out, *(d for _, d, _ in parts), *(d + c for _, d, c in parts)})
    segments = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        acc = None
        for y, d, c in parts:
            if d <= a and b <= d + c:
                piece = y if (a - d, b - d) == (0, c) else y[:, a - d : b - d]
                acc = piece if acc is None else combine(acc, piece)
        if acc is None:
            y0 = parts[0][0]
            acc = _zeros(y0, (y0.shape[0], b - a, *y0.shape[2:]))
        segments.append(acc)
    return segments[0] if len(segments) == 1 else torch.cat(segments, dim=1)


def _frame_slices(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x [N, T, ...]`` -> ``x[:, idx]`` by ``cat`` of contiguous slices (no gather op)."""
    runs: list[tuple[int, int]] = []
    for j in idx:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    parts = [x[:, a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------ functional core
def conv3d_folded(
    x: torch.Tensor,
    batch: int,
    taps: Sequence[torch.Tensor] | torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """A Conv3d on a time-folded input ``[N * T, C, H, W]`` -> ``[N * T_out, C_out, H', W']``.

    ``taps``: the temporal taps of the Conv3d weight (``weight.unbind(2)``, each
    ``[C_out, C_in / groups, kH, kW]``) or the 5-d weight itself. Only ``conv2d``, strided
    slices, ``cat`` and ``add`` are used (rank <= 4 throughout).
    """
    if isinstance(taps, torch.Tensor):
        if taps.dim() != 5:
            raise ValueError(f"a Conv3d weight is 5-d, got shape {tuple(taps.shape)}")
        taps = taps.unbind(2)
    taps = list(taps)
    k_t = len(taps)
    kernel = (k_t, int(taps[0].shape[-2]), int(taps[0].shape[-1]))
    stride, dilation = _triple(stride), _triple(dilation)
    p_lo, p_hi = _pads(padding, kernel, dilation)
    nt, c, h, w = x.shape
    if nt % batch:
        raise ValueError(f"folded batch {nt} is not a multiple of N={batch}")
    frames = nt // batch
    if padding_mode != "zeros" and any(p_lo + p_hi):
        # pad explicitly (frames by slices, space by F.pad), then run without padding
        xs = x.reshape(batch, frames, c * h, w)
        xs = _frame_slices(xs, _pad_indices(frames, p_lo[0], p_hi[0], padding_mode))
        frames = xs.shape[1]
        x = xs.reshape(batch * frames, c, h, w)
        if p_lo[1] or p_hi[1] or p_lo[2] or p_hi[2]:
            x = F.pad(x, (p_lo[2], p_hi[2], p_lo[1], p_hi[1]), mode=padding_mode)
        nt, c, h, w = x.shape
        p_lo, p_hi = (0, 0, 0), (0, 0, 0)
    space_pad: tuple[int, int] | str = (p_lo[1], p_lo[2])
    if (p_lo[1], p_lo[2]) != (p_hi[1], p_hi[2]):  # asymmetric ("same" with even kernels)
        x = F.pad(x, (p_lo[2], p_hi[2], p_lo[1], p_hi[1]))
        nt, c, h, w = x.shape
        space_pad = (0, 0)
    t_out, plan = _temporal_plan(frames, k_t, stride[0], dilation[0], p_lo[0], p_hi[0])
    xs = x.reshape(batch, frames, c * h, w)
    outs: list[tuple[torch.Tensor, int, int]] = []
    for k, src, count, dst in plan:
        sl = _strided_frames(xs, src, count, stride[0])
        y = F.conv2d(
            sl.reshape(batch * count, c, h, w),
            taps[k],
            None,
            stride[1:],
            space_pad,
            dilation[1:],
            groups,
        )
        c_out, h_out, w_out = y.shape[1:]
        outs.append((y.reshape(batch, count, c_out * h_out, w_out), dst, count))
    if not outs:  # every tap reads padding only: the output is the bias
        c_out = taps[0].shape[0]
        h_out = (h + 2 * space_pad[0] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        w_out = (w + 2 * space_pad[1] - dilation[2] * (kernel[2] - 1) - 1) // stride[2] + 1
        acc = _zeros(x, (batch, t_out, c_out * h_out, w_out))
    else:
        acc = _shift_combine(outs, t_out, torch.add)
    out = acc.reshape(batch * t_out, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def conv3d_as_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """``F.conv3d(x, weight, ...)`` computed with 2D convolutions only (5-d in, 5-d out).

    Example:
        >>> x, w = torch.randn(1, 2, 4, 6, 6), torch.randn(3, 2, 3, 3, 3)
        >>> ref = F.conv3d(x, w, padding=1)
        >>> bool((conv3d_as_conv2d(x, w, padding=1) - ref).abs().max() < 1e-4)
        True
    """
    if x.dim() != 5:
        raise ValueError(f"a Conv3d input must be [N, C, T, H, W], got {tuple(x.shape)}")
    n = x.shape[0]
    y = conv3d_folded(
        fold_time(x), n, weight, bias, stride, padding, dilation, groups, padding_mode
    )
    return unfold_time(y, n)


# ------------------------------------------------------------------------------ module
class Conv3dAs2d(nn.Module):
    """An ``nn.Conv3d`` (optionally followed by an eval ``BatchNorm3d``) as per-tap conv2d.

    Args:
        weight, bias: the Conv3d's (5-d weight); copied into one 4-d tap per temporal offset.
        stride, padding, dilation, groups, padding_mode: as ``nn.Conv3d``.
        folded_batch: ``None``: ``forward`` takes and returns clips ``[N, C, T, H, W]``;
            an int ``N``: it takes and returns folded tensors ``[N * T, C, H, W]``.

    Build it with :meth:`from_conv3d` (``bn=`` folds a BatchNorm3d in eval mode).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        folded_batch: int | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 5:
            raise ValueError(f"a Conv3d weight is 5-d, got shape {tuple(weight.shape)}")
        k_t = weight.shape[2]
        for k in range(k_t):
            self.register_parameter(
                f"tap{k}", nn.Parameter(weight[:, :, k].detach().clone(), requires_grad=False)
            )
        self.bias = (
            nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        )
        self.k_t = k_t
        self.stride, self.dilation = _triple(stride), _triple(dilation)
        self.padding = padding if isinstance(padding, str) else _triple(padding)
        self.groups, self.padding_mode, self.folded_batch = groups, padding_mode, folded_batch
        self.in_channels = weight.shape[1] * groups
        self.out_channels = weight.shape[0]

    @classmethod
    def from_conv3d(
        cls,
        conv: nn.Conv3d,
        bn: nn.BatchNorm3d | None = None,
        *,
        folded_batch: int | None = None,
    ) -> Conv3dAs2d:
        """The rewrite of ``conv`` (and of ``bn(conv(x))`` in eval mode when ``bn`` is given)."""
        if not isinstance(conv, nn.Conv3d):
            raise TypeError(f"expected an nn.Conv3d, got {type(conv).__name__}")
        weight, bias = conv.weight, conv.bias
        if bn is not None:
            weight, bias = _fold_bn(
                weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
            )
        return cls(
            weight,
            bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.padding_mode,
            folded_batch,
        )

    def taps(self) -> list[torch.Tensor]:
        """The 4-d weights of the temporal taps, in order."""
        return [getattr(self, f"tap{k}") for k in range(self.k_t)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.bias, self.stride, self.padding, self.dilation, self.groups, self.padding_mode)
        if self.folded_batch is not None:
            return conv3d_folded(x, self.folded_batch, self.taps(), *args)
        if x.dim() != 5:
            raise ValueError(f"expected a clip [N, C, T, H, W], got {tuple(x.shape)}")
        n = x.shape[0]
        return unfold_time(conv3d_folded(fold_time(x), n, self.taps(), *args), n)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, taps={self.k_t}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"folded_batch={self.folded_batch}"
        )


def _fold_bn(weight, bias, gamma, beta, mean, var, eps):
    """Weights of ``bn(conv(x))`` in eval mode as one conv (BN over output channels;
    ``torch.nn.utils.fusion.fuse_conv_bn_weights``, detached)."""
    w, b = fuse_conv_bn_weights(weight, bias, mean, var, eps, gamma, beta)
    return w.detach(), b.detach()


def replace_conv3d(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Swap every ``nn.Conv3d`` of ``model`` for a 5-d :class:`Conv3dAs2d` (same outputs).

    Only the convolutions change: other 3D ops (BatchNorm3d, 3D pooling) stay; use
    :func:`rewrite_conv3d_to_conv2d` for a graph without them.
    """
    model = model if inplace else copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv3d):
                setattr(module, child_name, Conv3dAs2d.from_conv3d(child))
    return model


# ------------------------------------------------------------------------------ pooling
def global_pool_folded(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean over (T, H, W) of a folded tensor: ``[N * T, C, H, W] -> [N, C]``."""
    nt, c = x.shape[0], x.shape[1]
    return x.mean(dim=(2, 3)).reshape(batch, nt // batch, c).mean(dim=1)


def pool3d_folded(
    x: torch.Tensor,
    batch: int,
    kind: str,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int] = (1, 1, 1),
) -> torch.Tensor:
    """``max_pool3d`` (``kind="max"``) or ``avg_pool3d`` (count_include_pad, ``"avg"``) on a
    folded tensor: a 2D pooling per frame, then a max / sum over strided frame slices."""
    kernel, stride, padding, dilation = (_triple(v) for v in (kernel, stride, padding, dilation))
    if kind == "max":
        y = F.max_pool2d(x, kernel[1:], stride[1:], padding[1:], dilation[1:])
    else:
        if dilation != (1, 1, 1):
            raise ValueError("avg_pool3d has no dilation")
        y = F.avg_pool2d(x, kernel[1:], stride[1:], padding[1:], count_include_pad=True)
    nt, c, h, w = y.shape
    frames = nt // batch
    t_out, plan = _temporal_plan(frames, kernel[0], stride[0], dilation[0], padding[0], padding[0])
    ys = y.reshape(batch, frames, c * h, w)
    outs = [(_strided_frames(ys, src, count, stride[0]), dst, count) for _, src, count, dst in plan]
    # a max window always holds a real frame; avg counts padding (count_include_pad)
    acc = _shift_combine(outs, t_out, torch.maximum if kind == "max" else torch.add)
    if kind == "avg":
        acc = acc / kernel[0]
    return acc.reshape(batch * t_out, c, h, w)


def broadcast_frames(x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """A folded one-frame tensor ``[N, C, H, W]`` repeated over ``frames``: ``[N * T, C, H, W]``."""
    _, c, h, w = x.shape
    return (
        x.reshape(batch, 1, c * h, w)
        .expand(batch, frames, c * h, w)
        .reshape(batch * frames, c, h, w)
    )


def pad_folded(
    x: torch.Tensor, batch: int, pad: Sequence[int], mode: str = "constant", value: float = 0.0
) -> torch.Tensor:
    """``F.pad`` of a clip with a 6-entry ``pad`` (W, H, T), applied to its folded form."""
    wl, wr, hl, hr, tl, tr = (int(p) for p in pad)
    if wl or wr or hl or hr:
        x = (
            F.pad(x, (wl, wr, hl, hr), mode=mode, value=value)
            if mode == "constant"
            else F.pad(x, (wl, wr, hl, hr), mode=mode)
        )
    if not (tl or tr):
        return x
    nt, c, h, w = x.shape
    frames = nt // batch
    xs = x.reshape(batch, frames, c * h, w)
    if mode == "constant":
        parts = [xs]
        if tl:
            parts.insert(0, _zeros(xs, (batch, tl, c * h, w), value))
        if tr:
            parts.append(_zeros(xs, (batch, tr, c * h, w), value))
        xs = torch.cat(parts, dim=1)
    else:
        xs = _frame_slices(xs, _pad_indices(frames, tl, tr, mode))
    return xs.reshape(-1, c, h, w)


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
    kernel = _triple(a[1])
    stride = _triple(a[2]) if len(a) > 2 and a[2] else kernel
    padding = _triple(a[3]) if len(a) > 3 else (0, 0, 0)
    if node.target is _ATEN.avg_pool3d.default:
        ceil = bool(a[4]) if len(a) > 4 else False
        include = bool(a[5]) if len(a) > 5 else True
        ok = not ceil and (include or padding == (0, 0, 0)) and (len(a) <= 6 or a[6] is None)
        kind, dil = "avg", (1, 1, 1)
    else:
        dil = _triple(a[4]) if len(a) > 4 else (1, 1, 1)
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
                    weight, bias = _fold_bn(weight, bias, *tensors, eps)
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
                        fa = graph.call_function(_fold_like, (a, nb, tb))
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
                keepdim, is_global = True, tuple(_triple(node.args[1])) == (1, 1, 1)
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
