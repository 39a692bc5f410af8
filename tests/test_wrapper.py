import lightning as L
import pytest
import torch
from conftest import SmallNet
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.classifier import VideoClassifier
from lightning_dance.wrapper import ArchitectureMismatchError, DANCEWrapper


def _loader(n=8, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(n, 3, 8, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(clips, y) if labels else TensorDataset(clips)
    return DataLoader(ds, batch_size=4)


def _trainer(tmp_path, **kw):
    base = dict(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    return L.Trainer(**(base | kw))


def test_fit_trains_only_the_controller_and_logs(tmp_path):
    torch.manual_seed(0)
    net = SmallNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wrapper = DANCEWrapper(net, budget=0.5, lr=1e-2)
    ctrl_before = [p.clone() for p in wrapper.pruner.controller.parameters()]
    trainer = _trainer(tmp_path, limit_val_batches=1, val_check_interval=2)
    trainer.fit(wrapper, _loader(), _loader(seed=1))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN stats too
    changed = [
        not torch.equal(a, b)
        for a, b in zip(ctrl_before, wrapper.pruner.controller.parameters(), strict=True)
    ]
    assert any(changed)
    logged = trainer.callback_metrics
    for key in ("dance/val_mac_ratio", "dance/budget", "val/acc", "dance/val_kept_channel"):
        assert key in logged, key
    assert 0 < float(logged["dance/val_mac_ratio"]) <= 1


@pytest.mark.parametrize("backbone_lr,expected", [(None, 1e-3), (5e-5, 5e-5)])
def test_joint_fine_tuning_uses_a_smaller_backbone_lr(tmp_path, backbone_lr, expected):
    """Frozen: one parameter group (the controller). Joint: the backbone gets its own group,
    ``lr / 10`` by default, and its weights move while the dense teacher stays fixed."""
    assert len(DANCEWrapper(SmallNet(), lr=1e-2).configure_optimizers().param_groups) == 1
    torch.manual_seed(0)
    net = SmallNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wrapper = DANCEWrapper(net, lr=1e-2, freeze_backbone=False, backbone_lr=backbone_lr)
    controller, backbone = wrapper.configure_optimizers().param_groups
    assert controller["lr"] == 1e-2 and backbone["lr"] == pytest.approx(expected)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in net.parameters()}
    assert {id(p) for p in controller["params"]} == {
        id(p) for p in wrapper.pruner.parameters() if id(p) not in {id(q) for q in net.parameters()}
    }
    _trainer(tmp_path).fit(wrapper, _loader())
    assert not torch.equal(before["conv_a.0.weight"], net.state_dict()["conv_a.0.weight"])
    teacher = wrapper._teacher.state_dict()
    assert all(torch.equal(before[k], teacher[k]) for k in before)


def test_distillation_needs_no_labels(tmp_path):
    wrapper = DANCEWrapper(SmallNet(), task="distill")
    _trainer(tmp_path).fit(wrapper, _loader(labels=False))
    with pytest.raises(ValueError, match="needs labelled batches"):
        _trainer(tmp_path).fit(DANCEWrapper(SmallNet(), task="labels"), _loader(labels=False))


def test_checkpoint_round_trip_and_architecture_check(tmp_path):
    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget=0.4, dims=("frame", "channel"))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(tmp_path, enable_checkpointing=True, callbacks=[ckpt]).fit(wrapper, _loader())
    path = tmp_path / "last.ckpt"
    loaded = DANCEWrapper.load_from_checkpoint(path, model=SmallNet())
    assert loaded.hparams.dims == ("frame", "channel")
    assert float(loaded.pruner.budget) == pytest.approx(0.4)
    for a, b in zip(wrapper.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    clip = torch.randn(2, 3, 8, 16, 16)
    torch.testing.assert_close(wrapper.eval()(clip), loaded.eval()(clip))
    with pytest.raises(ArchitectureMismatchError, match="different architecture"):
        DANCEWrapper.load_from_checkpoint(path, model=SmallNet(width=16))


def test_user_lightning_module_is_recoverable(tmp_path):
    torch.manual_seed(0)
    user = VideoClassifier(SmallNet(), num_classes=4)
    trainer = _trainer(tmp_path)
    trainer.fit(user, _loader())
    user_ckpt = tmp_path / "user.ckpt"
    trainer.save_checkpoint(user_ckpt)
    keys = set(user.state_dict())
    wrapper = DANCEWrapper(user, budget=0.5)
    _trainer(tmp_path).fit(wrapper, _loader())
    back = wrapper.unwrap()
    assert back is user and set(back.state_dict()) == keys
    assert all(p.requires_grad for p in back.parameters())
    # the user's class still loads its own checkpoint, and the weights did not move
    reloaded = VideoClassifier.load_from_checkpoint(user_ckpt, model=SmallNet())
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, back.state_dict()[k])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(task="both?"), "task"),
        (dict(budget=1.2), "budget"),
        (dict(budget_range=(0.6, 0.3)), "budget_range"),
        (dict(lr=0), "lr"),
        (dict(backbone_lr=-1e-4), "backbone_lr"),
        (dict(min_layer_keep=1.0), "min_layer_keep"),
        (dict(budget_warmup=1.0), "budget_warmup"),
        (dict(budget_warmup=-0.1), "budget_warmup"),
        (dict(budget_warmup=0.3, budget_range=(0.2, 0.8)), "budget_range"),
        (dict(lr_schedule="linear"), "lr_schedule"),
        (dict(calibrate_every=-1), "calibrate_every"),
        (dict(calibrate_every=2.5), "calibrate_every"),
        (dict(calibrate_every=5, budget_range=(0.2, 0.8)), "budget_range"),
        (dict(budget_feedback=-0.5), "budget_feedback"),
        (dict(budget_feedback="1"), "budget_feedback"),
        (dict(budget_feedback=True), "budget_feedback"),
        (dict(budget_feedback=1.0, budget_range=(0.2, 0.8)), "budget_range"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DANCEWrapper(SmallNet(), **kw)


class _Recorder(L.Callback):
    """Per training step: the budget the pruner's forward saw, its MAC ratio, the lrs."""

    def __init__(self):
        self.budgets, self.ratios, self.lrs, self.kept = [], [], [], []

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args):
            self.budgets.append(float(module.budget))

        pl_module.pruner.register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ratios.append(float(pl_module.last_stats.mac_ratio().mean()))
        kept = pl_module.last_stats.kept_fractions().values()
        self.kept.append(min(d["channel"] for d in kept))
        assert float(pl_module.pruner.budget) == pytest.approx(0.3)  # the target between steps


def test_budget_warmup_prunes_gradually(tmp_path):
    """Zhu & Gupta's cubic schedule from dense (budget 1) to the target over the first half of
    the steps; topk keeps every channel at step 0; eval and checkpoints keep the target."""
    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget=0.3, policy="topk", dims=("channel",),
                           budget_warmup=0.5)  # fmt: skip
    rec = _Recorder()
    _trainer(tmp_path, max_steps=8, max_epochs=-1, callbacks=[rec]).fit(wrapper, _loader())
    expected = [0.3 + 0.7 * (1 - s / 4) ** 3 for s in range(4)] + [0.3] * 4
    assert rec.budgets == pytest.approx(expected)
    assert rec.kept[0] == 1.0  # k = C in every layer: nothing pruned at step 0
    assert rec.kept[-1] < 0.5
    assert all(a >= b - 1e-9 for a, b in zip(rec.ratios, rec.ratios[1:], strict=False))
    wrapper.eval()
    with torch.no_grad():
        wrapper(torch.randn(2, 3, 8, 16, 16))
    assert float(wrapper.last_stats.mac_ratio().mean()) == pytest.approx(rec.ratios[-1])
    assert rec.ratios[-1] < 0.6


def test_budget_feedback_moves_the_offset_by_the_budget_error(tmp_path):
    """Each training batch moves the calibration offset by ``-gain x (batch ratio - budget)``:
    replayed from the ratios the batches really had; with the feedback the last batches run
    nearer the budget than without."""
    ends = {}
    for gain in (0.0, 2.0):
        torch.manual_seed(0)
        wrapper = DANCEWrapper(SmallNet(), budget=0.3, budget_feedback=gain, freeze_backbone=False)
        ratios = []
        step = wrapper._step

        def spy(batch, stage, batch_idx=None, wrapper=wrapper, ratios=ratios, step=step):
            before = float(wrapper.pruner.calibration)
            out = step(batch, stage, batch_idx)
            ratios.append((before, float(wrapper.pruner.last_stats.mac_ratio().mean())))
            return out

        wrapper._step = spy
        _trainer(tmp_path, max_steps=12, max_epochs=-1).fit(wrapper, _loader(16))
        offset = 0.0
        for before, ratio in ratios:
            assert before == pytest.approx(offset)
            offset -= gain * (ratio - 0.3)
        assert float(wrapper.pruner.calibration) == pytest.approx(offset)
        ends[gain] = abs(sum(r for _, r in ratios[-4:]) / 4 - 0.3)
    assert ends[2.0] < ends[0.0]


def test_calibrate_every_meets_the_training_budget_in_training(tmp_path):
    """With ``calibrate_every=2`` the keep decisions are calibrated on every other training
    batch to that step's training budget (the gradual schedule included), in eval mode and
    without gradients; the target budget is restored after each, and the offset reached meets
    the step's budget on its batch. Without it nothing is calibrated in training."""
    for every in (0, 2):
        torch.manual_seed(0)
        wrapper = DANCEWrapper(SmallNet(), budget=0.4, budget_warmup=0.5, calibrate_every=every,
                               freeze_backbone=False)  # fmt: skip
        calls = []
        calibrate = wrapper.pruner.calibrate

        def spy(clip, wrapper=wrapper, calls=calls, calibrate=calibrate, **kw):
            modes = (wrapper.training, wrapper.pruner.training, torch.is_grad_enabled())
            budget = float(wrapper.pruner.budget)
            calls.append((budget, calibrate(clip, **kw), modes))
            return calls[-1][1]

        wrapper.pruner.calibrate = spy
        _trainer(tmp_path, max_steps=8, max_epochs=-1).fit(wrapper, _loader(16))
        assert float(wrapper.pruner.budget) == pytest.approx(0.4)  # the target is restored
        assert wrapper.training  # and the training mode
        if not every:
            assert calls == [] and float(wrapper.pruner.calibration) == 0.0
            continue
        expected = [0.4 + 0.6 * (1 - s / 4) ** 3 for s in range(0, 8, 2)]
        expected = [
            min(b, 1.0) if s < 4 else 0.4 for b, s in zip(expected, range(0, 8, 2), strict=True)
        ]
        assert [c[0] for c in calls] == pytest.approx(expected)  # batches 0, 2, 4, 6
        assert all(c[2] == (False, False, False) for c in calls)  # eval masks, no gradients
        # the untrained controller's logits are nearly equal, so the ratio jumps in steps of
        # ~0.1 as the offset moves: the bisection lands on the step nearest the budget
        assert calls[0][1] > 0.9 > calls[1][1] > calls[2][1]
        for budget, reached, _ in calls[1:]:
            assert abs(reached - budget) < 0.15, calls


@pytest.mark.parametrize("freeze", [True, False])
def test_cosine_lr_schedule_decays_every_group(tmp_path, freeze):
    import math

    wrapper = DANCEWrapper(SmallNet(), lr=1e-2, lr_schedule="cosine", freeze_backbone=freeze)
    rec = _Recorder()
    rec.on_train_batch_end = lambda *a: None
    _trainer(tmp_path, max_steps=4, max_epochs=-1, callbacks=[rec]).fit(wrapper, _loader())
    cos = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx([1e-2 * c for c in cos])
    if not freeze:  # the backbone group (lr / 10) decays along the same curve
        assert [lrs[1] for lrs in rec.lrs] == pytest.approx([1e-3 * c for c in cos])
    with pytest.raises(ValueError, match="finite number of training steps"):
        _trainer(tmp_path, max_steps=-1, max_epochs=-1).fit(
            DANCEWrapper(SmallNet(), lr_schedule="cosine"), _loader()
        )


def test_factory_name_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        DANCEWrapper("tiny_c3d")


def test_budget_conditioned_controller_follows_the_budget(tmp_path):
    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget_range=(0.2, 0.9), dims=("channel",))
    clip = torch.randn(2, 3, 8, 16, 16)
    ratios = []
    wrapper.eval()
    for b in (0.2, 0.5, 0.9):
        wrapper.set_budget(b)
        wrapper(clip)
        ratios.append(float(wrapper.last_stats.mac_ratio().mean()))
    assert ratios[0] <= ratios[1] <= ratios[2]
    with pytest.warns(UserWarning, match="outside the range"):
        wrapper.set_budget(0.1)


@pytest.mark.slow
@pytest.mark.parametrize(("budget", "credit"), [(0.3, None), (0.6, None), (0.6, False)])
def test_budget_loss_and_calibration_meet_the_budget_on_synthetic_data(budget, credit):
    from lightning_dance.data import SyntheticVideoDataModule
    from lightning_dance.recipes import evaluate_dance, train_controller

    L.seed_everything(0)
    dm = SyntheticVideoDataModule(
        num_classes=4, frames=8, size=32, train_size=128, val_size=64, test_size=64,
        batch_size=16,
    )  # fmt: skip
    model = VideoClassifier("tiny_c3d", num_classes=4)
    wrapper = train_controller(model, dm, budget=budget, task="distill", epochs=4,
                               calibrate_batches=0, credit_outputs=credit)  # fmt: skip
    # an untrained controller keeps everything (init_keep=0.9 > 0.5 at eval: ratio 0.87 here, as
    # skipped padding taps of frame-masked layers are not counted); the budget loss
    # alone drives the hard-mask ratio down to the target's neighbourhood. It does not land on
    # it: straight-through gates of an over-pruned layer get vanishing gradients, and training
    # sees moving weights (measured with the full count: 0.13-0.35 for a 0.3 target, 0.55-0.62
    # for 0.6; with the default credited count 0.74 for 0.6)
    with wrapper.pruner.dense():
        dense = evaluate_dance(wrapper, dm, split="train")["mac_ratio"]
    trained = evaluate_dance(wrapper, dm, split="train")["mac_ratio"]
    slack = 0.1 if credit is False else 0.2  # the credited count lands further above
    assert trained < min(dense - 0.1, budget + slack), (dense, trained)
    # calibration on validation clips then meets the budget on held-out clips
    from lightning_dance.recipes import calibrate

    calibrate(wrapper, dm, batches=4)
    held_out = evaluate_dance(wrapper, dm, split="test")
    assert abs(held_out["mac_ratio"] - budget) < 0.05, held_out
    assert held_out["mac_ratio_p5"] < held_out["mac_ratio"] < held_out["mac_ratio_p95"]


@pytest.mark.parametrize("policy,multiple", [("threshold", 1), ("topk", 1), ("topk", 4)])
def test_compile_sparse_computes_what_the_masked_model_computes(policy, multiple):
    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget=0.4, policy=policy, channel_multiple=multiple)
    wrapper.eval()
    assert wrapper.pruner.channel_multiple == wrapper.hparams.channel_multiple == multiple
    clip = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():
        wrapper.pruner.calibrate(clip)  # real masks (an untrained controller keeps everything)
        masked = wrapper(clip)
        assert float(wrapper.last_stats.mac_ratio().mean()) < 0.6
        for layer in wrapper.last_stats.layers.values():
            kept = layer.masks["channel"].sum(1) if "channel" in layer.masks else None
            if multiple > 1 and kept is not None and layer.input_shape[0] > multiple:
                assert (kept % multiple == 0).all() or (kept == layer.input_shape[0]).all()
        wrapper.compile_sparse()
        assert wrapper.execution == "compact"
        fast = wrapper(clip)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    assert wrapper._compact.skip_outputs is True
    with torch.no_grad():
        assert not wrapper.compile_sparse(skip_outputs=False).skip_outputs
        torch.testing.assert_close(wrapper(clip), masked, rtol=1e-4, atol=1e-5)
    # the fast path is not part of the checkpoint
    assert not any("_compact" in k for k in wrapper.state_dict())


def test_compare_dense_times_both_paths_and_leaves_the_model_alone():
    from lightning_dance.execution import CompactPruner

    torch.manual_seed(0)
    wrapper = DANCEWrapper(SmallNet(), budget=0.4, policy="topk").eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    with torch.no_grad():
        before = wrapper(clip)
    timing = CompactPruner(wrapper.pruner).compare_dense(clip, repeats=2)
    assert set(timing) == {"dense_ms", "compact_ms", "speedup"}
    assert timing["dense_ms"] > 0 and timing["compact_ms"] > 0
    assert timing["speedup"] == timing["dense_ms"] / timing["compact_ms"]
    with torch.no_grad():
        torch.testing.assert_close(wrapper(clip), before)  # no routing left behind
        assert wrapper.last_stats is not None  # the masked path ran (hooks intact)
    # and against the dense model compiled (its fastest form on many CPUs)
    timing = CompactPruner(wrapper.pruner).compare_dense(clip, repeats=2, compiled=True)
    assert set(timing) == {"dense_ms", "compact_ms", "speedup", "dense_compiled_ms",
                           "speedup_compiled"}  # fmt: skip
    assert timing["speedup_compiled"] == timing["dense_compiled_ms"] / timing["compact_ms"]
    with torch.no_grad():
        torch.testing.assert_close(wrapper(clip), before)


@pytest.mark.parametrize("speedup", [0.6, 1.4])
def test_compile_sparse_warns_when_the_fast_path_is_slower(monkeypatch, speedup):
    """tune=True also times the whole fast path against the dense model: a user deploying a
    model that DANCE makes slower on their machine (X3D-XS on CPU) hears of it."""
    import warnings

    from lightning_dance.execution import CompactPruner

    timing = {"dense_ms": 10.0, "compact_ms": 10.0 / speedup, "speedup": speedup}
    monkeypatch.setattr(CompactPruner, "tune", lambda self, clip, **kw: {})
    monkeypatch.setattr(CompactPruner, "compare_dense", lambda self, clip, repeats=3: timing)
    wrapper = DANCEWrapper(SmallNet(), budget=0.4, policy="topk").eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    if speedup < 1:
        with pytest.warns(UserWarning, match=r"slower than the dense model.*0\.60x"):
            wrapper.compile_sparse(clip, tune=True)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*slower than the dense model")
            wrapper.compile_sparse(clip, tune=True)
    assert wrapper.execution == "compact"  # the fast path is used either way (same outputs)


@pytest.mark.parametrize("tuned_ms, chosen", [(5.0, "tuned"), (9.0, "index plan")])
def test_compile_sparse_keeps_the_faster_of_tuned_and_index_plan(monkeypatch, tuned_ms, chosen):
    """Tunings switch a pruner to the general plan: compile_sparse(tune=True) times the untuned
    index plan too (batch 1) and keeps whichever is faster."""
    from lightning_dance.execution import CompactPruner

    def compare(self, clip, repeats=3):
        ms = tuned_ms if self.tunings else 7.0
        return {"dense_ms": 10.0, "compact_ms": ms, "speedup": 10.0 / ms}

    monkeypatch.setattr(CompactPruner, "compare_dense", compare)
    wrapper = DANCEWrapper(SmallNet(), budget=0.4, policy="topk", dims=("channel",)).eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    fast = wrapper.compile_sparse(clip, tune=True)
    assert bool(fast.tunings) == (chosen == "tuned")
    with torch.no_grad():
        torch.testing.assert_close(wrapper(clip), wrapper.pruner(clip), rtol=1e-4, atol=1e-5)
    other = DANCEWrapper(SmallNet(), budget=0.4, policy="topk").eval()  # all dims: an index
    assert bool(other.compile_sparse(clip, tune=True).tunings) == (chosen == "tuned")  # plan too
    batch = torch.randn(2, 3, 8, 16, 16)  # no index plan for a batch: the tuned plan
    assert other.compile_sparse(batch, tune=True).tunings


def test_execution_argument_is_checked():
    with pytest.raises(ValueError, match="execution"):
        DANCEWrapper(SmallNet(), execution="sparse")
    with pytest.raises(ValueError, match="example clip"):
        DANCEWrapper(SmallNet()).compile_sparse(tune=True)
