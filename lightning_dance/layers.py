"""Finding the Conv3d layers DANCE works on.

Every DANCE component (the AVA regularizer, the controller's masks, the MAC accounting and the
fast execution path) acts on the same set of layers, so they are selected in one place.

Words used throughout the package:

- **stem**: the convolution(s) that read the raw clip. They always run dense; the first stem's
  output feeds the AAP controller. Multi-pathway models (SlowFast) have one stem per pathway:
  the leading run of Conv3d layers, in registration order, that read as many channels as the
  first one (3 for RGB).
- **instrumented layers**: every other ``nn.Conv3d`` (any groups, stride, dilation, padding),
  optionally narrowed by a selection (names, a regex, or a predicate).

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 8, 3))
    >>> stem_names(net)
    ['0']
    >>> list(select_conv3d(net))
    ['2']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch.nn as nn

from lightning_dance.errors import DanceError

LayerSelector = None | str | Iterable[str] | Callable[[str, nn.Conv3d], bool]

__all__ = ["LayerSelector", "all_conv3d", "stem_names", "select_conv3d", "NoConv3dError"]


class NoConv3dError(DanceError, ValueError):
    """Raised when a model has no ``nn.Conv3d`` layer for DANCE to work on."""


def all_conv3d(model: nn.Module) -> dict[str, nn.Conv3d]:
    """All ``nn.Conv3d`` submodules of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv3d)}


def _require_conv3d(model: nn.Module) -> dict[str, nn.Conv3d]:
    convs = all_conv3d(model)
    if not convs:
        raise NoConv3dError(
            f"{type(model).__name__} has no nn.Conv3d layer: DANCE prunes the inputs of 3D "
            "convolutions, so it needs a 3D CNN (e.g. lightning_dance.models.create_model('r3d_18')). "
            "For a 2D CNN, inflate it first with lightning_dance.models.inflate_2d_to_3d."
        )
    return convs


def stem_names(model: nn.Module) -> list[str]:
    """Names of the stem convolution(s): the leading Conv3d layers reading the raw clip.

    The first registered Conv3d is the stem; following Conv3d layers with the same number of
    input channels (other pathways of a multi-pathway model such as SlowFast) are stems too.
    """
    convs = _require_conv3d(model)
    names = list(convs)
    in_ch = convs[names[0]].in_channels
    stems = [names[0]]
    for name in names[1:]:
        if convs[name].in_channels != in_ch:
            break
        stems.append(name)
    return stems


def select_conv3d(
    model: nn.Module, layers: LayerSelector = None, *, include_stem: bool = False
) -> dict[str, nn.Conv3d]:
    """The Conv3d layers DANCE acts on, by name, in registration order.

    Args:
        model: any ``nn.Module`` containing ``nn.Conv3d`` layers.
        layers: ``None`` (every Conv3d except the stems), a regex matched with ``re.search``
            against qualified module names, an iterable of exact names, or a predicate
            ``f(name, module) -> bool``.
        include_stem: also allow the stem(s) to be selected (off by default: the stem runs dense
            and feeds the controller).

    Raises:
        NoConv3dError: the model has no Conv3d.
        ValueError: the selection is empty or names a layer that is not a Conv3d of the model.
    """
    convs = _require_conv3d(model)
    stems = set() if include_stem else set(stem_names(model))
    candidates = {n: m for n, m in convs.items() if n not in stems}
    if layers is None:
        chosen = candidates
    elif isinstance(layers, str):
        pattern = re.compile(layers)
        chosen = {n: m for n, m in candidates.items() if pattern.search(n)}
    elif callable(layers):
        chosen = {n: m for n, m in candidates.items() if layers(n, m)}
    else:
        wanted = list(layers)
        unknown = [n for n in wanted if n not in candidates]
        if unknown:
            why = " (stem layers run dense)" if any(n in stems for n in unknown) else ""
            raise ValueError(
                f"not instrumentable Conv3d layers{why}: {unknown}; "
                f"candidates are: {list(candidates)}"
            )
        chosen = {n: candidates[n] for n in candidates if n in set(wanted)}
    if not chosen:
        raise ValueError(
            f"the layer selection {layers!r} matches no Conv3d of {type(model).__name__}; "
            f"candidates (stem excluded) are: {list(candidates)}"
        )
    return chosen
