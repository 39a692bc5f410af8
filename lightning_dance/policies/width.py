"""Per-clip width: keep the first ``k`` channels of a layer, ``k`` decided per clip.

The controller scores every channel as for the threshold policy; the width policy keeps as many
channels as those scores add up to (``sum(sigmoid(scores))``, snapped to a multiple of
``multiple``), and always the *first* ones: a clip's kept channels are a prefix
``[0, k)``, nested like the widths of a slimmable network. The number kept varies per clip
(DANCE's input adaptivity); which ones never does, so the fast path slices instead of gathering:
a producer computes the first ``k`` output channels from a view of its weight rows, the consumer
reads them with no gather, and a channel count from a small set of multiples lets a runtime
keep each layer's few weight blocks ready (see
:func:`lightning_dance.execution.weights.prefix_length`). Fine-tuning teaches the network to
put what matters first (as slimmable networks are trained). To start close to that, the policy
orders the channels of every channel chain (a producer conv whose output reaches one consumer
conv through per-channel ops only, e.g. R(2+1)D's spatial -> temporal convs) by importance when
the pruner is built (:func:`nest_channels`: in place, the model's function unchanged); other
layers keep their order.

Limits: the blocks' first convs read the residual stream, whose channels keep their arbitrary
order, so a prefix there drops channels that matter; on the benchmark task (``r2plus1d_18``
width 0.25, budget 0.5, one seed) it lost far more top-1 than ``topk`` (``docs/policies.md``).

Training: straight-through. The forward keeps exactly the first ``k`` channels; the gradient
flows to the scores through a soft prefix ``sigmoid((c - j - 0.5) / (tau * multiple / 4))`` of
the soft count ``c`` (logistic noise on the scores, scaled by ``noise``, explores). Calibration
shifts every score, as for the threshold policy. Channels only: a prefix of frames or of
spatial blocks means nothing.

Example:
    >>> import torch
    >>> p = WidthPolicy(multiple=2)
    >>> p.gate(torch.tensor([[3.0, -3.0, 3.0, 3.0, -3.0, -3.0]]), training=False)  # ~3 -> 4
    tensor([[1., 1., 1., 1., 0., 0.]])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from lightning_dance.masks import logistic_noise
from lightning_dance.policies.base import Policy, register_policy

if TYPE_CHECKING:
    from lightning_dance.execution.chains import ChannelChain

__all__ = ["WidthPolicy", "nest_channels", "soft_count"]


def soft_count(logits: torch.Tensor) -> torch.Tensor:
    """The number of entries ``[N, K]`` scores keep, as a real number ``[N]``:
    ``sum(sigmoid(logits))``."""
    return torch.sigmoid(logits).sum(-1)


@register_policy
class WidthPolicy(Policy):
    """Keep the first ``k`` channels, ``k`` per clip: the rounded soft count of the scores
    (:func:`soft_count`), snapped to a multiple of ``multiple`` (to the layer's size when that
    is nearer; sizes up to ``multiple`` are not snapped), at least ``min_keep``.

    Args:
        multiple: kept counts are multiples of it (kernels are fast at multiples of 8 channels;
            fewer distinct counts also means fewer weight blocks to keep ready).
    """

    name = "width"
    fixed_counts = False
    calibration_span = 8.0
    supported_dims: ClassVar[tuple[str, ...]] = ("channel",)

    def __init__(self, multiple: int = 8) -> None:
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
        self.multiple = multiple

    def counts(self, logits: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
        """Kept counts ``[N]`` (long) of scores ``[N, K]``."""
        size = logits.shape[-1]
        c = soft_count(logits.detach())
        m = self.multiple
        if m > 1 and size > m:
            snapped = (c / m).round() * m
            k = torch.where(
                (size - c).abs() < (snapped - c).abs(), torch.full_like(c, size), snapped
            )
            k = k.clamp(min=m)
        else:
            k = c.round()
        return k.clamp(min=min(min_keep, size), max=size).long()

    def gate(self, logits, *, training, k=None, tau=1.0, noise=1.0, min_keep=1, generator=None):
        if training and noise:
            logits = logits + float(noise) * logistic_noise(logits, generator)
        counts = self.counts(logits, min_keep)
        j = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        hard = (j < counts[:, None]).to(logits.dtype)
        if not training:
            return hard
        width = tau * max(1.0, self.multiple / 4)
        soft = torch.sigmoid((soft_count(logits)[:, None] - j - 0.5) / width)
        return hard + (soft - soft.detach())  # exactly 0/1 in value

    def logit_offset(self, calibration: float) -> float:
        return calibration

    def prepare(self, pruner: Any) -> None:
        """Order the channels of the pruner's channel chains by importance
        (:func:`nest_channels`), so that the first ones are the ones that matter most."""
        nest_channels(pruner.model, pruner.output_chains())

    def margin(self, logits: torch.Tensor, k: int | None = None) -> float:
        """How far each row's soft count is from where its snapped count changes, relative to
        the row's size (a runtime computing the scores slightly differently keeps as many)."""
        if not logits.numel():
            return math.inf
        c = soft_count(logits)
        step = self.multiple if logits.shape[-1] > self.multiple else 1
        frac = torch.remainder(c / step, 1.0)
        return float(((frac - 0.5).abs() * step / logits.shape[-1]).min())


@torch.no_grad()
def nest_channels(model: nn.Module, chains: Mapping[str, ChannelChain]) -> int:
    """Order the intermediate channels of every chain by importance, most important first, in
    place and without changing what ``model`` computes; returns how many chains were ordered.

    A chain's intermediate channel ``j`` (a producer output, a consumer input) matters as much
    as ``|scale_j| * ||W_consumer[:, j]||``, ``scale_j`` the product of the BatchNorms' gains
    (``weight / sqrt(running_var + eps)``) in between: how strongly the consumer reads it. The
    permutation moves the producer's weight rows and bias, every BatchNorm's parameters and
    statistics, and the consumer's weight columns. Chains whose producer or consumer is
    grouped are left as they are.

    Example:
        >>> import torch, torch.nn as nn
        >>> from lightning_dance.execution.chains import ChannelChain
        >>> net = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1))
        >>> with torch.no_grad():
        ...     net[3].weight[:, 3] *= 10  # channel 3 matters most
        >>> x = torch.randn(1, 2, 2, 3, 3)
        >>> before = net.eval()(x)
        >>> nest_channels(net, {"0": ChannelChain("0", "3", ("1",))})
        1
        >>> torch.allclose(net(x), before, atol=1e-6), int(net[3].weight.abs().sum((0, 2, 3, 4)).argmax())
        (True, 0)
    """
    modules = dict(model.named_modules())
    ordered = 0
    for chain in chains.values():
        producer, consumer = modules[chain.producer], modules[chain.consumer]
        norms = [modules[n] for n in chain.norms]
        if producer.groups != 1 or consumer.groups != 1:
            continue
        importance = consumer.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
        for bn in norms:
            if bn.running_var is not None:
                gain = torch.rsqrt(bn.running_var + bn.eps)
                importance = (
                    importance * (gain * bn.weight if bn.weight is not None else gain).abs()
                )
            elif bn.weight is not None:
                importance = importance * bn.weight.abs()
        order = importance.argsort(descending=True, stable=True)
        producer.weight.copy_(producer.weight[order])
        if producer.bias is not None:
            producer.bias.copy_(producer.bias[order])
        for bn in norms:
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                if t is not None:
                    t.copy_(t[order])
        consumer.weight.copy_(consumer.weight[:, order])
        ordered += 1
    return ordered
