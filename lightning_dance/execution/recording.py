"""Executed-MAC recorder: count the multiply-adds of every conv call the compact path issues.

:func:`count_executed_macs` sums them, to check the compact path against
:mod:`lightning_dance.executed`; :func:`counted_conv3d` is the conv that records them.

Example:
    >>> import torch
    >>> w = torch.randn(8, 4, 1, 3, 3)
    >>> with count_executed_macs() as m:
    ...     _ = counted_conv3d(torch.randn(1, 4, 2, 5, 5), w, None, 1, (0, 1, 1), 1, 1)
    >>> m.total, m.calls  # 8 * 2 * 5 * 5 outputs, 4 * 9 MACs each
    (14400, 1)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lightning_dance.execution.kernels import fast_conv3d

__all__ = ["ExecutedMacs", "count_executed_macs", "counted_conv3d", "record_macs"]


class ExecutedMacs:
    """Running sum of the MACs the compact path computes (``total``) and its conv calls."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0


_counters: list[ExecutedMacs] = []


@contextlib.contextmanager
def count_executed_macs() -> Iterator[ExecutedMacs]:
    """Sum, over every conv call of the compact path inside the context, ``out.numel() *
    C_in_per_group * prod(kernel)`` (the fvcore convention: bias excluded).

    Example:
        >>> import torch, torch.nn as nn
        >>> from lightning_dance.execution.compact import compact_conv3d
        >>> conv = nn.Conv3d(4, 8, 3, padding=1)
        >>> with count_executed_macs() as m:
        ...     _ = compact_conv3d(conv, torch.randn(1, 4, 2, 4, 4), {})
        >>> m.total  # dense: 8 * 4 * 27 * 2 * 4 * 4
        27648
    """
    counter = ExecutedMacs()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def record_macs(y: torch.Tensor, macs_per_output: int) -> torch.Tensor:
    """``y``, with its multiply-adds added to the active :func:`count_executed_macs`."""
    if _counters:
        macs = y.numel() * macs_per_output
        for c in _counters:
            c.total += macs
            c.calls += 1
    return y


def counted_conv3d(x, w, b, stride, padding, dilation, groups) -> torch.Tensor:
    """:func:`~lightning_dance.execution.kernels.fast_conv3d`, its MACs recorded."""
    y = fast_conv3d(x, w, b, stride, padding, dilation, groups)
    return record_macs(y, w.shape[1] * w.shape[2] * w.shape[3] * w.shape[4])
