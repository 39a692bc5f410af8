"""The DATE'20 attention policy (seed 004) and its training phase, targeted dropout: decisions from
each layer's own input, budget, accounting, masked = compact, and the callback's mechanics."""

import math

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SmallNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance import SyntheticVideoDataModule, TargetedDropoutCallback
from lightning_dance.aap import AdaptivePruner
from lightning_dance.decision import LayerInputError
from lightning_dance.errors import DanceError
from lightning_dance.execution import CompactPruner
from lightning_dance.export.modes import build_export_module
from lightning_dance.layers import NoConv3dError
from lightning_dance.models import create_model
from lightning_dance.policies import AttentionPolicy, get_policy
from lightning_dance.recipes import calibrate, evaluate_dance, train_controller
from lightning_dance.report import MacReport
from lightning_dance.wrapper import DANCEWrapper

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip


def _inputs(pruner, clip):
    """Each instrumented layer's input before the pruner masks it (hooks run in order of
    registration, the pruner's only inside its forward). The pruner is not reused after."""
    seen = {}
    for n in pruner.layer_names:
        pruner.model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.update({n: a[0].clone()})  # returns None: input unchanged
        )
    with torch.no_grad():
        pruner(clip)
    return seen


def test_scores_are_the_attention_of_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6)
    scores = AttentionPolicy().layer_scores(x, ("frame", "channel", "feature"), grid=2)
    a = x.abs()
    torch.testing.assert_close(scores["channel"], a.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(scores["frame"], a.mean(dim=(1, 3, 4)))
    columns = a.mean(dim=(1, 2))  # [N, 5, 6]
    expect = torch.zeros(2, 2, 2)
    for i in range(2):  # rows 0-2 | 3-4 and cols 0-2 | 3-5: the blocks expand_blocks tiles
        for j in range(2):
            rows = [r for r in range(5) if r * 2 // 5 == i]
            cols = [c for c in range(6) if c * 2 // 6 == j]
            expect[:, i, j] = columns[:, rows][:, :, cols].mean(dim=(1, 2))
    torch.testing.assert_close(scores["feature"], expect)
    assert list(scores) == ["frame", "channel", "feature"]
    # one pass for (C, T) + 2 * C*T second reductions; one pass for (H, W) + the block pooling
    macs = AttentionPolicy().scoring_macs((3, 4, 5, 6), ("frame", "channel", "feature"), grid=2)
    assert macs == 360 + 2 * 12 + 360 + (2 * 5 * 6 + 2 * 6 * 2)


def test_masks_keep_the_most_attended_units_of_each_layers_own_input(small_net, clip):
    pruner = AdaptivePruner(small_net, policy="attention", budget=0.5).eval()
    assert pruner.policy == "attention" and isinstance(pruner.policy, AttentionPolicy)
    assert not list(pruner.controller.parameters())  # no controller: nothing read from the stem
    inputs = _inputs(pruner, clip)
    with torch.no_grad():
        pruner(clip)
    for name, stats in pruner.last_stats.layers.items():
        x = inputs[name]
        for dim, reduce in (("channel", (2, 3, 4)), ("frame", (1, 3, 4))):
            attention = x.abs().mean(dim=reduce)
            k = pruner.topk_count(dim, attention.shape[1], name)
            expect = torch.zeros_like(attention)
            expect.scatter_(1, attention.topk(k, dim=1).indices, 1.0)
            torch.testing.assert_close(stats.masks[dim], expect)
    # the decisions follow the layer's input: other inputs to the same layer, other masks
    masks = [s.masks["channel"] for s in pruner.last_stats.layers.values()]
    assert any(not torch.equal(m[0], m[1]) for m in masks)


@pytest.mark.parametrize("dims", [("frame", "channel", "feature"), ("channel",)])
def test_masked_and_compact_outputs_equal(small_net, clip, dims):
    pruner = AdaptivePruner(small_net, dims=dims, policy="attention", budget=0.4).eval()
    assert pruner.output_chains() == {}  # a consumer decides from its input: no look-ahead
    with torch.no_grad():
        for batch in (clip, clip[:1]):  # batch 1 of channels: not the controller's index plan
            masked = pruner(batch)
            ratio = pruner.last_stats.mac_ratio()
            assert float(ratio.max()) < 0.8  # really pruned
            fast = CompactPruner(pruner)(batch)
            torch.testing.assert_close(fast, masked, atol=1e-4, rtol=1e-4)


def test_executed_macs_count_the_attention(small_net, clip):
    dims = ("channel", "feature")
    pruner = AdaptivePruner(small_net, dims=dims, policy="attention", budget=0.5).eval()
    with torch.no_grad():
        pruner(clip)
    stats = pruner.last_stats
    policy = AttentionPolicy()
    by_hand = 0
    for s in stats.layers.values():
        c, t, h, w = s.input_shape
        gh, gw = min(4, h), min(4, w)
        by_hand += c * t * h * w + c * t + c * t * h * w + gh * h * w + gh * w * gw
        assert policy.scoring_macs(s.input_shape, dims, 4) > 0
    assert stats.controller_macs == by_hand > 0
    layers = sum(s.executed_macs for s in stats.layers.values())
    assert torch.equal(stats.executed_macs(), layers + stats.fixed_macs + by_hand)
    report = MacReport.for_pruner(pruner, clip)
    assert report.controller_macs == by_hand


def test_training_gate_is_targeted_dropout():
    policy = AttentionPolicy(drop_rate=0.25)
    scores = torch.arange(8.0).repeat(4000, 1)  # entry 7 ranks highest
    gen = torch.Generator().manual_seed(0)
    mask = policy.gate(scores, training=True, k=3, generator=gen)
    assert torch.equal(mask[:, 5:], torch.ones(4000, 3))  # the top-k are never dropped
    dropped = 1 - mask[:, :5].mean(0)  # each candidate dropped with probability 0.25
    assert torch.all((dropped - 0.25).abs() < 0.03), dropped
    assert torch.equal(policy.gate(scores, training=True, k=3, noise=0.0), policy.gate(
        scores, training=False, k=3))  # noise 0: the eval pruning  # fmt: skip
    half = policy.gate(scores, training=True, k=3, noise=0.5, generator=gen)
    assert abs(float(1 - half[:, :5].mean()) - (1 - 0.75 * 0.5)) < 0.03
    with pytest.raises(ValueError, match="drop_rate must be in"):
        AttentionPolicy(drop_rate=1.5)
    with pytest.raises(ValueError, match="needs the number of entries"):
        policy.gate(scores, training=False)


def test_pruner_and_wrapper_arguments_that_cannot_apply(small_net, clip):
    for kwargs in ({"budget_conditioned": True}, {"credit_outputs": True}):
        with pytest.raises(ValueError, match="without a controller"):
            AdaptivePruner(small_net, policy="attention", **kwargs)
    pruner = AdaptivePruner(small_net, policy="attention").eval()
    with torch.no_grad():
        pruner(clip)
        plan = pruner.decide(pruner.model.get_submodule(pruner.stem_name)(clip))
    name, stats = next(iter(pruner.last_stats.layers.items()))
    with pytest.raises(LayerInputError, match="pass it as inputs="):
        plan.masks(name, stats.input_shape)
    with pytest.raises(DanceError, match="export mode='dense'"):
        build_export_module(pruner, "masked", clip)
    with pytest.raises(RuntimeError, match="scores each layer from that layer's input"):
        pruner.controller.layer_logits(None, name, stats.input_shape)
    wrapper = DANCEWrapper(SmallNet(), policy="attention")
    assert not wrapper.freeze_backbone  # its training phase fine-tunes the backbone
    assert DANCEWrapper(SmallNet(), policy="topk").freeze_backbone
    frozen = DANCEWrapper(SmallNet(), policy="attention", freeze_backbone=True)
    with pytest.raises(DanceError, match="nothing to train"):
        frozen.configure_optimizers()


def test_meets_its_budget_after_calibration_on_synthetic_data(tmp_path):
    torch.manual_seed(0)
    dm = SyntheticVideoDataModule(num_classes=4, frames=4, size=16, train_size=16, val_size=8,
                                  test_size=8, batch_size=8)  # fmt: skip
    dense = create_model("tiny_c3d", num_classes=4)
    # the paper's channels and columns (frames too: 2-frame layers keep 1 or 2, a step as
    # coarse as the tolerance, for any fixed-share policy, topk included)
    wrapper = train_controller(dense, dm, budget=0.5, policy="attention", epochs=None,
                               max_steps=2, calibrate_batches=1, dims=("channel", "feature"))  # fmt: skip
    assert not wrapper.freeze_backbone
    assert abs(evaluate_dance(wrapper, dm)["mac_ratio"] - 0.5) < 0.05
    for budget in (0.3, 0.7):
        wrapper.pruner.set_budget(budget)
        calibrate(wrapper, dm, 1)
        assert abs(evaluate_dance(wrapper, dm)["mac_ratio"] - budget) < 0.05


# ---------------------------------------------------------------------- targeted dropout
C, H = 8, 4  # the probe's input: channel c has magnitude c + 1; block (i, j) a weight 1 + 2i + j


class KnownNet(L.LightningModule):
    """The stem runs on the clip; the probe conv reads a fixed input with known attention and
    records what reaches it (after any pre-hook)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.stem = nn.Conv3d(3, 4, 1)
        self.probe = nn.Conv3d(C, 2, 1)
        self.head = nn.Linear(2, 2)
        blocks = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0)
        blocks = blocks.repeat_interleave(2, 1)  # [4, 4]: 2x2 blocks of 2x2 positions
        known = torch.arange(1.0, C + 1).view(C, 1, 1, 1) * blocks.view(1, 1, H, H)
        self.register_buffer("known", known.expand(C, 2, H, H).clone())
        self.seen: list[torch.Tensor] = []  # the probe's inputs in training mode
        self.evaluated: list[torch.Tensor] = []  # and in eval mode
        self.fail_at = fail_at
        self.probe.register_forward_hook(
            lambda m, a, out: (self.seen if m.training else self.evaluated).append(a[0].detach())
        )

    def forward(self, clip):
        s = self.stem(clip).mean()
        x = self.known.expand(clip.shape[0], -1, -1, -1, -1) + 0 * s
        return self.head(self.probe(x).mean(dim=(2, 3, 4)))

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")
        clip, label = batch
        return F.cross_entropy(self(clip), label)

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n=64):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 2, H, H), torch.randint(0, 2, (n,)))
    return DataLoader(data, batch_size=8)


def test_targeted_dropout_drops_the_lowest_ranked_units_at_the_rate(tmp_path):
    torch.manual_seed(0)
    net = KnownNet()
    cb = TargetedDropoutCallback(rate=0.5, fraction=0.5, grid=2)
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], default_root_dir=tmp_path, **QUIET)
    trainer.fit(net, _loader(), _loader(8))
    assert cb.layer_names == ["probe"] and cb.step == 24
    assert len(net.seen) == 24 and len(net.evaluated) == 3  # a validation batch per epoch
    for val in net.evaluated:  # validation runs the network untouched
        torch.testing.assert_close(val, net.known.expand(8, -1, -1, -1, -1))
    x = torch.cat(net.seen)  # [N, C, T, H, W], N = 192
    top = x[:, :, :, 2:, :]  # the blocks of weights 3, 4: never candidates
    channel_kept = top.abs().sum(dim=(2, 3, 4)) > 0  # [N, C]
    low = x[:, C // 2 :]  # the channels of magnitudes 5-8: never candidates
    block_kept = torch.stack(
        [low[:, :, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].abs().sum(dim=(1, 2, 3, 4)) > 0
         for i in range(2) for j in range(2)], dim=1)  # fmt: skip
    assert channel_kept[:, C // 2 :].all() and block_kept[:, 2:].all()
    n = x.shape[0]
    tol = 4 * math.sqrt(0.25 / n)  # four standard deviations of a binomial share
    for kept in (channel_kept[:, : C // 2], block_kept[:, :2]):
        dropped = 1 - kept.float().mean(0)
        assert torch.all((dropped - 0.5).abs() < tol), dropped
    logged = trainer.callback_metrics
    assert abs(float(logged["targeted_dropout/dropped_channel"]) - 0.25) < 0.2
    assert "targeted_dropout/dropped_feature" in logged


def test_the_callback_restores_the_module_after_fit_and_after_an_exception(tmp_path):
    torch.manual_seed(0)
    for fail_at in (None, 2):
        net = KnownNet(fail_at=fail_at)
        cb = TargetedDropoutCallback(rate=1.0, fraction=0.5, warmup_steps=4)
        trainer = L.Trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path, **QUIET)
        if fail_at is None:
            trainer.fit(net, _loader(16))
        else:
            with pytest.raises(RuntimeError, match="boom"):
                trainer.fit(net, _loader(32))
        assert cb.step == 2
        assert not net.probe._forward_pre_hooks and not net.stem._forward_pre_hooks
        net.train().seen.clear()
        net(torch.randn(2, 3, 2, H, H))  # in train mode, outside a fit: the plain network
        torch.testing.assert_close(net.seen[0], net.known.expand(2, -1, -1, -1, -1))
    assert cb.fraction_at(cb.step) == 0.25  # the ramp continues from the steps taken


def test_callback_state_round_trips_and_arguments_are_checked():
    x = torch.rand(4, C, 2, H, H)
    torch.manual_seed(0)
    cb = TargetedDropoutCallback(rate=0.5, fraction=0.5, dims=("channel",))
    cb.plan("cpu")  # the generator is seeded at first use
    state = cb.state_dict()
    first = cb.plan("cpu").masks("probe", tuple(x.shape[1:]), inputs=x).values["channel"]
    again = TargetedDropoutCallback(rate=0.5, fraction=0.5, dims=("channel",))
    again.load_state_dict({**state, "step": 7})
    second = again.plan("cpu").masks("probe", tuple(x.shape[1:]), inputs=x).values["channel"]
    assert torch.equal(first, second) and again.step == 7
    with pytest.raises(ValueError, match="fraction must be in"):
        TargetedDropoutCallback(fraction=1.0)
    with pytest.raises(ValueError, match="drop_rate must be in"):
        TargetedDropoutCallback(rate=-0.1)
    with pytest.raises(ValueError, match="unknown dims"):
        TargetedDropoutCallback(dims=("pixel",))
    with pytest.raises(ValueError, match="warmup_steps"):
        TargetedDropoutCallback(warmup_steps=-1)
    with pytest.raises(NoConv3dError, match="TargetedDropoutCallback"):
        TargetedDropoutCallback().on_fit_start(None, nn.Linear(2, 2))
    assert get_policy("attention") == AttentionPolicy(0.5) != AttentionPolicy(0.25)


def test_the_callback_under_bf16_accumulation_and_a_resumed_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = KnownNet()
    cb = TargetedDropoutCallback(rate=1.0, fraction=0.5, dims=("channel",), warmup_steps=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], precision="bf16-mixed",
                        accumulate_grad_batches=2, default_root_dir=tmp_path, **QUIET)  # fmt: skip
    trainer.fit(net, _loader(32))  # 4 batches, 2 optimizer steps
    assert cb.step == 2 and len(net.seen) == 4
    dropped = [(x.abs().sum(dim=(2, 3, 4)) == 0).float().mean(0) for x in net.seen]
    assert all(float(d.sum()) == 0 for d in dropped[:2])  # step 0: fraction 0
    expect = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0, 0])  # step 1: the lowest 25% at rate 1
    assert all(torch.equal(d, expect) for d in dropped[2:])
    ckpt = tmp_path / "td.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = TargetedDropoutCallback(rate=1.0, fraction=0.5, dims=("channel",), warmup_steps=2)
    trainer = L.Trainer(max_epochs=2, callbacks=[resumed], precision="bf16-mixed",
                        accumulate_grad_batches=2, default_root_dir=tmp_path, **QUIET)  # fmt: skip
    trainer.fit(KnownNet(), _loader(32), ckpt_path=ckpt)
    assert resumed.step == 4  # 2 restored from the checkpoint + 2 of the second epoch
