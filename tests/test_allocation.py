"""Sharing a training batch's MAC budget by clip difficulty (``difficulty_spread``)."""

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import SmallNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.allocation import clip_difficulty, difficulty_targets
from lightning_dance.losses import budget_loss, distillation_loss
from lightning_dance.stats import LayerStats, PruningStats
from lightning_dance.wrapper import DANCEWrapper


def test_targets_by_rank_average_the_budget():
    hard = torch.tensor([3.0, 0.2, 1.0, 7.0])  # ranks 2, 0, 1, 3 of 3
    got = difficulty_targets(0.4, hard, spread=0.3)
    want = [0.4 * (1 + 0.3 * (2 * r / 3 - 1)) for r in (2, 0, 1, 3)]
    assert got.tolist() == pytest.approx(want)
    assert float(got.mean()) == pytest.approx(0.4)
    assert got.argsort().tolist() == hard.argsort().tolist()  # more for the harder clip


def test_targets_edge_cases():
    assert difficulty_targets(0.3, torch.tensor([5.0]), 0.5).tolist() == pytest.approx([0.3])
    assert difficulty_targets(0.3, torch.rand(4), 0.0).tolist() == pytest.approx([0.3] * 4)
    assert difficulty_targets(0.3, torch.empty(0), 0.5).numel() == 0
    capped = difficulty_targets(0.9, torch.tensor([0.0, 1.0]), 0.5)
    assert capped.tolist() == pytest.approx([0.45, 1.0])  # 1.35 capped at dense
    with pytest.raises(ValueError, match="spread must be in"):
        difficulty_targets(0.3, torch.rand(4), 1.0)
    with pytest.raises(ValueError, match=r"one value per clip \[N\]"):
        difficulty_targets(0.3, torch.rand(4, 2), 0.5)


def test_clip_difficulty_is_the_per_clip_task_loss():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    ce = clip_difficulty(logits, labels)
    assert ce.tolist() == pytest.approx([float(F.cross_entropy(lo[None], y[None]))
                                         for lo, y in zip(logits, labels, strict=True)])  # fmt: skip
    kl = clip_difficulty(logits, teacher=teacher, temperature=3.0)
    assert float(kl.mean()) == pytest.approx(float(distillation_loss(logits, teacher, 3.0)))
    batchmean = F.kl_div(torch.log_softmax(logits / 3, -1), torch.softmax(teacher / 3, -1),
                         reduction="batchmean") * 9  # fmt: skip
    assert float(kl.mean()) == pytest.approx(float(batchmean))  # torch's own reduction
    both = clip_difficulty(logits, labels, teacher, temperature=3.0)
    assert both.tolist() == pytest.approx((ce + kl).tolist())
    assert not clip_difficulty(logits.requires_grad_(), labels).requires_grad
    with pytest.raises(ValueError, match="needs labels or teacher"):
        clip_difficulty(logits)


def _stats():
    stats = PruningStats(dense_total=100)
    stats.layers["conv"] = LayerStats((4, 2, 2, 2), 60, torch.tensor([10, 40]),
                                      torch.tensor([10.0, 40.0]), {})  # fmt: skip
    return stats  # per-clip ratios 0.5 and 0.8 (40 fixed MACs)


def test_budget_loss_with_per_clip_targets():
    plain = budget_loss(_stats(), 0.65)
    assert float(plain["budget"]) == pytest.approx(0.0)  # the mean meets the budget
    shared = budget_loss(_stats(), 0.65, targets=torch.tensor([0.4, 0.9]))
    assert float(shared["ratio"]) == pytest.approx(0.65)
    assert float(shared["budget"]) == pytest.approx((0.1**2 + 0.1**2) / 2)
    with pytest.raises(ValueError, match="one MAC ratio per clip"):
        budget_loss(_stats(), 0.65, targets=torch.tensor([0.4, 0.9, 0.1]))


def test_wrapper_rejects_a_bad_spread():
    with pytest.raises(ValueError, match="difficulty_spread must be in"):
        DANCEWrapper(SmallNet(), difficulty_spread=1.5)


def test_wrapper_trains_each_clip_toward_its_own_target():
    """The logged budget loss of one training batch equals ``budget_weight`` times the mean
    squared gap between each clip's expected MAC ratio and its target, computed here from the
    step's own logits and statistics (captured by a forward hook)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(16, 3, 8, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    )
    wrapper = DANCEWrapper(SmallNet(), budget=0.5, task="labels", difficulty_spread=0.6)
    seen = {}

    def grab(module, args, out):
        stats = module.last_stats
        seen["logits"] = out.detach()
        seen["ratio"] = (stats.expected_macs() / stats.dense_total).detach()

    wrapper.pruner.register_forward_hook(grab)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(wrapper, DataLoader(data, batch_size=16))
    labels = data.tensors[1]
    ce = [
        float(F.cross_entropy(lo[None], y[None]))
        for lo, y in zip(seen["logits"], labels, strict=True)
    ]
    order = sorted(range(16), key=ce.__getitem__)
    target = torch.empty(16)
    for rank, i in enumerate(order):
        target[i] = 0.5 * (1 + 0.6 * (2 * rank / 15 - 1))
    gap = float(((seen["ratio"] - target) ** 2).mean())
    logged = float(trainer.callback_metrics["dance/train_loss_budget"])
    assert logged == pytest.approx(10.0 * gap, rel=1e-4)
    assert logged != pytest.approx(10.0 * float((seen["ratio"].mean() - 0.5) ** 2), rel=1e-2)
