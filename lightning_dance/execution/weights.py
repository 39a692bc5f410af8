"""Kept blocks of a Conv3d weight: cached layouts, gathered rows and columns, channel parts.

:func:`channel_parts` splits one masked conv into conv calls over channel subsets (grouped convs:
one call per distinct kept count), each with its gathered weight block.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(4, 4, 1, groups=2)
    >>> m_c = torch.tensor([True, False, True, True])
    >>> parts = channel_parts(conv, m_c, m_c.nonzero().flatten())
    >>> [(p.in_idx.tolist(), p.out_idx.tolist(), tuple(p.weight.shape)) for p in parts]
    [([0], [0, 1], (2, 1, 1, 1, 1)), ([2, 3], [2, 3], (2, 2, 1, 1, 1))]
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = [
    "ChannelPart",
    "channel_parts",
    "channels_last_weight",
    "depthwise_rows",
    "derived_tensor",
    "gather_in_channels",
    "gatherable_weight",
    "prefix_block",
    "prefix_length",
    "forget_recurring_blocks",
    "recurring_block",
]

_CL = torch.channels_last_3d


@dataclass
class ChannelPart:
    """One conv call over a subset of channels: gathered inputs -> a subset of outputs."""

    in_idx: torch.Tensor | None  # input channels to gather (None: all)
    weight: torch.Tensor
    bias: torch.Tensor | None
    out_idx: torch.Tensor | None  # output channels produced (None: all, in order)
    groups: int


def gather_in_channels(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``w[:, idx]``, in the weight's own layout (a ``channels_last_3d`` weight stays one)."""
    if w.is_contiguous() or not w.is_contiguous(memory_format=_CL):
        return w.index_select(1, idx)
    o, c, kt, kh, kw = w.shape
    flat = w.permute(0, 2, 3, 4, 1).reshape(-1, c).index_select(1, idx)
    return flat.view(o, kt, kh, kw, len(idx)).permute(0, 4, 1, 2, 3)


_derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def derived_tensor(
    module: nn.Module,
    kind: str,
    sources: tuple[torch.Tensor | None, ...],
    make: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``make()`` (a tensor derived from ``module``'s ``sources``, e.g. a weight in another
    layout), cached per module and ``kind`` without autograd, and made again when a source
    changes (another tensor, an in-place update, dtype or device). For inference paths."""
    key = tuple(
        None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources
    )
    per_module = _derived.setdefault(module, {})
    hit = per_module.get(kind)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = per_module[kind] = (key, make())
    return hit[1]


def gatherable_weight(conv: nn.Conv3d) -> torch.Tensor:
    """``conv.weight`` in the default (NCDHW) layout, where row and column gathers run ~3x
    faster than on a ``channels_last_3d`` weight (measured: 576x256x1x3x3, 0.16 vs 0.46 ms).
    Without autograd, a cached copy, renewed when the weight changes."""
    w = conv.weight
    if w.is_contiguous():
        return w
    if torch.is_grad_enabled():
        return w.contiguous()
    return derived_tensor(conv, "contiguous", (w,), lambda: w.detach().contiguous())


def channels_last_weight(conv: nn.Conv3d) -> torch.Tensor:
    """``conv.weight`` as a contiguous ``[C_out, kT, kH, kW, C_in]`` (a view of a
    ``channels_last_3d`` weight; else a cached copy, renewed when the weight changes)."""
    w = conv.weight.detach()
    if w.is_contiguous(memory_format=_CL):
        return w.permute(0, 2, 3, 4, 1)
    return derived_tensor(conv, "channels_last", (conv.weight,),
                          lambda: w.permute(0, 2, 3, 4, 1).contiguous())  # fmt: skip


def prefix_length(idx: torch.Tensor | None) -> int | None:
    """``k`` when the sorted unique indices ``idx`` are exactly ``0 .. k-1`` (a prefix, as the
    ``width`` policy keeps), else ``None``: such a selection is a slice, not a gather.

    Example:
        >>> prefix_length(torch.arange(5)), prefix_length(torch.tensor([0, 2])), prefix_length(None)
        (5, None, None)
    """
    if idx is None or not len(idx):
        return None
    k = len(idx)
    return k if int(idx[-1]) == k - 1 and int(idx[0]) == 0 else None


#: contiguous weight blocks kept per conv by :func:`prefix_block` (the least recently used go)
PREFIX_BLOCKS = 16


def prefix_block(conv: nn.Conv3d, rows: int, cols: int) -> torch.Tensor:
    """``conv.weight[:rows, :cols]`` (``groups == 1``), contiguous, with no copy per call:
    ``cols == C_in`` is a view of the weight's first rows; otherwise the block is copied once
    and kept (:func:`derived_tensor`; up to :data:`PREFIX_BLOCKS` sizes per conv, the least
    recently used dropped), so a clip whose kept channels are prefixes reads only the kept
    weights. Without autograd (an inference path)."""
    w = gatherable_weight(conv)
    if cols == conv.in_channels:
        return w[:rows]
    kind = f"prefix:{rows}:{cols}"
    per_module = _derived.setdefault(conv, {})
    blocks = [k for k in per_module if k.startswith("prefix:")]
    if kind not in per_module and len(blocks) >= PREFIX_BLOCKS:
        del per_module[blocks[0]]  # dicts keep insertion order: the oldest first
    block = derived_tensor(conv, kind, (conv.weight,), lambda: w[:rows, :cols].contiguous())
    per_module[kind] = per_module.pop(kind)  # most recently used last
    return block


#: gathered weight blocks kept per conv by :func:`recurring_block` (the least seen go): a model
#: whose channel choices recur from clip to clip reads its kept weights in place (0: off)
RECURRING_BLOCKS = 4
#: channel sets remembered per conv (keys and sighting counts only) to decide which to keep
SEEN_SETS = 32
#: calls per conv between two looks at its hit rate: below 1 in 8, the bookkeeping (a few
#: microseconds a call) is skipped until the next look
RECURRING_WINDOW = 64


class _Recurring:
    """:func:`recurring_block`'s state for one conv."""

    __slots__ = ("blocks", "calls", "hits", "seen", "skip")

    def __init__(self) -> None:
        self.blocks: dict[tuple, tuple[tuple, torch.Tensor]] = {}  # key -> (weight version, block)
        self.seen: dict[tuple, int] = {}  # key -> sightings, most recent last
        self.calls = self.hits = 0
        self.skip = False


_recurring: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def recurring_block(
    conv: nn.Conv3d,
    in_idx: torch.Tensor | None,
    out_idx: torch.Tensor | None,
    make: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``make()``, the kept weight block of ``conv`` for the input channels ``in_idx`` and output
    channels ``out_idx``, cached per conv and index *content* (up to :data:`RECURRING_BLOCKS`
    sets per conv; renewed when the weight changes): a clip that keeps the same channels as
    recent ones gathers no weights. Which sets are kept: one seen at least twice among the
    last :data:`SEEN_SETS` sightings, in place of the least seen kept one if seen more often.
    Where fewer than 1 call in 8 hits (a controller that really chooses per clip), the
    bookkeeping is skipped for the next :data:`RECURRING_WINDOW` calls, then looked at again.
    Inference on CPU indices only (with autograd, or indices on an accelerator, it calls
    ``make()``: reading the indices back would synchronize)."""
    if RECURRING_BLOCKS < 1 or torch.is_grad_enabled():
        return make()
    if (in_idx is not None and in_idx.device.type != "cpu") or (
        out_idx is not None and out_idx.device.type != "cpu"
    ):
        return make()
    state = _recurring.get(conv)
    if state is None:
        state = _recurring[conv] = _Recurring()
    state.calls += 1
    if state.calls >= RECURRING_WINDOW:  # a new window: after a skipped one, look again
        state.skip = not state.skip and state.hits * 8 < state.calls
        state.calls = state.hits = 0
    if state.skip:
        return make()
    key = (
        None if in_idx is None else in_idx.numpy().tobytes(),
        None if out_idx is None else out_idx.numpy().tobytes(),
    )
    seen = state.seen
    count = seen[key] = seen.pop(key, 0) + 1  # most recent last
    if len(seen) > SEEN_SETS:
        del seen[next(iter(seen))]  # the oldest sighting goes
    w = conv.weight
    version = (w.data_ptr(), w._version, w.dtype, w.device)
    hit = state.blocks.get(key)
    if hit is not None and hit[0] == version:
        state.hits += 1
        return hit[1]
    if hit is None:
        if count < 2:  # seen once: sets that never recur cost a lookup, not a kept block
            return make()
        if len(state.blocks) >= RECURRING_BLOCKS:
            # a set replaces the least seen kept one only if seen more often (sets cycling
            # through more slots than there are keep some hits instead of none)
            victim = min(state.blocks, key=lambda k: seen.get(k, 0))
            if seen.get(victim, 0) >= count:
                return make()
            del state.blocks[victim]
    with torch.no_grad():
        block = make()
    state.blocks[key] = (version, block)
    return block


def depthwise_rows(channels: torch.Tensor, multiplier: int) -> torch.Tensor:
    """The output channels (weight rows) of a depthwise conv that read the input ``channels``
    (``multiplier = C_out / C_in`` consecutive rows each)."""
    if multiplier == 1:
        return channels
    steps = torch.arange(multiplier, device=channels.device)
    return (channels[:, None] * multiplier + steps).flatten()


def channel_parts(
    conv: nn.Conv3d,
    m_c: torch.Tensor | None,
    kept: torch.Tensor | None,
    zeroed: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
) -> list[ChannelPart]:
    """Conv calls over channel subsets. ``kept``: the channels read; ``zeroed`` (bool over
    ``kept``, only for ``groups == 1`` and depthwise): channels read with a zeroed weight (a
    count snapped up to a faster kernel size; the masked input reads as zero). ``held``
    (``groups == 1`` and depthwise): the channels the input holds (``None``: all);
    ``out_idx`` (``groups == 1``): the output channels to compute (``None``: all)."""
    w, b, groups = conv.weight, conv.bias, conv.groups
    c_in, c_out = conv.in_channels, conv.out_channels
    cg, og = c_in // groups, c_out // groups
    rows = prefix_length(out_idx) if groups == 1 else None
    if rows is not None:  # the first rows: a view
        w = gatherable_weight(conv)[:rows]
        b = b[:rows] if b is not None else None
    elif out_idx is not None:  # rows gathered first: columns then come from the smaller copy
        w = gatherable_weight(conv).index_select(0, out_idx.to(w.device))
        b = b.index_select(0, out_idx.to(b.device)) if b is not None else None
    source = w if out_idx is not None else None  # where kept columns are gathered from

    def columns(idx: torch.Tensor) -> torch.Tensor:
        cols = prefix_length(idx)
        if (
            cols is not None
            and (out_idx is None or rows is not None)
            and not torch.is_grad_enabled()
        ):
            return prefix_block(conv, rows if rows is not None else c_out, cols)
        return gather_in_channels(source if source is not None else gatherable_weight(conv), idx)

    if held is not None and groups > 1:  # depthwise: the kept channels' outputs only
        kept = kept if kept is not None else held  # (kept is within held)
        pos = None if len(kept) == len(held) else torch.searchsorted(held, kept)
        out_idx = depthwise_rows(kept, og)
        bias = b.index_select(0, out_idx) if b is not None else None
        return [ChannelPart(pos, w.index_select(0, out_idx), bias, out_idx, len(kept))]
    if held is not None:  # groups == 1: read the kept channels at their positions in x
        kept = kept if kept is not None else torch.arange(c_in)
        weight = columns(kept) if len(kept) < c_in else w
        pos = None if len(kept) == len(held) else torch.searchsorted(held, kept)
        return [ChannelPart(pos, weight, b, None, 1)]
    if m_c is None or (zeroed is None and len(kept) == c_in):
        return [ChannelPart(None, w, b, None, groups)]
    full = len(kept) == c_in
    if groups == 1:
        weight = w if full else columns(kept)
        if zeroed is not None:
            weight = weight * (~zeroed).to(w.dtype).view(1, -1, 1, 1, 1)
        return [ChannelPart(None if full else kept, weight, b, None, 1)]
    if cg == 1:  # depthwise: the kept channels' outputs only
        out_idx = depthwise_rows(kept, og)
        bias = b.index_select(0, out_idx) if b is not None else None
        weight = w.index_select(0, out_idx)
        if zeroed is not None:
            keep_rows = (~zeroed).repeat_interleave(og).to(w.dtype)
            weight = weight * keep_rows.view(-1, 1, 1, 1, 1)
        if full:
            return [ChannelPart(None, weight, bias, None, groups)]
        return [ChannelPart(kept, weight, bias, out_idx, len(kept))]
    per_group = m_c.view(groups, cg)
    counts = per_group.sum(1)
    parts = []
    wg = w.view(groups, og, cg, *w.shape[2:])
    for count in sorted(set(counts.tolist()) - {0}):
        sel = (counts == count).nonzero().flatten()  # groups with `count` kept channels
        local = per_group[sel].nonzero()[:, 1].view(len(sel), count)  # kept, per group
        in_idx = (sel[:, None] * cg + local).flatten()
        if count == cg:
            weight = wg[sel]
        else:
            gather = local[:, None, :, None, None, None].expand(-1, og, -1, *w.shape[2:])
            weight = wg[sel].gather(2, gather)
        out_idx = (sel[:, None] * og + torch.arange(og, device=sel.device)).flatten()
        bias = b[out_idx] if b is not None else None
        weight = weight.reshape(len(sel) * og, count, *w.shape[2:])
        if len(sel) == groups and count == cg:
            return [ChannelPart(None, w, b, None, groups)]
        parts.append(ChannelPart(in_idx, weight, bias, out_idx, len(sel)))
    return parts


def forget_recurring_blocks(model: nn.Module) -> None:
    """Drop the blocks :func:`recurring_block` keeps for the convs of ``model``: the next clip
    gathers its kept weights as a clip with new channel sets does (what a measurement of one
    clip should charge unless it measures a stream, see
    :func:`lightning_dance.bytes.measure_traffic`)."""
    from lightning_dance.execution.folding import folded_stand_in  # folding reads no weights

    for module in model.modules():
        _recurring.pop(module, None)
        stand_in = folded_stand_in(module)  # a conv with its BatchNorm folded keeps its own
        if stand_in is not None:
            _recurring.pop(stand_in, None)
