"""Tests of the model factory (lightning_dance.models): shapes, structure, widths, inflation,
checkpoints, errors. Sizes are tiny (width 1/8 - 1/2, clips up to 8x48x48) to stay fast on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dance.layers import all_conv3d, stem_names
from lightning_dance.models import (
    CheckpointError,
    InflationError,
    create_model,
    inflate_2d_to_3d,
    list_models,
    model_info,
    pack_pathways,
)

NUM_CLASSES = 5

# name -> create_model keyword arguments that make the model small enough for CPU tests
SMALL: dict[str, dict] = {
    "tiny_c3d": {"width": 0.5},
    "r3d_18": {"width": 0.25},
    "mc3_18": {"width": 0.25},
    "r2plus1d_18": {"width": 0.25},
    "x3d_xs": {"width": 0.25},
    "x3d_s": {"width": 0.25},
    "x3d_m": {"width": 0.25},
    "slow_r50": {"width": 0.125},
    "slowfast_r50": {"width": 0.125},
    "csn_r101": {"width": 0.125},
    "timm:resnet18": {"channels": (8, 16, 32, 64)},  # timm's own width knob (stem stays 64)
}

# Conv3d layers per model, derived from the architecture definitions (not from our code):
EXPECTED_CONV3D = {
    # tiny_c3d: stem, conv2, conv3 + the two convs of the residual block
    "tiny_c3d": 5,
    # torchvision VideoResNet-18: 1 stem conv; 4 stages x 2 BasicBlocks x 2 convs = 16; stages 2-4
    # open with a strided 1x1x1 downsample conv (stage 1 keeps 64 ch at stride 1: none) = 3
    "r3d_18": 1 + 16 + 3,
    # MC3 only swaps 3x3x3 for 1x3x3 kernels in stages 2-4: same count
    "mc3_18": 1 + 16 + 3,
    # R(2+1)D: 2 stem convs (1x7x7, 3x1x1); every block conv is a (1x3x3, 3x1x1) pair: 16 x 2
    "r2plus1d_18": 2 + 32 + 3,
    # X3D (depth factor 2.2): stem conv_xy + conv_t = 2; stage depths ceil(2.2 * [1, 2, 5, 3]) =
    # [3, 5, 11, 7] = 26 bottlenecks x 3 convs (1x1x1, 3x3x3 depthwise, 1x1x1) = 78; SE (two
    # 1x1x1 convs) on every other block starting with the first: [2, 3, 6, 4] = 15 x 2 = 30;
    # every stage starts at stride 2 with a 1x1x1 shortcut conv = 4; head: 2 1x1x1 convs
    "x3d_xs": 2 + 78 + 30 + 4 + 2,
    "x3d_s": 2 + 78 + 30 + 4 + 2,
    "x3d_m": 2 + 78 + 30 + 4 + 2,
    # Slow R50: stem 1; ResNet-50 depths [3, 4, 6, 3] = 16 bottlenecks x 3 = 48; one shortcut
    # conv per stage (64 -> 256 channels in stage 1, stride 2 in stages 2-4) = 4
    "slow_r50": 1 + 48 + 4,
    # SlowFast R50: two R50 pathways (2 x 53) + 4 fast->slow lateral convs (after the stem and
    # stages 1-3; none after stage 4)
    "slowfast_r50": 2 * 53 + 4,
    # ir-CSN-101: stem 1; depths [3, 4, 23, 3] = 33 bottlenecks x 3 = 99; 4 shortcut convs
    "csn_r101": 1 + 99 + 4,
    # every Conv2d of timm's ResNet-18 becomes a Conv3d: the 20 of torchvision's ResNet-18, plus
    # one: timm's 7x7 stem stays at 64 channels, so with channels[0] = 8 (SMALL) the first
    # block of stage 1 changes width and gets a 1x1 downsample conv too
    "timm:resnet18": 20 + 1,
}

ALL_NAMES = list(SMALL)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from 2 threads, and OpenMP threads spin-wait badly when the
    shared cores are oversubscribed (this file: ~16 s with 1 thread vs minutes with 2 under a
    load of 5 on 2 cores). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, NUM_CLASSES, **(SMALL[name] | kw))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so copying them is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_registry_covers_the_tested_names():
    assert sorted(n for n in SMALL if ":" not in n) == list_models()
    assert set(EXPECTED_CONV3D) == set(SMALL)


# ----------------------------------------------------------------------------- forward / structure


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_any_clip_size_and_backward(name):
    model = _small(name)
    # train mode: forward + backward on a 4x32x32 clip
    clip = torch.randn(2, 3, 4, 32, 32)
    logits = model.train()(clip)
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == torch.float32
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)
    # eval mode on an odd, non-square clip size (the hub heads had fixed pooling kernels)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 7, 48, 40))
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_conv3d_count_and_stems(name):
    model = _small(name)
    assert len(all_conv3d(model)) == EXPECTED_CONV3D[name]
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    stems = stem_names(model)
    assert len(stems) == (2 if name == "slowfast_r50" else 1)
    assert all(all_conv3d(model)[s].in_channels == 3 for s in stems)


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_full_width_torchvision_is_torchvision(name):
    import torchvision.models.video as tvm

    ref = getattr(tvm, name)(weights=None, num_classes=7)
    ours = create_model(name, 7)
    assert _n_params(ours) == _n_params(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert len(all_conv3d(ref)) == EXPECTED_CONV3D[name]
    # same forward: torchvision's weights in our module give torchvision's output
    _randomize_bn(ref)
    ours.load_state_dict(ref.state_dict())
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(clip), ref.eval()(clip))


@pytest.mark.parametrize(
    "name", ["x3d_xs", "x3d_s", "x3d_m", "slow_r50", "slowfast_r50", "csn_r101"]
)
def test_full_width_pytorchvideo_matches_hub(name):
    import pytorchvideo.models.hub as hub

    with torch.device("meta"):  # shapes only: skips the weight initialization
        ref = getattr(hub, name)(pretrained=False, model_num_class=7)
        ours = create_model(name, 7)
    assert _n_params(ours) == _n_params(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert len(all_conv3d(ref)) == EXPECTED_CONV3D[name]


def _hub_equivalents(name: str):
    """(pytorchvideo model with fixed pooling sized for the clip, clip, input transform)."""
    from pytorchvideo.models.resnet import create_resnet
    from pytorchvideo.models.slowfast import create_slowfast
    from pytorchvideo.models.x3d import create_x3d

    if name == "x3d_xs":  # our width 0.25 = width_factor 0.5 and a 512-d head projection
        ref = create_x3d(
            input_clip_length=4,
            input_crop_size=32,
            width_factor=0.5,
            head_dim_out=512,
            head_activation=None,
            model_num_class=NUM_CLASSES,
        )
        return ref, torch.randn(2, 3, 4, 32, 32), lambda x: x
    if name == "slow_r50":  # stem 8 channels at width 1/8; feature map of a 4x32x32 clip: 4x1x1
        ref = create_resnet(
            stem_conv_kernel_size=(1, 7, 7),
            model_depth=50,
            stem_dim_out=8,
            head_pool_kernel_size=(4, 1, 1),
            model_num_class=NUM_CLASSES,
        )
        return ref, torch.randn(2, 3, 4, 32, 32), lambda x: x
    ref = create_slowfast(  # slowfast_r50 at width 1/8; 8 fast frames -> 2 slow frames
        model_depth=50,
        slowfast_fusion_conv_kernel_size=(7, 1, 1),
        stem_dim_outs=(8, 1),
        head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1)),
        model_num_class=NUM_CLASSES,
    )
    return ref, torch.randn(1, 3, 8, 32, 32), lambda x: pack_pathways(x, 4)


@pytest.mark.parametrize("name", ["x3d_xs", "slow_r50", "slowfast_r50"])
def test_adaptive_head_equals_hub_pooling_at_the_hub_clip_size(name):
    """Where the hub's fixed AvgPool3d kernel covers the whole feature map, outputs agree."""
    ref, clip, pack = _hub_equivalents(name)
    ours = _small(name)
    _randomize_bn(ref)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(clip), ref.eval()(pack(clip)))


def test_slowfast_packs_the_pathways_like_packpathway():
    clip = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 3, 16, 2, 2)
    slow, fast = pack_pathways(clip, alpha=4)
    # PackPathway: linspace(0, T - 1, T // alpha).long() = [0, 5, 10, 15] for T = 16
    assert slow[0, 0, :, 0, 0].tolist() == [0.0, 5.0, 10.0, 15.0]
    assert fast.equal(clip)
    # T not divisible by alpha: ceil(7 / 4) = 2 slow frames, linspace(0, 6, 2) = [0, 6]
    slow7, _ = pack_pathways(clip[:, :, :7], alpha=4)
    assert slow7[0, 0, :, 0, 0].tolist() == [0.0, 6.0]
    model = _small("slowfast_r50").eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(pack_pathways(x, 4)))
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        pack_pathways(torch.randn(3, 8, 32, 32))


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if not n.startswith("timm:")])
def test_width_shrinks_params_about_quadratically(name):
    with torch.device("meta"):  # shapes only: skips the weight initialization
        full = _n_params(create_model(name, NUM_CLASSES))
        half = _n_params(create_model(name, NUM_CLASSES, width=0.5))
    assert 0.6 * 0.25 < half / full < 1.6 * 0.25


def test_tiny_c3d_macs_match_the_closed_form():
    from fvcore.nn import FlopCountAnalysis

    model = create_model("tiny_c3d", NUM_CLASSES).eval()
    flops = FlopCountAnalysis(model, torch.randn(1, 3, 16, 64, 64))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    c = 16  # out positions * C_out * C_in * 27 for each 3x3x3 conv (layout in tiny.py)
    expected = (
        16 * 32 * 32 * c * 3 * 27  # stem, stride (1, 2, 2)
        + 8 * 16 * 16 * 2 * c * c * 27  # conv2, stride 2
        + 8 * 8 * 8 * 4 * c * 2 * c * 27  # conv3, stride (1, 2, 2)
        + 2 * 8 * 8 * 8 * 4 * c * 4 * c * 27  # residual block
    )
    assert flops.by_operator()["conv"] == expected


def test_model_info():
    assert model_info("x3d_xs").default_clip == (4, 160, 160)  # pytorchvideo hub x3d_xs
    assert model_info("r3d_18").source == "torchvision"
    assert model_info("timm:resnet50").source == "timm"


# ----------------------------------------------------------------------------- inflation


class Small2d(nn.Module):
    """A 2D net with the layer kinds inflation handles (and odd conv settings)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False),
            nn.BatchNorm2d(8),
            nn.Dropout2d(0.1),
            nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
            nn.Conv2d(8, 16, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def _two_models(kind: str):
    torch.manual_seed(0)
    if kind == "small2d":
        net = Small2d()
    else:
        import timm

        net = timm.create_model(kind, pretrained=False, num_classes=4)
    _randomize_bn(net)
    return net.eval()


@pytest.mark.parametrize("kind", ["small2d", "resnet18", "resnet26d"])
@pytest.mark.parametrize("init,time_kernel", [("center", 3), ("center", 5), ("mean", 1)])
def test_inflation_is_exact_on_static_clips(kind, init, time_kernel):
    net2d = _two_models(kind)
    net3d = inflate_2d_to_3d(net2d, time_kernel, init, verify=False).eval()
    frame = torch.randn(2, 3, 32, 32)
    clip = frame.unsqueeze(2).expand(-1, -1, 3, -1, -1)
    with torch.no_grad():
        y2, y3 = net2d(frame), net3d(clip)
    assert y3.shape == y2.shape == (2, 4)
    torch.testing.assert_close(y3, y2, rtol=1e-5, atol=1e-5 * (1 + y2.abs().max().item()))
    assert all(isinstance(m, nn.Conv2d) for m in net2d.modules() if "Conv" in type(m).__name__)


def test_timm_batchnorm_act_layers_are_inflated_exactly():
    """regnetx_002 uses timm's BatchNormAct2d (BN + act fused in one module)."""
    net2d = _two_models("regnetx_002")
    assert any(type(m).__name__ == "BatchNormAct2d" for m in net2d.modules())
    net3d = inflate_2d_to_3d(net2d, 3, "center", verify=False).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net3d.modules())
    frame = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y2, y3 = net2d(frame), net3d(frame.unsqueeze(2).expand(-1, -1, 3, -1, -1))
    torch.testing.assert_close(y3, y2, rtol=1e-5, atol=1e-5 * (1 + y2.abs().max().item()))


def test_mean_init_is_inexact_at_the_clip_ends():
    """One inflated conv, k_t = 3, mean init: interior frames exact, end frames get 2/3."""
    conv2d = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    conv3d = inflate_2d_to_3d(conv2d, 3, "mean", verify=False)
    assert isinstance(conv3d, nn.Conv3d) and conv3d.kernel_size == (3, 3, 3)
    torch.testing.assert_close(conv3d.weight.sum(2), conv2d.weight.detach())
    frame = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y2, y3 = conv2d(frame), conv3d(frame.unsqueeze(2).expand(-1, -1, 5, -1, -1))
    for t in (1, 2, 3):
        torch.testing.assert_close(y3[:, :, t], y2)
    for t in (0, 4):
        torch.testing.assert_close(y3[:, :, t], y2 * 2 / 3)
    # ... so a deep network with mean init is not exact on a short static clip
    net2d = _two_models("resnet18")
    net3d = inflate_2d_to_3d(net2d, 3, "mean", verify=False).eval()
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        gap = (net3d(frame.unsqueeze(2).expand(-1, -1, 4, -1, -1)) - net2d(frame)).abs().max()
    assert gap > 1e-3


def test_inflation_kernel_choice():
    net2d = _two_models("resnet18")
    kt = {
        n: m.kernel_size[0] for n, m in all_conv3d(inflate_2d_to_3d(net2d, 3, verify=False)).items()
    }
    assert kt["conv1"] == 3 and kt["layer1.0.conv1"] == 3
    assert kt["layer2.0.downsample.0"] == 1  # 1x1 convs keep k_t = 1 by default
    pointwise = inflate_2d_to_3d(net2d, 3, inflate_pointwise=True, verify=False)
    assert pointwise.get_submodule("layer2.0.downsample.0").kernel_size == (3, 1, 1)
    custom = inflate_2d_to_3d(
        net2d, lambda name, conv: 1 if name.startswith("layer4") else 5, verify=False
    )
    assert custom.get_submodule("layer4.0.conv1").kernel_size == (1, 3, 3)
    assert custom.get_submodule("layer1.0.conv1").kernel_size == (5, 3, 3)
    assert isinstance(net2d.conv1, nn.Conv2d)  # the 2D model is left untouched


@pytest.mark.parametrize(
    "time_kernel,init,match",
    [(2, "center", "odd"), (0, "center", "odd"), (3, "random", "init"), (3.0, "center", "odd")],
)
def test_inflation_bad_arguments(time_kernel, init, match):
    with pytest.raises(ValueError, match=match):
        inflate_2d_to_3d(Small2d(), time_kernel, init)


class FunctionalPool2d(nn.Module):
    """A head whose forward only works on 4D tensors: crashes on 5D input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), _F2dPool())

    def forward(self, x):
        return self.head(self.conv(x))


class _F2dPool(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape  # 4D only: raises on a 5D clip
        return x.reshape(n, c, h * w).mean(2)


def test_functional_2d_ops_are_reported_with_the_layer_name():
    with pytest.raises(InflationError, match=r"fails in layer 'head\.1' \(_F2dPool\)"):
        inflate_2d_to_3d(FunctionalPool2d())
    # timm's SE block pools with x.mean((2, 3)): shapes stay broadcastable, values go wrong
    with pytest.raises(InflationError, match=r"layer1\.0\.se"):
        create_model("timm:seresnet18", NUM_CLASSES)


def test_unconvertible_2d_layers_are_named():
    with pytest.raises(InflationError, match=r"LayerNorm2d"):
        create_model("timm:convnext_atto", NUM_CLASSES)

    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    with pytest.raises(InflationError, match=r"'?0 \(SameConv\)"):
        inflate_2d_to_3d(nn.Sequential(SameConv(3, 4, 3), nn.ReLU()))


def test_timm_options():
    model = create_model("timm:resnet18", 3, channels=(8, 16, 32, 64), time_kernel=1)
    assert all(m.kernel_size[0] == 1 for m in all_conv3d(model).values())
    with pytest.raises(ValueError, match="width=0.5 is not supported for timm"):
        create_model("timm:resnet18", 3, width=0.5)
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        create_model("timm:no_such_net", 3)


# ----------------------------------------------------------------------------- checkpoints


def _trained_state(model: nn.Module, clip: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()(clip)  # moves BN running stats away from their init
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny_c3d", "r2plus1d_18", "slowfast_r50", "timm:resnet18"])
def test_checkpoint_round_trip(name, tmp_path):
    clip = torch.randn(2, 3, 4, 32, 32)
    src = _small(name, seed=0)
    state = _trained_state(src, clip)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    torch.manual_seed(1)  # a different random init before loading
    loaded = create_model(name, NUM_CLASSES, checkpoint=path, **SMALL[name])
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(clip), src.eval()(clip), rtol=0, atol=0)


def test_lightning_style_checkpoint_with_prefix(tmp_path):
    src = _small("tiny_c3d")
    state = _trained_state(src, torch.randn(2, 3, 8, 32, 32))
    ckpt = {
        "epoch": 3,
        "global_step": 12,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in state.items()}
        | {"controller.fc.weight": torch.zeros(2, 2)},  # another attribute of the module
        "optimizer_states": [],
        "hyper_parameters": {"lr": 0.01, "model": "tiny_c3d"},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=tmp_path / "last.ckpt")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # nested prefixes (a wrapper around the module) are found too
    torch.save({"state_dict": {f"pruner.model.{k}": v for k, v in state.items()}}, tmp_path / "n")
    nested = create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=tmp_path / "n")
    assert all(torch.equal(v, state[k]) for k, v in nested.state_dict().items())


def test_ambiguous_prefix_needs_an_explicit_one(tmp_path):
    state = _small("tiny_c3d").state_dict()
    teacher = {k: torch.full_like(v, 7) if v.is_floating_point() else v for k, v in state.items()}
    both = {f"student.{k}": v for k, v in state.items()} | {
        f"teacher.{k}": v for k, v in teacher.items()
    }
    torch.save({"state_dict": both}, tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError, match="ambiguous key prefix"):
        create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=tmp_path / "two.ckpt")
    model = create_model(
        "tiny_c3d",
        NUM_CLASSES,
        width=0.5,
        checkpoint=tmp_path / "two.ckpt",
        checkpoint_prefix="teacher.",
    )
    assert torch.equal(model.fc.weight, torch.full_like(model.fc.weight, 7))


@pytest.mark.slow
def test_real_lightning_checkpoint(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = create_model("tiny_c3d", NUM_CLASSES, width=0.5)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(4, 3, 4, 32, 32), torch.randint(0, NUM_CLASSES, (4,)))
    module = Module()
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    loaded = create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=tmp_path / "real.ckpt")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, module.model.state_dict()[k]), k


def test_checkpoint_mismatches_are_listed(tmp_path):
    state = _small("tiny_c3d").state_dict()
    missing = dict(state)
    del missing["fc.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['fc.weight'\]"):
        create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=tmp_path / "missing.pt")
    torch.save(state | {"extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['extra.weight'\]"):
        create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=tmp_path / "extra.pt")
    torch.save(state, tmp_path / "w05.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches .*another width or num_classes"):
        create_model("tiny_c3d", NUM_CLASSES, width=1.0, checkpoint=tmp_path / "w05.pt")


def test_unreadable_checkpoints_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*garbage\.ckpt"):
        create_model("tiny_c3d", NUM_CLASSES, checkpoint=garbage)
    good = tmp_path / "good.pt"
    torch.save(_small("tiny_c3d").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated\.pt"):
        create_model("tiny_c3d", NUM_CLASSES, width=0.5, checkpoint=truncated)
    pickled = tmp_path / "module.pt"
    torch.save(Small2d(), pickled)  # a whole pickled module: weights_only=True refuses it
    with pytest.raises(CheckpointError, match=r"module\.pt"):
        create_model("tiny_c3d", NUM_CLASSES, checkpoint=pickled)
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        create_model("tiny_c3d", NUM_CLASSES, checkpoint=tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        create_model("tiny_c3d", NUM_CLASSES, checkpoint=tmp_path / "nowhere.pt")


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("name", ["resnet18", "timm:", "R3D_18", "", 3])
def test_unknown_name_lists_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown model .*r3d_18.*x3d_xs.*'timm:<name>'"):
        create_model(name, NUM_CLASSES)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": 3, "width": 0}, "width"),
        ({"num_classes": 3, "width": -1.0}, "width"),
        ({"num_classes": 3, "width": math.inf}, "width"),
    ],
)
def test_bad_num_classes_or_width(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("tiny_c3d", **kwargs)


def test_unknown_builder_options_are_rejected():
    with pytest.raises(TypeError, match="no extra keyword"):
        create_model("r3d_18", 3, dropout=0.5)
    with pytest.raises(TypeError):
        create_model("tiny_c3d", 3, no_such_option=1)
