"""The benchmark that decides: DANCE against what a user would do instead, at matched cost.

Every method gets the same task, the same seeds and the same number of training epochs
(``--dense-epochs + --ava-epochs + --tune-epochs`` in all), and is reported at the same budgets
(target executed / dense MACs):

===================  =================================================================
``slim``             the uniformly slimmed model (``create_model(width=w)``, ``w`` chosen
                     so that its MACs are closest to the budget), trained from scratch for
                     all the epochs; at budget 1 it is the dense reference
``torch-pruning``    static structured pruning of the trained dense model (Torch-Pruning's
                     ``MetaPruner``, L2-magnitude importance, uniform per layer) down to the
                     budget, then fine-tuned for the AVA + tune epochs
``mod-topk``         Mixture-of-Depths-style top-k routing: the ``topk`` policy on channels,
                     fine-tuned jointly from the dense start for the AVA + tune epochs
``dance``            DANCE as the paper describes it: AVA fine-tuning, then the ``threshold``
                     policy on frames + channels + features, fine-tuned jointly
``dance-topk``       the same AVA start with the ``topk`` policy on channels
``dance-noava``      the ablation: ``dance`` from the dense start (no AVA), the AVA epochs
                     spent on DANCE fine-tuning instead
``torch-pruning-kd`` ``torch-pruning`` fine-tuned on cross-entropy + distillation from the
                     dense start, the loss of every DANCE row without ``-ce`` (``task="both"``)
``dance-channel-ce`` the ``threshold`` policy on channels only (every layer), labels only;
                     ``-materialized``: its static projection, made physical (also
                     ``hybrid-threshold-ce-materialized``)
``hybrid-credit``    ``hybrid`` (Torch-Pruning, then ``topk``) charged with what it runs;
                     ``-ce``: on cross-entropy only; ``hybrid-threshold-ce``: ``threshold``
                     (per-clip counts) in place of ``topk``
``mod-topk-credit``  ``mod-topk`` charged with what its compact path runs (``credit_outputs``;
                     the rows without ``-credit`` count every chain producer in full);
                     ``mod-topk-credit-ce``: on cross-entropy only (no distillation);
                     ``mod-topk-credit-h256``: a 4x wider controller;
                     ``-prior``: the controller starts from a magnitude prior;
                     ``-explore3``: exploration noise gone after 30% of the steps;
                     ``-static-first``: static decisions for the first half of
                     the steps, then per clip (``StaticFirst``); ``-static-first-ce``:
                     the same on cross-entropy only; ``static-first-projection``:
                     the latter's static projection (the channels it keeps most often,
                     for every clip, no controller); ``static-first-materialized``: the
                     projection with the dropped channels removed from the weights
``dance-selected``   ``dance-noava-credit`` pruning each layer along the dims ``--layer-dims``
                     gives it (what pays where the model is deployed);
                     ``-static-first``: the same trained static first (``StaticFirst``;
                     the selection must prune channels only); ``-ce``: on cross-entropy
                     only; ``-static-first-materialized``: the static projection of
                     ``-static-first-ce`` made physical
``attention``        DATE'20 attention pruning (``policy="attention"``: each layer ranks its own
                     input's channels and column blocks; targeted dropout while fine-tuning)
                     from the dense start, channels + features as in the paper
===================  =================================================================

The DANCE rows use the recipe that holds accuracy (joint fine-tuning with gradual pruning and a
cosine schedule: ``budget_warmup``, ``lr_schedule="cosine"``, ``backbone_lr=--tune-lr``) and are
calibrated on the validation clips to meet the budget in counted MACs (controller included).

Per method, budget and seed: test top-1; counted executed / dense MACs per clip (mean, p5, p95;
static models: their fvcore count); the MACs the fast form really runs (``ran``: the compact path
of a DANCE model, counted op by op, plus its dense parts and controller); batch-1 latency of the
fastest form (DANCE: the compact path; static models: the fastest of plain PyTorch,
:func:`lightning_dance.timing.dense_fast` and :func:`lightning_dance.compiled.compile_for_inference`
in both layouts; and every model that exports, in onnxruntime with its pool's spinning off) against the dense reference in its fastest form, interleaved in one
process over the same test clips (:func:`lightning_dance.timing.interleaved`), and per runtime
(``speedup_eager``, ``speedup_compiled``, ``speedup_onnxruntime``: against dense in the same
runtime; compiled: ``torch.compile`` with freezing, static models and plan books only);
the bytes the fastest form moves, measured from the ops it runs
(:func:`lightning_dance.bytes.measure_traffic`, controller included), and the energy estimate
of those MACs and bytes (:class:`lightning_dance.energy.EnergyModel`: every access at DRAM, and
the cache-aware Jetson Nano and Snapdragon 8 Gen 1 targets). Per method and budget: mean and standard deviation over seeds.

Writes ``results.json``, ``summary.md`` and two plots (``pareto_macs.png``: top-1 vs counted MACs;
``pareto_latency.png``: top-1 vs measured speedup; one curve per method, error bars = std over
seeds) to ``--out``.

    .venv/bin/python benchmarks/pareto.py                        # the full benchmark (hours)
    .venv/bin/python benchmarks/pareto.py --quick                # minutes: 1 seed, 1 budget
    .venv/bin/python benchmarks/pareto.py --methods slim dance --budgets 0.35 --seeds 0 1 2

A new method is one function registered with ``@method("name")``: it receives the task's
:class:`Context`, the budget and the seed, and returns a :class:`Candidate`.

Limits: synthetic data (generated, nothing downloaded); latency at the task's clip size on CPU
(the device's figure may differ: see ``benchmarks/device_check.sh``); the energy figure is an
estimate of a model (see ``docs/accounting.md``), not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn

from lightning_dance.ava_callback import AVACallback
from lightning_dance.baselines import conv3d_macs, torch_prune
from lightning_dance.bytes import TrafficMeasurement, measure_traffic
from lightning_dance.classifier import VideoClassifier
from lightning_dance.compiled import compile_for_inference
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.energy import EnergyModel, reported_models
from lightning_dance.execution import CompactPruner, count_executed_macs, to_fast_layout
from lightning_dance.macs import count_macs
from lightning_dance.materialize import materialize
from lightning_dance.models import create_model
from lightning_dance.plan_book import PlanBook, plan_book
from lightning_dance.plots import accuracy_vs_cost
from lightning_dance.priors import apply_channel_prior, channel_frequencies, freeze_channels
from lightning_dance.recipes import fit, train_controller
from lightning_dance.static_first import StaticFirst
from lightning_dance.timing import Timing, dense_fast, interleaved, machine
from lightning_dance.wrapper import DANCEWrapper

# ----------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class Task:
    """The data, the model family and the training schedule every method shares."""

    model: str = "r2plus1d_18"
    width: float = 0.25
    num_classes: int = 6
    frames: int = 8
    size: int = 32
    train_size: int = 1024
    val_size: int = 256
    test_size: int = 512
    batch_size: int = 16
    noise: float = 0.12
    max_distractors: int = 3
    partial_visibility: float = 0.5
    dense_epochs: int = 8
    ava_epochs: int = 2
    tune_epochs: int = 6
    lr: float = 3e-3
    tune_lr: float = 2e-3
    controller_lr: float = 3e-3
    budget_warmup: float = 0.3
    data_seed: int = 0

    @property
    def total_epochs(self) -> int:
        return self.dense_epochs + self.ava_epochs + self.tune_epochs

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return (3, self.frames, self.size, self.size)

    def datamodule(self) -> SyntheticVideoDataModule:
        """The same clips for every method and seed (the seed varies the training only)."""
        return SyntheticVideoDataModule(
            num_classes=self.num_classes, frames=self.frames, size=self.size,
            train_size=self.train_size, val_size=self.val_size, test_size=self.test_size,
            batch_size=self.batch_size, seed=self.data_seed, noise=self.noise,
            max_distractors=self.max_distractors, partial_visibility=self.partial_visibility,
        )  # fmt: skip

    def classifier(self, width: float | None = None, model: nn.Module | None = None,
                   lr: float | None = None, teacher: nn.Module | None = None) -> VideoClassifier:  # fmt: skip
        if model is not None:
            return VideoClassifier(model, self.num_classes, lr=lr or self.lr, teacher=teacher)
        return VideoClassifier(self.model, self.num_classes, lr=lr or self.lr, teacher=teacher,
                               model_kwargs={"width": width or self.width})  # fmt: skip


#: the test clips by thirds of their difficulty score (see :meth:`Context.difficulty_thirds`)
THIRDS = ("easy", "mid", "hard")


@dataclass
class Context:
    """One seed's shared state: the data, the dense and AVA starts (trained once, cached)."""

    task: Task
    seed: int
    dm: SyntheticVideoDataModule
    progress: bool = False
    cache: Path | None = None
    _starts: dict[str, VideoClassifier] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict)

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.task.clip_shape)

    def dense_macs(self) -> int:
        return count_macs(self.task.classifier().model, self.example).total

    def fit(self, module: L.LightningModule, epochs: int, name: str, **kwargs: Any) -> None:
        L.seed_everything(self.seed, verbose=False)
        fit(module, self.dm, epochs=epochs, validate=False, progress=self.progress,
            name=name, **kwargs)  # fmt: skip

    def start(self, which: str) -> VideoClassifier:
        """A fresh copy of the ``"dense"`` start (``dense_epochs``) or the ``"ava"`` start
        (the dense start fine-tuned ``ava_epochs`` with :class:`AVACallback`)."""
        if which not in self._starts:
            self._starts.update(self._load_or_train_starts())
        return copy.deepcopy(self._starts[which])

    def difficulty_thirds(self) -> dict[str, torch.Tensor]:
        """The test clips' indices by thirds of their difficulty score (the generator's
        per-clip mix of contrast, noise, visibility and clutter; found once)."""
        if "thirds" not in self._memo:
            test = self.dm.test_dataset
            score = torch.stack([test.render(i)[2]["difficulty"] for i in range(len(test))])
            thirds = score.argsort().tensor_split(3)
            self._memo["thirds"] = dict(zip(THIRDS, thirds, strict=True))
        return self._memo["thirds"]

    def reference(self) -> nn.Module:
        """The dense reference: the task's model trained from scratch for all the epochs every
        method gets (cached like the starts, so that a second run of the seed reuses it)."""
        t = self.task
        module = t.classifier()
        path = self.cache / f"reference-seed{self.seed}.pt" if self.cache else None
        if path is not None and path.exists():
            state = torch.load(path, weights_only=True)
            if state.get("task") == asdict(t):
                module.load_state_dict(state["model"])
                return module.model.eval()
        self.fit(module, t.total_epochs, "dense")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"task": asdict(t), "model": module.state_dict()}, path)
        return module.model.eval()

    def trained(self, name: str, budget: float) -> Candidate:
        """Method ``name`` trained at ``budget`` for this seed; with a cache, the trained
        candidate is kept there and reused (same task), so that a later run can measure it again
        (say, on a quiet machine or with more threads) without training it again. The cached
        file is a pickle of the candidate: load only caches you made."""
        tag = getattr(METHODS[name], "cache_tag", lambda: "")()  # what else the method reads
        path = self.cache / f"{name}{tag}-{budget}-seed{self.seed}.pt" if self.cache else None
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=False)
            if saved.pop("task", None) == asdict(self.task):
                return Candidate(**saved)
        cand = METHODS[name](self, budget, self.seed)
        if path is not None:  # the fields, not the Candidate (a class of __main__ when run)
            fields = {f: getattr(cand, f) for f in Candidate.__dataclass_fields__}
            torch.save({"task": asdict(self.task), **fields}, path)
        return cand

    def _load_or_train_starts(self) -> dict[str, VideoClassifier]:
        t = self.task
        dense, ava = t.classifier(), t.classifier(lr=t.lr * 0.3)
        path = self.cache / f"starts-seed{self.seed}.pt" if self.cache else None
        if path is not None and path.exists():
            state = torch.load(path, weights_only=True)
            if state.get("task") == asdict(t):
                dense.load_state_dict(state["dense"])
                ava.load_state_dict(state["ava"])
                return {"dense": dense, "ava": ava}
        L.seed_everything(self.seed, verbose=False)
        self.fit(dense, t.dense_epochs, "dense-start")
        ava.load_state_dict(dense.state_dict())
        self.fit(ava, t.ava_epochs, "ava-start", callbacks=[AVACallback()])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"task": asdict(t), "dense": dense.state_dict(), "ava": ava.state_dict()},
                       path)  # fmt: skip
        return {"dense": dense, "ava": ava}


# ------------------------------------------------------------------------------ candidates


@dataclass
class Candidate:
    """A trained method at one budget: its model and how to measure it.

    ``model(clip)`` gives logits (eval mode). ``wrapper`` is set for DANCE models (their counted
    MACs vary per clip; their fast form is the compact path); static models run dense.
    """

    model: nn.Module
    wrapper: DANCEWrapper | None = None
    note: str = ""
    train_seconds: float = 0.0
    #: the wrapped model's MACs / the task model's (below 1 when DANCE runs on a statically
    #: pruned model: the wrapper counts against the model it wraps)
    scale: float = 1.0

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Top-1 on the test clips, counted executed / dense MACs (mean, p5, p95), and both by
        the clips' difficulty (thirds of the generator's difficulty score: ``acc_easy``,
        ``acc_mid``, ``acc_hard``, ``mac_easy`` ...): an input-aware pruner should spend less
        on easy clips and more on hard ones, which no static model can."""
        correct, ratios = [], []
        model = self.wrapper if self.wrapper is not None else self.model
        model.eval()
        with torch.no_grad():
            for clip, label in ctx.dm.test_dataloader():
                correct.append(model(clip).argmax(-1) == label)
                if self.wrapper is not None:
                    ratios.append(self.wrapper.last_stats.mac_ratio() * self.scale)
                elif isinstance(model, PlanBook):  # each clip runs its plan's sub-network
                    table = torch.tensor(model.plan_macs(clip), dtype=torch.float64)
                    ratios.append(table[model.last_plans] / ctx.dense_macs())
        hit = torch.cat(correct).double()
        if ratios:
            r = torch.cat(ratios).double()
        else:
            r = torch.full_like(hit, count_macs(self.model, ctx.example).total / ctx.dense_macs())
        figures = {"acc": float(hit.mean()), "mac_ratio": float(r.mean()),
                   "mac_ratio_p5": float(torch.quantile(r, 0.05)),
                   "mac_ratio_p95": float(torch.quantile(r, 0.95))}  # fmt: skip
        for third, idx in ctx.difficulty_thirds().items():
            figures[f"acc_{third}"] = float(hit[idx].mean())
            figures[f"mac_{third}"] = float(r[idx].mean())
        return figures

    def forms(self, clip: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        """The ways to run it on one batch-1 clip; its latency is that of the fastest.

        A DANCE model runs its compact path (the masked model computes everything). A static
        model runs plain (PyTorch's kernel choice) and dense fast (oneDNN, ``channels_last_3d``):
        channel counts left by pruning can make either one slow, and a baseline is never
        timed in a form slower than it has to be.
        """
        if isinstance(self.model, PlanBook):  # the stem and each plan on the fast kernels
            book, fast_clip = self.model, to_fast_layout(clip)

            def fast() -> torch.Tensor:
                with book.accelerated():
                    return book(fast_clip)

            forms = {"plain": lambda: book(clip), "fast": fast}
            for layout in self.compiled(clip) or {}:  # the book as compiled graphs

                def graphs(cl: bool = layout == "_cl") -> torch.Tensor:
                    with book.compiled(clip, channels_last=cl):
                        return book(clip)

                forms[f"compiled{layout}"] = graphs
        elif self.wrapper is None:
            forms = {"plain": lambda: self.model(clip), "fast": dense_fast(self.model, clip)}
            for layout, run in (self.compiled(clip) or {}).items():
                forms[f"compiled{layout}"] = lambda run=run: run(clip)
        else:
            compact = CompactPruner(self.wrapper.pruner)
            forms = {"compact": lambda: compact(clip)}
        session = self.onnx_session(clip)
        if session is not None:
            name, feed = session.get_inputs()[0].name, clip.numpy()
            forms["onnxruntime"] = lambda: session.run(None, {name: feed})
        return forms

    def compiled(self, clip: torch.Tensor) -> dict[str, Callable[[torch.Tensor], Any]] | None:
        """A static model (or a plan book) compiled for inference, once per candidate
        (:func:`~lightning_dance.compiled.compile_for_inference`: ``torch.compile`` with
        freezing, BatchNorms folded, weights pre-packed): ``{"": run, "_cl": run}`` for the
        default and the ``channels_last_3d`` layout (a book: its graphs in both layouts, made
        on ``clip`` and kept by the book, and ``{"": None, "_cl": None}``); ``None`` for the compact path (its shapes change per clip), with
        ``--no-compile``, or where compiling fails (said once on stderr)."""
        if "graphs" in self.__dict__:
            return self.__dict__["graphs"]
        self.__dict__["graphs"] = None
        if not COMPILED_FORM or self.wrapper is not None:
            return None
        try:
            if isinstance(self.model, PlanBook):  # compiled (and kept) by the book
                for cl in (False, True):
                    with self.model.compiled(clip, channels_last=cl):
                        pass
                graphs: dict[str, Any] = {"": None, "_cl": None}
            else:
                graphs = {suffix: compile_for_inference(self.model.eval(), clip,
                                                        channels_last=suffix == "_cl")
                          for suffix in ("", "_cl")}  # fmt: skip
        except Exception as err:  # timing goes on without this form; the failure is reported
            print(f"compiled form skipped: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        self.__dict__["graphs"] = graphs
        return graphs

    def onnx_session(self, clip: torch.Tensor) -> Any:
        """The model exported to ONNX (static models whole; DANCE models with the ``topk`` or
        ``threshold`` gates and gathers, :func:`~lightning_dance.export.modes.build_export_module`)
        in an onnxruntime session that does not spin (made once, its output checked against
        the eager model on ``clip``); ``None`` where onnxruntime is missing, the policy has no
        export mode, or the export fails (said once on stderr)."""
        if "onnx" in self.__dict__:
            return self.__dict__["onnx"]
        self.__dict__["onnx"] = None
        mode = "dense" if self.wrapper is None else self.wrapper.pruner.policy.name
        if isinstance(self.model, PlanBook):  # a graph per plan, not one graph
            return None
        if mode not in ("dense", "topk", "threshold") or not ONNX_FORM:
            return None
        try:
            import tempfile

            from lightning_dance.export.modes import build_export_module
            from lightning_dance.export.onnx import export_onnx, quiet_session

            module, _ = build_export_module(self.wrapper or self.model, mode, clip)
            with torch.no_grad():
                want = (self.wrapper or self.model).eval()(clip)
            path = export_onnx(module, clip, Path(tempfile.mkdtemp()) / "model.onnx")
            session = quiet_session(path)
            got = session.run(None, {session.get_inputs()[0].name: clip.numpy()})[0]
            error = float((torch.from_numpy(got) - want).abs().max())
            if error > 1e-3 * (1.0 + float(want.abs().max())):
                raise RuntimeError(f"onnxruntime output differs from the model by {error:.2e}")
        except Exception as err:  # timing goes on without this form; the failure is reported
            print(f"onnxruntime form skipped ({mode}): {type(err).__name__}: {err}",
                  file=sys.stderr)  # fmt: skip
            return None
        self.__dict__["onnx"] = session
        return session

    def ran_ratio(self, clips: Sequence[torch.Tensor], dense_macs: int) -> float:
        """MACs the fast form really computes / dense, mean over ``clips`` (batch 1 each)."""
        if isinstance(self.model, PlanBook):
            return statistics.fmean(float(self.model.macs(c)[0]) for c in clips) / dense_macs
        if self.wrapper is None:
            return count_macs(self.model, clips[0]).total / dense_macs
        pruner, compact = self.wrapper.pruner, CompactPruner(self.wrapper.pruner)
        ran = []
        with torch.no_grad():
            for clip in clips:
                pruner(clip)  # fills last_stats: the dense parts and the controller's MACs
                stats = pruner.last_stats
                with count_executed_macs() as macs:
                    compact(clip)
                ran.append(macs.total + stats.fixed_macs + stats.controller_macs)
        return statistics.fmean(ran) / dense_macs

    def traffic(self, clips: Sequence[torch.Tensor]) -> list[TrafficMeasurement]:
        """Bytes moved and MACs run by the fast form on each clip, measured from the executed
        op stream (:func:`lightning_dance.bytes.measure_traffic`; static models on the dense
        fast kernels, DANCE models on the compact path, controller included), as a stream:
        each clip after the one before it (the first after the last), so that weight blocks
        of channel sets that recur from clip to clip are reused as they are when deployed."""
        target = self.model if self.wrapper is None else CompactPruner(self.wrapper.pruner)
        return [
            measure_traffic(target, clip, warmup=[clips[i - 1]] if len(clips) > 1 else None)
            for i, clip in enumerate(clips)
        ]


def energy_figures(own: Sequence[TrafficMeasurement],
                   dense: Sequence[TrafficMeasurement]) -> dict[str, float]:  # fmt: skip
    """Measured traffic saving and estimated energy saving (dense / own, means over clips) under
    a DRAM-only model and each cache-aware target of :data:`lightning_dance.energy.TARGETS`."""

    def mean_pj(model: EnergyModel, runs: Sequence[TrafficMeasurement]) -> float:
        return statistics.fmean(model.measured_energy_pj(t.macs, t) for t in runs)

    figures = {"traffic_saving": statistics.fmean(t.total for t in dense)
               / statistics.fmean(t.total for t in own)}  # fmt: skip
    for name, model in ENERGY_MODELS.items():
        figures[f"energy_saving_{name}"] = mean_pj(model, dense) / mean_pj(model, own)
    return figures


#: time an onnxruntime form of every model that exports (``--no-onnx`` turns it off)
ONNX_FORM = True
#: time a compiled form of every static model and plan book (``--no-compile`` turns it off)
COMPILED_FORM = True
#: the runtimes a form belongs to; each method's speedup in one is over dense in the same one
RUNTIMES = ("eager", "compiled", "onnxruntime")


def _runtime(form: str) -> str:
    """The runtime of a timed form: ``"compiled"``, ``"onnxruntime"`` or ``"eager"``."""
    if form.startswith("compiled"):
        return "compiled"
    return "onnxruntime" if form == "onnxruntime" else "eager"

#: the energy estimates reported: every access at DRAM, and cache-aware edge targets
ENERGY_MODELS = reported_models()


# ------------------------------------------------------------------------------ the methods

Method = Callable[[Context, float, int], Candidate]
METHODS: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    """Register a method of the benchmark under ``name`` (one function: context, budget, seed)."""

    def register(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = fn
        return fn

    return register


@functools.cache
def matched_width(task: Task, budget: float) -> tuple[float, float]:
    """The width multiplier whose model's MACs are closest to ``budget`` x the task model's
    (``create_model`` rounds channels, so the ratio moves in steps); returns (width, ratio).
    The Conv3d MACs grow with the width: a bisection over 1/64 steps of the task's width."""
    example = torch.zeros(1, *task.clip_shape)

    def ratio_at(step: int) -> float:
        net = create_model(task.model, task.num_classes, width=task.width * step / 64)
        return conv3d_macs(net, example) / dense

    dense = conv3d_macs(create_model(task.model, task.num_classes, width=task.width), example)
    low, high = 1, 64  # ratio_at(high) >= budget
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ratio_at(mid) < budget else (low, mid)
    step = min((low, high), key=lambda s: abs(ratio_at(s) - budget))
    width = task.width * step / 64
    net = create_model(task.model, task.num_classes, width=width)
    return width, count_macs(net, example).total / count_macs(
        create_model(task.model, task.num_classes, width=task.width), example
    ).total


@method("slim")
def slim(ctx: Context, budget: float, seed: int) -> Candidate:
    width, ratio = matched_width(ctx.task, budget)
    module = ctx.task.classifier(width=width)
    ctx.fit(module, ctx.task.total_epochs, f"slim-{budget}")
    return Candidate(module.model.eval(), note=f"width {width:.4g} (MACs {ratio:.3f})")


def static_prune(ctx: Context, budget: float) -> tuple[nn.Module, float]:
    """The seed's dense start pruned with Torch-Pruning to the step whose Conv3d MACs are
    closest to ``budget`` x dense (``lightning_dance.baselines.torch_prune``: L2-magnitude
    importance, the same ratio in every layer, 1% of the channels a step); returns (model in
    train mode, Conv3d MAC ratio)."""
    net, ratio = torch_prune(ctx.start("dense").model.eval(), ctx.example, budget)
    # back to train mode: Lightning keeps each submodule's own eval flag through fit, so a net
    # left in eval mode would be fine-tuned with frozen BatchNorm statistics (on this task that
    # left its test predictions constant: 16.6% top-1, chance)
    return net.train(), ratio


@method("torch-pruning")
def torch_pruning(ctx: Context, budget: float, seed: int) -> Candidate:
    return _fine_tuned_static(ctx, budget, distil=False)


@method("torch-pruning-kd")
def torch_pruning_kd(ctx: Context, budget: float, seed: int) -> Candidate:
    """``torch-pruning`` fine-tuned with distillation from the dense start (cross-entropy +
    :func:`~lightning_dance.losses.distillation_loss`), as every DANCE row is trained
    (``task="both"``): the static baseline trained as carefully."""
    return _fine_tuned_static(ctx, budget, distil=True)


def _fine_tuned_static(ctx: Context, budget: float, distil: bool) -> Candidate:
    """:func:`static_prune` to ``budget``, then fine-tuned for the AVA + tune epochs (with
    ``distil``: cross-entropy + distillation from the dense start)."""
    net, ratio = static_prune(ctx, budget)
    teacher = ctx.start("dense").model.eval() if distil else None
    module = ctx.task.classifier(model=net, lr=ctx.task.tune_lr, teacher=teacher)
    ctx.fit(module, ctx.task.ava_epochs + ctx.task.tune_epochs,
            f"tp-kd-{budget}" if distil else f"tp-{budget}")  # fmt: skip
    return Candidate(module.model.eval(),
                     note=f"Conv3d MACs {ratio:.3f}" + (", distilled" if distil else ""))  # fmt: skip


def _dance(ctx: Context, budget: float, *, start: str | nn.Module, policy: str,
           dims: tuple[str, ...], epochs: int, credit_outputs: bool = False,
           **kwargs: Any) -> Candidate:  # fmt: skip
    """DANCE's joint recipe from ``start``. The rows named without ``-credit`` count every
    channel-chain producer in full (``credit_outputs=False``, the wrapper's earlier default),
    as they were measured; the ``-credit`` rows count what the compact path runs. The rows
    without ``-ce`` train on cross-entropy + distillation from the start (``task="both"``, the
    wrapper's default until the benchmark showed its cost; now ``"auto"``), as they were
    measured; the ``-ce`` rows pass ``task="labels"``."""
    kwargs.setdefault("task", "both")
    t = ctx.task
    L.seed_everything(ctx.seed, verbose=False)
    wrapper = train_controller(
        ctx.start(start) if isinstance(start, str) else start, ctx.dm, budget=budget, policy=policy, dims=dims, epochs=epochs,
        calibrate_batches=len(ctx.dm.val_dataloader()), lr=t.controller_lr,
        freeze_backbone=False, backbone_lr=t.tune_lr, budget_warmup=t.budget_warmup,
        lr_schedule="cosine", progress=ctx.progress, credit_outputs=credit_outputs, **kwargs,
    )  # fmt: skip
    return Candidate(wrapper.eval(), wrapper=wrapper)


#: extra DANCEWrapper arguments of DANCE's threshold rows. Not ``calibrate_every``: it holds the
#: demo's tiny_c3d at budget 0.6, but on this task at 0.35 it collapsed DANCE to 22.9% top-1
#: (76.6% without; one seed), see docs/benchmarks.md
THRESHOLD_RECIPE: dict[str, Any] = {}


ALL_DIMS = ("frame", "channel", "feature")


def _mod_topk(ctx: Context, budget: float, **kwargs: Any) -> Candidate:
    """The ``topk`` policy on channels, fine-tuned jointly from the dense start for the AVA +
    tune epochs (``kwargs``: what a ``mod-topk`` variant changes)."""
    return _dance(ctx, budget, start="dense", policy="topk", dims=("channel",),
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, **kwargs)  # fmt: skip


@method("mod-topk")
def mod_topk(ctx: Context, budget: float, seed: int) -> Candidate:
    return _mod_topk(ctx, budget)


@method("mod-topk-credit")
def mod_topk_credit(ctx: Context, budget: float, seed: int) -> Candidate:
    """``mod-topk`` with ``credit_outputs=True``: the budget is the MACs the compact path runs
    (a producer computes only the channels its consumer keeps), so at the same budget it keeps
    more channels per layer than ``mod-topk``, whose budget counts input masks only."""
    return _mod_topk(ctx, budget, credit_outputs=True)


@method("mod-topk-credit-ce")
def mod_topk_credit_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """The distillation ablation of ``mod-topk-credit``: cross-entropy only (``task="labels"``),
    where ``mod-topk-credit`` trains on cross-entropy + distillation from the dense start
    (``task="both"``)."""
    return _mod_topk(ctx, budget, credit_outputs=True, task="labels")


@method("mod-topk-credit-h256")
def mod_topk_credit_h256(ctx: Context, budget: float, seed: int) -> Candidate:
    """The controller-capacity lever: ``mod-topk-credit`` with a 4x wider controller
    (``hidden=256`` instead of 64; its MACs are counted in the budget like the default's)."""
    return _mod_topk(ctx, budget, credit_outputs=True, hidden=256)


@method("mod-topk-credit-prior")
def mod_topk_credit_prior(ctx: Context, budget: float, seed: int) -> Candidate:
    """The static-prior lever: ``mod-topk-credit`` whose controller starts from the channels a
    magnitude ranking keeps (:func:`lightning_dance.priors.apply_channel_prior`, the L2
    criterion Torch-Pruning uses), instead of a near-random subset that changes per clip."""
    return _mod_topk(ctx, budget, credit_outputs=True, prepare=apply_channel_prior)


@method("mod-topk-credit-explore3")
def mod_topk_credit_explore3(ctx: Context, budget: float, seed: int) -> Candidate:
    """The schedule lever: ``mod-topk-credit`` with the gates' exploration noise gone after 30%
    of the steps (``noise_anneal=0.3``, default 0.7), when the budget reaches its target, so
    the backbone fine-tunes on the controller's own decisions for the rest."""
    return _mod_topk(ctx, budget, credit_outputs=True, noise_anneal=0.3)


@method("mod-topk-credit-static-first")
def mod_topk_credit_static_first(ctx: Context, budget: float, seed: int) -> Candidate:
    """The static-then-dynamic schedule: ``mod-topk-credit`` from the magnitude prior, without
    exploration noise, trained as a static pruner for the first half of the steps, then with
    the per-clip decisions for the second half (:class:`lightning_dance.static_first.StaticFirst`)."""
    return _mod_topk(ctx, budget, credit_outputs=True, noise_anneal=0.0,
                     callbacks=[StaticFirst(0.5)])  # fmt: skip


@method("mod-topk-credit-static-first-ce")
def mod_topk_credit_static_first_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """``mod-topk-credit-static-first`` on cross-entropy only (``task="labels"``), the loss the
    static baselines train with."""
    return _mod_topk(ctx, budget, credit_outputs=True, noise_anneal=0.0,
                     callbacks=[StaticFirst(0.5)], task="labels")  # fmt: skip


@method("static-first-projection")
def static_first_projection(ctx: Context, budget: float, seed: int) -> Candidate:
    """The static projection of ``mod-topk-credit-static-first-ce`` (trained or taken from the
    cache, nothing retrained): for every clip, the channels it keeps most often on the
    validation clips (:func:`lightning_dance.priors.freeze_channels`, ``standalone=True``: no
    controller statistics, constant indices in the export), at the same kept counts."""
    source = ctx.trained("mod-topk-credit-static-first-ce", budget)
    wrapper = copy.deepcopy(source.wrapper).eval()
    clips = (clip for clip, _ in ctx.dm.val_dataloader())
    freeze_channels(wrapper, channel_frequencies(wrapper, clips), standalone=True)
    return Candidate(wrapper, wrapper=wrapper, note="static projection, from the cache")


@method("static-first-materialized")
def static_first_materialized(ctx: Context, budget: float, seed: int) -> Candidate:
    """``static-first-projection`` made physical (:func:`lightning_dance.materialize.materialize`):
    the same outputs and counted MACs, as a plain model with the dropped channels removed from
    its weights (no gathers along channel chains, no controller), timed like the static models."""
    source = ctx.trained("static-first-projection", budget)
    model = materialize(source.wrapper, ctx.example)
    return Candidate(model, note="the projection, materialized")


@method("dance")
def dance(ctx: Context, budget: float, seed: int) -> Candidate:
    return _dance(ctx, budget, start="ava", policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.tune_epochs, **THRESHOLD_RECIPE)  # fmt: skip


@method("dance-feedback")
def dance_feedback(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance`` with ``budget_feedback=1``: the calibration offset follows the training budget
    (a dual variable), so that training runs at the MACs the model is calibrated to."""
    return _dance(ctx, budget, start="ava", policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.tune_epochs, budget_feedback=1.0)  # fmt: skip


@method("dance-topk")
def dance_topk(ctx: Context, budget: float, seed: int) -> Candidate:
    return _dance(ctx, budget, start="ava", policy="topk", dims=("channel",),
                  epochs=ctx.task.tune_epochs)  # fmt: skip


@method("dance-width")
def dance_width(ctx: Context, budget: float, seed: int) -> Candidate:
    """The AVA start with the ``width`` policy: per clip, the first ``k`` channels of each layer
    (``k`` from the controller's scores, a multiple of 8): input-adaptive like ``dance``, and
    its fast path slices where the others gather."""
    return _dance(ctx, budget, start="ava", policy="width", dims=("channel",),
                  epochs=ctx.task.tune_epochs)  # fmt: skip


@method("dance-noava")
def dance_noava(ctx: Context, budget: float, seed: int) -> Candidate:
    return _dance(ctx, budget, start="dense", policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, **THRESHOLD_RECIPE)  # fmt: skip


@method("dance-noava-credit")
def dance_noava_credit(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-noava`` with ``credit_outputs=True`` (the budget is what the compact path runs)."""
    return _dance(ctx, budget, start="dense", policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, credit_outputs=True,
                  **THRESHOLD_RECIPE)  # fmt: skip


@method("dance-noava-credit-ce")
def dance_noava_credit_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-noava-credit`` on cross-entropy only (``task="labels"``, the static baselines'
    loss): no distillation from the dense start, which is the teacher of every other DANCE row
    and, after its ``dense_epochs``, not a converged model."""
    return _dance(ctx, budget, start="dense", policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, credit_outputs=True,
                  task="labels", **THRESHOLD_RECIPE)  # fmt: skip


@method("dance-channel-ce")
def dance_channel_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """The paper's ``threshold`` policy (per-clip keep counts) on channels only, in every layer
    but the stem: ``dance-noava-credit-ce`` without frames and features, ``mod-topk-credit-ce``
    with per-clip counts in place of fixed ones (and so on the compact path's index plan)."""
    return _dance(ctx, budget, start="dense", policy="threshold", dims=("channel",),
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, credit_outputs=True,
                  task="labels", **THRESHOLD_RECIPE)  # fmt: skip


#: ``difficulty_spread`` of the ``-difficulty`` rows: the hardest clip of a training batch is
#: asked to spend ``budget * 1.5``, the easiest ``budget * 0.5`` (:mod:`lightning_dance.allocation`)
DIFFICULTY_SPREAD = 0.5


@method("dance-channel-ce-difficulty")
def dance_channel_ce_difficulty(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-channel-ce`` with the batch's budget shared by difficulty in training
    (``difficulty_spread``): a reason for the per-clip controller to spend more on hard clips."""
    return _dance(ctx, budget, start="dense", policy="threshold", dims=("channel",),
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, credit_outputs=True,
                  task="labels", difficulty_spread=DIFFICULTY_SPREAD,
                  **THRESHOLD_RECIPE)  # fmt: skip


#: ``{layer: dims}`` for ``dance-selected`` (``--layer-dims``)
LAYER_DIMS: dict[str, tuple[str, ...]] | None = None


@method("dance-selected")
def dance_selected(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-noava-credit`` with each layer pruning only the dims ``--layer-dims`` gives it
    (``AdaptivePruner(layer_dims=...)``; layers it does not name stay dense): the selection
    :func:`~lightning_dance.execution.profitable_dims` makes where the model is deployed, e.g.
    a ``selected`` row of ``latency_benchmark.py`` (its ``layer_dims``)."""
    return _dance_selected(ctx, budget)


@method("dance-selected-ce")
def dance_selected_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-selected`` on cross-entropy only (``task="labels"``)."""
    return _dance_selected(ctx, budget, task="labels")


@method("dance-selected-static-first-ce")
def dance_selected_static_first_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-selected-static-first`` on cross-entropy only (``task="labels"``)."""
    return _dance_selected(ctx, budget, noise_anneal=0.0, callbacks=[StaticFirst(0.5)],
                           task="labels")  # fmt: skip


@method("dance-selected-static-first")
def dance_selected_static_first(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-selected`` trained static first (:class:`~lightning_dance.static_first.StaticFirst`:
    the magnitude prior, no exploration noise, the controller's input part frozen for half of
    the steps), then per clip; ``--layer-dims`` must prune channels only (a ``best dim``
    selection). The threshold policy's kept counts vary per clip in the second half."""
    return _dance_selected(ctx, budget, noise_anneal=0.0, callbacks=[StaticFirst(0.5)])


@method("dance-selected-static-first-materialized")
def dance_selected_static_first_materialized(ctx: Context, budget: float, seed: int) -> Candidate:
    """The static projection of ``dance-selected-static-first-ce`` (trained or taken from the
    cache, nothing retrained): each layer keeps, for every clip, as many channels as it kept on
    average on the validation clips, the ones it kept most often
    (:func:`~lightning_dance.priors.freeze_channels`), made physical
    (:func:`~lightning_dance.materialize.materialize`) and timed like the static models."""
    return _materialized_projection(ctx, "dance-selected-static-first-ce", budget)


@method("dance-channel-ce-materialized")
def dance_channel_ce_materialized(ctx: Context, budget: float, seed: int) -> Candidate:
    """The static projection of ``dance-channel-ce`` made physical, as above: DANCE's
    ``threshold`` training, deployed without its per-clip choice."""
    return _materialized_projection(ctx, "dance-channel-ce", budget)


@method("hybrid-threshold-ce-materialized")
def hybrid_threshold_ce_materialized(ctx: Context, budget: float, seed: int) -> Candidate:
    """The static projection of ``hybrid-threshold-ce`` made physical, as above."""
    return _materialized_projection(ctx, "hybrid-threshold-ce", budget)


@method("dance-channel-ce-book4")
def dance_channel_ce_book4(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-channel-ce`` (trained or from the cache, nothing retrained) served by a plan
    book of 4 static sub-networks (:func:`~lightning_dance.plan_book.plan_book` on the
    validation clips): the controller still chooses per clip, among 4 materialized plans."""
    return _plan_book(ctx, "dance-channel-ce", budget, plans=4)


@method("dance-channel-ce-book8")
def dance_channel_ce_book8(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-channel-ce-book4`` with 8 plans."""
    return _plan_book(ctx, "dance-channel-ce", budget, plans=8)


def _plan_book(ctx: Context, source: str, budget: float, plans: int) -> Candidate:
    wrapper = ctx.trained(source, budget).wrapper
    clips = [clip for clip, _ in ctx.dm.val_dataloader()]
    book = plan_book(wrapper, clips, plans=plans, seed=ctx.seed)
    return Candidate(book, note=f"plan book of {len(book.networks)}")


def _materialized_projection(ctx: Context, source: str, budget: float) -> Candidate:
    """Method ``source`` (trained or from the cache, nothing retrained) frozen to its static
    projection on the validation clips (each layer keeps, for every clip, its mean count of the
    channels it kept most often, :func:`~lightning_dance.priors.freeze_channels`) and made
    physical (:func:`~lightning_dance.materialize.materialize`): a plain model, timed like the
    static ones."""
    wrapper = copy.deepcopy(ctx.trained(source, budget).wrapper).eval()
    clips = (clip for clip, _ in ctx.dm.val_dataloader())
    freeze_channels(wrapper, channel_frequencies(wrapper, clips), standalone=True)
    return Candidate(materialize(wrapper, ctx.example), note="static projection, materialized")


def _dance_selected(ctx: Context, budget: float, **kwargs: Any) -> Candidate:
    if LAYER_DIMS is None:
        raise ValueError("dance-selected needs --layer-dims FILE: a JSON {layer: [dims]}")
    start = ctx.start("dense")  # a VideoClassifier: the network's layers are under "model."
    convs = {n for n, m in start.named_modules() if isinstance(m, nn.Conv3d)}
    where = {n if n in convs else f"model.{n}": d for n, d in LAYER_DIMS.items()}
    return _dance(ctx, budget, start=start, policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, credit_outputs=True,
                  layers=list(where), layer_dims=where, **THRESHOLD_RECIPE, **kwargs)  # fmt: skip


def _layer_dims_tag() -> str:
    """The cache tag of ``dance-selected``: a digest of its ``--layer-dims``."""
    import hashlib

    text = json.dumps(LAYER_DIMS, sort_keys=True)
    return "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


for _m in (dance_selected, dance_selected_ce, dance_selected_static_first,
           dance_selected_static_first_ce, dance_selected_static_first_materialized):
    _m.cache_tag = _layer_dims_tag


@method("dance-noava-credit-outputs")
def dance_noava_credit_outputs(ctx: Context, budget: float, seed: int) -> Candidate:
    """``dance-noava-credit`` with feature masks on the layers' outputs
    (``feature_site="outputs"``: a dropped block is skipped work, as in spatially sparse
    convolutions), trained the same way: which site gives the better accuracy per saved MAC."""
    return _dance(ctx, budget, start="dense", policy="threshold", dims=ALL_DIMS,
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs, credit_outputs=True,
                  feature_site="outputs", **THRESHOLD_RECIPE)  # fmt: skip


@method("attention")
def attention(ctx: Context, budget: float, seed: int) -> Candidate:
    return _dance(ctx, budget, start="dense", policy="attention", dims=("channel", "feature"),
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs)  # fmt: skip


#: the share of the hybrid's budget that is static: prune statically to ``budget / HYBRID_DYNAMIC``
#: of the MACs, then let DANCE keep ``HYBRID_DYNAMIC`` of what remains per clip
HYBRID_DYNAMIC = 0.7


@method("hybrid")
def hybrid(ctx: Context, budget: float, seed: int) -> Candidate:
    """Static, then dynamic: Torch-Pruning to ``budget / HYBRID_DYNAMIC`` of the MACs, then the
    ``topk`` channel policy at ``HYBRID_DYNAMIC`` of the pruned model's MACs per clip, backbone
    and controller fine-tuned jointly for the AVA + tune epochs."""
    return _hybrid(ctx, budget, credit_outputs=False)


@method("hybrid-credit")
def hybrid_credit(ctx: Context, budget: float, seed: int) -> Candidate:
    """``hybrid`` charged with what its compact path runs (``credit_outputs=True``)."""
    return _hybrid(ctx, budget, credit_outputs=True)


@method("hybrid-credit-ce")
def hybrid_credit_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """``hybrid-credit`` on cross-entropy only (``task="labels"``): the other rows' teacher is
    the pruned model before any fine-tuning, the weakest teacher of all."""
    return _hybrid(ctx, budget, credit_outputs=True, task="labels")


@method("hybrid-threshold-ce")
def hybrid_threshold_ce(ctx: Context, budget: float, seed: int) -> Candidate:
    """``hybrid-credit-ce`` with the paper's ``threshold`` policy on channels (per-clip keep
    counts) in place of ``topk``."""
    return _hybrid(ctx, budget, credit_outputs=True, task="labels", policy="threshold")


@method("hybrid-threshold-ce-difficulty")
def hybrid_threshold_ce_difficulty(ctx: Context, budget: float, seed: int) -> Candidate:
    """``hybrid-threshold-ce`` with the per-clip budget shared by difficulty in training
    (``difficulty_spread``, as ``dance-channel-ce-difficulty``)."""
    return _hybrid(ctx, budget, credit_outputs=True, task="labels", policy="threshold",
                   difficulty_spread=DIFFICULTY_SPREAD)  # fmt: skip


def _hybrid(ctx: Context, budget: float, credit_outputs: bool, policy: str = "topk",
            **kwargs: Any) -> Candidate:  # fmt: skip
    static = min(1.0, budget / HYBRID_DYNAMIC)
    net, _ = static_prune(ctx, static)
    scale = count_macs(net, ctx.example).total / ctx.dense_macs()
    start = ctx.task.classifier(model=net, lr=ctx.task.tune_lr)
    cand = _dance(ctx, min(1.0, budget / scale), start=start, policy=policy, dims=("channel",),
                  epochs=ctx.task.ava_epochs + ctx.task.tune_epochs,
                  credit_outputs=credit_outputs, **kwargs)  # fmt: skip
    cand.scale = scale
    cand.note = f"static MACs {scale:.3f}, then {policy} at {budget / scale:.3f}"
    return cand


# ------------------------------------------------------------------------------- the harness


def run_seed(task: Task, seed: int, methods: Sequence[str], budgets: Sequence[float],
             args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """Train and measure every method at every budget for one seed (each row is printed and
    appended to ``out/rows.jsonl`` as soon as it is known), then time them all side by side."""
    ctx = Context(task, seed, task.datamodule(), progress=args.progress, cache=args.cache)
    ctx.dm.setup("fit")
    dm = ctx.dm  # the clips timed and measured: the task's, or the same generator's at --latency-size
    if getattr(args, "latency_size", None):
        dm = dataclasses.replace(task, size=args.latency_size).datamodule()
        dm.setup("fit")
    clips = [clip[None] for clip, _ in itertools.islice(iter(dm.test_dataset),
                                                         args.latency_clips)]  # fmt: skip
    dense_macs = count_macs(task.classifier().model, clips[0]).total
    candidates: dict[tuple[str, float], Candidate] = {}
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    failed: list[dict[str, Any]] = []
    reference: list[TrafficMeasurement] | None = None  # the dense model's
    for name, budget in [("dense", 1.0), *itertools.product(methods, budgets)]:
        t0 = time.perf_counter()
        try:
            # the dense reference: the task's model trained as long as every method
            if name == "dense":
                cand = Candidate(ctx.reference(), note="the reference")
            else:
                cand = ctx.trained(name, budget)
        except Exception as err:  # a baseline that fails on a model is a result to report
            failed.append({"method": name, "budget": budget, "seed": seed,
                           "error": f"{type(err).__name__}: {err}"})  # fmt: skip
            print(f"[seed {seed}] {name} @ {budget}: FAILED {err}", flush=True)
            continue
        traffic = cand.traffic(clips)
        if reference is None:
            reference = traffic
        row = {"method": name, "budget": budget, "seed": seed, **cand.evaluate(ctx),
               "ran_ratio": cand.ran_ratio(clips, dense_macs), **energy_figures(traffic, reference),
               "params": sum(p.numel() for p in cand.model.parameters()),
               "train_seconds": time.perf_counter() - t0, "note": cand.note}  # fmt: skip
        candidates[(name, budget)], rows[(name, budget)] = cand, row
        print(f"[seed {seed}] {name:>14} @ {budget:.2f}: top-1 {row['acc']:.4f}  MACs "
              f"{row['mac_ratio']:.3f} (ran {row['ran_ratio']:.3f})  traffic "
              f"x{row['traffic_saving']:.2f}  energy x{row['energy_saving_dram']:.2f} (DRAM), "
              f"x{row['energy_saving_jetson_nano']:.2f} (Jetson Nano)  {cand.note}", flush=True)  # fmt: skip
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    runs: dict[str, Callable[[], Any]] = {}
    for (name, budget), cand in candidates.items():
        cand.model.to(memory_format=torch.channels_last_3d)  # the fastest layout, same values
        per_clip = [cand.forms(c) for c in clips]
        for form in per_clip[0]:
            cycle = itertools.cycle([forms[form] for forms in per_clip])
            runs[f"{name}@{budget}/{form}"] = lambda cycle=cycle: next(cycle)()
    times = interleaved(runs, warmup=args.warmup, repeats=args.repeats)

    def fastest(name: str, budget: float, runtime: str | None = None) -> tuple[str, Timing]:
        own = {
            k.rsplit("/", 1)[1]: t for k, t in times.items() if k.startswith(f"{name}@{budget}/")
        }
        if runtime is not None:  # "eager", "compiled" (torch.compile) or "onnxruntime"
            own = {f: t for f, t in own.items() if _runtime(f) == runtime}
        return min(own.items(), key=lambda kv: kv[1].median_ms) if own else ("", None)

    base = fastest("dense", 1.0)[1]
    for (name, budget), row in rows.items():
        form, t = fastest(name, budget)
        row.update(latency_ms=t.median_ms, latency_p90_ms=t.p90_ms, speedup=t.speedup_over(base),
                   latency_form=form, latency_forms={  # every form timed: its median
                       k.rsplit("/", 1)[1]: v.median_ms for k, v in times.items()
                       if k.startswith(f"{name}@{budget}/")})  # fmt: skip
        for runtime in RUNTIMES:  # each runtime against dense in the same one
            own, ref = fastest(name, budget, runtime)[1], fastest("dense", 1.0, runtime)[1]
            if own is not None and ref is not None:
                row[f"speedup_{runtime}"] = own.speedup_over(ref)
        per_runtime = ", ".join(f"{r} {row[f'speedup_{r}']:.2f}x" for r in RUNTIMES
                                if f"speedup_{r}" in row)  # fmt: skip
        print(f"[seed {seed}] {name:>14} @ {budget:.2f}: {t.median_ms:.2f} ms ({form}), speedup "
              f"{row['speedup']:.2f}x over dense in its fastest form ({per_runtime})", flush=True)  # fmt: skip
    if args.out is not None:  # the rows again, now timed (a merge keeps the last of each)
        with open(args.out / "rows.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in [*rows.values(), *failed])
    return [*rows.values(), *failed]


FIGURES = ("acc", "mac_ratio", "mac_ratio_p5", "mac_ratio_p95", "ran_ratio", "latency_ms",
           "speedup", *(f"speedup_{r}" for r in RUNTIMES), "traffic_saving", *(f"energy_saving_{n}" for n in ENERGY_MODELS),
           *(f"{k}_{third}" for k in ("acc", "mac") for third in THIRDS))  # fmt: skip


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and budget: mean and std over seeds of every figure (failures listed)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["budget"]), []).append(row)
    out = []
    for (name, budget), group in groups.items():
        ok = [r for r in group if "error" not in r]
        entry: dict[str, Any] = {"method": name, "budget": budget, "seeds": len(ok)}
        for f in FIGURES:
            values = [r[f] for r in ok if f in r]  # untimed rows of an unfinished run lack some
            entry[f] = statistics.fmean(values) if values else math.nan
            entry[f + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if len(ok) < len(group):
            entry["errors"] = sorted({r["error"] for r in group if "error" in r})
        out.append(entry)
    return out


def _times(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}x"


def markdown(summary: Sequence[dict[str, Any]], result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Task: `{result['task']['model']}` width {result['task']['width']}, "
        f"{result['task']['num_classes']} classes, clips {result['task']['frames']}x"
        f"{result['task']['size']}x{result['task']['size']}, {result['task']['total_epochs']} "
        f"epochs per method, seeds {result['seeds']}. Latency, bytes and MACs ran: batch 1, "
        f"clips {result['task']['frames']}x{result.get('latency_size', result['task']['size'])}x"
        f"{result.get('latency_size', result['task']['size'])}, {m['threads']} threads, "
        f"{m['cpu']} (AVX2 {m['avx2']}, AVX-512 {m['avx512']}), load {m['loadavg']}; speedup = "
        "dense-fast median / method median, interleaved.",
        "",
        "| method | budget | seeds | top-1 (mean ± std) | MACs counted (p5-p95) | MACs ran | "
        "latency ms | speedup | speedup eager / compiled / onnxruntime | traffic saving | "
        "energy saving (est.): " + ", ".join(ENERGY_MODELS) + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        if not e["seeds"]:
            lines.append(f"| {e['method']} | {e['budget']} | 0 | failed: {'; '.join(e['errors'])} "
                         "| | | | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {e['method']} | {e['budget']} | {e['seeds']} | {100 * e['acc']:.1f} ± "
            f"{100 * e['acc_std']:.1f} | {e['mac_ratio']:.3f} ({e['mac_ratio_p5']:.2f}-"
            f"{e['mac_ratio_p95']:.2f}) | {e['ran_ratio']:.3f} | {e['latency_ms']:.2f} | "
            f"{e['speedup']:.2f}x ± {e['speedup_std']:.2f} | "
            + " / ".join(_times(e[f"speedup_{r}"]) for r in RUNTIMES)
            + f" | x{e['traffic_saving']:.2f} | "
            + ", ".join(f"x{e['energy_saving_' + n]:.2f}" for n in ENERGY_MODELS)
            + " |"
        )
    by_difficulty = [
        e for e in summary if e["seeds"] and not math.isnan(e.get("acc_easy", math.nan))
    ]
    if by_difficulty:
        lines += [
            "",
            "By clip difficulty (thirds of the test clips by the generator's difficulty score): "
            "top-1 and counted MACs per third, means over seeds.",
            "",
            "| method | budget | top-1 easy | top-1 mid | top-1 hard | MACs easy | MACs mid | "
            "MACs hard |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in by_difficulty:
            lines.append(
                f"| {e['method']} | {e['budget']} | "
                + " | ".join(f"{100 * e['acc_' + t]:.1f}" for t in THIRDS)
                + " | "
                + " | ".join(f"{e['mac_' + t]:.3f}" for t in THIRDS)
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Top-1 vs counted MACs and vs measured speedup, one curve per method (std error bars;
    the spread of the cost over seeds is in the table)."""
    ok = [e for e in summary if e["seeds"]]
    paths = []
    for x, label, name in (
        ("mac_ratio", "executed / dense MACs (counted)", "pareto_macs.png"),
        (
            "speedup",
            "measured batch-1 speedup over dense in its fastest form",
            "pareto_latency.png",
        ),
    ):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for e in ok:
            series.setdefault(e["method"], []).append((e[x], 100 * e["acc"], 100 * e["acc_std"]))
        paths.append(accuracy_vs_cost(series, label, out / name, ylabel="test top-1 (%)"))
    return paths


# ---------------------------------------------------------------------------------- the CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Task()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35, 0.25])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for f in ("model", "width", "num_classes", "frames", "size", "train_size", "val_size",
              "test_size", "batch_size", "noise", "max_distractors", "partial_visibility",
              "dense_epochs", "ava_epochs", "tune_epochs", "lr", "tune_lr", "controller_lr",
              "budget_warmup"):  # fmt: skip
        value = getattr(defaults, f)
        p.add_argument("--" + f.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--layer-dims", type=Path, default=None, metavar="FILE",
                   help="dance-selected: a JSON {layer: [dims]} (e.g. a latency_benchmark.py "
                   "'selected' row's layer_dims)")  # fmt: skip
    p.add_argument("--latency-clips", type=int, default=8, help="test clips cycled in timing")
    p.add_argument("--latency-size", type=int, default=None, metavar="N",
                   help="time the models and measure their bytes on NxN test clips of the same "
                   "generator (the deployment size; the models are fully convolutional); "
                   "default: the task's size. Top-1 and counted MACs stay on the task's clips")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each model exported to onnxruntime (spinning off)")  # fmt: skip
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each static model and plan book compiled (torch.compile, "
                   "inductor with freezing; needs a C++ compiler)")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stdout.isatty())
    p.add_argument("--cache", type=Path, default=None,
                   help="keep the dense and AVA starts of each seed here (reused if the task matches)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto"))
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="ROWS",
                   help="train nothing: summarize the rows.jsonl files of earlier runs (e.g. one "
                   "process per seed) into --out")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="minutes: a small model, tiny clips, one epoch a stage, 1 seed, 1 budget")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        if args.model == defaults.model and args.width == defaults.width:
            args.width = 0.125
        args.num_classes, args.frames, args.size = 4, 4, 16
        args.train_size, args.val_size, args.test_size, args.batch_size = 32, 16, 16, 8
        args.dense_epochs = args.ava_epochs = args.tune_epochs = 1
        args.seeds, args.budgets = args.seeds[:1], args.budgets[:1]
        args.latency_clips, args.warmup, args.repeats = 2, 1, 3
    if any(not 0 < b < 1 for b in args.budgets):
        p.error("--budgets must be in (0, 1): the dense model is always in the table")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    global ONNX_FORM, COMPILED_FORM, LAYER_DIMS
    ONNX_FORM, COMPILED_FORM = args.onnx, args.compile
    if args.layer_dims is not None:
        LAYER_DIMS = {k: tuple(v) for k, v in json.loads(args.layer_dims.read_text()).items()}
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):  # one line a row, not Trainer banners
        logging.getLogger(name).setLevel(logging.WARNING)
    task = Task(**{f: getattr(args, f) for f in Task.__dataclass_fields__ if hasattr(args, f)})
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.merge:  # earlier runs' rows: the last of a (method, budget, seed), timed ones first
        merged: dict[tuple[str, float, int], dict[str, Any]] = {}
        for path in args.merge:
            for line in path.read_text().splitlines():
                row = json.loads(line)
                key = (row["method"], row["budget"], row["seed"])
                if "latency_ms" in merged.get(key, {}) and "latency_ms" not in row:
                    continue  # a timed row is not replaced by an untimed one
                merged[key] = row
        rows = list(merged.values())
        args.methods = list(dict.fromkeys(r["method"] for r in rows))
        args.budgets = sorted({r["budget"] for r in rows}, reverse=True)
        args.seeds = sorted({r["seed"] for r in rows})
    for seed in [] if args.merge else args.seeds:
        rows += run_seed(task, seed, args.methods, args.budgets, args)
    summary = summarize(rows)
    result = {
        "command": " ".join(["benchmarks/pareto.py", *(argv if argv is not None else sys.argv[1:])]),
        "task": {**asdict(task), "total_epochs": task.total_epochs},
        "latency_size": args.latency_size or task.size,
        "methods": list(args.methods), "budgets": list(args.budgets), "seeds": list(args.seeds),
        "machine": machine(), "seconds": time.perf_counter() - start,
        "summary": summary, "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "summary.md").write_text(markdown(summary, result))
    result["plots"] = [str(p) for p in plot(summary, args.out)]
    print("\n" + markdown(summary, result))
    print(f"wrote {args.out}/results.json, summary.md, {', '.join(Path(p).name for p in result['plots'])} "
          f"({result['seconds'] / 60:.1f} min)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
