"""The model factory: ``create_model(name, num_classes, width=..., checkpoint=...)``.

Every model maps a clip ``[N, 3, T, H, W]`` (float32) to logits ``[N, num_classes]`` and accepts
any clip size that survives its strides (all heads pool adaptively); weights are random unless
``checkpoint`` names a local file. Nothing is downloaded.

=================  ==========================================================  ============
name               architecture                                                trained clip
=================  ==========================================================  ============
``tiny_c3d``       :class:`~lightning_dance.models.tiny.TinyC3D` (5 Conv3d)    16x64x64
``r3d_18``         torchvision R3D-18 (3x3x3 convs)                            16x112x112
``mc3_18``         torchvision MC3-18 (3D stage 1, 2D stages 2-4)              16x112x112
``r2plus1d_18``    torchvision R(2+1)D-18                                      16x112x112
``x3d_xs/s/m``     pytorchvideo X3D (one architecture, see note)               4/13/16 x
                                                                               160/160/224
``slow_r50``       pytorchvideo Slow 8x8 R50                                   8x224x224
``slowfast_r50``   pytorchvideo SlowFast 8x8 R50 (single-clip input)           32x224x224
``csn_r101``       pytorchvideo ir-CSN-101                                     32x224x224
``timm:<name>``    any timm 2D CNN inflated to 3D (:mod:`.inflate`)            8x224x224
=================  ==========================================================  ============

The "trained clip" is the size the architecture was designed / trained for (what
:func:`model_info` reports as ``default_clip``); other sizes work too. See
:mod:`.pytorchvideo_models` for what differs from pytorchvideo's hub models (adaptive head
pooling, logits, single-clip SlowFast) and :mod:`.video_resnet` for the slimmed torchvision nets.

``width`` scales every channel width (rounded to multiples of 8, at least 8): parameters and
MACs shrink about ``width**2``. ``width=1`` reproduces the reference constructors exactly
(parameter count and state_dict keys of torchvision's ``r3d_18`` etc. and pytorchvideo's hub
models, with the same ``num_classes``). ``timm:`` models only take ``width=1`` (timm has no
uniform width knob; pass timm's own arguments, e.g. ``channels=(16, 32, 64, 128)``).

Example:
    >>> import torch
    >>> net = create_model("r2plus1d_18", num_classes=10, width=0.25)
    >>> net(torch.randn(2, 3, 8, 64, 64)).shape
    torch.Size([2, 10])
    >>> "x3d_xs" in list_models()
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from lightning_dance.models._utils import check_num_classes, check_width
from lightning_dance.models.checkpoint import load_checkpoint
from lightning_dance.models.inflate import timm_inflated
from lightning_dance.models.pytorchvideo_models import PYTORCHVIDEO_MODELS, pytorchvideo_model
from lightning_dance.models.tiny import TinyC3D
from lightning_dance.models.video_resnet import VIDEO_RESNETS, video_resnet

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelInfo:
    """What the factory knows about a name.

    Attributes:
        name: the factory name.
        source: ``"lightning_dance"``, ``"torchvision"``, ``"pytorchvideo"`` or ``"timm"``.
        default_clip: ``(T, H, W)`` the architecture was designed / trained for.
    """

    name: str
    source: str
    default_clip: tuple[int, int, int]


Builder = Callable[[int, float, dict[str, Any]], nn.Module]


def _tiny(num_classes: int, width: float, kw: dict[str, Any]) -> nn.Module:
    return TinyC3D(num_classes, width=width, **kw)


def _torchvision(name: str) -> Builder:
    def build(num_classes: int, width: float, kw: dict[str, Any]) -> nn.Module:
        if kw:
            raise TypeError(f"{name} takes no extra keyword arguments, got {sorted(kw)}")
        return video_resnet(name, num_classes, width)

    return build


def _pytorchvideo(name: str) -> Builder:
    return lambda num_classes, width, kw: pytorchvideo_model(name, num_classes, width, **kw)


_REGISTRY: dict[str, tuple[Builder, ModelInfo]] = {
    "tiny_c3d": (_tiny, ModelInfo("tiny_c3d", "lightning_dance", (16, 64, 64)))
}
for _name in VIDEO_RESNETS:
    _REGISTRY[_name] = (_torchvision(_name), ModelInfo(_name, "torchvision", (16, 112, 112)))
for _name, (_, _clip) in PYTORCHVIDEO_MODELS.items():
    _REGISTRY[_name] = (_pytorchvideo(_name), ModelInfo(_name, "pytorchvideo", _clip))


def list_models() -> list[str]:
    """The registered names (sorted). Any ``"timm:<timm model name>"`` works as well."""
    return sorted(_REGISTRY)


def _unknown(name: object) -> ValueError:
    return ValueError(
        f"unknown model {name!r}; known names: {', '.join(list_models())}, "
        f"or '{TIMM_PREFIX}<name>' for a timm 2D CNN inflated to 3D (e.g. '{TIMM_PREFIX}resnet18')"
    )


def model_info(name: str) -> ModelInfo:
    """:class:`ModelInfo` of a factory name (``timm:<name>`` models report 8x224x224)."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX) :]:
        return ModelInfo(name, "timm", (8, 224, 224))
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name][1]


def create_model(
    name: str,
    num_classes: int,
    *,
    width: float = 1.0,
    checkpoint: str | Path | None = None,
    checkpoint_prefix: str | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a video classifier ``model(clip [N, 3, T, H, W]) -> logits [N, num_classes]``.

    Args:
        name: a name from :func:`list_models` or ``"timm:<timm name>"``.
        num_classes: number of output classes (>= 1).
        width: channel multiplier (> 0); 1.0 is the reference architecture (``timm:``: 1 only).
        checkpoint: a local weight file to load (state_dict or Lightning checkpoint, see
            :func:`~lightning_dance.models.checkpoint.load_checkpoint`); random init if None.
        checkpoint_prefix: key prefix to strip from the checkpoint (auto-detected if None).
        **kw: builder options: ``tiny_c3d``: ``dropout``, ``in_channels``; pytorchvideo models:
            constructor arguments (e.g. ``dropout_rate=0.0``); ``timm:`` models:
            ``time_kernel``, ``init``, ``inflate_pointwise``, ``verify`` (see
            :func:`~lightning_dance.models.inflate.inflate_2d_to_3d`) and ``timm.create_model``
            arguments. torchvision models take none.

    Raises:
        ValueError: unknown name, bad ``num_classes`` / ``width``.
        FileNotFoundError, CheckpointError: the checkpoint cannot be read or does not match.
        InflationError: a ``timm:`` model cannot be inflated.
    """
    num_classes = check_num_classes(num_classes)
    width = check_width(width)
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX) :]:
        model = timm_inflated(name[len(TIMM_PREFIX) :], num_classes, width, **kw)
    elif isinstance(name, str) and name in _REGISTRY:
        model = _REGISTRY[name][0](num_classes, width, dict(kw))
    else:
        raise _unknown(name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, prefix=checkpoint_prefix, name=name)
    return model
