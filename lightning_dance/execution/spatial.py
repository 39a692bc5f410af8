"""Spatial rectangles: the active output positions of a feature mask, as disjoint rectangles.

An output position is active when its receptive field holds a kept input position (the MAC
counter's rule, :func:`active_outputs`); runs of active columns, merged over consecutive rows
with identical runs, give disjoint rectangles whose union is exactly the active set
(:func:`rects_cached`). The compact conv computes each rectangle over its input crop.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_dance.geometry import cached_geometry
    >>> g = cached_geometry(nn.Conv3d(1, 1, (1, 3, 3), padding=(0, 1, 1)), (1, 1, 6, 6))
    >>> m_f = torch.zeros(6, 6, dtype=torch.bool)
    >>> m_f[0, 0] = m_f[4, 4] = True
    >>> rects_cached(g, m_f.numpy().tobytes(), m_f)
    [(0, 2, 0, 2), (3, 6, 3, 6)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_dance.geometry import ConvGeometry, pad_hw

__all__ = ["active_outputs", "rects_cached"]


def _active_rects(active: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Disjoint rectangles ``(r0, r1, c0, c1)`` covering the True entries of ``[H, W]``."""
    rows = active.tolist()
    rects: list[tuple[int, int, int, int]] = []
    prev_runs: tuple = ()
    start = 0
    for r, row in enumerate([*rows, [False] * len(rows[0])]):
        runs, c = [], 0
        while c < len(row):
            if row[c]:
                c0 = c
                while c < len(row) and row[c]:
                    c += 1
                runs.append((c0, c))
            else:
                c += 1
        runs = tuple(runs)
        if runs != prev_runs:
            rects += [(start, r, c0, c1) for c0, c1 in prev_runs]
            prev_runs, start = runs, r
    return rects


_rect_cache: dict[tuple[ConvGeometry, bytes, bool], list[tuple[int, int, int, int]]] = {}


def rects_cached(
    g: ConvGeometry, key: bytes, m_f: torch.Tensor, at_outputs: bool = False
) -> list[tuple[int, int, int, int]]:
    """Rectangles of the active outputs for a feature mask (cached: block masks repeat).
    ``at_outputs``: ``m_f`` is ``[H_out, W_out]`` and is the active set itself."""
    rects = _rect_cache.get((g, key, at_outputs))
    if rects is None:
        if len(_rect_cache) >= 4096:
            _rect_cache.clear()
        active = m_f if at_outputs else active_outputs(g, m_f)
        rects = _rect_cache[(g, key, at_outputs)] = _active_rects(active)
    return rects


def active_outputs(g: ConvGeometry, m_f: torch.Tensor) -> torch.Tensor:
    """``[H_out, W_out]`` bool: receptive field holds a kept position (the MAC counter's rule)."""
    padded = pad_hw(m_f.to(torch.float32)[None, None], g)
    act = F.max_pool2d(padded, g.kernel[1:], stride=g.stride[1:], dilation=g.dilation[1:])
    return act[0, 0] > 0.5
