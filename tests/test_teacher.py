"""The training task (labels / distillation) and the check on the distillation teacher."""

import copy
import warnings

import lightning as L
import pytest
import torch
from conftest import SmallNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.classifier import VideoClassifier
from lightning_dance.teacher import TASKS, TeacherCheck, task_losses
from lightning_dance.wrapper import DANCEWrapper


def _data(n=64, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(n, 3, 8, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(clips, y) if labels else TensorDataset(clips)


def _fit(module, data, **kw):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, **kw)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(data, batch_size=16))
    teacher = [w for w in caught if "distillation teacher" in str(w.message)]
    return trainer.callback_metrics, teacher


@pytest.mark.parametrize(
    "task,labels,expected",
    [
        ("auto", True, (True, False)),
        ("auto", False, (False, True)),
        ("labels", True, (True, False)),
        ("distill", True, (False, True)),
        ("distill", False, (False, True)),
        ("both", True, (True, True)),
    ],
)
def test_task_losses(task, labels, expected):
    assert task in TASKS
    assert task_losses(task, has_labels=labels) == expected


@pytest.mark.parametrize("task", ["labels", "both"])
def test_a_task_that_needs_labels_names_the_one_that_does_not(task):
    with pytest.raises(ValueError, match="needs labelled batches.*'auto'"):
        task_losses(task, has_labels=False)
    with pytest.raises(ValueError, match="task must be one of"):
        task_losses("label", has_labels=True)


def test_teacher_check_counts_and_warns_once():
    check = TeacherCheck("X", warn_below=0.9, min_clips=6)
    logits = torch.eye(3).repeat(2, 1)  # predicts 0, 1, 2, 0, 1, 2
    assert check.accuracy is None and not check.is_weak()
    assert check.update(logits[:3], torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)
    assert not check.is_weak()  # 3 clips: too few to judge
    check.update(logits[3:], torch.tensor([0, 1, 2]))
    assert check.accuracy == pytest.approx(5 / 6) and check.is_weak()
    with pytest.warns(UserWarning, match=r"right on only 83% of the 6 training clips.*task='auto'"):
        assert check.warn_if_weak()
    assert not check.warn_if_weak()  # once
    check.reset()
    assert check.accuracy is None and not check.warned
    strong = TeacherCheck("X", warn_below=0.8, min_clips=6)
    strong.update(logits, torch.tensor([0, 1, 2, 0, 1, 0]))
    assert not strong.is_weak() and not strong.warn_if_weak()
    with pytest.raises(ValueError, match="warn_below"):
        TeacherCheck("X", warn_below=1.5)


@pytest.mark.parametrize("labels", [True, False])
def test_wrapper_default_trains_on_labels_and_distils_only_without(labels):
    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget=0.5)
    assert wrapper.hparams.task == "auto"
    logged, warned = _fit(wrapper, _data(labels=labels))
    assert ("dance/train_loss_ce" in logged) is labels
    assert ("dance/train_loss_distill" in logged) is not labels
    assert "dance/train_teacher_acc" not in logged and not warned


@pytest.mark.parametrize("freeze", [True, False])
def test_a_weak_teacher_is_measured_and_named(freeze):
    """``task="both"`` with an untrained teacher: its logged top-1 equals the dense model's
    own on the training clips (computed apart), and one warning names the fix."""
    torch.manual_seed(0)
    net = SmallNet()
    reference = copy.deepcopy(net).eval()
    data = _data()
    with torch.no_grad():
        expected = (reference(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean()
    assert expected < 0.95
    wrapper = DANCEWrapper(net, budget=0.5, task="both", freeze_backbone=freeze)
    logged, warned = _fit(wrapper, data)
    assert "dance/train_loss_ce" in logged and "dance/train_loss_distill" in logged
    assert float(logged["dance/train_teacher_acc"]) == pytest.approx(float(expected))
    assert len(warned) == 1 and "task='auto' or 'labels'" in str(warned[0].message)


def test_classifier_checks_its_teacher():
    torch.manual_seed(0)
    teacher = SmallNet()
    data = _data()
    with torch.no_grad():
        expected = (teacher.eval()(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean()
    student = VideoClassifier(SmallNet(), num_classes=4, teacher=teacher)
    logged, warned = _fit(student, data)
    assert float(logged["train/teacher_acc"]) == pytest.approx(float(expected))
    assert len(warned) == 1
    logged, warned = _fit(VideoClassifier(SmallNet(), num_classes=4), data)
    assert "train/teacher_acc" not in logged and not warned


def test_no_teacher_copy_is_kept_for_labels_only():
    """Joint fine-tuning keeps a frozen copy of the model to distil from, except under
    ``task="labels"``, which never distils (no second model in memory)."""
    net = SmallNet()
    assert DANCEWrapper(net, freeze_backbone=False, task="labels")._teacher is None
    for task in ("auto", "both", "distill"):
        teacher = DANCEWrapper(SmallNet(), freeze_backbone=False, task=task)._teacher
        assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget=0.5, freeze_backbone=False, task="labels")
    logged, warned = _fit(wrapper, _data())
    assert "dance/train_loss_ce" in logged and "dance/train_loss_distill" not in logged
