"""Pixelwise convs: the kept positions of a conv whose output ``(h, w)`` reads input ``(h, w)``.

A ``(kT, 1, 1)`` kernel without spatial stride or padding (R(2+1)D's temporal convs, 1x1x1
convs, and strided 1x1x1 shortcuts once
:func:`~lightning_dance.execution.reads.skip_unread` has cut their unread positions) has the
kept positions themselves as its active outputs, on either feature site. The compact conv
gathers them once into a ``[T, P, 1]`` map (:func:`pixel_map`), runs its frame and channel plan
on that map, and writes the results back once (:func:`place_pixels`), instead of one conv per
rectangle of the mask.

Example:
    >>> import torch
    >>> x = torch.arange(8.0).view(1, 1, 2, 2, 2)  # [N, C, T, H, W]
    >>> m_f = torch.tensor([[True, False], [False, True]])
    >>> xs, pix = pixel_map(x, m_f)
    >>> xs.shape, pix.tolist(), xs[0, 0, :, :, 0].tolist()
    (torch.Size([1, 1, 2, 2, 1]), [0, 3], [[0.0, 3.0], [4.0, 7.0]])
"""

from __future__ import annotations

import torch

from lightning_dance.execution.kernels import to_fast_layout
from lightning_dance.geometry import ConvGeometry

__all__ = ["pixel_map", "pixelwise", "place_pixels"]


def pixelwise(g: ConvGeometry) -> bool:
    """Whether output position ``(h, w)`` of ``g`` reads input position ``(h, w)`` only."""
    spatial_pad = any(g.pad_lo[1:] + g.pad_hi[1:])
    return g.kernel[1:] == (1, 1) and g.stride[1:] == (1, 1) and not spatial_pad


def pixel_map(x: torch.Tensor, m_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept positions (``m_f``, bool ``[H, W]``) of ``x`` ``[N, C, T, H, W]`` as a
    ``channels_last_3d`` ``[N, C, T, P, 1]`` map (one gather; straight from a strided view
    too), and their flat indices ``[P]``."""
    n, _, t, h, w = x.shape
    pix = m_f.reshape(-1).nonzero().flatten().to(x.device)
    xp = x.permute(0, 2, 3, 4, 1)  # [N, T, H, W, C]
    if xp.is_contiguous():
        xs = xp.reshape(n, t, h * w, -1).index_select(2, pix)
    else:
        xs = xp[:, :, pix // w, pix % w]
    return xs.view(n, t, len(pix), 1, -1).permute(0, 4, 1, 2, 3), pix


def place_pixels(out: torch.Tensor, pix: torch.Tensor, y: torch.Tensor) -> None:
    """``out[..., pix] = y`` for a ``channels_last_3d`` ``out`` ``[N, C, T, H, W]`` and the
    ``[N, C, T, P, 1]`` result of a pixel map (one ``index_copy_``)."""
    n, c, t, h, w = out.shape
    rows = to_fast_layout(y).permute(0, 2, 3, 4, 1).reshape(n, t, len(pix), c)
    out.permute(0, 2, 3, 4, 1).view(n, t, h * w, c).index_copy_(2, pix, rows)
