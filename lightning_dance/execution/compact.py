"""Compact execution of one masked Conv3d: compute only the kept work, exactly.

:func:`compact_conv3d` ``(conv, x, values)`` equals ``conv(apply_masks(x, values))`` (up to float
rounding) and performs exactly the multiply-adds that
:func:`lightning_dance.executed.conv3d_executed_macs` counts:

- **channels**: kept input channels are gathered and the weight sliced. Grouped convs: each
  group's ``C_out/groups`` outputs read that group's kept channels; groups with the same number
  of kept channels run as one grouped conv (one call per distinct count); groups with nothing
  kept are not computed, their outputs are the bias (depthwise: only the kept channels' outputs
  are computed).
- **frames** (when masked): temporal-tap decomposition. Output frame ``t'`` with tap ``k`` reads
  input frame ``t = t' * s_t - p_t + k * d_t``; per tap, one ``(1, kh, kw)`` conv over the
  kept frames that tap reads, accumulated into its output frames. Pairs reading zero padding or
  a dropped frame are never computed; output frames with no pair are the bias. Reflect /
  replicate / circular padding: a padding frame is a copy of a real frame, whose mask decides.
- **features** (when masked): the active output positions (receptive field holding >= 1 kept
  input position, as the MAC counter defines them) are split into disjoint rectangles: runs of
  active columns, merged over consecutive rows with identical runs. Each rectangle is one conv
  over its input crop (halo included, padding made explicit), with all ``kh * kw`` taps. The
  union of the rectangles is exactly the active set, so no position is computed twice or
  needlessly; inactive positions are the bias.
- **features on a pixelwise conv** (a ``(kT, 1, 1)`` kernel without spatial stride or padding:
  R(2+1)D's temporal convs, 1x1x1 convs): output ``(h, w)`` reads input ``(h, w)`` only, so the
  kept positions are gathered once into a ``[T, P, 1]`` map, run through the frame and channel
  plan, and written back once; no rectangles (:mod:`~lightning_dance.execution.pixels`).
- **masks that keep everything** are dropped before planning: the plain conv, with no gather,
  crop or padding copy (a frame mask stays where taps read temporal padding, which the count
  skips; a feature mask stays where some output reads only padding).
- **features at outputs** (``feature_at_output=True``, :mod:`lightning_dance.feature_sites`):
  the mask is the set of output positions to compute, over the unmasked input; with its block
  grid (``feature_grid``) the kept blocks run as tiles, one conv per tile size
  (:mod:`~lightning_dance.execution.tiles`), else as rectangles of the mask.

Batches (``batch_mode``): ``"group"`` (default): samples with identical masks run together, the
others one by one (exact MACs); ``"union"``: the batch runs as one compact conv over the union
of the samples' kept entries, on the masked input (``apply_masks``), so each sample reads zeros
where it dropped an entry (same result, more MACs than counted); see ``docs/execution.md`` for
which wins. All convs go through :func:`~lightning_dance.execution.kernels.fast_conv3d`.

:func:`count_executed_macs` sums the MACs of every conv call the compact path issues, to check
the count against :mod:`lightning_dance.executed`.

The driver lives here; its parts: :mod:`~lightning_dance.execution.weights` (channel parts and
weight blocks), :mod:`~lightning_dance.execution.frames` (the frame plan),
:mod:`~lightning_dance.execution.spatial` (the feature rectangles),
:mod:`~lightning_dance.execution.pixels` (kept positions of pixelwise convs),
:mod:`~lightning_dance.execution.activations` (gathers and placements) and
:mod:`~lightning_dance.execution.recording` (the executed-MAC recorder).

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_dance.masks import apply_masks
    >>> conv = nn.Conv3d(8, 16, 3, padding=1)
    >>> x = torch.randn(1, 8, 4, 12, 12)
    >>> values = {"channel": (torch.rand(1, 8) > 0.5).float(), "frame": torch.tensor([[1., 0, 1, 1]])}
    >>> values["channel"][0, 0] = 1
    >>> y = compact_conv3d(conv, x, values)
    >>> torch.allclose(y, conv(apply_masks(x, values)), atol=1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.execution.activations import bias_filled, gather_kept, place_channels
from lightning_dance.execution.frames import (
    FramePlan,
    add_frames,
    frame_plan,
    place_frames,
    tap_weight,
)
from lightning_dance.execution.kernels import take_columns, to_fast_layout
from lightning_dance.execution.pixels import pixel_map, pixelwise, place_pixels
from lightning_dance.execution.reads import drop_full, reads_input_everywhere, skip_unread
from lightning_dance.execution.recording import ExecutedMacs, count_executed_macs, counted_conv3d
from lightning_dance.execution.recording import record_macs as record_macs  # old import path
from lightning_dance.execution.spatial import active_outputs as active_outputs  # old import path
from lightning_dance.execution.spatial import rects_cached
from lightning_dance.execution.tiles import (
    TileGroup,
    check_grid,
    output_tiles,
    put_tiles,
    take_tiles,
)
from lightning_dance.execution.weights import (
    ChannelPart,
    channel_parts,
    channels_last_weight,
    gatherable_weight,
    prefix_block,
    prefix_length,
    recurring_block,
)
from lightning_dance.execution.weights import depthwise_rows as depthwise_rows  # old import path
from lightning_dance.execution.weights import derived_tensor as derived_tensor  # old import path
from lightning_dance.feature_sites import OUTPUTS
from lightning_dance.geometry import ConvGeometry, cached_geometry
from lightning_dance.masks import DIMS, LayerMasks, apply_masks

__all__ = ["BATCH_MODES", "ExecutedMacs", "compact_conv3d", "count_executed_macs"]

#: How :func:`compact_conv3d` runs a batch whose samples have different masks.
BATCH_MODES = ("group", "union")


class KernelCosts(Protocol):
    """What the compact plan asks of a layer's measured kernel costs (implemented by
    :class:`~lightning_dance.execution.tuning.LayerTuning`)."""

    def snap_channels(self, kept: int, size: int) -> int:
        """The channel count to read for ``kept`` kept channels of ``size``."""
        ...

    def frames_pay(self, kept: int) -> bool:
        """Whether the tap decomposition over ``kept`` frames beats the dense conv."""
        ...

    def features_pay(self, active_fraction: float) -> bool:
        """Whether rectangles over ``active_fraction`` of the outputs beat the dense conv."""
        ...


def check_batch_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`BATCH_MODES`, else a ``ValueError``."""
    if mode not in BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {mode!r}")
    return mode


_CL = torch.channels_last_3d


#: Weights of at least this many elements gather their kept block in ``channels_last_3d``
#: (rows of an ``[C_out, kT, kH, kW, C_in]`` copy, then its innermost columns): what oneDNN reads
#: from a ``channels_last_3d`` input, so it makes no copy of its own. Smaller ones gather rows
#: then columns of the NCDHW copy, faster even with oneDNN's copy. Measured, two threads, keep
#: 0.4 of each side, both including oneDNN's copy: 72x32x1x3x3 14 vs 19 us, 144x64x1x3x3 44 vs
#: 56 us, 288x128x1x3x3 74 vs 76 us, 256x576x3x1x1 204 vs 136 us; input channels only:
#: 576x256x1x3x3 697 vs 394 us, 256x576x3x1x1 413 vs 137 us.
CHANNELS_LAST_GATHER_MIN = 400_000


def kept_weight(
    conv: nn.Conv3d, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None
) -> torch.Tensor:
    """``conv.weight[out_idx][:, in_idx]`` (``None``: all), ``[k_out, k_in, kT, kH, kW]``,
    contiguous in the layout the kernel reads (see :data:`CHANNELS_LAST_GATHER_MIN`; a 1x1x1
    kernel is contiguous in both). ``groups == 1``. Nothing dropped: the weight itself, in the
    layout the dense conv gives oneDNN (a copy in another layout is reordered on every call)."""
    if in_idx is None and out_idx is None:
        return conv.weight
    w = gatherable_weight(conv)
    rows = conv.out_channels if out_idx is None else prefix_length(out_idx)
    cols = conv.in_channels if in_idx is None else prefix_length(in_idx)
    if rows is not None and cols is not None and not torch.is_grad_enabled():
        return prefix_block(conv, rows, cols)  # first rows and columns: kept, no copy per call
    # channel sets that recur from clip to clip are gathered once (recurring_block)
    return recurring_block(conv, in_idx, out_idx, lambda: _gather_kept(conv, w, in_idx, out_idx))


def _gather_kept(
    conv: nn.Conv3d, w: torch.Tensor, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None
) -> torch.Tensor:
    """:func:`kept_weight`'s gather (no cache)."""
    if in_idx is None:
        return w.index_select(0, out_idx)
    if w.numel() < CHANNELS_LAST_GATHER_MIN:
        return (w if out_idx is None else w.index_select(0, out_idx)).index_select(1, in_idx)
    c_out, c_in, *kernel = w.shape
    w = channels_last_weight(conv)  # [C_out, kT, kH, kW, C_in], contiguous
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    block = take_columns(w.view(-1, c_in), in_idx).view(w.shape[0], *kernel, in_idx.shape[0])
    return block.permute(0, 4, 1, 2, 3)


def _pads(lo: tuple[int, ...], hi: tuple[int, ...]) -> list[int]:
    """F.pad order (last dim first) for per-dim (lo, hi)."""
    out = []
    for a, b in zip(reversed(lo), reversed(hi), strict=True):
        out += [a, b]
    return out


def _run_part(
    conv: nn.Conv3d,
    g: ConvGeometry,
    x: torch.Tensor,
    part: ChannelPart,
    frames: FramePlan | None,
    zero: torch.Tensor | None,
    rects: list[tuple[int, int, int, int]] | None,
    tiles: list[TileGroup] | None = None,
) -> torch.Tensor:
    """Output ``[N, C_part, T_out, H_out, W_out]`` of one channel part (bias where skipped).

    ``zero``: a 0/1 ``[T, H, W]`` (or broadcastable) multiplier for the input dims that are
    masked but not skipped (features always: rectangles only skip whole output positions; frames
    when a tuning chose the masked dense conv over the tap decomposition). ``rects``: the output
    rectangles to compute, one conv each; ``tiles``: output tiles, one conv per tile size."""
    n = x.shape[0]
    t_out, h_out, w_out = g.output
    xs = gather_kept(x, frames.gather if frames is not None else None, part.in_idx)
    zeros_mode = g.padding_mode == "zeros"
    sym = g.pad_lo == g.pad_hi
    native_hw = rects is None and tiles is None and zeros_mode and sym
    if zero is not None:
        xs = xs * zero.to(xs.dtype).view(1, 1, *zero.shape)
    hw_lo = (0, 0) if native_hw else g.pad_lo[1:]
    hw_hi = (0, 0) if native_hw else g.pad_hi[1:]
    native_t = frames is None and zeros_mode and g.pad_lo[0] == g.pad_hi[0]
    pad_t = g.pad_lo[0] if native_t else 0
    explicit_t = frames is None and not native_t  # frames masked: taps never read padding
    lo = (g.pad_lo[0] if explicit_t else 0, *hw_lo)
    hi = (g.pad_hi[0] if explicit_t else 0, *hw_hi)
    if any(lo) or any(hi):
        mode = "constant" if zeros_mode else g.padding_mode
        xs = to_fast_layout(F.pad(xs, _pads(lo, hi), mode=mode))
    pad_hw = g.pad_lo[1:] if native_hw else (0, 0)
    w, b, groups = part.weight, part.bias, part.groups
    c_part = w.shape[0]
    sh, sw = g.stride[1:]
    dh, dw = g.dilation[1:]
    kh, kw = g.kernel[1:]

    def crop(r0, r1, c0, c1):
        ih0, ih1 = r0 * sh, (r1 - 1) * sh + dh * (kh - 1) + 1
        iw0, iw1 = c0 * sw, (c1 - 1) * sw + dw * (kw - 1) + 1
        return to_fast_layout(xs[..., ih0:ih1, iw0:iw1])

    def put_rect(r0, r1, c0, c1):
        def put(out, y):
            out[..., r0:r1, c0:c1] = y

        return put

    # regions: (the input a conv reads, how its output is written); None: the whole output
    if tiles is not None:
        regions = [(take_tiles(xs, grp), functools.partial(put_tiles, tiles=grp)) for grp in tiles]
    elif rects is not None and rects != [(0, h_out, 0, w_out)]:
        regions = [(crop(*r), put_rect(*r)) for r in rects]
    else:
        regions = [(xs if rects is None else crop(*rects[0]), None)]
    full = regions[0][1] is None
    out = None if full else bias_filled((n, c_part, t_out, h_out, w_out), b, x)

    taps = (
        [(pos, dst, cover, tap_weight(w, k)) for k, pos, dst, cover in frames.taps]
        if (frames is not None)
        else []
    )

    def conv_region(xr: torch.Tensor, place: bool) -> tuple[torch.Tensor, object]:
        """The region's output and its output frames (``None``: all; only without
        ``place``, when one tap computes a subset of them: the caller writes those)."""
        if frames is None:
            stride, pad = (g.stride[0], sh, sw), (pad_t, *pad_hw)
            return counted_conv3d(xr, w, b, stride, pad, g.dilation, groups), None
        # temporal-tap decomposition: one (1, kh, kw) conv per tap over the frames it reads
        stride, pad, dil = (1, sh, sw), (0, *pad_hw), (1, dh, dw)
        acc = None
        for pos, dst, cover, wk in taps:
            xk = to_fast_layout(
                xr[:, :, pos] if isinstance(pos, slice) else xr.index_select(2, pos)
            )
            if acc is None:  # first tap: conv + bias on its frames, the bias alone elsewhere
                acc = counted_conv3d(xk, wk, b, stride, pad, dil, groups)
                if not cover and not place and len(taps) == 1:
                    return acc, dst
                if not cover:
                    acc = place_frames(acc, dst, t_out, b)
                continue
            add_frames(acc, dst, counted_conv3d(xk, wk, None, stride, pad, dil, groups))
        return acc, None

    for xr, put in regions:
        y, dst = conv_region(xr, place=tiles is None)
        if put is None:
            return y
        if dst is None:
            put(out, y)
        else:
            put(out, y, frames=dst)
    return out


def _snap_channels(
    conv: nn.Conv3d, m_c: torch.Tensor, kept: torch.Tensor, tuning: KernelCosts
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kept channels snapped UP to the tuned fastest count: ``(channels to read, zeroed)``.

    The extra channels are dropped ones (lowest indices first); their weight is zeroed
    (``zeroed``: bool over the channels read), so the result is unchanged. Only for
    ``groups == 1`` and depthwise convs (other grouped convs keep their exact counts)."""
    c_in = conv.in_channels
    if conv.groups not in (1, c_in):
        return kept, None
    target = tuning.snap_channels(len(kept), c_in)
    if target <= len(kept):
        return kept, None
    dropped = (~m_c).nonzero().flatten()[: target - len(kept)]
    read = torch.cat([kept, dropped]).sort().values
    return read, ~m_c[read]


def _compact_same_masks(
    conv: nn.Conv3d,
    g: ConvGeometry,
    x: torch.Tensor,
    m_t: torch.Tensor | None,
    m_c: torch.Tensor | None,
    m_f: torch.Tensor | None,
    tuning: KernelCosts | None = None,
    held: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    f_out: bool = False,
    f_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Compact conv of a batch whose samples share the masks ``[T]``, ``[C]``, ``[H, W]``.

    ``held``: the input channels ``x`` holds (sorted; ``None``: all; ``groups == 1`` and
    depthwise); ``out_idx``: the output channels to compute (``None``: all; ``groups == 1``);
    ``f_out``: ``m_f`` is ``[H_out, W_out]`` and selects the outputs to compute; ``f_grid``:
    its block grid (then the kept blocks run as tiles, one conv per tile size)."""
    m_t, m_c = drop_full(m_t, g), drop_full(m_c)
    if m_f is not None and (f_out or reads_input_everywhere(g)):
        m_f = drop_full(m_f)
    if f_out:  # the output mask is not cut with the input
        g, x, m_t, _ = skip_unread(g, x, m_t, None)
    else:
        g, x, m_t, m_f = skip_unread(g, x, m_t, m_f)
    pixels = m_f is not None and pixelwise(g)  # unless a tuning says the kept ones do not pay
    if pixels and (tuning is None or tuning.features_pay(float(m_f.float().mean()))):
        return _compact_pixels(conv, g, x, m_t, m_c, m_f, tuning, held, out_idx)
    x = to_fast_layout(x)
    frames = frame_plan(g, m_t.cpu()) if m_t is not None else None
    rects = None
    if m_f is not None:
        m_cpu = m_f.cpu()
        rects = rects_cached(g, m_cpu.numpy().tobytes(), m_cpu, at_outputs=f_out)
    tiles = output_tiles(g, m_cpu, f_grid) if f_out and f_grid is not None and rects else None
    c_out = conv.out_channels if out_idx is None else len(out_idx)
    shape = (x.shape[0], c_out, *g.output)
    kept = m_c.nonzero().flatten() if m_c is not None else None
    nothing = (frames is not None and not frames.taps) or rects == []
    if nothing or (kept is not None and len(kept) == 0) or c_out == 0:
        bias = conv.bias
        if bias is not None and out_idx is not None:
            bias = bias.index_select(0, out_idx.to(bias.device))
        return bias_filled(shape, bias, x)  # no output reads a kept input
    zero_t = zero_f = None
    zeroed = None  # channels read whose weight is zeroed (snapped up)
    if tuning is not None:
        if kept is not None and held is None:  # snapping reads channels x may not hold
            kept, zeroed = _snap_channels(conv, m_c, kept, tuning)
        kept_t = int(m_t.sum()) if frames is not None else 0
        if frames is not None and not tuning.frames_pay(kept_t):
            # the dense conv over all frames, the dropped ones zeroed (none dropped: as is, its
            # taps on temporal padding computed as the dense model does)
            frames, zero_t = None, (m_t.view(-1, 1, 1) if kept_t < len(m_t) else None)
        if rects is not None:
            active = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in rects)
            if not tuning.features_pay(active / (g.output[1] * g.output[2])):
                rects = None
    if m_f is not None and not f_out:
        zero_f = m_f.unsqueeze(0)
    if m_f is not None and f_out and rects is None:  # dense conv over the unmasked input (tuned)
        return _dense_then_select(conv, g, x, m_t, m_c, m_f, tuning, held, out_idx)
    zero = zero_t * zero_f if zero_t is not None and zero_f is not None else zero_t
    zero = zero if zero is not None else zero_f
    parts = channel_parts(conv, m_c, kept, zeroed, held, out_idx)
    if len(parts) == 1 and parts[0].out_idx is None:
        return _run_part(conv, g, x, parts[0], frames, zero, rects, tiles)
    out = bias_filled(shape, conv.bias, x)
    for part in parts:
        y = _run_part(conv, g, x, part, frames, zero, rects, tiles)
        place_channels(out, part.out_idx, y)
    return out


def _compact_pixels(conv, g, x, m_t, m_c, m_f, tuning, held, out_idx) -> torch.Tensor:
    """A pixelwise conv with a feature mask (:mod:`~lightning_dance.execution.pixels`):
    the frame and channel plan on the kept positions' map; the other positions hold the bias.
    Exactly the counted MACs."""
    n, _, t, h, w = x.shape
    c_out = conv.out_channels if out_idx is None else len(out_idx)
    bias = conv.bias
    if bias is not None and out_idx is not None:
        bias = bias.index_select(0, out_idx.to(bias.device))
    out = bias_filled((n, c_out, g.output[0], h, w), bias, x)
    if not bool(m_f.any()):
        return out
    xs, pix = pixel_map(x, m_f)
    p = len(pix)
    gp = dataclasses.replace(g, input=(g.input[0], t, p, 1), output=(g.output[0], p, 1))
    place_pixels(out, pix, _compact_same_masks(conv, gp, xs, m_t, m_c, None, tuning, held, out_idx))
    return out


def output_features(masks: LayerMasks, at_outputs: bool) -> tuple[bool, tuple[int, int] | None]:
    """``(feature_at_output, feature_grid)`` of :func:`compact_conv3d` for a layer's decided
    masks: the block grid of its feature mask when the mask selects outputs."""
    if not at_outputs or "feature" not in masks.probs:
        return False, None
    return True, tuple(masks.probs["feature"].shape[-2:])


def _dense_then_select(conv, g, x, m_t, m_c, m_f, tuning, held, out_idx) -> torch.Tensor:
    """Output features that do not pay (tuned): every position computed, the dropped ones
    then set to the bias (as the masked model has them)."""
    y = _compact_same_masks(conv, g, x, m_t, m_c, None, tuning, held, out_idx)
    bias = conv.bias if out_idx is None or conv.bias is None else conv.bias[out_idx]
    return OUTPUTS.mask_output(y, m_f.unsqueeze(0).expand(y.shape[0], -1, -1), bias)


def _channel_subset(
    what: str, idx: torch.Tensor | None, size: int, conv: nn.Conv3d, depthwise: bool = False
) -> torch.Tensor | None:
    """Validate an ``in_channels`` / ``out_channels`` argument: sorted unique indices < size
    (``depthwise``: a depthwise conv takes it too)."""
    if idx is None:
        return None
    if conv.groups != 1 and not (depthwise and conv.groups == conv.in_channels):
        allowed = "groups == 1 or a depthwise conv" if depthwise else "groups == 1"
        raise ValueError(f"{what} needs a conv with {allowed}, got groups={conv.groups}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.long:
        raise TypeError(f"{what} must be a 1-d LongTensor of channel indices, got {idx!r}")
    if len(idx) and (idx.min() < 0 or idx.max() >= size or (idx[1:] <= idx[:-1]).any()):
        raise ValueError(f"{what} must be sorted, unique channel indices in [0, {size})")
    return idx


def _check(
    conv: nn.Conv3d,
    x: torch.Tensor,
    values: dict[str, torch.Tensor],
    held: torch.Tensor | None = None,
    feature_at_output: bool = False,
) -> None:
    if not isinstance(conv, nn.Conv3d):
        raise TypeError(f"compact_conv3d needs an nn.Conv3d, got {type(conv).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"a Conv3d input must be [N, C, T, H, W], got {shape}")
    if not isinstance(values, dict):
        raise TypeError(f"values must be a dict dim -> mask tensor, got {type(values).__name__}")
    unknown = [d for d in values if d not in DIMS]
    if unknown:
        raise ValueError(f"unknown mask dims {unknown}; choose from {DIMS}")
    n, c, t, h, w = x.shape
    if held is not None:
        if c != len(held):
            raise ValueError(
                f"x holds {c} channels but in_channels names {len(held)} (x must be the full "
                "input's channels in_channels, in that order)"
            )
        c = conv.in_channels
        dropped = torch.ones(c, dtype=torch.bool)
        dropped[held.cpu()] = False
        keeps = values["channel"].detach().cpu() > 0.5 if "channel" in values else None
        if dropped.any() and (keeps is None or (keeps[:, dropped]).any()):
            raise ValueError(
                "the channel mask keeps input channels that x does not hold (in_channels must "
                "include every kept channel of every sample)"
            )
    want = {"frame": (n, t), "channel": (n, c), "feature": (n, h, w)}
    if feature_at_output:
        want["feature"] = (n, *cached_geometry(conv, (conv.in_channels, t, h, w)).output[1:])
    for dim, v in values.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != want[dim]:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"the {dim} mask must have shape {list(want[dim])} for an input of shape "
                f"{list(x.shape)}, got {got}"
            )


def compact_conv3d(
    conv: nn.Conv3d,
    x: torch.Tensor,
    values: dict[str, torch.Tensor],
    *,
    tuning: KernelCosts | None = None,
    batch_mode: str = "group",
    in_channels: torch.Tensor | None = None,
    out_channels: torch.Tensor | None = None,
    feature_at_output: bool = False,
    feature_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``conv(apply_masks(x, values))``, computing only the kept work (see module docstring).

    Args:
        conv: any ``nn.Conv3d`` (groups, stride, dilation, padding incl. ``"same"``, every
            ``padding_mode``, with or without bias).
        x: input ``[N, C, T, H, W]`` (any layout; ``channels_last_3d`` avoids a copy).
        values: per-sample 0/1 masks ``{"frame": [N, T], "channel": [N, C], "feature": [N, H, W]}``;
            an absent dim is not pruned. Entries > 0.5 are kept (straight-through masks are
            fine, they are detached: this is an inference path).
        tuning: this layer's measured kernel costs
            (:class:`~lightning_dance.execution.tuning.LayerTuning`, from
            :func:`~lightning_dance.execution.tuning.tune_conv3d`). ``None`` (default): always
            the exact compact plan, whose multiply-adds equal
            :func:`lightning_dance.executed.conv3d_executed_macs_batch`. With a tuning, a kept
            channel count may be snapped up to a faster size (extra channels read with a zeroed
            weight) and frame taps / feature rectangles that would be slower than the dense conv
            fall back to it on the masked input: the result is the same, the work may be larger
            than counted (:func:`count_executed_macs` reports what really ran).
        batch_mode: ``"group"`` (samples with equal masks together, the others one by one;
            exact) or ``"union"`` (one compact conv over the union of kept entries, the masked
            input zeroing what each sample dropped). Only matters for ``N > 1``.
        in_channels: (``groups == 1`` or depthwise) the input channels ``x`` holds, sorted:
            ``x`` is ``full_input[:, in_channels]``, e.g. the output of a previous conv that
            computed only the channels this layer keeps. Must include every kept channel.
        out_channels: (``groups == 1``) compute only these output channels (sorted), e.g. the
            ones the next layer keeps (see :mod:`lightning_dance.execution.chains`).
        feature_at_output: ``values["feature"]`` is ``[N, H_out, W_out]`` and selects the
            output positions to compute (:data:`lightning_dance.feature_sites.OUTPUTS`): the
            result is then the masked conv with those outputs kept and the others the bias.
        feature_grid: with ``feature_at_output``, the ``(gh, gw)`` block grid the feature mask
            was expanded from (:func:`lightning_dance.masks.expand_blocks`): the kept blocks
            then run as tiles, one conv per tile size
            (:mod:`lightning_dance.execution.tiles`), instead of one conv per rectangle.

    Returns:
        ``[N, C_out, T_out, H_out, W_out]`` in ``channels_last_3d`` layout; with
        ``out_channels``, ``[N, len(out_channels), ...]``: those channels of it.
    """
    held = _channel_subset("in_channels", in_channels, conv.in_channels, conv, depthwise=True)
    out_idx = _channel_subset("out_channels", out_channels, conv.out_channels, conv)
    check_grid(None, feature_at_output, feature_grid)  # the argument pair first
    _check(conv, x, values, held, feature_at_output)
    check_grid(values.get("feature"), feature_at_output, feature_grid)
    check_batch_mode(batch_mode)
    return compact_conv3d_unchecked(conv, x, values, tuning, batch_mode, held, out_idx,
                                    feature_at_output, feature_grid)  # fmt: skip


def compact_conv3d_unchecked(
    conv: nn.Conv3d,
    x: torch.Tensor,
    values: dict[str, torch.Tensor],
    tuning: KernelCosts | None,
    batch_mode: str,
    held: torch.Tensor | None,
    out_idx: torch.Tensor | None,
    feature_at_output: bool = False,
    feature_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:func:`compact_conv3d` without the argument checks (for callers that built them)."""
    g = cached_geometry(conv, (conv.in_channels, *x.shape[2:]))
    masks = {d: v.detach() > 0.5 for d, v in values.items()}
    if held is not None and len(held) == conv.in_channels:
        held = None  # x holds every channel
    n = x.shape[0]

    def sample(i: int) -> tuple[torch.Tensor | None, ...]:
        return tuple(masks[d][i] if d in masks else None for d in DIMS)

    def run(xb: torch.Tensor, m_t, m_c, m_f) -> torch.Tensor:
        return _compact_same_masks(conv, g, xb, m_t, m_c, m_f, tuning, held, out_idx,
                                   feature_at_output, feature_grid)  # fmt: skip

    if n == 1 or not masks:
        return run(x, *sample(0))
    if batch_mode == "union":
        union = {d: m.any(0) for d, m in masks.items()}
        held_masks = {d: v if d != "channel" or held is None else v[:, held.to(v.device)]
                      for d, v in masks.items()}  # fmt: skip
        out_mask = held_masks.pop("feature") if feature_at_output and "feature" in masks else None
        xz = apply_masks(x, {d: v.to(x.dtype) for d, v in held_masks.items()})
        y = run(xz, *(union.get(d) for d in DIMS))
        if out_mask is None:
            return y
        bias = conv.bias if out_idx is None or conv.bias is None else conv.bias[out_idx]
        return OUTPUTS.mask_output(y, out_mask, bias)  # each sample's own outputs
    rows = torch.cat([masks[d].reshape(n, -1) for d in DIMS if d in masks], 1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(uniq) == 1:
        return run(x, *sample(0))
    out = None
    for u in range(len(uniq)):
        idx = (inverse == u).nonzero().flatten()
        xb = x[idx] if len(idx) > 1 else x[int(idx[0]) : int(idx[0]) + 1]
        y = run(xb, *sample(int(idx[0])))
        if out is None:
            out = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device,
                              memory_format=_CL)  # fmt: skip
        out.index_copy_(0, idx.to(y.device), y)
    return out
