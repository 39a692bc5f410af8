"""Channel maps of a materialized copy (:mod:`lightning_dance.materialize`): the input channels
a narrower conv reads (:class:`ChannelGather`), and a narrow output written back to full width
(:class:`ChannelScatter`).

Example:
    >>> import torch
    >>> x = torch.randn(1, 4, 2, 3, 3)
    >>> y = ChannelGather(torch.tensor([3, 1]))(x)
    >>> torch.equal(y, x[:, [3, 1]])
    True
    >>> ChannelScatter(torch.tensor([0, 2]), torch.zeros(3))(y).shape
    torch.Size([1, 3, 2, 3, 3])
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ChannelGather", "ChannelScatter"]


class ChannelGather(nn.Module):
    """``x[:, index]`` of a clip batch ``[N, C, T, H, W]``: the input channels a narrower conv
    reads (``index`` a buffer), returned in ``channels_last_3d``."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.detach().long().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
        ):
            return x.index_select(1, self.index)  # in a graph: one gather on the channel axis
        # gathered from the rows of a [positions, C] view in channels_last_3d order (twice as
        # fast as along the last dim of the 5-d view): the result is channels_last_3d (the
        # fast kernels' layout), so the conv reading it needs no layout copy; no branch on
        # the tensor, so that torch.fx traces it
        n, c, t, h, w = x.shape
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c).index_select(1, self.index)
        return rows.view(n, t, h, w, -1).permute(0, 4, 1, 2, 3)

    def extra_repr(self) -> str:
        return f"keeps {self.index.numel()} channels"


class ChannelScatter(nn.Module):
    """A full-width output ``[N, C, ...]`` holding ``fill[c]`` in every channel but ``index``,
    which hold the input's channels (a depthwise conv's dropped channels are its bias)."""

    def __init__(self, index: torch.Tensor, fill: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.detach().long().clone())
        self.register_buffer("fill", fill.detach().clone())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        shape = (y.shape[0], self.fill.numel(), *y.shape[2:])
        view = (1, -1) + (1,) * (y.dim() - 2)
        base = self.fill.to(y.dtype).view(view).expand(shape)
        return base.index_copy(1, self.index, y)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.fill.numel()} channels"
