"""The :class:`Policy` interface: how controller scores become keep decisions, and its registry.

A policy answers four questions for the pruner, the fast path, the accounting and the export
builder, which never ask "which policy is this?" themselves:

- :meth:`Policy.gate`: per layer and dim, ``[N, K]`` scores -> a 0/1 keep mask (straight-through
  in training);
- :attr:`Policy.fixed_counts`: whether it keeps a fixed number per layer (static shapes; then the
  pruner passes that number, from its budget, as ``k``);
- :meth:`Policy.logit_offset` / :meth:`Policy.ratio_scale`: what the pruner's calibration
  offset (:meth:`~lightning_dance.aap.AdaptivePruner.calibrate`) shifts: the scores, or the
  keep ratio of fixed counts; :attr:`Policy.calibration_span` is where its bisection starts;
- :meth:`Policy.margin`: how close the decisions on a batch were (exports check that a runtime
  computing the scores at lower precision cannot flip them);
- :attr:`Policy.needs_layer_input`: whether it scores each layer from that layer's own input
  (:meth:`Policy.layer_scores`, costing :meth:`Policy.scoring_macs`) instead of taking the
  controller's scores (the attention policy); :attr:`Policy.trains_controller`: whether there
  is a controller to train; :attr:`Policy.keeps_top_scores`: whether a higher score always wins
  over a lower one (a prior on the scores' biases then chooses the kept channels).

A new policy is one subclass, registered under a name with :func:`register_policy`; anything
that takes ``policy=`` accepts the name, the class or an instance (:func:`get_policy`), as
Lightning's ``ModelPruning(pruning_fn=...)`` takes a name or a callable.

Example:
    >>> import torch
    >>> policy = get_policy("threshold")
    >>> policy
    ThresholdPolicy()
    >>> policy.gate(torch.tensor([[2.0, -1.0, 0.5]]), training=False)
    tensor([[1., 0., 1.]])
    >>> policy == "threshold", get_policy(policy) is policy
    (True, True)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import torch

__all__ = ["Policy", "available_policies", "get_policy", "register_policy"]

_REGISTRY: dict[str, type[Policy]] = {}


class Policy(ABC):
    """How a layer's controller scores become its keep mask (one object per policy).

    Subclasses set :attr:`name` and implement :meth:`gate`; the defaults of the other members
    suit an input-dependent policy whose calibration shifts nothing. Policies compare equal to
    their name (``pruner.policy == "topk"``), so code and checkpoints that stored the name keep
    working.
    """

    #: the registry name (``policy="..."``)
    name: ClassVar[str] = ""
    #: keeps a fixed number of entries per layer and dim (static shapes, exportable as a static
    #: graph, the batch-1 index plan); the pruner derives that number from its budget
    fixed_counts: ClassVar[bool] = False
    #: the calibration bisection starts in ``[-span, span]`` (and widens if needed)
    calibration_span: ClassVar[float] = 4.0
    #: scores each layer from the tensor it reads (:meth:`layer_scores`), not from the
    #: controller: decisions are made layer by layer as the input arrives, so nothing can look
    #: ahead at a later layer's decision (no output skipping along channel chains, no export)
    needs_layer_input: ClassVar[bool] = False
    #: its eval :meth:`gate` decides each row from that row alone (the built-in policies do), so
    #: the decision plan may stack the rows of many layers into one call
    #: (:meth:`~lightning_dance.decision.DecisionPlan.prefetch`); ``False``: one layer per call
    rowwise_eval: ClassVar[bool] = True
    #: the dims it can decide (``None``: all); the pruner refuses others
    supported_dims: ClassVar[tuple[str, ...] | None] = None
    #: has a controller whose parameters training learns (else the pruner has none, and
    #: :class:`~lightning_dance.wrapper.DANCEWrapper` fine-tunes the backbone by default)
    trains_controller: ClassVar[bool] = True
    #: its decision on a row keeps entries in the order of their scores (the highest ``k``, or
    #: those above a threshold: ``topk``, ``threshold``), so a prior added to the scores' biases
    #: chooses which channels are kept (:class:`~lightning_dance.static_first.StaticFirst`);
    #: ``False`` for a policy whose scores decide something else (``width``: how many of a
    #: fixed order)
    keeps_top_scores: ClassVar[bool] = False

    @abstractmethod
    def gate(
        self,
        logits: torch.Tensor,
        *,
        training: bool,
        k: int | None = None,
        tau: float = 1.0,
        noise: float = 1.0,
        min_keep: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``[N, K]`` scores -> ``[N, K]`` keep mask, exactly 0/1 in value.

        ``training``: the gate may explore (noise scaled by ``noise``, drawn from ``generator``)
        and must pass gradients to ``logits`` (straight-through, temperature ``tau``). ``k``:
        the fixed count of a :attr:`fixed_counts` policy. At least ``min_keep`` entries per row
        are kept.
        """

    def prepare(self, pruner: Any) -> None:
        """Called once by the :class:`~lightning_dance.aap.AdaptivePruner` this policy is given
        to, at the end of its construction (default: nothing). A policy may reparametrize the
        model there without changing its function (the ``width`` policy orders channels)."""
        return None

    def layer_scores(
        self, x: torch.Tensor, dims: tuple[str, ...], grid: int
    ) -> dict[str, torch.Tensor]:
        """``{dim: scores}`` of a layer from its input ``x [N, C, T, H, W]`` (channels ``[N, C]``,
        frames ``[N, T]``, blocks ``[N, gh, gw]``); only for :attr:`needs_layer_input`."""
        raise NotImplementedError(f"the {self.name!r} policy takes the controller's scores")

    def scoring_macs(self, shape: tuple[int, ...], dims: tuple[str, ...], grid: int) -> int:
        """Multiply-adds of :meth:`layer_scores` for one clip whose layer input is ``(C, T, H,
        W)``, counted in the executed MACs (0 for policies that take the controller's)."""
        return 0

    def logit_offset(self, calibration: float) -> float:
        """What the pruner adds to every score for a calibration offset (default: nothing)."""
        return 0.0

    def ratio_scale(self, calibration: float) -> float:
        """The factor on a fixed-count policy's keep ratio for a calibration offset."""
        return 1.0

    def margin(self, logits: torch.Tensor, k: int | None = None) -> float:
        """The smallest gap behind a keep/drop decision of ``logits`` ``[N, K]`` (after the
        offset), relative to the row's largest ``|score|``; ``inf`` where nothing can flip."""
        return math.inf

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


P = TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` available as ``policy=cls.name`` everywhere."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or not cls.name:
        raise TypeError(f"register_policy needs a Policy subclass with a name, got {cls!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a policy named {cls.name!r} is registered already")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> tuple[str, ...]:
    """The registered policy names."""
    return tuple(_REGISTRY)


def get_policy(policy: str | Policy | type[Policy]) -> Policy:
    """A :class:`Policy` from a registered name, a ``Policy`` subclass or an instance (returned
    as it is)."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy()
    if isinstance(policy, str) and policy in _REGISTRY:
        return _REGISTRY[policy]()
    raise ValueError(
        f"policy must be one of {available_policies()} or a Policy object, got {policy!r}"
    )
