"""Static-shape compact Conv3d for the ``topk`` policy: exportable with ``torch.jit.trace`` and
``torch.export``.

With a fixed keep-count per layer (``k_c`` channels, ``k_t`` frames per sample) every shape is
known ahead of time: inputs are gathered by index (``gather``), the weight is sliced per sample
(``gather``; a batch runs as one grouped conv with ``groups = N``), and outputs are scattered
back (``scatter`` / ``scatter_add``). No Python control flow depends on the data, so a trace or
an export keeps the savings.

What it computes, per sample (``C_out/groups`` outputs per group):

- channels, ``groups == 1``: ``C_out * k_c`` MACs per output position (exactly the MAC
  counter's figure). Depthwise (``groups == C_in``): only the ``k_c`` kept channels' outputs
  (``C_out/C_in * k_c`` per position), the others are the bias (exact). Other grouped convs
  are not supported (kept counts per group vary: use :func:`compact_conv3d`).
- frames, ``kT == 1``, temporal stride 1, no temporal padding: only the kept frames' output
  frames (exact; the others are the bias). Otherwise every (kept frame, tap) pair is computed,
  ``kT * k_t`` (1, kh, kw) planes per sample, and pairs that land on no output frame are
  multiplied by 0 before a ``scatter_add``: at most ``kT * k_t`` pairs, vs the
  counter's exact ``pairs_t`` (fewer at clip borders and for strided convs);
  :func:`static_executed_macs` gives this path's figure.
- features: not supported (a data-dependent region has no static shape).

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(8, 4, 3, padding=1)
    >>> x = torch.randn(2, 8, 4, 8, 8)
    >>> idx = torch.tensor([[0, 2, 5], [1, 2, 7]])
    >>> y = static_topk_conv3d(conv, x, channel_idx=idx)
    >>> y.shape
    torch.Size([2, 4, 4, 8, 8])
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.geometry import ConvGeometry

__all__ = ["StaticTopKConv3d", "mask_to_index", "static_executed_macs", "static_topk_conv3d"]


def mask_to_index(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices ``[N, k]`` of the kept entries of a ``topk`` mask ``[N, K]`` (k ones per row)."""
    return mask.topk(k, dim=1).indices.sort(dim=1).values


def _supported(conv: nn.Conv3d, channel: bool) -> None:
    if channel and conv.groups not in (1, conv.in_channels):
        raise NotImplementedError(
            f"static top-k channel selection supports groups=1 and depthwise convs, got "
            f"groups={conv.groups} of {conv.in_channels} channels; use compact_conv3d"
        )
    if conv.padding_mode != "zeros" and conv.padding not in (0, (0, 0, 0), "valid"):
        raise NotImplementedError(
            f"static top-k needs padding_mode='zeros' when padding, got {conv.padding_mode!r}"
        )


def _pad(conv: nn.Conv3d, shape: tuple[int, ...]) -> tuple[ConvGeometry, tuple[int, int, int]]:
    g = ConvGeometry.of(conv, shape)
    if g.pad_lo != g.pad_hi:
        raise NotImplementedError(f"static top-k needs symmetric padding, got {conv.padding!r}")
    return g, g.pad_lo


def static_topk_conv3d(
    conv: nn.Conv3d,
    x: torch.Tensor,
    *,
    channel_idx: torch.Tensor | None = None,
    frame_idx: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    input_gathered: bool = False,
) -> torch.Tensor:
    """``conv`` applied to ``x [N, C, T, H, W]`` keeping, per sample, the input channels
    ``channel_idx [N, k_c]`` and the frames ``frame_idx [N, k_t]`` (int64, distinct per row, any order).

    Equals ``conv(apply_masks(x, masks))`` with the corresponding 0/1 masks (see the module
    docstring for what is computed). Traceable and exportable (static shapes).

    Output skipping along a channel chain: ``out_idx [N, k_o]`` (``groups == 1``) computes only
    those output channels, in that order (``[N, k_o, ...]``: the weight rows and bias
    gathered); ``input_gathered=True`` (``groups == 1`` or depthwise) says ``x`` holds only the
    channels ``channel_idx``, in that order (``[N, k_c, ...]``, what a producer with
    ``out_idx = channel_idx`` returned), so only the weights are gathered.

    Only ops the Hexagon NPU (QNN HTP) runs are used: samples are unrolled (``N`` is static in
    an export), inputs and weights are selected with ``index_select`` (ONNX ``Gather``), and
    the (kept frame, tap) pairs are placed on output frames by a ``matmul`` with rows of a
    constant 0/1 matrix, not by integer arithmetic and ``scatter_add``.
    """
    if x.dim() != 5:
        raise ValueError(f"a Conv3d input must be [N, C, T, H, W], got {tuple(x.shape)}")
    _supported(conv, channel_idx is not None)
    if out_idx is not None and conv.groups != 1:
        raise NotImplementedError("out_idx needs a groups == 1 conv")
    if input_gathered and conv.groups not in (1, conv.in_channels):
        raise NotImplementedError("input_gathered needs a groups == 1 or depthwise conv")
    if input_gathered and (channel_idx is None or x.shape[1] != channel_idx.shape[1]):
        raise ValueError(
            "input_gathered=True needs channel_idx [N, k] and an input holding those k channels, "
            f"got x with {x.shape[1]} channels"
        )
    g, _ = _pad(conv, (conv.in_channels, *x.shape[2:]))
    outs = []
    for i in range(x.shape[0]):
        c_idx = channel_idx[i] if channel_idx is not None else None
        f_idx = frame_idx[i] if frame_idx is not None else None
        o_idx = out_idx[i] if out_idx is not None else None
        outs.append(_static_one(conv, g, x[i : i + 1], c_idx, f_idx, o_idx, input_gathered))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _static_one(
    conv: nn.Conv3d,
    g: ConvGeometry,
    x: torch.Tensor,
    c_idx: torch.Tensor | None,
    f_idx: torch.Tensor | None,
    o_idx: torch.Tensor | None = None,
    gathered: bool = False,
) -> torch.Tensor:
    """One sample ``x [1, C, T, H, W]``; ``c_idx [k_c]``, ``f_idx [k_t]``, ``o_idx [k_o]`` or
    None; ``gathered``: ``x`` holds only the channels ``c_idx``."""
    weight, bias, c_out = conv.weight, conv.bias, conv.out_channels
    groups = conv.groups
    depthwise = groups == conv.in_channels and groups > 1
    if o_idx is not None:  # groups == 1: only these outputs (weight rows first: fewer columns)
        # rows of a [C_out, C_in * k] view: the QNN HTP backend fails to finalize a Gather on
        # axis 0 of a 5D conv weight (QNN_COMMON_ERROR_MEM_ALLOC), not this one (same values)
        rows = weight.reshape(weight.shape[0], -1).index_select(0, o_idx)
        weight = rows.reshape(o_idx.shape[0], *weight.shape[1:])
        bias = bias.index_select(0, o_idx) if bias is not None else None
    if f_idx is not None:
        x = x.index_select(2, f_idx)
    if c_idx is not None:
        x = x if gathered else x.index_select(1, c_idx)
        if depthwise:  # the kept channels' outputs only: [k_c * mult, 1, kT, kh, kw]
            mult = c_out // conv.in_channels
            weight = weight.view(conv.in_channels, mult, *weight.shape[1:]).index_select(0, c_idx)
            weight = weight.flatten(0, 1)
            groups = c_idx.shape[0]
        else:
            weight = weight.index_select(1, c_idx)
    scatter = c_idx is not None and depthwise
    if f_idx is None:  # the bias inside the conv unless outputs are placed afterwards
        b = None if scatter else bias
        y = F.conv3d(x, weight, b, conv.stride, g.pad_lo, conv.dilation, groups)
    else:
        y = _static_frames(conv, g, x, weight, groups, f_idx)
    if scatter:  # back to all C_out channels (the others: bias only)
        full = y.new_zeros((1, conv.in_channels, mult * y.shape[2], *y.shape[3:]))
        index = c_idx.view(1, -1, 1, 1, 1).expand(1, -1, *full.shape[2:])
        y = full.scatter(1, index, y.reshape(1, -1, *full.shape[2:])).view(1, c_out, *y.shape[2:])
    if bias is not None and (scatter or f_idx is not None):
        y = y + bias.view(-1, 1, 1, 1)  # [C, 1, 1, 1]: the QNN HTP mis-adds a 5-d constant
    return y


@functools.lru_cache(maxsize=256)
def _tap_placement(
    frames: int, t_out: int, tap: int, pad: int, stride: int, dilation: int
) -> tuple[tuple[float, ...], ...]:
    """``[frames, t_out]`` 0/1: input frame ``t`` read through temporal tap ``tap`` lands on
    output frame ``t'`` iff ``t + pad - tap * dilation == t' * stride``."""
    rows = []
    for t in range(frames):
        num = t + pad - tap * dilation
        row = [0.0] * t_out
        if num >= 0 and num % stride == 0 and num // stride < t_out:
            row[num // stride] = 1.0
        rows.append(tuple(row))
    return tuple(rows)


def _static_frames(conv, g, x, weight, groups, f_idx):
    """Temporal-tap decomposition over the ``k_t`` gathered frames of one sample (no bias)."""
    k_t, t_out = f_idx.shape[0], g.output[0]
    spatial_pad = (0, g.pad_lo[1], g.pad_lo[2])
    stride = (1, conv.stride[1], conv.stride[2])
    dil = (1, conv.dilation[1], conv.dilation[2])
    out = None
    for k in range(g.kernel[0]):
        yk = F.conv3d(x, weight[:, :, k : k + 1], None, stride, spatial_pad, dil, groups)
        c, h, w = yk.shape[1], yk.shape[3], yk.shape[4]
        table = _tap_placement(g.input[1], t_out, k, g.pad_lo[0], g.stride[0], g.dilation[0])
        place = torch.tensor(table, dtype=yk.dtype, device=yk.device).index_select(0, f_idx)
        # [t_out, k_t] @ [C, k_t, H*W] -> [C, t_out, H*W]; pairs on no output frame get 0
        yk = (place.t() @ yk.reshape(c, k_t, h * w)).view(1, c, t_out, h, w)
        out = yk if out is None else out + yk
    return out


def static_executed_macs(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    k_channel: int | None = None,
    k_frame: int | None = None,
    k_out: int | None = None,
) -> int:
    """MACs per sample that :func:`static_topk_conv3d` computes (fvcore convention);
    ``k_out``: the output channels computed (``out_idx``; ``groups == 1``)."""
    g = ConvGeometry.of(conv, input_shape)
    c_in = g.in_channels
    kt, kh, kw = g.kernel
    t_out, h_out, w_out = g.output
    per_group_in = c_in // g.groups
    if k_channel is None:
        outs, reads = g.out_channels, per_group_in
    elif g.groups == 1:
        outs, reads = g.out_channels, k_channel
    else:  # depthwise
        outs, reads = g.out_channels // c_in * k_channel, 1
    if k_out is not None:
        outs = k_out
    if k_frame is None:
        planes = t_out * kt
    else:
        planes = k_frame * kt
    return outs * reads * kh * kw * planes * h_out * w_out


class StaticTopKConv3d(nn.Module):
    """A Conv3d that keeps the ``k`` highest-scoring input channels / frames per sample.

    ``forward(x, channel_scores=None, frame_scores=None)``: scores ``[N, C]`` / ``[N, T]``;
    the top ``k_channel`` / ``k_frame`` are kept (no sort: the order does not matter), and the rest of the work is
    skipped as in :func:`static_topk_conv3d`. Static shapes: ``torch.jit.trace`` /
    ``torch.export`` keep the savings.
    """

    def __init__(
        self, conv: nn.Conv3d, k_channel: int | None = None, k_frame: int | None = None
    ) -> None:
        super().__init__()
        if k_channel is not None and not 1 <= k_channel <= conv.in_channels:
            raise ValueError(f"k_channel must be in [1, {conv.in_channels}], got {k_channel}")
        if k_frame is not None and k_frame < 1:
            raise ValueError(f"k_frame must be >= 1, got {k_frame}")
        _supported(conv, k_channel is not None)
        self.conv, self.k_channel, self.k_frame = conv, k_channel, k_frame

    def forward(
        self,
        x: torch.Tensor,
        channel_scores: torch.Tensor | None = None,
        frame_scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c_idx = f_idx = None
        if self.k_channel is not None:
            if channel_scores is None:
                raise ValueError("k_channel is set: pass channel_scores [N, C]")
            c_idx = channel_scores.topk(self.k_channel, dim=1).indices
        if self.k_frame is not None:
            if frame_scores is None:
                raise ValueError("k_frame is set: pass frame_scores [N, T]")
            f_idx = frame_scores.topk(self.k_frame, dim=1).indices
        return static_topk_conv3d(self.conv, x, channel_idx=c_idx, frame_idx=f_idx)
