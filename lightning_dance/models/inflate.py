"""Inflating 2D CNNs (e.g. timm ResNets) to 3D video CNNs, I3D-style.

:func:`inflate_2d_to_3d` deep-copies a 2D model and replaces its layers:

==========================  ====================================================================
2D layer                    3D layer
==========================  ====================================================================
``Conv2d`` k_h x k_w        ``Conv3d`` k_t x k_h x k_w, temporal stride 1, dilation 1, padding
                            ``(k_t - 1) // 2`` (the clip length is kept); ``k_t = time_kernel``
                            for spatial kernels > 1x1, 1 for 1x1 convs unless
                            ``inflate_pointwise=True`` (or per layer via a callable)
``BatchNorm2d``             ``BatchNorm3d`` (affine parameters and running stats copied);
                            timm's ``BatchNormAct2d`` keeps its drop / act modules
``MaxPool2d``/``AvgPool2d``  3D pools with temporal kernel and stride 1
``AdaptiveAvg/MaxPool2d``   3D: output ``(1, 1)`` pools T too, other sizes keep T
``Dropout2d``               ``Dropout3d``
timm global pool            pooling over T, H, W (``SelectAdaptivePool2d``: avg/max/avgmax/...)
==========================  ====================================================================

Weights of an inflated conv ``W3[:, :, t] = W * a_t``: ``init="center"`` puts ``W`` on the centre
tap (``a = [0, .., 1, .., 0]``), ``init="mean"`` spreads it (``a_t = 1 / k_t``, I3D).

Exactness (what the tests check, eval mode): for a clip of ``T`` identical frames the inflated
model returns exactly the 2D model's output on that frame with ``init="center"`` (any
``time_kernel``) and with either init when ``time_kernel=1``. With ``init="mean"`` and
``k_t > 1`` it is exact only away from the clip's ends: the first and last ``(k_t - 1) // 2``
output frames of each inflated conv read zero temporal padding and get a fraction of the 2D
response (e.g. 2/3 at ``k_t = 3``), and this error propagates inwards layer after layer, so on
short clips every frame is affected.

Layers that cannot be inflated (subclasses of the 2D layers with their own ``forward``, e.g.
timm's ``Conv2dSame``; any other leaf module whose class name ends in ``2d``, e.g. timm's
``LayerNorm2d``) raise an
:class:`InflationError` that names them. Functional 2D operations in a ``forward`` (e.g. an SE
block's ``x.mean((2, 3))``) are invisible to module replacement; with ``verify=True`` (default)
the inflated model is run once on a clip of identical frames (centre init) and compared with
the 2D model layer by layer, and a mismatch or a crash raises an :class:`InflationError` that
names the first layer where the outputs differ.

Example:
    >>> import timm, torch
    >>> net2d = timm.create_model("resnet18", pretrained=False, num_classes=5)
    >>> net3d = inflate_2d_to_3d(net2d, time_kernel=3, init="center")
    >>> net3d(torch.randn(1, 3, 4, 64, 64)).shape
    torch.Size([1, 5])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.errors import DanceError

__all__ = ["InflationError", "GlobalPool3d", "inflate_2d_to_3d", "timm_inflated"]

TimeKernel = int | Callable[[str, nn.Conv2d], int]


class InflationError(DanceError, ValueError):
    """A 2D model (or one of its layers) cannot be inflated to 3D."""


class GlobalPool3d(nn.Module):
    """Global pooling over (T, H, W), the 3D counterpart of timm's ``SelectAdaptivePool2d``.

    ``pool_type``: ``"avg"`` / ``"fast"`` / ``"fastavg"``, ``"max"``, ``"avgmax"`` (mean of
    both), ``"catavgmax"`` (concatenated), ``""`` (identity). Keeps timm's ``is_identity`` /
    ``feat_mult`` interface.
    """

    def __init__(self, pool_type: str = "avg", flatten: bool = True) -> None:
        super().__init__()
        kind = (pool_type or "").lower().removeprefix("fast")
        kind = kind or ("avg" if pool_type else "")
        if kind not in ("", "avg", "max", "avgmax", "catavgmax"):
            raise InflationError(f"unsupported global pool type {pool_type!r}")
        self.pool_type = pool_type or ""
        self.kind = kind
        self.flatten = flatten

    def is_identity(self) -> bool:
        return not self.kind

    def feat_mult(self) -> int:
        return 2 if self.kind == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kind:
            return x.flatten(1) if self.flatten else x
        dims = tuple(range(2, x.dim()))
        avg = x.mean(dims, keepdim=True) if "avg" in self.kind else None
        mx = x.amax(dims, keepdim=True) if "max" in self.kind else None
        if self.kind == "avg":
            y = avg
        elif self.kind == "max":
            y = mx
        elif self.kind == "avgmax":
            y = 0.5 * (avg + mx)
        else:
            y = torch.cat([avg, mx], dim=1)
        return y.flatten(1) if self.flatten else y


class _BatchNormAct3d(nn.BatchNorm3d):
    """BatchNorm3d followed by the ``drop`` and ``act`` modules of a timm ``BatchNormAct2d``."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]


def _inflate_conv(conv: nn.Conv2d, kt: int, init: str) -> nn.Conv3d:
    if isinstance(conv.padding, str):
        padding: Any = conv.padding if conv.padding == "same" else ((kt - 1) // 2, 0, 0)
    else:
        padding = ((kt - 1) // 2, *conv.padding)
    conv3 = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        (kt, *conv.kernel_size),
        stride=(1, *conv.stride),
        padding=padding,
        dilation=(1, *conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    _set_temporal_weights(conv3, conv.weight.detach(), init)
    if conv.bias is not None:
        conv3.bias.data.copy_(conv.bias.detach())
    return conv3


def _set_temporal_weights(conv3: nn.Conv3d, w2: torch.Tensor, init: str) -> None:
    kt = conv3.kernel_size[0]
    with torch.no_grad():
        if init == "mean":
            conv3.weight.copy_(w2.unsqueeze(2).expand_as(conv3.weight) / kt)
        else:
            conv3.weight.zero_()
            conv3.weight[:, :, kt // 2].copy_(w2)


def _inflate_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    if type(bn).__name__ == "BatchNormAct2d":
        bn3: nn.BatchNorm3d = _BatchNormAct3d(bn)
    else:
        bn3 = nn.BatchNorm3d(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats
        )
    ref = bn.weight if bn.affine else bn.running_mean
    if ref is not None:
        bn3 = bn3.to(device=ref.device, dtype=ref.dtype)
    bn3.load_state_dict(bn.state_dict())
    return bn3


def _triple(v: Any, t: int) -> tuple[int, int, int]:
    return (t, *_pair(v))  # type: ignore[return-value]


def _adaptive_size(size: Any) -> tuple[int | None, ...]:
    h, w = _pair(size)
    return (1 if (h, w) == (1, 1) else None, h, w)


def _timm_global_pool(m: nn.Module) -> GlobalPool3d:
    flat = isinstance(m.flatten, nn.Flatten) or bool(getattr(m.pool, "flatten", False))
    return GlobalPool3d(m.pool_type, flatten=flat)


def _convert(m: nn.Module, name: str, kt_of: Callable[[str, nn.Conv2d], int], init: str):
    """The 3D replacement of ``m`` (or None to recurse into it)."""
    t = type(m)
    if t is nn.Conv2d:
        kt = kt_of(name, m)
        if not isinstance(kt, int) or kt < 1 or kt % 2 == 0:
            raise InflationError(
                f"temporal kernel for {name!r} must be an odd int >= 1, got {kt!r}"
            )
        return _inflate_conv(m, kt, init)
    if t is nn.BatchNorm2d or type(m).__name__ == "BatchNormAct2d":
        return _inflate_bn(m)
    if t is nn.MaxPool2d:
        return nn.MaxPool3d(
            _triple(m.kernel_size, 1),
            _triple(m.stride, 1),
            _triple(m.padding, 0),
            _triple(m.dilation, 1),
            m.return_indices,
            m.ceil_mode,
        )
    if t is nn.AvgPool2d:
        return nn.AvgPool3d(
            _triple(m.kernel_size, 1),
            _triple(m.stride, 1),
            _triple(m.padding, 0),
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )
    if t is nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool3d(_adaptive_size(m.output_size))
    if t is nn.AdaptiveMaxPool2d:
        return nn.AdaptiveMaxPool3d(_adaptive_size(m.output_size), m.return_indices)
    if t is nn.Dropout2d:
        return nn.Dropout3d(m.p, m.inplace)
    if type(m).__name__ == "SelectAdaptivePool2d":
        return _timm_global_pool(m)
    return None


def _replace(module: nn.Module, prefix: str, kt_of, init: str) -> None:
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        new = _convert(child, name, kt_of, init)
        if new is None:
            _replace(child, name + ".", kt_of, init)
        else:
            setattr(module, child_name, new)


_2D_BASES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.InstanceNorm2d,
)


def _leftover_2d(model: nn.Module) -> list[str]:
    bad = []
    for name, m in model.named_modules():
        leaf_2d = type(m).__name__.lower().endswith("2d") and not any(m.children())
        if isinstance(m, _2D_BASES) or leaf_2d:
            bad.append(f"{name or '<model>'} ({type(m).__name__})")
    return bad


# ----------------------------------------------------------------------------- verification


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for pairs in flags:
            for m, training in pairs:
                m.training = training


def _record(model: nn.Module) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Hooks recording each module's tensor output in exit order, and the active-module stack."""
    outputs: dict[str, Any] = {}
    stack: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def pre(_m, _args, name=name):
            stack.append(name)

        def post(_m, _args, out, name=name):
            if stack and stack[-1] == name:
                stack.pop()
            if isinstance(out, torch.Tensor) and name not in outputs:
                outputs[name] = out.detach().clone()

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return outputs, stack, handles


def _matches(y3: torch.Tensor, y2: torch.Tensor) -> bool:
    """Whether a 3D output equals the 2D output frame by frame (or exactly if same shape)."""
    if y3.shape != y2.shape:
        same_frames = (
            y3.dim() == y2.dim() + 1
            and y3.shape[:2] == y2.shape[:2]
            and y3.shape[3:] == y2.shape[2:]
        )
        if not same_frames:
            return False
        y2 = y2.unsqueeze(2)
    if not y3.is_floating_point():
        return bool(torch.equal(y3, y2.expand_as(y3)))
    scale = 1.0 + float(y2.abs().max()) if y2.numel() else 1.0
    return bool(torch.allclose(y3, y2.expand_as(y3), rtol=1e-4, atol=1e-4 * scale))


def _verify(model2d: nn.Module, model3d: nn.Module, label: str, size: int, frames: int) -> None:
    param = next(model2d.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    first = next((m for m in model2d.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    x2 = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    x2 = x2.to(device=device, dtype=dtype)
    x3 = x2.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()
    out2, _, h2 = _record(model2d)
    out3, stack, h3 = _record(model3d)
    try:
        with _eval_mode(model2d, model3d), torch.no_grad():
            y2 = model2d(x2)
            try:
                y3 = model3d(x3)
            except Exception as exc:  # name the innermost layer that was running
                where = stack[-1] if stack else "<top-level forward>"
                kind = type(model3d.get_submodule(stack[-1])).__name__ if stack else ""
                raise InflationError(
                    f"inflated {label} fails in layer {where!r} ({kind}) on a clip "
                    f"[1, {channels}, {frames}, {size}, {size}]: {type(exc).__name__}: {exc}. "
                    "Its forward (or its parent's) probably uses a 2D-only operation."
                ) from exc
    finally:
        for h in h2 + h3:
            h.remove()
    for name, o3 in out3.items():
        o2 = out2.get(name)
        if o2 is not None and not _matches(o3, o2):
            parent = name.rsplit(".", 1)[0] if "." in name else "<model>"
            raise InflationError(
                f"inflated {label} is not equivalent to the 2D model: the output of layer "
                f"{name!r} ({type(model3d.get_submodule(name)).__name__}) differs on a clip of "
                f"identical frames (shape {tuple(o3.shape)} vs 2D {tuple(o2.shape)}) while all "
                "its sub-layers matched. Its own forward, or the forward of an enclosing module "
                f"({parent!r} or above) that computes its input, uses a 2D-only functional "
                "operation (e.g. x.mean((2, 3))) that module replacement cannot inflate."
            )
    if not isinstance(y3, torch.Tensor) or not _matches(y3, y2):
        raise InflationError(
            f"inflated {label} is not equivalent to the 2D model: the final output differs "
            "on a clip of identical frames although every layer matched; the top-level "
            f"forward of {type(model3d).__name__} uses an operation that cannot be inflated."
        )


# ----------------------------------------------------------------------------- public API


def inflate_2d_to_3d(
    model2d: nn.Module,
    time_kernel: TimeKernel = 3,
    init: str = "center",
    *,
    inflate_pointwise: bool = False,
    verify: bool = True,
    verify_size: int = 64,
    name: str | None = None,
) -> nn.Module:
    """Return a 3D copy of a 2D CNN (the input model is not modified). See the module docstring.

    Args:
        model2d: a 2D CNN taking ``[N, C, H, W]``; the result takes ``[N, C, T, H, W]``.
        time_kernel: odd temporal kernel for convs with a spatial kernel > 1x1, or a callable
            ``f(qualified_name, conv2d) -> odd int`` deciding per layer.
        init: ``"center"`` (exact for static clips) or ``"mean"`` (I3D; see exactness above).
        inflate_pointwise: also give 1x1 convs the temporal kernel (int ``time_kernel`` only).
        verify: run the 2D and 3D models once (eval mode, no grad, modes restored) on a random
            frame / a clip of 2 copies of it at ``verify_size`` pixels, compare every layer, and
            raise :class:`InflationError` on a mismatch or a crash. Costs one small forward.
        verify_size: spatial size of the verification input.
        name: the model's name in error messages (default: its class name).

    Raises:
        InflationError: a layer cannot be inflated, or (``verify``) the 3D model is not
            equivalent to the 2D one on static clips.
        ValueError: bad ``time_kernel`` / ``init``.
    """
    if init not in ("center", "mean"):
        raise ValueError(f"init must be 'center' or 'mean', got {init!r}")
    if callable(time_kernel):
        kt_of = time_kernel
    else:
        if isinstance(time_kernel, bool) or not isinstance(time_kernel, int):
            raise ValueError(
                f"time_kernel must be an odd int >= 1 or a callable, got {time_kernel!r}"
            )
        if time_kernel < 1 or time_kernel % 2 == 0:
            raise ValueError(
                f"time_kernel must be odd and >= 1 (the clip length is kept), got {time_kernel}"
            )

        def kt_of(_name: str, conv: nn.Conv2d) -> int:
            pointwise = tuple(conv.kernel_size) == (1, 1)
            return 1 if pointwise and not inflate_pointwise else time_kernel

    label = name or type(model2d).__name__
    model3d = copy.deepcopy(model2d)
    top = _convert(model3d, "", kt_of, "center")
    if top is not None:
        model3d = top
    else:
        _replace(model3d, "", kt_of, "center")
    leftover = _leftover_2d(model3d)
    if leftover:
        raise InflationError(
            f"cannot inflate {label}: these 2D layers have no 3D replacement (subclasses of 2D "
            f"layers with their own forward, or unknown 2D modules): {leftover[:10]}"
            + (f" and {len(leftover) - 10} more" if len(leftover) > 10 else "")
        )
    if verify:
        _verify(model2d, model3d, label, verify_size, frames=2)
    if init == "mean":
        for m in model3d.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1:
                kt = m.kernel_size[0]
                _set_temporal_weights(m, m.weight.detach()[:, :, kt // 2].clone(), "mean")
    return model3d


def timm_inflated(
    timm_name: str,
    num_classes: int,
    width: float = 1.0,
    *,
    time_kernel: TimeKernel = 3,
    init: str = "center",
    inflate_pointwise: bool = False,
    verify: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm 2D model (``pretrained=False``) inflated with :func:`inflate_2d_to_3d`.

    ``timm_kwargs`` go to ``timm.create_model``. ``width`` must be 1: timm has no uniform width
    knob (its ResNets take ``channels=(64, 128, 256, 512)`` for the stages but fix the plain 7x7
    stem at 64 channels), so slim timm models are built with timm's own arguments, e.g.
    ``create_model("timm:resnet18", 5, channels=(16, 32, 64, 128))``.
    """
    import timm

    from lightning_dance.models._utils import check_num_classes, check_width

    if check_width(width) != 1.0:
        raise ValueError(
            f"width={width} is not supported for timm models: pass timm's own arguments instead, "
            "e.g. channels=(16, 32, 64, 128) for a ResNet (its 7x7 stem stays at 64 channels)"
        )
    check_num_classes(num_classes)
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained timm weights are not downloaded here; load them yourself")
    try:
        model2d = timm.create_model(
            timm_name, pretrained=False, num_classes=num_classes, **timm_kwargs
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(
                f"unknown timm model {timm_name!r} (see timm.list_models()): {exc}"
            ) from exc
        raise
    return inflate_2d_to_3d(
        model2d,
        time_kernel=time_kernel,
        init=init,
        inflate_pointwise=inflate_pointwise,
        verify=verify,
        name=f"timm:{timm_name}",
    )
