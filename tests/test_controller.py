import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_dance.controller import Controller

LAYERS = {"a": 8, "b": 16, "c": 12}


@pytest.mark.parametrize("shape", [(2, 8, 4, 16, 16), (3, 8, 9, 7, 5), (1, 8, 1, 2, 2)])
@pytest.mark.parametrize("layer_shape", [(4, 8, 8), (2, 3, 5), (16, 1, 1)])
def test_logit_shapes_for_any_clip_size(shape, layer_shape):
    ctrl = Controller(8, LAYERS)
    ctx = ctrl(torch.randn(shape))
    n = shape[0]
    t, h, w = layer_shape
    assert ctrl.channel_logits(ctx, "b").shape == (n, 16)
    assert ctrl.frame_logits(ctx, "a", t).shape == (n, t)
    assert ctrl.feature_logits(ctx, "c", (h, w)).shape == (n, min(4, h), min(4, w))
    for tensor in (ctx.embedding, ctx.channel_logits):
        assert torch.isfinite(tensor).all()


def test_initial_keep_probability():
    ctrl = Controller(8, LAYERS, init_keep=0.8)
    ctx = ctrl(torch.randn(4, 8, 4, 8, 8))
    p = torch.sigmoid(ctrl.channel_logits(ctx, "a"))
    assert torch.allclose(p, torch.full_like(p, 0.8), atol=0.05)


def test_logits_depend_on_the_input():
    torch.manual_seed(0)
    ctrl = Controller(8, LAYERS)
    for p in ctrl.parameters():  # a trained-looking controller, not the near-constant init
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 8, 6, 16, 16)
    x[1, :, :3] *= 5  # sample 1: loud first frames, sample 0: uniform
    ctx = ctrl(x)
    f = ctrl.frame_logits(ctx, "a", 6)
    assert not torch.allclose(f[0], f[1])
    c = ctrl.channel_logits(ctx, "b")
    assert not torch.allclose(c[0], c[1])
    g = ctrl.feature_logits(ctx, "c", (8, 8))
    assert not torch.allclose(g[0], g[1])


def test_budget_conditioning_shifts_logits():
    ctrl = Controller(8, LAYERS, budget_conditioned=True)
    x = torch.randn(2, 8, 4, 8, 8)
    with pytest.raises(ValueError, match="needs a budget"):
        ctrl(x)
    lo = ctrl.channel_logits(ctrl(x, torch.tensor(0.2)), "a")
    hi = ctrl.channel_logits(ctrl(x, torch.tensor(0.8)), "a")
    assert (hi > lo).all()  # the initial budget sensitivity keeps more at a higher budget


def test_gradients_reach_all_heads():
    ctrl = Controller(8, LAYERS, budget_conditioned=True)
    ctx = ctrl(torch.randn(2, 8, 4, 8, 8), torch.tensor(0.5))
    loss = (
        ctrl.channel_logits(ctx, "a").sum()
        + ctrl.frame_logits(ctx, "b", 4).sum()
        + ctrl.feature_logits(ctx, "c", (8, 8)).sum()
    )
    loss.backward()
    for name, p in ctrl.named_parameters():
        assert p.grad is not None, name


def test_linear_macs_match_the_dispatch_counter():
    ctrl = Controller(8, LAYERS, hidden=32)
    x = torch.randn(1, 8, 4, 8, 8)
    with FlopCounterMode(display=False) as counter:
        ctrl(x)
    mm = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "mm" in str(k))
    linears = sum(
        m.in_features * m.out_features for m in ctrl.modules() if isinstance(m, torch.nn.Linear)
    )
    # forward() runs the trunk and the channel head; the frame/feature global heads run per layer
    per_layer = 32 * 3 * 2
    pooling = 2 * 4 * 8  # frame statistics [2, T0] pooled to 8 bins by a matmul
    assert mm // 2 == linears - per_layer + pooling
    assert ctrl.macs((8, 4, 8, 8)) >= linears


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(layer_channels={}), "at least one layer"),
        (dict(grid=0), "grid"),
        (dict(init_keep=1.0), "init_keep"),
        (dict(dims=("space",)), "unknown dims"),
    ],
)
def test_bad_arguments(kw, match):
    args = dict(stem_channels=8, layer_channels=LAYERS) | kw
    with pytest.raises(ValueError, match=match):
        Controller(**args)


def test_wrong_stem_shape():
    with pytest.raises(ValueError, match=r"\[N, 8, T, H, W\]"):
        Controller(8, LAYERS)(torch.randn(2, 4, 4, 8, 8))


@pytest.mark.parametrize("shape", [(2, 6, 5, 9, 7), (1, 6, 1, 8, 8)])
def test_statistics_do_not_depend_on_the_memory_layout(shape):
    """A ``channels_last_3d`` stem output (the fast path's layout) is reduced on a
    ``[N, T, H, W, C]`` view: same context as from the NCDHW tensor, gradients included."""
    torch.manual_seed(0)
    ctrl = Controller(6, {"a": 4, "b": 5}, budget_conditioned=True)
    x = torch.randn(shape).mul_(3).requires_grad_(True)
    xc = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_(True)
    assert xc.is_contiguous(memory_format=torch.channels_last_3d) and not xc.is_contiguous()
    ref, got = ctrl(x, torch.tensor(0.4)), ctrl(xc, torch.tensor(0.4))
    for field in ("embedding", "channel_logits", "frame_stats", "motion_map", "magnitude_map"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-4, atol=1e-5)
    (g_ref,) = torch.autograd.grad(ref.embedding.square().sum() + ref.motion_map.sum(), x)
    (g_got,) = torch.autograd.grad(got.embedding.square().sum() + got.motion_map.sum(), xc)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conditioned", [False, True])
def test_stacked_channel_logits_equal_the_per_layer_ones(conditioned):
    """The index plan's batched top-k reads layers of one width in one gather: the same values
    as channel_logits layer by layer, budget shift included (per-layer scales made distinct)."""
    torch.manual_seed(0)
    widths = {"a": 6, "b": 4, "c": 6, "d": 6}
    ctrl = Controller(8, widths, dims=("channel",), budget_conditioned=conditioned)
    with torch.no_grad():
        ctrl.channel_head.weight.normal_()
        if conditioned:
            ctrl.budget_scale.uniform_(0.5, 2.0)
    ctx = ctrl(torch.randn(2, 8, 4, 6, 6), 0.3 if conditioned else None)
    stacked = ctrl.stacked_channel_logits(ctx, ["d", "a", "c"])
    assert stacked.shape == (2, 3, 6)
    for i, name in enumerate(["d", "a", "c"]):
        torch.testing.assert_close(stacked[:, i], ctrl.channel_logits(ctx, name))
    with pytest.raises(ValueError, match="layers of one width"):
        ctrl.stacked_channel_logits(ctx, ["a", "b"])
