"""Policies as objects and the decision plan: a new policy is one class, and every runtime reads
the same per-clip decisions."""

import lightning as L
import pytest
import torch
from conftest import SmallNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.aap import AdaptivePruner
from lightning_dance.decision import DecisionPlan
from lightning_dance.errors import DanceError
from lightning_dance.execution import CompactPruner
from lightning_dance.masks import threshold_gate
from lightning_dance.policies import (
    Policy,
    ThresholdPolicy,
    TopKPolicy,
    available_policies,
    get_policy,
    register_policy,
)
from lightning_dance.policies import base as policy_base
from lightning_dance.wrapper import DANCEWrapper

MARGIN = 0.85  # logit of a 70% keep probability


class StrictPolicy(Policy):
    """Keeps an entry only when the controller gives it more than a 70% keep probability."""

    name = "strict_test"

    def gate(self, logits, *, training, k=None, tau=1.0, noise=1.0, min_keep=1, generator=None):
        return threshold_gate(
            logits - MARGIN, training=training, tau=tau, noise=noise, min_keep=min_keep,
            generator=generator,
        )  # fmt: skip

    def logit_offset(self, calibration):
        return calibration


@pytest.fixture
def strict():
    register_policy(StrictPolicy)
    yield StrictPolicy()
    del policy_base._REGISTRY[StrictPolicy.name]


def _randomized(pruner, scale=3.0):
    """Spread the controller's scores (a fresh controller keeps almost everything)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.normal_(0, scale / max(1, p.shape[-1] ** 0.5))
    return pruner.eval()


def test_a_policy_is_named_passed_as_class_or_instance():
    assert set(available_policies()) >= {"threshold", "topk"}
    topk = get_policy("topk")
    assert isinstance(topk, TopKPolicy) and get_policy(TopKPolicy) == topk
    assert get_policy(topk) is topk
    assert topk == "topk" and topk != "threshold" and topk != ThresholdPolicy()
    assert hash(topk) == hash(TopKPolicy()) and repr(topk) == "TopKPolicy()"
    assert topk.fixed_counts and not ThresholdPolicy().fixed_counts
    pruner = AdaptivePruner(SmallNet(), policy=TopKPolicy)
    assert isinstance(pruner.policy, TopKPolicy) and pruner.policy == "topk"


def test_unknown_and_malformed_policies_get_clear_errors():
    with pytest.raises(
        ValueError, match=r"policy must be one of \('attention', 'threshold', 'topk', 'width'\)"
    ):
        AdaptivePruner(SmallNet(), policy="nope")
    with pytest.raises(ValueError, match="or a Policy object"):
        get_policy(3)
    with pytest.raises(TypeError, match="Policy subclass with a name"):
        register_policy(int)

    class Nameless(StrictPolicy):
        name = ""

    with pytest.raises(TypeError, match="Policy subclass with a name"):
        register_policy(Nameless)

    class Impostor(ThresholdPolicy):
        pass

    with pytest.raises(ValueError, match="'threshold' is registered already"):
        register_policy(Impostor)
    with pytest.raises(ValueError, match="topk policy needs the number"):
        TopKPolicy().gate(torch.zeros(1, 4), training=False)


def test_a_new_policy_is_one_class(strict, clip):
    """Registered, it works by name in the masked forward, the compact path and calibration."""
    pruner = _randomized(AdaptivePruner(SmallNet(), policy="strict_test", budget=0.6))
    assert pruner.policy == strict
    with torch.no_grad():
        masked = pruner(clip)
        stem = pruner.model.get_submodule(pruner.stem_name)(clip)
        plan = pruner.decide(stem)
    # the masks are the policy's rule applied to the controller's logits, independently
    for name, stats in pruner.last_stats.layers.items():
        logits = pruner.controller.layer_logits(plan.ctx, name, stats.input_shape)
        for dim in ("channel", "frame"):
            expect = (logits[dim] > MARGIN).float()
            empty = expect.sum(1) == 0  # min_keep: the best-scored entry is kept
            expect[empty, logits[dim][empty].argmax(1)] = 1.0
            torch.testing.assert_close(stats.masks[dim], expect)
    kept = torch.stack([s.masks["channel"].mean() for s in pruner.last_stats.layers.values()])
    assert 0.05 < float(kept.mean()) < 0.95  # a real decision, not all or nothing
    with torch.no_grad():
        torch.testing.assert_close(CompactPruner(pruner)(clip), masked, atol=1e-4, rtol=1e-4)
    reached = pruner.calibrate([clip, torch.randn(2, 3, 8, 16, 16)])
    assert abs(reached - 0.6) < 0.05


def test_the_compact_path_reads_the_masked_forwards_decisions(clip):
    """Masked forward and compact path take each layer's decision from one plan per clip:
    same masks (checked through identical outputs layer by layer), one controller call."""
    pruner = _randomized(AdaptivePruner(SmallNet(), policy="threshold", budget=0.5))
    calls = []
    pruner.controller.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        masked = pruner(clip)
        fast = CompactPruner(pruner, skip_outputs=True, index_plan=False)(clip)
    assert len(calls) == 2  # one plan per forward, whatever the chains look ahead at
    torch.testing.assert_close(fast, masked, atol=1e-4, rtol=1e-4)


def _one_clip_plan(pruner: AdaptivePruner, one: torch.Tensor):
    """The masked forward on one clip (``last_stats``), that clip's plan and the layer widths."""
    with torch.no_grad():
        pruner(one)
        plan = pruner.decide(pruner.model.get_submodule(pruner.stem_name)(one))
    return plan, {n: s.input_shape[0] for n, s in pruner.last_stats.layers.items()}


def test_plan_indices_and_masks_agree(clip):
    pruner = _randomized(AdaptivePruner(SmallNet(), dims=("channel", "frame"), policy="topk"))
    plan, widths = _one_clip_plan(pruner, clip[:1])
    sorted_channels = plan.channel_indices(widths)
    for name, stats in pruner.last_stats.layers.items():
        masks = plan.masks(name, stats.input_shape)
        assert plan.masks(name, stats.input_shape) is masks  # decided once
        idx = plan.indices(name, stats.input_shape)
        for dim in ("channel", "frame"):
            torch.testing.assert_close(masks.values[dim], stats.masks[dim])
            kept = stats.masks[dim][0].nonzero().flatten()
            assert torch.equal(idx[dim][0].sort().values, kept)
            k = pruner.topk_count(dim, stats.masks[dim].shape[1], name)
            assert idx[dim].shape == (1, k)
        got = sorted_channels[name]
        kept = stats.masks["channel"][0].nonzero().flatten()
        assert torch.equal(got, kept) if got is not None else len(kept) == widths[name]
    with pytest.raises(ValueError, match="pass counts="):
        DecisionPlan(pruner.controller, plan.ctx, TopKPolicy())
    threshold = DecisionPlan(pruner.controller, plan.ctx, ThresholdPolicy())
    with pytest.raises(ValueError, match="fixed-count policy"):
        threshold.indices(name, stats.input_shape)


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_plan_channel_masks_are_the_masked_forwards_masks(clip, policy):
    pruner = _randomized(AdaptivePruner(SmallNet(), dims=("channel",), policy=policy))
    one = clip[:1]
    plan, widths = _one_clip_plan(pruner, one)
    masks = plan.channel_masks(widths)
    assert set(masks) == set(widths)
    for name, stats in pruner.last_stats.layers.items():
        want = stats.masks["channel"][0].bool()
        got = masks[name]
        assert torch.equal(got, want) if got is not None else bool(want.all())
    with pruner.dense():  # a dense plan decides nothing: every layer keeps all
        plan = pruner.decide(pruner.model.get_submodule(pruner.stem_name)(one))
    assert all(m is None for m in plan.channel_masks(widths).values())


def test_wrapper_takes_a_configured_pruner(tmp_path):
    torch.manual_seed(0)
    pruner = AdaptivePruner(SmallNet(), dims=("channel",), policy="topk", budget=0.4)
    wrapper = DANCEWrapper(pruner, lr=1e-2)
    assert wrapper.pruner is pruner and wrapper.model is pruner.model
    assert float(wrapper.pruner.budget) == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"also \['dims', 'policy'\]: configure these"):
        DANCEWrapper(pruner, dims=("frame",), policy="topk")
    with pytest.raises(ValueError, match="budget_conditioned=True"):
        DANCEWrapper(pruner, budget_range=(0.2, 0.8))
    data = TensorDataset(torch.randn(8, 3, 8, 16, 16), torch.randint(0, 4, (8,)))
    before = [p.clone() for p in pruner.controller.parameters()]
    L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    ).fit(wrapper, DataLoader(data, batch_size=4))  # fmt: skip
    assert any(
        not torch.equal(a, b) for a, b in zip(before, pruner.controller.parameters(), strict=True)
    )


def test_wrapper_saves_a_registered_policy_by_name(strict):
    wrapper = DANCEWrapper(SmallNet(), policy=TopKPolicy(), dims=("channel",))
    assert wrapper.hparams["policy"] == "topk" and wrapper.pruner.policy == "topk"
    assert DANCEWrapper(SmallNet(), policy=StrictPolicy).hparams["policy"] == "strict_test"


def test_every_project_error_is_a_dance_error():
    from lightning_dance.data import VideoDecodeError
    from lightning_dance.export.conv2d_rewrite import UnsupportedOpError
    from lightning_dance.layers import NoConv3dError
    from lightning_dance.macs import MacCountError
    from lightning_dance.models import CheckpointError, InflationError
    from lightning_dance.nonfinite import NonFiniteError
    from lightning_dance.wrapper import ArchitectureMismatchError

    errors = [NoConv3dError, ArchitectureMismatchError, InflationError, CheckpointError,
              VideoDecodeError, MacCountError, UnsupportedOpError, NonFiniteError]  # fmt: skip
    for error in errors:
        assert issubclass(error, DanceError)
    with pytest.raises(DanceError, match="no nn.Conv3d layer"):
        AdaptivePruner(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):  # the built-in base still catches it
        AdaptivePruner(torch.nn.Linear(2, 2))


class StaticScores(torch.nn.Module):
    """A controller of one's own: one learned score per input channel of each layer, the same
    for every clip (static channel pruning expressed as a controller)."""

    grid, budget_conditioned = 4, False

    def __init__(self, widths):
        super().__init__()
        torch.manual_seed(3)
        self.keys = {name: name.replace(".", "_") for name in widths}
        self.scores = torch.nn.ParameterDict(
            {self.keys[n]: torch.nn.Parameter(torch.randn(c)) for n, c in widths.items()}
        )

    def forward(self, stem_out, budget=None):
        return stem_out.shape[0]  # the context: the batch size

    def layer_logits(self, ctx, layer, shape):
        return {"channel": self.scores[self.keys[layer]].expand(ctx, -1)}

    def stacked_channel_logits(self, ctx, layers):
        return torch.stack([self.scores[self.keys[n]] for n in layers]).expand(ctx, -1, -1)

    def macs(self, stem_shape):
        return 0


def test_a_controller_of_ones_own(clip):
    net = SmallNet().eval()
    widths = {"conv_a.0": 8, "res.0": 16, "res.3": 16, "down": 16}
    pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.5,
                            controller=StaticScores(widths)).eval()  # fmt: skip
    assert pruner.layer_names == list(widths)
    with torch.no_grad():
        masked = pruner(clip)
    for name, stats in pruner.last_stats.layers.items():
        k = pruner.topk_count("channel", widths[name], name)
        best = pruner.controller.scores[name.replace(".", "_")].topk(k).indices.sort().values
        for row in stats.masks["channel"]:  # every clip keeps the same best-scored channels
            assert torch.equal(row.nonzero().flatten(), best)
    assert pruner.last_stats.controller_macs == 0
    with torch.no_grad():
        torch.testing.assert_close(CompactPruner(pruner)(clip), masked, atol=1e-4, rtol=1e-4)
        one = clip[:1]  # batch 1: the index plan, through stacked_channel_logits
        torch.testing.assert_close(CompactPruner(pruner)(one), pruner(one), atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match=r"lacks \['layer_logits', 'stacked_channel_logits'"):
        AdaptivePruner(net, controller=torch.nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        AdaptivePruner(net, controller=object())
