"""A network handed over in eval mode trains as a network: Lightning keeps each submodule's own
eval flag through ``fit``, so ``VideoClassifier`` and ``DANCEWrapper`` switch it at fit start
(with a warning), except a backbone the wrapper freezes on purpose.

Reference: the BatchNorm running statistics (they change only in train mode) and the mode seen
inside the training steps.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lightning_dance import DANCEWrapper, VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.models import create_model


class _Spy(L.Callback):
    def __init__(self, bn: torch.nn.Module) -> None:
        self.bn, self.seen = bn, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(self.bn.training)


def _fit(module: L.LightningModule, bn: torch.nn.Module) -> tuple[list[bool], list[str]]:
    dm = SyntheticVideoDataModule(num_classes=4, frames=4, size=16, train_size=16, val_size=8,
                                  test_size=8, batch_size=8)  # fmt: skip
    spy = _Spy(bn)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[spy])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    return spy.seen, [str(w.message) for w in caught if "switched to train mode" in str(w.message)]


def _net() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    net = create_model("tiny_c3d", num_classes=4).eval()
    return net, next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))


@pytest.mark.parametrize("kind", ["classifier", "wrapper"])
def test_a_model_in_eval_mode_is_trained_in_train_mode(kind):
    net, bn = _net()
    before = bn.running_mean.clone()
    module = (VideoClassifier(net, num_classes=4) if kind == "classifier"
              else DANCEWrapper(net, budget=0.5, freeze_backbone=False))  # fmt: skip
    seen, said = _fit(module, bn)
    assert seen == [True, True]
    assert not torch.equal(bn.running_mean, before)  # the statistics trained
    assert len(said) == 1 and "eval mode" in said[0]


def test_a_frozen_backbone_stays_frozen_and_nothing_is_said():
    net, bn = _net()
    before = bn.running_mean.clone()
    wrapper = DANCEWrapper(net, budget=0.5)  # threshold: the controller alone trains
    assert wrapper.freeze_backbone
    seen, said = _fit(wrapper, bn)
    assert seen == [False, False] and torch.equal(bn.running_mean, before) and said == []


def test_a_wrapper_put_in_eval_mode_trains_its_controller_stochastically():
    net, _ = _net()
    wrapper = DANCEWrapper(net, budget=0.5).eval()  # e.g. after calibrating it
    seen, said = _fit(wrapper, wrapper.pruner)
    assert seen == [True, True] and len(said) == 1 and "freeze_backbone=True" in said[0]
