"""What a conv reads, settled before the compact plan is made.

- :func:`skip_unread`: a dim with kernel 1, stride ``s > 1`` and no padding reads every
  ``s``-th position only; those are taken first (a view), so nothing else is gathered.
- :func:`drop_full`: a mask that keeps everything is no mask (the plain conv runs), except
  where the count needs it: a frame mask of a conv whose taps read temporal padding.
- :func:`reads_input_everywhere`: whether every output reads some input position (then an
  all-kept feature mask is no mask either).

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_dance.geometry import cached_geometry
    >>> g = cached_geometry(nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0)), (2, 4, 8, 8))
    >>> drop_full(torch.ones(4, dtype=torch.bool)), drop_full(torch.ones(4, dtype=torch.bool), g)
    (None, tensor([True, True, True, True]))
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from lightning_dance.execution.spatial import active_outputs
from lightning_dance.geometry import ConvGeometry

__all__ = ["drop_full", "reads_input_everywhere", "skip_unread"]


def skip_unread(g: ConvGeometry, x: torch.Tensor, m_t, m_f):
    """A dim with kernel 1, stride ``s > 1`` and no padding reads every ``s``-th position only:
    take those first (a view), so gathers and the conv touch nothing else. Same outputs, same
    MACs; the conv then has stride 1 in that dim."""
    cut = [slice(None)] * 3
    stride, size = list(g.stride), list(g.input[1:])
    for i in range(3):
        if g.kernel[i] == 1 and g.stride[i] > 1 and g.pad_lo[i] == 0 and g.pad_hi[i] == 0:
            cut[i] = slice(0, (g.output[i] - 1) * g.stride[i] + 1, g.stride[i])
            stride[i], size[i] = 1, g.output[i]
    if size == list(g.input[1:]) and stride == list(g.stride):
        return g, x, m_t, m_f
    x = x[:, :, cut[0], cut[1], cut[2]]
    m_t = m_t[cut[0]] if m_t is not None else None
    m_f = m_f[cut[1], cut[2]] if m_f is not None else None
    g = dataclasses.replace(g, stride=tuple(stride), input=(g.input[0], *size))
    return g, x, m_t, m_f


def drop_full(mask: torch.Tensor | None, g: ConvGeometry | None = None) -> torch.Tensor | None:
    """``None`` for a mask that keeps everything: the plain conv computes exactly what it
    keeps, with no gather, crop or padding copy. A frame mask (``g`` given) of a conv whose
    taps read temporal padding stays: the count skips those taps, so the tap plan runs (a
    tuning may still choose the plain conv, ``KernelCosts.frames_pay``)."""
    if mask is None or not bool(mask.all()):
        return mask
    if g is not None and (g.pad_lo[0] or g.pad_hi[0]):
        return mask
    return None


@functools.lru_cache(maxsize=1024)
def reads_input_everywhere(g: ConvGeometry) -> bool:
    """Whether every output position's receptive field holds an input position (not only
    padding): then a feature mask that keeps everything leaves every output active, as the
    plain conv computes it."""
    return bool(active_outputs(g, torch.ones(g.input[2:], dtype=torch.bool)).all())
