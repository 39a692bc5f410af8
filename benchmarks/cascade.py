"""Per-clip budgets by confidence: a two-stage cascade, static and dynamic, at matched mean cost.

An input-aware model should spend little on easy clips and more on hard ones. The simplest way
to do that, open to static and dynamic models alike, is a cascade: run a cheap model on the
clip; if its top softmax probability is below a threshold ``tau``, run a larger one and take its
answer. The clip's cost is the cheap model's MACs, plus the large one's when it escalates.
``tau`` is set on the validation clips so that the **mean** cost meets the target budget; the
test clips then report top-1, the mean cost, the share escalated, and both by difficulty
(thirds of the generator's difficulty score).

The stages are the models :mod:`pareto` trained and cached (``--cache`` of ``pareto.py``;
nothing is trained here): ``torch-pruning@0.25>torch-pruning@0.5`` is a static cascade,
``mod-topk-credit@0.25>mod-topk-credit@0.5`` a dynamic one (each stage's cost is its own
counted MACs per clip), ``dense`` the dense reference. The expected batch-1 latency is the
cheap stage's plus the escalated share times the large stage's, each timed side by side
against dense in its fastest form (``--time``; otherwise not reported).

``--route`` adds the form that pays for one stage only: a router reads the cheap stage's stem
output (the per-channel mean and standard deviation, what DANCE's controller reads), and a
logistic regression fitted on the training clips to predict the cheap stage's mistakes sends
each clip to the cheap or the large stage before either runs (its threshold meets the target
on validation, as above).

    .venv/bin/python benchmarks/cascade.py --cache runs/starts --seeds 0 1 2 --target 0.35 \\
        --out runs/cascade --pairs "torch-pruning@0.25>torch-pruning@0.5" "mod-topk-credit@0.25>mod-topk-credit@0.5"

Limits: a cascade pays the cheap stage twice for the clips it escalates (no reuse of its
features), and two stages are two models in memory; the threshold is a single global one.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

PARETO = Path(__file__).resolve().parent / "pareto.py"


def load_pareto() -> Any:
    """The harness module (its task, context and cached candidates)."""
    if "pareto" in sys.modules:
        return sys.modules["pareto"]
    spec = importlib.util.spec_from_file_location("pareto", PARETO)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pareto"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def threshold_for(conf: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                  target: float) -> float:  # fmt: skip
    """The largest confidence threshold ``tau`` whose cascade (escalate where ``conf < tau``)
    costs at most ``target`` on average, given each clip's cheap-stage cost ``low`` and
    large-stage cost ``high``; ``-inf`` (never escalate) when even that is over the target,
    ``inf`` when every clip may escalate (``conf`` is any score: higher is surer).

    >>> conf = torch.tensor([0.875, 0.5, 0.75, 0.625])
    >>> threshold_for(conf, torch.full((4,), 0.2), torch.full((4,), 0.4), 0.4)  # half of them
    0.75
    >>> threshold_for(conf, torch.full((4,), 0.2), torch.full((4,), 0.4), 0.1)
    -inf
    """
    order = conf.argsort()  # escalate the least confident first
    extra = (high[order]).cumsum(0)
    base = float(low.sum())
    n = conf.numel()
    k = int(((base + extra) / n <= target + 1e-12).sum())  # how many can escalate
    if k == 0:
        return float("-inf")
    if k == n:
        return float("inf")
    return float(conf[order[k]])  # escalate the k clips strictly below the (k+1)-th confidence


def cached(ctx: Any, spec: str) -> Any:
    """The cached :class:`pareto.Candidate` ``spec`` (``method@budget``, or ``dense``: the
    reference) of ``ctx``'s seed; never trains (FileNotFoundError if it is not cached)."""
    if spec == "dense":
        return load_pareto().Candidate(ctx.reference())
    name, budget = spec.rsplit("@", 1)
    path = ctx.cache / f"{name}-{float(budget)}-seed{ctx.seed}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is not cached: train it with pareto.py first")
    return ctx.trained(name, float(budget))


def stage_outputs(ctx: Any, spec: str, split: str) -> dict[str, torch.Tensor]:
    """Softmax confidence, correctness and per-clip MAC ratio (of the task's dense model) of the
    cached model ``spec`` (``method@budget`` or ``dense``) on the ``split`` clips, in order."""
    cand = cached(ctx, spec)
    model = cand.wrapper if cand.wrapper is not None else cand.model
    model.eval()
    loader = ctx.dm.val_dataloader() if split == "val" else ctx.dm.test_dataloader()
    static = None
    if cand.wrapper is None:
        from lightning_dance.macs import count_macs

        static = count_macs(cand.model, ctx.example).total / ctx.dense_macs()
    conf, hit, cost = [], [], []
    with torch.no_grad():
        for clip, label in loader:
            p = model(clip).softmax(-1)
            conf.append(p.max(-1).values)
            hit.append(p.argmax(-1) == label)
            if static is None:
                cost.append(cand.wrapper.last_stats.mac_ratio().double() * cand.scale)
            else:
                cost.append(torch.full((clip.shape[0],), static, dtype=torch.float64))
    return {"conf": torch.cat(conf), "hit": torch.cat(hit), "cost": torch.cat(cost).float(),
            "candidate": cand}  # fmt: skip


def stem_features(model: torch.nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """What a router may read before spending: the mean and standard deviation of each channel
    of ``model``'s stem output (the first Conv3d, as DANCE's controller reads it), ``[N, 2C]``."""
    from lightning_dance.layers import stem_names

    stem = model.get_submodule(stem_names(model)[0])
    out: list[torch.Tensor] = []
    handle = stem.register_forward_hook(lambda m, i, o: out.append(o.flatten(2)))
    try:
        with torch.no_grad():
            model(clips)
    finally:
        handle.remove()
    x = out[0]
    return torch.cat([x.mean(-1), x.std(-1)], 1)


def fit_router(features: torch.Tensor, wrong: torch.Tensor, steps: int = 300) -> Any:
    """A logistic regression on standardized ``features`` predicting ``wrong`` (the cheap
    stage's mistakes); returns the scoring function (higher: more likely wrong). Deterministic:
    the weights start from a fixed seed (the global generator is left as it was)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lin = torch.nn.Linear(features.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
    x, y = (features - mean) / std, wrong.float()[:, None]
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(lin(x), y).backward()
        opt.step()
    return lambda f: lin((f - mean) / std).squeeze(1).detach()


def _stage_model(cand: Any) -> torch.nn.Module:
    return cand.wrapper.pruner.model if cand.wrapper is not None else cand.model


def router_row(ctx: Any, pair: str, target: float) -> dict[str, Any]:
    """One seed's stem router over ``cheap>large``: a logistic regression on the cheap stage's
    stem statistics, fitted on the training clips to predict the cheap stage's mistakes, sends
    each clip to one stage only (no double pay); its threshold meets ``target`` on validation."""
    cheap, large = pair.split(">")
    out = {split: {s: stage_outputs(ctx, s, split) for s in (cheap, large)}
           for split in ("val", "test")}  # fmt: skip
    cand = out["val"][cheap]["candidate"]
    runner = cand.wrapper if cand.wrapper is not None else cand.model
    model = _stage_model(cand)
    train = torch.utils.data.DataLoader(ctx.dm.train_dataset, batch_size=64)
    feats, wrong = [], []
    with torch.no_grad():
        for clip, label in train:
            feats.append(stem_features(model, clip))
            wrong.append(runner(clip).argmax(-1) != label)
    score = fit_router(torch.cat(feats), torch.cat(wrong))

    def routed(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = ctx.dm.val_dataloader() if split == "val" else ctx.dm.test_dataloader()
        s = torch.cat([score(stem_features(model, clip)) for clip, _ in loader])
        return -s, out[split][large]["cost"] - out[split][cheap]["cost"]

    conf, extra = routed("val")
    tau = threshold_for(conf, out["val"][cheap]["cost"], extra, target)
    conf, extra = routed("test")
    up = conf < tau
    test = out["test"]
    cost = torch.where(up, test[large]["cost"], test[cheap]["cost"])
    return _row(ctx, "route " + pair, target, tau, up, test[cheap], test[large], cost)


def cascade_row(ctx: Any, pair: str, target: float) -> dict[str, Any]:
    """One seed's cascade ``cheap>large`` at mean cost ``target``: test top-1, mean and p95
    cost, share escalated, by difficulty third; and each stage alone."""
    cheap, large = pair.split(">")
    val = {s: stage_outputs(ctx, s, "val") for s in (cheap, large)}
    test = {s: stage_outputs(ctx, s, "test") for s in (cheap, large)}
    tau = threshold_for(val[cheap]["conf"], val[cheap]["cost"], val[large]["cost"], target)
    up = test[cheap]["conf"] < tau
    cost = test[cheap]["cost"] + up * test[large]["cost"]
    return _row(ctx, pair, target, tau, up, test[cheap], test[large], cost)


def _row(ctx: Any, pair: str, target: float, tau: float, up: torch.Tensor,
         cheap: dict[str, Any], large: dict[str, Any], cost: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """The test figures of a two-stage run: each clip takes the large stage's answer where
    ``up``, and costs ``cost``; overall and by difficulty third."""
    hit = torch.where(up, large["hit"], cheap["hit"]).double()
    cost = cost.double()
    row = {"pair": pair, "seed": ctx.seed, "target": target, "tau": tau,
           "acc": float(hit.mean()), "cost": float(cost.mean()),
           "cost_p95": float(torch.quantile(cost, 0.95)), "escalated": float(up.double().mean()),
           "acc_cheap": float(cheap["hit"].double().mean()),
           "acc_large": float(large["hit"].double().mean())}  # fmt: skip
    for third, idx in ctx.difficulty_thirds().items():
        row[f"acc_{third}"] = float(hit[idx].mean())
        row[f"cost_{third}"] = float(cost[idx].mean())
    row["_stages"] = (cheap["candidate"], large["candidate"])
    return row


def _stages(row: dict[str, Any]) -> list[str]:
    return row["pair"].removeprefix("route ").split(">")


def time_stages(ctx: Any, rows: list[dict[str, Any]], clips: int, repeats: int) -> None:
    """Expected batch-1 latency of each cascade against dense in its fastest form: every
    stage's fastest form timed side by side with dense (interleaved, one process); a cascade's
    is its cheap stage's plus the escalated share of its large stage's (``speedup``)."""
    from lightning_dance.timing import interleaved

    pareto = load_pareto()
    samples = [c[None] for c, _ in itertools.islice(iter(ctx.dm.test_dataset), clips)]
    stages = {"dense": pareto.Candidate(ctx.reference())}
    for row in rows:
        for spec, cand in zip(_stages(row), row["_stages"], strict=True):
            stages[spec] = cand
    runs = {}
    for spec, cand in stages.items():
        cand.model.to(memory_format=torch.channels_last_3d)
        per_clip = [cand.forms(c) for c in samples]
        for form in per_clip[0]:
            cycle = itertools.cycle([forms[form] for forms in per_clip])
            runs[f"{spec}/{form}"] = lambda cycle=cycle: next(cycle)()
    times = interleaved(runs, warmup=5, repeats=repeats)
    best = {s: min(t.median_ms for k, t in times.items() if k.startswith(f"{s}/")) for s in stages}
    for row in rows:
        cheap, large = _stages(row)
        share = row["escalated"]
        if row["pair"].startswith("route "):  # one stage per clip (the stem read is not timed)
            row["latency_ms"] = (1 - share) * best[cheap] + share * best[large]
        else:
            row["latency_ms"] = best[cheap] + row["escalated"] * best[large]
        row["speedup"] = best["dense"] / row["latency_ms"]
        row["stage_ms"] = {cheap: best[cheap], large: best[large], "dense": best["dense"]}


def cached_contexts(p: argparse.ArgumentParser, rest: list[str]) -> tuple[Any, Any]:
    """pareto.py's options in ``rest`` (the task, seeds, threads, cache, out) and a generator of
    one :class:`pareto.Context` per seed over its cache (``--cache`` is required)."""
    pareto = load_pareto()
    targs = pareto.parse_args(rest)
    if targs.cache is None:
        p.error("--cache is required: the models come from pareto.py's cache")
    torch.set_num_threads(targs.threads)
    fields = pareto.Task.__dataclass_fields__
    task = pareto.Task(**{f: getattr(targs, f) for f in fields if hasattr(targs, f)})

    def contexts() -> Any:
        for seed in targs.seeds:
            ctx = pareto.Context(task, seed, task.datamodule(), cache=targs.cache)
            ctx.dm.setup("fit")
            yield ctx

    return targs, contexts()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other option is pareto.py's (the task: --model, --seeds, --quick ...), so "
        "that the cached models are found: pass the ones the cache was made with.",
    )
    p.add_argument("--target", type=float, default=0.35, help="mean MAC ratio of the cascade")
    p.add_argument("--pairs", nargs="+", required=True, help='"cheap@b>large@b" stage pairs')
    p.add_argument("--route", action="store_true",
                   help="also route each clip to one stage from its stem statistics")  # fmt: skip
    p.add_argument("--time", action="store_true", help="time the stages (batch 1)")
    p.add_argument("--clips", type=int, default=8, help="test clips cycled in timing")
    p.add_argument("--time-repeats", type=int, default=30)
    args, rest = p.parse_known_args(argv)
    targs, contexts = cached_contexts(p, rest)
    rows = []
    for ctx in contexts:
        seed_rows = [cascade_row(ctx, pair, args.target) for pair in args.pairs]
        if args.route:
            seed_rows += [router_row(ctx, pair, args.target) for pair in args.pairs]
        if args.time:
            time_stages(ctx, seed_rows, args.clips, args.time_repeats)
        for row in seed_rows:
            row.pop("_stages")
            print(json.dumps(row), flush=True)
            if "--out" in rest:  # pareto.py's default --out is its own results folder
                targs.out.mkdir(parents=True, exist_ok=True)
                with open(targs.out / "cascade.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
        rows += seed_rows
    for pair in dict.fromkeys(r["pair"] for r in rows):
        own = [r for r in rows if r["pair"] == pair]
        acc = [100 * r["acc"] for r in own]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{pair}: top-1 {statistics.fmean(acc):.1f} ± {sd:.1f} "
              f"(seeds {' / '.join(f'{a:.1f}' for a in acc)}), mean cost "
              f"{statistics.fmean(r['cost'] for r in own):.3f}, escalated "
              f"{statistics.fmean(r['escalated'] for r in own):.2f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
