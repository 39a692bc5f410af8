"""The DATE'20 attention policy (AntiDote, seed 004), adapted to Conv3d: per clip and layer,
keep the channels and columns of the layer's *own input* that its attention ranks highest.

Unlike DANCE's controller, which scores every layer once from the stem output, this policy scores
each instrumented Conv3d from the tensor that layer reads, ``x [N, C, T, H, W]``, with
activation attention (mean magnitude, no parameters):

- channels: ``a_c = mean_{t,h,w} |x[c, t, h, w]|`` -> ``[N, C]``;
- spatial columns (the ``feature`` dim): ``a_{hw} = mean_{c,t} |x[c, t, h, w]|``, averaged over
  the pruner's spatial blocks (``grid x grid`` at most, the blocks
  :func:`~lightning_dance.masks.expand_blocks` tiles) -> ``[N, gh, gw]``;
- temporal columns (the ``frame`` dim): ``a_t = mean_{c,h,w} |x[c, t, h, w]|`` -> ``[N, T]``.

A 2D column, one position across all channels, becomes in 3D a column over ``(h, w)`` shared by
all frames plus a frame "column": the kept set stays a product of frames x channels x blocks,
the masks every runtime of this package executes (``docs/attention.md`` says why not per
``(t, h, w)``). As in the paper the lowest-ranked share is pruned at a fixed ratio per layer
(the ``topk`` counts: the keep ratio follows from the budget, and
:meth:`~lightning_dance.aap.AdaptivePruner.calibrate` scales it until the budget is met).

Training (``training=True``): *targeted dropout* (Gomez et al. 2019, the paper's training phase):
the entries outside the top-``k`` are the candidates and each is dropped with probability
``drop_rate``; the pruner's gate ``noise`` (annealed to 0 by
:class:`~lightning_dance.wrapper.DANCEWrapper`) moves that probability to 1, where training
decisions are the eval ones. Kept entries are not rescaled (the pruned network is not either).

Example:
    >>> import torch
    >>> policy = AttentionPolicy()
    >>> x = torch.zeros(1, 3, 2, 2, 2)
    >>> x[0, 0], x[0, 1], x[0, 2] = 1.0, -3.0, 2.0            # channel magnitudes 1, 3, 2
    >>> scores = policy.layer_scores(x, ("channel",), grid=4)
    >>> scores["channel"]
    tensor([[1., 3., 2.]])
    >>> policy.gate(scores["channel"], k=2, training=False)  # the two most attended channels
    tensor([[0., 1., 1.]])
    >>> policy.scoring_macs((3, 2, 2, 2), ("channel",), grid=4)  # one add per element + 2 x 3
    30
"""

from __future__ import annotations

import functools
import math

import torch

from lightning_dance.masks import DIMS, topk_gate
from lightning_dance.policies.base import Policy, register_policy

__all__ = ["AttentionPolicy", "block_matrix"]


@functools.lru_cache(maxsize=64)
def _block_matrix(size: int, blocks: int) -> tuple[tuple[float, ...], ...]:
    rows = [[0.0] * size for _ in range(blocks)]
    for r in range(size):
        rows[r * blocks // size][r] = 1.0
    return tuple(tuple(v / max(1.0, sum(row)) for v in row) for row in rows)


def block_matrix(size: int, blocks: int, like: torch.Tensor) -> torch.Tensor:
    """``[blocks, size]``: row ``i`` averages the positions ``r`` with ``floor(r * blocks /
    size) == i``, the partition :func:`~lightning_dance.masks.expand_blocks` tiles a frame
    with, so that a block's score averages exactly the positions its mask covers.

    Example:
        >>> block_matrix(5, 2, torch.zeros(0))
        tensor([[0.3333, 0.3333, 0.3333, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.5000, 0.5000]])
    """
    return torch.tensor(_block_matrix(size, blocks), dtype=like.dtype, device=like.device)


@register_policy
class AttentionPolicy(Policy):
    """Seed 004's dynamic pruning: channels and columns of each layer's input ranked by their
    activation attention on that input; a fixed share per layer is kept (see the module
    docstring).

    Args:
        drop_rate: targeted dropout in training: the probability that each low-ranked
            candidate (outside the top-``k``) is dropped, in ``[0, 1]`` (Gomez et al.'s
            ``alpha``; 1: train with the eval pruning itself).
    """

    name = "attention"
    fixed_counts = True
    needs_layer_input = True
    trains_controller = False
    calibration_span = 4.0

    def __init__(self, drop_rate: float = 0.5) -> None:
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float):
            raise TypeError(f"drop_rate must be a float in [0, 1], got {drop_rate!r}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
        self.drop_rate = float(drop_rate)

    # ------------------------------------------------------------------ scores
    def layer_scores(
        self, x: torch.Tensor, dims: tuple[str, ...], grid: int
    ) -> dict[str, torch.Tensor]:
        """``{dim: attention}`` of a Conv3d input ``x [N, C, T, H, W]`` for ``dims``: channels
        ``[N, C]``, frames ``[N, T]``, spatial blocks ``[N, gh, gw]`` (``gh = min(grid, H)``).
        Computed in float32 without gradients (a ranking, not a trained quantity)."""
        if x.dim() != 5:
            raise ValueError(f"a Conv3d input must be [N, C, T, H, W], got {tuple(x.shape)}")
        with torch.no_grad():
            a = x.detach().float().abs()
            out: dict[str, torch.Tensor] = {}
            if "frame" in dims or "channel" in dims:
                ct = a.mean(dim=(3, 4))  # [N, C, T]: one pass serves channels and frames
                if "frame" in dims:
                    out["frame"] = ct.mean(dim=1)
                if "channel" in dims:
                    out["channel"] = ct.mean(dim=2)
            if "feature" in dims:
                columns = a.mean(dim=(1, 2))  # [N, H, W]
                h, w = columns.shape[1:]
                rows = block_matrix(h, min(grid, h), columns)
                cols = block_matrix(w, min(grid, w), columns)
                out["feature"] = rows @ columns @ cols.T  # [N, gh, gw]
        return {d: out[d] for d in DIMS if d in out}

    def scoring_macs(self, shape: tuple[int, ...], dims: tuple[str, ...], grid: int) -> int:
        """Multiply-adds of :meth:`layer_scores` for one clip whose layer input is ``(C, T, H,
        W)``: one add per element for each pass over the input (the ``(C, T)`` map serving
        channels and frames, the ``(H, W)`` column map), plus the small second reductions and
        the block pooling; absolute values and top-k comparisons are not MACs."""
        c, t, h, w = shape
        macs = 0
        if "frame" in dims or "channel" in dims:
            macs += c * t * h * w + c * t * (("frame" in dims) + ("channel" in dims))
        if "feature" in dims:
            gh, gw = min(grid, h), min(grid, w)
            macs += c * t * h * w + gh * h * w + gh * w * gw
        return macs

    # ------------------------------------------------------------------ decisions
    def gate(self, logits, *, training, k=None, tau=1.0, noise=1.0, min_keep=1, generator=None):
        if k is None:
            raise ValueError("the attention policy needs the number of entries to keep (k)")
        keep = topk_gate(logits, k, training=False)
        if not training or not noise or self.drop_rate >= 1.0:
            return keep
        return self.targeted_dropout(keep, float(noise), generator)

    def targeted_dropout(
        self, keep: torch.Tensor, noise: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``keep`` (0/1, the top-``k``) with every candidate (a 0) kept again with probability
        ``(1 - drop_rate) * noise``: each is dropped with probability ``drop_rate`` at
        ``noise=1``, and always at ``noise=0``."""
        u = torch.rand(keep.shape, dtype=keep.dtype, device=keep.device, generator=generator)
        survive = (u < (1.0 - self.drop_rate) * noise).to(keep.dtype)
        return torch.maximum(keep, survive)

    def ratio_scale(self, calibration: float) -> float:
        return math.exp(calibration)
