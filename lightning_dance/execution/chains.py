"""Channel chains: where a channel one conv drops is an output channel the previous conv need not
compute.

A *channel chain* is ``producer conv -> per-channel ops -> consumer conv`` in a model's graph,
where the producer's output reaches nothing but the consumer, through ops that act on each
channel separately (BatchNorm, ReLU and other elementwise activations, dropout, identity). An
input channel the consumer drops is multiplied by zero, so whatever the producer would have
computed for it is never read: the producer can skip that output channel (its weight rows),
and the ops in between run on the kept channels only. R(2+1)D's spatial -> temporal convs and
the two halves of a basic block are such chains, and so is X3D's ``conv_a -> BN -> ReLU ->
conv_b`` into a depthwise conv (which then convolves only the channels it keeps); a block's
input (read by the shortcut too) and outputs that meet a residual add are not.

:func:`channel_chains` finds the chains with ``torch.fx`` (symbolic tracing of the model;
a model fx cannot trace has none, with a warning). The producer is a ``groups == 1`` conv, the
consumer a ``groups == 1`` or a depthwise (``groups == in_channels``) conv.
:class:`lightning_dance.execution.CompactPruner` uses them (``skip_outputs=True``).

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 4, 1))
    >>> channel_chains(net)
    {'0': ChannelChain(producer='0', consumer='3', norms=('1',))}
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ChannelChain", "channel_chains", "conv_norms"]

#: Modules that act on each channel separately (BatchNorm: per-channel affine in eval).
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout3d,
)
_PER_CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.mish, torch.relu, torch.sigmoid, torch.tanh, F.dropout,
}  # fmt: skip
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}


class _Tracer(fx.Tracer):
    """Keeps every Conv3d (subclasses too, e.g. torchvision's ``Conv3DSimple``) and per-channel
    module a leaf, so the graph names them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv3d, *PER_CHANNEL_MODULES)):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class ChannelChain:
    """``producer`` conv -> per-channel ops -> ``consumer`` conv (module names of the model).

    ``norms``: the BatchNorm3d modules in between, whose parameters must be sliced to the
    channels the producer computes (the other ops in between are elementwise)."""

    producer: str
    consumer: str
    norms: tuple[str, ...] = ()


def _is_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op != "call_module":
        return False
    m = modules.get(str(node.target))
    return isinstance(m, nn.Conv3d) and m.groups == 1


def _is_depthwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A depthwise conv: each output channel reads one input channel (a chain may end there)."""
    if node.op != "call_module":
        return False
    m = modules.get(str(node.target))
    return isinstance(m, nn.Conv3d) and m.groups == m.in_channels > 1


def _per_channel(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` maps each channel of its first argument on its own."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
    if others or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), PER_CHANNEL_MODULES)
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PER_CHANNEL_METHODS
    return False


def _trace(
    model: nn.Module, purpose: str
) -> tuple[fx.Graph, dict[str, nn.Module], Counter[str]] | None:
    """``model``'s graph (convs and per-channel modules as leaves), its modules by name and how
    often each module is called; None, with a warning naming ``purpose``, if fx cannot trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # data-dependent control flow, unsupported ops, ...
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); "
            f"{purpose}",
            stacklevel=3,
        )
        return None
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    return graph, dict(model.named_modules()), calls


def conv_norms(model: nn.Module) -> dict[str, str]:
    """``{conv name: BatchNorm3d name}`` where the BatchNorm alone reads the conv's output (both
    called once): the pairs an inference copy can fold into one conv (``x * scale + shift`` of
    an eval BatchNorm is a per-output-channel affine map of the conv's weights and bias).

    Returns ``{}`` (with a warning) when ``torch.fx`` cannot trace the model.

    Example:
        >>> import torch.nn as nn
        >>> conv_norms(nn.Sequential(nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8), nn.ReLU()))
        {'0': '1'}
    """
    traced = _trace(model, "no BatchNorm will be folded into its conv")
    if traced is None:
        return {}
    graph, modules, calls = traced
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Conv3d):
            continue
        if len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) != 1:
            continue
        if not isinstance(modules.get(str(user.target)), nn.BatchNorm3d):
            continue
        if calls[str(node.target)] == 1 and calls[str(user.target)] == 1:
            pairs[str(node.target)] = str(user.target)
    return pairs


def channel_chains(model: nn.Module) -> dict[str, ChannelChain]:
    """The channel chains of ``model``, keyed by producer conv name (see module docstring).

    Returns ``{}`` (with a warning) when ``torch.fx`` cannot trace the model: execution then
    skips input channels only, which is always correct.
    """
    traced = _trace(model, "no conv output channels will be skipped (input channels still are)")
    if traced is None:
        return {}
    graph, modules, calls = traced
    chains: dict[str, ChannelChain] = {}
    for node in graph.nodes:
        if not _is_conv(node, modules):
            continue
        norms: list[str] = []
        cur = node
        while len(cur.users) == 1:
            (nxt,) = cur.users
            if nxt.args[:1] != (cur,):
                break
            if _is_conv(nxt, modules) or _is_depthwise(nxt, modules):
                names = (str(node.target), str(nxt.target), *norms)
                if any(calls[n] > 1 for n in names):  # a module called twice: one route only
                    break
                chains[str(node.target)] = ChannelChain(str(node.target), str(nxt.target),
                                                        tuple(norms))  # fmt: skip
                break
            if not _per_channel(nxt, modules):
                break
            if nxt.op == "call_module" and isinstance(modules[str(nxt.target)], nn.BatchNorm3d):
                norms.append(str(nxt.target))
            cur = nxt
    return chains
