"""The decisive benchmark's harness (``benchmarks/pareto.py``) in its quick form.

Every registered method must come back as a row at every budget and seed (or as a reported
failure with its error), with finite figures; the dense reference is in the table; the files
it writes exist and the plots decode. The matched-cost helpers are checked against fvcore.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_dance.macs import count_macs
from lightning_dance.models import create_model
from lightning_dance.priors import channel_frequencies, freeze_channels

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto.py"


@pytest.fixture(scope="module")
def pareto():
    spec = importlib.util.spec_from_file_location("pareto", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pareto"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("pareto", None)


def test_matched_width_is_closest_to_budget(pareto):
    task = pareto.Task(model="r2plus1d_18", width=0.25, frames=4, size=16)
    width, ratio = pareto.matched_width(task, 0.35)
    clip = torch.zeros(1, *task.clip_shape)
    dense = count_macs(create_model(task.model, task.num_classes, width=task.width), clip).total
    got = count_macs(create_model(task.model, task.num_classes, width=width), clip).total
    assert ratio == pytest.approx(got / dense)
    assert abs(ratio - 0.35) < 0.06  # channels are rounded to multiples of 8: coarse steps


@pytest.mark.slow
def test_quick_benchmark_has_every_method_row(pareto, tmp_path):
    quick = ["--quick", "--model", "tiny_c3d", "--width", "1", "--no-progress", "--threads", "1",
             "--cache", str(tmp_path / "cache")]  # fmt: skip
    result = pareto.main([*quick, "--out", str(tmp_path)])
    expected = {(m, b) for m in pareto.METHODS for b in result["budgets"]} | {("dense", 1.0)}
    summary = {(e["method"], e["budget"]): e for e in result["summary"]}
    assert set(summary) == expected
    for key, entry in summary.items():
        if entry["seeds"] == 0:  # a method that failed must say why
            assert entry["errors"], key
            continue
        for figure in pareto.FIGURES:
            # policies without an export mode have no onnxruntime form; the compact path no
            # compiled one
            if figure not in ("speedup_onnxruntime", "speedup_compiled"):
                assert math.isfinite(entry[figure]), (key, figure, entry[figure])
        assert 0 < entry["mac_ratio"] <= 1.05 and entry["speedup"] > 0
        assert 0 <= entry["acc"] <= 1
    assert summary[("dense", 1.0)]["mac_ratio"] == pytest.approx(1.0)
    # every model that exports is timed in onnxruntime too, against dense in onnxruntime
    b = result["budgets"][0]
    for key in [("dense", 1.0), ("torch-pruning", b), ("mod-topk", b), ("dance", b)]:
        assert math.isfinite(summary[key]["speedup_onnxruntime"]), key
    assert summary[("dense", 1.0)]["speedup_onnxruntime"] == 1.0
    # static models and plan books are also timed compiled (torch.compile with freezing), the
    # dense reference too: the baseline of every speedup is its fastest form, compiled or not
    forms = {(r["method"], r["budget"]): r["latency_forms"] for r in result["rows"] if "error" not in r}
    for key in [("dense", 1.0), ("slim", b), ("torch-pruning", b)]:
        assert {"plain", "fast", "compiled", "compiled_cl"} <= set(forms[key]), key
    assert {"compiled", "compiled_cl"} <= set(forms[("dance-channel-ce-book4", b)])
    assert set(forms[("dance-channel-ce", b)]) >= {"compact"}
    assert not any(f.startswith("compiled") for f in forms[("dance-channel-ce", b)])
    dense_row = next(r for r in result["rows"] if r["method"] == "dense")
    assert dense_row["latency_ms"] == min(forms[("dense", 1.0)].values())
    assert summary[("dense", 1.0)]["speedup_compiled"] == 1.0  # per runtime: over dense in it
    assert math.isfinite(summary[("dance-channel-ce-book4", b)]["speedup_compiled"])
    assert math.isnan(summary[("dance-channel-ce", b)]["speedup_compiled"])
    assert "onnxruntime" in (tmp_path / "summary.md").read_text()
    assert summary[("slim", result["budgets"][0])]["seeds"] == 1  # the slim family never fails
    # the materialized projection: the projection's predictions, as a plain model
    made = summary[("static-first-materialized", b)]
    projected = summary[("static-first-projection", b)]
    assert made["seeds"] == projected["seeds"] == 1
    assert made["acc"] == projected["acc"]
    assert made["mac_ratio"] <= projected["mac_ratio"] + 1e-9
    # the plan books of dance-channel-ce (its per-clip choice among a few materialized plans):
    # each clip counted at its plan's MACs, near the per-clip model's own count
    for name in ("dance-channel-ce-book4", "dance-channel-ce-book8"):
        assert summary[(name, b)]["seeds"] == 1
        per_clip = summary[("dance-channel-ce", b)]["mac_ratio"]
        assert summary[(name, b)]["mac_ratio"] == pytest.approx(per_clip, abs=0.1)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["summary"] == json.loads(json.dumps(result["summary"]))
    assert "| dance |" in (tmp_path / "summary.md").read_text()
    from matplotlib.image import imread

    for name in ("pareto_macs.png", "pareto_latency.png"):
        assert imread(tmp_path / name).shape[0] > 100
    # credit_outputs: the counted MACs are those the compact path runs; without it the count
    # charges every producer in full, above what runs (measured 0.50 counted, 0.39 ran)
    b = result["budgets"][0]
    credit, plain = summary[("mod-topk-credit", b)], summary[("mod-topk", b)]
    assert credit["ran_ratio"] == pytest.approx(credit["mac_ratio"], abs=0.02)
    assert plain["ran_ratio"] < plain["mac_ratio"] - 0.05
    # by clip difficulty: every third of the test clips has its top-1 and MACs
    assert all(0 <= summary[k]["acc_hard"] <= 1 for k in summary if summary[k]["seeds"])

    # the confidence cascade (benchmarks/cascade.py) over the cached models: never escalating
    # is the cheap stage alone, always escalating is the large stage's answers; the stem router
    # sends a clip to one stage only, so routing every clip costs the large stage alone
    spec = importlib.util.spec_from_file_location("cascade", PATH.with_name("cascade.py"))
    cascade = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cascade)
    pairs = [f"torch-pruning@{b}>dense", f"mod-topk-credit@{b}>dense"]
    cheap_cost = {p: summary[(p.split("@")[0], b)]["mac_ratio"] for p in pairs}
    for target, share in [(0.0, 0.0), (3.0, 1.0)]:
        rows = cascade.main([*quick, "--route", "--target", str(target), "--pairs", *pairs])
        assert len(rows) == 2 * len(pairs)
        for row in rows:
            pair = row["pair"].removeprefix("route ")
            assert row["escalated"] == share
            assert row["acc"] == (row["acc_large"] if share else row["acc_cheap"])
            assert row["acc_cheap"] == summary[(pair.split("@")[0], b)]["acc"]
            routed = row["pair"].startswith("route ")
            cost = 1.0 if routed and share else cheap_cost[pair] + share
            assert row["cost"] == pytest.approx(cost, abs=1e-3)
        assert rows[0]["acc_large"] == summary[("dense", 1.0)]["acc"]

    # the static projection (benchmarks/adaptivity.py): the cached dynamic model gives its own
    # top-1 back; its projection keeps one channel set per layer for every clip, at its MACs
    sys.modules["cascade"] = cascade
    try:
        spec = importlib.util.spec_from_file_location("adaptivity",
                                                      PATH.with_name("adaptivity.py"))  # fmt: skip
        adaptivity = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(adaptivity)
        (row,) = adaptivity.main([*quick, "--specs", f"mod-topk-credit@{b}"])
        with pytest.raises(ValueError, match="static model"):
            adaptivity.main([*quick, "--specs", f"torch-pruning@{b}"])
    finally:
        sys.modules.pop("cascade", None)
    assert row["dynamic"]["acc"] == summary[("mod-topk-credit", b)]["acc"]
    projection = row["static_projection"]
    assert projection["mac_ratio"] == pytest.approx(row["dynamic"]["mac_ratio"], abs=1e-6)
    assert projection["distinct_sets_median"] == 1 and projection["most_common_set_share"] == 1
    assert row["gain_of_per_clip_choice"] == row["dynamic"]["acc"] - projection["acc"]

    # a second run reuses the cached trained candidates (the same top-1, no training) and a
    # merge of both runs' rows gives one row per method, budget and seed, timed
    # (--latency-size: timed and measured on larger clips of the same generator; top-1 and the
    # counted MACs stay those of the task's clips, MACs ran are against dense at that size)
    again = pareto.main([*quick, "--methods", "slim", "dance-width", "--latency-size", "48",
                         "--out", str(tmp_path / "b")])  # fmt: skip
    for e in again["summary"]:
        assert e["acc"] == summary[(e["method"], e["budget"])]["acc"]
        assert e["mac_ratio"] == pytest.approx(summary[(e["method"], e["budget"])]["mac_ratio"])
    again_summary = {(e["method"], e["budget"]): e for e in again["summary"]}
    assert again_summary[("dense", 1.0)]["ran_ratio"] == pytest.approx(1.0)
    assert again["latency_size"] == 48 and "x48x48" in (tmp_path / "b" / "summary.md").read_text()
    assert (tmp_path / "cache" / f"dance-width-{result['budgets'][0]}-seed0.pt").exists()
    merged = pareto.main(["--merge", str(tmp_path / "rows.jsonl"), str(tmp_path / "b" / "rows.jsonl"),
                          "--out", str(tmp_path / "m")])  # fmt: skip
    assert {(e["method"], e["budget"]) for e in merged["summary"]} == expected
    assert all(e["seeds"] == 1 or e.get("errors") for e in merged["summary"])
    assert all(math.isfinite(e["speedup"]) for e in merged["summary"] if e["seeds"])


@pytest.mark.slow
def test_dance_selected_prunes_only_the_given_layer_dims(pareto, tmp_path):
    """``--layer-dims``: the wrapper prunes those layers along those dims only (names without
    the classifier's ``model.`` prefix, as a selection made on the bare network gives them),
    and a cached candidate is never reused for another selection."""
    quick = ["--quick", "--model", "tiny_c3d", "--width", "1", "--no-progress", "--threads", "1",
             "--no-onnx", "--methods", "dance-selected", "--cache", str(tmp_path / "cache")]  # fmt: skip
    dims = tmp_path / "dims.json"
    dims.write_text(json.dumps({"conv2.0": ["channel"], "conv3.0": ["frame"]}))
    try:
        result = pareto.main([*quick, "--layer-dims", str(dims), "--out", str(tmp_path / "a")])
        ctx = pareto.Context(pareto.Task(**{k: v for k, v in result["task"].items()
                                            if k != "total_epochs"}), 0,
                             None, cache=tmp_path / "cache")  # fmt: skip
        cand = ctx.trained("dance-selected", result["budgets"][0])  # from the cache
        pruner = cand.wrapper.pruner
        assert pruner.layer_names == ["model.conv2.0", "model.conv3.0"]
        assert pruner.layer_dims == {"model.conv2.0": ("channel",), "model.conv3.0": ("frame",)}
        first = {p.name for p in (tmp_path / "cache").glob("dance-selected-*")}
        dims.write_text(json.dumps({"conv2.0": ["frame"]}))
        pareto.main([*quick, "--layer-dims", str(dims), "--out", str(tmp_path / "b")])
        second = {p.name for p in (tmp_path / "cache").glob("dance-selected-*")}
        assert len(first) == 1 and len(second) == 2  # a new digest, a new candidate
    finally:
        pareto.LAYER_DIMS = None
    with pytest.raises(ValueError, match="--layer-dims"):
        pareto.METHODS["dance-selected"](ctx, 0.5, 0)


@pytest.mark.slow
def test_dance_selected_static_first_needs_channel_only_dims(pareto, tmp_path):
    """``dance-selected-static-first`` trains the threshold pruner of a channel-only selection
    static first (its controller's input weights train in the second half), and refuses a
    selection that prunes frames, naming why."""
    quick = ["--quick", "--model", "tiny_c3d", "--width", "1", "--no-progress", "--threads", "1",
             "--no-onnx", "--methods", "dance-selected-static-first-ce",
             "--cache", str(tmp_path / "cache")]  # fmt: skip
    dims = tmp_path / "dims.json"
    dims.write_text(json.dumps({"conv2.0": ["channel"], "conv3.0": ["channel"]}))
    try:
        result = pareto.main([*quick, "--layer-dims", str(dims), "--out", str(tmp_path / "a")])
        ctx = pareto.Context(pareto.Task(**{k: v for k, v in result["task"].items()
                                            if k != "total_epochs"}), 0,
                             None, cache=tmp_path / "cache")  # fmt: skip
        cand = ctx.trained("dance-selected-static-first-ce", result["budgets"][0])
        pruner = cand.wrapper.pruner
        assert pruner.policy == "threshold" and cand.wrapper.hparams.task == "labels"
        assert pruner.layer_dims == {"model.conv2.0": ("channel",), "model.conv3.0": ("channel",)}
        assert float(pruner.controller.channel_head.weight.abs().sum()) > 0  # per clip after
        # its static projection, materialized from the cached model: the projection's outputs
        ctx = pareto.Context(ctx.task, 0, ctx.task.datamodule(), cache=tmp_path / "cache")
        ctx.dm.setup("fit")
        small = ctx.trained("dance-selected-static-first-materialized", result["budgets"][0]).model
        assert not any(isinstance(m, pareto.DANCEWrapper) for m in small.modules())
        wrapper = copy.deepcopy(cand.wrapper).eval()
        freeze_channels(wrapper, channel_frequencies(
            wrapper, (c for c, _ in ctx.dm.val_dataloader())), standalone=True)  # fmt: skip
        clip = torch.randn(2, *ctx.example.shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(small(clip), wrapper(clip), atol=1e-4, rtol=1e-4)
        pareto.LAYER_DIMS = {"conv2.0": ("channel", "frame")}
        with pytest.raises(ValueError, match="StaticFirst makes channel decisions static"):
            pareto.METHODS["dance-selected-static-first"](ctx, 0.5, 0)
    finally:
        pareto.LAYER_DIMS = None
