"""Kernel dispatch for Conv3d on CPU: pick the fastest correct kernel and memory layout.

Measured on this project's CPU (AMD EPYC, AVX-512, torch 2.15; see
``docs/execution.md``):

- ``F.conv3d`` decides between oneDNN (``aten::mkldnn_convolution``) and the reference
  ``aten::slow_conv3d`` with a heuristic that, at batch 1 and ``groups == 1``, picks oneDNN only
  when ``N * C * T * H > 20480``: most layers of a video CNN at 8 x 112 x 112 (and every pruned
  layer with few channels) land on ``slow_conv3d``, 3-60x slower.
- oneDNN itself stays fast at small channel counts only for ``channels_last_3d`` inputs (with
  NCDHW inputs it is 1.2-30x slower and erratic; 1x1x1 convs worst). Its speed is not monotone
  in the channel count, though (e.g. 1x3x3 conv, 72 outputs, 8x56x56, one thread: 24 input
  channels 12.5 ms, 20 channels 7.4 ms): :mod:`lightning_dance.execution.tuning` measures the
  exact pruned shapes and snaps kept counts up where a larger count is faster.

So :func:`fast_conv3d` calls ``torch.ops.aten.mkldnn_convolution`` directly on a
``channels_last_3d`` input (converted if needed; the output stays ``channels_last_3d``), and
falls back to ``F.conv3d`` for what oneDNN does not take here (non-CPU tensors, dtypes other
than float32/bfloat16, oneDNN disabled). A 1x1x1 conv (``groups == 1``, no padding) is the
matrix product it is: ``F.linear`` over the ``[N, T, H, W, C]`` view of a ``channels_last_3d``
input (output ``channels_last_3d``), a GEMM with ~10 us of fixed cost instead of a oneDNN call's
~0.1 ms: on pooled features (X3D's squeeze-excitation convs) 10-50x faster, and 0.5-0.95x of
oneDNN's time on X3D's bottleneck convs, pruned counts most (two threads, e.g. 77 -> 173
channels on 4x5x5: 58 vs 112 us; ``docs/execution.md``). Both have autograd formulas, so the
fast path is differentiable too.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(8, 16, 3, padding=1)
    >>> x = torch.randn(1, 8, 4, 16, 16)
    >>> y = fast_conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    >>> torch.allclose(y, conv(x), atol=1e-5)
    True
    >>> with accelerate_dense(conv):  # every Conv3d of a model through fast_conv3d
    ...     z = conv(x)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.layers import all_conv3d

__all__ = [
    "accelerate_dense",
    "fast_conv3d",
    "fast_kernel_available",
    "pointwise_from_columns",
    "route_conv3d",
    "take_columns",
    "to_fast_layout",
]

_CL = torch.channels_last_3d
_FAST_DTYPES = (torch.float32, torch.bfloat16)
_mkldnn_conv = torch.ops.aten.mkldnn_convolution


def _triple(v: int | Sequence[int]) -> list[int]:
    if isinstance(v, int):
        return [v, v, v]
    out = [int(i) for i in v]
    if len(out) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return out


def fast_kernel_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fast_conv3d` can run ``x`` and ``weight`` through oneDNN directly."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in _FAST_DTYPES
        and weight.dtype == x.dtype
        and (x.dtype != torch.bfloat16 or _bf16_supported())
    )


@functools.lru_cache(maxsize=1)
def _bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 convs on this CPU (it needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT; without them ``mkldnn_convolution`` raises, ``F.conv3d`` does not)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def is_pointwise(
    x: torch.Tensor, weight: torch.Tensor, padding: int | Sequence[int], groups: int
) -> bool:
    """A 1x1x1 conv, ``groups == 1``, no padding, that :func:`_pointwise` runs as a matrix
    product: on a 1x1x1 input (squeeze-excitation convs on pooled features) on any device, on
    larger inputs where the fast CPU kernels apply (GEMM beats oneDNN there, see module doc)."""
    return (
        groups == 1
        and weight.shape[2:] == (1, 1, 1)
        and all(p == 0 for p in _triple(padding))
        and (x.shape[2:] == (1, 1, 1) or fast_kernel_available(x, weight))
    )


def _pointwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
) -> torch.Tensor:
    """A 1x1x1 conv without padding as one GEMM over channels
    (:func:`pointwise_from_columns`; any stride: a 1x1x1 kernel reads every ``s``-th position
    only). Output ``channels_last_3d``."""
    s = _triple(stride)
    if s != [1, 1, 1]:
        x = x[:, :, :: s[0], :: s[1], :: s[2]]
    return pointwise_from_columns(x, weight.flatten(1).t(), bias)


def take_columns(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows[:, idx]`` of a contiguous ``[R, C]`` (e.g. the pixels x channels view of a
    ``channels_last_3d`` activation): ``torch.gather`` with a broadcast index is 1.2-2.3x
    faster than ``index_select`` on dim 1 for many rows (parallel over rows; measured 25088x32
    -> 12 columns, 2 threads: 0.21 vs 0.47 ms), a little slower for a few rows."""
    if rows.shape[0] < 256:
        return rows.index_select(1, idx)
    return torch.gather(rows, 1, idx.view(1, -1).expand(rows.shape[0], -1))


def pointwise_from_columns(
    x: torch.Tensor,
    columns: torch.Tensor,
    bias: torch.Tensor | None = None,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 1x1x1 conv (stride 1, no padding) given its weight as ``columns = weight[:, :, 0, 0,
    0].T`` (``[C_in, C_out]``, e.g. the transposed view of a gathered weight block), on
    the input channels ``channels`` of ``x`` (``None``: all): one channel gather and one GEMM
    on the pixels x channels view, no weight transpose or copy. Output ``channels_last_3d``."""
    n, c, t, h, w = x.shape
    rows = to_fast_layout(x).permute(0, 2, 3, 4, 1).reshape(n * t * h * w, c)
    if channels is not None:
        rows = take_columns(rows, channels)
    y = torch.mm(rows, columns) if bias is None else torch.addmm(bias, rows, columns)
    return y.view(n, t, h, w, columns.shape[1]).permute(0, 4, 1, 2, 3)


def to_fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``channels_last_3d`` (a no-op when it already is): the layout oneDNN is fast in.

    One channel: the plain contiguous strides (the same memory order). Copied from a strided
    view, a one-channel ``channels_last_3d`` tensor gets a channel stride of 1 next to a width
    stride of 1, which oneDNN's single-thread convolution misreads (garbage output).
    """
    if x.dim() == 5 and x.shape[1] == 1:
        return x.contiguous()
    return x.contiguous(memory_format=_CL)


def fast_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv3d`` on the fastest kernel for this CPU (zero padding given as ints only).

    oneDNN on a ``channels_last_3d`` input when available (output in ``channels_last_3d``),
    else ``F.conv3d``. Equal to ``F.conv3d(x, weight, bias, stride, padding, dilation, groups)``
    up to float rounding.
    """
    if isinstance(padding, str):
        raise ValueError("fast_conv3d takes integer padding; resolve 'same'/'valid' first")
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(
            f"fast_conv3d needs a 5-d input and weight, got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if is_pointwise(x, weight, padding, groups):
        return _pointwise(x, weight, bias, stride)
    if fast_kernel_available(x, weight):
        return _mkldnn_conv(
            to_fast_layout(x),
            weight,
            bias,
            _triple(padding),
            _triple(stride),
            _triple(dilation),
            groups,
        )
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- routing
class _Routed:
    """Replacement ``forward`` of one Conv3d instance: ``fn(name, conv, x)``.

    A small callable (not a bound method of a big object), removed again on exit.
    """

    def __init__(self, name: str, conv: nn.Conv3d, fn: Callable) -> None:
        self.name, self.conv, self.fn = name, conv, fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.name, self.conv, x)


@contextlib.contextmanager
def route_conv3d(
    convs: nn.Module | dict[str, nn.Conv3d],
    fn: Callable[[str, nn.Conv3d, torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Temporarily replace the ``forward`` of Conv3d instances by ``fn(name, conv, x)``.

    ``convs``: a model (every ``nn.Conv3d`` in it) or ``{name: module}`` (any single-input
    modules, e.g. the BatchNorms that :class:`~lightning_dance.execution.CompactPruner` runs on
    kept channels). Forward pre-hooks and
    hooks of the convs still run around ``fn`` (a pre-hook's returned input is what ``fn``
    gets). The original ``forward`` is restored on exit, also on error, so the model is never
    left modified (deep copies and pickles made *inside* the context carry the route; don't).
    """
    if isinstance(convs, nn.Module):
        convs = all_conv3d(convs)
    patched = []
    try:
        for name, conv in convs.items():
            if "forward" in conv.__dict__:
                raise RuntimeError(
                    f"module {name!r} already has an instance-level forward (nested routing "
                    "of the same layer is not supported)"
                )
            conv.forward = _Routed(name, conv, fn)
            patched.append(conv)
        yield
    finally:
        for conv in patched:
            conv.__dict__.pop("forward", None)


def conv3d_fast_forward(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` through :func:`fast_conv3d` (any padding / padding mode; same result)."""
    from lightning_dance.geometry import ConvGeometry

    pad = conv.padding
    if conv.padding_mode != "zeros" or isinstance(pad, str):
        g = ConvGeometry.of(conv, tuple(x.shape[1:]))
        if conv.padding_mode == "zeros" and g.pad_lo == g.pad_hi:
            pad = g.pad_lo
        else:
            pads = []
            for lo, hi in zip(reversed(g.pad_lo), reversed(g.pad_hi), strict=True):
                pads += [lo, hi]
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pads, mode=mode)
            pad = 0
    return fast_conv3d(x, conv.weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups)


@contextlib.contextmanager
def accelerate_dense(model: nn.Module, *, fold_norms: bool = False) -> Iterator[nn.Module]:
    """Route every ``nn.Conv3d`` of ``model`` through :func:`fast_conv3d` inside the context.

    The dense model gets the same kernel choices as the compact path (oneDNN on
    ``channels_last_3d``), so speedups of pruning are never inflated by a slow dense baseline.
    Outputs equal the plain model's up to float rounding. Feed a ``channels_last_3d`` clip
    (:func:`to_fast_layout`) to save one layout conversion at the stem; elementwise ops keep
    the layout, so the rest of the network stays in it.

    ``fold_norms``: each eval BatchNorm3d that alone reads a conv's output is computed by the
    conv (:mod:`~lightning_dance.execution.folding`) and passes its input through: the dense
    baseline of a ``CompactPruner(fold_norms=True)``.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 4, 1))
        >>> with accelerate_dense(net):
        ...     y = net(torch.randn(1, 3, 4, 8, 8))
    """
    modules: dict[str, nn.Module] = dict(all_conv3d(model))
    folds: dict[str, nn.Module] = {}  # conv name -> its BatchNorm; BatchNorm name -> None
    if fold_norms:
        from lightning_dance.execution.folding import foldable_norms, norm_is_foldable

        named = dict(model.named_modules())
        for conv_name, norm_name in foldable_norms(model).items():
            if norm_is_foldable(named[norm_name]):
                folds[conv_name], folds[norm_name] = named[norm_name], None
                modules[norm_name] = named[norm_name]

    def forward(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if name in folds:
            if folds[name] is None:  # a folded BatchNorm: its conv computed it
                return x
            from lightning_dance.execution.folding import folded_conv

            module = folded_conv(module, folds[name])
        return conv3d_fast_forward(module, x)

    with route_conv3d(modules, forward):
        yield model
