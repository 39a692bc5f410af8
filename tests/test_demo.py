"""``lightning-dance demo --quick``: the output folder holds what the README promises.

One quick run (tiny sizes, one epoch per stage) for the whole module; the tests check the files,
not the accuracies (meaningless at these sizes): results and summary, decodable pictures, the
checkpoint reloads onto a fresh module and gives the same logits as the exported ONNX model
(exported from the trained model in memory, parity checked there), the ONNX parity holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_dance.classifier import VideoClassifier
from lightning_dance.demo import (
    PICTURES,
    _wrapper_kwargs,
    parse_args,
    reload_checkpoint,
    run_demo,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(parse_args(["--quick", "--out", str(out)]))
    return out, results


def test_folder_contents(demo_out):
    out, results = demo_out
    for name in ("results.json", "summary.md", "mac_report.json", "dance.ckpt", *PICTURES):
        assert (out / name).is_file(), (
            f"{name} missing from {sorted(p.name for p in out.iterdir())}"
        )
    stored = json.loads((out / "results.json").read_text())
    assert stored["dense/test_acc"] == results["dense/test_acc"]
    recipe = stored["recipe"]  # the default: the calibrated joint recipe at budget 0.6
    assert recipe["freeze_backbone"] is False and recipe["budget"] == 0.6
    assert recipe["calibrate_every"] == 10 and recipe["budget_warmup"] == 0.3
    # AVA is off by default (it did not help on the benchmark): DANCE starts from the dense model
    assert recipe["ava_epochs"] == 0 and stored["ava/test_acc"] is None
    assert not (out / "ava").exists()
    assert stored["dance/traffic_saving"] > 0  # measured from the executed ops
    assert set(stored["dance/energy_saving"]) >= {"dram", "jetson_nano", "snapdragon_8_gen_1"}
    assert 0.05 < stored["dance/mac_ratio"] < 0.9
    lat = stored["latency"]
    assert lat["speedup"] > 0 and {"dense fast", "DANCE compact"} <= set(lat["variants"])
    assert lat["compact_max_abs_error_vs_masked"] < 1e-3
    assert "loadavg" in stored["machine"]
    summary = (out / "summary.md").read_text()
    assert "measured speedup" in summary and all(f"]({p})" in summary for p in PICTURES)
    assert "top-1 dense" in summary and "top-1 AVA" not in summary


def test_pictures_decode(demo_out):
    import matplotlib.image

    for name in PICTURES:
        image = matplotlib.image.imread(out_path := demo_out[0] / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, out_path
        assert float(np.ptp(image[..., :3])) > 0.1, f"{name} is blank"


def test_onnx_parity_holds(demo_out):
    out, results = demo_out
    for key in ("onnx", "onnx_dense"):
        export = results[key]
        assert export["ok"], export
        assert export["parity_max_abs_error"] < 1e-3
    assert results["onnx"]["mode"] == "threshold"
    manifest = json.loads((out / "onnx" / "dance" / "manifest.json").read_text())
    assert manifest["artifacts"][0]["status"] == "ok"


def test_checkpoint_reloads_with_the_same_logits(demo_out):
    from lightning_dance.export.onnx import run_onnxruntime

    out, results = demo_out
    assert results["checkpoint"]["reload_max_abs_error"] == 0.0
    wrapper = reload_checkpoint(out / "dance.ckpt", VideoClassifier("tiny_c3d", num_classes=6))
    assert float(wrapper.pruner.budget) == pytest.approx(results["budget"])
    clip = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = wrapper(clip)
    # the ONNX file was exported from the trained model in memory: a second, independent witness
    onnx = run_onnxruntime(results["onnx"]["file"], clip)
    np.testing.assert_allclose(logits.numpy(), onnx, atol=1e-4)


def test_reload_needs_the_same_architecture(demo_out):
    from lightning_dance.wrapper import ArchitectureMismatchError

    with pytest.raises(ArchitectureMismatchError, match="different architecture"):
        reload_checkpoint(demo_out[0] / "dance.ckpt", VideoClassifier("tiny_c3d", num_classes=6,
                                                                      model_kwargs={"width": 2.0}))  # fmt: skip


def test_bad_arguments_name_the_fix():
    with pytest.raises(SystemExit):
        parse_args(["--budget", "1.5"])
    with pytest.raises(SystemExit):
        parse_args(["--curve-budgets", "0"])
    assert parse_args(["--frozen"]).joint is False
    assert "calibrate_every" not in _wrapper_kwargs(parse_args(["--frozen"]))
    with pytest.raises(SystemExit):
        parse_args(["--calibrate-every", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["--ava-epochs", "-1"])


def test_ava_is_opt_in():
    default = parse_args([])
    assert (default.ava_epochs, default.dance_epochs) == (0, 6)  # AVA's epoch spent on DANCE
    assert parse_args(["--ava-epochs", "2"]).ava_epochs == 2
    assert parse_args(["--ava-epochs", "2", "--quick"]).ava_epochs == 1  # one epoch a stage
    assert parse_args(["--quick"]).ava_epochs == 0


def test_summary_rows_show_ava_only_when_it_ran():
    from lightning_dance.demo import _summary_rows

    variants = {"dense fast": {"median_ms": 2.0}, "DANCE compact": {"median_ms": 1.0}}
    results = {
        "test_clips": 100, "budget": 0.6, "dense/test_acc": 0.8, "ava/test_acc": None,
        "dance/test_acc": 0.75, "dance/mac_ratio": 0.6, "dance/mac_ratio_p5": 0.5,
        "dance/mac_ratio_p95": 0.7, "latency": {"variants": variants, "speedup": 2.0},
        "dance/traffic_saving": 1.5,
        "dance/energy_saving": {"dram": 1.2, "jetson_nano": 1.3, "snapdragon_8_gen_1": 1.4},
        "onnx": {"ok": False, "reason": "x"}, "checkpoint": {"reload_max_abs_error": 0.0},
        "machine": {"loadavg": "0 0 0"}, "demo_seconds": 1.0,
    }  # fmt: skip
    names = [name for name, _ in _summary_rows(results)]
    assert "top-1 AVA (dense)" not in names
    assert ("DANCE - dense", "-5.0 pp") in _summary_rows(results)
    results["ava/test_acc"] = 0.81
    rows = dict(_summary_rows({**results}))
    assert rows["top-1 AVA (dense)"] == "81.0% ± 3.9"
