"""Frame plan: temporal-tap frame skipping of a masked Conv3d.

Output frame ``t'`` with tap ``k`` reads input frame ``t = t' * s_t - p_t + k * d_t``; the plan
(:func:`frame_plan`) lists, per tap, the kept frames it reads and the output frames they feed, so
pairs reading padding or a dropped frame are never computed. :func:`place_frames` and
:func:`add_frames` write the per-tap convs into the output frames.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_dance.geometry import cached_geometry
    >>> g = cached_geometry(nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0)), (2, 4, 1, 1))
    >>> plan = frame_plan(g, torch.tensor([True, False, True, True]))
    >>> plan.gather.tolist(), [(k, dst) for k, _, dst, _ in plan.taps]
    ([0, 2, 3], [(0, tensor([1, 3])), (1, tensor([0, 2, 3])), (2, slice(1, 3, None))])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lightning_dance.execution.activations import bias_filled
from lightning_dance.execution.kernels import to_fast_layout
from lightning_dance.geometry import ConvGeometry, source_index

__all__ = ["FramePlan", "add_frames", "frame_plan", "place_frames", "tap_weight"]

_CL = torch.channels_last_3d


@dataclass
class FramePlan:
    """Temporal-tap plan: which input frames to gather and, per tap, which pairs to compute."""

    gather: torch.Tensor | None  # input frames to gather, sorted (None: all, in order)
    # per tap: (tap k, positions in the gathered frames, output frames, covers all outputs);
    # a tap covering every output frame comes first (its conv writes the output directly)
    taps: list[tuple[int, torch.Tensor | slice, torch.Tensor | slice, bool]]


def _as_index(values: list[int]) -> torch.Tensor | slice:
    """A slice when ``values`` is a run of consecutive integers (cheaper to use), else a tensor."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values)


def frame_plan(g: ConvGeometry, m_t: torch.Tensor) -> FramePlan:
    """The (cached) frame plan of ``g`` for the frame mask ``m_t`` (bool ``[T]``)."""
    return _frame_plan_cached(g, tuple(m_t.tolist()))


@functools.lru_cache(maxsize=8192)
def _frame_plan_cached(g: ConvGeometry, kept: tuple[bool, ...]) -> FramePlan:
    t_in, t_out = g.input[1], g.output[0]
    kt, st, dt, pt = g.kernel[0], g.stride[0], g.dilation[0], g.pad_lo[0]
    per_tap: list[list[tuple[int, int]]] = []  # per tap: (source frame, output frame)
    for k in range(kt):
        pairs = []
        for to in range(t_out):
            src = source_index(to * st - pt + k * dt, t_in, g.padding_mode)
            if src is not None and kept[src]:
                pairs.append((src, to))
        per_tap.append(pairs)
    frames = sorted({src for pairs in per_tap for src, _ in pairs})
    where = {f: i for i, f in enumerate(frames)}
    taps = []
    for k, pairs in enumerate(per_tap):
        if pairs:
            dst = [to for _, to in pairs]
            full = dst == list(range(t_out))
            taps.append((k, _as_index([where[s] for s, _ in pairs]), _as_index(dst), full))
    taps.sort(key=lambda tap: not tap[3])
    gather = None if frames == list(range(t_in)) else torch.tensor(frames, dtype=torch.long)
    return FramePlan(gather, taps)


def place_frames(
    y: torch.Tensor, dst: torch.Tensor | slice, t_out: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``[N, C, t_out, H, W]`` with ``y``'s frames at ``dst`` and the bias (or 0) elsewhere.

    Frames are contiguous blocks in ``channels_last_3d`` at batch 1: plain block copies and
    fills (``index_copy_`` and fill + ``index_add_`` measured 2-3x slower)."""
    n, c, _, h, w = y.shape
    out = torch.empty((n, c, t_out, h, w), dtype=y.dtype, device=y.device, memory_format=_CL)
    dst_list = list(range(t_out))[dst] if isinstance(dst, slice) else dst.tolist()
    rest = [t for t in range(t_out) if t not in set(dst_list)]
    if n != 1 or not y.is_contiguous(memory_format=_CL):
        out = bias_filled(out.shape, bias, y)
        out.index_copy_(2, torch.tensor(dst_list, device=y.device), y)
        return out
    rows = out.permute(0, 2, 3, 4, 1).view(t_out, h * w, c)
    src = y.permute(0, 2, 3, 4, 1).view(len(dst_list), h * w, c)
    for i, t in enumerate(dst_list):
        rows[t].copy_(src[i])
    if rest:
        fill = bias.to(y.dtype).view(1, c) if bias is not None else y.new_zeros(1, c)
        for t in rest:
            rows[t].copy_(fill.expand(h * w, c))
    return out


def add_frames(acc: torch.Tensor, dst: torch.Tensor | slice, y: torch.Tensor) -> None:
    """``acc[:, :, dst] += y`` (frame-major row adds; ``index_copy_`` measured 3x slower)."""
    if isinstance(dst, slice):
        acc[:, :, dst].add_(y)
    elif acc.shape[0] == 1 and acc.is_contiguous(memory_format=_CL):
        rows = acc.permute(0, 2, 3, 4, 1).view(acc.shape[2], -1)  # [T, H*W*C]
        rows.index_add_(
            0, dst.to(acc.device), to_fast_layout(y).permute(0, 2, 3, 4, 1).reshape(len(dst), -1)
        )
    else:
        acc.index_add_(2, dst.to(acc.device), y)


def tap_weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """Temporal tap ``k`` of a weight, ``[C_out, C_in, 1, kh, kw]``, in the weight's layout."""
    if w.shape[2] == 1:
        return w
    cl = w.is_contiguous(memory_format=_CL) and not w.is_contiguous()
    return w[:, :, k : k + 1].contiguous(memory_format=_CL if cl else torch.contiguous_format)
