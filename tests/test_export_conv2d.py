"""The Conv3d -> Conv2d-only rewrite (lightning_dance.export.conv2d_rewrite)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_dance.export.conv2d_rewrite import (
    Conv3dAs2d,
    UnsupportedOpError,
    conv3d_as_conv2d,
    fold_time,
    pad_folded,
    pool3d_folded,
    replace_conv3d,
    rewrite_conv3d_to_conv2d,
    unfold_time,
)
from lightning_dance.models import create_model


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(3))
    if pad_kind == "same":
        stride = (1, 1, 1)
        padding = "same"
    elif pad_kind == "valid":
        padding = "valid"
    elif pad_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(3))
    # the input must be large enough for the kernel and (reflect) the padding
    pads = (padding,) * 3 if isinstance(padding, int) else padding
    if isinstance(pads, str):
        pads = tuple(d * (k - 1) for k, d in zip(kernel, dilation, strict=True))
    size = [
        max(d * (k - 1) + 1, p + 1) + draw(st.integers(0, 3))
        for k, d, p in zip(kernel, dilation, pads, strict=True)
    ]
    batch = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    return c_in, c_out, kernel, stride, padding, dilation, groups, mode, size, batch, bias


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.integers(0, 2**16))
def test_conv3d_as2d_matches_conv3d(case, seed):
    c_in, c_out, kernel, stride, padding, dilation, groups, mode, size, batch, bias = case
    torch.manual_seed(seed)
    conv = nn.Conv3d(
        c_in, c_out, kernel, stride, padding, dilation, groups, bias=bias, padding_mode=mode
    )
    x = torch.randn(batch, c_in, *size)
    ref = conv(x)
    got = Conv3dAs2d.from_conv3d(conv)(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5
    # folded in / folded out
    folded = Conv3dAs2d.from_conv3d(conv, folded_batch=batch)(fold_time(x))
    assert (unfold_time(folded, batch) - ref).abs().max() <= 1e-5


def test_functional_and_bn_folding():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 6, 3, stride=(2, 1, 2), padding=(1, 0, 1), bias=False)
    bn = nn.BatchNorm3d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 4, 7, 9, 9)
    ref = bn(conv(x))
    assert (Conv3dAs2d.from_conv3d(conv, bn)(x) - ref).abs().max() < 1e-5
    y = conv3d_as_conv2d(x, conv.weight, None, conv.stride, conv.padding)
    assert (y - F.conv3d(x, conv.weight, None, conv.stride, conv.padding)).abs().max() < 1e-5


def test_padding_only_taps_give_bias():
    conv = nn.Conv3d(2, 3, (3, 1, 1), padding=(4, 0, 0))  # outer output frames read only padding
    x = torch.randn(1, 2, 1, 4, 4)
    assert (Conv3dAs2d.from_conv3d(conv)(x) - conv(x)).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool3d_folded(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9, 9)
    if kind == "max":
        ref = F.max_pool3d(x, 3, (2, 2, 1), 1, dilation=(2, 1, 1))
        got = pool3d_folded(fold_time(x), 2, "max", 3, (2, 2, 1), 1, (2, 1, 1))
    else:
        ref = F.avg_pool3d(x, 3, 2, 1)
        got = pool3d_folded(fold_time(x), 2, "avg", 3, 2, 1)
    assert (unfold_time(got, 2) - ref).abs().max() < 1e-6


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_pad_folded(mode):
    x = torch.randn(2, 3, 4, 5, 5)
    pad = (1, 2, 0, 1, 2, 1)
    ref = F.pad(x, pad, mode=mode)
    assert torch.equal(unfold_time(pad_folded(fold_time(x), 2, pad, mode), 2), ref)


def test_replace_conv3d(small_net, clip):
    swapped = replace_conv3d(small_net)
    assert not any(isinstance(m, nn.Conv3d) for m in swapped.modules())
    assert any(isinstance(m, nn.Conv3d) for m in small_net.modules())  # a copy
    assert (swapped(clip) - small_net(clip)).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["clip", "folded"])
def test_rewrite_whole_models(small_net, layout):
    torch.manual_seed(0)
    clip = torch.randn(2, 3, 4, 16, 16)
    for net in (small_net, create_model("tiny_c3d", num_classes=4).eval()):
        flat = rewrite_conv3d_to_conv2d(net, clip, input_layout=layout, strict=True)
        info = flat.rewrite_info
        assert info.unfolded_ops == [] and info.conv3d_replaced == 5
        assert info.max_abs_error < 1e-5
        x = fold_time(clip) if layout == "folded" else clip
        assert (flat(x) - net(clip)).abs().max() < 1e-5
        aten = {str(n.target) for n in flat.graph.nodes if str(n.target).startswith("aten.")}
        assert not any("conv3d" in t or "batch_norm" in t or "pool3d" in t for t in aten)


def test_rewrite_pooling_and_padding_modes():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1),
        nn.MaxPool3d(3, 2, 1),
        nn.AvgPool3d(2),
        nn.Conv3d(8, 8, (3, 1, 1), padding="same", padding_mode="reflect"),
        nn.Conv3d(8, 4, 2, padding="same", padding_mode="circular"),
    ).eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    flat = rewrite_conv3d_to_conv2d(net, clip, input_layout="folded", strict=True)
    assert flat.rewrite_info.pools_folded == 2
    assert (unfold_time(flat(fold_time(clip)), 1) - net(clip)).abs().max() < 1e-5


def test_strict_names_the_op():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).transpose(2, 3).sum()

    clip = torch.randn(1, 3, 4, 8, 8)
    with pytest.raises(UnsupportedOpError, match="transpose") as info:
        rewrite_conv3d_to_conv2d(Odd().eval(), clip, strict=True)
    assert "transpose" in info.value.op
    loose = rewrite_conv3d_to_conv2d(Odd().eval(), clip)  # unfolds to 5-d for that op
    assert loose.rewrite_info.unfolded_ops == ["transpose.int"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r2plus1d_18", "x3d_xs"])
def test_rewrite_factory_models(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=4, width=0.25).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    flat = rewrite_conv3d_to_conv2d(net, clip)
    assert flat.rewrite_info.max_abs_error < 1e-5
    assert flat.rewrite_info.conv3d_replaced == sum(isinstance(m, nn.Conv3d) for m in net.modules())


class _Gathered(nn.Module):
    """Per-clip gathers as the DANCE export modules compute them: clips sliced off the batch,
    channels and frames selected with index_select, convs on the gathered inputs, clips
    concatenated back, a conv on that."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1)
        self.conv = nn.Conv3d(8, 6, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Conv3d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        outs = []
        for i in range(h.shape[0]):
            one = h[i : i + 1]
            c_idx = one.mean((0, 2, 3, 4)).topk(4).indices
            f_idx = one.mean((0, 1, 3, 4)).topk(2).indices
            one = one.index_select(1, c_idx).index_select(2, f_idx)
            w = self.conv.weight.index_select(1, c_idx)
            outs.append(F.conv3d(one, w, self.conv.bias, padding=(0, 1, 1)))
        return self.head(torch.cat(outs, dim=0)).float()


@pytest.mark.parametrize("batch", [1, 2])
def test_rewrite_gathers_run_folded(batch):
    torch.manual_seed(0)
    net = _Gathered().eval()
    clip = torch.randn(batch, 3, 4, 8, 8)
    flat = rewrite_conv3d_to_conv2d(net, clip)
    assert flat.rewrite_info.conv3d_replaced == 2 + batch  # stem, head and one per clip
    assert flat.rewrite_info.max_abs_error < 1e-5
    other = 3 * torch.randn(batch, 3, 4, 8, 8)  # other gathers than the example clip's
    assert (flat(other) - net(other)).abs().max() < 1e-5
    ops = [n for n in flat.graph.nodes if n.target is torch.ops.aten.index_select.default]
    # clips are row ranges and frames of one clip are rows of the folded tensor: the gathers
    # run folded (only the score reductions unfold)
    assert set(flat.rewrite_info.unfolded_ops) == {"mean.dim"}
    assert {n.args[1] for n in ops} >= {0, 1}


def test_rule_table_entry_handles_an_op(monkeypatch):
    """Supporting an op is one rule in RULES: softplus has none, so strict mode names it; a
    rule for it makes the rewrite run it folded, with the model's outputs."""
    from lightning_dance.export.conv2d_rules import RULES

    softplus = torch.ops.aten.softplus.default
    assert softplus not in RULES

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv3d(3, 4, 3, padding=1)
            self.b = nn.Conv3d(4, 2, 3, padding=1)

        def forward(self, x):
            return self.b(F.softplus(self.a(x)))

    torch.manual_seed(0)
    net, clip = Soft().eval(), torch.randn(2, 3, 4, 8, 8)
    with pytest.raises(UnsupportedOpError, match="softplus") as err:
        rewrite_conv3d_to_conv2d(net, clip, strict=True)
    assert err.value.op == "softplus.default"

    def rule_softplus(ctx, node):  # elementwise: the op runs on the folded tensor as it is
        if node.args[0] not in ctx.folded:
            return False
        ctx.folded[node] = ctx.folded[node.args[0]]
        return True

    monkeypatch.setitem(RULES, softplus, rule_softplus)
    flat = rewrite_conv3d_to_conv2d(net, clip, input_layout="folded", strict=True)
    assert flat.rewrite_info.unfolded_ops == [] and flat.rewrite_info.conv3d_replaced == 2
    assert softplus in {n.target for n in flat.graph.nodes}
    assert (unfold_time(flat(fold_time(clip)), 2) - net(clip)).abs().max() < 1e-5

    monkeypatch.delitem(RULES, softplus)
    with pytest.raises(UnsupportedOpError, match="softplus") as err:
        rewrite_conv3d_to_conv2d(net, clip, strict=True)
    assert err.value.op == "softplus.default"
