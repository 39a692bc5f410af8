"""Output tiles: the kept blocks of an output feature mask, computed as one batch per tile size.

When feature masks select a layer's *outputs* (:data:`lightning_dance.feature_sites.OUTPUTS`),
each kept block of the ``gh x gw`` grid is a tile of output positions. Its input is a crop of
the (explicitly padded) input with the conv's halo. Tiles of one size are gathered into a batch
with one indexing op (:func:`take_tiles`), convolved in one call, and written back with one
``index_put_`` (:func:`put_tiles`): three ops per tile size and layer, however many blocks are
kept. Blocks come from :func:`lightning_dance.masks.expand_blocks` (nearest: output row ``r``
is in block row ``floor(r * gh / H)``), so a grid that does not divide the output has at most
two block heights and two block widths: at most four tile sizes.

Example:
    >>> import torch, torch.nn as nn
    >>> from lightning_dance.geometry import cached_geometry
    >>> g = cached_geometry(nn.Conv3d(1, 1, (1, 3, 3), padding=(0, 1, 1)), (1, 1, 8, 8))
    >>> m = torch.zeros(8, 8, dtype=torch.bool); m[:4, :4] = m[4:, 4:] = True
    >>> [tuple(t.out_rows.shape) for t in output_tiles(g, m, (2, 2))]
    [(2, 4)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_dance.geometry import ConvGeometry
from lightning_dance.masks import expand_blocks

__all__ = ["TileGroup", "check_grid", "output_tiles", "put_tiles", "take_tiles"]


@dataclass(frozen=True)
class TileGroup:
    """Kept tiles of one size: output rows ``[nb, bh]`` / columns ``[nb, bw]`` and the padded
    input's rows ``[nb, th]`` / columns ``[nb, tw]`` they read (halo included)."""

    out_rows: torch.Tensor
    out_cols: torch.Tensor
    in_rows: torch.Tensor
    in_cols: torch.Tensor


def _bounds(size: int, blocks: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each block along one dim, as nearest interpolation assigns rows."""
    starts = [-(-i * size // blocks) for i in range(blocks + 1)]  # ceil(i * size / blocks)
    return list(zip(starts[:-1], starts[1:], strict=True))


def check_grid(feature: torch.Tensor | None, at_output: bool, grid: tuple[int, int] | None) -> None:
    """``feature_grid`` is for output masks, fits the output, and the mask is constant on its
    blocks (tiles read one position per block: anything else would be silently wrong)."""
    if grid is None:
        return
    if not at_output:
        raise ValueError("feature_grid describes output feature masks: pass feature_at_output=True")
    if feature is None:
        return
    h, w = feature.shape[-2:]
    gh, gw = (int(v) for v in grid)
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise ValueError(
            f"feature_grid {tuple(grid)} does not fit the output's ({h}, {w}) positions"
        )
    m = feature.detach() > 0.5
    rows = torch.tensor([r0 for r0, _ in _bounds(h, gh)])  # each block's first row / column
    cols = torch.tensor([c0 for c0, _ in _bounds(w, gw)])
    corners = m[:, rows.to(m.device)][:, :, cols.to(m.device)].to(torch.float32)
    if not torch.equal(expand_blocks(corners, (h, w)) > 0.5, m):
        raise ValueError(
            f"the feature mask is not constant on the blocks of feature_grid={tuple(grid)} "
            "(lightning_dance.masks.expand_blocks makes such masks): pass the grid it was "
            "expanded from, or feature_grid=None"
        )


_cache: dict[tuple, list[TileGroup]] = {}


def output_tiles(g: ConvGeometry, m_f: torch.Tensor, grid: tuple[int, int]) -> list[TileGroup]:
    """The kept tiles of ``m_f [H_out, W_out]`` (bool, constant on the blocks of ``grid``),
    grouped by size; cached per geometry, grid and mask."""
    key = (g, tuple(grid), m_f.numpy().tobytes())
    made = _cache.get(key)
    if made is not None:
        return made
    h_out, w_out = g.output[1:]
    sh, sw = g.stride[1:]
    reach_h = g.dilation[1] * (g.kernel[1] - 1)
    reach_w = g.dilation[2] * (g.kernel[2] - 1)
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for r0, r1 in _bounds(h_out, grid[0]):
        for c0, c1 in _bounds(w_out, grid[1]):
            if r1 > r0 and c1 > c0 and bool(m_f[r0, c0]):
                groups.setdefault((r1 - r0, c1 - c0), []).append((r0, r1, c0, c1))
    made = []
    for (bh, bw), tiles in groups.items():
        r0s = torch.tensor([t[0] for t in tiles]).view(-1, 1)
        c0s = torch.tensor([t[2] for t in tiles]).view(-1, 1)
        th, tw = (bh - 1) * sh + reach_h + 1, (bw - 1) * sw + reach_w + 1
        made.append(TileGroup(
            r0s + torch.arange(bh), c0s + torch.arange(bw),
            r0s * sh + torch.arange(th), c0s * sw + torch.arange(tw),
        ))  # fmt: skip
    if len(_cache) >= 4096:
        _cache.clear()
    _cache[key] = made
    return made


def take_tiles(x: torch.Tensor, tiles: TileGroup) -> torch.Tensor:
    """The tiles' inputs ``[N * nb, C, T, th, tw]`` (``channels_last_3d``) of a padded input
    ``x [N, C, T, H, W]`` (``channels_last_3d``): one gather."""
    n, c, t = x.shape[:3]
    nb, th = tiles.in_rows.shape
    tw = tiles.in_cols.shape[1]
    xl = x.permute(0, 2, 3, 4, 1)  # [N, T, H, W, C] (a view of channels_last_3d)
    dev = x.device
    ni = torch.arange(n, device=dev).view(n, 1, 1, 1, 1)
    ti = torch.arange(t, device=dev).view(1, 1, t, 1, 1)
    ri = tiles.in_rows.to(dev).view(1, nb, 1, th, 1)
    ci = tiles.in_cols.to(dev).view(1, nb, 1, 1, tw)
    got = xl[ni, ti, ri, ci]  # [N, nb, T, th, tw, C], contiguous
    return got.view(n * nb, t, th, tw, c).permute(0, 4, 1, 2, 3)


def put_tiles(
    out: torch.Tensor,
    y: torch.Tensor,
    tiles: TileGroup,
    frames: torch.Tensor | slice | None = None,
) -> None:
    """Write the tiles' outputs ``y [N * nb, C, T', bh, bw]`` into ``out [N, C, T, H, W]``
    (``channels_last_3d``): one ``index_put_``. ``frames``: the output frames ``y`` holds
    (``None``: all ``T``)."""
    n, c, t_all = out.shape[:3]
    t = y.shape[2]
    nb, bh = tiles.out_rows.shape
    bw = tiles.out_cols.shape[1]
    dev = out.device
    ol = out.permute(0, 2, 3, 4, 1)  # [N, T, H, W, C] view
    ni = torch.arange(n, device=dev).view(n, 1, 1, 1, 1)
    if frames is None:
        ti = torch.arange(t_all, device=dev)
    elif isinstance(frames, slice):
        ti = torch.arange(t_all, device=dev)[frames]
    else:
        ti = frames.to(dev)
    ti = ti.view(1, 1, t, 1, 1)
    ri = tiles.out_rows.to(dev).view(1, nb, 1, bh, 1)
    ci = tiles.out_cols.to(dev).view(1, nb, 1, 1, bw)
    vals = y.permute(0, 2, 3, 4, 1).reshape(n, nb, t, bh, bw, c)
    ol.index_put_((ni, ti, ri, ci), vals)
