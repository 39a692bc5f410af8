"""What one forward pass of a pruner computed: per-layer and per-clip statistics.

:class:`PruningStats` (``pruner.last_stats``) holds, per instrumented layer, the kept fractions,
the hard masks and the executed (and differentiable expected) MACs of every clip; the whole
model's counts add the layers DANCE never prunes and the controller.

Example:
    >>> import torch
    >>> stats = PruningStats(dense_total=100, controller_macs=2)
    >>> stats.layers["conv"] = LayerStats((4, 2, 2, 2), 60, torch.tensor([30, 60]),
    ...                                   torch.tensor([30.0, 60.0]), {})
    >>> stats.fixed_macs, stats.executed_macs().tolist(), stats.mac_ratio().tolist()
    (40, [72, 102], [0.72, 1.02])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LayerStats", "PruningStats"]


@dataclass
class LayerStats:
    """One instrumented layer in one forward pass (tensors are per sample, ``[N]``)."""

    input_shape: tuple[int, int, int, int]  # (C, T, H, W)
    dense_macs: int
    executed_macs: torch.Tensor  # hard count, int64 [N]
    expected_macs: torch.Tensor  # differentiable, float [N] (equal to executed in value)
    kept: dict[str, torch.Tensor]  # dim -> kept fraction [N]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # dim -> hard 0/1 mask, detached
    #: the feature mask selects output positions ``[N, H_out, W_out]`` (feature_site="outputs")
    feature_at_output: bool = False


@dataclass
class PruningStats:
    """Per-sample statistics of one forward pass of an :class:`AdaptivePruner`.

    ``dense_total`` is the whole model's dense MAC count per clip (fvcore, see
    :func:`lightning_dance.macs.count_macs`); layers that are not instrumented (stem, head, pooling,
    elementwise ops) are counted dense; ``controller_macs`` is added to every sample.
    """

    layers: dict[str, LayerStats] = field(default_factory=dict)
    dense_total: int = 0
    controller_macs: int = 0

    @property
    def fixed_macs(self) -> int:
        """MACs that DANCE never prunes (everything but the instrumented layers)."""
        return self.dense_total - sum(s.dense_macs for s in self.layers.values())

    def executed_macs(self) -> torch.Tensor:
        """Executed MACs per clip ``[N]`` (int64): fixed + instrumented executed + controller."""
        pruned = sum(s.executed_macs for s in self.layers.values())
        return pruned + self.fixed_macs + self.controller_macs

    def expected_macs(self) -> torch.Tensor:
        """Differentiable version of :meth:`executed_macs` (float ``[N]``)."""
        pruned = sum(s.expected_macs for s in self.layers.values())
        return pruned + float(self.fixed_macs + self.controller_macs)

    def mac_ratio(self) -> torch.Tensor:
        """Executed / dense MACs per clip ``[N]``."""
        return self.executed_macs().double() / max(1, self.dense_total)

    def kept_fractions(self) -> dict[str, dict[str, float]]:
        """``{layer: {dim: mean kept fraction over the batch}}``."""
        return {
            name: {d: float(v.float().mean()) for d, v in s.kept.items()}
            for name, s in self.layers.items()
        }
