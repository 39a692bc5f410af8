"""The ``lightning-dance`` command: LightningCLI fit (dense, AVA, DANCE), export, the demo."""

import json

import pytest

from lightning_dance.cli import main

TINY_DATA = [
    "--data.num_classes=4", "--data.frames=4", "--data.size=16", "--data.train_size=16",
    "--data.val_size=8", "--data.test_size=8", "--data.batch_size=8",
]  # fmt: skip
CHECKPOINTING = [
    "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]  # fmt: skip
QUIET = [*CHECKPOINTING, "--trainer.enable_checkpointing=false"]


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
    # the default run and its files: tests/test_demo.py; here the command line dispatch, the
    # frozen-backbone path and the opt-in AVA stage
    main(["demo", "--quick", "--frozen", "--ava-epochs", "1", "--budget", "0.7",
          "--out", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    for stage in ("dense", "ava", "dance"):
        assert 0.0 <= results[f"{stage}/test_acc"] <= 1.0
    assert results["recipe"]["ava_epochs"] == 1 and (tmp_path / "ava").is_dir()
    assert "top-1 AVA" in (tmp_path / "summary.md").read_text()
    assert results["chance"] == pytest.approx(1 / 6)
    assert results["recipe"]["freeze_backbone"] is True and results["recipe"]["budget"] == 0.7
    assert "budget_warmup" not in results["recipe"]
    # the controller was trained and calibrated toward the budget of 0.7
    assert 0.05 < results["dance/mac_ratio_p5"] <= results["dance/mac_ratio"] < 0.9
    report = json.loads((tmp_path / "mac_report.json").read_text())
    assert report["samples"] == 32 and report["layers"]


# ---------------------------------------------------------------- DANCE, AVA, export
DANCE_YAML = """\
model:
  class_path: lightning_dance.DANCEWrapper
  init_args:
    model: tiny_c3d
    budget: 0.5
    policy: topk
    dims: [channel]
data:
  class_path: lightning_dance.data.SyntheticVideoDataModule
  init_args: {num_classes: 4, frames: 4, size: 16, train_size: 8, val_size: 4, batch_size: 4}
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def _only_ckpt(folder):
    found = sorted(folder.rglob("*.ckpt"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def dance_run(tmp_path_factory):
    """One tiny DANCE fit from a YAML config; its folder and checkpoint."""
    root = tmp_path_factory.mktemp("dance")
    cfg = root / "dance.yaml"
    cfg.write_text(DANCE_YAML)
    main(["fit", f"--config={cfg}", f"--trainer.default_root_dir={root}"])
    return root, _only_ckpt(root / "checkpoints")


def test_cli_fits_dance_from_a_yaml_config(dance_run):
    from lightning_dance import DANCEWrapper
    from lightning_dance.checkpoints import load_module, read_checkpoint

    root, ckpt = dance_run
    assert "class_path: lightning_dance.DANCEWrapper" in (root / "config.yaml").read_text()
    saved = read_checkpoint(ckpt)
    assert "dance" in saved and saved["epoch"] == 0
    # the wrapper's own defaults, not VideoClassifier's, and num_classes from the data
    hp = saved["hyper_parameters"]
    assert (hp["policy"], hp["budget"], list(hp["dims"])) == ("topk", 0.5, ["channel"])
    assert hp["weight_decay"] == 0.0 and hp["num_classes"] == 4
    module = load_module(ckpt)
    assert isinstance(module, DANCEWrapper) and module.pruner.policy.name == "topk"


def test_cli_exports_the_checkpoint_with_parity(dance_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    import torch

    from lightning_dance.checkpoints import load_module

    _, ckpt = dance_run
    out = tmp_path / "export"
    main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(out)])
    assert "jetson/onnx" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    # auto mode for a topk controller; the input shape from the data saved in the checkpoint
    assert manifest["mode"] == "topk" and manifest["input_shape"] == [1, 3, 4, 16, 16]
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx"]
    # the exported graph computes what the checkpoint's model computes, on a fresh clip
    clip = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_module(ckpt)(clip)
    session = ort.InferenceSession(str(out / "jetson" / "model.onnx"))
    name = session.get_inputs()[0].name
    (got,) = session.run(None, {name: clip.numpy()})
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)


def test_cli_ava_callback_then_dance_from_the_dense_checkpoint(tmp_path):
    from lightning_dance.checkpoints import read_checkpoint

    steps = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", *TINY_DATA, *CHECKPOINTING]
    main(["fit", "--model.model=tiny_c3d", "--trainer.callbacks+=AVACallback",
          "--trainer.callbacks.warmup_steps=0", f"--trainer.default_root_dir={tmp_path / 'ava'}",
          *steps])  # fmt: skip
    dense = _only_ckpt(tmp_path / "ava")
    saved = read_checkpoint(dense)
    assert "dance" not in saved
    assert any("AVACallback" in key for key in saved["callbacks"])  # the callback ran
    main(["fit", "--model=DANCEWrapper", f"--model.model={dense}", "--model.budget=0.4",
          f"--trainer.default_root_dir={tmp_path / 'dance'}", *steps])  # fmt: skip
    hp = read_checkpoint(_only_ckpt(tmp_path / "dance"))["hyper_parameters"]
    assert hp["model"] == str(dense) and hp["budget"] == 0.4


def test_cli_export_errors_name_the_fix(dance_run, tmp_path, capsys):
    _, ckpt = dance_run
    cases = {
        "not found": ["--ckpt", str(tmp_path / "missing.ckpt")],
        "corrupt or truncated": ["--ckpt", str(_garbage(tmp_path / "bad.ckpt"))],
        "unknown export format 'tflite'": ["--ckpt", str(ckpt), "--format", "tflite"],
        "mode must be": ["--ckpt", str(ckpt), "--mode", "sparse"],
    }
    for message, args in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(["export", *args, "--out", str(tmp_path / "x")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err
        if message.startswith("unknown"):
            assert "'onnx'" in err  # the registered formats are listed
    assert not (tmp_path / "x").exists()


def _garbage(path):
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    return path


def test_dance_wrapper_model_path_errors(tmp_path, dance_run):
    from lightning_dance import DANCEWrapper
    from lightning_dance.checkpoints import CheckpointError, load_module

    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        DANCEWrapper(str(tmp_path / "dense.ckpt"))
    _, ckpt = dance_run
    with pytest.raises(CheckpointError, match="is a DANCE checkpoint"):
        DANCEWrapper(str(ckpt))  # a controller is not a dense model to wrap
    with pytest.raises(ValueError, match="drop num_classes from model_kwargs"):
        DANCEWrapper("tiny_c3d", num_classes=5, model_kwargs={"num_classes": 4})
    with pytest.raises(ValueError, match="needs num_classes"):
        DANCEWrapper("tiny_c3d")
    with pytest.raises(CheckpointError, match="not a DANCE one"):
        load_module(_dense_ckpt(tmp_path), dance=True)


def _dense_ckpt(folder):
    import lightning as L

    from lightning_dance import VideoClassifier

    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(VideoClassifier("tiny_c3d", num_classes=4))
    path = folder / "dense.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_dance_checkpoint_needs_its_dense_checkpoint(tmp_path):
    import lightning as L

    from lightning_dance import DANCEWrapper, VideoClassifier
    from lightning_dance.checkpoints import CheckpointError, load_module

    dense = _dense_ckpt(tmp_path)
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(DANCEWrapper(str(dense), num_classes=4))
    trainer.save_checkpoint(tmp_path / "dance.ckpt")
    assert load_module(tmp_path / "dance.ckpt").hparams.model == str(dense)
    dense.unlink()
    with pytest.raises(CheckpointError, match="Put it back at that path"):
        load_module(tmp_path / "dance.ckpt")
    with pytest.raises(ValueError, match="classifies 4 classes but num_classes=6"):
        DANCEWrapper(VideoClassifier("tiny_c3d", num_classes=4), num_classes=6)
