"""``lightning-dance demo``: DANCE end to end on a short run, with its figures and files.

On the built-in synthetic video data (no download):

1. **dense**: train the baseline :class:`~lightning_dance.classifier.VideoClassifier` and test it;
2. **AVA**, only with ``--ava-epochs N``: fine-tune a copy with
   :class:`~lightning_dance.ava_callback.AVACallback`, the user's module unchanged. Off by
   default: on the decisive benchmark (three seeds, ``docs/benchmarks.md``) DANCE from the
   dense start was more accurate than from the AVA start with the same epochs;
3. **DANCE**: wrap the dense (or AVA) model in :class:`~lightning_dance.wrapper.DANCEWrapper` and fine-tune
   backbone and controller jointly toward ``--budget`` (default 0.6) with gradual pruning
   (``budget_warmup=0.3``), a cosine learning rate and the keep decisions calibrated on every
   10th training batch (``calibrate_every``: without it the short run's training ratio settles
   above the budget and top-1 drops by about 20 pp), then calibrate on validation clips
   (``--frozen``: train the controller only, the user's weights untouched; it holds accuracy
   at budget 0.7 in this short run);
4. **evaluate**: top-1 and executed/dense MACs on the test clips, a per-layer
   :class:`~lightning_dance.report.MacReport` (the bytes the dense and compact paths move,
   measured from the ops they run, and the energy estimate from them), and the same
   controller recalibrated to ``--curve-budgets`` (the accuracy / MACs curve);
5. **speed**: batch-1 latency of the compact path (:class:`~lightning_dance.execution.CompactPruner`:
   only the kept work runs) against the dense model in its fastest form
   (:func:`~lightning_dance.timing.dense_fast`), interleaved (:func:`~lightning_dance.timing.interleaved`);
6. **files**: the DANCE checkpoint (reloaded and checked), an ONNX export with its onnxruntime
   parity, the pictures (:mod:`lightning_dance.plots`), ``results.json`` and ``summary.md``.

The output folder (``--out``, default ``runs/demo``)::

    results.json      every figure (accuracies, MAC ratios, latencies, traffic, energy, machine)
    summary.md        the summary table, the pictures and what the run is and is not
    mac_report.json   the per-layer MAC report
    dance.ckpt        DANCEWrapper checkpoint: DANCEWrapper.load_from_checkpoint(path, model=...)
    onnx/dance/       jetson/model.onnx (the DANCE model, threshold gates), manifest.json
    onnx/dense/       the dense model as ONNX (the onnxruntime baseline)
    accuracy_vs_macs.png, kept_fractions.png, clips.png, latency.png
    dense/ ava/ dance/   Lightning CSV logs of each stage

Example:
    $ lightning-dance demo                 # budget 0.6, joint recipe; about 4-5 minutes
    $ lightning-dance demo --quick         # a smoke run in seconds (meaningless accuracies)
    $ lightning-dance demo --budget 0.4 --dance-epochs 20   # a lower budget, longer

From Python, :func:`run_demo` returns the figures:

    >>> args = parse_args(["--quick", "--budget", "0.6"])
    >>> args.joint, args.budget, args.calibrate_every, args.train_size
    (True, 0.6, 10, 64)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_dance.ava_callback import DEFAULT_WEIGHT, AVACallback
from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.recipes import calibrate, evaluate_dance, fit, track, train_controller
from lightning_dance.report import MacReport
from lightning_dance.wrapper import DANCEWrapper

__all__ = ["main", "parse_args", "reload_checkpoint", "run_demo"]

#: the pictures the demo writes into its output folder
PICTURES = ("accuracy_vs_macs.png", "kept_fractions.png", "clips.png", "latency.png")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lightning-dance demo",
        description="Train a video model on synthetic clips, make it cheaper with DANCE, measure "
        "it and write a checkpoint, an ONNX export, pictures and a summary.",
    )
    p.add_argument("--model", default="tiny_c3d", help="factory model name (default: tiny_c3d)")
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--val-size", type=int, default=384, help="validation and test clips each")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5, help="epochs of dense training")
    p.add_argument(
        "--ava-epochs",
        type=int,
        default=0,
        help="epochs of AVA fine-tuning before DANCE (default 0: off; it did not help on the "
        "benchmark, docs/benchmarks.md)",
    )
    p.add_argument(
        "--ava-weight", type=float, default=DEFAULT_WEIGHT, help="AVA loss weight (lambda)"
    )
    p.add_argument("--dance-epochs", type=int, default=6, help="epochs of DANCE fine-tuning")
    p.add_argument(
        "--budget",
        type=float,
        default=0.6,
        help="target executed/dense MAC ratio (default 0.6: measured to hold accuracy with the "
        "default recipe in this short run)",
    )
    p.add_argument(
        "--joint",
        dest="joint",
        action="store_true",
        default=True,
        help="fine-tune the backbone with the controller: gradual pruning, cosine schedule, "
        "keep decisions calibrated on training batches (the default)",
    )
    p.add_argument(
        "--frozen",
        dest="joint",
        action="store_false",
        help="train the controller only, backbone frozen (the user's weights stay untouched; "
        "holds accuracy at budget 0.7 in this short run, not at 0.6)",
    )
    p.add_argument(
        "--calibrate-every",
        type=int,
        default=10,
        help="with --joint: calibrate the keep decisions on every Nth training batch (0: never; "
        "without it the 5-epoch joint run lost about 20 pp at budget 0.6)",
    )
    p.add_argument("--backbone-lr", type=float, default=2e-3, help="backbone lr (joint)")
    p.add_argument(
        "--budget-warmup",
        type=float,
        default=0.3,
        help="fraction of the DANCE steps over which the budget falls from 1 to --budget",
    )
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument(
        "--curve-budgets",
        type=float,
        nargs="*",
        default=[0.4, 0.8],
        help="budgets the trained controller is recalibrated to for the accuracy/MACs curve",
    )
    p.add_argument("--latency-clips", type=int, default=4, help="test clips timed at batch 1")
    p.add_argument("--latency-repeats", type=int, default=15, help="timed rounds")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, one epoch per stage: a smoke run"
    )
    args = p.parse_args(argv)
    if not 0.0 < args.budget <= 1.0:
        p.error(f"--budget must be in (0, 1], got {args.budget}")
    bad = [b for b in args.curve_budgets if not 0.0 < b <= 1.0]
    if bad:
        p.error(f"--curve-budgets must be in (0, 1], got {bad}")
    if not 0.0 <= args.budget_warmup < 1.0:
        p.error(f"--budget-warmup must be in [0, 1), got {args.budget_warmup}")
    if args.calibrate_every < 0:
        p.error(f"--calibrate-every must be >= 0, got {args.calibrate_every}")
    if args.ava_epochs < 0:
        p.error(f"--ava-epochs must be >= 0, got {args.ava_epochs}")
    if args.latency_clips < 1 or args.latency_repeats < 1:
        p.error("--latency-clips and --latency-repeats must be >= 1")
    if args.quick:
        args.frames, args.size = 8, 32
        args.train_size, args.val_size = 64, 32
        args.epochs = args.dance_epochs = 1
        args.ava_epochs = min(args.ava_epochs, 1)
        args.curve_budgets = []
        args.latency_clips, args.latency_repeats = 2, 3
    return args


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo stages; returns the figures (also written to ``out/results.json``)."""
    from lightning_dance.timing import machine

    L.seed_everything(args.seed, workers=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dm = SyntheticVideoDataModule(
        num_classes=args.num_classes,
        frames=args.frames,
        size=args.size,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.val_size,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results: dict[str, Any] = {"chance": 1.0 / args.num_classes, "budget": args.budget}
    results["recipe"] = _recipe(args)
    timer = time.perf_counter()

    _banner("1/6 dense baseline")
    dense = VideoClassifier(
        args.model, num_classes=args.num_classes, lr=args.lr, model_kwargs={"width": args.width}
    )
    # Lightning's model summary then shows the layer shapes and the dense FLOPs (2 x MACs)
    dense.example_input_array = torch.zeros(1, 3, args.frames, args.size, args.size)
    trainer = fit(dense, dm, epochs=args.epochs, out=out, name="dense", progress=True)
    results["dense/test_acc"] = _test_acc(trainer, dense, dm)

    start, results["ava/test_acc"] = dense, None
    if args.ava_epochs:
        _banner("2/6 AVA fine-tuning (the user's module, unmodified, plus AVACallback)")
        start = copy.deepcopy(dense)
        start.hparams.lr = args.lr * 0.3
        trainer = fit(start, dm, epochs=args.ava_epochs, out=out, name="ava", progress=True,
                      callbacks=[AVACallback(weight=args.ava_weight)])  # fmt: skip
        results["ava/test_acc"] = _test_acc(trainer, start, dm)
    else:
        _banner("2/6 AVA skipped (--ava-epochs 0: DANCE starts from the dense model)")

    how = "backbone fine-tuned jointly" if args.joint else "backbone frozen"
    _banner(f"3/6 DANCE (budget {args.budget}, {how})")
    wrapper = train_controller(copy.deepcopy(start), dm, out=out, name="dance", progress=True,
                               epochs=args.dance_epochs, **_wrapper_kwargs(args))  # fmt: skip

    _banner("4/6 evaluation over the test clips")
    report = MacReport.for_pruner(wrapper.pruner, (3, args.frames, args.size, args.size))
    figures = evaluate_dance(wrapper, dm, "test", report=report, progress="DANCE test clips")
    results.update({f"dance/{k}" if k != "acc" else "dance/test_acc": v
                    for k, v in figures.items()})  # fmt: skip
    clips, labels = _first_clips(dm, max(4, args.latency_clips))
    with _spinner("measuring the bytes the dense and compact paths move"):
        report.measure(wrapper.pruner, clips[: args.latency_clips])
    summary = report.to_dict()
    measured = summary["measured"]
    results["dance/traffic_saving"] = measured["traffic_saving"]
    results["dance/energy_saving"] = measured["energy_saving"]
    report.to_json(out / "mac_report.json")
    print(report.render())
    n_test = len(dm.test_dataloader().dataset)
    results["test_clips"] = n_test
    results["curve"] = _budget_curve(wrapper, dm, args.curve_budgets)

    _banner("5/6 batch-1 latency: compact DANCE vs the dense model in its fastest form")
    results["onnx"] = _export_onnx(wrapper, clips[:1], out / "onnx" / "dance")
    results["onnx_dense"] = _export_onnx(dense, clips[:1], out / "onnx" / "dense")
    onnx = {k: Path(results[key]["file"]) for k, key in (("DANCE", "onnx"), ("dense", "onnx_dense"))
            if results[key]["ok"]}  # fmt: skip
    speed = _measure_speed(dense, wrapper, clips[: args.latency_clips], args.latency_repeats,
                           onnx=onnx)  # fmt: skip
    results["latency"] = speed

    _banner("6/6 checkpoint, pictures, summary")
    results["checkpoint"] = _save_checkpoint(wrapper, out / "dance.ckpt", clips,
                                             _model_factory(args))  # fmt: skip
    _pictures(out, results, summary, wrapper, clips, labels)
    results["machine"] = machine()
    results["demo_seconds"] = time.perf_counter() - timer
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = _summary_rows(results)
    (out / "summary.md").write_text(_summary_markdown(rows, results, args))
    _print_summary(rows, args.budget)
    return results


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "width": args.width, "clip": [3, args.frames, args.size, args.size],
        "train_clips": args.train_size, "dense_epochs": args.epochs,
        "ava_epochs": args.ava_epochs, "dance_epochs": args.dance_epochs, "quick": args.quick,
        **_wrapper_kwargs(args),
    }  # fmt: skip


def _wrapper_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"budget": args.budget, "freeze_backbone": not args.joint}
    if args.joint:
        kwargs |= {"backbone_lr": args.backbone_lr, "budget_warmup": args.budget_warmup,
                   "lr_schedule": args.lr_schedule,
                   "calibrate_every": args.calibrate_every}  # fmt: skip
    return kwargs


def _model_factory(args: argparse.Namespace) -> Callable[[], VideoClassifier]:
    """A fresh (untrained) instance of the wrapped module: what a reload needs."""
    return lambda: VideoClassifier(
        args.model, num_classes=args.num_classes, model_kwargs={"width": args.width}
    )


def _test_acc(trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule) -> float:
    return float(trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def _stderr(acc: float, n: int) -> float:
    """Binomial standard error of a top-1 figure over ``n`` clips."""
    return math.sqrt(max(acc * (1.0 - acc), 0.0) / max(n, 1))


def _budget_curve(
    wrapper: DANCEWrapper, dm: L.LightningDataModule, budgets: Iterable[float]
) -> list[dict[str, float]]:
    """The trained controller recalibrated to each budget (then restored): test top-1 and MACs."""
    pruner = wrapper.pruner
    budget, offset = float(pruner.budget), float(pruner.calibration)
    points = []
    try:
        for b in track(sorted(set(budgets)), "recalibrated budgets"):
            pruner.set_budget(b)
            calibrate(wrapper, dm, tol=0.01)
            figures = evaluate_dance(wrapper, dm, "test")
            points.append({"budget": b, **figures})
    finally:
        pruner.set_budget(budget)
        pruner.calibration.fill_(offset)
    return points


def _first_clips(dm: L.LightningDataModule, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    clips, labels = [], []
    for clip, label in dm.test_dataloader():
        clips.append(clip)
        labels.append(label)
        if sum(c.shape[0] for c in clips) >= k:
            break
    return torch.cat(clips)[:k], torch.cat(labels)[:k]


def _export_onnx(model: torch.nn.Module, clip: torch.Tensor, folder: Path) -> dict[str, Any]:
    """``model`` as ONNX (a DANCE wrapper: its gates and gathers; otherwise dense), its
    onnxruntime parity checked by :func:`~lightning_dance.export.export_model`."""
    from lightning_dance.export import export_model

    mode = "dense"
    if isinstance(model, DANCEWrapper):
        mode = "topk" if model.pruner.policy.name == "topk" else "threshold"
    try:
        with _spinner(f"ONNX export ({mode}) and onnxruntime parity"):
            result = export_model(model, clip, targets=("jetson",), formats=("onnx",),
                                  mode=mode, out_dir=folder, overwrite=True)  # fmt: skip
    except ImportError as exc:  # the export extra is not installed: the rest of the demo runs
        return {"ok": False, "reason": f"{exc} (pip install 'lightning-dance[export]')"}
    art = result.manifest["artifacts"][0]
    return {
        "ok": art["status"] == "ok",
        "file": str(folder / art["file"]) if art.get("file") else None,
        "mode": mode,
        "parity_max_abs_error": art.get("parity_max_abs_error"),
        "reason": art.get("reason"),
    }


def _onnx_session(path: Path) -> Callable[[torch.Tensor], Any]:
    from lightning_dance.export.onnx import quiet_session

    sess = quiet_session(path)  # no spinning pool to slow whatever is timed next
    name = sess.get_inputs()[0].name
    return lambda clip: sess.run(None, {name: clip.numpy()})[0]


def _measure_speed(
    dense: L.LightningModule,
    wrapper: DANCEWrapper,
    clips: torch.Tensor,
    repeats: int,
    onnx: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Batch-1 latency per clip (medians over rounds; every round runs every clip once)."""
    from lightning_dance.execution import CompactPruner, accelerate_dense
    from lightning_dance.timing import Timing, dense_fast, interleaved, loadavg

    net = dense.eval()
    pruner = wrapper.eval().pruner
    compact = CompactPruner(pruner)
    singles = [c[None] for c in clips]
    with torch.no_grad():  # the compact path computes what the masked model does
        with accelerate_dense(pruner.model):
            masked = [pruner(c) for c in singles]
        error = max(
            float((compact(c) - m).abs().max()) for c, m in zip(singles, masked, strict=True)
        )
    fast = [dense_fast(net, c) for c in singles]
    runs: dict[str, Callable[[], Any]] = {
        "dense (F.conv3d)": lambda: [net(c) for c in singles],
        "dense fast": lambda: [f() for f in fast],
        "DANCE compact": lambda: [compact(c) for c in singles],
    }
    for name, path in (onnx or {}).items():  # the exported models, in onnxruntime
        run_onnx = _onnx_session(path)
        runs[f"{name} ONNX (onnxruntime)"] = lambda run=run_onnx: [run(c) for c in singles]
    load_before = loadavg()
    interleaved(runs, warmup=2, repeats=1)  # warm-up (not kept)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in track(range(repeats), "timed rounds"):
        for name, t in interleaved(runs, warmup=0, repeats=1).items():
            samples[name].append(t.samples_ms[0] / len(singles))
    times = {k: Timing(tuple(v)) for k, v in samples.items()}
    base = times["dense fast"]
    return {
        "clips": len(singles),
        "rounds": repeats,
        "compact_max_abs_error_vs_masked": error,
        "loadavg": f"{load_before} -> {loadavg()}",
        "variants": {
            k: {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "speedup": t.speedup_over(base)}
            for k, t in times.items()
        },
        "speedup": times["DANCE compact"].speedup_over(base),
    }


def reload_checkpoint(path: str | Path, model: torch.nn.Module) -> DANCEWrapper:
    """Load the demo's ``dance.ckpt``: ``model`` is a fresh instance of the wrapped module (its
    weights, the controller and its calibration come from the file).

    The same as ``DANCEWrapper.load_from_checkpoint(path, model=model)`` followed by ``eval()``.
    """
    return DANCEWrapper.load_from_checkpoint(
        path, model=model, map_location="cpu", weights_only=True
    ).eval()


def _save_checkpoint(
    wrapper: DANCEWrapper,
    path: Path,
    clips: torch.Tensor,
    factory: Callable[[], torch.nn.Module],
) -> dict[str, Any]:
    """Write the wrapper's Lightning checkpoint and check that a reload gives the same logits."""
    with _spinner("checkpoint: save, reload, compare logits"):
        wrapper.trainer.save_checkpoint(path)
        reloaded = reload_checkpoint(path, factory())
        with torch.no_grad():
            error = float((reloaded(clips) - wrapper.eval()(clips)).abs().max())
    if error > 1e-5:
        raise RuntimeError(
            f"the reloaded checkpoint {path} gives other logits than the trained model "
            f"(max abs difference {error:.3g}): the checkpoint does not round-trip"
        )
    return {"file": path.name, "reload_max_abs_error": error, "bytes": path.stat().st_size}


def _pictures(
    out: Path,
    results: dict[str, Any],
    summary: dict[str, Any],
    wrapper: DANCEWrapper,
    clips: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    from lightning_dance import plots

    n = results["test_clips"]
    dense_acc, ava_acc = results["dense/test_acc"], results["ava/test_acc"]
    dance = [(p["mac_ratio"], p["acc"], _stderr(p["acc"], n)) for p in results["curve"]]
    main = (results["dance/mac_ratio"], results["dance/test_acc"],
            _stderr(results["dance/test_acc"], n))  # fmt: skip
    series = {
        "dense": [(1.0, dense_acc, _stderr(dense_acc, n))],
        "AVA (dense)": [(1.0, ava_acc, _stderr(ava_acc, n))] if ava_acc is not None else [],
        "DANCE (recalibrated budgets)": dance and [*dance, main],
        f"DANCE (trained budget {results['budget']})": [main],
    }
    series = {name: points for name, points in series.items() if points}
    with _spinner("pictures"):
        plots.accuracy_vs_cost(
            series,
            "executed / dense MACs per clip (controller included)",
            out / PICTURES[0],
            title=f"top-1 on {n} test clips (bars: binomial standard error)",
            chance=results["chance"],
        )
        kept = {layer["name"]: layer["kept"] for layer in summary["layers"]}
        plots.kept_heatmap(kept, out / PICTURES[1])
        _overlay(wrapper, clips, labels, out / PICTURES[2])
        variants = results["latency"]["variants"]
        plots.latency_bars(
            {k: (v["median_ms"], v["p90_ms"]) for k, v in variants.items()},
            out / PICTURES[3],
            baseline="dense fast",
            title="batch-1 latency per clip (median, whisker: p90)",
            note=f"{torch.get_num_threads()} threads, load average {results['latency']['loadavg']}",
        )


def _overlay(wrapper: DANCEWrapper, clips: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    from lightning_dance import plots

    with torch.no_grad():
        pred = wrapper.eval()(clips).argmax(-1)
    stats = wrapper.last_stats
    layer = next(iter(stats.layers))  # the first pruned conv: it reads the stem's output
    masks = stats.layers[layer].masks
    _, t, h, w = stats.layers[layer].input_shape
    ratio = stats.mac_ratio()
    titles = [f"label {int(y)}, pred {int(p)}\nMACs x{float(r):.2f}"
              for y, p, r in zip(labels, pred, ratio, strict=True)]  # fmt: skip
    plots.clip_overlays(
        clips,
        path,
        frame_masks=masks.get("frame"),
        feature_masks=masks.get("feature"),
        titles=titles,
        caption=f"masks of layer {layer}'s input ({t} frames, {h}x{w}), mapped to the clip's "
        "frames and pixels by nearest-neighbour scaling; dimmed with a red border: frame "
        "skipped; red tint: spatial block skipped. Other layers decide for themselves.",
    )


def _summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    n = r["test_clips"]
    lat = r["latency"]["variants"]

    def acc(key: str) -> str:
        return f"{100 * r[key]:.1f}% ± {100 * _stderr(r[key], n):.1f}"

    rows = [
        ("top-1 dense", acc("dense/test_acc")),
        *([("top-1 AVA (dense)", acc("ava/test_acc"))] if r["ava/test_acc"] is not None else []),
        (f"top-1 DANCE (budget {r['budget']})", acc("dance/test_acc")),
        ("DANCE - dense", f"{100 * (r['dance/test_acc'] - r['dense/test_acc']):+.1f} pp"),
        (
            "executed / dense MACs",
            f"{r['dance/mac_ratio']:.3f} (p5 {r['dance/mac_ratio_p5']:.2f}, "
            f"p95 {r['dance/mac_ratio_p95']:.2f})",
        ),
        ("latency dense fast (batch 1)", f"{lat['dense fast']['median_ms']:.2f} ms"),
        ("latency DANCE compact (batch 1)", f"{lat['DANCE compact']['median_ms']:.2f} ms"),
        ("measured speedup (compact vs dense fast)", f"{r['latency']['speedup']:.2f}x"),
        ("memory traffic (measured, all ops)", f"x{1 / r['dance/traffic_saving']:.2f} of dense"),
        *(
            (f"energy estimate ({label})", f"x{1 / r['dance/energy_saving'][key]:.2f} of dense")
            for key, label in (
                ("dram", "every byte at DRAM"),
                ("jetson_nano", "Jetson Nano"),
                ("snapdragon_8_gen_1", "Snapdragon 8 Gen 1"),
            )
        ),  # fmt: skip
    ]
    onnx = r["onnx"]
    rows.append(
        ("ONNX parity (max abs error)", f"{onnx['parity_max_abs_error']:.1e}")
        if onnx["ok"]
        else ("ONNX export", f"skipped: {onnx['reason']}")
    )
    rows.append(
        ("checkpoint reload (max abs error)", f"{r['checkpoint']['reload_max_abs_error']:.1e}")
    )
    rows.append(("load average (1, 5, 15 min)", r["machine"]["loadavg"]))
    rows.append(("wall time", f"{r['demo_seconds']:.0f} s"))
    return rows


def _summary_markdown(
    rows: list[tuple[str, str]], r: dict[str, Any], args: argparse.Namespace
) -> str:
    m = r["machine"]
    lines = [
        f"# lightning-dance demo (budget {args.budget})",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        f"Recipe: `{json.dumps(r['recipe'])}`.",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, AVX2 {m['avx2']}, AVX-512 "
        f"{m['avx512']}, torch {m['torch']}; load during timing {r['latency']['loadavg']}.",
        "",
        "What this run is: one seed, synthetic motion clips, a small model trained for a few "
        "minutes; top-1 has a standard error of about "
        f"{100 * _stderr(r['dense/test_acc'], r['test_clips']):.1f} pp on "
        f"{r['test_clips']} test clips. The latencies are measured here, at batch 1, "
        "interleaved, against the dense model on the same fast kernels. Memory traffic is "
        "measured from the ops that run (not a cache simulation); energy is an estimate from it. What it is not: a benchmark on real "
        "video, or a claim about other models and machines (`docs/aap.md`, "
        "`docs/execution.md`).",
        "",
        *(f"![{p}]({p})" for p in PICTURES),
        "",
    ]
    return "\n".join(lines)


def _print_summary(rows: list[tuple[str, str]], budget: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lightning-dance demo (budget {budget})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _banner(text: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]lightning-dance demo: {text}")


def _spinner(description: str) -> Any:
    from rich.console import Console

    return Console().status(description)


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    run_demo(parse_args(argv))
