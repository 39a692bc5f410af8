"""Interrupted and resumed fits reach the weights of an uninterrupted fit.

A fit with ``max_steps=TOTAL`` is interrupted (an exception from a callback) after ``STOP``
steps, when ``ModelCheckpoint(save_last=True)`` has written ``last.ckpt``; a new Trainer resumes
it with ``ckpt_path``. What has to carry over: the optimizer and LR scheduler (Lightning), the
AVA warm-up step (``AVACallback.state_dict``), the wrapper's step-dependent schedules (noise,
budget warm-up: they read ``global_step``) and the gates' noise stream (the pruner's own
generator, saved in the checkpoint: the global RNG is not, and the data loader draws from it).

Limits (Lightning's, not the package's): the interruption is at an epoch boundary; mid-epoch
resumption needs a resumable data loader (Lightning warns), and a shuffling sampler draws its
order from the global RNG, which Lightning does not checkpoint. Hence ``shuffle=False`` here.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SmallNet
from lightning.pytorch.callbacks import ModelCheckpoint
from test_ava import LitTiny, make_data, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.ava_callback import AVACallback
from lightning_dance.wrapper import DANCEWrapper

TOTAL, STOP = 7, 4  # 4 batches per epoch: interrupted after the first epoch


class _Interrupt(Exception):
    pass


class _InterruptAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:  # the checkpoint of step `step` is written
            raise _Interrupt


def _fit(make_module, make_callbacks, loader, tmp_path: Path) -> tuple[L.LightningModule, ...]:
    """(uninterrupted, resumed) modules after TOTAL steps from the same seed."""
    kw = dict(max_steps=TOTAL, deterministic=True)
    L.seed_everything(0)
    straight = make_module()
    make_trainer(callbacks=make_callbacks(), **kw).fit(straight, loader())

    L.seed_everything(0)
    first = make_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=STOP, save_last=True)
    trainer = make_trainer(
        callbacks=[*make_callbacks(), ckpt, _InterruptAt(STOP)], enable_checkpointing=True, **kw
    )
    with pytest.raises(_Interrupt):
        trainer.fit(first, loader())
    assert trainer.global_step == STOP

    L.seed_everything(1)  # whatever the global RNG holds when the job restarts
    resumed = make_module()
    make_trainer(callbacks=make_callbacks(), **kw).fit(
        resumed, loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    return straight, resumed


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module) -> None:
    moved = 0.0
    for (name, p), q, s in zip(
        a.named_parameters(), b.parameters(), start.parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (p - s).abs().max().item())
    assert moved > 1e-3  # training did move the parameters that are compared


def test_ava_resume_matches_an_uninterrupted_fit(tmp_path) -> None:
    def module():
        return LitTiny(lr=0.5)

    def callbacks():
        return [AVACallback(weight=1.0, warmup_steps=6)]  # the warm-up spans the interruption

    straight, resumed = _fit(module, callbacks, lambda: DataLoader(make_data(8), 2), tmp_path)
    L.seed_everything(0)
    _assert_same(straight, resumed, module())


@pytest.mark.parametrize(
    "kw",
    [
        dict(budget_warmup=0.5, lr_schedule="cosine"),  # threshold gates with noise
        dict(budget_range=(0.3, 0.8), policy="topk"),  # sampled budgets, topk noise
    ],
)
def test_dance_resume_matches_an_uninterrupted_fit(tmp_path, kw) -> None:
    def module():
        return DANCEWrapper(SmallNet(), lr=1e-2, noise_anneal=1.0, **kw)

    def loader():
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 3, 4, 16, 16, generator=g), torch.arange(16) % 4)
        return DataLoader(data, batch_size=4)

    straight, resumed = _fit(module, list, loader, tmp_path)
    L.seed_everything(0)
    _assert_same(straight, resumed, module())
