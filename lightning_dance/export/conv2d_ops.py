"""Folded tensor ops: 3D convolution, pooling and padding on clips with time folded into the batch.

A clip ``[N, C, T, H, W]`` is folded to ``[N * T, C, H, W]`` (:func:`fold_time`) and every op
here reads and writes that layout with rank <= 4 tensors only: :func:`conv3d_folded` (one
``conv2d`` per temporal tap, see :mod:`.conv2d_rewrite`), :func:`pool3d_folded`,
:func:`global_pool_folded`, :func:`pad_folded`, :func:`broadcast_frames`; :class:`Conv3dAs2d`
wraps one ``nn.Conv3d`` as a module and :func:`replace_conv3d` swaps a model's Conv3d for it.

Example:
    >>> x = torch.randn(2, 3, 5, 8, 8)
    >>> y = pool3d_folded(fold_time(x), 2, "max", 3, 2, 1)
    >>> bool(torch.equal(unfold_time(y, 2), F.max_pool3d(x, 3, 2, 1)))
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "Conv3dAs2d",
    "broadcast_frames",
    "conv3d_as_conv2d",
    "conv3d_folded",
    "fold_bn_weights",
    "fold_like",
    "fold_time",
    "global_pool_folded",
    "pad_folded",
    "pool3d_folded",
    "replace_conv3d",
    "triple",
    "unfold_time",
]


# ------------------------------------------------------------------------------ layout helpers
def fold_time(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, T, H, W] -> [N * T, C, H, W]`` (frames become batch entries)."""
    n, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[N * T, C, H, W] -> [N, C, T, H, W]`` (inverse of :func:`fold_time`)."""
    nt, c, h, w = x.shape
    return x.reshape(batch, nt // batch, c, h, w).permute(0, 2, 1, 3, 4).contiguous()


def fold_like(x: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """A plain tensor broadcastable to ``[N, C, T, H, W]``, folded to broadcast with a folded one."""
    while x.dim() < 5:
        x = x.unsqueeze(0)
    x = x.expand(n, x.shape[1], t, x.shape[3], x.shape[4])
    return fold_time(x)


def triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    """``v`` as a (T, H, W) triple (an int or a 1-sequence is repeated)."""
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
    p = triple(padding)
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
    stride, dilation = triple(stride), triple(dilation)
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
        self.stride, self.dilation = triple(stride), triple(dilation)
        self.padding = padding if isinstance(padding, str) else triple(padding)
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
            weight, bias = fold_bn_weights(
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


def fold_bn_weights(weight, bias, gamma, beta, mean, var, eps):
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
    kernel, stride, padding, dilation = (triple(v) for v in (kernel, stride, padding, dilation))
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
