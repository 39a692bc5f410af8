"""Narrow bottleneck tails for a materialized copy (:mod:`lightning_dance.materialize`) of
pytorchvideo's bottleneck blocks (X3D).

In X3D's ``conv_a -> BN -> ReLU -> conv_b (depthwise) -> BN [-> squeeze-excitation] -> Swish ->
conv_c (1x1x1)``, the depthwise ``conv_b`` computes only the channels it keeps; each dropped
channel holds its bias, a value the same at every position. BatchNorm, squeeze-excitation (SE)
and Swish act on each channel (SE with one scale per clip and channel), so a dropped channel
stays constant over positions up to ``conv_c``, whose 1x1x1 kernel turns it into a per-clip
bias. :class:`NarrowTail` computes the tail on the kept channels only, and the dropped
channels as one value per clip and channel:

- BatchNorm: folded into the narrow depthwise conv (inference statistics); the dropped
  channels' constants (the bias through BatchNorm) are fixed when the copy is built;
- SE: its excitation reads the mean of every channel: the kept channels' means, the dropped
  channels' constants; the kept channels are scaled by their scales, the constants by theirs;
- the activation: on both;
- ``conv_c``: a narrower conv over the kept channels it reads, plus ``W[:, dropped] @ values``
  per clip for the dropped channels it reads.

The same outputs as the full-width tail (checked by ``materialize``), and fewer MACs than the
pruner counts for ``conv_c`` (the dropped channels cost ``C_out`` MACs per clip, not per
position). :func:`narrow_bottleneck_tails` rewrites every block of a materialized copy where
the pattern holds and leaves the others as they are.

Example:
    >>> import torch, torch.nn as nn
    >>> tail = NarrowTail(torch.tensor([0, 2]), torch.tensor([0.0, 0.5, 0.0]), None, nn.ReLU(),
    ...                   nn.Conv3d(3, 4, 1), None)
    >>> tail(torch.randn(1, 2, 2, 4, 4)).shape
    torch.Size([1, 4, 2, 4, 4])
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lightning_dance.channel_maps import ChannelGather, ChannelScatter
from lightning_dance.execution.chains import PER_CHANNEL_MODULES

__all__ = ["NarrowTail", "narrow_bottleneck_tails"]


def _is_se(m: nn.Module) -> bool:
    """fvcore's / pytorchvideo's ``SqueezeExcitation``: ``x * block(x.mean((2, 3, 4)))``."""
    return type(m).__name__ == "SqueezeExcitation" and getattr(m, "is_3d", False)


def _per_channel(m: nn.Module) -> bool:
    return isinstance(m, PER_CHANNEL_MODULES) or type(m).__name__ == "Swish"


class NarrowTail(nn.Module):
    """The tail ``[SE] -> activation -> conv_c`` of a bottleneck block on the ``kept``
    channels of the normalized depthwise output ``[N, k, T, H, W]`` (the BatchNorm folded into
    the narrow depthwise conv, see the module docstring). ``const``: the value of each of the
    ``E`` channels where the depthwise conv was not computed (its bias through the BatchNorm);
    ``conv_c``: the 1x1x1 conv over the channels ``read`` (in that order; ``None``: all)."""

    def __init__(self, kept: torch.Tensor, const: torch.Tensor, se: nn.Module | None,
                 act: nn.Module, conv_c: nn.Conv3d, read: torch.Tensor | None) -> None:  # fmt: skip
        super().__init__()
        width, device = const.numel(), const.device
        kept = kept.long().cpu()  # index bookkeeping on the CPU; the buffers on const's device
        read = torch.arange(width) if read is None else read.long().cpu()
        if conv_c.in_channels != read.numel():
            raise ValueError(f"conv_c reads {conv_c.in_channels} channels, read has {read.numel()}")
        dropped = torch.ones(width, dtype=torch.bool)
        dropped[kept] = False
        position = torch.full((width,), -1, dtype=torch.long)
        position[kept] = torch.arange(kept.numel())
        column = torch.arange(read.numel())  # conv_c's input columns, in the order of read
        narrow_read, narrow_cols = read[~dropped[read]], column[~dropped[read]]
        const_read, const_cols = read[dropped[read]], column[dropped[read]]
        if not narrow_read.numel():
            raise ValueError("conv_c reads none of the kept channels: nothing to narrow")
        self.register_buffer("kept", kept.to(device))
        self.register_buffer("const", const.detach().clone())
        self.se, self.act = se, act
        pick = position[narrow_read]  # into the narrow tensor
        everything = pick.numel() == kept.numel() and torch.equal(pick, torch.arange(kept.numel()))
        self.pick = None if everything else ChannelGather(pick.to(device))
        self.register_buffer("const_read", const_read.to(device))
        w = conv_c.weight.detach()
        self.register_buffer("const_weight", w[:, const_cols.to(w.device)].flatten(1).clone())
        self.conv = nn.Conv3d(narrow_read.numel(), conv_c.out_channels, 1, stride=conv_c.stride,
                              bias=conv_c.bias is not None)  # fmt: skip
        self.conv.weight = nn.Parameter(w[:, narrow_cols.to(w.device)].clone(), requires_grad=False)
        if conv_c.bias is not None:
            self.conv.bias = nn.Parameter(conv_c.bias.detach().clone(), requires_grad=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        values = self.const.view(1, -1, 1, 1, 1)  # [1 or N, E, 1, 1, 1]
        if self.se is not None:
            means = values.expand(y.shape[0], -1, -1, -1, -1).index_copy(
                1, self.kept, y.mean(dim=(2, 3, 4), keepdim=True)
            )
            s = self.se.block(means)
            y = y * s.index_select(1, self.kept)
            values = values * s
        y, values = self.act(y), self.act(values)
        if self.pick is not None:
            y = self.pick(y)
        out = self.conv(y)
        if self.const_read.numel():
            bias = values.flatten(1).index_select(1, self.const_read) @ self.const_weight.T
            out = out + bias.view(*bias.shape, 1, 1, 1)
        return out


class NarrowBottleneck(nn.Module):
    """A bottleneck block whose depthwise conv and tail run on the kept channels."""

    def __init__(self, block: nn.Module, conv_b: nn.Conv3d, tail: NarrowTail) -> None:
        super().__init__()
        self.conv_a, self.norm_a, self.act_a = block.conv_a, block.norm_a, block.act_a
        self.conv_b, self.tail, self.norm_c = conv_b, tail, block.norm_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_a(x)
        if self.norm_a is not None:
            x = self.norm_a(x)
        if self.act_a is not None:
            x = self.act_a(x)
        x = self.tail(self.conv_b(x))
        return self.norm_c(x) if self.norm_c is not None else x


def _tail_parts(block: nn.Module):
    """``(narrow conv_b, scatter, BN, SE or None, act, conv_c, read)`` if ``block`` (after
    materializing) has the pattern of the module docstring; else ``None``."""
    conv_b, norm_b, act_b, conv_c = (getattr(block, n, None)
                                     for n in ("conv_b", "norm_b", "act_b", "conv_c"))  # fmt: skip
    if not (isinstance(conv_b, nn.Sequential) and len(conv_b) == 2
            and isinstance(conv_b[1], ChannelScatter) and isinstance(conv_b[0], nn.Conv3d)):  # fmt: skip
        return None
    se = None
    if isinstance(norm_b, nn.Sequential) and len(norm_b) == 2:
        norm_b, se = norm_b[0], norm_b[1]
        if isinstance(se, nn.Identity):
            se = None
        elif not _is_se(se):
            return None
    if not (isinstance(norm_b, nn.BatchNorm3d) and norm_b.running_mean is not None
            and norm_b.weight is not None and not norm_b.training):  # fmt: skip
        return None
    if not _per_channel(act_b):
        return None
    read = None
    gathered = isinstance(conv_c, nn.Sequential) and len(conv_c) == 2
    if gathered and isinstance(conv_c[0], ChannelGather):
        read, conv_c = conv_c[0].index, conv_c[1]
    if not (isinstance(conv_c, nn.Conv3d) and conv_c.groups == 1
            and conv_c.kernel_size == (1, 1, 1) and conv_c.padding in ((0, 0, 0), 0, "valid")):  # fmt: skip
        return None
    return conv_b[0], conv_b[1], norm_b, se, act_b, conv_c, read


def narrow_bottleneck_tails(model: nn.Module) -> list[str]:
    """Rewrite, in place, each bottleneck block of a materialized ``model`` whose depthwise
    conv was narrowed (see the module docstring); returns the names of the blocks rewritten."""
    done = []
    for name, block in list(model.named_modules()):
        parts = _tail_parts(block)
        if parts is None:
            continue
        conv_b, scatter, norm, se, act, conv_c, read = parts
        if conv_b.out_channels != conv_b.in_channels:  # a channel multiplier: not X3D's
            continue
        if read is not None and not bool(torch.isin(read.cpu(), scatter.index.cpu()).any()):
            continue  # conv_c reads only dropped channels: left as it is
        kept = scatter.index
        with torch.no_grad():  # the BatchNorm: into the narrow depthwise conv; the constants
            scale = norm.weight / (norm.running_var + norm.eps).sqrt()
            const = (scatter.fill - norm.running_mean) * scale + norm.bias
            w, b = fuse_conv_bn_weights(conv_b.weight, conv_b.bias, norm.running_mean[kept],
                                        norm.running_var[kept], norm.eps, norm.weight[kept],
                                        norm.bias[kept])  # fmt: skip
        folded = copy.deepcopy(conv_b)
        folded.weight, folded.bias = (
            nn.Parameter(w.detach(), False),
            nn.Parameter(b.detach(), False),
        )
        tail = NarrowTail(kept, const, se, act, conv_c, read)
        model.set_submodule(name, NarrowBottleneck(block, folded, tail))
        done.append(name)
    return done
