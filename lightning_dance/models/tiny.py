"""``tiny_c3d``: a small C3D-style 3D CNN for tests, demos and CPU training.

Layout at ``width=1`` (``c = 16``; every width is ``scale_width(., width)``), clip 3x16x64x64:

==========  ===========================================  ==============  ===============
module      layers                                       output          conv MACs/clip
==========  ===========================================  ==============  ===============
``stem``    Conv3d(3, c, 3, stride (1, 2, 2)) BN ReLU    c x 16x32x32    21.2 M
``conv2``   Conv3d(c, 2c, 3, stride (2, 2, 2)) BN ReLU   2c x 8x16x16    28.3 M
``conv3``   Conv3d(2c, 4c, 3, stride (1, 2, 2)) BN ReLU  4c x 8x8x8      28.3 M
``res``     [Conv3d(4c, 4c, 3) BN ReLU Conv3d BN] + x,   4c x 8x8x8      113.2 M
            ReLU (identity residual)
``head``    global average pool over T, H, W, Linear     num_classes
==========  ===========================================  ==============  ===============

Five Conv3d layers (all 3x3x3, padding 1, no bias), one temporal stride (``conv2``), one residual
block. About 191 M conv MACs per 3x16x64x64 clip (the table is ``out positions * C_out * C_in *
27``; fvcore counts 192.0 M in total with batch norm, the residual add and the pool). The
residual block sits at 64 channels, where CPU conv3d kernels are fast (below ~48 channels
PyTorch falls back to slow kernels, so ``width=0.5`` is hardly faster on CPU). Measured with 2
threads on 2 CPU cores shared with other jobs (load 4-5), batch of 16 clips 3x16x64x64: forward
+ backward 0.19-0.27 s at best (medians 0.5-1.2 s under that load), eval forward 0.05 s at
best (median 0.12-0.16 s).

Example:
    >>> import torch
    >>> net = TinyC3D(num_classes=4)
    >>> net(torch.randn(2, 3, 8, 32, 32)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lightning_dance.models._utils import check_num_classes, check_width, scale_width

__all__ = ["TinyC3D"]


def _conv_bn_relu(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock3d(nn.Module):
    """Two 3x3x3 Conv3d + BatchNorm3d with an identity shortcut: ``relu(x + f(x))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels, (1, 1, 1))
        self.conv2 = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm3d(channels)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class TinyC3D(nn.Module):
    """A small C3D-like video classifier: ``model(clip [N, 3, T, H, W]) -> logits [N, classes]``.

    Args:
        num_classes: number of output classes.
        width: channel multiplier; the base width ``c = 16`` becomes ``scale_width(16, width)``
            (multiple of 8, at least 8), the stages use ``c, 2c, 4c``.
        in_channels: input channels (3 for RGB).
        dropout: dropout before the classifier (0 disables it).
    """

    def __init__(
        self, num_classes: int, width: float = 1.0, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        c = scale_width(16, check_width(width))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.stem = _conv_bn_relu(in_channels, c, (1, 2, 2))
        self.conv2 = _conv_bn_relu(c, 2 * c, (2, 2, 2))
        self.conv3 = _conv_bn_relu(2 * c, 4 * c, (1, 2, 2))
        self.res = ResidualBlock3d(4 * c)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(4 * c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res(self.conv3(self.conv2(self.stem(x))))
        return self.fc(self.dropout(self.pool(x).flatten(1)))
