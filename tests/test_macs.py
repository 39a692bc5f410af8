"""MAC / traffic / energy accounting, checked against independent references.

References: a brute-force enumeration of the multiply-adds the fast path needs (plain numpy loops
over output positions and taps, which also *performs* those MACs and must reproduce the masked
dense forward pass), fvcore, torch's ``FlopCounterMode`` and closed-form conv counts measured
with forward hooks, Monte Carlo sampling for expected counts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_dance.executed import (
    conv3d_executed_macs,
    conv3d_executed_macs_batch,
    conv3d_expected_macs,
    conv3d_mac_factors,
)
from lightning_dance.geometry import ConvGeometry, conv3d_input_shapes
from lightning_dance.macs import MacCountError, count_macs, count_module_macs
from lightning_dance.masks import expand_blocks
from lightning_dance.traffic import conv3d_memory_traffic

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
HYP = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
_NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


# ------------------------------------------------------------------------ brute-force reference
def _pads(conv: nn.Conv3d) -> list[tuple[int, int]]:
    if conv.padding == "same":
        tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in tot]
    if conv.padding == "valid":
        return [(0, 0)] * 3
    return [(p, p) for p in conv.padding]


def brute_force(conv, x, frame=None, channel=None, feature=None):
    """Enumerate output positions and taps; count AND perform only the MACs the fast path needs.

    Returns ``(macs, out, computed)``: the count, the output built from those MACs only
    (bias + contributions) and a bool [T_out, H_out, W_out] of positions with >= 1 MAC.
    """
    c, t, h, w = x.shape
    mt = np.ones(t) if frame is None else np.asarray(frame, dtype=float)
    mc = np.ones(c) if channel is None else np.asarray(channel, dtype=float)
    mf = np.ones((h, w)) if feature is None else np.asarray(feature, dtype=float)
    xm = x * mt[None, :, None, None] * mc[:, None, None, None] * mf[None, None]
    pads = _pads(conv)
    mode = _NP_MODES[conv.padding_mode]
    xp = np.pad(xm, [(0, 0), *pads], mode=mode)
    # which padded frame / position holds a kept real input (padding zeros are never "kept")
    tp = np.pad(mt, [pads[0]], mode=mode)
    fp = np.pad(mf, pads[1:], mode=mode)
    wgt = conv.weight.detach().double().numpy()
    bias = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(len(wgt))
    (kt, kh, kw), (st_, sh, sw), (dt, dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    to = (xp.shape[1] - dt * (kt - 1) - 1) // st_ + 1
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    g = conv.groups
    cin_g, cout_g = c // g, conv.out_channels // g
    out = np.repeat(bias[:, None, None, None], to * ho * wo, 1).reshape(-1, to, ho, wo)
    computed = np.zeros((to, ho, wo), dtype=bool)
    macs = 0
    for a in range(to):
        for b in range(ho):
            for e in range(wo):
                rows = [b * sh + i * dh for i in range(kh)]
                cols = [e * sw + j * dw for j in range(kw)]
                if feature is not None and not fp[np.ix_(rows, cols)].any():
                    continue  # receptive field holds no kept position: filled with the bias
                for k in range(kt):
                    q = a * st_ + k * dt
                    if frame is not None and not tp[q]:
                        continue  # tap reads zero padding or a dropped frame: skipped
                    for grp in range(g):
                        ci = [i for i in range(grp * cin_g, (grp + 1) * cin_g) if mc[i]]
                        if channel is None:
                            ci = list(range(grp * cin_g, (grp + 1) * cin_g))
                        if not ci:
                            continue
                        co = slice(grp * cout_g, (grp + 1) * cout_g)
                        patch = xp[np.ix_(ci, [q], rows, cols)][:, 0]  # [ci, kh, kw]
                        wsel = wgt[co][:, [i - grp * cin_g for i in ci], k]  # [co, ci, kh, kw]
                        out[co, a, b, e] += np.einsum("oihw,ihw->o", wsel, patch)
                        macs += cout_g * len(ci) * kh * kw
                        computed[a, b, e] = True
    return macs, out, computed


@dataclass
class Case:
    conv: nn.Conv3d
    shape: tuple[int, int, int, int]
    frame: torch.Tensor | None
    channel: torch.Tensor | None
    feature: torch.Tensor | None


@st.composite
def conv_cases(draw, masked: bool = True) -> Case:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    if draw(st.booleans()):
        groups = cin  # depthwise
    cout = groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(3))
    d = tuple(draw(st.integers(1, 2)) for _ in range(3))
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"]))
    if draw(st.integers(0, 4)) == 0:
        s, padding = (1, 1, 1), "same"
    else:
        s = tuple(draw(st.integers(1, 2)) for _ in range(3))
        padding = tuple(draw(st.integers(0, 2)) for _ in range(3))
    size = tuple(draw(st.integers(1, 5)) for _ in range(3))
    conv = nn.Conv3d(cin, cout, k, stride=s, padding=padding, dilation=d, groups=groups,
                     bias=draw(st.booleans()), padding_mode=mode)  # fmt: skip
    pads = _pads(conv)
    for (lo, hi), n, kk, dd in zip(pads, size, k, d, strict=True):
        assume(n + lo + hi - dd * (kk - 1) - 1 >= 0)  # at least one output
        if mode == "reflect":
            assume(max(lo, hi) < n)
        if mode == "circular":
            assume(max(lo, hi) <= n)

    def mask(n: int | tuple[int, int]) -> torch.Tensor | None:
        if not masked or draw(st.booleans()):
            return None
        count = n if isinstance(n, int) else n[0] * n[1]
        bits = draw(st.lists(st.integers(0, 1), min_size=count, max_size=count))
        return torch.tensor(bits, dtype=torch.float32).view(n if isinstance(n, tuple) else -1)

    return Case(conv, (cin, *size), mask(size[0]), mask(cin), mask(size[1:]))


def _np(m: torch.Tensor | None):
    return None if m is None else m.numpy()


# ---------------------------------------------------------------------------- executed MACs
@HYP
@given(conv_cases())
def test_executed_macs_equal_brute_force_and_skipped_macs_are_not_needed(case: Case):
    x = torch.randn(case.shape, dtype=torch.float64)
    conv = case.conv.double()
    macs, out, computed = brute_force(conv, x.numpy(), _np(case.frame), _np(case.channel),
                                      _np(case.feature))  # fmt: skip
    got = conv3d_executed_macs(conv, case.shape, frame=case.frame, channel=case.channel,
                               feature=case.feature)  # fmt: skip
    assert got == macs
    # the MACs we skip are not needed: the masked dense forward pass equals the brute force,
    # and every position the count does not compute equals conv(0) = bias
    masks = [case.frame, case.channel, case.feature]
    xm = x.clone()
    if masks[0] is not None:
        xm = xm * masks[0].double().view(1, -1, 1, 1)
    if masks[1] is not None:
        xm = xm * masks[1].double().view(-1, 1, 1, 1)
    if masks[2] is not None:
        xm = xm * masks[2].double()[None, None]
    with torch.no_grad():
        dense_out = conv(xm[None])[0].numpy()
    np.testing.assert_allclose(out, dense_out, atol=1e-9)
    bias = conv.bias.detach().numpy() if conv.bias is not None else np.zeros(conv.out_channels)
    idle = ~computed
    np.testing.assert_allclose(dense_out[:, idle], np.repeat(bias[:, None], idle.sum(), 1),
                               atol=1e-12)  # fmt: skip


@HYP
@given(conv_cases(masked=False))
def test_dense_count_equals_fvcore_on_single_layers(case: Case):
    got = count_macs(case.conv, (1, *case.shape), per_module=False)
    assert got.method == "fvcore"
    assert got.by_operator.get("conv", 0) == conv3d_executed_macs(case.conv, case.shape)
    assert got.by_operator.get("conv", 0) == ConvGeometry.of(case.conv, case.shape).dense_macs
    assert got.uncounted == {}


def test_batched_count_equals_per_sample_count():
    conv = nn.Conv3d(6, 4, (3, 3, 3), stride=(1, 2, 2), padding=1, groups=2)
    n, shape = 5, (6, 4, 7, 7)
    gen = torch.Generator().manual_seed(1)
    masks = {
        "frame": (torch.rand(n, 4, generator=gen) > 0.4).float(),
        "channel": (torch.rand(n, 6, generator=gen) > 0.5).float(),
        "feature": (torch.rand(n, 7, 7, generator=gen) > 0.7).float(),
    }
    batched = conv3d_executed_macs_batch(conv, shape, **masks)
    assert batched.dtype == torch.int64 and batched.shape == (n,)
    for i in range(n):
        single = {k: v[i] for k, v in masks.items()}
        ref, _, _ = brute_force(conv, np.zeros(shape), **{k: v.numpy() for k, v in
                                                                     single.items()})  # fmt: skip
        assert int(batched[i]) == ref == conv3d_executed_macs(conv, shape, **single)


def test_all_kept_masks_and_documented_padding_taps():
    conv = nn.Conv3d(4, 8, 3, padding=1)
    shape = (4, 2, 4, 4)
    dense = 8 * 4 * 27 * 2 * 4 * 4
    assert conv3d_executed_macs(conv, shape) == dense
    assert conv3d_executed_macs(conv, shape, channel=torch.ones(4)) == dense
    assert conv3d_executed_macs(conv, shape, feature=torch.ones(4, 4)) == dense
    # frame mask all kept: of the 2 x 3 (t', k) pairs, 2 read zero padding and are skipped
    assert conv3d_executed_macs(conv, shape, frame=torch.ones(2)) == dense * 4 // 6


# --------------------------------------------------------------------------- expected MACs
@HYP
@given(conv_cases(), st.data())
def test_expected_equals_hard_count_at_0_1_probabilities(case: Case, data):
    hard = conv3d_executed_macs_batch(case.conv, case.shape, frame=case.frame,
                                      channel=case.channel, feature=case.feature)  # fmt: skip
    exp = conv3d_expected_macs(case.conv, case.shape, frame_p=case.frame, channel_p=case.channel,
                               feature_p=case.feature)  # fmt: skip
    assert exp.dtype == torch.float64
    assert exp.item() == hard.item()
    # block-constant feature masks: per-block probabilities give the same count
    _, h, w = case.shape[1:]
    gh, gw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    blocks = torch.tensor(
        data.draw(st.lists(st.integers(0, 1), min_size=gh * gw, max_size=gh * gw)),
        dtype=torch.float32,
    )
    blocks = blocks.view(1, gh, gw)
    full = expand_blocks(blocks, (h, w))
    hard = conv3d_executed_macs_batch(case.conv, case.shape, frame=case.frame,
                                      channel=case.channel, feature=full)  # fmt: skip
    exp = conv3d_expected_macs(case.conv, case.shape, frame_p=case.frame, channel_p=case.channel,
                               feature_blocks_p=blocks)  # fmt: skip
    assert exp.item() == hard.item()


CONVS = [
    nn.Conv3d(4, 6, 3, padding=1),
    nn.Conv3d(4, 4, (3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1), groups=4),
    nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 2, 2), dilation=(1, 2, 2)),
    nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), padding_mode="reflect"),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: str(c)[7:40])
def test_expected_macs_gradients_and_monte_carlo(conv):
    shape, n = (4, 4, 8, 8), 1
    gen = torch.Generator().manual_seed(0)
    p_t = (0.2 + 0.6 * torch.rand(n, 4, generator=gen)).requires_grad_()
    p_c = (0.2 + 0.6 * torch.rand(n, 4, generator=gen)).requires_grad_()
    p_b = (0.2 + 0.6 * torch.rand(n, 2, 2, generator=gen)).requires_grad_()
    exp = conv3d_expected_macs(conv, shape, frame_p=p_t, channel_p=p_c, feature_blocks_p=p_b)
    exp.sum().backward()
    assert (p_c.grad > 0).all() and (p_b.grad > 0).all()
    g = ConvGeometry.of(conv, shape)
    assert (p_t.grad >= 0).all() and (p_t.grad > 0).sum() >= 1
    # Monte Carlo: average hard count of independent Bernoulli masks (one draw per block)
    draws = 4000
    gen = torch.Generator().manual_seed(1)
    m_t = (torch.rand(draws, 4, generator=gen) < p_t.detach()).float()
    m_c = (torch.rand(draws, 4, generator=gen) < p_c.detach()).float()
    m_b = (torch.rand(draws, 2, 2, generator=gen) < p_b.detach()).float()
    hard = conv3d_executed_macs_batch(conv, shape, frame=m_t, channel=m_c,
                                      feature=expand_blocks(m_b, (8, 8)))  # fmt: skip
    mean, sem = hard.double().mean(), hard.double().std() / math.sqrt(draws)
    assert abs(exp.item() - mean.item()) < 4 * sem.item() + 1e-9 * g.dense_macs
    # per-position independence (feature_p) over-estimates block-constant masks, as documented
    full_p = expand_blocks(p_b.detach(), (8, 8))
    indep = conv3d_expected_macs(conv, shape, frame_p=p_t, channel_p=p_c, feature_p=full_p)
    assert indep.item() >= exp.item() - 1e-6


def test_expected_feature_gradient_per_position():
    conv = nn.Conv3d(2, 2, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    p = torch.full((1, 6, 6), 0.5, requires_grad=True)
    conv3d_expected_macs(conv, (2, 1, 6, 6), feature_p=p).sum().backward()
    assert (p.grad > 0).all()  # every position lies in some receptive field


# ---------------------------------------------------------------------------- memory traffic
def _unused_taps(conv, t: int) -> int:
    (lo, hi), k, s, d = _pads(conv)[0], conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    t_out = (t + lo + hi - d * (k - 1) - 1) // s + 1
    used = {tap for a in range(t_out) for tap in range(k) if 0 <= a * s - lo + tap * d < t}
    return k - len(used)


@pytest.mark.parametrize("conv", CONVS + [nn.Conv3d(2, 2, 3, padding=2)], ids=str)
def test_traffic_all_kept_is_dense_plus_gather_and_scatter(conv):
    shape = (conv.in_channels, 2, 8, 8)
    c, g = conv.in_channels, ConvGeometry.of(conv, (conv.in_channels, 2, 8, 8))
    masks = {"frame": torch.ones(1, 2), "channel": torch.ones(1, c), "feature": torch.ones(1, 8, 8)}
    tr = conv3d_memory_traffic(conv, shape, **masks, bytes_per_element=4)
    b, out = tr.breakdown, tr.dense_breakdown
    assert int(b["input_read"]) == out["input_read"] == c * 2 * 64 * 4
    assert int(b["output_write"]) == out["output_write"]
    per_tap = conv.out_channels * (c // conv.groups) * math.prod(conv.kernel_size[1:]) * 4
    unused = _unused_taps(conv, 2)
    assert int(b["weight_read"]) == out["weight_read"] - unused * per_tap
    # gather: read + write the kept input, read + write the kept weight slice
    sliced = (
        out["weight_read"]
        - unused * per_tap
        - (conv.out_channels * 4 if conv.bias is not None else 0)
    )
    assert int(b["gather_overhead"]) == 2 * out["input_read"] + 2 * sliced
    # scatter: every computed (frame, tap) pair's partial output is accumulated (read + write)
    pairs = conv3d_executed_macs(conv, shape, frame=torch.ones(2)) // (
        (conv.out_channels // conv.groups) * c * math.prod(g.kernel[1:]) * math.prod(g.output[1:])
    )  # fmt: skip
    assert int(b["scatter_overhead"]) == 2 * conv.out_channels * math.prod(g.output[1:]) * pairs * 4
    assert int(tr.executed_bytes) == tr.dense_bytes - unused * per_tap + int(
        b["gather_overhead"] + b["scatter_overhead"]
    )
    # no mask at all: executed == dense, no gather, no scatter
    plain = conv3d_memory_traffic(conv, shape)
    assert int(plain.executed_bytes) == plain.dense_bytes
    assert int(plain.breakdown["gather_overhead"]) == int(plain.breakdown["scatter_overhead"]) == 0


def test_traffic_hand_computed():
    conv = nn.Conv3d(4, 8, 3, padding=1)
    shape = (4, 4, 4, 4)
    frame = torch.tensor([1.0, 0, 1, 1])
    channel = torch.tensor([1.0, 1, 0, 0])
    feature = torch.zeros(4, 4)
    feature[:2] = 1
    tr = conv3d_memory_traffic(conv, shape, frame=frame, channel=channel, feature=feature,
                               bytes_per_element=2)  # fmt: skip
    assert tr.dense_breakdown == {"input_read": 4 * 64 * 2, "weight_read": (8 * 4 * 27 + 8) * 2,
                                  "output_write": 8 * 64 * 2}  # fmt: skip
    b = {k: int(v) for k, v in tr.breakdown.items()}
    assert b["input_read"] == 2 * 3 * 8 * 2  # 2 channels x 3 frames x 8 positions
    assert b["weight_read"] == (8 * 2 * 3 * 9 + 8) * 2  # all 3 temporal taps still read
    assert b["output_write"] == 8 * 64 * 2
    assert b["gather_overhead"] == (2 * 2 * 3 * 16 + 2 * 8 * 2 * 3 * 9) * 2
    # kept frames 0, 2, 3 with k=3, pad=1: (t', tap) pairs reading them: 2 + 3 + 2 = 7 (of 12);
    # rows 0-1 kept: output rows 0-2 have a kept position in their field: 12 of 16 positions
    assert b["scatter_overhead"] == 2 * 8 * 12 * 7 * 2
    feature_only = conv3d_memory_traffic(conv, shape, feature=feature)
    assert int(feature_only.breakdown["gather_overhead"]) == 0
    assert int(feature_only.breakdown["input_read"]) == 4 * 4 * 8 * 4
    assert int(feature_only.breakdown["scatter_overhead"]) == 2 * 8 * 4 * 12 * 4  # copy, T_out=4
    channel_only = conv3d_memory_traffic(conv, shape, channel=channel)
    assert int(channel_only.breakdown["scatter_overhead"]) == 0  # one conv writes the output
    grouped = nn.Conv3d(4, 6, 1, groups=2)  # group 1 has no kept channel: 3 outputs computed
    tr = conv3d_memory_traffic(grouped, shape, channel=channel)
    assert int(tr.breakdown["scatter_overhead"]) == 2 * 3 * 64 * 4


@HYP
@given(conv_cases())
def test_traffic_from_kept_fractions_matches_masks_up_to_documented_bounds(case: Case):
    masks = {d: m for d, m in (("frame", case.frame), ("channel", case.channel),
                               ("feature", case.feature)) if m is not None}  # fmt: skip
    exact = conv3d_memory_traffic(case.conv, case.shape, **masks)
    executed = conv3d_executed_macs_batch(case.conv, case.shape, batch_size=1, **masks)
    kept = {d: m.flatten().float().mean().view(1) for d, m in masks.items()}
    approx = conv3d_memory_traffic(case.conv, case.shape, kept=kept, executed_macs=executed)
    e = {k: int(v) for k, v in exact.breakdown.items()}
    a = {k: int(v) for k, v in approx.breakdown.items()}
    assert approx.dense_breakdown == exact.dense_breakdown
    assert a["input_read"] == e["input_read"] and a["output_write"] == e["output_write"]
    for key in ("weight_read", "gather_overhead"):  # all kT taps counted when frames masked
        assert a[key] >= e[key]
        if case.frame is None:
            assert a[key] == e[key]
    assert a["scatter_overhead"] >= e["scatter_overhead"]  # all output channels counted
    if case.channel is None or case.conv.groups == 1:
        assert a["scatter_overhead"] == e["scatter_overhead"]


@HYP
@given(conv_cases())
def test_mac_factors_multiply_to_the_executed_count(case: Case):
    masks = {"frame": case.frame, "channel": case.channel, "feature": case.feature}
    factors = conv3d_mac_factors(case.conv, case.shape, **masks)
    executed = conv3d_executed_macs(case.conv, case.shape, **masks)
    dense = ConvGeometry.of(case.conv, case.shape).dense_macs
    product = dense * math.prod(float(f) for f in factors.values())
    assert product == pytest.approx(executed, rel=1e-12, abs=1e-9)
    if case.channel is not None:
        assert float(factors["channel"]) == pytest.approx(float(case.channel.mean()))
    for dim, mask in masks.items():
        if mask is None:
            assert float(factors[dim]) == 1.0


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_have_clear_errors():
    conv = nn.Conv3d(4, 8, 3, padding=1)
    with pytest.raises(ValueError, match=r"frame mask .* \[N, T\] = \[N, 4\]"):
        conv3d_executed_macs_batch(conv, (4, 4, 8, 8), frame=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"feature mask .* \[N, 8, 8\]"):
        conv3d_executed_macs_batch(conv, (4, 4, 8, 8), feature=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="one sample"):
        conv3d_executed_macs(conv, (4, 4, 8, 8), channel=torch.ones(2, 4))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        conv3d_executed_macs_batch(conv, (4, 4, 8, 8), channel=torch.ones(2, 4),
                                   frame=torch.ones(3, 4))  # fmt: skip
    with pytest.raises(ValueError, match="3 channels but the conv expects 4"):
        conv3d_executed_macs(conv, (3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        conv3d_executed_macs(conv, (1, 4, 4, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        conv3d_executed_macs(nn.Conv3d(4, 4, 3), (4, 2, 8, 8))
    with pytest.raises(TypeError, match="nn.Conv3d"):
        conv3d_executed_macs(nn.Conv2d(4, 4, 3), (4, 2, 8, 8))
    with pytest.raises(ValueError, match="not both"):
        conv3d_expected_macs(conv, (4, 4, 8, 8), feature_p=torch.ones(1, 8, 8),
                             feature_blocks_p=torch.ones(1, 2, 2))  # fmt: skip
    with pytest.raises(ValueError, match="5-d tensor"):
        count_macs(conv, torch.randn(4, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(C, T, H, W\) or \(N, C, T, H, W\)"):
        count_macs(conv, (4, 8, 8))
    with pytest.raises(ValueError, match="backend"):
        count_macs(conv, (4, 4, 8, 8), backend="jit")
    with pytest.raises(ValueError, match="not both"):
        conv3d_memory_traffic(
            conv,
            (4, 4, 8, 8),
            channel=torch.ones(1, 4),
            kept={"channel": torch.ones(1)},
            executed_macs=torch.ones(1),
        )
    with pytest.raises(ValueError, match="need executed_macs"):
        conv3d_memory_traffic(conv, (4, 4, 8, 8), kept={"channel": torch.ones(1)})
    with pytest.raises(ValueError, match="unknown dims"):
        conv3d_memory_traffic(conv, (4, 4, 8, 8), kept={"time": torch.ones(1)},
                              executed_macs=torch.ones(1))  # fmt: skip


# ------------------------------------------------------------------- fallback and failures
class _Opaque(torch.autograd.Function):
    """A custom Function hiding a conv from the jit trace."""

    @staticmethod
    def forward(ctx, x, weight):
        return F.conv3d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never called
        raise NotImplementedError


class OpaqueNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 4, 1)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3, 3))

    def forward(self, x):
        return _Opaque.apply(self.stem(x), self.weight)


@dataclass
class Output:
    logits: torch.Tensor
    note: str


class DataclassOutputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, x):
        return Output(self.conv(x), "jit cannot trace a dataclass output")


class BranchyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 4, 1)
        self.b = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) if float(x.mean()) > 0 else self.b(x)


class BrokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(3, 4, 1), nn.Conv3d(5, 4, 1))

    def forward(self, x):
        return self.body(x)


def test_fallback_for_custom_autograd_function():
    clip = torch.randn(1, 3, 2, 4, 4)
    expected = 4 * 3 * 32 + 4 * 4 * 27 * 32
    with pytest.warns(UserWarning, match="opaque to the jit trace.*FlopCounterMode") as rec:
        got = count_macs(OpaqueNet(), clip)
    assert len(rec) == 1
    assert got.method == "dispatch" and got.total == expected
    assert got.by_module["stem"] == 4 * 3 * 32
    only_fvcore = count_macs(OpaqueNet(), clip, backend="fvcore")  # misses the hidden conv
    assert only_fvcore.total == 4 * 3 * 32 and "PythonOp._Opaque" in only_fvcore.uncounted


def test_fallback_when_tracing_fails():
    with pytest.warns(UserWarning, match="tracing failed after the forward returned") as rec:
        got = count_macs(DataclassOutputNet(), (3, 2, 4, 4))
    assert len(rec) == 1
    assert got.method == "dispatch" and got.total == 4 * 3 * 27 * 32 == got.by_module["conv"]


class _NoTrace(nn.Module):
    """Runs eagerly, refuses to be traced (as code calling .item()/numpy on purpose would)."""

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("this block cannot be traced")
        return x * 2


class TraceHostileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(3, 4, 1), _NoTrace(), nn.Conv3d(4, 4, 1))

    def forward(self, x):
        return self.body(x)


def test_trace_failure_names_the_module_and_falls_back():
    with pytest.raises(MacCountError, match=r"fvcore cannot count.*module 'body\.1' \(_NoTrace\)"
                       r".*cannot be traced.*backend='auto'"):  # fmt: skip
        count_macs(TraceHostileNet(), (3, 2, 4, 4), backend="fvcore")
    with pytest.warns(UserWarning, match=r"tracing failed in module 'body\.1'.*FlopCounterMode"):
        got = count_macs(TraceHostileNet(), (3, 2, 4, 4))
    assert got.method == "dispatch"
    assert got.by_operator == {"conv": 4 * 3 * 32 + 4 * 4 * 32, "mul": 4 * 32}
    assert got.by_module["body.1"] == 4 * 32 and got.by_module["body.2"] == 4 * 4 * 32


def test_counting_is_quiet_in_a_fresh_process():
    """fvcore's import (7 "torch.jit.script is deprecated" warnings) and its tracing stay quiet,
    even with every warning shown."""
    import subprocess
    import sys

    code = (
        "import torch.nn as nn\n"
        "from lightning_dance.macs import count_macs\n"
        "net = nn.Sequential(nn.Conv3d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool3d(1))\n"
        "for _ in range(3):\n"
        "    count_macs(net, (3, 4, 8, 8))\n"
    )
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and run.stdout == ""


def test_moved_names_still_import_from_macs_with_a_deprecation_warning():
    """Names that moved out of ``lightning_dance.macs`` work from there for one release, warn
    with their new home, and are the same objects; unknown names still raise."""
    import lightning_dance.macs as macs
    from lightning_dance import executed, geometry, traffic

    for name, module in [("ConvGeometry", geometry), ("conv3d_input_shapes", geometry),
                         ("conv3d_executed_macs", executed), ("conv3d_mac_factors", executed),
                         ("Traffic", traffic), ("conv3d_memory_traffic", traffic)]:  # fmt: skip
        with pytest.warns(DeprecationWarning, match=rf"moved to {module.__name__}\.{name}"):
            assert getattr(macs, name) is getattr(module, name)
    with pytest.raises(AttributeError):
        macs.no_such_name  # noqa: B018


@pytest.mark.parametrize("sign,expected", [(1.0, 4 * 3 * 32), (-1.0, 4 * 3 * 27 * 32)])
def test_data_dependent_control_flow_counts_the_path_taken_quietly(sign, expected):
    clip = sign * torch.rand(1, 3, 2, 4, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = count_macs(BranchyNet(), clip)
    assert [str(w.message) for w in rec] == []
    assert got.method == "fvcore" and got.total == expected


def test_uncountable_model_names_the_module():
    with pytest.raises(MacCountError, match=r"module 'body\.1' \(Conv3d\).*5 channels"):
        count_macs(BrokenNet(), (3, 2, 4, 4))


def test_counting_restores_training_mode_and_counts_eval_batch_norm():
    net = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.ReLU())
    net.train()
    got = count_macs(net, (3, 2, 4, 4))
    assert net.training and net[1].training
    assert got.by_operator["batch_norm"] == 2 * 4 * 32  # eval, affine: 2 per element


# ---------------------------------------------------------------------------- video models
FACTORY_MODELS = {  # name: (factory kwargs, clip); small clips keep the test fast
    "tiny_c3d": ({}, (1, 3, 8, 32, 32)),
    "r2plus1d_18": ({"width": 0.25}, (1, 3, 4, 32, 32)),
    "x3d_xs": ({}, (1, 3, 4, 32, 32)),
}


@pytest.fixture(scope="module")
def video_models():
    from lightning_dance.macs import quiet_fvcore

    with quiet_fvcore():
        from lightning_dance.models import create_model

    torch.manual_seed(0)
    return {
        name: (create_model(name, num_classes=5, **kw), clip)
        for name, (kw, clip) in FACTORY_MODELS.items()
    }


def _closed_form_conv(model: nn.Module, clip: torch.Tensor) -> tuple[int, dict[str, int]]:
    """sum over Conv3d of out.numel() * C_in/groups * prod(kernel), output shapes from hooks."""
    per: dict[str, int] = {}

    def hook(name):
        def f(m, args, out):
            per[name] = out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, nn.Conv3d)]  # fmt: skip
    with torch.no_grad():
        model.eval()(clip)
    for h in hs:
        h.remove()
    return sum(per.values()), per


@pytest.mark.parametrize("name", list(FACTORY_MODELS))
def test_models_fvcore_vs_flop_counter_vs_closed_form(video_models, name):
    from torch.utils.flop_counter import FlopCounterMode

    model, shape = video_models[name]
    clip = torch.randn(shape)
    fv = count_macs(model, clip)
    assert fv.method == "fvcore" and fv.uncounted == {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(clip)
    # torch's counter knows conv / mm / addmm (FLOPs = 2 x MACs); fvcore's conv + linear match
    assert fv.by_operator["conv"] + fv.by_operator["linear"] == fc.get_total_flops() // 2
    conv_total, per_conv = _closed_form_conv(model, clip)
    assert fv.by_operator["conv"] == conv_total
    shapes = conv3d_input_shapes(model, clip)
    for conv_name, conv in ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv3d)):
        assert fv.by_module[conv_name] == per_conv[conv_name]
        assert conv3d_executed_macs(conv, shapes[conv_name]) == per_conv[conv_name]
    # the dispatch fallback counts the same ops with the same conventions
    dp = count_macs(model, clip, backend="dispatch")
    assert dp.total == fv.total and dp.by_operator == fv.by_operator
    assert dp.by_module == fv.by_module


def test_input_shapes_and_reused_conv_error():
    net = nn.Sequential(nn.Conv3d(3, 8, 3, stride=2, padding=1), nn.Conv3d(8, 8, 1))
    assert conv3d_input_shapes(net, torch.randn(2, 3, 4, 16, 16)) == {
        "0": (3, 4, 16, 16), "1": (8, 2, 8, 8)}  # fmt: skip

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(ValueError, match="called several times"):
        conv3d_input_shapes(Reuse(), (3, 4, 8, 8))


def test_count_module_macs_of_a_controller_like_module():
    ctrl = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    got = count_module_macs(ctrl, torch.randn(3, 6))
    assert got.by_operator == {"layer_norm": 5 * 18, "linear": 3 * (30 + 10)}
