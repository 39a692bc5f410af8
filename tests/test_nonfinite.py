"""NaN / inf in training batches: AVACallback and DANCEWrapper stop (or skip) before the step."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import SmallNet
from test_ava import LitManual, LitTiny, make_data, make_trainer, no_hooks
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.ava_callback import AVACallback
from lightning_dance.nonfinite import NonFiniteError, check_nonfinite_mode, nonfinite_parts
from lightning_dance.wrapper import DANCEWrapper


def _with_nan(ds: TensorDataset, batch: int, batch_size: int) -> TensorDataset:
    """The same data with one NaN in the first clip of batch ``batch`` (unshuffled loader)."""
    x, *rest = (t.clone() for t in ds.tensors)
    x[batch * batch_size, 0, 0, 0, 0] = float("nan")
    return TensorDataset(x, *rest)


class _Snapshots(L.Callback):
    """The trainable parameters at the start of each training batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[batch_idx] = _params(pl_module)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _assert_params_equal(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = _params(module)
    assert now.keys() == expected.keys()
    for name, value in now.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


class LitBlowUp(LitTiny):
    """``what="loss"``: the task loss becomes inf at batch ``at``; ``what="penalty"``: an extra
    forward pass on an inf clip makes the recorded activations (the AVA penalty) non-finite
    while the returned loss stays finite."""

    def __init__(self, at: int, what: str = "loss") -> None:
        super().__init__()
        self.at, self.what = at, what

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == self.at and self.what == "penalty":
            self.net(torch.full_like(x, float("inf")))
        loss = F.cross_entropy(self.net(x), y)
        if batch_idx == self.at and self.what == "loss":
            loss = loss * float("inf")
        return loss


def test_mode_is_validated_and_batches_searched() -> None:
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        check_nonfinite_mode("ignore")
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        AVACallback(on_nonfinite="warn")
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        DANCEWrapper(SmallNet(), on_nonfinite=None)
    bad = torch.zeros(2, 2)
    bad[1, 1] = float("inf")
    batch = {"video": bad, "label": torch.zeros(2, dtype=torch.long), "meta": [torch.ones(1)]}
    assert nonfinite_parts(batch) == ["batch['video']"]
    assert nonfinite_parts((torch.full((3,), 3e38), torch.ones(2))) == []  # sum overflows only


# ----------------------------------------------------------------------------- AVA


@pytest.mark.parametrize(
    "model,what",
    [
        (LitTiny(), r"input clip \(batch\[0\]\)"),
        (LitBlowUp(at=2, what="loss"), "task loss"),
        (LitBlowUp(at=2, what="penalty"), "AVA penalty"),
    ],
)
def test_ava_raises_naming_the_batch_before_the_step(model, what) -> None:
    data = _with_nan(make_data(8), 2, 2) if type(model) is LitTiny else make_data(8)
    snaps = _Snapshots()
    trainer = make_trainer(max_epochs=1, callbacks=[AVACallback(weight=0.7), snaps])
    with pytest.raises(NonFiniteError, match=rf"non-finite {what}.* training batch 2 "):
        trainer.fit(model, DataLoader(data, batch_size=2))
    _assert_params_equal(model, snaps.before[2])  # batches 0, 1 applied; batch 2 not
    assert no_hooks(model) and "training_step" not in model.__dict__


@pytest.mark.parametrize("source", ["input", "loss"])
def test_ava_skip_mode_trains_as_if_the_batch_were_absent(source) -> None:
    torch.manual_seed(0)
    model = LitTiny() if source == "input" else LitBlowUp(at=1, what="loss")
    reference = LitTiny()
    reference.load_state_dict(model.state_dict())
    data = make_data(8)
    ava = AVACallback(weight=0.7, warmup_steps=0, on_nonfinite="skip")
    trainer = make_trainer(max_epochs=1, callbacks=[ava])
    loader = DataLoader(_with_nan(data, 1, 2) if source == "input" else data, batch_size=2)
    with pytest.warns(UserWarning, match="skipped training batch 1 .*non-finite"):
        trainer.fit(model, loader)
    assert ava.skipped_batches == 1 and ava.state_dict()["skipped_batches"] == 1
    assert trainer.callback_metrics["ava/skipped_batches"].item() == 1.0
    # SGD without momentum: skipping batch 1 == training on batches 0, 2, 3 only
    kept = TensorDataset(*(torch.cat([t[:2], t[4:]]) for t in data.tensors))
    make_trainer(max_epochs=1, callbacks=[AVACallback(weight=0.7, warmup_steps=0)]).fit(
        reference, DataLoader(kept, batch_size=2)
    )
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    restored = AVACallback()
    restored.load_state_dict(ava.state_dict())
    assert restored.skipped_batches == 1


class LitManualPenaltyNaN(LitManual):
    """Manual optimization whose penalty is non-finite at batch 1 (extra forward on inf)."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            self.net(torch.full_like(batch[0], float("inf")))
        return super().training_step(batch, batch_idx)


def test_ava_manual_optimization_skips_inputs_and_raises_on_the_penalty() -> None:
    """Under manual optimization the user's step runs the optimizer: a non-finite input is
    caught before it runs (skippable), a non-finite penalty raises even in skip mode."""
    torch.manual_seed(0)
    model = LitManual()
    ava = AVACallback(weight=0.7, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="skipped training batch 2 .*input clip"):
        make_trainer(max_epochs=1, callbacks=[ava]).fit(
            model, DataLoader(_with_nan(make_data(8), 2, 2), batch_size=2)
        )
    assert ava.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model, snaps = LitManualPenaltyNaN(), _Snapshots()
    ava = AVACallback(weight=0.7, on_nonfinite="skip")
    with pytest.raises(NonFiniteError, match="AVA penalty .*batch 1 .*cannot be skipped"):
        make_trainer(max_epochs=1, callbacks=[ava, snaps]).fit(
            model, DataLoader(make_data(8), batch_size=2)
        )
    _assert_params_equal(model, snaps.before[1])
    assert no_hooks(model) and "training_step" not in model.__dict__


# ----------------------------------------------------------------------------- DANCEWrapper


class _BlowUpNet(SmallNet):
    scale = 1.0

    def forward(self, x):
        return super().forward(x) * self.scale


class _BlowUpAt(L.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.model.scale = float("inf") if batch_idx == self.at else 1.0


def _clips(n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, 16, 16, generator=g), torch.arange(n) % 4)


def _dance_trainer(tmp_path, callbacks) -> L.Trainer:
    return make_trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path)


@pytest.mark.parametrize("source,what", [("input", "input clip"), ("model", "task loss")])
def test_dance_raises_naming_the_batch_before_the_step(tmp_path, source, what) -> None:
    torch.manual_seed(0)
    wrapper = DANCEWrapper(_BlowUpNet(), budget=0.5, lr=1e-2)
    snaps = _Snapshots()
    data = _with_nan(_clips(), 1, 4) if source == "input" else _clips()
    callbacks = [snaps] + ([_BlowUpAt(1)] if source == "model" else [])
    with pytest.raises(NonFiniteError, match=rf"DANCEWrapper: non-finite {what}.* batch 1 "):
        _dance_trainer(tmp_path, callbacks).fit(wrapper, DataLoader(data, batch_size=4))
    assert not torch.equal(snaps.before[0]["pruner.controller.trunk.1.weight"],
                           snaps.before[1]["pruner.controller.trunk.1.weight"])  # fmt: skip
    _assert_params_equal(wrapper, snaps.before[1])


@pytest.mark.parametrize("source", ["input", "model"])
def test_dance_skip_mode_finishes_finite_and_counts(tmp_path, source) -> None:
    torch.manual_seed(0)
    wrapper = DANCEWrapper(_BlowUpNet(), budget=0.5, lr=1e-2, on_nonfinite="skip")
    data = _with_nan(_clips(), 1, 4) if source == "input" else _clips()
    callbacks = [_BlowUpAt(1)] if source == "model" else []
    trainer = _dance_trainer(tmp_path, callbacks)
    with pytest.warns(UserWarning, match="skipped training batch 1 "):
        trainer.fit(wrapper, DataLoader(data, batch_size=4))
    assert all(torch.isfinite(p).all() for p in wrapper.parameters())
    assert wrapper.skipped_batches == 1
    assert trainer.callback_metrics["dance/skipped_batches"].item() == 1.0
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    restored = DANCEWrapper.load_from_checkpoint(tmp_path / "s.ckpt", model=_BlowUpNet())
    assert restored.skipped_batches == 1 and restored.hparams.on_nonfinite == "skip"


def test_dance_copy_keeps_the_guard() -> None:
    wrapper = DANCEWrapper(SmallNet(), on_nonfinite="skip")
    assert copy.deepcopy(wrapper)._guard.mode == "skip"


class _NanGradAt(L.Callback):
    """From batch ``at`` on, the gradient of one trainable parameter is NaN while the loss stays
    finite (as PyTorch's bf16 conv3d backward on CPU sporadically does)."""

    def __init__(self, at: int) -> None:
        self.at, self.handle = at, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at and self.handle is None:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            self.handle = param.register_hook(lambda g: g * float("nan"))

    def on_train_batch_end(self, *args) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


@pytest.mark.parametrize("owner", ["ava", "dance"])
def test_nonfinite_gradients_stop_or_skip_the_step(tmp_path, owner) -> None:
    """A finite loss with NaN gradients: ``raise`` stops before the optimizer step (weights as
    before that batch); ``skip`` drops the step (weights finite, the batch counted)."""
    for mode in ("raise", "skip"):
        torch.manual_seed(0)
        snaps = _Snapshots()
        if owner == "ava":
            module, ava = LitTiny(), AVACallback(warmup_steps=0, on_nonfinite=mode)
            callbacks, data = [snaps, _NanGradAt(1), ava], DataLoader(make_data(12), batch_size=4)
            guard = ava
        else:
            module = DANCEWrapper(SmallNet(), budget=0.5, lr=1e-2, on_nonfinite=mode)
            callbacks, data = [snaps, _NanGradAt(1)], DataLoader(_clips(), batch_size=4)
            guard = module
        trainer = make_trainer(max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path)
        if mode == "raise":
            with pytest.raises(NonFiniteError, match=r"non-finite gradients \(.*step 1"):
                trainer.fit(module, data)
            _assert_params_equal(module, snaps.before[1])
        else:
            trainer.fit(module, data)
            assert guard.skipped_batches == 1
            for name, value in snaps.before[1].items():  # batch 1 changed nothing
                torch.testing.assert_close(snaps.before[2][name], value, rtol=0, atol=0)
            assert all(torch.isfinite(p).all() for p in module.parameters())
