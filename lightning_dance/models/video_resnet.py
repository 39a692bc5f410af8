"""torchvision video ResNets (R3D-18, MC3-18, R(2+1)D-18) with a width multiplier.

torchvision's ``VideoResNet`` hard-codes the stage widths 64/128/256/512 and its stems hard-code
64 channels (45 + 64 for R(2+1)D). :class:`SlimVideoResNet` reuses torchvision's building blocks
(``BasicBlock``, ``Conv3DSimple``, ``Conv3DNoTemporal``, ``Conv2Plus1D`` and
``VideoResNet._make_layer`` / ``forward``) with every width scaled by
:func:`~lightning_dance.models._utils.scale_width` (multiple of 8, at least 8). At ``width=1`` the
module tree, parameter names, shapes and initialization scheme are those of
``torchvision.models.video.r3d_18`` / ``mc3_18`` / ``r2plus1d_18`` (randomly initialized, nothing is
downloaded), so torchvision checkpoints load into them.

Example:
    >>> import torch
    >>> net = video_resnet("r2plus1d_18", num_classes=5, width=0.25)
    >>> net(torch.randn(1, 3, 4, 32, 32)).shape
    torch.Size([1, 5])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torchvision.models.video.resnet import (
    BasicBlock,
    Conv2Plus1D,
    Conv3DNoTemporal,
    Conv3DSimple,
    VideoResNet,
)

from lightning_dance.models._utils import check_num_classes, check_width, scale_width

__all__ = ["SlimVideoResNet", "video_resnet", "VIDEO_RESNETS"]

ConvMaker = type[Conv3DSimple] | type[Conv3DNoTemporal] | type[Conv2Plus1D]

# name -> (conv builder of each of the 4 stages, stem kind); all are BasicBlock [2, 2, 2, 2].
VIDEO_RESNETS: dict[str, tuple[tuple[ConvMaker, ...], str]] = {
    "r3d_18": ((Conv3DSimple,) * 4, "basic"),
    "mc3_18": ((Conv3DSimple,) + (Conv3DNoTemporal,) * 3, "basic"),
    "r2plus1d_18": ((Conv2Plus1D,) * 4, "r2plus1d"),
}


def _basic_stem(out: int) -> nn.Sequential:
    """torchvision's ``BasicStem`` with ``out`` channels instead of 64."""
    return nn.Sequential(
        nn.Conv3d(3, out, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(out),
        nn.ReLU(inplace=True),
    )


def _r2plus1d_stem(mid: int, out: int) -> nn.Sequential:
    """torchvision's ``R2Plus1dStem`` with ``mid`` / ``out`` channels instead of 45 / 64."""
    return nn.Sequential(
        nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, out, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(out),
        nn.ReLU(inplace=True),
    )


class SlimVideoResNet(VideoResNet):
    """torchvision ``VideoResNet`` (BasicBlock) with configurable stem and stage widths.

    Only ``__init__`` differs from torchvision's class: ``forward`` and ``_make_layer`` are
    inherited, and the weight initialization repeats torchvision's (Kaiming normal fan-out for
    convs, BN weight 1 / bias 0, Linear N(0, 0.01)). Pooling is torchvision's
    ``AdaptiveAvgPool3d``, so any clip size that survives the strides works.

    Args:
        conv_makers: torchvision conv builder per stage (4 entries).
        stem: the stem module; its last BatchNorm3d gives the stem's output width.
        widths: output channels of the 4 stages (torchvision: 64, 128, 256, 512).
        layers: BasicBlocks per stage.
        num_classes: size of the final Linear layer.
    """

    def __init__(
        self,
        conv_makers: Sequence[ConvMaker],
        stem: nn.Module,
        widths: Sequence[int],
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 400,
    ) -> None:
        nn.Module.__init__(self)  # VideoResNet.__init__ hard-codes the widths: rebuild here
        if len(conv_makers) != 4 or len(widths) != 4 or len(layers) != 4:
            raise ValueError("conv_makers, widths and layers need 4 entries (one per stage)")
        bns = [m for m in stem.modules() if isinstance(m, nn.BatchNorm3d)]
        if not bns:
            raise ValueError("the stem must end with a BatchNorm3d (it gives the stem's width)")
        self.inplanes = bns[-1].num_features
        self.stem = stem
        strides = (1, 2, 2, 2)
        for i in range(4):
            stage = self._make_layer(BasicBlock, conv_makers[i], widths[i], layers[i], strides[i])
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def video_resnet(name: str, num_classes: int, width: float = 1.0) -> SlimVideoResNet:
    """Build torchvision's ``r3d_18`` / ``mc3_18`` / ``r2plus1d_18`` at a width multiplier.

    Every width (stem 64, R(2+1)D stem middle 45, stages 64/128/256/512) becomes
    ``scale_width(c, width)``; the (2+1)D blocks derive their middle width from their in/out
    widths with torchvision's own formula. ``width=1`` equals torchvision's constructor.
    """
    if name not in VIDEO_RESNETS:
        raise ValueError(f"unknown torchvision video ResNet {name!r}; known: {list(VIDEO_RESNETS)}")
    width = check_width(width)
    num_classes = check_num_classes(num_classes)
    conv_makers, stem_kind = VIDEO_RESNETS[name]
    stem_out = scale_width(64, width)
    if stem_kind == "r2plus1d":
        stem = _r2plus1d_stem(scale_width(45, width), stem_out)
    else:
        stem = _basic_stem(stem_out)
    widths = [scale_width(c, width) for c in (64, 128, 256, 512)]
    return SlimVideoResNet(conv_makers, stem, widths, num_classes=num_classes)
