"""How many entries the ``topk`` policy keeps: the per-dim keep ratio under credited outputs,
and channel counts rounded to a multiple without drifting off the budget.

Pure functions of the layers' MAC shares; :class:`~lightning_dance.aap.AdaptivePruner` caches
their results per budget (:func:`memo`).

Example:
    >>> round(credited_keep_ratio([(1.0, 2)], target=0.25), 4)  # two dims: r**2 == 0.25
    0.5
    >>> rounded_channels({"a": 0.5, "b": 0.5}, {"a": 16, "b": 16}, 0.5, dims=1, multiple=8,
    ...                  min_keep=1)
    {'a': 8, 'b': 8}
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from lightning_dance.masks import keep_count, multiple_options

__all__ = ["credited_keep_ratio", "memo", "rounded_channels"]

T = TypeVar("T")


def memo(cache: dict, key: Hashable, make: Callable[[], T], size: int = 64) -> T:
    """``cache[key]``, made by ``make()`` the first time (the cache is emptied past ``size``)."""
    if key not in cache:
        if len(cache) > size:
            cache.clear()
        cache[key] = make()
    return cache[key]


def rounded_channels(
    shares: dict[str, float],
    channels: dict[str, int],
    ratio: float,
    *,
    dims: int,
    multiple: int,
    min_keep: int,
) -> dict[str, int]:
    """``{layer: kept channels}``: each layer's count the multiple of ``multiple`` just below or
    above ``ratio * C`` (or all ``C``), chosen in network order so that the MACs rounded away
    and those added cancel (error diffusion weighted by each layer's MAC share ``shares``, its
    other ``dims - 1`` dims kept at ``ratio``). Layers of at most ``multiple`` channels are
    not rounded."""
    others = ratio ** (dims - 1)
    plan: dict[str, int] = {}
    error = 0.0  # MACs (fraction of the model) kept beyond the unrounded counts so far
    for name, share in shares.items():
        c = channels[name]
        exact = min(float(c), max(float(min_keep), ratio * c))
        if c <= multiple:
            plan[name] = keep_count(ratio, c, min_keep)
            continue
        per_channel = share * others / c
        options = multiple_options(exact, c, multiple)
        k = min(options, key=lambda o: abs(error + per_channel * (o - exact)))
        k = min(c, max(min_keep, k))
        error += per_channel * (k - exact)
        plan[name] = k
    return plan


def credited_keep_ratio(shares: list[tuple[float, int]], target: float) -> float:
    """The per-dim keep ratio ``r`` with ``sum(share * r**exponent) == target`` (bisection;
    ``1e-3`` at the least): a layer's MACs scale with ``r`` once per pruned dim, and once more
    for a channel chain's producer, whose consumer's kept channels it alone computes."""
    lo, hi = 1e-3, 1.0
    if sum(f * lo**e for f, e in shares) >= target:
        return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(f * mid**e for f, e in shares) < target else (lo, mid)
    return hi
