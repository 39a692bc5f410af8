"""Masks: how controller scores become per-sample keep decisions over a layer's input.

A Conv3d input ``x [N, C, T, H, W]`` is masked along three *dims*:

- ``frame``: ``m_t [N, T]``,
- ``channel``: ``m_c [N, C]``,
- ``feature``: ``m_f [N, H, W]``, constant over spatial blocks (the controller scores a ``g x g``
  grid of blocks; :func:`expand_blocks` maps it to the layer's resolution).

The layer then reads ``x * m_t * m_c * m_f`` (:func:`apply_masks`). Gates turn logits into masks:

- ``threshold`` (DANCE: the number kept varies per input): keep where ``logit > 0`` at eval;
  while training, a straight-through Gumbel-sigmoid gate: the forward pass uses the hard 0/1 mask
  of ``sigmoid((logit + logistic noise) / tau) > 0.5`` and gradients flow through the soft value.
- ``topk`` (fixed keep-count per layer, static shapes): keep the ``k`` highest logits per sample
  (CNN Mixture-of-Depths style), straight-through during training.

Every gate keeps at least ``min_keep`` entries per sample, so no layer ever reads an all-zero
input and no gather in the fast path or an export is ever empty.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    >>> threshold_gate(logits, training=False)
    tensor([[1., 0., 1., 0.]])
    >>> topk_gate(logits, k=1, training=False)
    tensor([[1., 0., 0., 0.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DIMS",
    "check_dims",
    "LayerMasks",
    "apply_masks",
    "expand_blocks",
    "keep_count",
    "multiple_options",
    "threshold_gate",
    "topk_gate",
]

#: The prunable dims of a Conv3d input, in the order used everywhere in the package.
DIMS: tuple[str, ...] = ("frame", "channel", "feature")


def check_dims(dims: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``dims`` validated (known, not repeated, at least one) and put in :data:`DIMS` order."""
    dims = tuple(dims)
    if not dims:
        raise ValueError(f"dims must name at least one of {DIMS}")
    unknown = [d for d in dims if d not in DIMS]
    if unknown:
        raise ValueError(f"unknown dims {unknown}; choose from {DIMS}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims must not repeat: {dims}")
    return tuple(d for d in DIMS if d in dims)


def check_layer_dims(
    layer_dims: object, layers: list[str], dims: tuple[str, ...], policy: object = None
) -> dict[str, tuple[str, ...]]:
    """``{layer: dims}`` validated: instrumented layers only, each a subset of ``dims`` (may be
    empty: the layer keeps everything), put in :data:`DIMS` order; refused for a ``policy``
    with fixed counts (``topk`` splits its budget evenly over every layer's dims).

    Example:
        >>> check_layer_dims({"b": ["channel", "frame"]}, ["a", "b"], DIMS)
        {'b': ('frame', 'channel')}
    """
    if not hasattr(layer_dims, "items"):
        raise TypeError(f"layer_dims must map layer names to dims, got {type(layer_dims).__name__}")
    if layer_dims and getattr(policy, "fixed_counts", False):
        raise ValueError(
            "layer_dims needs a policy whose keep counts follow the scores (threshold, "
            f"attention): the {policy.name!r} policy splits the budget evenly over every "
            "layer's dims"
        )
    out = {}
    for name, only in layer_dims.items():
        if name not in layers:
            raise KeyError(
                f"layer_dims names {name!r}, which is not instrumented; instrumented layers "
                f"are e.g. {layers[:5]}"
            )
        if isinstance(only, str):
            raise TypeError(f"layer_dims[{name!r}] must be a list of dims, got the string {only!r}")
        only = tuple(only)
        extra = [d for d in only if d not in dims]
        if extra:
            raise ValueError(
                f"layer_dims[{name!r}] names {extra}, which the pruner does not prune "
                f"(dims={dims}): add them to dims or drop them here"
            )
        out[name] = tuple(d for d in DIMS if d in only)
    return out


@dataclass
class LayerMasks:
    """Masks of one layer for a batch: hard 0/1 ``values`` and keep ``probs`` per dim.

    ``values[dim]`` has shape ``[N, T]``, ``[N, C]`` or ``[N, H, W]`` (full resolution). In
    training the values carry straight-through gradients. ``probs`` feed the differentiable
    expected-MAC count: ``[N, T]``, ``[N, C]`` and, for features, per *block* ``[N, gh, gw]``
    (straight-through gate values: 0/1 forward, so the count equals the executed one in value,
    with the gates' gradients). A dim that is not pruned for this layer is absent from both.
    """

    values: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]

    def kept_fraction(self) -> dict[str, torch.Tensor]:
        """Per-sample fraction kept along each dim, ``[N]`` each (detached)."""
        return {d: v.detach().flatten(1).float().mean(1) for d, v in self.values.items()}


def keep_count(ratio: float, size: int, min_keep: int = 1, multiple: int = 1) -> int:
    """Number of entries a ``topk`` gate keeps: ``round(ratio * size)`` clamped to [min_keep, size].

    ``multiple > 1`` rounds that count to the nearest multiple of ``multiple`` (at least one
    multiple), or to ``size`` itself when that is nearer; sizes up to ``multiple`` are not
    rounded. Kernels are faster at some sizes (oneDNN: multiples of 8 channels).

    Example:
        >>> keep_count(0.4, 72), keep_count(0.4, 72, multiple=8), keep_count(0.99, 115, multiple=8)
        (29, 32, 115)
    """
    k = min(size, max(min_keep, round(ratio * size)))
    if multiple > 1 and size > multiple:
        k = max(min_keep, min(multiple_options(k, size, multiple), key=lambda o: abs(o - k)))
    return int(min(size, k))


def multiple_options(count: float, size: int, multiple: int) -> tuple[int, ...]:
    """The allowed kept counts around ``count`` when counts must be multiples of ``multiple``
    (at least one) or all ``size`` entries: the one just below and the one just above (one
    option when ``count`` is on it), ascending. For ``size > multiple``.

    Example:
        >>> multiple_options(12.8, 32, 8), multiple_options(16, 32, 8), multiple_options(113, 115, 8)
        ((8, 16), (16,), (112, 115))
    """
    below = max(multiple, int(count // multiple) * multiple)
    return (below, min(size, below + multiple)) if count > below else (below,)


def _ensure_min_keep(hard: torch.Tensor, scores: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Force the ``min_keep`` highest-scoring entries of each row of ``hard`` to 1."""
    if min_keep <= 0:
        return hard
    k = min(min_keep, scores.shape[-1])
    top = scores.topk(k, dim=-1).indices
    return hard.scatter(-1, top, 1.0)


def logistic_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard logistic noise shaped like ``like`` (the gates' exploration noise)."""
    if generator is None:
        u = torch.rand_like(like)
    else:
        u = torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    u = u.clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def threshold_gate(
    logits: torch.Tensor,
    *,
    training: bool,
    tau: float = 1.0,
    min_keep: int = 1,
    noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Input-dependent keep mask over the last dim of ``logits`` (``[N, K]``).

    Eval: ``logit > 0``. Training: straight-through Gumbel-sigmoid (hard forward, soft gradient),
    the logistic noise scaled by ``noise`` (0: the eval decision, with soft gradients), drawn
    from ``generator`` (default: the global RNG).
    At least ``min_keep`` entries per row are kept (the highest logits).
    """
    if training:
        noisy = logits + float(noise) * logistic_noise(logits, generator) if noise else logits
        soft = torch.sigmoid(noisy / tau)
        hard = _ensure_min_keep((soft > 0.5).to(logits.dtype), noisy, min_keep)
        return hard + (soft - soft.detach())  # exactly 0/1 in value
    hard = (logits > 0).to(logits.dtype)
    return _ensure_min_keep(hard, logits, min_keep)


def topk_gate(
    logits: torch.Tensor,
    k: int,
    *,
    training: bool,
    tau: float = 1.0,
    noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep exactly ``k`` entries per row of ``logits`` (``[N, K]``): the highest scores.

    Training adds logistic noise (scaled by ``noise``, drawn from ``generator``, default the
    global RNG) to the ranking (exploration) and passes gradients straight through
    ``sigmoid(logits / tau)``.
    """
    size = logits.shape[-1]
    if not 1 <= k <= size:
        raise ValueError(f"topk gate needs 1 <= k <= {size}, got k={k}")
    noisy = training and noise
    scores = logits + float(noise) * logistic_noise(logits, generator) if noisy else logits
    hard = torch.zeros_like(logits).scatter(-1, scores.topk(k, dim=-1).indices, 1.0)
    if not training:
        return hard
    soft = torch.sigmoid(logits / tau)
    return hard + (soft - soft.detach())  # exactly 0/1 in value


def expand_blocks(blocks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Block mask/probabilities ``[N, gh, gw]`` -> full resolution ``[N, H, W]`` (nearest).

    Row ``r`` belongs to block row ``floor(r * gh / H)`` (columns alike), as in
    ``F.interpolate(mode="nearest")``, so blocks tile the frame even when ``H % gh != 0``.
    """
    if blocks.dim() != 3:
        raise ValueError(f"block masks must be [N, gh, gw], got shape {tuple(blocks.shape)}")
    return F.interpolate(blocks.unsqueeze(1), size=size, mode="nearest").squeeze(1)


def apply_masks(x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x [N, C, T, H, W] * m_t * m_c * m_f`` (broadcast); dims absent from ``values`` stay."""
    if x.dim() != 5:
        raise ValueError(f"a Conv3d input must be [N, C, T, H, W], got shape {tuple(x.shape)}")
    n, c, t, h, w = x.shape
    out = x
    if "frame" in values:
        out = out * values["frame"].to(x.dtype).view(n, 1, t, 1, 1)
    if "channel" in values:
        out = out * values["channel"].to(x.dtype).view(n, c, 1, 1, 1)
    if "feature" in values:
        out = out * values["feature"].to(x.dtype).view(n, 1, 1, h, w)
    return out
