import copy
import pickle

import pytest
import torch
import torch.nn as nn

from lightning_dance.aap import AdaptivePruner, budget_loss, distillation_loss
from lightning_dance.executed import conv3d_executed_macs, conv3d_executed_macs_batch
from lightning_dance.layers import NoConv3dError
from lightning_dance.macs import count_macs
from lightning_dance.masks import DIMS

DIM_SETS = [("frame",), ("channel",), ("feature",), DIMS]


def _randomize(pruner: AdaptivePruner, std: float = 1.0) -> None:
    """A controller with large random weights: varied, input-dependent decisions."""
    torch.manual_seed(3)
    for p in pruner.controller.parameters():
        nn.init.normal_(p, std=std)


@pytest.mark.parametrize("dims", DIM_SETS)
@pytest.mark.parametrize("policy", ["threshold", "topk"])
def test_all_kept_equals_the_original_model(small_net, clip, dims, policy):
    reference = small_net(clip)
    pruner = AdaptivePruner(small_net, dims=dims, policy=policy).eval()
    _randomize(pruner)
    with pruner.dense():
        out = pruner(clip)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    stats = pruner.last_stats
    for layer in stats.layers.values():
        assert all(bool((k == 1).all()) for k in layer.kept.values())


def test_instrumented_layers_and_stem(small_net):
    pruner = AdaptivePruner(small_net)
    assert pruner.stem_name == "stem.0"
    assert pruner.layer_names == ["conv_a.0", "res.0", "res.3", "down"]


@pytest.mark.parametrize("dims", DIM_SETS)
def test_masks_are_binary_and_differ_across_inputs(small_net, dims):
    pruner = AdaptivePruner(small_net, dims=dims).eval()
    _randomize(pruner)
    torch.manual_seed(0)
    clip = torch.randn(4, 3, 8, 16, 16)
    clip[1] *= 4.0
    clip[2, :, :4] = 0.0  # half the frames empty
    clip[3, :, :, :8] = 0.0  # half the frame height empty
    captured = {}

    def grab(module, args):
        captured[module] = (args[0] != 0).flatten(2)  # [N, C, T*H*W] kept pattern

    handles = [m.register_forward_pre_hook(grab) for m in pruner._layers.values()]
    pruner(clip)
    for h in handles:
        h.remove()
    kept = pruner.last_stats.layers
    differs = False
    for _name, layer in kept.items():
        for _dim, frac in layer.kept.items():
            assert frac.shape == (4,)
            differs |= bool(frac.max() > frac.min())
    assert differs, "the controller made the same decision for every clip"


def test_masks_zero_what_they_say(small_net, clip):
    """The conv really reads x * masks: its live input channels are at most the kept ones."""
    pruner = AdaptivePruner(small_net, dims=("channel",)).eval()
    _randomize(pruner)
    inputs = {}

    def spy(name, conv):
        def forward(x):
            inputs[name] = x
            return type(conv).forward(conv, x)

        return forward

    for name, conv in pruner._layers.items():
        conv.forward = spy(name, conv)  # runs after the pruner's pre-hook: sees the masked input
    try:
        pruner(clip)
    finally:
        for conv in pruner._layers.values():
            del conv.forward
    assert set(inputs) == set(pruner.layer_names)
    for name, x in inputs.items():
        alive = (x.abs().sum(dim=(2, 3, 4)) > 0).float().mean(1)
        kept = pruner.last_stats.layers[name].kept["channel"]
        assert torch.all(alive <= kept + 1e-6), name
    assert any(bool((s.kept["channel"] < 1).any()) for s in pruner.last_stats.layers.values())


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_topk_keeps_exactly_k(small_net, clip, budget):
    pruner = AdaptivePruner(small_net, dims=("channel",), policy="topk", budget=budget).eval()
    _randomize(pruner)
    pruner(clip)
    ratio = pruner.keep_ratio()
    for name, layer in pruner.last_stats.layers.items():
        c = layer.input_shape[0]
        expected = max(1, round(ratio * c)) / c
        assert torch.allclose(layer.kept["channel"], torch.full((2,), expected)), name


@pytest.mark.parametrize("budget", [0.5, 0.7])  # floor: 4 of 8-16 channels per layer
def test_topk_channel_multiple_keeps_rounded_counts(small_net, clip, budget):
    """Every layer keeps a multiple of 4 channels (or all) within one multiple of its keep
    ratio; the rounding errors cancel across layers (the total moves by less than one layer's
    step); the counted MACs are those of the rounded masks; calibration meets the budget."""
    # each layer's full count (credit_outputs=False) is checked below
    pruner = AdaptivePruner(
        small_net,
        dims=("channel",),
        policy="topk",
        budget=budget,
        channel_multiple=4,
        credit_outputs=False,
    ).eval()
    _randomize(pruner)
    pruner(clip)
    ratio = pruner.keep_ratio()
    stats = pruner.last_stats
    error, steps = 0.0, []
    for name, layer in stats.layers.items():
        c = layer.input_shape[0]
        kept = (layer.kept["channel"] * c).round().long()
        k = int(kept[0])
        assert (kept == k).all(), name  # topk: the same count for every clip
        assert k % 4 == 0 or k == c, (name, k)
        assert abs(k - ratio * c) < 4, (name, k, ratio * c)
        module = small_net.get_submodule(name)
        assert torch.equal(
            layer.executed_macs,
            conv3d_executed_macs_batch(module, layer.input_shape, **layer.masks),
        )
        per_channel = layer.dense_macs / c
        error += per_channel * (k - ratio * c)
        steps.append(4 * per_channel)
    assert abs(error) <= max(steps)
    shapes = {name: layer.input_shape for name, layer in stats.layers.items()}
    counts = {name: {"channel": int(layer.kept["channel"][0] * layer.input_shape[0] + 0.5)}
              for name, layer in stats.layers.items()}  # fmt: skip
    assert pruner.topk_counts(shapes) == counts  # the counts executors and exports plan with
    reached = pruner.calibrate([clip, torch.randn(2, 3, 8, 16, 16)])
    assert abs(reached - budget) < 0.05, reached


def test_executed_macs_are_consistent_with_fvcore(small_net, clip):
    pruner = AdaptivePruner(small_net).eval()
    _randomize(pruner)
    pruner(clip)
    stats = pruner.last_stats
    assert stats.dense_total == count_macs(small_net, clip[:1]).total
    for name, layer in stats.layers.items():
        conv = pruner._layers[name]
        assert layer.dense_macs == conv3d_executed_macs(conv, layer.input_shape)
        assert (layer.executed_macs <= layer.dense_macs).all()
        torch.testing.assert_close(
            layer.expected_macs.detach(), layer.executed_macs.double(), check_dtype=False
        )
    ratio = stats.mac_ratio()
    assert ((ratio > 0) & (ratio <= 1.0 + 1e-9)).all()
    with pruner.dense():
        pruner(clip)
    # all kept: only the skipped temporal zero-padding taps (frame dim) are saved
    assert (pruner.last_stats.mac_ratio() > 0.85).all()


def test_gradients_reach_the_controller_not_the_frozen_backbone(small_net, clip):
    small_net.requires_grad_(False)
    pruner = AdaptivePruner(small_net).train()
    pruner.model.eval()
    logits = pruner(clip)
    parts = budget_loss(pruner.last_stats, 0.3)
    loss = logits.pow(2).mean() + parts["budget"] + parts["bounds"]
    loss.backward()
    grads = {n: p.grad for n, p in pruner.controller.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert all(p.grad is None for p in small_net.parameters())


def test_budget_loss_terms(small_net, clip):
    pruner = AdaptivePruner(small_net).eval()
    _randomize(pruner)
    pruner(clip)
    stats = pruner.last_stats
    parts = budget_loss(stats, 0.25, min_layer_keep=0.0)
    expected_ratio = (stats.expected_macs() / stats.dense_total).mean()
    torch.testing.assert_close(parts["ratio"], expected_ratio)
    torch.testing.assert_close(parts["budget"], (expected_ratio - 0.25) ** 2)
    assert float(parts["bounds"]) == 0.0
    assert float(budget_loss(stats, 0.25, min_layer_keep=0.99)["bounds"]) > 0


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(4, 5)
    assert float(distillation_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(a, torch.randn(4, 5))) > 0


def test_user_model_untouched(small_net, clip):
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    pruner = AdaptivePruner(small_net)
    pruner(clip)
    model = pruner.unwrap()
    assert model is small_net
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    copy.deepcopy(pruner)
    pickle.loads(pickle.dumps(pruner))


def test_no_conv3d_model():
    with pytest.raises(NoConv3dError, match="no nn.Conv3d"):
        AdaptivePruner(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_bad_budget(small_net, budget):
    with pytest.raises(ValueError, match="budget must be in"):
        AdaptivePruner(small_net, budget=budget)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(3, 8, 16, 16), r"\[N, C, T, H, W\]"),
        (torch.randn(1, 4, 8, 16, 16), "reads 3 channels"),
        (torch.randn(0, 3, 8, 16, 16), "empty batch"),
        (torch.full((1, 3, 8, 16, 16), float("nan")), "NaN"),
        (torch.zeros(1, 3, 8, 16, 16).index_fill_(4, torch.tensor([5]), float("inf")), "NaN"),
        (torch.zeros(2, 3, 8, 16, 16).index_fill_(0, torch.tensor([1]), -float("inf")), "NaN"),
    ],
)
def test_bad_clips(small_net, bad, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePruner(small_net)(bad)


@pytest.mark.parametrize(
    "dtype,match",
    [
        (torch.uint8, r"torch\.uint8 tensor .* torch\.float32 on cpu: convert and normalize"),
        (torch.int64, r"torch\.int64 tensor .*clip\.to\(torch\.float32\) / 255"),
        (
            torch.float16,
            r"clip is torch\.float16 .* torch\.float32 on cpu.*clip\.to\(torch\.float32\)",
        ),
        (
            torch.float64,
            r"clip is torch\.float64 .* torch\.float32 on cpu.*clip\.to\(torch\.float32\)",
        ),
    ],
)
def test_clip_dtype_must_match_the_model(small_net, dtype, match):
    """One clear error up front (it used to fail inside the MAC counter), also from the
    Lightning wrapper and the compact path, which validate through the same check."""
    from lightning_dance.wrapper import DANCEWrapper

    clip = (torch.rand(1, 3, 8, 16, 16) * 255).to(dtype)
    pruner = AdaptivePruner(small_net)
    with pytest.raises(TypeError, match=match):
        pruner(clip)
    with pytest.raises(TypeError, match=match):
        DANCEWrapper(small_net)(clip)
    assert pruner.last_stats is None and not pruner._dense_cache  # refused before any work


def test_clip_on_another_device_is_refused(small_net):
    clip = torch.empty(1, 3, 8, 16, 16, device="meta")
    with pytest.raises(
        ValueError, match=r"clip is on meta .* on cpu: move it with `clip\.to\('cpu'\)`"
    ):
        AdaptivePruner(small_net)(clip)


def test_half_precision_clip_accepted_under_autocast(small_net):
    pruner = AdaptivePruner(small_net).eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pruner(clip.to(torch.float16))
        ratio_half = pruner.last_stats.mac_ratio()
        pruner(clip)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ratio_half.shape == pruner.last_stats.mac_ratio().shape
    with pytest.raises(TypeError, match="float64"), torch.autocast("cpu", dtype=torch.bfloat16):
        pruner(clip.double())  # autocast does not take a wider dtype


def test_huge_finite_clip_is_not_rejected(small_net):
    """The NaN check sums the clip first; a sum that overflows must not reject finite values."""
    clip = torch.full((1, 3, 8, 16, 16), 3e38)
    assert not torch.isfinite(clip.sum())
    with torch.no_grad():
        AdaptivePruner(small_net).eval()(clip)  # no ValueError


def test_too_few_frames_for_an_unpadded_stem():
    net = nn.Sequential(nn.Conv3d(3, 4, (5, 3, 3)), nn.Conv3d(4, 4, 1))
    with pytest.raises(ValueError, match="fewer than the stem"):
        AdaptivePruner(net)(torch.randn(1, 3, 3, 8, 8))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(policy="random"), "policy"),
        (dict(min_keep=0), "min_keep"),
        (dict(tau=0), "tau"),
        (dict(dims=("x",)), "unknown dims"),
        (dict(policy="topk", channel_multiple=0), "channel_multiple must be >= 1"),
        (dict(channel_multiple=8), "policy='topk'"),  # the default policy is threshold
        (dict(policy="topk", dims=("frame",), channel_multiple=8), "'channel' in dims"),
    ],
)
def test_bad_arguments(small_net, kw, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePruner(small_net, **kw)


@pytest.mark.parametrize("multiple", [2.0, True, "8"])
def test_channel_multiple_must_be_an_int(small_net, multiple):
    with pytest.raises(TypeError, match="channel_multiple must be an int"):
        AdaptivePruner(small_net, policy="topk", channel_multiple=multiple)


@pytest.mark.parametrize("policy", ["threshold", "topk"])
@pytest.mark.parametrize("budget", [0.35, 0.6])
def test_calibrate_meets_the_budget(small_net, policy, budget):
    pruner = AdaptivePruner(small_net, dims=("frame", "channel"), policy=policy, budget=budget)
    _randomize(pruner, std=0.3)
    torch.manual_seed(5)
    clips = [torch.randn(4, 3, 8, 16, 16) for _ in range(2)]
    reached = pruner.calibrate(clips)
    # granularity: a handful of channels/frames per layer, so within a few percent
    assert abs(reached - budget) < 0.05, reached
    assert pruner.training  # restored
    with torch.no_grad():
        pruner.eval()
        ratios = torch.cat([(pruner(c), pruner.last_stats.mac_ratio())[1] for c in clips])
    assert float(ratios.mean()) == pytest.approx(reached)


def test_calibrate_warns_when_the_budget_is_out_of_reach(small_net):
    pruner = AdaptivePruner(small_net, dims=("channel",), budget=0.01)
    with pytest.warns(UserWarning, match="out of reach"):
        reached = pruner.calibrate(torch.randn(2, 3, 8, 16, 16))
    # the floor: every layer keeps its minimum; far above the asked budget, still below dense
    assert 0.01 < reached < 0.6


def test_channel_multiple_meets_the_budget_on_r2plus1d():
    """R(2+1)D has 8 layers of 32 input channels: rounded all alike, its MAC ratio would jump
    from 0.33 to 0.46 around budget 0.4 (measured); rounded layer by layer it reaches 0.4."""
    from lightning_dance.models import create_model

    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=5, width=0.5).eval()
    pruner = AdaptivePruner(
        net, dims=("channel",), policy="topk", budget=0.4, channel_multiple=8
    ).eval()
    clip = torch.randn(1, 3, 8, 32, 32)
    reached = pruner.calibrate([clip], iters=12, tol=0.005)
    assert abs(reached - 0.4) <= 0.005, reached
    with torch.no_grad():
        pruner(clip)
    sizes = {}
    for name, layer in pruner.last_stats.layers.items():
        c, k = layer.input_shape[0], int(layer.masks["channel"].sum())
        assert c <= 8 or k % 8 == 0 or k == c, (name, k, c)
        sizes.setdefault(c, set()).add(k)
    assert len(sizes[32]) > 1  # equal layers rounded differently
