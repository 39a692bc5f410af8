"""The baseline VideoClassifier: learns the synthetic data, logs, schedules, validates args."""

import lightning as L
import pytest
import torch

from lightning_dance.classifier import VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


@pytest.mark.slow
def test_baseline_learns_the_synthetic_data():
    L.seed_everything(0)
    dm = SyntheticVideoDataModule(
        num_classes=4, frames=8, size=32, train_size=512, val_size=128, test_size=128,
        batch_size=16, seed=0,
    )  # fmt: skip
    model = VideoClassifier("tiny_c3d", num_classes=4, lr=1e-3)
    trainer = _trainer(max_epochs=6)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    after = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert after["test/loss"] < before["val/loss"] - 0.3
    # chance is 0.25: the baseline must be clearly above it
    assert after["test/acc"] > 0.5, after


def test_logs_loss_and_metrics_and_steps_the_cosine_schedule():
    dm = SyntheticVideoDataModule(
        num_classes=6, frames=4, size=16, train_size=32, val_size=16, test_size=16, batch_size=8
    )
    model = VideoClassifier("tiny_c3d", num_classes=6, lr=1e-3, warmup_steps=2,
                            model_kwargs={"width": 0.5})  # fmt: skip
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, datamodule=dm)
    logged = trainer.logged_metrics
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_top5"):
        assert key in logged, sorted(logged)
        assert torch.isfinite(logged[key])
    # top-5 of 6 classes is at least top-1
    assert logged["val/acc_top5"] >= logged["val/acc"]
    # after the whole run the cosine schedule has decayed to ~0 from the peak
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 1e-3 * 0.05
    assert model.hparams.num_classes == 6 and model.hparams.model == "tiny_c3d"


def test_warmup_then_cosine_factors():
    model = VideoClassifier("tiny_c3d", num_classes=4, lr=1.0, warmup_steps=4)
    trainer = _trainer(max_steps=20)
    model.trainer = trainer  # estimated_stepping_batches reads max_steps
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # decays after warm-up
    assert lrs[-1] < 0.05


def test_takes_any_module():
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )  # fmt: skip
    model = VideoClassifier(net, num_classes=3)
    assert model(torch.randn(2, 3, 4, 8, 8)).shape == (2, 3)
    assert "model" not in model.hparams


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"lr": 0.0}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"model": "no_such_net"}, "tiny_c3d"),  # the error lists the known names
    ],
)
def test_bad_arguments(kw, match):
    args = {"model": "tiny_c3d", "num_classes": 4} | kw
    with pytest.raises((ValueError, KeyError), match=match):
        VideoClassifier(**args)


def test_model_kwargs_need_a_factory_name():
    with pytest.raises(ValueError, match="model_kwargs"):
        VideoClassifier(torch.nn.Conv3d(3, 4, 1), num_classes=4, model_kwargs={"width": 0.5})


@pytest.mark.slow
def test_baseline_benchmark_quick_mode(tmp_path) -> None:
    """benchmarks/baseline_benchmark.py trains two factory models and writes its JSON table."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "baseline_benchmark.py"
    spec = importlib.util.spec_from_file_location("baseline_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "baseline.json"
    result = bench.main(
        ["--quick", "--threads", "1", "--models", "tiny_c3d:0.5", "r3d_18:0.125",
         "--train-size", "16", "--test-size", "12", "--out", str(out)]
    )  # fmt: skip
    assert [(r["model"], r["width"]) for r in result["rows"]] == [
        ("tiny_c3d", 0.5),
        ("r3d_18", 0.125),
    ]
    for row in result["rows"]:
        assert 0.0 <= row["test_acc"] <= row["test_acc_top5"] <= 1.0
        assert row["macs_per_clip"] > 0 and row["params"] > 0
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_distillation_adds_the_teachers_kl_to_the_training_loss_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    teacher = VideoClassifier("tiny_c3d", num_classes=4).model.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = VideoClassifier("tiny_c3d", num_classes=4, teacher=teacher, distill_temperature=3.0)
    clip, label = torch.randn(2, 3, 4, 16, 16), torch.tensor([0, 3])
    student.log = lambda *a, **k: None  # outside a Trainer
    student.train()
    loss = student.training_step((clip, label), 0)
    # independent reference: cross-entropy + T^2 KL(teacher || student) at T = 3
    logits = student(clip)
    with torch.no_grad():
        target = teacher(clip)
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(logits / 3, -1), torch.softmax(target / 3, -1), reduction="batchmean"
    )
    want = torch.nn.functional.cross_entropy(logits, label) + 9 * kl
    assert kl > 1e-4 and float(loss) == pytest.approx(float(want), rel=1e-5)
    # validation stays plain cross-entropy; the teacher is a frozen copy outside the checkpoint
    val = student.validation_step((clip, label), 0)
    assert float(val) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, label)),
                                       rel=1e-5)  # fmt: skip
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("_teacher") or "teacher" in k for k in student.state_dict())
    assert "teacher" not in student.hparams
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in student._teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the user's module is untouched


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"teacher": "tiny_c3d"}, TypeError, "teacher must be an nn.Module"),
        ({"distill_temperature": 0.0}, ValueError, "distill_temperature must be > 0"),
        ({"distill_temperature": float("nan")}, ValueError, "distill_temperature must be > 0"),
    ],
)
def test_distillation_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        VideoClassifier("tiny_c3d", num_classes=4, **kwargs)
