"""Where a layer's feature (spatial block) mask acts: on the conv's input or on its output.

DANCE's feature masks drop spatial blocks. Two readings of "skip a feature":

- :data:`INPUTS` (the default, the paper's reading): the mask zeroes positions of the layer's
  *input*. An output position is skipped only when its whole receptive field is masked, so a
  3x3 conv over a mask of 4x4 blocks still computes a ring around every kept block, and a
  scattered mask saves few multiply-adds.
- :data:`OUTPUTS` (as spatially sparse convolutions do, e.g. SBNet): the mask selects the
  layer's *output* positions to compute, over the unmasked input; a skipped position holds the
  conv's bias (zero without one), as an input-masked position whose field is all zero does.
  Every dropped block is skipped work, and the compact path computes the kept blocks over
  their input crops (halo included).

A site is an object with a name (``pruner.feature_site``); the pruner takes the name or the
object (``AdaptivePruner(..., feature_site="outputs")``). Masks are decided on the
:meth:`FeatureSite.decision_shape`: the layer's input ``(C, T, H, W)`` with, for
:data:`OUTPUTS`, the output's ``(H_out, W_out)`` in place of ``(H, W)``.

Example:
    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv3d(4, 8, 3, stride=(1, 2, 2), padding=1)
    >>> get_feature_site("outputs").decision_shape(conv, (4, 8, 16, 16))
    (4, 8, 8, 8)
    >>> y = torch.ones(1, 8, 8, 8, 8)
    >>> m = torch.zeros(1, 8, 8); m[0, :4, :4] = 1
    >>> out = OUTPUTS.mask_output(y, m, None)
    >>> float(out.sum()), 8 * 8 * 16
    (1024.0, 1024)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lightning_dance.geometry import cached_geometry

__all__ = ["FEATURE_SITES", "INPUTS", "OUTPUTS", "FeatureSite", "get_feature_site"]


class FeatureSite:
    """Where a feature mask acts (see the module docstring). Compare by name."""

    #: the site's name (``"inputs"`` or ``"outputs"``)
    name: str = ""
    #: the mask selects output positions (``True``) or zeroes input positions (``False``)
    at_outputs: bool = False

    def decision_shape(self, conv: nn.Conv3d, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``(C, T, H, W)`` a layer's masks are decided on: channels and frames are
        the input's; features cover what :meth:`mask_output` or the input masking reads."""
        return tuple(input_shape)

    def mask_output(
        self, y: torch.Tensor, feature: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``y [N, C, T, H, W]`` with the positions ``feature [N, H, W]`` drops set to the bias."""
        m = feature.to(y.dtype).view(y.shape[0], 1, 1, *y.shape[3:])
        if bias is None:
            return y * m
        b = bias.to(y.dtype).view(1, -1, 1, 1, 1)
        return (y - b) * m + b

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        return isinstance(other, FeatureSite) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"FeatureSite({self.name!r})"


class _Inputs(FeatureSite):
    name, at_outputs = "inputs", False


class _Outputs(FeatureSite):
    name, at_outputs = "outputs", True

    def decision_shape(self, conv: nn.Conv3d, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        g = cached_geometry(conv, tuple(input_shape))
        return (*tuple(input_shape)[:2], *g.output[1:])


#: feature masks zero layer inputs (the default)
INPUTS: FeatureSite = _Inputs()
#: feature masks select layer outputs (spatially sparse convolution)
OUTPUTS: FeatureSite = _Outputs()
#: the sites by name
FEATURE_SITES: dict[str, FeatureSite] = {s.name: s for s in (INPUTS, OUTPUTS)}


def get_feature_site(site: str | FeatureSite) -> FeatureSite:
    """The :class:`FeatureSite` named ``site`` (or ``site`` itself)."""
    if isinstance(site, FeatureSite):
        return site
    if isinstance(site, str) and site in FEATURE_SITES:
        return FEATURE_SITES[site]
    raise ValueError(
        f"feature_site must be one of {sorted(FEATURE_SITES)} or a FeatureSite, got {site!r}"
    )
