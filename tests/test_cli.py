"""The ``lightning-dance`` command: LightningCLI fit/validate and the demo."""

import json

import pytest

from lightning_dance.cli import main

TINY_DATA = [
    "--data.num_classes=4", "--data.frames=4", "--data.size=16", "--data.train_size=16",
    "--data.val_size=8", "--data.test_size=8", "--data.batch_size=8",
]  # fmt: skip
QUIET = [
    "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]  # fmt: skip


def test_cli_fit_one_step_uses_synthetic_data_and_links_num_classes(tmp_path):
    main(
        ["fit", "--model.model=tiny_c3d", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
         f"--trainer.default_root_dir={tmp_path}", *TINY_DATA, *QUIET]
    )  # fmt: skip
    # LightningCLI saves the resolved config: num_classes came from the data
    config = (tmp_path / "config.yaml").read_text()
    assert "num_classes: 4" in config
    assert "SyntheticVideoDataModule" in config


def test_cli_reads_a_yaml_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  model: tiny_c3d\n  lr: 0.001\ntrainer:\n  max_steps: 1\n")
    main(["validate", f"--config={cfg}", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.limit_val_batches=1", *TINY_DATA, *QUIET])  # fmt: skip


def test_cli_rejects_an_unknown_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.no_such_option=1"])
    assert "no_such_option" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    # the default recipe (joint fine-tuning) and its files: tests/test_demo.py; here the command
    # line dispatch and the frozen-backbone path
    main(["demo", "--quick", "--frozen", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    for stage in ("dense", "ava", "dance"):
        assert 0.0 <= results[f"{stage}/test_acc"] <= 1.0
    assert results["chance"] == pytest.approx(1 / 6)
    # the controller was trained and calibrated toward the default budget of 0.5
    assert 0.05 < results["dance/mac_ratio_p5"] <= results["dance/mac_ratio"] < 0.9
    report = json.loads((tmp_path / "mac_report.json").read_text())
    assert report["samples"] == 32 and report["layers"]
