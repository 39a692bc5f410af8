"""Batch-1 latency of DANCE's compact execution vs the dense model in its fastest form.

For each model (random init, eval, ``channels_last_3d``):

- ``dense F.conv3d``: the plain model (NCDHW, PyTorch's own kernel choice), for reference only;
- ``dense fast``: the same model with every Conv3d through
  :func:`lightning_dance.execution.fast_conv3d` (oneDNN on ``channels_last_3d``): the baseline
  of every speedup, so that the kernel gain is never credited to pruning;
- per pruned-dims config and budget: an :class:`~lightning_dance.aap.AdaptivePruner` with the
  ``topk`` policy (or ``--policy threshold``) and an *untrained* controller, calibrated with
  ``pruner.calibrate`` so that executed/dense MACs meet the budget on a few random clips; then
  ``compact`` (:class:`~lightning_dance.execution.CompactPruner`: each layer's kept input
  work, and producers of channel chains compute only the output channels the next conv keeps),
  ``inputs-only`` (the same without output skipping: computes exactly the counted MACs),
  ``tuned`` (the same with per-layer kernel tunings: snapped counts and
  dense fallbacks where compact would be slower) and, where channels are pruned, ``credited``
  (a pruner with ``credit_outputs=True`` calibrated to the budget: the budget is what the
  output-skipping path really runs, so it keeps more channels than ``compact`` at the same
  budget) and, for ``topk``, ``multiple-8`` (``compact`` with a pruner built with
  ``channel_multiple=8``: every layer keeps a multiple of 8 channels, oneDNN's fast sizes).
  Config ``all@outputs`` is ``all`` with feature masks on the layers' outputs
  (``feature_site="outputs"``, :mod:`lightning_dance.feature_sites`), so that both sites run
  side by side in one process; ``--feature-site`` sets the site of the other configs.
  With ``topk`` and channels only, ``materialized`` is the ``credited`` pruner frozen to the
  channels it keeps on the clip (its static projection,
  :func:`~lightning_dance.priors.freeze_channels`) and made physical
  (:func:`~lightning_dance.materialize.materialize`: a plain model, run dense fast), and
  ``compact`` runs the index plan
  (:mod:`lightning_dance.execution.indexed`) and ``general plan`` is the same pruner on the
  mask-based plan (``index_plan=False``), for comparison.
  With ``--hybrid F`` and config ``channel``: ``Torch-Pruning`` (the model statically pruned to
  the budget, :func:`lightning_dance.baselines.torch_prune`, run dense fast) and ``Torch-Pruning
  to S, then <policy>`` (pruned statically to ``budget / F``, then the policy on channels per
  clip at ``F`` of what remains, credited count, compact path), with their bytes.

Everything runs interleaved in one process (round robin over variants after warm-up), with fixed
threads; medians and p90 are reported. The controller's masks, statistics and per-layer logits
are part of every DANCE latency.

- ``selected``: kernel-aware layer selection: a new pruner instrumenting only the layers that
  :func:`~lightning_dance.execution.profitable_layers` finds worth pruning at the tuned pruner's
  keep ratio, calibrated to the same budget (so those layers are pruned harder), with tunings.
- ``selected dims`` (two or more dims, a policy whose counts follow the scores): per layer only
  the dims :func:`~lightning_dance.execution.profitable_dims` finds worth pruning there, the
  model's channel chains included (``AdaptivePruner(layer_dims=...)``), calibrated to the same
  budget with ``credit_outputs=True`` (the budget is what runs), with tunings; ``selected best
  dim``: the same with one dim per layer, the one estimated fastest (``max_dims=1``); ``selected
  best dim, channels materialized``: its channel layers, pruned by a ``channels``-only pruner
  calibrated to the same budget, frozen to the channels it keeps on the clip and made physical
  (as ``materialized`` above): the same kind of cuts with nothing decided per clip, what the
  dynamic machinery costs. All three also report the bytes they move, measured from the ops
  that run, against the dense fast path, and the energy estimated from them (DRAM and the
  LLC-aware targets).

- ``MAC ratio`` = executed / dense MACs per clip, as counted by the pruner
  (:mod:`lightning_dance.executed`, controller included);
- ``ran`` = MACs the run really computed / dense (``tuned`` may compute more than counted);
- ``speedup`` = median dense-fast latency / median latency;
- ``real/ideal`` = speedup * ``ran`` (1.0: the latency fell as much as the MACs really
  executed; with output skipping and tunings, ``ran`` differs from the counted ratio), and
  ``r/i counted`` = speedup * ``MAC ratio`` (against the saving the pruner's count promises).

Also: batches (per-clip latency at ``--batch``, masks per sample: ``group`` = samples one by one
vs ``union`` = one conv over the union of kept entries) and cost growth with clip length
(``--clip-lengths``).

Usage::

    .venv/bin/python benchmarks/latency_benchmark.py                      # full run (~15 min)
    .venv/bin/python benchmarks/latency_benchmark.py --smoke              # CI smoke (seconds)
    .venv/bin/python benchmarks/latency_benchmark.py --models tiny_c3d --budgets 0.5

Writes ``benchmarks/results/latency.json`` (``--out``). On a shared machine the load average is
recorded with each model; compare figures of one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lightning_dance.aap import AdaptivePruner
from lightning_dance.bytes import TrafficComparison, TrafficMeasurement, measure_traffic
from lightning_dance.compiled import CompileError, compile_for_inference
from lightning_dance.energy import reported_models
from lightning_dance.execution import (
    CompactPruner,
    accelerate_dense,
    channel_chains,
    count_executed_macs,
    profitable_dims,
    profitable_layers,
    tune_layers,
)
from lightning_dance.macs import count_macs
from lightning_dance.models import create_model
from lightning_dance.timing import Timing, dense_fast, interleaved, loadavg

MODELS = {  # name -> (create_model kwargs, clip (C, T, H, W))
    "r2plus1d_18": ({"width": 0.5}, (3, 8, 112, 112)),
    "x3d_xs": ({}, (3, 4, 160, 160)),
    "tiny_c3d": ({}, (3, 16, 64, 64)),
}
CONFIGS = {
    "channel": ("channel",),
    "frame": ("frame",),
    "channel+frame": ("channel", "frame"),
    "all": ("frame", "channel", "feature"),
    "all@outputs": ("frame", "channel", "feature"),  # feature masks select outputs
}
#: configs whose feature masks act elsewhere than ``--feature-site`` says
CONFIG_SITES = {"all@outputs": "outputs"}
#: also time the dense model and every plain (materialized, statically pruned) variant compiled
#: (``--no-compile`` turns it off)
COMPILE = True


@dataclass
class Variant:
    name: str
    run: Callable[[], object]
    mac_ratio: float = 1.0  # counted executed / dense
    ran_ratio: float = 1.0  # really computed / dense
    traffic: dict | None = None  # measured traffic and energy savings (traffic_and_energy)
    layer_dims: dict | None = None  # the selected variants' {layer: dims}
    module: nn.Module | None = None  # a materialized (or statically pruned) plain model
    compact: CompactPruner | None = None  # a hybrid variant's compact path (for its bytes)


def traffic_and_energy(
    dense: TrafficMeasurement, fast: CompactPruner | nn.Module, clip: torch.Tensor
) -> dict:
    """Dense / compact bytes measured from the ops each runs (:mod:`lightning_dance.bytes`) and
    dense / compact energy estimated from them, with every byte at DRAM and per LLC-aware
    target (:mod:`lightning_dance.energy`). ``fast``: the compact path, or a plain model (a
    materialized one) run dense fast."""
    c = TrafficComparison(dense, measure_traffic(fast, clip))
    models = reported_models()
    return {
        "dense_bytes": c.dense.total, "compact_bytes": c.compact.total,
        "traffic_saving": round(c.saving, 3),
        "energy_saving": {k: round(c.energy_saving(m), 3) for k, m in models.items()},
    }  # fmt: skip


def measure(variants: list[Variant], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Round robin over the variants (drifts in machine load hit every variant alike)."""
    runs = {v.name: v.run for v in variants}
    return {
        k: list(t.samples_ms) for k, t in interleaved(runs, warmup=warmup, repeats=repeats).items()
    }


def p90(xs: list[float]) -> float:
    return Timing(tuple(xs)).p90_ms


def build(name: str, clip_shape: tuple[int, ...], batch: int = 1) -> tuple[nn.Module, torch.Tensor]:
    kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).eval()
    model = model.to(memory_format=torch.channels_last_3d)  # fastest layout (values unchanged)
    return model, torch.randn(batch, *clip_shape)


def calibrated_pruner(
    model: nn.Module,
    dims: tuple[str, ...],
    budget: float,
    clip: torch.Tensor,
    args,
    layers: list[str] | None = None,
    credit_outputs: bool = False,
    channel_multiple: int = 1,
    feature_site: str | None = None,
    layer_dims: dict[str, tuple[str, ...]] | None = None,
) -> AdaptivePruner:
    """An untrained controller, calibrated so that the mean MAC ratio meets ``budget``
    (``feature_site``: default ``args.feature_site``, else ``"inputs"``)."""
    torch.manual_seed(args.seed)
    site = feature_site or getattr(args, "feature_site", "inputs")
    pruner = AdaptivePruner(model, dims=dims, policy=args.policy, budget=budget, layers=layers,
                            credit_outputs=credit_outputs, channel_multiple=channel_multiple,
                            feature_site=site, layer_dims=layer_dims)  # fmt: skip
    pruner.eval()
    gen = torch.Generator().manual_seed(args.seed)
    calib = [torch.randn(clip.shape, generator=gen) for _ in range(args.calib_clips)]
    with torch.no_grad():
        pruner(calib[0])  # dense MAC counts (fvcore) are cached per shape: count the plain model
    with torch.no_grad(), accelerate_dense(model):  # the masked model, on the fast kernels
        pruner.calibrate(calib, iters=args.calib_iters, tol=0.005)
    return pruner


def dance_variants(
    name: str,
    pruner: AdaptivePruner,
    clip: torch.Tensor,
    tunings: dict | None,
    skip_outputs: bool = True,
    index_plan: bool = True,
) -> tuple[Variant, float]:
    """One compact variant; also checks it against the masked model (max relative error)."""
    fast = CompactPruner(pruner, tunings=tunings, skip_outputs=skip_outputs, index_plan=index_plan)
    with torch.no_grad():
        with accelerate_dense(pruner.model):
            ref = pruner(clip)
        stats = pruner.last_stats
        with count_executed_macs() as macs:
            out = fast(clip)
    err = float((out - ref).abs().max() / (ref.abs().max() + 1e-12))
    n = clip.shape[0]
    dense = stats.dense_total * n
    counted = float(stats.executed_macs().sum()) / dense
    ran = (macs.total + (stats.fixed_macs + stats.controller_macs) * n) / dense
    return Variant(name, lambda: fast(clip), counted, ran), err


def materialized_variant(name: str, pruner: AdaptivePruner,
                         clip: torch.Tensor) -> tuple[Variant, float]:  # fmt: skip
    """A copy of ``pruner`` frozen to the channels it keeps on ``clip`` (its static projection),
    made physical (:func:`lightning_dance.materialize.materialize`) and run dense fast; its MAC
    ratio is fvcore's count of the copy over the model's; also its error against the frozen
    pruner (max relative)."""
    import copy

    from lightning_dance.materialize import materialize
    from lightning_dance.priors import channel_frequencies, freeze_channels

    frozen = copy.deepcopy(pruner)
    freeze_channels(frozen, channel_frequencies(frozen, [clip]), standalone=True)
    small = materialize(frozen, clip)
    with torch.no_grad():
        ref, out = frozen(clip), small(clip)
    err = float((out - ref).abs().max() / (ref.abs().max() + 1e-12))
    ratio = count_macs(small, clip).total / count_macs(pruner.model, clip).total
    v = Variant(name, dense_fast(small, clip), ratio, ratio)
    v.module = small
    return v, err


def static_then_dynamic(
    label: str, model: nn.Module, budget: float, clip: torch.Tensor, args
) -> list[tuple[Variant, float]]:
    """``--hybrid F``: Torch-Pruning alone to ``budget`` (``lightning_dance.baselines.torch_prune``,
    run dense fast: the static alternative at the same MACs), and Torch-Pruning to
    ``budget / F`` followed by the policy on channels, calibrated with the credited count to
    ``F`` of what the static model runs (its compact path): static, then per clip. MAC ratios
    are of ``model`` (fvcore); the second item of each pair is the error against the masked
    model (0 for the static one)."""
    import copy

    from lightning_dance.baselines import torch_prune

    small = torch.zeros(1, *clip.shape[1:3], 32, 32)  # the search's clip (ratios barely move)
    dense = count_macs(model, clip).total
    static, _ = torch_prune(copy.deepcopy(model), small, budget)
    static = static.eval().to(memory_format=torch.channels_last_3d)
    ratio = count_macs(static, clip).total / dense
    alone = Variant(f"{label} Torch-Pruning", dense_fast(static, clip), ratio, ratio)
    alone.module = static
    base, _ = torch_prune(copy.deepcopy(model), small, min(1.0, budget / args.hybrid))
    base = base.eval().to(memory_format=torch.channels_last_3d)
    scale = count_macs(base, clip).total / dense
    pruner = calibrated_pruner(base, ("channel",), min(1.0, budget / scale), clip, args,
                               credit_outputs=True)  # fmt: skip
    hybrid, err = dance_variants(
        f"{label} Torch-Pruning to {scale:.2f}, then {args.policy}", pruner, clip, None
    )
    hybrid.mac_ratio, hybrid.ran_ratio = hybrid.mac_ratio * scale, hybrid.ran_ratio * scale
    hybrid.compact = CompactPruner(pruner)
    return [(alone, 0.0), (hybrid, err)]


def compiled_variants(base: Variant, clip: torch.Tensor) -> list[Variant]:
    """``base.module`` (a plain model) compiled for inference
    (:func:`~lightning_dance.compiled.compile_for_inference`), in the default and the
    ``channels_last_3d`` layout: the same MACs, run as one frozen graph. None with
    ``--no-compile``, for a variant without a plain model, or where compiling fails (said)."""
    if not COMPILE or base.module is None:
        return []
    out = []
    for layout in ("", " cl"):
        try:
            run = compile_for_inference(base.module, clip, channels_last=bool(layout))
        except CompileError as err:
            print(f"{base.name}: compiled form skipped: {err}", file=sys.stderr)
            break
        out.append(Variant(f"{base.name} compiled{layout}", lambda run=run: run(clip),
                           base.mac_ratio, base.ran_ratio, module=base.module))  # fmt: skip
    return out


def rows_of(variants: list[Variant], times: dict[str, list[float]], base: str) -> list[dict]:
    """One row per variant: ``speedup`` over ``base`` (eager dense on the fast kernels), and
    ``speedup_best`` over the fastest dense form timed (``dense compiled`` where it ran)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min(m for k, m in med.items() if k.startswith("dense"))
    rows = []
    for v in variants:
        speed = med[base] / med[v.name]
        rows.append({
            "variant": v.name, "mac_ratio": round(v.mac_ratio, 4),
            "ran_ratio": round(v.ran_ratio, 4), "median_ms": round(med[v.name], 2),
            "p90_ms": round(p90(times[v.name]), 2), "min_ms": round(min(times[v.name]), 2),
            "speedup": round(speed, 3), "speedup_best": round(best / med[v.name], 3),
            "realized_over_ideal": round(speed * v.ran_ratio, 3),
            "realized_over_ideal_counted": round(speed * v.mac_ratio, 3),
            **({"traffic": v.traffic} if v.traffic else {}),
            **({"layer_dims": v.layer_dims} if v.layer_dims else {}),
        })  # fmt: skip
    return rows


def bench_model(name: str, args) -> dict:
    _, clip_shape = MODELS[name]
    model, clip = build(name, clip_shape)
    configs = {c: CONFIGS[c] for c in args.configs}
    all_dims = tuple(
        d for d in ("frame", "channel", "feature") if any(d in v for v in configs.values())
    )
    t0 = time.perf_counter()
    layers = AdaptivePruner(model, dims=all_dims).layer_names
    sites = {CONFIG_SITES.get(c, args.feature_site) for c in configs}
    site_tunings = {
        site: tune_layers(model, clip, layers, all_dims, repeats=args.tune_repeats,
                          feature_site=site) for site in sorted(sites)
    } if args.tune else {}  # fmt: skip
    tune_s = time.perf_counter() - t0
    variants = [
        Variant("dense F.conv3d", lambda: model(clip)),
        Variant("dense fast", dense_fast(model, clip)),
    ]
    variants += compiled_variants(Variant("dense", lambda: None, module=model), clip)
    errors: dict[str, float] = {}
    selected: dict[str, int] = {}  # profitable layers per config/budget
    dense_bytes: TrafficMeasurement | None = None  # measured once, for the selected variants
    for cfg, dims in configs.items():
        site = CONFIG_SITES.get(cfg, args.feature_site)
        tunings = site_tunings.get(site)
        for budget in args.budgets:
            pruner = calibrated_pruner(model, dims, budget, clip, args, feature_site=site)
            label = f"{cfg} @{budget}"
            v, errors[label] = dance_variants(f"{label} compact", pruner, clip, None)
            variants.append(v)
            v, errors[label + " in"] = dance_variants(
                f"{label} inputs-only", pruner, clip, None, skip_outputs=False
            )
            variants.append(v)
            if dims == ("channel",) and args.policy == "topk":  # compact ran the index plan
                v, errors[label + " gen"] = dance_variants(
                    f"{label} general plan", pruner, clip, None, index_plan=False
                )
                variants.append(v)
            if "channel" in dims:
                credited = calibrated_pruner(model, dims, budget, clip, args, credit_outputs=True,
                                             feature_site=site)  # fmt: skip
                v, errors[label + " cr"] = dance_variants(f"{label} credited", credited, clip, None)
                variants.append(v)
            if dims == ("channel",) and args.policy == "topk":
                v, errors[label + " mat"] = materialized_variant(f"{label} materialized",
                                                                 credited, clip)  # fmt: skip
                variants += [v, *compiled_variants(v, clip)]
            if dims == ("channel",) and args.hybrid:
                if dense_bytes is None:
                    dense_bytes = measure_traffic(model, clip)
                for v, err in static_then_dynamic(label, model, budget, clip, args):
                    errors[v.name] = err
                    v.traffic = traffic_and_energy(dense_bytes, v.compact or v.module, clip)
                    variants += [v, *compiled_variants(v, clip)]
            if "channel" in dims and args.policy == "topk":
                rounded = calibrated_pruner(model, dims, budget, clip, args, channel_multiple=8)
                v, errors[label + " x8"] = dance_variants(
                    f"{label} multiple-8", rounded, clip, None
                )
                variants.append(v)
            if tunings is not None:
                v, errors[label + " tuned"] = dance_variants(
                    f"{label} tuned", pruner, clip, tunings
                )
                variants.append(v)
                # kernel-aware layer selection: prune only the layers where it pays
                chosen = profitable_layers(tunings, keep=pruner.keep_ratio())
                selected[label] = len(chosen)
                if chosen and len(chosen) < len(layers):
                    sub = calibrated_pruner(model, dims, budget, clip, args, layers=chosen,
                                            feature_site=site)  # fmt: skip
                    v, errors[label + " sel"] = dance_variants(
                        f"{label} selected", sub, clip, tunings
                    )
                    variants.append(v)
                # per layer, only the dims that pay there (threshold: counts follow the scores)
                if len(dims) > 1 and not pruner.policy.fixed_counts:
                    chains = channel_chains(model) if "channel" in dims else None
                    for suffix, max_dims in (("dims", None), ("best dim", 1)):
                        where = profitable_dims(tunings, keep=min(0.5, pruner.keep_ratio()),
                                                chains=chains, max_dims=max_dims)  # fmt: skip
                        where = {n: tuple(x for x in d if x in dims) for n, d in where.items()}
                        where = {n: d for n, d in where.items() if d}
                        selected[f"{label} {suffix}"] = sum(len(d) for d in where.values())
                        if not where:
                            continue
                        sub = calibrated_pruner(model, dims, budget, clip, args, layers=list(where),
                                                feature_site=site, layer_dims=where,
                                                credit_outputs="channel" in dims)  # fmt: skip
                        v, errors[f"{label} {suffix}"] = dance_variants(
                            f"{label} selected {suffix}", sub, clip, tunings
                        )
                        if dense_bytes is None:
                            dense_bytes = measure_traffic(model, clip)
                        v.traffic = traffic_and_energy(
                            dense_bytes, CompactPruner(sub, tunings=tunings), clip
                        )
                        v.layer_dims = where
                        variants.append(v)
                        chan = [n for n, d in where.items() if "channel" in d]
                        if max_dims == 1 and chan:  # the same cuts, static and physical
                            static = calibrated_pruner(model, ("channel",), budget, clip, args,
                                                       layers=chan, credit_outputs=True)  # fmt: skip
                            v, errors[f"{label} mat"] = materialized_variant(
                                f"{label} selected best dim, channels materialized", static, clip
                            )
                            v.traffic = traffic_and_energy(dense_bytes, v.module, clip)
                            v.layer_dims = {n: ("channel",) for n in chan}
                            variants += [v, *compiled_variants(v, clip)]
    load_before = loadavg()
    times = measure(variants, args.warmup, args.repeats)
    result = {
        "model": name, "clip": list(clip_shape), "threads": torch.get_num_threads(),
        "policy": args.policy, "feature_site": args.feature_site, "tune_seconds": round(tune_s, 1),
        "max_rel_error_vs_masked_model": max(errors.values(), default=0.0),
        "rows": rows_of(variants, times, "dense fast"),
        "instrumented_layers": len(layers), "profitable_layers": selected,
        "loadavg": f"{load_before} -> {loadavg()}",
    }  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    result["kernel_gain_dense"] = round(med["dense F.conv3d"] / med["dense fast"], 3)
    if name in args.batch_models and args.batch > 1:
        result["batch"] = bench_batch(name, args, site_tunings.get(args.feature_site))
    if name in args.growth_models and args.clip_lengths:
        result["clip_length"] = bench_growth(name, args)
    return result


def bench_batch(name: str, args, tunings: dict | None) -> list[dict]:
    """Per-clip latency at batch ``args.batch``: dense batch vs compact group / union."""
    _, clip_shape = MODELS[name]
    model, clip = build(name, clip_shape, args.batch)
    dims = CONFIGS[args.growth_config]
    pruner = calibrated_pruner(model, dims, args.growth_budget, clip[:1], args)
    variants = [Variant("dense fast", dense_fast(model, clip))]
    for mode in ("group", "union"):
        fast = CompactPruner(pruner, tunings=tunings, batch_mode=mode)
        with torch.no_grad(), count_executed_macs() as macs:
            fast(clip)
        with torch.no_grad(), accelerate_dense(model):
            pruner(clip)
        stats = pruner.last_stats
        dense = stats.dense_total * args.batch
        ran = (macs.total + (stats.fixed_macs + stats.controller_macs) * args.batch) / dense
        counted = float(stats.executed_macs().sum()) / dense
        variants.append(Variant(f"compact {mode}", lambda f=fast: f(clip), counted, ran))
    times = measure(variants, args.warmup, max(3, args.repeats // 2))
    rows = rows_of(variants, times, "dense fast")
    for r in rows:
        r["per_clip_ms"] = round(r["median_ms"] / args.batch, 2)
        r["batch"] = args.batch
    return rows


def bench_growth(name: str, args) -> list[dict]:
    """Dense-fast vs compact (and tuned) latency vs clip length T at one budget / config."""
    out = []
    _, (c, _, h, w) = MODELS[name]
    dims = CONFIGS[args.growth_config]
    for t in args.clip_lengths:
        model, clip = build(name, (c, t, h, w))
        pruner = calibrated_pruner(model, dims, args.growth_budget, clip, args)
        variants = [Variant("dense fast", dense_fast(model, clip))]
        v, _ = dance_variants("compact", pruner, clip, None)
        variants.append(v)
        if args.tune and not args.smoke:
            tunings = tune_layers(model, clip, pruner.layer_names, dims, repeats=args.tune_repeats)
            v, _ = dance_variants("tuned", pruner, clip, tunings)
            variants.append(v)
        times = measure(variants, args.warmup, max(3, args.repeats // 2))
        for row in rows_of(variants, times, "dense fast"):
            row.update({"T": t, "loadavg": loadavg()})
            out.append(row)
    return out


def print_tables(r: dict) -> None:
    print(f"\n## {r['model']}  clip {r['clip']}  threads {r['threads']}  policy {r['policy']}  "
          f"kernel gain of dense fast over F.conv3d: {r['kernel_gain_dense']:.2f}x  "
          f"max rel. error vs masked model {r['max_rel_error_vs_masked_model']:.1e}  "
          f"(load {r['loadavg']}, tuning {r['tune_seconds']} s)")  # fmt: skip
    head = (f"{'variant':30s} {'MAC ratio':>9s} {'ran':>6s} {'median ms':>10s} {'p90 ms':>8s} "
            f"{'speedup':>8s} {'vs best':>8s} {'real/ideal':>10s} {'r/i counted':>11s}")  # fmt: skip
    print(head)
    for row in r["rows"]:
        print(f"{row['variant']:30s} {row['mac_ratio']:9.3f} {row['ran_ratio']:6.3f} "
              f"{row['median_ms']:10.2f} {row['p90_ms']:8.2f} {row['speedup']:8.2f} "
              f"{row['speedup_best']:8.2f} "
              f"{row['realized_over_ideal']:10.2f} "
              f"{row['realized_over_ideal_counted']:11.2f}")  # fmt: skip
    for row in r["rows"]:
        if row.get("traffic"):
            t = row["traffic"]
            energy = ", ".join(f"{k} x{v:.2f}" for k, v in t["energy_saving"].items())
            print(f"  {row['variant']}: bytes {t['dense_bytes'] / 1e6:.1f} -> "
                  f"{t['compact_bytes'] / 1e6:.1f} MB, x{t['traffic_saving']:.2f}; "
                  f"energy dense/compact {energy}")  # fmt: skip
    sel = ", ".join(f"{k}: {v}" for k, v in r["profitable_layers"].items())
    print(f"profitable layers of {r['instrumented_layers']} instrumented ({sel}); "
          "'selected' prunes only those")  # fmt: skip
    if r.get("batch"):
        print(f"batch {r['batch'][0]['batch']} (per-clip ms; speedup over the dense batch):")
        for row in r["batch"]:
            print(f"  {row['variant']:16s} MAC {row['mac_ratio']:.3f} ran {row['ran_ratio']:.3f} "
                  f"per clip {row['per_clip_ms']:8.2f} ms  speedup {row['speedup']:.2f}")  # fmt: skip
    if r.get("clip_length"):
        print("clip length growth:")
        for row in r["clip_length"]:
            print(f"  T={row['T']:3d} {row['variant']:10s} MAC {row['mac_ratio']:.3f} "
                  f"ran {row['ran_ratio']:.3f} median {row['median_ms']:8.2f} ms  "
                  f"speedup {row['speedup']:.2f}  real/ideal {row['realized_over_ideal']:.2f}  "
                  f"(load {row['loadavg']})")  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--configs", nargs="+", default=["channel", "channel+frame"],
                   choices=list(CONFIGS))  # fmt: skip
    p.add_argument("--policy", default="topk", choices=["topk", "threshold"])
    p.add_argument(
        "--feature-site",
        default="inputs",
        choices=["inputs", "outputs"],
        help="where feature masks act (lightning_dance.feature_sites)",
    )
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-tune", dest="tune", action="store_false")
    p.add_argument("--tune-repeats", type=int, default=2)
    p.add_argument("--calib-clips", type=int, default=2)
    p.add_argument("--calib-iters", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batch-models", nargs="*", default=["tiny_c3d", "r2plus1d_18"])
    p.add_argument("--clip-lengths", nargs="*", type=int, default=[8, 16, 32])
    p.add_argument("--growth-budget", type=float, default=0.5)
    p.add_argument("--growth-config", default="channel+frame", choices=list(CONFIGS))
    p.add_argument("--growth-models", nargs="*", default=["r2plus1d_18"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hybrid",
        type=float,
        default=None,
        metavar="F",
        help="config 'channel': also Torch-Pruning alone at each budget, and Torch-Pruning to "
        "budget/F followed by the policy at F of the rest (static, then per clip)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the dense model and the plain variants compiled "
                   "(torch.compile with freezing; needs a C++ compiler)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny_c3d, one budget, 2 repeats")
    p.add_argument("--out", default="benchmarks/results/latency.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.budgets, args.configs = ["tiny_c3d"], [0.5], ["channel+frame"]
        args.repeats, args.warmup, args.clip_lengths = 2, 1, [8]
        args.growth_models, args.batch, args.batch_models = ["tiny_c3d"], 2, ["tiny_c3d"]
        args.calib_iters, args.calib_clips, args.tune_repeats = 6, 1, 1
    torch.set_num_threads(args.threads)
    global COMPILE
    COMPILE = args.compile
    results = []
    for name in args.models:
        results.append(bench_model(name, args))
        print_tables(results[-1])
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    meta["torch"] = torch.__version__
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
