"""Conv3d geometry: what a Conv3d does to an input shape, shared by accounting and execution.

:class:`ConvGeometry` holds one Conv3d's hyper-parameters resolved on one input ``(C, T, H, W)``
(per-side padding, output size, dense MACs); :func:`cached_geometry` caches it per layer and
shape; :func:`source_index`, :func:`temporal_reads` and :func:`pad_hw` say which input positions
each output reads (padding modes included); :func:`conv3d_input_shapes` finds every Conv3d's
input shape on a clip. The counts built on it are in :mod:`lightning_dance.executed` and
:mod:`lightning_dance.traffic`; the compact execution path (:mod:`lightning_dance.execution`)
uses the same geometry.

Example:
    >>> import torch.nn as nn
    >>> g = ConvGeometry.of(nn.Conv3d(4, 8, 3, stride=(1, 2, 2), padding=1), (4, 2, 8, 8))
    >>> g.output, g.dense_macs
    ((2, 4, 4), 27648)
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.layers import all_conv3d
from lightning_dance.macs import as_clip, eval_no_grad

__all__ = [
    "ConvGeometry",
    "cached_geometry",
    "conv3d_input_shapes",
    "pad_hw",
    "source_index",
    "temporal_reads",
]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything the counts need about one Conv3d applied to an input ``(C, T, H, W)``.

    ``pad_lo``/``pad_hi`` are per-dim (T, H, W) paddings before/after (``padding='same'`` puts
    the odd extra on the ``hi`` side, as PyTorch does); ``output`` is ``(T_out, H_out, W_out)``.
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    dilation: tuple[int, int, int]
    pad_lo: tuple[int, int, int]
    pad_hi: tuple[int, int, int]
    padding_mode: str
    input: tuple[int, int, int, int]
    output: tuple[int, int, int]
    bias: bool

    @classmethod
    def of(cls, conv: nn.Conv3d, input_shape: tuple[int, ...]) -> ConvGeometry:
        """Validate ``conv`` and ``input_shape = (C, T, H, W)`` and compute the geometry."""
        if not isinstance(conv, nn.Conv3d):
            raise TypeError(f"expected an nn.Conv3d, got {type(conv).__name__}")
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(
                f"input_shape must be one sample's (C, T, H, W), got {tuple(input_shape)}"
            )
        if shape[0] != conv.in_channels:
            raise ValueError(
                f"input_shape {shape} has {shape[0]} channels but the conv expects "
                f"{conv.in_channels}"
            )
        k, s, d = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                lo = hi = (0, 0, 0)
            else:  # "same"
                total = [di * (ki - 1) for di, ki in zip(d, k, strict=True)]
                lo = tuple(t // 2 for t in total)
                hi = tuple(t - t // 2 for t in total)
        else:
            lo = hi = tuple(conv.padding)
        out = []
        for size, ki, si, di, pl, ph in zip(shape[1:], k, s, d, lo, hi, strict=True):
            o = (size + pl + ph - di * (ki - 1) - 1) // si + 1
            if o < 1:
                raise ValueError(f"input {shape} is too small for {conv}: output size would be {o}")
            out.append(o)
        return cls(
            conv.in_channels, conv.out_channels, conv.groups, k, s, d, lo, hi,
            conv.padding_mode, shape, tuple(out), conv.bias is not None,
        )  # fmt: skip

    @property
    def dense_macs(self) -> int:
        """fvcore's count: ``C_out * C_in/groups * prod(kernel) * T_out*H_out*W_out``."""
        return (
            self.out_channels * (self.in_channels // self.groups)
            * math.prod(self.kernel) * math.prod(self.output)
        )  # fmt: skip

    @property
    def weight_numel(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel)


def source_index(q: int, size: int, mode: str) -> int | None:
    """Input index read at padded offset ``q - pad_lo`` (None: a zero-padding position)."""
    if 0 <= q < size:
        return q
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -q if q < 0 else 2 * (size - 1) - q
    if mode == "replicate":
        return min(max(q, 0), size - 1)
    if mode == "circular":
        return q % size
    raise ValueError(f"unsupported padding_mode {mode!r}")


@functools.lru_cache(maxsize=1024)
def _temporal_reads_cpu(
    size: int, out: int, k: int, s: int, d: int, lo: int, mode: str
) -> torch.Tensor:
    reads = torch.zeros(k, size, dtype=torch.float64)
    for t_out in range(out):
        for tap in range(k):
            src = source_index(t_out * s - lo + tap * d, size, mode)
            if src is not None:
                reads[tap, src] += 1
    return reads


def temporal_reads(g: ConvGeometry, device: torch.device) -> torch.Tensor:
    """``R[k, t]``: number of output frames whose temporal tap ``k`` reads input frame ``t``."""
    reads = _temporal_reads_cpu(
        g.input[1], g.output[0], g.kernel[0], g.stride[0], g.dilation[0], g.pad_lo[0],
        g.padding_mode,
    )  # fmt: skip
    return reads.to(device)


def pad_hw(x: torch.Tensor, g: ConvGeometry, zero_value: float = 0.0) -> torch.Tensor:
    """Pad ``[N, 1, H, W]`` spatially like the conv pads its input."""
    pad = (g.pad_lo[2], g.pad_hi[2], g.pad_lo[1], g.pad_hi[1])
    if not any(pad):
        return x
    if g.padding_mode == "zeros":
        return F.pad(x, pad, mode="constant", value=zero_value)
    return F.pad(x, pad, mode=g.padding_mode)


_geometries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_geometry(conv: nn.Conv3d, shape: tuple[int, ...]) -> ConvGeometry:
    """``ConvGeometry.of``, cached per layer and input shape (hyper-parameters are fixed)."""
    per_conv = _geometries.setdefault(conv, {})
    if shape not in per_conv:
        per_conv[shape] = ConvGeometry.of(conv, shape)
    return per_conv[shape]


def conv3d_input_shapes(
    model: nn.Module, clip: torch.Tensor | tuple[int, ...]
) -> dict[str, tuple[int, int, int, int]]:
    """One sample's input shape ``(C, T, H, W)`` of every Conv3d that runs on ``clip``.

    Runs one dense forward pass of one clip (eval mode, no grad, training flags restored) with
    forward pre-hooks. Conv3d layers that do not run are absent. A Conv3d called several times
    with different shapes is an error (per-layer masks assume one call per forward).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(3, 8, 3, stride=2, padding=1), nn.Conv3d(8, 8, 1))
        >>> conv3d_input_shapes(net, (3, 4, 16, 16))
        {'0': (3, 4, 16, 16), '1': (8, 2, 8, 8)}
    """
    x = as_clip(clip, model)[:1]
    shapes: dict[str, tuple[int, int, int, int]] = {}
    errors: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            shape = tuple(int(s) for s in args[0].shape[1:])
            if name in shapes and shapes[name] != shape:
                errors.append(f"{name}: {shapes[name]} then {shape}")
            shapes.setdefault(name, shape)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in all_conv3d(model).items()]
    try:
        with eval_no_grad(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise ValueError(f"Conv3d layers called several times with different shapes: {errors}")
    return shapes
