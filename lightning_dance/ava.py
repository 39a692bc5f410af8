"""AVA (activation variability amplification): the first step of DANCE.

AVA fine-tunes a 3D CNN so that, for each input, a few frames, channels and spatial positions of
every instrumented layer's input carry most of the activation magnitude. The rest can then be
skipped per input (by AAP) at little cost.

Definition (ours: the DANCE paper publishes no formula). For one sample and one instrumented
layer with input ``a`` of shape ``[C, T, H, W]``, the *saliency vector* of an axis is the mean
absolute activation over the other axes::

    channel: s_c = mean_{t,h,w} |a[c,t,h,w]|   -> [C]
    frame:   s_t = mean_{c,h,w} |a[c,t,h,w]|   -> [T]
    feature: s_p = mean_{c,t}   |a[c,t,p]|     -> [H*W]   (one spatial position p = (h, w))

Its *spread* is the normalized Gini coefficient ``G(s) = sum_i (2i - K - 1) s_(i) / ((K-1) sum s)``
(``s_(i)`` sorted ascending, ``K = len(s)``): 0 when all entries are equal, 1 when one entry holds
all the mass; invariant to ``s -> c*s`` for any ``c > 0`` (so the network cannot win by
rescaling, e.g. through BatchNorm) and bounded in [0, 1]. The *penalty* is minus the weighted
mean of the spreads over samples, recorded layer calls and axes (axis weights ``dim_weights``);
it lies in [-1, 0], so minimizing ``loss + weight * penalty`` increases the variability. Axes of
length 1 (e.g. a single frame) have no spread and are left out of the mean. ``measure`` can pick
``"entropy"`` (1 - normalized entropy of ``s / sum s``) or ``"hhi"`` (normalized Herfindahl index,
i.e. squared coefficient of variation / (K-1)) instead; ``docs/ava.md`` compares them by
measurement.

Plain PyTorch::

    with ava_penalty(model) as ava:            # forward pre-hooks on the selected Conv3d
        logits = model(clips)
    loss = F.cross_entropy(logits, labels) + 2.0 * ava.penalty()

Lightning: ``trainer = L.Trainer(callbacks=[AVACallback()])``: lambda 2.0 with a 50-step warm-up
by default, see ``lightning_dance.ava_callback``.

Limits: only ``nn.Conv3d`` inputs are observed (``lightning_dance.layers.select_conv3d``); the
spread of the feature axis is taken per position, not per block of positions; a layer called
several times in one step contributes one record per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from lightning_dance.layers import LayerSelector, select_conv3d
from lightning_dance.masks import DIMS
from lightning_dance.masks import check_dims as check_dims

__all__ = [
    "MEASURES",
    "AVARecorder",
    "ava_penalty",
    "check_measure",
    "penalty_from_spreads",
    "saliency",
    "spread",
    "validate_dims",
]

#: The available spread measures (all scale-invariant and bounded in [0, 1]).
MEASURES: tuple[str, ...] = ("gini", "entropy", "hhi")

_REDUCE = {"channel": (2, 3, 4), "frame": (1, 3, 4), "feature": (1, 2)}


def saliency(x: Tensor, dim: str) -> Tensor:
    """Per-sample saliency vector of a Conv3d input ``x`` [N, C, T, H, W] along ``dim``.

    Returns float32 ``[N, K]`` (K = C, T or H*W): mean ``|x|`` over the other axes, accumulated
    in float32 whatever the input dtype (bf16/fp16 under autocast).

    Example:
        >>> saliency(torch.ones(2, 3, 4, 5, 5), "frame").shape
        torch.Size([2, 4])
    """
    if dim not in _REDUCE:
        raise ValueError(f"unknown dim {dim!r}; choose from {DIMS}")
    if x.dim() != 5:
        raise ValueError(f"expected a Conv3d input [N, C, T, H, W], got shape {tuple(x.shape)}")
    s = x.abs().mean(dim=_REDUCE[dim], dtype=torch.float32)
    return s.flatten(1)  # feature: [N, H, W] -> [N, H*W]


def check_measure(measure: str) -> str:
    """Return ``measure`` if it is one of :data:`MEASURES`, else raise ``ValueError``."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {MEASURES}")
    return measure


def spread(s: Tensor, measure: str = "gini") -> Tensor:
    """Scale-invariant spread of non-negative vectors ``s`` [..., K] (K >= 2), in [0, 1].

    - ``gini`` (default): normalized Gini coefficient
      ``sum_i (2i - K - 1) s_(i) / ((K - 1) sum s)`` with ``s_(i)`` sorted ascending;
    - ``entropy``: ``1 - H(p)/log K`` with ``p = s / sum s``;
    - ``hhi``: ``(K * sum p^2 - 1)/(K - 1)`` (normalized Herfindahl index).

    All give 0 for a constant vector (and for an all-zero one) and 1 for a one-hot vector.

    Example:
        >>> spread(torch.tensor([0.0, 0.0, 0.0, 5.0])).item()
        1.0
        >>> round(spread(torch.tensor([1.0, 1.0, 2.0, 4.0])).item(), 4)  # same for 10x the values
        0.4167
    """
    check_measure(measure)
    k = s.shape[-1]
    if k < 2:
        raise ValueError(f"spread needs at least 2 entries, got {k}")
    s = s.float()
    total = s.sum(-1, keepdim=True)
    # an all-zero vector has spread 0; dividing by 1 there keeps the gradient finite
    total = torch.where(total > 0, total, torch.ones_like(total))
    if measure == "gini":
        ranks = torch.arange(1, k + 1, device=s.device, dtype=s.dtype)
        coef = (2 * ranks - k - 1) / (k - 1)
        return (torch.sort(s, dim=-1).values * coef).sum(-1) / total.squeeze(-1)
    p = s / total
    if measure == "entropy":
        nz = (p > 0).any(-1)
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        return torch.where(nz, 1.0 - h / math.log(k), torch.zeros_like(h))
    return (k * (p * p).sum(-1) - 1.0).clamp_min(0.0) / (k - 1)


def validate_dims(
    dims: Iterable[str], dim_weights: Mapping[str, float] | Iterable[float] | None
) -> dict[str, float]:
    """Check ``dims`` / ``dim_weights`` and return ``{dim: weight}`` in :data:`DIMS` order.

    ``dims`` are checked by the package's one dims checker (:mod:`lightning_dance.masks`);
    ``dim_weights`` is a mapping (missing dims weigh 1) or a sequence aligned with ``dims``.

    Raises:
        ValueError: empty, unknown or repeated dims; weights that are negative, not finite, all
            zero, or that do not match ``dims``.

    Example:
        >>> validate_dims(("channel", "frame"), [2.0, 1.0])
        {'frame': 1.0, 'channel': 2.0}
    """
    given = (dims,) if isinstance(dims, str) else tuple(dims)
    ordered = check_dims(given)
    if dim_weights is None:
        weights = dict.fromkeys(given, 1.0)
    elif isinstance(dim_weights, Mapping):
        extra = [d for d in dim_weights if d not in given]
        if extra:
            raise ValueError(f"dim_weights names {extra}, which are not in dims={given}")
        weights = {d: float(dim_weights.get(d, 1.0)) for d in given}
    else:
        values = [float(w) for w in dim_weights]
        if len(values) != len(given):
            raise ValueError(f"dim_weights has {len(values)} entries but dims has {len(given)}")
        weights = dict(zip(given, values, strict=True))
    bad = {d: w for d, w in weights.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise ValueError(f"dim_weights must be finite and >= 0, got {bad}")
    if sum(weights.values()) == 0:
        raise ValueError("dim_weights are all zero: the penalty would be empty")
    return {d: weights[d] for d in ordered}


def penalty_from_spreads(
    records: Iterable[Mapping[str, Tensor]], dim_weights: Mapping[str, float]
) -> Tensor:
    """``-(weighted mean of the spreads)`` over records and axes, in [-1, 0].

    Each record maps an axis name to the per-sample spreads [N] of one layer call. The mean is
    over samples first, then weighted by ``dim_weights`` over the (record, axis) pairs present.
    """
    num, den = None, 0.0
    for rec in records:
        for dim, values in rec.items():
            w = dim_weights.get(dim, 0.0)
            if w == 0:
                continue
            term = w * values.mean()
            num = term if num is None else num + term
            den += w
    if num is None:
        raise RuntimeError(
            "AVA recorded no activation to regularize: run the model's forward pass in training "
            "mode (model.train()) while recording, and check that the selected layers have more "
            "than one frame/channel/position along the chosen dims"
        )
    return -num / den


class _Records:
    """What the hooks write into: a small, picklable object shared by all hooks of a recorder.

    Deepcopy/pickle give an empty, inactive copy (recorded tensors belong to the current graph).
    """

    def __init__(self, dims: tuple[str, ...], measure: str) -> None:
        self.dims, self.measure = dims, measure
        self.active = False
        self.items: list[tuple[str, dict[str, Tensor]]] = []
        self.penalty_calls = 0

    def add(self, name: str, x: Tensor) -> None:
        rec = {}
        for dim in self.dims:
            s = saliency(x, dim)
            if s.shape[1] >= 2:
                rec[dim] = spread(s, self.measure)
        self.items.append((name, rec))

    def clear(self) -> None:
        self.items = []
        self.penalty_calls = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"dims": self.dims, "measure": self.measure}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["dims"], state["measure"])


class _SaliencyHook:
    """Forward pre-hook: records the spreads of a Conv3d input while active and training."""

    def __init__(self, records: _Records, name: str) -> None:
        self.records, self.name = records, name

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.records.active and module.training and args and isinstance(args[0], Tensor):
            self.records.add(self.name, args[0])


class AVARecorder:
    """Records the spreads of the selected Conv3d inputs and turns them into the AVA penalty.

    Args:
        model: the network (an ``nn.Module``; a LightningModule works too).
        layers: which Conv3d inputs (``None``: all but the stem; regex, names or predicate, see
            :func:`lightning_dance.layers.select_conv3d`).
        dims: axes to regularize, any of ``("frame", "channel", "feature")``.
        dim_weights: per-axis weights (mapping or sequence aligned with ``dims``; default 1).
        measure: ``"gini"`` (default), ``"entropy"`` or ``"hhi"`` (see :func:`spread`).

    Hooks record only between :meth:`start` and :meth:`stop` and only for modules in training
    mode. Use it as a context manager (attach + start, then stop + detach) or call
    :meth:`attach` / :meth:`start` / :meth:`stop` / :meth:`detach` yourself.

    Example:
        >>> net = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU(), nn.Conv3d(4, 4, 3))
        >>> with AVARecorder(net) as ava:
        ...     _ = net(torch.randn(2, 3, 6, 8, 8))
        >>> -1.0 <= ava.penalty().item() <= 0.0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector = None,
        *,
        dims: Iterable[str] = DIMS,
        dim_weights: Mapping[str, float] | Iterable[float] | None = None,
        measure: str = "gini",
    ) -> None:
        self.measure = check_measure(measure)
        self.dim_weights = validate_dims(dims, dim_weights)
        self.dims = tuple(self.dim_weights)
        self.layers = select_conv3d(model, layers)
        self._records = _Records(self.dims, measure)
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def num_records(self) -> int:
        """Layer calls recorded since the last :meth:`start` / :meth:`clear`."""
        return len(self._records.items)

    def attach(self) -> AVARecorder:
        if not self._handles:
            self._handles = [
                m.register_forward_pre_hook(_SaliencyHook(self._records, name))
                for name, m in self.layers.items()
            ]
        return self

    def detach(self) -> None:
        self.stop()
        for h in self._handles:
            h.remove()
        self._handles = []

    def start(self) -> None:
        """Clear previous records and start recording."""
        self._records.clear()
        self._records.active = True

    def stop(self) -> None:
        self._records.active = False

    def clear(self) -> None:
        self._records.clear()

    def penalty(self) -> Tensor:
        """``-(weighted mean spread)`` of what was recorded, a differentiable scalar in [-1, 0]."""
        self._records.penalty_calls += 1
        return penalty_from_spreads((r for _, r in self._records.items), self.dim_weights)

    def spreads(self) -> dict[str, float]:
        """Mean spread per axis over the recorded samples and layer calls (for logging)."""
        out = {}
        for dim in self.dims:
            vals = [r[dim].detach().mean() for _, r in self._records.items if dim in r]
            if vals:
                out[dim] = torch.stack(vals).mean().item()
        return out

    def __enter__(self) -> AVARecorder:
        self.attach()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def ava_penalty(
    model: nn.Module,
    layers: LayerSelector = None,
    *,
    dims: Iterable[str] = DIMS,
    dim_weights: Mapping[str, float] | Iterable[float] | None = None,
    measure: str = "gini",
) -> AVARecorder:
    """Context manager recording the AVA penalty of ``model`` (plain PyTorch, no Lightning).

    Example:
        >>> net = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU(), nn.Conv3d(4, 4, 3))
        >>> with ava_penalty(net, dims=("channel",)) as ava:
        ...     out = net(torch.randn(2, 3, 6, 8, 8))
        >>> loss = out.pow(2).mean() + 0.1 * ava.penalty()  # records stay until the next start
    """
    return AVARecorder(
        model,
        layers,
        dims=dims,
        dim_weights=dim_weights,
        measure=measure,
    )
