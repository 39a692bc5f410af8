"""The hooks through which an :class:`~lightning_dance.aap.AdaptivePruner` runs its decision
plan inside the user's model, one forward at a time: the stem's forward hook makes the batch's
:class:`~lightning_dance.decision.DecisionPlan` from the stem output (the controller runs once,
there), and a forward pre-hook on each instrumented Conv3d masks that conv's input by the plan
and records its :class:`~lightning_dance.stats.LayerStats` (executed, expected and dense MACs,
kept fractions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lightning_dance.decision import DecisionPlan
from lightning_dance.executed import (
    conv3d_executed_macs,
    conv3d_executed_macs_batch,
    conv3d_expected_macs,
)
from lightning_dance.masks import apply_masks
from lightning_dance.stats import LayerStats

__all__ = ["ForwardState", "MaskHook", "StemHook"]


class ForwardState:
    """Per-forward scratch space shared by the hooks of one call."""

    def __init__(self) -> None:
        self.plan: DecisionPlan | None = None
        self.stem_shape: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.layers: dict[str, LayerStats] = {}
        self.channel_probs: dict[str, torch.Tensor] = {}  # differentiable channel keep [N, C]


class StemHook:
    """Forward hook on the stem: makes the batch's decision plan from the stem output."""

    def __init__(self, pruner: Any, state: ForwardState) -> None:  # an AdaptivePruner
        self.pruner, self.state = pruner, state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.state.plan is None:  # a stem reused later in the network does not re-plan
            self.state.plan = self.pruner.decide(output, prefetch=True)
            self.state.stem_shape = tuple(output.shape[1:])


class MaskHook:
    """Forward pre-hook on an instrumented conv: masks its input and records statistics."""

    def __init__(self, pruner: Any, state: ForwardState, name: str) -> None:  # an AdaptivePruner
        self.pruner, self.state, self.name = pruner, state, name
        self.output_mask: torch.Tensor | None = None  # set by __call__ when masks act on outputs

    def __call__(self, module: nn.Conv3d, args: tuple) -> tuple:
        if self.state.plan is None:
            raise RuntimeError(
                f"instrumented layer {self.name!r} ran before the stem "
                f"{self.pruner.stem_name!r}: the controller has no statistics yet. Exclude it "
                "with `layers=` or check which conv reads the clip first."
            )
        x = args[0]
        shape = tuple(x.shape[1:])
        at_out = self.pruner.features_at_outputs and "feature" in self.pruner.dims_of(self.name)
        decide = self.pruner.mask_shape(self.name, shape)
        masks = self.state.plan.masks(self.name, decide, inputs=None if at_out else x)
        hard = {d: v.detach() for d, v in masks.values.items()}
        executed = conv3d_executed_macs_batch(module, shape, **hard, feature_at_output=at_out)
        # the straight-through mask values are 0/1 forward and carry the gates' gradients, so
        # the "expected" count equals the executed one in value and is differentiable
        probs = dict(masks.probs)
        blocks = probs.pop("feature", None)
        expected = conv3d_expected_macs(
            module,
            shape,
            **{f"{d}_p": p for d, p in probs.items()},
            feature_blocks_p=blocks,
            batch_size=x.shape[0],
            feature_at_output=at_out,
        )
        dense = conv3d_executed_macs(module, shape)
        if "channel" in masks.probs:
            self.state.channel_probs[self.name] = masks.probs["channel"]
        self.state.layers[self.name] = LayerStats(
            shape, dense, executed, expected, masks.kept_fraction(), hard, at_out
        )
        values = masks.values
        if at_out:  # the feature mask selects outputs: mask_output applies it
            self.output_mask = values["feature"]
            values = {d: v for d, v in values.items() if d != "feature"}
        return (apply_masks(x, values),) + tuple(args[1:])

    def mask_output(self, module: nn.Conv3d, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook (feature masks at outputs): the dropped positions hold the bias."""
        mask, self.output_mask = self.output_mask, None
        if mask is None:  # this layer prunes no features (layer_dims)
            return output
        return self.pruner.feature_site.mask_output(output, mask, module.bias)
