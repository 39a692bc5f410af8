"""Fast execution: make DANCE's savings real in wall-clock time (see ``docs/execution.md``).

- :func:`compact_conv3d`: one masked Conv3d computing only the kept work (exact); its parts:
  :mod:`~lightning_dance.execution.weights` (channel parts, weight blocks),
  :mod:`~lightning_dance.execution.frames` (frame plan), :mod:`~lightning_dance.execution.spatial`
  (feature rectangles), :mod:`~lightning_dance.execution.activations` (gathers, placements);
- :func:`count_executed_macs` (:mod:`~lightning_dance.execution.recording`): the MACs the compact
  path really issued;
- :class:`CompactExecutor` / :class:`CompactPruner`: whole models, with given masks or with an
  ``AdaptivePruner``'s controller;
- :mod:`~lightning_dance.execution.kernels`: the fast CPU kernels and layout
  (:func:`fast_conv3d`, :func:`accelerate_dense` for the dense baseline);
- :mod:`~lightning_dance.execution.tuning`: measured kernel costs so that a pruned layer is never
  slower than dense;
- :mod:`~lightning_dance.execution.chains`: conv -> per-channel ops -> conv chains, where a
  conv skips the output channels the next one drops;
- :mod:`~lightning_dance.execution.indexed`: the index plan ``CompactPruner`` runs for ``topk``
  channel pruning at batch 1 (straight from the top-k indices, far fewer small ops);
- :mod:`~lightning_dance.execution.static`: the static-shape ``topk`` path for
  ``torch.jit.trace`` / ``torch.export``.
"""

from lightning_dance.execution.chains import ChannelChain, channel_chains
from lightning_dance.execution.compact import compact_conv3d
from lightning_dance.execution.executor import (
    CompactExecutor,
    CompactPruner,
    compact_forward,
    profile_layers,
    random_masks,
)
from lightning_dance.execution.kernels import (
    accelerate_dense,
    fast_conv3d,
    fast_kernel_available,
    route_conv3d,
    to_fast_layout,
)
from lightning_dance.execution.recording import ExecutedMacs, count_executed_macs
from lightning_dance.execution.tuning import (
    LayerTuning,
    best_ms,
    profitable_dims,
    profitable_layers,
    tune_conv3d,
    tune_layers,
)

__all__ = [
    "ChannelChain",
    "CompactExecutor",
    "CompactPruner",
    "ExecutedMacs",
    "LayerTuning",
    "accelerate_dense",
    "best_ms",
    "channel_chains",
    "compact_conv3d",
    "compact_forward",
    "count_executed_macs",
    "fast_conv3d",
    "fast_kernel_available",
    "profile_layers",
    "profitable_dims",
    "profitable_layers",
    "random_masks",
    "route_conv3d",
    "to_fast_layout",
    "tune_conv3d",
    "tune_layers",
]
