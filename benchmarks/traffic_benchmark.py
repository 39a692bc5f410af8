"""Measured vs analytic memory traffic, and energy per target, on the issue-26 configuration.

``r2plus1d_18`` width 0.5 (random init, 6 classes), clip 1x3x8x32x32, budget 0.35, two pruners
calibrated on 4 random clips: ``topk`` over channels and ``threshold`` over frames, channels and
features (untrained controllers). For each:

- the analytic figures of :class:`~lightning_dance.report.MacReport` (``update_stats``: Conv3d
  layers only, :mod:`lightning_dance.traffic`);
- the measured bytes of the dense fast path and the compact path (:mod:`lightning_dance.bytes`:
  every op), split by op kind, and the controller's share;
- per Conv3d layer: analytic dense / executed bytes vs the bytes measured inside that conv's
  forward (convolutions, gathers, weight slices, scatters; not the BatchNorm / ReLU after it);
- the same measurement with BatchNorms folded into their convs in both paths (``fold_norms``);
- the energy saving dense / compact under each target (LLC-aware) and with every byte at DRAM.

Deterministic (byte counts, seeded models); one thread; ~1 minute. ``--json`` writes it all.

Example:
    $ python benchmarks/traffic_benchmark.py --json runs/traffic.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_dance.aap import AdaptivePruner
from lightning_dance.bytes import compare_traffic
from lightning_dance.energy import reported_models
from lightning_dance.execution import CompactPruner
from lightning_dance.macs import quiet_fvcore
from lightning_dance.report import MacReport

with quiet_fvcore():
    from lightning_dance.models import create_model

CONFIGS = {"topk/channel": ("topk", ("channel",)),
           "threshold/all": ("threshold", ("frame", "channel", "feature"))}  # fmt: skip


def run_config(model, clip, calib, policy: str, dims: tuple[str, ...], budget: float) -> dict:
    pruner = AdaptivePruner(model, dims=dims, policy=policy, budget=budget).eval()
    with torch.no_grad():
        reached = pruner.calibrate(calib)
        report = MacReport.for_pruner(pruner, tuple(clip.shape[1:]))
        pruner(clip)
        report.update_stats(pruner.last_stats)
    d = report.to_dict()
    c = compare_traffic(pruner, clip)
    layers = []
    for layer in d["layers"]:
        name = layer["name"]
        layers.append({
            "layer": name,
            "analytic_dense": layer["dense_bytes"],
            "measured_dense": sum(c.dense.by_layer.get(name, (0, 0))),
            "analytic_executed": round(layer["executed_bytes_mean"]),
            "measured_compact": sum(c.compact.by_layer.get(name, (0, 0))),
        })  # fmt: skip
    folded = compare_traffic(CompactPruner(pruner, fold_norms=True), clip)
    conv_names = set(report.conv_dense_bytes)
    targets = reported_models("this_machine")
    return {
        "calibrated_macs_ratio": reached,
        "analytic": {k: d[k] for k in ("macs_saving", "dense_bytes", "executed_bytes_mean",
                                       "copy_bytes_mean", "traffic_saving", "energy_saving")},
        "measured": {
            "dense_bytes": c.dense.total,
            "compact_bytes": c.compact.total,
            "saving": c.saving,
            "controller_bytes": c.compact.layer_total("controller"),
            "dense_conv_layer_bytes": sum(sum(v) for k, v in c.dense.by_layer.items()
                                          if k in conv_names),
            "compact_conv_layer_bytes": sum(sum(v) for k, v in c.compact.by_layer.items()
                                            if k in conv_names),
            "dense_macs": c.dense.macs,
            "compact_macs": c.compact.macs,
            "dense_by_kind": {k: sum(v) for k, v in c.dense.by_kind.items()},
            "compact_by_kind": {k: sum(v) for k, v in c.compact.by_kind.items()},
        },
        "measured_fold_norms": {"dense_bytes": folded.dense.total,
                                "compact_bytes": folded.compact.total, "saving": folded.saving},
        "energy_saving": {k: c.energy_saving(e) for k, e in targets.items()},
        "llc_bytes": {k: e.cache_bytes for k, e in targets.items()},
        "layers": layers,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="r2plus1d_18")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--clip", nargs=3, type=int, default=[8, 32, 32], metavar=("T", "H", "W"))
    p.add_argument("--budget", type=float, default=0.35)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=6, width=args.width).eval()
    clip = torch.randn(1, 3, *args.clip)
    calib = torch.randn(4, 3, *args.clip)
    out = {"model": args.model, "width": args.width, "clip": list(clip.shape),
           "budget": args.budget, "configs": {}}  # fmt: skip
    for label, (policy, dims) in CONFIGS.items():
        r = run_config(model, clip, calib, policy, dims, args.budget)
        out["configs"][label] = r
        a, m = r["analytic"], r["measured"]
        print(f"\n{label}: MACs x{a['macs_saving']:.2f} fewer (calibrated ratio "
              f"{r['calibrated_macs_ratio']:.3f})")  # fmt: skip
        print(f"  analytic Conv3d traffic: {a['dense_bytes'] / 1e6:.1f} -> "
              f"{a['executed_bytes_mean'] / 1e6:.1f} MB (copies {a['copy_bytes_mean'] / 1e6:.1f}"
              f" MB), x{a['traffic_saving']:.2f}; energy x{a['energy_saving']:.2f}")  # fmt: skip
        print(f"  measured, all ops: {m['dense_bytes'] / 1e6:.1f} -> "
              f"{m['compact_bytes'] / 1e6:.1f} MB, x{m['saving']:.2f} (controller "
              f"{m['controller_bytes'] / 1e6:.2f} MB); Conv3d forwards only: "
              f"{m['dense_conv_layer_bytes'] / 1e6:.1f} -> "
              f"{m['compact_conv_layer_bytes'] / 1e6:.1f} MB")  # fmt: skip
        f = r["measured_fold_norms"]
        print(f"  with BatchNorms folded (both paths): {f['dense_bytes'] / 1e6:.1f} -> "
              f"{f['compact_bytes'] / 1e6:.1f} MB, x{f['saving']:.2f}")  # fmt: skip
        top = sorted(m["compact_by_kind"].items(), key=lambda kv: -kv[1])[:6]
        print("  compact by op kind (MB): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in top))
        print("  energy dense/compact: " + ", ".join(
            f"{k} x{v:.2f}" for k, v in r["energy_saving"].items()))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
