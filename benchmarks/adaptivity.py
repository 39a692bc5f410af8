"""How much of a dynamic model's accuracy comes from choosing per clip?

A ``topk`` DANCE model picks its channels per clip. Its **static projection** keeps, for every
clip, the channels it keeps most often (:func:`lightning_dance.priors.freeze_channels`, the
frequencies measured on the validation clips), as many per layer as before: the same MACs, the
same backbone, no retraining. The gap between the two on the test clips is what the per-clip
choice is worth to that backbone; the gap between the static projection and a statically pruned
model trained as long (``torch-pruning`` in ``pareto.py``) is what training under per-clip
choices costs the backbone. Also reported: how varied the choices are (distinct kept-channel
sets per layer over the test clips, the share of clips on each layer's most common set).

The models are those :mod:`pareto` trained and cached (nothing is trained here):

    .venv/bin/python benchmarks/adaptivity.py --cache runs/starts --seeds 0 1 2 \\
        --specs mod-topk-credit@0.35 --out runs/adaptivity

Any other option is ``pareto.py``'s (the task), so that the cached models are found.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
from typing import Any

import torch
from cascade import cached, cached_contexts, load_pareto

from lightning_dance.priors import channel_frequencies, freeze_channels


def _evaluate(ctx: Any, model: torch.nn.Module, pruner: Any) -> dict[str, Any]:
    """Top-1 (all, by difficulty third), mean MAC ratio and per-layer kept-set variety on the
    test clips."""
    hits, cost = [], []
    sets: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with torch.no_grad():
        for clip, label in ctx.dm.test_dataloader():
            hits.append(model(clip).argmax(-1) == label)
            stats = pruner.last_stats
            cost.append(stats.mac_ratio())
            for name, layer in stats.layers.items():
                for row in layer.masks["channel"].bool():
                    sets[name][row.numpy().tobytes()] += 1
    hit = torch.cat(hits)
    thirds = {k: float(hit[idx].float().mean()) for k, idx in ctx.difficulty_thirds().items()}
    n = len(hit)
    distinct = sorted(len(c) for c in sets.values())
    common = [c.most_common(1)[0][1] / n for c in sets.values()]
    return {"acc": float(hit.float().mean()), "acc_thirds": thirds,
            "mac_ratio": float(torch.cat(cost).mean()),
            "distinct_sets_median": distinct[len(distinct) // 2],
            "most_common_set_share": statistics.fmean(common)}  # fmt: skip


def adaptivity_row(ctx: Any, spec: str) -> dict[str, Any]:
    """The dynamic model ``spec`` and its static projection, side by side on the test clips."""
    cand = cached(ctx, spec)
    if cand.wrapper is None:
        raise ValueError(f"{spec} is a static model: nothing to project")
    wrapper = cand.wrapper.eval()
    dynamic = _evaluate(ctx, wrapper, wrapper.pruner)
    frozen = copy.deepcopy(wrapper).eval()
    clips = (clip for clip, _ in ctx.dm.val_dataloader())
    freeze_channels(frozen, channel_frequencies(frozen, clips))
    static = _evaluate(ctx, frozen, frozen.pruner)
    return {"spec": spec, "seed": ctx.seed, "dynamic": dynamic, "static_projection": static,
            "gain_of_per_clip_choice": dynamic["acc"] - static["acc"]}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", nargs="+", required=True, help='cached "method@budget" (topk)')
    args, rest = p.parse_known_args(argv)
    targs, contexts = cached_contexts(p, rest)
    rows = []
    for ctx in contexts:
        for spec in args.specs:
            row = adaptivity_row(ctx, spec)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if "--out" in rest:
                targs.out.mkdir(parents=True, exist_ok=True)
                with open(targs.out / "adaptivity.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    for spec in args.specs:
        own = [r for r in rows if r["spec"] == spec]
        dyn = [100 * r["dynamic"]["acc"] for r in own]
        sta = [100 * r["static_projection"]["acc"] for r in own]
        gain = [d - s for d, s in zip(dyn, sta, strict=True)]
        sd = statistics.stdev(gain) if len(gain) > 1 else 0.0
        print(f"{spec}: per clip {statistics.fmean(dyn):.1f}%, static projection "
              f"{statistics.fmean(sta):.1f}%, gain {statistics.fmean(gain):+.1f} ± {sd:.1f} pp "
              f"(seeds {' / '.join(f'{g:+.1f}' for g in gain)})")  # fmt: skip
    return rows


if __name__ == "__main__":
    load_pareto()
    main()
