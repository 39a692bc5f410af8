"""What a clip must be for a model: one up-front check with errors that name the fix.

Example:
    >>> import torch, torch.nn as nn
    >>> stem = nn.Conv3d(3, 8, 3, padding=1)
    >>> check_clip(torch.randn(1, 3, 4, 16, 16), stem, "stem")
    >>> check_clip(torch.zeros(1, 3, 4, 16, 16, dtype=torch.uint8), stem, "stem")
    Traceback (most recent call last):
    ...
    TypeError: the clip is a torch.uint8 tensor and the model's parameters are torch.float32 on cpu: convert and normalize it first, e.g. `clip = clip.to(torch.float32) / 255` followed by the mean / std normalization the model was trained with
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_clip"]


def check_clip(clip: torch.Tensor, stem: nn.Conv3d, stem_name: str) -> None:
    """Clear errors for a clip ``stem`` (the model's first conv, ``stem_name``) cannot take:
    wrong type or rank, empty batch, wrong dtype or device, wrong channel count, too few frames,
    NaN or inf.

    The clip must be a floating-point tensor of the model's parameters' dtype (the stem
    weight's, e.g. ``float32``) on their device; under ``torch.autocast`` a lower-precision
    floating clip (``float16`` / ``bfloat16``) is accepted too (autocast casts it). Integer
    clips (e.g. ``uint8`` decoded frames) are refused: convert and normalize them first.
    Comparing dtypes and devices costs nothing; the NaN check is one reduction over the clip.
    """
    if not isinstance(clip, torch.Tensor):
        raise TypeError(f"expected a clip tensor [N, C, T, H, W], got {type(clip).__name__}")
    if clip.dim() != 5:
        raise ValueError(f"expected a clip [N, C, T, H, W], got shape {tuple(clip.shape)}")
    if clip.shape[0] == 0:
        raise ValueError("empty batch: the clip has N=0 samples")
    weight = stem.weight
    if clip.dtype != weight.dtype or clip.device != weight.device:
        _check_dtype_device(clip, weight)
    if clip.shape[1] != stem.in_channels:
        raise ValueError(
            f"the stem {stem_name!r} reads {stem.in_channels} channels, "
            f"got a clip with {clip.shape[1]}: shape {tuple(clip.shape)}"
        )
    pad = stem.padding[0] if isinstance(stem.padding, tuple) else 0
    need_t = stem.dilation[0] * (stem.kernel_size[0] - 1) + 1 - 2 * pad
    if clip.shape[2] < max(1, need_t):
        raise ValueError(
            f"the clip has {clip.shape[2]} frames, fewer than the stem's temporal kernel "
            f"needs ({need_t})"
        )
    # a NaN / inf makes the sum non-finite (one cheap pass); only then (or on an overflow of
    # huge finite values) look at every element
    if not torch.isfinite(clip.sum()) and not torch.isfinite(clip).all():
        raise ValueError("the clip contains NaN or infinite values")


def _check_dtype_device(clip: torch.Tensor, weight: torch.Tensor) -> None:
    model = f"the model's parameters are {weight.dtype} on {weight.device}"
    if not clip.is_floating_point():
        raise TypeError(
            f"the clip is a {clip.dtype} tensor and {model}: convert and normalize it first, "
            f"e.g. `clip = clip.to({weight.dtype}) / 255` followed by the mean / std "
            "normalization the model was trained with"
        )
    if clip.device != weight.device:
        raise ValueError(
            f"the clip is on {clip.device} and {model}: move it with "
            f"`clip.to({str(weight.device)!r})` (or the model with `.to({str(clip.device)!r})`)"
        )
    autocast = torch.is_autocast_enabled(clip.device.type)
    if not autocast or clip.dtype.itemsize > weight.dtype.itemsize:
        raise TypeError(
            f"the clip is {clip.dtype} and {model}: convert it with `clip.to({weight.dtype})`"
            f" (or convert the model with `.to({clip.dtype})`)"
        )
