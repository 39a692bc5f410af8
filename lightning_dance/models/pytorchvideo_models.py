"""pytorchvideo models (X3D, Slow, SlowFast, CSN) that accept any clip size and return logits.

The builders mirror pytorchvideo's hub definitions (``pytorchvideo/models/hub/{x3d,resnet,
slowfast,csn}.py``) with random initialization, and change three things so that every factory
model has the call signature ``model(clip [N, 3, T, H, W]) -> logits [N, num_classes]``:

- **Adaptive head pooling.** The hub heads average with a fixed ``AvgPool3d`` kernel (e.g.
  ``(8, 7, 7)`` for Slow R50) tied to one clip size: another size either fails or is averaged by a
  sliding window. Here the head pool is ``AdaptiveAvgPool3d`` (global average over T, H, W). At
  the hub's clip size the feature map equals the kernel, so the result is identical; at other
  sizes it is a plain global average. (X3D's projected pool applies a 1x1x1 conv and ReLU after
  pooling, so there the two differ at other sizes by more than edge weighting.)
- **Logits.** pytorchvideo's X3D head applies softmax by default; ``head_activation=None`` here.
- **SlowFast takes one clip.** :class:`SlowFastSingleClip` packs the two pathways itself: the
  fast pathway reads the clip, the slow pathway ``ceil(T / alpha)`` frames picked with
  ``linspace(0, T - 1)`` as pytorchvideo's ``PackPathway`` does (``alpha = 4``, the stride of the
  fast-to-slow fusion convs). A ``[slow, fast]`` list is still accepted.

Width multiplier ``width``: X3D scales its own ``width_factor`` (2.0 * width) and the head's
2048-d projection; the ResNet family (Slow, SlowFast, CSN) scales the stem width (64), from which
every stage width derives (x4 per bottleneck, x2 per stage; SlowFast's fast pathway keeps 1/8 of
the slow one). Widths are rounded to multiples of 8 (pytorchvideo's ``round_width`` for X3D).

Note: ``x3d_xs``, ``x3d_s`` and ``x3d_m`` share one architecture in pytorchvideo; they differ
only in the clip size they were trained on (4x160x160, 13x160x160, 16x224x224), which only set
the head's fixed pooling kernel. With adaptive pooling they build identical networks.

Example:
    >>> import torch
    >>> net = pytorchvideo_model("slowfast_r50", num_classes=3, width=0.125)
    >>> net(torch.randn(1, 3, 8, 32, 32)).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from lightning_dance.macs import quiet_fvcore
from lightning_dance.models._utils import check_num_classes, check_width, scale_width

with quiet_fvcore():  # pytorchvideo imports fvcore, whose import calls the deprecated jit.script
    from pytorchvideo.models.csn import create_csn
    from pytorchvideo.models.net import Net
    from pytorchvideo.models.resnet import create_resnet
    from pytorchvideo.models.slowfast import create_slowfast
    from pytorchvideo.models.x3d import create_x3d

__all__ = ["SlowFastSingleClip", "pack_pathways", "pytorchvideo_model", "PYTORCHVIDEO_MODELS"]


def pack_pathways(clip: torch.Tensor, alpha: int = 4) -> list[torch.Tensor]:
    """``[slow, fast]`` pathways of a clip ``[N, C, T, H, W]``: slow = ``ceil(T/alpha)`` frames.

    The slow frames are ``linspace(0, T - 1, ceil(T / alpha))`` (rounded down), as in
    pytorchvideo's ``PackPathway`` (which uses ``T // alpha``; equal when ``alpha`` divides ``T``).
    ``ceil`` keeps the slow length equal to the fused fast length for every ``T``.
    """
    if clip.dim() != 5:
        raise ValueError(f"expected a clip [N, C, T, H, W], got shape {tuple(clip.shape)}")
    t = clip.shape[2]
    n_slow = math.ceil(t / alpha)
    idx = torch.linspace(0, t - 1, n_slow, device=clip.device).long()
    return [clip.index_select(2, idx), clip]


class SlowFastSingleClip(Net):
    """pytorchvideo SlowFast that takes one clip tensor and packs the pathways itself.

    Same ``blocks`` (and state_dict keys) as the ``Net`` returned by ``create_slowfast``.
    """

    def __init__(self, net: Net, alpha: int = 4) -> None:
        nn.Module.__init__(self)  # Net.__init__ would re-initialize the weights
        self.blocks = net.blocks
        self.alpha = alpha

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = pack_pathways(x, self.alpha)
        return super().forward(x)


def _adaptive_x3d_head(net: Net) -> Net:
    head = net.blocks[-1]
    if not isinstance(getattr(head.pool, "pool", None), nn.AvgPool3d):
        raise RuntimeError("unexpected pytorchvideo X3D head layout (no ProjectedPool AvgPool3d)")
    head.pool.pool = nn.AdaptiveAvgPool3d(1)
    return net


def _x3d(clip: tuple[int, int], width: float, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    cfg = {
        "input_clip_length": clip[0],
        "input_crop_size": clip[1],
        "width_factor": 2.0 * width,
        "head_dim_out": scale_width(2048, width),
        "head_activation": None,
    }
    return _adaptive_x3d_head(create_x3d(model_num_class=num_classes, **(cfg | kw)))


def _slow_r50(width: float, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    cfg = {
        "stem_conv_kernel_size": (1, 7, 7),
        "model_depth": 50,
        "stem_dim_out": scale_width(64, width),
        "head_pool": nn.AdaptiveAvgPool3d,
    }
    return create_resnet(model_num_class=num_classes, **(cfg | kw))


def _slowfast_r50(width: float, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    slow = scale_width(64, width)
    cfg = {
        "model_depth": 50,
        "slowfast_fusion_conv_kernel_size": (7, 1, 1),
        "stem_dim_outs": (slow, slow // 8),
        "head_pool": nn.AdaptiveAvgPool3d,
    }
    cfg = cfg | kw
    alpha = cfg.get("slowfast_fusion_conv_stride", (4, 1, 1))[0]
    return SlowFastSingleClip(create_slowfast(model_num_class=num_classes, **cfg), alpha=alpha)


def _csn_r101(width: float, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    cfg = {
        "model_depth": 101,
        "stem_pool": nn.MaxPool3d,
        "stem_dim_out": scale_width(64, width),
        "head_pool": nn.AdaptiveAvgPool3d,
    }
    return create_csn(model_num_class=num_classes, **(cfg | kw))


Builder = Callable[[float, int, dict[str, Any]], nn.Module]

# name -> (builder(width, num_classes, kw), hub clip size (T, H, W))
PYTORCHVIDEO_MODELS: dict[str, tuple[Builder, tuple[int, int, int]]] = {
    "x3d_xs": (lambda w, n, kw: _x3d((4, 160), w, n, kw), (4, 160, 160)),
    "x3d_s": (lambda w, n, kw: _x3d((13, 160), w, n, kw), (13, 160, 160)),
    "x3d_m": (lambda w, n, kw: _x3d((16, 224), w, n, kw), (16, 224, 224)),
    "slow_r50": (_slow_r50, (8, 224, 224)),
    "slowfast_r50": (_slowfast_r50, (32, 224, 224)),
    "csn_r101": (_csn_r101, (32, 224, 224)),
}


def pytorchvideo_model(name: str, num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    """Build a pytorchvideo hub architecture (random init) that accepts any clip size.

    ``kw`` overrides the constructor arguments (e.g. ``dropout_rate=0.0``); ``model_num_class``
    is set from ``num_classes``.
    """
    if name not in PYTORCHVIDEO_MODELS:
        raise ValueError(f"unknown pytorchvideo model {name!r}; known: {list(PYTORCHVIDEO_MODELS)}")
    if "model_num_class" in kw:
        raise ValueError("pass num_classes, not model_num_class")
    builder, _ = PYTORCHVIDEO_MODELS[name]
    return builder(check_width(width), check_num_classes(num_classes), dict(kw))
