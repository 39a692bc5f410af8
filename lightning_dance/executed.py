"""Executed and expected MACs of a masked Conv3d: what the fast execution path computes.

Executed counts (:func:`conv3d_executed_macs`, :func:`conv3d_executed_macs_batch`) give what the
fast execution path computes for a Conv3d whose *input* is masked per sample along frames
``m_t[T]``, channels ``m_c[C]`` and features ``m_f[H, W]``:

    executed = (C_out / groups) * kept_channels * kh * kw * pairs_t * active_hw

- ``kept_channels``: kept input channels (all ``C_in`` if channels are not masked). Each output
  channel of a group reads that group's kept channels; summed over groups this is
  ``C_out/groups * kept``.
- ``pairs_t``: frames masked: the number of (output frame ``t'``, temporal tap ``k``) pairs whose
  input frame ``t = t'*s - pad + k*d`` lies inside the clip (for ``padding_mode='zeros'``) and is
  kept. The fast path skips zero-padding taps, so an all-kept frame mask counts *less* than the
  dense conv when the temporal padding is non-zero. Frames not masked: ``T_out * kT`` (padding
  taps included, as fvcore). Non-zero padding modes (reflect, replicate, circular) read a real,
  possibly masked, frame in the padding: its mask decides.
- ``active_hw``: features masked: the output positions whose spatial receptive field (stride,
  dilation, padding) holds at least one kept input position; each costs all ``kh*kw`` taps. The
  other positions equal ``conv(0) = bias`` and are filled. Features not masked: ``H_out*W_out``.
  With ``feature_at_output=True`` (:data:`lightning_dance.feature_sites.OUTPUTS`) the feature
  mask is ``[H_out, W_out]`` and ``active_hw`` is its number of kept positions.

:func:`conv3d_mac_factors` splits the executed/dense ratio into its three factors.
:func:`conv3d_expected_macs` is the differentiable expectation of that count under independent
Bernoulli keep decisions (exact for the channel and frame terms, and for the feature term when
block probabilities are given); it equals the hard count at 0/1 probabilities.
The memory traffic of the same layer is :mod:`lightning_dance.traffic`; dense counts of whole
models are :mod:`lightning_dance.macs`. docs/accounting.md has the details and the cross-checks.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(4, 8, 3, padding=1)
    >>> conv3d_executed_macs(conv, (4, 2, 4, 4))  # dense: 8*4*27*2*4*4
    27648
    >>> conv3d_executed_macs(conv, (4, 2, 4, 4), channel=torch.tensor([1, 1, 0, 0]))
    13824
    >>> conv3d_executed_macs(conv, (4, 2, 4, 4), frame=torch.ones(2))  # padding taps skipped
    18432
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.geometry import ConvGeometry, pad_hw, temporal_reads
from lightning_dance.masks import DIMS, expand_blocks

__all__ = [
    "HardTerms",
    "common_batch_size",
    "conv3d_executed_macs",
    "conv3d_executed_macs_batch",
    "conv3d_expected_macs",
    "conv3d_mac_factors",
    "mask_terms",
]


def _check_mask(
    name: str, mask: torch.Tensor | None, size: tuple[int, ...], what: str
) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"the {name} mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() == len(size):  # one sample
        mask = mask.unsqueeze(0)
    if mask.dim() != len(size) + 1 or tuple(mask.shape[1:]) != size:
        raise ValueError(
            f"the {name} mask must be [N, {what}] = [N, {', '.join(map(str, size))}] "
            f"(or one sample's [{what}]) for this layer, got shape {tuple(mask.shape)}"
        )
    return mask


def common_batch_size(masks: list[torch.Tensor | None], batch_size: int | None) -> int:
    """The batch size ``N`` the masks (``[N, ...]``, None: unmasked) and ``batch_size`` agree on."""
    sizes = {m.shape[0] for m in masks if m is not None}
    if batch_size is not None:
        sizes.add(int(batch_size))
    if len(sizes) > 1:
        raise ValueError(f"masks disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def _device(masks: list[torch.Tensor | None]) -> torch.device:
    return next((m.device for m in masks if m is not None), torch.device("cpu"))


@dataclass
class HardTerms:
    """Per-sample counts (``[N]`` int64 each) that executed MACs and memory traffic are built of."""

    kept_channels: torch.Tensor  # [N] int64
    kept_frames: torch.Tensor  # [N] int64
    kept_positions: torch.Tensor  # [N] int64
    temporal_pairs: torch.Tensor  # [N] int64: computed (t', k) pairs
    taps_used: torch.Tensor  # [N] int64: temporal taps with >= 1 computed pair
    active_positions: torch.Tensor  # [N] int64: computed output (h', w')
    out_channels: torch.Tensor  # [N] int64: output channels computed (groups with kept inputs)


def _hard_terms(
    g: ConvGeometry,
    frame: torch.Tensor | None,
    channel: torch.Tensor | None,
    feature: torch.Tensor | None,
    n: int,
    device: torch.device,
    feature_at_output: bool = False,
) -> HardTerms:
    c, t, h, w = g.input
    t_out, h_out, w_out = g.output
    kt = g.kernel[0]

    def full(value: int) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.int64, device=device)

    if channel is not None:
        m_c = channel.detach() > 0.5
        kept_c = m_c.sum(1)
        groups_on = m_c.view(n, g.groups, c // g.groups).any(2).sum(1)
        out_c = groups_on * (g.out_channels // g.groups)
    else:
        kept_c, out_c = full(c), full(g.out_channels)
    if frame is not None:
        m_t = (frame.detach() > 0.5).to(torch.float64)
        reads = temporal_reads(g, device)  # [kT, T]
        per_tap = m_t @ reads.T  # [N, kT]: computed pairs per tap
        pairs = per_tap.sum(1).round().long()
        taps = (per_tap > 0).sum(1)
        kept_t = m_t.sum(1).round().long()
    else:
        pairs, taps, kept_t = full(t_out * kt), full(kt), full(t)
    if feature is not None and feature_at_output:  # the mask is the computed positions
        act = (feature.detach() > 0.5).flatten(1).sum(1)
        kept_p = full(h * w)  # the kept outputs' fields: read in full
    elif feature is not None:
        m_f = (feature.detach() > 0.5).to(torch.float32).unsqueeze(1)  # [N, 1, H, W]
        active = F.max_pool2d(
            pad_hw(m_f, g), g.kernel[1:], stride=g.stride[1:], dilation=g.dilation[1:]
        )
        act = active.sum((1, 2, 3)).round().long()
        kept_p = m_f.sum((1, 2, 3)).round().long()
    else:
        act, kept_p = full(h_out * w_out), full(h * w)
    return HardTerms(kept_c, kept_t, kept_p, pairs, taps, act, out_c)


def mask_terms(
    conv: nn.Conv3d,
    input_shape: tuple[int, ...],
    frame: torch.Tensor | None,
    channel: torch.Tensor | None,
    feature: torch.Tensor | None,
    batch_size: int | None = None,
    feature_at_output: bool = False,
) -> tuple[ConvGeometry, HardTerms, set[str]]:
    """Validate the layer, its input shape and masks; the hard terms and the masked dims.
    ``feature_at_output``: ``feature`` selects output positions ``[N, H_out, W_out]``
    (:data:`lightning_dance.feature_sites.OUTPUTS`) instead of masking input positions."""
    g = ConvGeometry.of(conv, input_shape)
    c, t, h, w = g.input
    frame = _check_mask("frame", frame, (t,), "T")
    channel = _check_mask("channel", channel, (c,), "C")
    if feature_at_output:
        feature = _check_mask("output feature", feature, g.output[1:], "H_out, W_out")
    else:
        feature = _check_mask("feature", feature, (h, w), "H, W")
    masks = [frame, channel, feature]
    n = common_batch_size(masks, batch_size)
    terms = _hard_terms(g, frame, channel, feature, n, _device(masks), feature_at_output)
    return g, terms, {d for d, m in zip(DIMS, masks, strict=True) if m is not None}


def conv3d_executed_macs_batch(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
    batch_size: int | None = None,
    feature_at_output: bool = False,
) -> torch.Tensor:
    """Executed MACs ``[N]`` (int64) of ``conv`` for each sample's input masks.

    Args:
        conv: the layer.
        input_shape: one sample's input ``(C, T, H, W)``.
        frame, channel, feature: 0/1 masks ``[N, T]``, ``[N, C]``, ``[N, H, W]`` (entries > 0.5
            count as kept), or ``None`` where the dim is not masked for this layer. Straight-
            through masks are fine (they are detached).
        batch_size: ``N`` when all masks are ``None`` (default 1).
        feature_at_output: ``feature`` is ``[N, H_out, W_out]`` and selects the output
            positions to compute (:data:`lightning_dance.feature_sites.OUTPUTS`): each kept
            one costs all ``kh * kw`` taps, the others nothing.

    Vectorized (a matmul for frames, a max-pool for features): cheap enough for every forward.
    """
    g, terms, _ = mask_terms(conv, input_shape, frame, channel, feature, batch_size,
                             feature_at_output)  # fmt: skip
    per_out = (g.out_channels // g.groups) * g.kernel[1] * g.kernel[2]
    return per_out * terms.kept_channels * terms.temporal_pairs * terms.active_positions


def conv3d_executed_macs(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
) -> int:
    """Executed MACs of ``conv`` for ONE sample: masks ``[T]``, ``[C]``, ``[H, W]`` or None.

    See the module docstring for what the fast path computes; with every mask ``None`` this is
    the dense (fvcore) count.
    """
    for name, mask in (("frame", frame), ("channel", channel), ("feature", feature)):
        if mask is not None and mask.dim() != (2 if name == "feature" else 1):
            raise ValueError(
                f"conv3d_executed_macs counts one sample: the {name} mask must be "
                f"{'[H, W]' if name == 'feature' else '[T]' if name == 'frame' else '[C]'}, "
                f"got shape {tuple(mask.shape)} (use conv3d_executed_macs_batch for [N, ...])"
            )
    out = conv3d_executed_macs_batch(conv, input_shape, frame=frame, channel=channel,
                                     feature=feature)  # fmt: skip
    return int(out[0])


def conv3d_mac_factors(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
    feature: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The executed/dense MAC ratio of ``conv`` split by dim: ``{dim: [N] float64}``.

    ``channel``: kept channels / ``C_in``; ``frame``: computed (output frame, tap) pairs /
    ``T_out * kT`` (below the kept-frame fraction when padding taps are skipped); ``feature``:
    computed output positions / ``H_out * W_out`` (above the kept-position fraction: a field
    touching one kept position is computed). Their product times the dense MACs is
    :func:`conv3d_executed_macs_batch`. Masks as there; an unmasked dim gives 1.

    Example:
        >>> import torch, torch.nn as nn
        >>> f = conv3d_mac_factors(nn.Conv3d(4, 8, 3, padding=1), (4, 2, 4, 4),
        ...                        frame=torch.ones(2), channel=torch.tensor([1., 1, 1, 0]))
        >>> {k: round(float(v), 4) for k, v in f.items()}
        {'frame': 0.6667, 'channel': 0.75, 'feature': 1.0}
    """
    g, terms, _ = mask_terms(conv, input_shape, frame, channel, feature, batch_size)
    t_out, h_out, w_out = g.output
    return {
        "frame": terms.temporal_pairs.double() / (t_out * g.kernel[0]),
        "channel": terms.kept_channels.double() / g.in_channels,
        "feature": terms.active_positions.double() / (h_out * w_out),
    }


@functools.lru_cache(maxsize=256)
def _block_touch_cpu(g: ConvGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """``[L, B]`` 0/1: output position ``l``'s receptive field touches feature block ``b``."""
    _, _, h, w = g.input
    gh, gw = grid
    ids = torch.arange(gh * gw, dtype=torch.float64).view(1, 1, gh, gw)
    ids = F.interpolate(ids, size=(h, w), mode="nearest")  # as masks.expand_blocks
    ids = pad_hw(ids, g, zero_value=-1.0)
    cols = F.unfold(ids, g.kernel[1:], dilation=g.dilation[1:], stride=g.stride[1:])[0]
    cols = cols.round().long().T  # [L, kh*kw] block ids (-1 = zero padding)
    touch = torch.zeros(cols.shape[0], gh * gw + 1, dtype=torch.float64)
    touch.scatter_(1, torch.where(cols < 0, gh * gw, cols), 1.0)
    return touch[:, : gh * gw]


def _expected_active(
    g: ConvGeometry, feature_p: torch.Tensor | None, blocks_p: torch.Tensor | None, n: int
) -> torch.Tensor:
    h_out, w_out = g.output[1:]
    if feature_p is not None:  # positions independent: 1 - prod over the field of (1 - p)
        p = pad_hw(feature_p.to(torch.float64).unsqueeze(1), g)
        cols = F.unfold(p, g.kernel[1:], dilation=g.dilation[1:], stride=g.stride[1:])
        return (1 - torch.prod(1 - cols, dim=1)).sum(1)
    if blocks_p is not None:  # one independent gate per block: exact for block masks
        touch = _block_touch_cpu(g, tuple(blocks_p.shape[1:])).to(blocks_p.device)
        log_q = torch.log(torch.clamp(1 - blocks_p.to(torch.float64).flatten(1), min=1e-30))
        return (1 - torch.exp(log_q @ touch.T)).sum(1)
    return torch.full((n,), float(h_out * w_out), dtype=torch.float64)


def _expected_outputs(
    g: ConvGeometry, feature_p: torch.Tensor | None, blocks_p: torch.Tensor | None, n: int
) -> torch.Tensor:
    """Expected computed output positions when the feature mask selects outputs."""
    h_out, w_out = g.output[1:]
    if feature_p is not None:
        return feature_p.to(torch.float64).flatten(1).sum(1)
    if blocks_p is not None:
        return expand_blocks(blocks_p.to(torch.float64), (h_out, w_out)).flatten(1).sum(1)
    return torch.full((n,), float(h_out * w_out), dtype=torch.float64)


def conv3d_expected_macs(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    frame_p: torch.Tensor | None = None,
    channel_p: torch.Tensor | None = None,
    feature_p: torch.Tensor | None = None,
    feature_blocks_p: torch.Tensor | None = None,
    batch_size: int | None = None,
    feature_at_output: bool = False,
) -> torch.Tensor:
    """Differentiable expected executed MACs ``[N]`` (float64) from keep probabilities.

    Keep decisions are taken as independent Bernoulli draws, independent across dims. Then:

    - channels: ``C_out/groups * sum(p_c)`` (exact);
    - frames: ``sum_t p_t * reads[t]`` with ``reads[t]`` the (t', k) pairs reading frame t (exact);
    - features from ``feature_p [N, H, W]`` (positions independent): each output position is
      computed with probability ``1 - prod_{field}(1 - p)``. When the feature mask is constant
      over spatial blocks (the controller's case), positions in a block are *not* independent
      and this overestimates; pass ``feature_blocks_p [N, gh, gw]`` (the block probabilities,
      expanded to ``H x W`` like :func:`lightning_dance.masks.expand_blocks`) instead: the
      probability is then ``1 - prod`` over the distinct blocks the field touches (exact).

    ``feature_at_output``: the feature probabilities are over output positions
    (``[N, H_out, W_out]``, or blocks of them): the expected count of computed positions is
    their sum (exact).

    It equals :func:`conv3d_executed_macs_batch` when probabilities are exactly 0/1 and has
    non-zero gradients for probabilities strictly inside (0, 1) that can change the count.
    """
    if feature_p is not None and feature_blocks_p is not None:
        raise ValueError("pass feature_p (per position) or feature_blocks_p (per block), not both")
    g = ConvGeometry.of(conv, input_shape)
    c, t, h, w = g.input
    if feature_at_output:  # checked against the output's positions
        h, w = g.output[1:]
    frame_p = _check_mask("frame probability", frame_p, (t,), "T")
    channel_p = _check_mask("channel probability", channel_p, (c,), "C")
    feature_p = _check_mask("feature probability", feature_p, (h, w), "H, W")
    if feature_blocks_p is not None:
        if feature_blocks_p.dim() != 3:
            raise ValueError(
                "feature_blocks_p must be [N, gh, gw] block probabilities, got shape "
                f"{tuple(feature_blocks_p.shape)}"
            )
        if feature_blocks_p.shape[1] > h or feature_blocks_p.shape[2] > w:
            raise ValueError(
                f"a block grid {tuple(feature_blocks_p.shape[1:])} is finer than the layer's "
                f"input ({h}, {w})"
            )
    masks = [frame_p, channel_p, feature_p, feature_blocks_p]
    n = common_batch_size(masks, batch_size)
    device = _device(masks)
    t_out, h_out, w_out = g.output
    if channel_p is not None:
        chans = channel_p.to(torch.float64).sum(1)
    else:
        chans = torch.full((n,), float(c), dtype=torch.float64, device=device)
    if frame_p is not None:
        pairs = frame_p.to(torch.float64) @ temporal_reads(g, device).sum(0)
    else:
        pairs = torch.full((n,), float(t_out * g.kernel[0]), dtype=torch.float64, device=device)
    if feature_at_output:
        active = _expected_outputs(g, feature_p, feature_blocks_p, n).to(device)
    else:
        active = _expected_active(g, feature_p, feature_blocks_p, n).to(device)
    per_out = (g.out_channels // g.groups) * g.kernel[1] * g.kernel[2]
    return per_out * chans * pairs * active
