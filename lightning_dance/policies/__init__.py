"""Pruning policies: how the controller's scores become per-clip keep decisions.

- :class:`ThresholdPolicy` (``"threshold"``, DANCE): keep what scores above zero, a number that
  varies per clip;
- :class:`TopKPolicy` (``"topk"``, CNN Mixture-of-Depths style): a fixed number per layer, static
  shapes;
- :class:`WidthPolicy` (``"width"``): the first ``k`` channels, ``k`` per clip (nested widths:
  the fast path slices instead of gathering);
- :class:`AttentionPolicy` (``"attention"``, DATE'20 / seed 004): a fixed share per layer, ranked
  by attention on the layer's own input (no controller), trained with targeted dropout.

Add one by subclassing :class:`Policy` in a new file and decorating it with
:func:`register_policy`; ``AdaptivePruner(policy=...)`` and ``DANCEWrapper(policy=...)`` take its
name, its class or an instance.
"""

from lightning_dance.policies.attention import AttentionPolicy
from lightning_dance.policies.base import (
    Policy,
    available_policies,
    get_policy,
    register_policy,
)
from lightning_dance.policies.threshold import ThresholdPolicy
from lightning_dance.policies.topk import TopKPolicy
from lightning_dance.policies.width import WidthPolicy

__all__ = [
    "AttentionPolicy",
    "Policy",
    "ThresholdPolicy",
    "TopKPolicy",
    "WidthPolicy",
    "available_policies",
    "get_policy",
    "register_policy",
]
