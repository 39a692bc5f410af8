"""Does AVA make a 3D CNN robust to per-input pruning? Dense start -> fine-tune with / without AVA.

Protocol (synthetic motion clips from ``lightning_dance.data``, ``tiny_c3d``):

1. train a dense model (or load it from ``--dense-cache``);
2. from the same dense weights, fine-tune for the same number of steps, with the same seed and
   data order: plain, and with ``AVACallback`` once per (``--measures`` x ``--weights``) entry;
3. on the validation split report, for the dense start and each fine-tuned model: top-1 accuracy,
   the variability of the instrumented layers' inputs (normalized Gini and top-25% mass of the
   per-clip channel / frame / spatial saliency, mean over clips and layers), and the *ablation*:
   top-1 when the lowest-saliency X% of the channels (separately: frames, spatial positions) of
   every instrumented layer's input (every Conv3d but the stem) are zeroed, per input, from that
   input's own saliency (``keep = round((1 - X) * K)``, at least 1: an oracle selection, not the
   AAP controller).

Prints a markdown table and writes JSON (default ``benchmarks/results/ava.json``, git-ignored).

    .venv/bin/python benchmarks/ava_benchmark.py                        # default (~5 min, 2 cores)
    .venv/bin/python benchmarks/ava_benchmark.py --quick                # smoke run (seconds)
    .venv/bin/python benchmarks/ava_benchmark.py --measures gini hhi --weights 0.5 2

Fine-tuned rows are means over ``--ft-seeds`` (``acc ±`` the standard deviation over seeds;
``acc cost`` is the mean paired difference to the plain fine-tune of the same seed).

Limits: one dense start and one data seed, synthetic data only, zeroing instead of skipping (the
accuracy of pruning, not its speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.ava import MEASURES, saliency, spread
from lightning_dance.ava_callback import DEFAULT_WARMUP_STEPS, DEFAULT_WEIGHT, AVACallback
from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoConfig, render_clips
from lightning_dance.layers import select_conv3d
from lightning_dance.masks import DIMS, apply_masks, keep_count, topk_gate
from lightning_dance.models import create_model
from lightning_dance.recipes import accuracy, fit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--val-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model-width", type=float, default=1.0, help="tiny_c3d width multiplier")
    p.add_argument("--dense-epochs", type=int, default=12)
    p.add_argument("--ft-epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3, help="dense training peak lr (AdamW, cosine)")
    p.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning peak lr")
    p.add_argument(
        "--weights", nargs="+", type=float, default=[DEFAULT_WEIGHT], help="AVA lambda(s)"
    )
    p.add_argument(
        "--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS, help="AVA lambda warm-up"
    )
    p.add_argument("--dims", nargs="+", default=list(DIMS), choices=DIMS)
    p.add_argument("--measures", nargs="+", default=["gini"], choices=MEASURES)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--ablate", nargs="+", default=list(DIMS), choices=DIMS)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 threads on 2 busy cores ran 30x slower than 1 here)",
    )
    p.add_argument("--seed", type=int, default=0, help="data and dense-training seed")
    p.add_argument(
        "--ft-seeds", nargs="+", type=int, default=[0, 1],
        help="fine-tuning seeds (data order); every model is fine-tuned once per seed",
    )  # fmt: skip
    p.add_argument(
        "--dense-cache", type=Path, default=None,
        help="load the dense weights from this file if it holds the same config, else train "
        "and save them there",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ava.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.dense_epochs, args.ft_epochs = 64, 32, 1, 1
        args.warmup_steps, args.size, args.frames, args.batch_size = 2, 16, 4, 16
        args.ft_seeds = args.ft_seeds[:1]
    if any(not 0 < x < 1 for x in args.fractions):
        p.error("--fractions must be in (0, 1)")
    return args


def render_split(args: argparse.Namespace, size: int, split: int) -> TensorDataset:
    """``size`` synthetic clips (balanced labels), rendered once, in chunks of 256."""
    cfg = SyntheticVideoConfig(num_classes=args.num_classes, frames=args.frames, size=args.size)
    g = torch.Generator().manual_seed(args.seed * 1_000 + split)
    labels = torch.arange(size) % args.num_classes
    clips = [render_clips(labels[i : i + 256], cfg, g)[0] for i in range(0, size, 256)]
    return TensorDataset(torch.cat(clips), labels)


class ZeroLowest:
    """Forward pre-hook: zero the lowest-saliency ``fraction`` of ``dim`` of each input."""

    def __init__(self, dim: str, fraction: float) -> None:
        self.dim, self.fraction = dim, fraction

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        n, _, _, h, w = x.shape
        s = saliency(x, self.dim)  # [N, K]
        mask = topk_gate(s, keep_count(1 - self.fraction, s.shape[1]), training=False)
        mask = mask.view(n, h, w) if self.dim == "feature" else mask
        return (apply_masks(x, {self.dim: mask}), *args[1:])


class Figures:
    """Forward pre-hook accumulating Gini and top-25% mass of the per-clip saliency."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, key: str, values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + values.sum().item()
        self.count[key] = self.count.get(key, 0) + values.numel()

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        for dim in DIMS:
            s = saliency(args[0], dim)
            if s.shape[1] < 2:
                continue
            self.add(f"gini_{dim}", spread(s, "gini"))
            top = s.topk(math.ceil(0.25 * s.shape[1]), dim=1).values.sum(1)
            self.add(f"top25_{dim}", top / s.sum(1).clamp_min(1e-12))

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.count[k] for k in sorted(self.sums)}


@contextmanager
def pre_hook_on_instrumented(net: nn.Module, hook: Any) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(hook) for m in select_conv3d(net).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def report(net: nn.Module, loader: DataLoader, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy (%), variability figures and the ablation of one model."""
    figures = Figures()
    with pre_hook_on_instrumented(net, figures):
        out: dict[str, Any] = {"acc": 100 * accuracy(net, loader)}
    out["variability"] = figures.result()
    out["ablation"] = {}
    for dim in args.ablate:
        out["ablation"][dim] = {}
        for x in args.fractions:
            with pre_hook_on_instrumented(net, ZeroLowest(dim, x)):
                out["ablation"][dim][f"{x:g}"] = 100 * accuracy(net, loader)
    return out


def mean_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of :func:`report` results over seeds (and ``acc_sd``, their standard deviation)."""

    def mean(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        return sum(values) / len(values)

    out = mean(reports)
    accs = [r["acc"] for r in reports]
    out["acc_sd"] = (sum((a - out["acc"]) ** 2 for a in accs) / max(1, len(accs) - 1)) ** 0.5
    return out


def train(
    args: argparse.Namespace,
    state: dict | None,
    dm: L.LightningDataModule,
    ava: AVACallback | None = None,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """Dense training (``state=None``) or a fine-tune from ``state``; returns (net, seconds)."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    net = create_model("tiny_c3d", args.num_classes, width=args.model_width)
    if state is not None:
        net.load_state_dict(state)
    lr, epochs = (args.lr, args.dense_epochs) if state is None else (args.ft_lr, args.ft_epochs)
    module = VideoClassifier(net, args.num_classes, lr=lr)
    L.seed_everything(seed, workers=True, verbose=False)  # same data order with or without AVA
    t0 = time.perf_counter()
    fit(module, dm, epochs=epochs, callbacks=[ava] if ava else [], validate=False,
        deterministic=True)  # fmt: skip
    return net, time.perf_counter() - t0


def dense_start(args: argparse.Namespace, dm: L.LightningDataModule) -> tuple[dict, float]:
    """The dense weights, from ``--dense-cache`` when it was made with the same settings."""
    keys = ("num_classes", "frames", "size", "train_size", "batch_size", "model_width",
            "dense_epochs", "lr", "seed")  # fmt: skip
    config = {k: getattr(args, k) for k in keys}
    cache = args.dense_cache
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        if saved.get("config") == config:
            return saved["state"], 0.0
        print(f"{cache} was made with other settings; retraining the dense model")
    net, seconds = train(args, None, dm, seed=args.seed)
    state = copy.deepcopy(net.state_dict())
    if cache is not None:
        torch.save({"config": config, "state": state}, cache)
    return state, seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole protocol; returns the result dict (what ``main`` prints and writes)."""
    start = time.perf_counter()
    train_set = render_split(args, args.train_size, 0)
    val_loader = DataLoader(render_split(args, args.val_size, 1), batch_size=64)
    dm = L.LightningDataModule.from_datasets(train_set, batch_size=args.batch_size)
    layers = list(select_conv3d(create_model("tiny_c3d", args.num_classes)))

    state, dense_s = dense_start(args, dm)
    times: dict[str, float] = {"dense": dense_s}
    dense = create_model("tiny_c3d", args.num_classes, width=args.model_width)
    dense.load_state_dict(state)
    rows = {"dense": report(dense, val_loader, args)}
    runs = [("finetune", None, 0.0)]
    runs += [(f"ava {m} λ={w:g}", m, w) for m in args.measures for w in args.weights]
    for name, measure, weight in runs:
        per_seed, times[name] = [], 0.0
        for seed in args.ft_seeds:
            ava = None
            if measure is not None:
                ava = AVACallback(
                    weight=weight, warmup_steps=args.warmup_steps, dims=args.dims, measure=measure
                )
            net, seconds = train(args, state, dm, ava, seed)
            times[name] += seconds
            per_seed.append(report(net, val_loader, args))
        rows[name] = {**mean_report(per_seed), "per_seed": per_seed}

    plain = rows["finetune"]
    for name, r in rows.items():
        if name in ("dense", "finetune"):
            continue
        costs = [p["acc"] - a["acc"] for p, a in zip(plain["per_seed"], r["per_seed"], strict=True)]
        r["acc_cost_pp"] = sum(costs) / len(costs)
        r["acc_cost_pp_per_seed"] = costs
        gains = [r["ablation"][d][x] - plain["ablation"][d][x] for d in r["ablation"]
                 for x in r["ablation"][d]]  # fmt: skip
        r["mean_ablation_gain_pp"] = sum(gains) / len(gains)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": f"tiny_c3d(width={args.model_width:g})",
        "instrumented_layers": layers,
        "results": rows,
        "fit_seconds": times,
        "total_seconds": time.perf_counter() - start,
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: accuracy, variability, ablation (and the AVA deltas) per model."""
    rows = result["results"]
    cfg = result["config"]
    ablate = [(d, f"{x:g}") for d in cfg["ablate"] for x in cfg["fractions"]]
    head = ["model", "acc", "gini ch", "gini fr", "gini fe", "top25 ch", "top25 fr"]
    head += [f"{d[:2]} -{float(x) * 100:.0f}%" for d, x in ablate] + ["acc cost", "abl. gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        v = r["variability"]
        sd = f"±{r['acc_sd']:.1f}" if len(r.get("per_seed", [])) > 1 else ""
        cells = [name, f"{r['acc']:.1f}{sd}"]
        keys = ("gini_channel", "gini_frame", "gini_feature", "top25_channel", "top25_frame")
        cells += [f"{v.get(k, float('nan')):.3f}" for k in keys]
        cells += [f"{r['ablation'][d][x]:.1f}" for d, x in ablate]
        cells += [
            f"{r[k]:+.1f}" if k in r else "" for k in ("acc_cost_pp", "mean_ablation_gain_pp")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    print(f"model {result['model']}; instrumented layers: {result['instrumented_layers']}")
    print(format_table(result))
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result["fit_seconds"].items())
    print(f"total {result['total_seconds']:.0f} s (fits: {times})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
