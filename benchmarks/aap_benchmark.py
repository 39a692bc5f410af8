"""AAP: accuracy vs executed MACs of the DANCE controller, per policy, dim subset and budget.

Protocol (synthetic motion clips, ``tiny_c3d`` by default):

1. train a dense model, then fine-tune it with ``AVACallback`` (the AVA-tuned start);
2. for every policy (``threshold``: DANCE, ``topk``: fixed counts), dim subset (frame only,
   channel only, feature only, all three) and budget: wrap the AVA model in a ``DANCEWrapper``
   (backbone frozen), train the controller (labels + distillation from the dense model, budget
   loss), calibrate it on validation clips, and test it on held-out clips: top-1, executed/dense
   MAC ratio (mean, p5, p95 over clips; controller included);
3. budget-conditioned: one controller trained over a budget range, evaluated at every budget
   (``set_budget`` + calibration), next to the per-budget controllers.

Prints a table and writes JSON (default ``benchmarks/results/aap.json``).

    .venv/bin/python benchmarks/aap_benchmark.py                # full grid (~30 min, 2 cores)
    .venv/bin/python benchmarks/aap_benchmark.py --quick        # smoke run (~1 min)
    .venv/bin/python benchmarks/aap_benchmark.py --policies threshold --dim-sets all
    # r2plus1d (width 0.5) with joint fine-tuning, next to a control fine-tuned as long unpruned
    .venv/bin/python benchmarks/aap_benchmark.py --model r2plus1d_18 --width 0.5 \
        --policies topk --dim-sets channel --budgets 0.5 0.3 --joint --controller-epochs 6 \
        --control-epochs 6 --no-conditioned --threads 1
    # the same with gradual pruning and a cosine schedule (-0.3 pp at budget 0.45, ~1 h)
    .venv/bin/python benchmarks/aap_benchmark.py --model r2plus1d_18 --width 0.5 \
        --policies topk --dim-sets channel --budgets 0.45 --joint --controller-epochs 12 \
        --budget-warmup 0.3 --lr-schedule cosine --backbone-lr 2e-3 --control-epochs 12 \
        --no-conditioned --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_dance.ava_callback import DEFAULT_WEIGHT, AVACallback
from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.recipes import calibrate, evaluate_dance, fit, train_controller

DIM_SETS = {
    "frame": ("frame",),
    "channel": ("channel",),
    "feature": ("feature",),
    "all": ("frame", "channel", "feature"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny_c3d")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1536)
    p.add_argument("--val-size", type=int, default=384)
    p.add_argument("--test-size", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--ava-epochs", type=int, default=3)
    p.add_argument("--ava-weight", type=float, default=DEFAULT_WEIGHT)
    p.add_argument("--controller-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.4, 0.3])
    p.add_argument("--policies", nargs="+", default=["threshold", "topk"],
                   choices=["threshold", "topk"])  # fmt: skip
    p.add_argument("--dim-sets", nargs="+", default=list(DIM_SETS), choices=list(DIM_SETS))
    p.add_argument("--budget-range", nargs=2, type=float, default=[0.25, 0.8])
    p.add_argument("--no-conditioned", action="store_true", help="skip the budget-conditioned run")
    p.add_argument(
        "--joint",
        action="store_true",
        help="fine-tune the backbone with the controller (default: frozen backbone)",
    )
    p.add_argument("--controller-lr", type=float, default=3e-3)  # fmt: skip
    p.add_argument("--backbone-lr", type=float, default=None,
                   help="with --joint: the backbone's lr (default: controller lr / 10)")  # fmt: skip
    p.add_argument("--budget-warmup", type=float, default=0.0,
                   help="gradual pruning: the training budget falls from 1 to the target over "
                        "this fraction of the controller's training steps")  # fmt: skip
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--credit-outputs", action=argparse.BooleanOptionalAction, default=None,
                   help="budgets count the output-skipping fast path's MACs (see AdaptivePruner; "
                        "default: the library's, on wherever channels are pruned)")  # fmt: skip
    p.add_argument("--channel-multiple", type=int, default=1,
                   help="topk: keep a multiple of this many channels per layer (CPU: 8)")  # fmt: skip
    p.add_argument("--control-epochs", type=int, default=0,
                   help="also fine-tune the AVA model this many epochs without pruning (at the "
                        "joint backbone lr): the control that pruned accuracy is compared to")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None,
                   help="reuse the dense and AVA weights from this file (written if missing)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/aap.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes and a reduced grid")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size = 96, 48, 48
        args.dense_epochs = args.ava_epochs = args.controller_epochs = 1
        args.budgets, args.dim_sets = [0.5], ["channel", "all"]
    if any(not 0 < b <= 1 for b in args.budgets):
        p.error("--budgets must be in (0, 1]")
    return args


def _dense_and_ava(args: argparse.Namespace, dm: SyntheticVideoDataModule) -> tuple[Any, Any]:
    def make() -> VideoClassifier:
        return VideoClassifier(args.model, args.num_classes, lr=args.lr,
                               model_kwargs={"width": args.width})  # fmt: skip

    dense, ava = make(), make()
    if args.cache is not None and args.cache.exists():
        state = torch.load(args.cache, weights_only=True)
        dense.load_state_dict(state["dense"])
        ava.load_state_dict(state["ava"])
        return dense, ava
    L.seed_everything(args.seed, verbose=False)
    fit(dense, dm, epochs=args.dense_epochs, validate=False)
    ava.load_state_dict(dense.state_dict())
    ava.hparams.lr = args.lr * 0.3
    fit(ava, dm, epochs=args.ava_epochs, validate=False,
        callbacks=[AVACallback(weight=args.ava_weight)])  # fmt: skip
    if args.cache is not None:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"dense": dense.state_dict(), "ava": ava.state_dict()}, args.cache)
    return dense, ava


def _acc(model: torch.nn.Module, loader: Any) -> float:
    from lightning_dance.recipes import accuracy

    return accuracy(model, loader)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dm = SyntheticVideoDataModule(
        num_classes=args.num_classes, frames=args.frames, size=args.size,
        train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
        batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    dense, ava = _dense_and_ava(args, dm)
    test = dm.test_dataloader()
    base = {"dense_acc": _acc(dense, test), "ava_acc": _acc(ava, test)}
    print(f"dense top-1 {base['dense_acc']:.4f}, AVA top-1 {base['ava_acc']:.4f}")
    if args.control_epochs:
        L.seed_everything(args.seed, verbose=False)
        control = copy.deepcopy(ava)
        control.hparams.lr = args.backbone_lr or args.controller_lr / 10
        fit(control, dm, epochs=args.control_epochs, validate=False)
        base["control_acc"] = _acc(control, test)
        print(f"control (AVA model fine-tuned {args.control_epochs} epochs, no pruning) top-1 "
              f"{base['control_acc']:.4f}", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    for policy in args.policies:
        for dim_set in args.dim_sets:
            for budget in args.budgets:
                L.seed_everything(args.seed, verbose=False)
                t0 = time.perf_counter()
                wrapper = train_controller(
                    copy.deepcopy(ava), dm, budget=budget, policy=policy,
                    dims=DIM_SETS[dim_set], epochs=args.controller_epochs,
                    calibrate_batches=len(dm.val_dataloader()), lr=args.controller_lr,
                    freeze_backbone=not args.joint, backbone_lr=args.backbone_lr,
                    budget_warmup=args.budget_warmup, lr_schedule=args.lr_schedule,
                    credit_outputs=args.credit_outputs,
                    **({"channel_multiple": args.channel_multiple} if policy == "topk" else {}),
                )  # fmt: skip
                row = {"policy": policy + ("+joint" if args.joint else ""), "dims": dim_set,
                       "budget": budget,
                       **evaluate_dance(wrapper, dm, "test"),
                       "train_seconds": time.perf_counter() - t0}  # fmt: skip
                row["delta_pp_vs_dense"] = 100 * (row["acc"] - base["dense_acc"])
                if "control_acc" in base:
                    row["delta_pp_vs_control"] = 100 * (row["acc"] - base["control_acc"])
                rows.append(row)
                _print_row(row)

    conditioned: list[dict[str, Any]] = []
    if not args.no_conditioned:
        L.seed_everything(args.seed, verbose=False)
        low, high = args.budget_range
        wrapper = train_controller(
            copy.deepcopy(ava), dm, budget=0.5, budget_range=(low, high), policy="threshold",
            epochs=args.controller_epochs * 2, calibrate_batches=0,
        )  # fmt: skip
        for budget in args.budgets:
            wrapper.set_budget(budget)
            calibrate(wrapper, dm, batches=len(dm.val_dataloader()))
            row = {"policy": "threshold+conditioned", "dims": "all", "budget": budget,
                   **evaluate_dance(wrapper, dm, "test")}  # fmt: skip
            row["delta_pp_vs_dense"] = 100 * (row["acc"] - base["dense_acc"])
            conditioned.append(row)
            _print_row(row)

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **base,
        "rows": rows,
        "budget_conditioned": conditioned,
        "total_seconds": time.perf_counter() - start,
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },  # fmt: skip
    }
    _print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


def _print_row(row: dict[str, Any]) -> None:
    print(f"{row['policy']:>22} {row['dims']:>8} budget {row['budget']:.2f}: top-1 "
          f"{row['acc']:.4f} ({row['delta_pp_vs_dense']:+.1f} pp) MAC ratio "
          f"{row['mac_ratio']:.3f} [p5 {row['mac_ratio_p5']:.3f}, p95 {row['mac_ratio_p95']:.3f}]",
          flush=True)  # fmt: skip


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"AAP on synthetic clips: dense top-1 {result['dense_acc']:.4f}, "
                        f"AVA top-1 {result['ava_acc']:.4f}"
                        + (f", control top-1 {result['control_acc']:.4f}"
                           if "control_acc" in result else ""))  # fmt: skip
    for col in ("policy", "dims", "budget", "top-1", "vs dense (pp)", "MAC ratio", "p5", "p95"):
        table.add_column(col, justify="right")
    for row in result["rows"] + result["budget_conditioned"]:
        table.add_row(
            row["policy"], row["dims"], f"{row['budget']:.2f}", f"{row['acc']:.4f}",
            f"{row['delta_pp_vs_dense']:+.1f}", f"{row['mac_ratio']:.3f}",
            f"{row['mac_ratio_p5']:.3f}", f"{row['mac_ratio_p95']:.3f}",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
