"""``lightning-dance demo``: the main job, end to end on the built-in synthetic video data.

Stage 1 trains the dense baseline (:class:`~lightning_dance.classifier.VideoClassifier`) with
Lightning's Trainer and progress bar and reports its held-out accuracy. Later stages (AVA
fine-tuning, the DANCE controller, MAC accounting, the fast path) are added as they land.

Example:
    $ lightning-dance demo                 # a few minutes on 2 CPU cores
    $ lightning-dance demo --quick         # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule

__all__ = ["main", "parse_args", "run_demo"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lightning-dance demo",
        description="Train a video model on synthetic clips, then make it cheaper with DANCE.",
    )
    p.add_argument("--model", default="tiny_c3d", help="factory model name (default: tiny_c3d)")
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=2048)
    p.add_argument("--val-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4, help="epochs of dense training")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="logs and results folder")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, one epoch: a smoke run in seconds"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.size = 8, 32
        args.train_size, args.val_size, args.epochs = 64, 32, 1
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
    model = VideoClassifier(
        args.model, num_classes=args.num_classes, lr=args.lr, model_kwargs={"width": args.width}
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        default_root_dir=str(args.out),
        logger=CSVLogger(str(args.out), name="dense"),
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - start
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    results = {
        "dense/test_acc": float(metrics["test/acc"]),
        "dense/test_acc_top5": float(metrics["test/acc_top5"]),
        "dense/train_seconds": train_s,
        "chance": 1.0 / args.num_classes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    _print_summary(results)
    return results


def _print_summary(results: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lightning-dance demo")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> None:
    run_demo(parse_args(argv))
