"""The strongest simple alternative at the same cost: static structured pruning with Torch-Pruning.

A DANCE model should be compared with the model you would otherwise deploy, pruned statically to
the same MACs. :func:`torch_prune` makes that model: Torch-Pruning's ``MetaPruner`` with
L2-magnitude importance and the same ratio in every layer, 1% of the channels a step, stopped at
the step whose Conv3d MACs are closest to ``budget`` x the model's. The benchmark harness
(``benchmarks/pareto.py``) fine-tunes it as long as DANCE trains; the latency benchmark times it
(random weights) beside DANCE at the same MACs. Torch-Pruning is an optional extra
(``pip install 'lightning-dance[baselines]'``).

Example:
    >>> import torch
    >>> from lightning_dance.models import create_model
    >>> net = create_model("tiny_c3d", num_classes=4).eval()
    >>> clip = torch.zeros(1, 3, 8, 32, 32)
    >>> dense = conv3d_macs(net, clip)
    >>> small, ratio = torch_prune(net, clip, 0.5)  # net is pruned in place
    >>> round(ratio, 2), conv3d_macs(small, clip) == round(ratio * dense)
    (0.5, True)
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lightning_dance.geometry import ConvGeometry, conv3d_input_shapes

__all__ = ["conv3d_macs", "torch_prune"]


def conv3d_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Conv3d MACs of one forward pass of ``model`` on ``example`` (one hooked pass: fast enough
    to search with; reported figures come from fvcore, :func:`lightning_dance.macs.count_macs`)."""
    shapes = conv3d_input_shapes(model, example)
    return sum(ConvGeometry.of(m, shapes[n]).dense_macs
               for n, m in model.named_modules() if n in shapes)  # fmt: skip


def torch_prune(
    model: nn.Module, example: torch.Tensor, budget: float, steps: int = 95
) -> tuple[nn.Module, float]:
    """``model`` pruned in place by Torch-Pruning to the step whose Conv3d MACs are closest to
    ``budget`` x its own; returns (the pruned model, its Conv3d MAC ratio).

    Classifier heads (``nn.Linear``) keep their outputs. ``steps`` of 1% of the channels each
    (at most 95%). The model comes back in the mode it was in: put it in train mode before
    fine-tuning it (Lightning keeps a submodule's own eval flag through ``fit``).
    """
    try:
        import torch_pruning as tp
    except ImportError as err:  # an optional extra
        raise RuntimeError(
            "torch-pruning is not installed: pip install 'lightning-dance[baselines]'"
        ) from err
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    dense = conv3d_macs(model, example)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=steps / 100, iterative_steps=steps, ignored_layers=heads,
    )  # fmt: skip
    ratio, previous = 1.0, (None, 1.0)
    for _ in range(steps):  # stop at the step closest to the budget
        if ratio <= budget:
            break
        previous = (copy.deepcopy(model), ratio)
        pruner.step()
        ratio = conv3d_macs(model, example) / dense
    if previous[0] is not None and abs(previous[1] - budget) < abs(ratio - budget):
        model, ratio = previous
    return model, ratio
