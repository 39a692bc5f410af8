"""``lightning-dance demo``: the main job, end to end on the built-in synthetic video data.

1. **dense**: train the baseline :class:`~lightning_dance.classifier.VideoClassifier` (Lightning's
   Trainer and progress bar) and test it;
2. **AVA**: fine-tune a copy with :class:`~lightning_dance.ava_callback.AVACallback`, the user's
   module unchanged;
3. **DANCE**: wrap the AVA model in :class:`~lightning_dance.wrapper.DANCEWrapper`, train the
   controller toward ``--budget`` (backbone frozen), calibrate it on validation clips and test it;
4. **accounting**: a per-layer :class:`~lightning_dance.report.MacReport` over the test clips
   (executed MACs mean/p5/p95, memory traffic, estimated energy), printed and saved.

Figures go to ``--out/results.json`` (the report to ``--out/mac_report.json``), CSV logs to
``--out/<stage>/``. The defaults take a few minutes on 2 CPU cores.

Example:
    $ lightning-dance demo                 # a few minutes on 2 CPU cores
    $ lightning-dance demo --quick         # a smoke run in seconds
    $ lightning-dance demo --budget 0.3 --model r2plus1d_18 --width 0.25
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lightning_dance.ava_callback import DEFAULT_WEIGHT, AVACallback
from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.recipes import evaluate_dance, fit, train_controller
from lightning_dance.report import MacReport

__all__ = ["main", "parse_args", "run_demo"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lightning-dance demo",
        description="Train a video model on synthetic clips, then make it cheaper with DANCE.",
    )
    p.add_argument("--model", default="tiny_c3d", help="factory model name (default: tiny_c3d)")
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1536)
    p.add_argument("--val-size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8, help="epochs of dense training")
    p.add_argument("--ava-epochs", type=int, default=2, help="epochs of AVA fine-tuning")
    p.add_argument(
        "--ava-weight", type=float, default=DEFAULT_WEIGHT, help="AVA loss weight (lambda)"
    )
    p.add_argument("--dance-epochs", type=int, default=3, help="epochs of controller training")
    p.add_argument("--budget", type=float, default=0.5, help="target executed/dense MAC ratio")
    p.add_argument(
        "--joint",
        action="store_true",
        help="fine-tune the backbone with the controller (slower; more accurate at low budgets: "
        "give it more --dance-epochs, e.g. 20)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="logs and results folder")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, one epoch per stage: a smoke run"
    )
    args = p.parse_args(argv)
    if not 0.0 < args.budget <= 1.0:
        p.error(f"--budget must be in (0, 1], got {args.budget}")
    if args.quick:
        args.frames, args.size = 8, 32
        args.train_size, args.val_size = 64, 32
        args.epochs = args.ava_epochs = args.dance_epochs = 1
    return args


def run_demo(args: argparse.Namespace) -> dict[str, float]:
    """Run the demo stages and return their figures (also written to ``out/results.json``)."""
    L.seed_everything(args.seed, workers=True)
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
    results: dict[str, float] = {"chance": 1.0 / args.num_classes}
    timer = time.perf_counter()

    _banner("1/4 dense baseline")
    dense = VideoClassifier(
        args.model, num_classes=args.num_classes, lr=args.lr, model_kwargs={"width": args.width}
    )
    # Lightning's model summary then shows the layer shapes and the dense FLOPs (2 x MACs)
    dense.example_input_array = torch.zeros(1, 3, args.frames, args.size, args.size)
    trainer = fit(dense, dm, epochs=args.epochs, out=args.out, name="dense", progress=True)
    results["dense/test_acc"] = _test_acc(trainer, dense, dm)

    _banner("2/4 AVA fine-tuning (the user's module, unmodified, plus AVACallback)")
    ava = copy.deepcopy(dense)
    ava.hparams.lr = args.lr * 0.3
    trainer = fit(ava, dm, epochs=args.ava_epochs, out=args.out, name="ava", progress=True,
                  callbacks=[AVACallback(weight=args.ava_weight)])  # fmt: skip
    results["ava/test_acc"] = _test_acc(trainer, ava, dm)

    backbone = "fine-tuned jointly" if args.joint else "backbone frozen"
    _banner(f"3/4 DANCE controller (budget {args.budget}, {backbone})")
    wrapper = train_controller(ava, dm, budget=args.budget, epochs=args.dance_epochs,
                               out=args.out, name="dance", progress=True,
                               freeze_backbone=not args.joint)  # fmt: skip
    _banner("4/4 accounting over the test clips")
    report = MacReport.for_pruner(wrapper.pruner, (3, args.frames, args.size, args.size))
    figures = evaluate_dance(wrapper, dm, "test", report=report)
    results.update({f"dance/{k}" if k != "acc" else "dance/test_acc": v
                    for k, v in figures.items()})  # fmt: skip
    summary = report.to_dict()
    results["dance/energy_saving_estimate"] = summary["energy_saving"]
    results["dance/traffic_saving"] = summary["traffic_saving"]
    results["demo_seconds"] = time.perf_counter() - timer

    args.out.mkdir(parents=True, exist_ok=True)
    report.to_json(args.out / "mac_report.json")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(report.render())
    _print_summary(results, args.budget)
    return results


def _test_acc(trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule) -> float:
    return float(trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def _banner(text: str) -> None:
    from rich.console import Console

    Console().rule(f"[bold]lightning-dance demo: {text}")


def _print_summary(results: dict[str, float], budget: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lightning-dance demo (budget {budget})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    run_demo(parse_args(argv))
