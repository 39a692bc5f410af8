"""How well do the factory models learn the synthetic motion clips? Dense baselines, side by side.

Trains each ``--models`` entry (``VideoClassifier`` around ``create_model(name, width=...)``)
from random init on the same :class:`~lightning_dance.data.SyntheticVideoDataModule` split with
the same recipe (AdamW, cosine, ``--epochs``), and reports test top-1 / top-5, dense MACs per
clip (fvcore, :func:`~lightning_dance.macs.count_macs`) and training time. Prints a markdown
table and writes JSON (default ``benchmarks/results/baseline.json``, git-ignored).

    .venv/bin/python benchmarks/baseline_benchmark.py                      # tiny_c3d + r3d_18 x0.25
    .venv/bin/python benchmarks/baseline_benchmark.py --models tiny_c3d:1 r2plus1d_18:0.25
    .venv/bin/python benchmarks/baseline_benchmark.py --quick              # smoke run

Limits: synthetic data only, random init (no pretrained weights can be downloaded here), one
seed; training times are for comparison within one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.macs import count_macs
from lightning_dance.recipes import fit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["tiny_c3d:1", "r3d_18:0.25"],
        help="factory names with an optional ':width' (default width 1)",
    )  # fmt: skip
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1536)
    p.add_argument("--test-size", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/baseline.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.size = 64, 32, 1, 16
    return args


def _parse_model(spec: str) -> tuple[str, float]:
    name, _, width = spec.partition(":")
    return name, float(width) if width else 1.0


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models:
        name, width = _parse_model(spec)
        L.seed_everything(args.seed, workers=True)
        dm = SyntheticVideoDataModule(
            num_classes=args.num_classes, frames=args.frames, size=args.size,
            train_size=args.train_size, val_size=args.test_size, test_size=args.test_size,
            batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
        module = VideoClassifier(
            name, num_classes=args.num_classes, lr=args.lr, model_kwargs={"width": width}
        )
        clip = torch.zeros(1, 3, args.frames, args.size, args.size)
        macs = count_macs(module.model, clip).total  # eval for the count, mode restored
        start = time.perf_counter()
        trainer = fit(module, dm, epochs=args.epochs, validate=False)
        seconds = time.perf_counter() - start
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        row = {
            "model": name,
            "width": width,
            "params": sum(p.numel() for p in module.model.parameters()),
            "macs_per_clip": int(macs),
            "test_acc": float(test["test/acc"]),
            "test_acc_top5": float(test.get("test/acc_top5", float("nan"))),
            "train_seconds": seconds,
        }
        rows.append(row)
        print(f"{name} x{width}: top-1 {row['test_acc']:.4f} ({seconds:.0f} s)", flush=True)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "chance": 1.0 / args.num_classes,
        "rows": rows,
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },  # fmt: skip
    }


def _print_table(result: dict) -> None:
    cfg = result["config"]
    print(f"\nsynthetic {cfg['num_classes']} classes, {cfg['frames']}x{cfg['size']}x{cfg['size']}, "
          f"{cfg['train_size']} train / {cfg['test_size']} test clips, {cfg['epochs']} epochs, "
          f"chance {result['chance']:.3f}\n")  # fmt: skip
    print("| model | width | params | MMACs/clip | top-1 | top-5 | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['width']} | {r['params']:,} | {r['macs_per_clip'] / 1e6:.1f} "
              f"| {r['test_acc']:.4f} | {r['test_acc_top5']:.4f} | {r['train_seconds']:.0f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    _print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
