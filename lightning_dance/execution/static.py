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

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.macs import ConvGeometry

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
) -> torch.Tensor:
    """``conv`` applied to ``x [N, C, T, H, W]`` keeping, per sample, the input channels
    ``channel_idx [N, k_c]`` and the frames ``frame_idx [N, k_t]`` (int64, distinct per row).

    Equals ``conv(apply_masks(x, masks))`` with the corresponding 0/1 masks (see the module
    docstring for what is computed). Traceable and exportable (static shapes).
    """
    if x.dim() != 5:
        raise ValueError(f"a Conv3d input must be [N, C, T, H, W], got {tuple(x.shape)}")
    _supported(conv, channel_idx is not None)
    g, pad = _pad(conv, tuple(x.shape[1:]))
    n, c, t, h, w = x.shape
    weight, bias = conv.weight, conv.bias
    c_out = conv.out_channels
    depthwise = conv.groups == conv.in_channels and conv.groups > 1
    out_idx = None  # depthwise + channels: the output channels computed, [N, k_c * mult]

    if frame_idx is not None:
        kt_ = frame_idx.shape[1]
        x = x.gather(2, frame_idx.view(n, 1, kt_, 1, 1).expand(n, x.shape[1], kt_, h, w))
    if channel_idx is not None:
        kc = channel_idx.shape[1]
        x = x.gather(1, channel_idx.view(n, kc, 1, 1, 1).expand(n, kc, *x.shape[2:]))
        if depthwise:
            mult = c_out // conv.in_channels
            out_idx = (channel_idx.unsqueeze(2) * mult + torch.arange(mult)).reshape(n, -1)
            w_n = weight[out_idx.reshape(-1)]  # [N * kc * mult, 1, kT, kh, kw]
            groups = n * kc
        else:
            k_shape = weight.shape[2:]
            sel = channel_idx.view(n, 1, kc, 1, 1, 1).expand(n, c_out, kc, *k_shape)
            w_n = weight.unsqueeze(0).expand(n, *weight.shape).gather(2, sel)
            w_n = w_n.reshape(n * c_out, kc, *k_shape)
            groups = n
    else:
        w_n = weight.repeat(n, 1, 1, 1, 1) if n > 1 else weight
        groups = conv.groups * n
    per_sample_out = out_idx.shape[1] if out_idx is not None else c_out
    b_n = None
    if bias is not None:
        b_n = bias[out_idx.reshape(-1)] if out_idx is not None else bias.repeat(n)
    xb = x.reshape(1, -1, *x.shape[2:])  # samples side by side: one grouped conv

    if frame_idx is None:
        y = F.conv3d(xb, w_n, b_n, conv.stride, pad, conv.dilation, groups)
        y = y.view(n, per_sample_out, *y.shape[2:])
    else:
        y = _static_frames(conv, g, xb, w_n, b_n, groups, frame_idx, n, per_sample_out)
    if out_idx is None:
        return y
    full = bias.view(1, -1, 1, 1, 1).expand(n, c_out, *y.shape[2:]) if bias is not None else None
    base = full.clone() if full is not None else y.new_zeros((n, c_out, *y.shape[2:]))
    index = out_idx.view(n, -1, 1, 1, 1).expand(-1, -1, *y.shape[2:])
    return base.scatter(1, index, y)


def _static_frames(conv, g, xb, w_n, b_n, groups, frame_idx, n, per_sample_out):
    """Temporal-tap decomposition over the ``k_t`` gathered frames, scattered to output frames."""
    kT, st, dt = g.kernel[0], g.stride[0], g.dilation[0]
    pt = g.pad_lo[0]
    t_out = g.output[0]
    kt_ = frame_idx.shape[1]
    spatial_pad = (0, g.pad_lo[1], g.pad_lo[2])
    stride = (1, conv.stride[1], conv.stride[2])
    dil = (1, conv.dilation[1], conv.dilation[2])
    out = None
    for k in range(kT):
        wk = w_n[:, :, k : k + 1]
        yk = F.conv3d(xb, wk, None, stride, spatial_pad, dil, groups)
        yk = yk.view(n, per_sample_out, kt_, *yk.shape[3:])
        num = frame_idx + pt - k * dt  # = t' * st for a valid pair
        valid = (num >= 0) & (num % st == 0) & (num // st < t_out)
        dst = torch.where(valid, num // st, torch.zeros_like(num))
        yk = yk * valid.view(n, 1, kt_, 1, 1).to(yk.dtype)
        index = dst.view(n, 1, kt_, 1, 1).expand_as(yk)
        if out is None:
            out = yk.new_zeros((n, per_sample_out, t_out, *yk.shape[3:]))
        out = out.scatter_add(2, index, yk)
    if b_n is not None:
        out = out + b_n.view(n, per_sample_out, 1, 1, 1)
    return out


def static_executed_macs(
    conv: nn.Conv3d,
    input_shape: tuple[int, int, int, int],
    *,
    k_channel: int | None = None,
    k_frame: int | None = None,
) -> int:
    """MACs per sample that :func:`static_topk_conv3d` computes (fvcore convention)."""
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
    if k_frame is None:
        planes = t_out * kt
    else:
        planes = k_frame * kt
    return outs * reads * kh * kw * planes * h_out * w_out


class StaticTopKConv3d(nn.Module):
    """A Conv3d that keeps the ``k`` highest-scoring input channels / frames per sample.

    ``forward(x, channel_scores=None, frame_scores=None)``: scores ``[N, C]`` / ``[N, T]``;
    the top ``k_channel`` / ``k_frame`` are kept (sorted indices), and the rest of the work is
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
            c_idx = channel_scores.topk(self.k_channel, dim=1).indices.sort(dim=1).values
        if self.k_frame is not None:
            if frame_scores is None:
                raise ValueError("k_frame is set: pass frame_scores [N, T]")
            f_idx = frame_scores.topk(self.k_frame, dim=1).indices.sort(dim=1).values
        return static_topk_conv3d(self.conv, x, channel_idx=c_idx, frame_idx=f_idx)
