"""DANCE on every factory model: identity with all-ones masks, per-input masks, instrumentation
of multi-pathway (SlowFast) and depthwise (X3D) networks."""

import pytest
import torch
import torch.nn as nn
from test_models import SMALL  # tiny widths: structure, not capacity

from lightning_dance.aap import AdaptivePruner
from lightning_dance.executed import conv3d_executed_macs
from lightning_dance.layers import all_conv3d, stem_names
from lightning_dance.models import create_model, list_models


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, 5, **SMALL[name])
    # non-trivial BatchNorm statistics so that masking mistakes cannot hide behind zeros
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _clip(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 32, 32, generator=g)


def test_every_factory_model_is_covered():
    assert sorted(n for n in SMALL if ":" not in n) == list_models()


@pytest.mark.parametrize("name", list(SMALL))
def test_all_kept_equals_the_original_model_and_masks_follow_the_input(name):
    model = _model(name)
    clip = _clip()
    with torch.no_grad():
        reference = model(clip)
        # tiny widths make the dense stem a large share of the MACs (timm's 64-channel 7x7 stem is
        # ~70% of timm:resnet18 here): 0.85 is reachable by every model
        pruner = AdaptivePruner(model, budget=0.85).eval()
        with pruner.dense():
            out = pruner(clip)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        # instrumented: every Conv3d but the stem(s), each with statistics of this pass
        stems = set(stem_names(model))
        assert set(pruner.layer_names) == set(all_conv3d(model)) - stems
        assert set(pruner.last_stats.layers) == set(pruner.layer_names)
        # real masks (an untrained controller keeps everything at eval until calibrated to the
        # budget): they change the output and differ between two different clips
        other = clip[1:].clone()
        other[:, :, :4] = 0.0  # half the frames empty
        other[:, :, :, :, :16] *= 0.1  # a dim left half
        clip2 = torch.cat([clip[:1], other])
        ratio = pruner.calibrate(clip2)
        assert ratio == pytest.approx(0.85, abs=0.03)
        pruned = pruner(clip2)
    assert not torch.allclose(pruned[:1], reference[:1])
    stats = pruner.last_stats
    differs = any(
        not torch.equal(layer.kept[d][0], layer.kept[d][1])
        for layer in stats.layers.values()
        for d in layer.kept
    ) or not torch.equal(stats.executed_macs()[0], stats.executed_macs()[1])
    assert differs, "the controller gave two different clips the same masks"
    # the user's model is untouched: same outputs, no hooks left
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(clip), reference)


def test_slowfast_both_pathways_are_instrumented_and_both_stems_stay_dense():
    model = _model("slowfast_r50")
    stems = stem_names(model)
    assert len(stems) == 2
    pruner = AdaptivePruner(model, dims=("channel", "frame")).eval()
    with torch.no_grad():
        pruner(_clip())
    convs = all_conv3d(model)
    slow = [n for n in pruner.layer_names if ".pathway0" in n or "multipathway_blocks.0" in n]
    fast = [n for n in pruner.layer_names if ".pathway1" in n or "multipathway_blocks.1" in n]
    assert slow and fast, pruner.layer_names[:8]
    # the fast pathway runs 4x the frames of the slow one: frame masks have that many entries
    stats = pruner.last_stats.layers
    t_slow = {stats[n].input_shape[1] for n in slow}
    t_fast = {stats[n].input_shape[1] for n in fast}
    assert max(t_fast) > max(t_slow)
    # lateral fast->slow convs are instrumented too (their input is the fast pathway)
    laterals = [n for n in convs if "fusion" in n or "lateral" in n]
    assert laterals and set(laterals) <= set(pruner.layer_names)


def test_x3d_depthwise_convs_are_instrumented_and_counted_per_group():
    model = _model("x3d_xs")
    pruner = AdaptivePruner(model, dims=("channel",), policy="topk", budget=0.5).eval()
    with torch.no_grad():
        pruner(_clip(n=1))
    convs = all_conv3d(model)
    depthwise = [n for n in pruner.layer_names if convs[n].groups == convs[n].in_channels > 1]
    # one per bottleneck, ceil(2.2 * [1, 2, 5, 3]) = 3+5+11+7 = 26, and the stem's temporal
    # depthwise conv (pytorchvideo names it ``conv_xy``, it runs after the 1x3x3 ``conv_t``)
    assert len(depthwise) == 27 and "blocks.0.conv.conv_xy" in depthwise
    for name in depthwise:
        layer = pruner.last_stats.layers[name]
        kept = float(layer.kept["channel"][0])
        assert 0 < kept < 1
        # depthwise: each kept input channel feeds exactly one output channel
        expected = round(conv3d_executed_macs(convs[name], layer.input_shape) * kept)
        assert int(layer.executed_macs[0]) == expected
