"""Memory traffic of a masked Conv3d: bytes moved, dense and executed (fast-path copies included).

:func:`conv3d_memory_traffic` models, for one Conv3d, the bytes a dense run and the fast
execution path move (input, weight, output, plus the gather and scatter copies of the fast
path); :class:`Traffic` holds the result and explains each term. The executed counts it builds
on are :mod:`lightning_dance.executed`; :class:`lightning_dance.energy.EnergyModel` turns MACs
and bytes into an energy estimate. docs/accounting.md has the details.

An ESTIMATE for when nothing runs (masks or training statistics only): for dense convs it
equals the bytes measured from the executed ops (:mod:`lightning_dance.bytes`), but the compact
path as implemented moves different bytes (channel chains skip outputs and gathers; weights
are sliced per call; padding and per-tap partials are materialized): quote
:func:`lightning_dance.bytes.compare_traffic` for an execution (docs/accounting.md, 4b).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from lightning_dance.executed import HardTerms, common_batch_size, mask_terms
from lightning_dance.geometry import ConvGeometry
from lightning_dance.masks import DIMS

__all__ = ["Traffic", "conv3d_memory_traffic"]


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
) -> HardTerms:
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
    return HardTerms(
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
        n = common_batch_size([*kept.values(), executed_macs.reshape(-1, 1)], batch_size)
        terms = _terms_from_kept(g, kept, executed_macs.reshape(n), n)
        masked = set(kept)
    else:
        if executed_macs is not None:
            raise ValueError("executed_macs goes with kept fractions; masks give them already")
        g, terms, masked = mask_terms(conv, input_shape, frame, channel, feature, batch_size)
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
