"""Small helpers shared by the model builders (width scaling, argument checks)."""

from __future__ import annotations

import math

__all__ = ["scale_width", "check_width", "check_num_classes"]


def check_width(width: float) -> float:
    """Validate a width multiplier (a finite number > 0) and return it as a float."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a number > 0, got {width!r}")
    width = float(width)
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0, got {width}")
    return width


def check_num_classes(num_classes: int) -> int:
    """Validate a number of classes (an int >= 1)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def scale_width(channels: int, width: float, divisor: int = 8, minimum: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``minimum``).

    ``width == 1`` returns ``channels`` unchanged (even when it is not a multiple of ``divisor``,
    e.g. the 45-channel R(2+1)D stem), so full-width models equal the reference constructors.

    Example:
        >>> scale_width(64, 0.25), scale_width(45, 0.25), scale_width(45, 1.0)
        (16, 8, 45)
    """
    if width == 1.0:
        return channels
    return max(minimum, int(round(channels * width / divisor)) * divisor)
