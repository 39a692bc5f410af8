import pytest
import torch
import torch.nn as nn
from conftest import SmallNet

from lightning_dance.aap import AdaptivePruner
from lightning_dance.priors import apply_channel_prior, magnitude_importance


def _reference_importance(conv: nn.Conv3d) -> torch.Tensor:
    """Per input channel, the L2 norm of the weights that read it, one channel at a time."""
    w, groups = conv.weight.detach(), conv.groups
    og, cg = conv.out_channels // groups, conv.in_channels // groups
    out = []
    for c in range(conv.in_channels):
        g, j = divmod(c, cg)
        out.append(w[g * og : (g + 1) * og, j].pow(2).sum().sqrt())
    return torch.stack(out)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_magnitude_importance_matches_a_per_channel_loop(groups):
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 16, (3, 1, 3), groups=groups)
    torch.testing.assert_close(magnitude_importance(conv), _reference_importance(conv))


def _kept(pruner, clip):
    pruner.eval()  # no exploration noise
    with torch.no_grad():
        pruner(clip)
    return {n: s.masks["channel"].bool() for n, s in pruner.last_stats.layers.items()}


def _static_top(pruner, name, k):
    score = magnitude_importance(pruner._layers[name])
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[score.topk(k).indices] = True
    return keep


def test_the_prior_makes_topk_keep_the_magnitude_ranking_for_every_clip():
    torch.manual_seed(0)
    clips = torch.randn(3, 3, 8, 16, 16)
    pruner = AdaptivePruner(SmallNet().eval(), dims=("channel",), policy="topk", budget=0.5)
    before = _kept(pruner, clips)
    static = {n: _static_top(pruner, n, int(m[0].sum())) for n, m in before.items()}
    # the untrained controller's choice is not the ranking (so the test below can fail)
    assert any(not torch.equal(m[i], static[n]) for n, m in before.items() for i in range(3))
    head_weight = pruner.controller.channel_head.weight.clone()
    apply_channel_prior(pruner)
    after = _kept(pruner, clips)
    for name, masks in after.items():
        for i in range(len(clips)):
            assert torch.equal(masks[i], static[name]), name
    # only the channel biases moved
    assert torch.equal(pruner.controller.channel_head.weight, head_weight)


def test_the_prior_keeps_the_controller_input_dependent():
    torch.manual_seed(0)
    pruner = AdaptivePruner(SmallNet().eval(), dims=("channel",), policy="topk")
    apply_channel_prior(pruner, scale=0.0)  # scale 0: no change at all
    bias = pruner.controller.channel_head.bias.clone()
    apply_channel_prior(pruner, scale=1.0)
    moved = pruner.controller.channel_head.bias - bias
    first = pruner.controller.channel_bias(pruner.layer_names[0])
    z = moved[: len(first)]
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-4


def test_bad_uses_are_refused():
    pruner = AdaptivePruner(SmallNet().eval(), dims=("channel",), policy="topk")
    with pytest.raises(ValueError, match="scale must be >= 0"):
        apply_channel_prior(pruner, scale=-1.0)
    bias = pruner.controller.channel_head.bias.clone()
    with pytest.raises(ValueError, match="one score per input channel"):
        apply_channel_prior(pruner, importance=lambda conv: torch.ones(3))
    last = pruner.layer_names[-1]  # only the last layer's scores are wrong: nothing changes
    with pytest.raises(ValueError, match="one score per input channel"):
        apply_channel_prior(pruner, importance=lambda conv: torch.ones(
            3 if conv is pruner._layers[last] else conv.in_channels))  # fmt: skip
    assert torch.equal(pruner.controller.channel_head.bias, bias)
    frames_only = AdaptivePruner(SmallNet().eval(), dims=("frame",), policy="topk")
    with pytest.raises(ValueError, match="'channel' in dims"):
        apply_channel_prior(frames_only)
    attention = AdaptivePruner(SmallNet().eval(), dims=("channel",), policy="attention")
    with pytest.raises(ValueError, match="a policy with a controller"):
        apply_channel_prior(attention)


def test_train_controller_prepares_the_wrapper_before_training():
    from lightning_dance.data import SyntheticVideoDataModule
    from lightning_dance.models import create_model
    from lightning_dance.recipes import train_controller

    torch.manual_seed(0)
    dm = SyntheticVideoDataModule(num_classes=4, frames=4, size=16, train_size=8, val_size=8,
                                  test_size=8, batch_size=8)  # fmt: skip
    seen = []

    def prepare(wrapper):
        seen.append((wrapper.global_step, wrapper.pruner.controller.channel_head.bias.clone()))
        apply_channel_prior(wrapper)

    wrapper = train_controller(create_model("tiny_c3d", num_classes=4), dm, budget=0.5,
                               policy="topk", dims=("channel",), epochs=None, max_steps=1,
                               calibrate_batches=0, prepare=prepare)  # fmt: skip
    assert len(seen) == 1 and seen[0][0] == 0
    assert wrapper.global_step == 1
    assert not torch.equal(seen[0][1], wrapper.pruner.controller.channel_head.bias)


def test_freeze_channels_keeps_the_most_frequent_channels_for_every_clip():
    from lightning_dance.priors import channel_frequencies, freeze_channels

    torch.manual_seed(0)
    pruner = AdaptivePruner(SmallNet(), dims=("channel",), policy="topk", budget=0.5)
    with torch.no_grad():  # a controller whose choice varies from clip to clip
        for p in pruner.controller.parameters():
            p.normal_(std=0.5)
    clips = [torch.randn(4, 3, 8, 16, 16) for _ in range(3)]
    before = [_kept(pruner, c) for c in clips]
    freq = channel_frequencies(pruner, clips)
    for name, f in freq.items():  # the mean of the masks, counted independently
        masks = torch.cat([b[name] for b in before]).double()
        torch.testing.assert_close(f, masks.mean(0))
    assert any(len({tuple(r.tolist()) for r in torch.cat([b[n] for b in before])}) > 1
               for n in freq)  # fmt: skip
    freeze_channels(pruner, freq)
    after = _kept(pruner, torch.cat(clips))
    for name, masks in after.items():
        k = int(masks[0].sum())
        assert k == int(before[0][name][0].sum())  # the same kept count
        assert (masks == masks[0]).all()  # the same channels for every clip
        dropped = freq[name][~masks[0]]
        if len(dropped):
            assert float(freq[name][masks[0]].min()) >= float(dropped.max())


@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_freeze_channels_of_a_threshold_pruner_keeps_the_mean_count(offset):
    """``threshold``: each layer keeps its mean count per clip (rounded) of its most frequent
    channels, for every clip, whatever calibration offset the pruner carries."""
    from lightning_dance.priors import channel_frequencies, freeze_channels

    torch.manual_seed(0)
    pruner = AdaptivePruner(SmallNet(), dims=("channel",), policy="threshold", budget=0.5)
    with torch.no_grad():  # counts and channels that vary from clip to clip
        for p in pruner.controller.parameters():
            p.normal_(std=0.5)
        pruner.calibration.fill_(offset)
    clips = [torch.randn(4, 3, 8, 16, 16) for _ in range(3)]
    before = {n: torch.cat([_kept(pruner, c)[n] for c in clips]) for n in pruner.layer_names}
    assert any(len({int(m.sum()) for m in b}) > 1 for b in before.values())  # counts vary
    freq = channel_frequencies(pruner, clips)
    freeze_channels(pruner, freq)
    after = _kept(pruner, torch.cat(clips))
    for name, masks in after.items():
        mean_count = float(before[name].double().sum(1).mean())
        assert int(masks[0].sum()) == max(1, round(mean_count)), name
        assert (masks == masks[0]).all()  # the same channels for every clip
        order = sorted(range(len(freq[name])), key=lambda c: -float(freq[name][c]))
        top = set(order[: int(masks[0].sum())])
        kept = set(masks[0].nonzero().flatten().tolist())
        assert min(float(freq[name][c]) for c in kept) >= max(
            (float(freq[name][c]) for c in set(range(len(order))) - top), default=0.0)  # fmt: skip
    assert float(pruner.calibration) == offset  # the offset is kept, the biases moved


def test_freeze_channels_refuses_what_it_cannot_freeze():
    from lightning_dance.priors import channel_frequencies, freeze_channels

    width = AdaptivePruner(SmallNet(), dims=("channel",), policy="width")
    with pytest.raises(ValueError, match="highest-scoring ones \\(topk, threshold\\), not of 'width'"):
        freeze_channels(width, {})
    topk = AdaptivePruner(SmallNet(), dims=("channel",), policy="topk")
    with pytest.raises(ValueError, match="at least one clip"):
        channel_frequencies(topk, [])
    state = {k: v.clone() for k, v in topk.controller.state_dict().items()}
    with pytest.raises(ValueError, match="expected"):
        freeze_channels(topk, {n: torch.ones(2) for n in topk.layer_names})
    with pytest.raises(ValueError, match="have shape None"):
        freeze_channels(topk, {})
    for k, v in topk.controller.state_dict().items():  # a refused call changes nothing
        assert torch.equal(v, state[k]), k


def test_a_standalone_projection_reads_nothing_and_runs_the_same_channels():
    from lightning_dance.controller import StaticController
    from lightning_dance.execution import CompactPruner
    from lightning_dance.export.modes import build_export_module
    from lightning_dance.priors import channel_frequencies, freeze_channels

    torch.manual_seed(0)
    pruner = AdaptivePruner(SmallNet(), dims=("channel",), policy="topk", budget=0.5)
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.normal_(std=0.5)
    clips = [torch.randn(2, 3, 8, 16, 16) for _ in range(2)]
    freq = channel_frequencies(pruner, clips)
    freeze_channels(pruner, freq)
    frozen = _kept(pruner, clips[1])
    macs_with_controller = pruner.last_stats.mac_ratio()
    freeze_channels(pruner, freq, standalone=True)
    assert isinstance(pruner.controller, StaticController)
    standalone = _kept(pruner, clips[1])
    for name in frozen:
        assert torch.equal(standalone[name], frozen[name])  # the same channels
    assert pruner.last_stats.controller_macs == 0  # nothing computed to decide
    assert (pruner.last_stats.mac_ratio() < macs_with_controller).all()
    with torch.no_grad():
        masked = pruner(clips[1])
        torch.testing.assert_close(CompactPruner(pruner)(clips[1]), masked, atol=1e-4, rtol=1e-4)
        module, _ = build_export_module(pruner, "topk", clips[1][:1])
        torch.testing.assert_close(module(clips[1][:1]), masked[:1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="dims=\\('channel',\\)"):
        mixed = AdaptivePruner(SmallNet(), dims=("channel", "frame"), policy="topk")
        freeze_channels(mixed, channel_frequencies(mixed, clips), standalone=True)
    with pytest.raises(ValueError, match="at least one layer"):
        StaticController({})
