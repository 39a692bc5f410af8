"""Graph-compiled inference: a model's fastest static form on CPU, for deployment and timing.

:func:`compile_for_inference` runs ``torch.compile`` (the inductor backend) on a copy of an eval
model with *freezing* on: the weights become constants, eval BatchNorms are folded into their
convs, oneDNN convolution weights are packed once (eager ``mkldnn_convolution`` reorders them
on every call), convolutions are fused with the activation or add after them, and no Python
runs between layers. On a 2-thread Xeon (AVX-512) that makes ``r2plus1d_18`` at width 0.25,
8x112x112, batch 1, **1.38-1.45x faster** than its eager form on the same kernels
(:func:`~lightning_dance.timing.dense_fast`; ``docs/benchmarks.md``, "Against the dense model
compiled"), and a model pruned to a quarter of the MACs gains a little more (1.5-1.7x):
its per-layer overhead was a larger part of its time.

Every static model can run this way: the dense reference (so it is the baseline of every
speedup the benchmarks report), uniformly slimmed and statically pruned models, a materialized
DANCE projection, and each plan of a :class:`~lightning_dance.plan_book.PlanBook`. The per-clip
compact path cannot: its shapes change from clip to clip.

Limits:

- It needs a C++ compiler (``gcc`` or ``clang``) on the machine; without one it raises
  :class:`CompileError` naming the fix.
- A compiled form is specialised to the example's shape, dtype and device: another shape
  compiles again (seconds) without freezing, so it is slower; give one example per shape.
- It compiles a deep copy; later changes to the model's weights do not reach it.
- Compiling takes seconds to tens of seconds per model (more on a loaded machine).

Example:
    >>> import torch
    >>> from lightning_dance.models import create_model
    >>> net = create_model("tiny_c3d", num_classes=4).eval()
    >>> clip = torch.randn(1, 3, 4, 16, 16)
    >>> run = compile_for_inference(net, clip)
    >>> torch.allclose(run(clip), net(clip), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable

import torch
import torch.nn as nn

from lightning_dance.errors import DanceError

__all__ = ["CompileError", "compile_for_inference", "compiler_available"]

_CL = torch.channels_last_3d


class CompileError(DanceError, RuntimeError):
    """The model could not be compiled, or its compiled form is not what it computes."""


def compiler_available() -> bool:
    """Whether a C++ compiler that inductor can use is on the ``PATH`` (``CXX``, ``g++``,
    ``clang++``)."""
    import os

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c)


def _check_same(got: object, want: object, atol: float) -> None:
    """Raise :class:`CompileError` unless ``got`` equals ``want`` (a tensor, or a tuple or list
    of them) within ``atol * (1 + max |want|)``; integer tensors exactly."""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            raise CompileError("the compiled model's outputs are not the model's")
        for g, w in zip(got, want, strict=True):
            _check_same(g, w, atol)
        return
    if not torch.is_tensor(got) or not torch.is_tensor(want) or got.shape != want.shape:
        raise CompileError("the compiled model's output does not have the model's shape")
    if not want.is_floating_point():
        if not torch.equal(got, want):
            raise CompileError("the compiled model's integer output differs from the model's")
        return
    error = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not error <= atol * (1.0 + scale):
        raise CompileError(f"the compiled model differs from the model by {error:.3g}")


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_for_inference(
    model: nn.Module,
    example: torch.Tensor,
    *,
    channels_last: bool = False,
    atol: float = 1e-4,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(x)``: ``model(x)`` as one frozen inductor graph (see the module docstring). The
    model may return a tensor or a tuple of tensors.

    Args:
        model: an eval model (a copy is compiled; ``model`` is not changed).
        example: one input of the shape, dtype and device the form will run (it is compiled
            on it, and its output is checked against ``model(example)``).
        channels_last: compile for ``channels_last_3d`` weights and inputs (``run`` converts
            ``x``), else for contiguous ones (``x`` as given); which layout is faster depends
            on the model, so the benchmarks time both.
        atol: the largest difference from the eager output accepted, relative to the output's
            magnitude (``atol * (1 + max |y|)``).

    Raises:
        CompileError: no C++ compiler, the model does not compile (the cause is chained), the
            compiler fell back to eager, or the compiled output differs from the model's.
        ValueError: ``model`` is in training mode (freezing needs eval BatchNorms and fixed
            weights), or ``example`` is not a floating-point tensor.
    """
    if model.training:
        raise ValueError("compile_for_inference needs an eval model: call model.eval() first")
    if not torch.is_tensor(example) or not example.is_floating_point():
        raise ValueError(f"example must be a floating-point tensor, got {type(example).__name__}")
    if not compiler_available():
        raise CompileError(
            "torch.compile needs a C++ compiler on this machine: install g++ (or set CXX), or "
            "time the eager forms (lightning_dance.timing.dense_fast)"
        )
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net = net.to(memory_format=_CL if channels_last else torch.contiguous_format)

    def layout(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=_CL) if channels_last and x.dim() == 5 else x

    graph = torch.compile(net, dynamic=False)
    before = _graphs_compiled()
    # Dynamo keys compiled code on the class's ``forward``: each model instance of a class is
    # one more entry, and past ``recompile_limit`` (8) it would silently run eager.
    limit = max(dynamo_config.recompile_limit, 4096)
    try:
        with (
            torch.no_grad(),
            inductor_config.patch(freezing=True),
            dynamo_config.patch(
                recompile_limit=limit,
                accumulated_recompile_limit=limit,
                capture_scalar_outputs=True,  # a float(buffer) in the forward stays in the graph
            ),
        ):
            got = graph(layout(example))
    except Exception as err:
        raise CompileError(
            f"torch.compile failed on {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
    if _graphs_compiled() == before:
        raise CompileError(
            f"torch.compile produced no graph for {type(model).__name__} (it fell back to "
            "eager; run with TORCH_LOGS=recompiles,graph_breaks to see why)"
        )
    with torch.no_grad():
        want = model(example)
    _check_same(got, want, atol)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return graph(layout(x))

    return run
