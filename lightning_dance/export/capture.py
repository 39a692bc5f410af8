"""Graph capture shared by every export format: ``torch.export`` once, then per-format lowering.

``torch.export`` refuses data-dependent Python branches instead of baking one outcome in (what
``torch.jit.trace`` silently does to a gated model), so every artifact starts from an
:class:`~torch.export.ExportedProgram`. :func:`scriptable` turns one into a ``torch.jit.script``-
able ``GraphModule`` (the TorchScript / libtorch path for models whose Python ``forward`` is
not scriptable, such as a DANCE export module routing the controller's masks).

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU()).eval()
    >>> ep = capture(net, torch.randn(1, 3, 4, 8, 8))
    >>> script = torch.jit.script(scriptable(ep))
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from lightning_dance.export.conv2d_rewrite import UnsupportedOpError, plain_graph_module

__all__ = ["capture", "max_abs_error", "scriptable"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


def capture(
    module: nn.Module, example_clip: torch.Tensor, *, strict: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export.export(module, (example_clip,))`` (static shapes) with a clear error."""
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (example_clip,), strict=strict)
    except Exception as exc:
        raise UnsupportedOpError(
            "torch.export",
            f"torch.export (strict={strict}) cannot capture the model: {_first_line(exc)}",
        ) from exc


_ATEN = torch.ops.aten
_MOBILE_SIMPLIFY = {
    _ATEN.view.default: _ATEN.reshape.default,
    _ATEN._unsafe_view.default: _ATEN.reshape.default,
}


def scriptable(ep: torch.export.ExportedProgram, *, mobile: bool = False) -> fx.GraphModule:
    """A ``GraphModule`` of ``ep`` that ``torch.jit.script`` compiles: ``forward(clip)``.

    Functionalizes (no in-place ops), drops export's input guards and shape assertions (static shapes: the artifact is for the
    exported shape), calls aten op packets instead of overloads, and returns a single output
    tensor directly. ``mobile=True`` also maps ``view`` to ``reshape`` and drops ``clone``
    (equivalent in a functional graph; the NNAPI converter knows neither).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = ep.run_decompositions({}).module()  # functional: no in-place ops
    graph = copy.deepcopy(gm.graph)
    graph._codegen = fx.graph.CodeGen()
    for node in list(graph.nodes):
        if mobile and node.target in _MOBILE_SIMPLIFY:
            node.target = _MOBILE_SIMPLIFY[node.target]
        elif mobile and node.target in (_ATEN.clone.default, _ATEN.alias.default):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.name().startswith("aten::_assert") and not node.users:
                graph.erase_node(node)
            else:
                node.target = node.target.overloadpacket
    out = next(n for n in graph.nodes if n.op == "output")
    if isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)
    graph.lint()
    return plain_graph_module(gm, graph)


def max_abs_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    """``max |reference - got|`` in float64 (shapes must match)."""
    reference, got = torch.as_tensor(reference), torch.as_tensor(got)
    if tuple(reference.shape) != tuple(got.shape):
        raise ValueError(f"output shapes differ: {tuple(reference.shape)} vs {tuple(got.shape)}")
    return float((reference.double() - got.double()).abs().max()) if reference.numel() else 0.0
