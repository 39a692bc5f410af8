"""Spatial transforms for decoded video clips, in plain torch (no ``pytorchvideo.transforms``).

A clip goes from decoded uint8 frames ``[T, H, W, 3]`` to the model's float32 ``[3, T, h, w]``:
resize (short side, bilinear with antialiasing), crop (random for training, centre for
evaluation), optional horizontal flip (training), then per-channel normalization.

Example:
    >>> import torch
    >>> t = ClipTransform(short_side=20, crop_size=16)
    >>> frames = torch.full((4, 30, 40, 3), 115, dtype=torch.uint8)
    >>> clip = t(frames)  # evaluation: centre crop, no flip
    >>> tuple(clip.shape), round(float(clip.mean()), 2)
    ((3, 4, 16, 16), 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["KINETICS_MEAN", "KINETICS_STD", "ClipTransform"]

#: The Kinetics statistics pytorchvideo's video models are usually trained with.
KINETICS_MEAN: tuple[float, float, float] = (0.45, 0.45, 0.45)
KINETICS_STD: tuple[float, float, float] = (0.225, 0.225, 0.225)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return pair[0], pair[1]


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {values}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ClipTransform:
    """Resize, crop, flip and normalize a decoded clip.

    Args:
        short_side: the frame's shorter side is resized to this many pixels (aspect kept). If the
            crop would not fit (a crop wider than the resized frame), the frame is scaled up just
            enough to hold it.
        crop_size: output ``h, w`` (an int for a square crop).
        horizontal_flip: flip half of the training clips left-right (never at evaluation).
        mean, std: per-channel normalization of pixel values in ``[0, 1]``.

    Call it with ``frames`` (uint8 ``[T, H, W, 3]``) and, for training, a ``torch.Generator``
    that decides the crop position and the flip; without a generator it centre-crops and never
    flips. Returns float32 ``[3, T, h, w]``.
    """

    short_side: int = 128
    crop_size: int | tuple[int, int] = 112
    horizontal_flip: bool = True
    mean: tuple[float, float, float] = KINETICS_MEAN
    std: tuple[float, float, float] = KINETICS_STD

    def __post_init__(self) -> None:
        if not isinstance(self.short_side, int) or self.short_side < 1:
            raise ValueError(f"short_side must be a positive int, got {self.short_side!r}")
        crop = _pair(self.crop_size, "crop_size")
        if min(crop) > self.short_side:
            raise ValueError(
                f"crop_size {crop} does not fit in frames resized to short side {self.short_side}"
            )
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    @property
    def crop_hw(self) -> tuple[int, int]:
        return _pair(self.crop_size, "crop_size")

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Frame size after the short-side resize (scaled up further if the crop needs it)."""
        ch, cw = self.crop_hw
        scale = max(self.short_side / min(height, width), ch / height, cw / width)
        return max(ch, round(height * scale)), max(cw, round(width * scale))

    def __call__(
        self, frames: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames [T, H, W, 3], got {tuple(frames.shape)}")
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # [T, 3, H, W]
        h, w = self.resized_hw(x.shape[-2], x.shape[-1])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        ch, cw = self.crop_hw
        if generator is None:
            top, left, flip = (h - ch) // 2, (w - cw) // 2, False
        else:
            top = int(torch.randint(h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(w - cw + 1, (1,), generator=generator))
            coin = float(torch.rand((), generator=generator))
            flip = self.horizontal_flip and coin < 0.5
        x = x[..., top : top + ch, left : left + cw]
        if flip:
            x = x.flip(-1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.permute(1, 0, 2, 3).contiguous()  # [3, T, h, w]
