"""Channels-last activations of the compact path: kept inputs gathered, outputs placed.

:func:`gather_kept` reads the kept channels / frames of a ``channels_last_3d`` input,
:func:`bias_filled` makes an output holding the bias (what skipped positions hold) and
:func:`place_channels` scatters a computed subset of output channels into it.

Example:
    >>> import torch
    >>> out = bias_filled((1, 3, 1, 2, 2), torch.tensor([1.0, 2.0, 3.0]), torch.empty(0))
    >>> place_channels(out, torch.tensor([1]), torch.zeros(1, 1, 1, 2, 2))
    >>> out[0, :, 0, 0, 0].tolist()
    [1.0, 0.0, 3.0]
"""

from __future__ import annotations

import torch

from lightning_dance.execution.kernels import take_columns, to_fast_layout

__all__ = ["bias_filled", "gather_kept", "place_channels"]

_CL = torch.channels_last_3d


def gather_kept(x: torch.Tensor, frames: torch.Tensor | None, chans: torch.Tensor | None):
    """``x[:, chans][:, :, frames]`` for a ``channels_last_3d`` x, staying ``channels_last_3d``."""
    if frames is None and chans is None:
        return x
    n, c, t, h, w = x.shape
    xp = x.permute(0, 2, 3, 4, 1)  # contiguous [N, T, H, W, C]
    if frames is not None:
        xp = xp.reshape(n, t, h * w * c).index_select(1, frames.to(x.device))
        t = len(frames)
    if chans is not None:
        xp = take_columns(xp.reshape(-1, c), chans.to(x.device))
        c = len(chans)
    return xp.reshape(n, t, h, w, c).permute(0, 4, 1, 2, 3)


def bias_filled(shape: tuple[int, ...], bias: torch.Tensor | None, like: torch.Tensor):
    """A ``channels_last_3d`` tensor of ``shape`` (``like``'s dtype, device) filled with bias."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_CL)
    if bias is None:
        return out.zero_()
    return out.copy_(bias.to(like.dtype).view(1, -1, 1, 1, 1).expand(shape))


def place_channels(out: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> None:
    """``out[:, idx] = y`` for a ``channels_last_3d`` ``out`` (one scatter over its pixel rows)."""
    y = to_fast_layout(y)
    flat = out.permute(0, 2, 3, 4, 1).view(-1, out.shape[1])  # [pixels, C_out]
    y2 = y.permute(0, 2, 3, 4, 1).view(-1, y.shape[1])
    flat.scatter_(1, idx.to(y.device).expand(y2.shape[0], -1), y2)
