"""The AAP controller: a small network that reads the stem's output and scores, for every
instrumented Conv3d and every input clip, which frames, channels and spatial blocks to keep.

Statistics of the stem output ``s [N, C0, T0, H0, W0]`` (all cheap reductions):

- per channel: mean and standard deviation over ``(T, H, W)`` -> ``[N, 2 * C0]``;
- per frame: log energy ``log mean(s_t^2)`` and log motion ``log mean |s_t - s_{t-1}|``,
  z-scored within the clip -> ``[N, 2, T0]`` (and 8 adaptive-pooled bins for the trunk);
- per spatial block: mean ``|s|`` and mean temporal change over a ``grid x grid`` block map,
  z-scored within the clip -> ``[N, 2, g, g]``.

A trunk MLP (LayerNorm -> Linear -> ReLU -> Linear -> ReLU) turns the summary (and, for a
budget-conditioned controller, the budget) into an embedding ``h``. Then, per layer ``l``:

- channel logits: a linear head of ``h`` (one matmul for all layers);
- frame logits: ``a_l . F_t + v_l . h + b_l`` from the per-frame statistics resampled to the
  layer's frame count, so one controller serves any clip length;
- feature logits: ``a'_l . G_b + v'_l . h + b'_l`` from the block statistics pooled to the layer's
  block grid (``min(grid, H) x min(grid, W)``), so one controller serves any resolution;
- a budget-conditioned controller adds ``beta_{l,dim} * logit(budget)`` to every logit (a learned,
  per-layer sensitivity to the budget), on top of feeding the budget to the trunk.

Example:
    >>> import torch
    >>> ctrl = Controller(stem_channels=8, layer_channels={"conv2": 16, "conv3": 32})
    >>> ctx = ctrl(torch.randn(2, 8, 4, 16, 16))
    >>> ctrl.channel_logits(ctx, "conv3").shape, ctrl.frame_logits(ctx, "conv2", 4).shape
    (torch.Size([2, 32]), torch.Size([2, 4]))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.masks import DIMS, check_dims

__all__ = [
    "Controller",
    "ControllerContext",
    "ControllerLike",
    "NoController",
    "StaticController",
    "check_controller",
]

_FRAME_BINS = 8
_EPS = 1e-6
#: initial weight of the per-layer local frame / block statistics (energy, motion)
LOCAL_INIT = 0.01


@functools.lru_cache(maxsize=64)
def _pool_matrix(length: int, bins: int) -> tuple[tuple[float, ...], ...]:
    """``[length, bins]`` weights of ``F.adaptive_avg_pool1d(x, bins)`` as a matrix (bin ``j``
    averages ``x[floor(j L / B) : ceil((j + 1) L / B)]``), so that pooling is a ``matmul``:
    up-sampling with ``adaptive_avg_pool1d`` exports to ONNX as GatherND + a 6D ReduceMean,
    which the Hexagon NPU (QNN HTP) cannot run."""
    rows = [[0.0] * bins for _ in range(length)]
    for j in range(bins):
        lo, hi = (j * length) // bins, -((-(j + 1) * length) // bins)
        for t in range(lo, hi):
            rows[t][j] = 1.0 / (hi - lo)
    return tuple(tuple(r) for r in rows)


def _no_autocast(fn):
    """Run a controller method with autocast disabled on the controller's device: under
    mixed precision (``bf16-mixed`` / ``16-mixed``) the trunk and heads would otherwise run in
    half precision, and the keep decisions (``logit > 0``, top-k) would depend on the precision
    of the rest of the model. The statistics are float32 already; the trunk runs in the
    controller's own dtype. Costs one flag lookup per call when autocast is off."""

    @functools.wraps(fn)
    def run(self: Controller, *args, **kwargs):
        device = self.trunk[1].weight.device.type
        if not torch.is_autocast_enabled(device):
            return fn(self, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(self, *args, **kwargs)

    return run


def _zscore(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, keepdim=True, unbiased=False)
    return (x - mean) / (std + 1e-3)


def _stem_reductions(
    s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The passes over the stem output ``s [N, C, T, H, W]`` (its largest input):
    per-channel mean ``[N, C]``, mean square over ``(H, W)`` ``[N, C, T]``, mean absolute
    frame change over channels ``[N, T-1, H, W]`` (None for one frame), mean magnitude over
    ``(C, T)`` ``[N, H, W]``.

    Each reduction runs over the dims in memory order: for a ``channels_last_3d`` stem output
    (the fast path's layout) on a ``[N, T, H, W, C]`` view, where reducing ``(H, W)`` is ~9x
    faster than on the strided NCDHW view (0.1 vs 0.9 ms for 24x8x56x56). Same values, up to
    the order of float additions.
    """
    if s.is_contiguous() or not s.is_contiguous(memory_format=torch.channels_last_3d):
        sq = (s * s).mean(dim=(3, 4))
        change = (s[:, :, 1:] - s[:, :, :-1]).abs().mean(dim=1) if s.shape[2] > 1 else None
        return s.mean(dim=(2, 3, 4)), sq, change, s.abs().mean(dim=(1, 2))
    v = s.permute(0, 2, 3, 4, 1)  # [N, T, H, W, C], contiguous
    sq = (v * v).mean(dim=(2, 3)).transpose(1, 2)  # [N, C, T]
    change = (v[:, 1:] - v[:, :-1]).abs().mean(dim=4) if v.shape[1] > 1 else None
    return v.mean(dim=(1, 2, 3)), sq, change, v.abs().mean(dim=(1, 4))


@dataclass
class ControllerContext:
    """What the controller computed from one batch's stem output (shared by all layers)."""

    embedding: torch.Tensor  # [N, hidden]
    channel_logits: torch.Tensor  # [N, sum of the layers' channels]
    frame_stats: torch.Tensor  # [N, 2, T0]
    motion_map: torch.Tensor  # [N, 1, H0, W0]
    magnitude_map: torch.Tensor  # [N, 1, H0, W0]
    budget_logit: torch.Tensor | None  # [N, 1] or None
    #: what every layer's logits share, made once per context (the global heads over all
    #: layers, the frame statistics per frame count, the block statistics per grid)
    shared: dict = field(default_factory=dict, repr=False, compare=False)

    def once(self, key: object, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, computed the first time ``key`` is asked for in this context."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


@runtime_checkable
class ControllerLike(Protocol):
    """What :class:`~lightning_dance.aap.AdaptivePruner` needs of a controller (DANCE's
    :class:`Controller` is one; pass your own with ``AdaptivePruner(controller=...)``):

    - ``controller(stem_out, budget)``: a context for the batch (anything; ``budget`` is a
      0-dim tensor for budget-conditioned controllers, else ``None``);
    - ``layer_logits(ctx, layer, (C, T, H, W))``: ``{dim: scores}`` for the pruner's dims
      (channels ``[N, C]``, frames ``[N, T]``, spatial blocks ``[N, gh, gw]``);
    - ``stacked_channel_logits(ctx, layers)``: ``[N, len(layers), C]`` channel scores of
      equal-width layers (the batch-1 index plan of fixed-count policies);
    - optionally ``stacked_logits(ctx, layers, dim, size)``: ``[N, len(layers), ...]`` scores
      of one dim for layers whose inputs share a size (eval decisions of many layers in a few
      ops, :meth:`~lightning_dance.decision.DecisionPlan.prefetch`; without it, each layer is
      decided alone);
    - ``macs(stem_shape)``: its multiply-adds per clip (counted in every executed figure);
    - ``grid``: the spatial block grid; ``budget_conditioned``: whether it reads the budget.
    """

    grid: int
    budget_conditioned: bool

    def __call__(self, stem_out: torch.Tensor, budget: torch.Tensor | None = None) -> Any: ...

    def layer_logits(
        self, ctx: Any, layer: str, shape: tuple[int, int, int, int]
    ) -> dict[str, torch.Tensor]: ...

    def stacked_channel_logits(self, ctx: Any, layers: Sequence[str]) -> torch.Tensor: ...

    def macs(self, stem_shape: tuple[int, int, int, int]) -> int: ...


def check_controller(controller: Any) -> None:
    """TypeError naming what ``controller`` lacks of :class:`ControllerLike`."""
    if not isinstance(controller, nn.Module):
        raise TypeError(f"a controller must be an nn.Module, got {type(controller).__name__}")
    members = ("layer_logits", "stacked_channel_logits", "macs", "grid", "budget_conditioned")
    missing = [m for m in members if not hasattr(controller, m)]
    if missing:
        raise TypeError(
            f"{type(controller).__name__} lacks {missing} of a controller "
            "(lightning_dance.controller.ControllerLike lists what the pruner calls)"
        )


class Controller(nn.Module):
    """Scores frames, channels and spatial blocks of every instrumented layer from stem stats.

    Args:
        stem_channels: output channels of the stem conv (the controller's input).
        layer_channels: ``{layer name: input channels}`` of the instrumented layers, in order.
        dims: which dims to score (subset of ``("frame", "channel", "feature")``).
        hidden: trunk width.
        grid: spatial block grid (``grid x grid`` blocks at most per layer).
        budget_conditioned: take the budget as an input (one controller for a range of budgets).
        init_keep: initial keep probability of every logit (sets the heads' biases).

    Precision: the statistics are computed in float32 and the trunk and heads in the
    controller's own dtype (float32 unless it was cast), also under ``torch.autocast``
    (mixed-precision training), which is disabled inside :meth:`forward` and the per-layer
    logit methods: for the same stem output the logits, hence the masks and MAC counts, are
    those of a float32 run. (The stem output itself is computed in the model's precision.)
    """

    def __init__(
        self,
        stem_channels: int,
        layer_channels: dict[str, int],
        *,
        dims: tuple[str, ...] = DIMS,
        hidden: int = 64,
        grid: int = 4,
        budget_conditioned: bool = False,
        init_keep: float = 0.9,
    ) -> None:
        super().__init__()
        if stem_channels < 1 or not layer_channels:
            raise ValueError("the controller needs stem_channels >= 1 and at least one layer")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if not 0.0 < init_keep < 1.0:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep}")
        self.dims = check_dims(dims)
        self.layer_names = list(layer_channels)
        self.layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self.layer_channels = dict(layer_channels)
        self.stem_channels, self.hidden, self.grid = stem_channels, hidden, grid
        self.budget_conditioned = budget_conditioned
        offsets = [0]
        for name in self.layer_names:
            offsets.append(offsets[-1] + self.layer_channels[name])
        self._channel_slices = {
            name: (offsets[i], offsets[i + 1]) for i, name in enumerate(self.layer_names)
        }
        n_layers = len(self.layer_names)
        summary = 2 * stem_channels + 2 * _FRAME_BINS + 2 * grid * grid
        summary += 2 if budget_conditioned else 0
        self.trunk = nn.Sequential(
            nn.LayerNorm(summary),
            nn.Linear(summary, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        bias = math.log(init_keep / (1 - init_keep))
        self.channel_head = nn.Linear(hidden, offsets[-1]) if "channel" in self.dims else None
        if "frame" in self.dims:
            self.frame_global = nn.Linear(hidden, n_layers)
            # a slight prior toward high-energy / moving frames; zeros would tie every frame of
            # an untrained controller, and runtimes break top-k ties differently
            self.frame_local = nn.Parameter(torch.full((n_layers, 2), LOCAL_INIT))
        if "feature" in self.dims:
            self.feature_global = nn.Linear(hidden, n_layers)
            self.feature_local = nn.Parameter(torch.full((n_layers, 2), LOCAL_INIT))
        if budget_conditioned:
            self.budget_scale = nn.Parameter(torch.ones(n_layers, len(self.dims)))
        for head in (
            self.channel_head,
            getattr(self, "frame_global", None),
            getattr(self, "feature_global", None),
        ):
            if head is not None:
                nn.init.normal_(head.weight, std=0.01)
                nn.init.constant_(head.bias, bias)

    # ------------------------------------------------------------------ statistics and trunk
    @_no_autocast
    def forward(
        self, stem_out: torch.Tensor, budget: torch.Tensor | None = None
    ) -> ControllerContext:
        """Statistics + trunk + channel logits for a batch of stem outputs ``[N, C0, T0, H0, W0]``."""
        if stem_out.dim() != 5 or stem_out.shape[1] != self.stem_channels:
            raise ValueError(
                f"the controller expects the stem output [N, {self.stem_channels}, T, H, W], "
                f"got shape {tuple(stem_out.shape)}"
            )
        s = stem_out.float()
        n, _, t0, _, _ = s.shape
        chan_mean, sq, change, magnitude = _stem_reductions(s)
        # E[s^2] - E[s]^2: ~25x cheaper than Tensor.std on a stem output on CPU
        chan_std = (sq.mean(dim=2) - chan_mean**2).clamp_min(0).sqrt()
        energy = torch.log(sq.mean(dim=1) + _EPS)  # [N, T0]
        if change is not None:
            motion = torch.log(change.mean(dim=(2, 3)) + _EPS)
            motion = torch.cat([motion[:, :1], motion], dim=1)  # frame 0 borrows frame 1's
            motion_map = change.mean(dim=1).unsqueeze(1)
        else:
            motion = torch.zeros_like(energy)
            motion_map = torch.zeros_like(s[:, :1, 0])
        frame_stats = torch.stack([_zscore(energy, 1), _zscore(motion, 1)], dim=1)  # [N, 2, T0]
        magnitude_map = magnitude.unsqueeze(1)  # [N, 1, H0, W0]
        g = self.grid
        blocks = torch.cat([magnitude_map, motion_map], dim=1)
        block_summary = _zscore(F.adaptive_avg_pool2d(blocks, (g, g)), (2, 3)).flatten(1)
        pool = torch.tensor(_pool_matrix(t0, _FRAME_BINS), dtype=s.dtype, device=s.device)
        frame_summary = (frame_stats @ pool).flatten(1)  # adaptive_avg_pool1d to 8 bins
        parts = [chan_mean, chan_std, frame_summary, block_summary]
        budget_logit = None
        if self.budget_conditioned:
            if budget is None:
                raise ValueError("a budget-conditioned controller needs a budget")
            b = torch.as_tensor(budget, dtype=s.dtype, device=s.device).reshape(-1, 1)
            b = b.expand(n, 1).clamp(1e-3, 1 - 1e-3)
            budget_logit = torch.log(b) - torch.log1p(-b)
            parts += [b, budget_logit]
        # statistics in float32; the trunk in the controller's own dtype (a model and
        # controller cast to bfloat16 / float64 for deployment run as cast)
        h = self.trunk(torch.cat(parts, dim=1).to(self.trunk[1].weight.dtype))
        channel_logits = self.channel_head(h) if self.channel_head is not None else h[:, :0]
        return ControllerContext(
            h, channel_logits, frame_stats, motion_map, magnitude_map, budget_logit
        )

    def _budget_shift(
        self, ctx: ControllerContext, layer: int | torch.Tensor, dim: str
    ) -> torch.Tensor | float:
        """``[N, 1]`` (one layer index) or ``[N, L]`` (a tensor of ``L`` layer indices), or 0."""
        if ctx.budget_logit is None:
            return 0.0
        return self.budget_scale[layer, self.dims.index(dim)] * ctx.budget_logit

    # ------------------------------------------------------------------ per-layer logits
    @_no_autocast
    def channel_logits(self, ctx: ControllerContext, layer: str) -> torch.Tensor:
        """``[N, C_in]`` channel logits of ``layer``."""
        start, stop = self._channel_slices[layer]
        logits = ctx.channel_logits[:, start:stop]
        if ctx.budget_logit is None:  # a view: no op per layer and forward
            return logits
        return logits + self._budget_shift(ctx, self.layer_index[layer], "channel")

    def channel_bias(self, layer: str) -> torch.Tensor:
        """``[C_in]``: the channel head's bias for ``layer``, a view (a static prior is added
        to it in place: :func:`lightning_dance.priors.apply_channel_prior`)."""
        if self.channel_head is None:
            raise ValueError("this controller does not score channels ('channel' not in dims)")
        start, stop = self._channel_slices[layer]
        return self.channel_head.bias[start:stop]

    @_no_autocast
    def stacked_channel_logits(self, ctx: ControllerContext, layers: Sequence[str]) -> torch.Tensor:
        """``[N, len(layers), C]``: :meth:`channel_logits` of layers with the same ``C_in``,
        stacked by one gather (and one budget shift), for a batched ``topk`` over them."""
        sizes = {self.layer_channels[n] for n in layers}
        if len(sizes) != 1:
            raise ValueError(f"stacked_channel_logits needs layers of one width, got {sizes}")
        logits = ctx.channel_logits
        # (layers, device) -> their logit columns and layer indices, made once per device
        cache = self.__dict__.setdefault("_stacked_index", {})
        key = (tuple(layers), logits.device)
        if key not in cache:
            flat = torch.cat([torch.arange(*self._channel_slices[n]) for n in layers])
            idx = torch.tensor([self.layer_index[n] for n in layers])
            cache[key] = (flat.to(logits.device), idx.to(logits.device))
        flat, idx = cache[key]
        rows = logits.index_select(1, flat).view(len(logits), len(layers), -1)
        if ctx.budget_logit is None:
            return rows
        return rows + self._budget_shift(ctx, idx, "channel").unsqueeze(-1)

    @_no_autocast
    def frame_logits(self, ctx: ControllerContext, layer: str, frames: int) -> torch.Tensor:
        """``[N, frames]`` frame logits of ``layer`` whose input has ``frames`` frames."""
        i = self.layer_index[layer]
        stats = ctx.frame_stats
        if stats.shape[-1] != frames:
            stats = ctx.once(("frame_stats", frames), lambda: F.interpolate(
                ctx.frame_stats, size=frames, mode="linear", align_corners=False
            ))  # fmt: skip
        # multiply-and-sum rather than einsum: the Hexagon NPU (QNN) has no Einsum
        local = (self.frame_local[i].view(1, -1, 1) * stats).sum(1)
        glob = ctx.once("frame_global", lambda: self.frame_global(ctx.embedding))[:, i : i + 1]
        return local + glob + self._budget_shift(ctx, i, "frame")

    @_no_autocast
    def feature_logits(
        self, ctx: ControllerContext, layer: str, size: tuple[int, int]
    ) -> torch.Tensor:
        """``[N, gh, gw]`` block logits of ``layer`` whose input is ``size = (H, W)``."""
        i = self.layer_index[layer]
        gh, gw = min(self.grid, size[0]), min(self.grid, size[1])

        stats = ctx.once(("block_stats", gh, gw), lambda: self._block_stats(ctx, gh, gw))
        local = (self.feature_local[i].view(1, -1, 1, 1) * stats).sum(1)
        glob = ctx.once("feature_global", lambda: self.feature_global(ctx.embedding))
        glob = glob[:, i : i + 1, None]
        shift = self._budget_shift(ctx, i, "feature")
        if isinstance(shift, torch.Tensor):
            shift = shift.unsqueeze(-1)  # [N, 1, 1]
        return local + glob + shift

    @_no_autocast
    def stacked_logits(
        self, ctx: ControllerContext, layers: Sequence[str], dim: str, size: tuple[int, ...]
    ) -> torch.Tensor:
        """``[N, len(layers), *scores]``: the ``dim`` scores of layers whose inputs share
        ``size`` (channels ``(C,)``, frames ``(T,)``, features ``(H, W)``), stacked: the same
        values as :meth:`layer_logits` of each layer, in a few ops for all of them (the
        decision plan's batched eval decisions, :meth:`DecisionPlan.prefetch`)."""
        if dim == "channel":
            return self.stacked_channel_logits(ctx, layers)
        cache = self.__dict__.setdefault("_stacked_rows", {})
        key = (tuple(layers), ctx.embedding.device)
        if key not in cache:
            cache[key] = torch.tensor([self.layer_index[n] for n in layers], device=key[1])
        idx = cache[key]
        if dim == "frame":
            stats = ctx.frame_stats  # [N, 2, T]
            if stats.shape[-1] != size[0]:
                stats = ctx.once(("frame_stats", size[0]), lambda: F.interpolate(
                    ctx.frame_stats, size=size[0], mode="linear", align_corners=False
                ))  # fmt: skip
            local = (self.frame_local[idx].view(1, -1, 2, 1) * stats.unsqueeze(1)).sum(2)
            glob = ctx.once("frame_global", lambda: self.frame_global(ctx.embedding))
            shift = self._budget_shift(ctx, idx, "frame")
            shift = shift if isinstance(shift, float) else shift[..., None]
            return local + glob[:, idx, None] + shift
        if dim != "feature":
            raise ValueError(f"unknown dim {dim!r}; expected 'frame', 'channel' or 'feature'")
        gh, gw = min(self.grid, size[0]), min(self.grid, size[1])
        stats = ctx.once(("block_stats", gh, gw), lambda: self._block_stats(ctx, gh, gw))
        local = (self.feature_local[idx].view(1, -1, 2, 1, 1) * stats.unsqueeze(1)).sum(2)
        glob = ctx.once("feature_global", lambda: self.feature_global(ctx.embedding))
        shift = self._budget_shift(ctx, idx, "feature")
        shift = shift if isinstance(shift, float) else shift[..., None, None]
        return local + glob[:, idx, None, None] + shift

    @staticmethod
    def _block_stats(ctx: ControllerContext, gh: int, gw: int) -> torch.Tensor:
        """``[N, 2, gh, gw]``: block magnitude and motion, z-scored over the blocks."""
        maps = torch.cat([ctx.magnitude_map, ctx.motion_map], dim=1)
        return _zscore(F.adaptive_avg_pool2d(maps, (gh, gw)), (2, 3))

    @_no_autocast
    def layer_logits(
        self, ctx: ControllerContext, layer: str, shape: tuple[int, int, int, int]
    ) -> dict[str, torch.Tensor]:
        """``{dim: logits}`` of ``layer`` whose input is ``shape = (C, T, H, W)``, for every dim
        this controller predicts (channel ``[N, C]``, frame ``[N, T]``, feature ``[N, gh, gw]``)."""
        _, t, h, w = shape
        logits: dict[str, torch.Tensor] = {}
        if "frame" in self.dims:
            logits["frame"] = self.frame_logits(ctx, layer, t)
        if "channel" in self.dims:
            logits["channel"] = self.channel_logits(ctx, layer)
        if "feature" in self.dims:
            logits["feature"] = self.feature_logits(ctx, layer, (h, w))
        return logits

    def architecture(self) -> dict[str, int]:
        """``{layer: input channels}``: what a checkpoint of this controller is tied to."""
        return dict(self.layer_channels)

    def macs(self, stem_shape: tuple[int, int, int, int]) -> int:
        """Closed-form multiply-accumulates of the controller for one clip.

        Counts the trunk and head matmuls, the pooling of the frame statistics to 8 bins (a
        matmul) and one operation per element for each statistic over the stem output
        ``(C0, T0, H0, W0)`` (mean, std, energy, motion, magnitude: 6 reductions with a
        multiply-add each). Per-layer frame/feature heads are counted at the stem's frame
        count and the full block grid; resampling and z-scoring (a few ops per frame/block) are
        ignored.
        """
        c0, t0, h0, w0 = stem_shape
        stats = 6 * c0 * t0 * h0 * w0 + 2 * t0 * _FRAME_BINS
        linears = sum(
            m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear)
        )
        n_layers = len(self.layer_names)
        local = 0
        if "frame" in self.dims:
            local += 2 * t0 * n_layers
        if "feature" in self.dims:
            local += 2 * self.grid * self.grid * n_layers
        return stats + linears + local


class NoController(nn.Module):
    """The controller of a pruner whose policy scores each layer from its own input
    (:attr:`~lightning_dance.policies.Policy.needs_layer_input`, e.g. ``"attention"``): no
    parameters, no multiply-adds, an empty context; asking it for scores is a mistake that
    names the policy.

    Example:
        >>> ctrl = NoController(grid=4, policy="attention")
        >>> ctrl(torch.randn(1, 8, 2, 4, 4)) is None, ctrl.macs((8, 2, 4, 4))
        (True, 0)
    """

    budget_conditioned = False

    def __init__(self, grid: int = 4, policy: str = "") -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid, self.policy = grid, policy

    @classmethod
    def checked(
        cls,
        policy: str,
        *,
        controller: nn.Module | None,
        grid: int,
        budget_conditioned: bool,
        credit_outputs: bool,
    ) -> NoController:
        """The controller of a pruner whose ``policy`` scores layer inputs, after checking that
        the pruner was given nothing that needs a controller."""
        wrong = {
            "controller": controller is not None,
            "budget_conditioned=True": budget_conditioned,
            "credit_outputs=True": credit_outputs,
        }
        given = [name for name, bad in wrong.items() if bad]
        if given:
            raise ValueError(
                f"the {policy!r} policy scores each layer from its own input, without a "
                f"controller and without looking ahead at later layers: drop {given}"
            )
        return cls(grid=grid, policy=policy)

    def forward(self, stem_out: torch.Tensor, budget: torch.Tensor | None = None) -> None:
        return None

    def _no_scores(self) -> RuntimeError:
        return RuntimeError(
            f"the {self.policy!r} policy scores each layer from that layer's input, not from a "
            "controller: ask the decision plan for the layer's masks with inputs=<its input>"
        )

    def layer_logits(self, ctx: Any, layer: str, shape: tuple[int, int, int, int]) -> dict:
        raise self._no_scores()

    def stacked_channel_logits(self, ctx: Any, layers: Sequence[str]) -> torch.Tensor:
        raise self._no_scores()

    def macs(self, stem_shape: tuple[int, int, int, int]) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"grid={self.grid}, policy={self.policy!r}"


class StaticController(nn.Module):
    """Fixed channel scores per layer, the same for every clip: a controller that reads nothing
    (no statistics, no trunk, 0 multiply-adds). What
    :func:`lightning_dance.priors.freeze_channels` puts in place of a trained controller with
    ``standalone=True``: the compact path then skips the statistics, and an export holds the
    kept indices as constants.

    Example:
        >>> ctrl = StaticController({"conv2": torch.tensor([0.1, 0.9, 0.5])})
        >>> ctrl.layer_logits(ctrl(torch.randn(2, 8, 4, 6, 6)), "conv2", (3, 4, 6, 6))["channel"]
        tensor([[0.1000, 0.9000, 0.5000],
                [0.1000, 0.9000, 0.5000]])
        >>> ctrl.macs((8, 4, 6, 6))
        0
    """

    budget_conditioned = False

    def __init__(self, logits: dict[str, torch.Tensor], grid: int = 4) -> None:
        super().__init__()
        if not logits:
            raise ValueError("a static controller needs the channel scores of at least one layer")
        self.layer_names = list(logits)
        self.layer_channels = {name: int(v.numel()) for name, v in logits.items()}
        self.layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self.dims, self.grid = ("channel",), grid
        for i, v in enumerate(logits.values()):
            self.register_buffer(f"logits_{i}", v.detach().flatten().float().clone())

    def channel_bias(self, layer: str) -> torch.Tensor:
        """``[C_in]``: the fixed scores of ``layer``."""
        return getattr(self, f"logits_{self.layer_index[layer]}")

    def forward(self, stem_out: torch.Tensor, budget: torch.Tensor | None = None) -> int:
        return stem_out.shape[0]  # the context: the batch size

    def layer_logits(
        self, ctx: int, layer: str, shape: tuple[int, int, int, int]
    ) -> dict[str, torch.Tensor]:
        return {"channel": self.channel_bias(layer).unsqueeze(0).expand(ctx, -1)}

    def stacked_channel_logits(self, ctx: int, layers: Sequence[str]) -> torch.Tensor:
        rows = torch.stack([self.channel_bias(n) for n in layers])
        return rows.unsqueeze(0).expand(ctx, -1, -1)

    def architecture(self) -> dict[str, int]:
        return dict(self.layer_channels)

    def macs(self, stem_shape: tuple[int, int, int, int]) -> int:
        return 0
