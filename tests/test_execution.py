"""Fast execution path: compact convs equal the masked dense model, compute exactly the counted
MACs, use the fast kernels, and survive trace / export in their static form.

References: ``conv(apply_masks(x, values))`` with the plain ``nn.Conv3d`` (``F.conv3d``), the
MAC counter of :mod:`lightning_dance.macs` (an independent brute force checks it in
``test_macs.py``), ``torch.profiler`` kernel names.
"""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lightning_dance.aap import AdaptivePruner
from lightning_dance.executed import conv3d_executed_macs_batch
from lightning_dance.execution import (
    CompactExecutor,
    CompactPruner,
    LayerTuning,
    accelerate_dense,
    compact_conv3d,
    compact_forward,
    count_executed_macs,
    fast_conv3d,
    profile_layers,
    profitable_layers,
    random_masks,
    route_conv3d,
    to_fast_layout,
    tune_conv3d,
    tune_layers,
)
from lightning_dance.execution.static import (
    StaticTopKConv3d,
    mask_to_index,
    static_executed_macs,
    static_topk_conv3d,
)
from lightning_dance.execution.tuning import channel_grid
from lightning_dance.geometry import conv3d_input_shapes
from lightning_dance.masks import DIMS, apply_masks, expand_blocks

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
HYP = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
CL = torch.channels_last_3d


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = ref.abs().max().item() + 1e-6
    err = (y - ref).abs().max().item() / scale
    assert err <= rtol, f"max relative error {err:.2e}"


@st.composite
def conv_cases(draw):
    """A random Conv3d, an input it accepts, and random masks (incl. all-kept / one-kept)."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = {"dense": 1, "grouped": draw(st.sampled_from([2, 3])), "depthwise": 0}[kind]
    if kind == "depthwise":
        c_in = draw(st.integers(1, 6))
        groups, c_out = c_in, c_in * draw(st.sampled_from([1, 2]))
    else:
        c_in = groups * draw(st.integers(1, 3))
        c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(3))
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(3))
    dilation = tuple(draw(st.sampled_from([1, 2])) for _ in range(3))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    padding = draw(
        st.sampled_from([0, 1, (1, 0, 2), (0, 1, 1), "same"] if stride == (1, 1, 1) else [0, 1])
    )
    t, h, w = draw(st.integers(3, 7)), draw(st.integers(4, 9)), draw(st.integers(4, 9))
    n = draw(st.sampled_from([1, 1, 2, 3]))
    conv = nn.Conv3d(c_in, c_out, kernel, stride, padding, dilation, groups,
                     bias=draw(st.booleans()), padding_mode=mode)  # fmt: skip
    x = torch.randn(n, c_in, t, h, w)
    try:
        with torch.no_grad():
            conv(x)
    except (RuntimeError, ValueError):  # too small for the kernel / reflect pad too big
        assume(False)
    if draw(st.booleans()):
        conv = conv.to(memory_format=CL)
    values = {}
    for dim, size in (("frame", (t,)), ("channel", (c_in,)), ("feature", None)):
        choice = draw(st.sampled_from(["absent", "random", "all", "one"]))
        if choice == "absent":
            continue
        if dim == "feature":
            gh, gw = min(3, h), min(3, w)
            blocks = _pick(draw, n, gh * gw, choice).view(n, gh, gw)
            values[dim] = expand_blocks(blocks, (h, w))
        else:
            values[dim] = _pick(draw, n, size[0], choice)
    return conv, x, values


def _pick(draw, n: int, size: int, choice: str) -> torch.Tensor:
    if choice == "all":
        return torch.ones(n, size)
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    if choice == "one":
        return torch.zeros(n, size).scatter(1, torch.randint(size, (n, 1), generator=g), 1.0)
    return (torch.rand(n, size, generator=g) < 0.5).float()


# ----------------------------------------------------------------------------- equivalence
@HYP
@given(conv_cases())
def test_compact_equals_masked_dense_and_counts(case):
    conv, x, values = case
    with torch.no_grad():
        ref = conv(apply_masks(x, values))
        with count_executed_macs() as macs:
            y = compact_conv3d(conv, x, values)
    assert y.shape == ref.shape
    _close(y, ref)
    counted = conv3d_executed_macs_batch(conv, tuple(x.shape[1:]), batch_size=x.shape[0], **values)
    assert macs.total == int(counted.sum())


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "keep",
    [
        {"channel": "all", "frame": "all", "feature": "all"},
        {"channel": "one", "frame": "one"},
        {"channel": "one", "frame": "one", "feature": "one"},
        {"channel": "random", "frame": "random", "feature": "random"},
    ],
)
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_extreme_masks(n, keep, groups):
    torch.manual_seed(n + groups)
    conv = nn.Conv3d(8, 8, 3, stride=(1, 2, 1), padding=1, groups=groups)
    x = torch.randn(n, 8, 5, 12, 10)
    gen = torch.Generator().manual_seed(1)

    def make(size, how):
        if how == "all":
            return torch.ones(n, size)
        if how == "one":
            return torch.zeros(n, size).scatter(1, torch.randint(size, (n, 1), generator=gen), 1.0)
        m = (torch.rand(n, size, generator=gen) < 0.5).float()
        m[:, 0] = 1
        return m

    values = {"channel": make(8, keep["channel"]), "frame": make(5, keep["frame"])}
    if "feature" in keep:
        values["feature"] = expand_blocks(make(16, keep["feature"]).view(n, 4, 4), (12, 10))
    with torch.no_grad():
        ref = conv(apply_masks(x, values))
        with count_executed_macs() as macs:
            y = compact_conv3d(conv, x, values)
    _close(y, ref)
    assert macs.total == int(conv3d_executed_macs_batch(conv, (8, 5, 12, 10), **values).sum())


def test_all_kept_channel_mask_computes_the_dense_conv():
    conv = nn.Conv3d(6, 4, 3, padding=1)
    x = torch.randn(1, 6, 4, 8, 8)
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, {"channel": torch.ones(1, 6)})
    _close(y, conv(x).detach())
    assert macs.total == 4 * 6 * 27 * 4 * 8 * 8 and macs.calls == 1


def test_nothing_kept_gives_the_bias_and_no_work():
    conv = nn.Conv3d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 3, 6, 6)
    values = {"channel": torch.zeros(2, 4)}
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, values)
    _close(y, conv(apply_masks(x, values)).detach())
    assert macs.total == 0 and macs.calls == 0


def test_depthwise_computes_only_kept_channel_outputs():
    conv = nn.Conv3d(6, 12, 3, padding=1, groups=6)  # 2 outputs per channel
    x = torch.randn(1, 6, 4, 8, 8)
    keep = torch.tensor([[0.0, 1, 0, 0, 1, 0]])
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, {"channel": keep})
    ref = conv(apply_masks(x, {"channel": keep})).detach()
    _close(y, ref)
    assert macs.total == 2 * 2 * 27 * 4 * 8 * 8  # 2 kept channels x 2 outputs each
    dropped = [c for c in range(12) if c // 2 not in (1, 4)]
    assert torch.allclose(y[0, dropped], conv.bias[dropped].view(-1, 1, 1, 1).expand(-1, 4, 8, 8))


def test_frame_taps_skip_padding_pairs():
    """All frames kept: the tap decomposition skips the zero-padding pairs (as counted)."""
    conv = nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0), bias=False)
    x = torch.randn(1, 2, 2, 3, 3)
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, {"frame": torch.ones(1, 2)})
    _close(y, conv(x).detach())
    assert macs.total == 2 * 2 * 4 * 9  # 4 of the 6 (frame, tap) pairs read a real frame


def test_feature_rectangles_cover_exactly_the_active_outputs():
    conv = nn.Conv3d(3, 5, (1, 3, 3), padding=(0, 1, 1))
    x = torch.randn(1, 3, 2, 16, 16)
    blocks = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]])
    values = {"feature": expand_blocks(blocks, (16, 16))}
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, values)
    _close(y, conv(apply_masks(x, values)).detach())
    # block (0,0) = rows/cols 0..3 -> active outputs 0..4 (5x5); block (2,3) = rows 8..11,
    # cols 12..15 -> active rows 7..12 (6) x cols 11..15 (5)
    assert macs.total == 5 * 3 * 9 * 2 * (5 * 5 + 6 * 5)


def test_batch_groups_equal_masks():
    conv = nn.Conv3d(4, 4, 3, padding=1)
    x = torch.randn(4, 4, 3, 6, 6)
    same = torch.tensor([1.0, 0, 1, 1])
    values = {"channel": torch.stack([same, same, torch.tensor([0.0, 1, 0, 0]), same])}
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, values)
    _close(y, conv(apply_masks(x, values)).detach())
    assert macs.calls == 2  # the three equal samples run as one batch


def test_output_is_channels_last_and_input_layout_is_free():
    conv = nn.Conv3d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 3, 6, 6)
    values = {"channel": torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])}
    with torch.no_grad():
        a = compact_conv3d(conv, x, values)
        b = compact_conv3d(conv, to_fast_layout(x), values)
    assert a.is_contiguous(memory_format=CL)
    _close(a, b, 1e-6)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"channel": torch.ones(1, 3)}, r"channel mask must have shape \[1, 4\]"),
        ({"frame": torch.ones(2, 3)}, r"frame mask must have shape \[1, 3\]"),
        ({"feature": torch.ones(1, 5, 5)}, r"feature mask must have shape \[1, 6, 6\]"),
        ({"time": torch.ones(1, 3)}, "unknown mask dims"),
    ],
)
def test_bad_masks(values, match):
    conv = nn.Conv3d(4, 4, 3)
    with pytest.raises(ValueError, match=match):
        compact_conv3d(conv, torch.randn(1, 4, 3, 6, 6), values)


def test_bad_layer_and_input():
    with pytest.raises(TypeError, match="needs an nn.Conv3d"):
        compact_conv3d(nn.Conv2d(4, 4, 3), torch.randn(1, 4, 3, 6, 6), {})
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        compact_conv3d(nn.Conv3d(4, 4, 3), torch.randn(4, 3, 6, 6), {})
    with pytest.raises(TypeError, match="dict"):
        compact_conv3d(nn.Conv3d(4, 4, 3), torch.randn(1, 4, 3, 6, 6), [torch.ones(1, 4)])


# ----------------------------------------------------------------------------- kernels
def _kernels(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("channels", [48, 64, 128])
def test_fast_conv3d_avoids_slow_conv3d_at_batch_1(channels):
    """At batch 1 and T*H small, F.conv3d picks aten::slow_conv3d; fast_conv3d picks oneDNN."""
    x = torch.randn(1, channels, 4, 14, 14)
    w = torch.randn(channels, channels, 3, 3, 3) * 0.05
    assert "aten::slow_conv3d" in _kernels(lambda: F.conv3d(x, w, None, 1, 1))
    names = _kernels(lambda: fast_conv3d(x, w, None, 1, 1))
    assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d" not in names
    _close(fast_conv3d(x, w, None, 1, 1), F.conv3d(x, w, None, 1, 1))


def test_fast_conv3d_depthwise_in_channels_last():
    x = torch.randn(1, 16, 4, 12, 12)
    w = torch.randn(16, 1, 3, 3, 3)
    y = fast_conv3d(x, w, None, 1, 1, 1, 16)
    assert y.is_contiguous(memory_format=CL)
    assert "aten::mkldnn_convolution" in _kernels(lambda: fast_conv3d(x, w, None, 1, 1, 1, 16))
    _close(y, F.conv3d(x, w, None, 1, 1, 1, 16))


@pytest.mark.parametrize("n, c_in, size, stride, bias, grad, channels_last", [
    (1, 54, (1, 1, 1), 1, True, False, False), (3, 8, (1, 1, 1), 2, False, False, False),
    (2, 5, (1, 1, 1), 1, True, True, False), (0, 4, (1, 1, 1), 1, True, False, False),
    (1, 19, (4, 5, 5), 1, False, False, True), (2, 6, (3, 7, 6), 1, True, True, False),
    (1, 8, (4, 9, 8), 2, True, False, True), (1, 8, (5, 6, 7), (1, 2, 3), False, True, True),
    (0, 4, (2, 3, 3), 1, True, False, True)])  # fmt: skip
def test_fast_conv3d_pointwise_is_a_matmul(n, c_in, size, stride, bias, grad, channels_last):
    """1x1x1 convs (squeeze-excitation convs on pooled features, X3D's bottleneck convs) run
    as one matrix product, any stride, with the same values and gradients as F.conv3d and a
    channels_last_3d output; padding or grouping keeps the conv."""
    x = torch.randn(n, c_in, *size)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_(grad)
    w = torch.randn(7, c_in, 1, 1, 1, requires_grad=grad)
    b = torch.randn(7, requires_grad=grad) if bias else None
    names = _kernels(lambda: fast_conv3d(x, w, b, stride, 0))
    assert "aten::mkldnn_convolution" not in names and "aten::slow_conv3d" not in names
    assert {"aten::addmm", "aten::mm"} & names
    y, ref = fast_conv3d(x, w, b, stride, 0), F.conv3d(x, w, b, stride, 0)
    assert y.shape == ref.shape and y.shape[:2] == (n, 7)  # also an empty batch
    assert y.is_contiguous(memory_format=CL)
    if n:
        _close(y, ref)
    if grad:
        g = torch.autograd.grad((y * ref.detach()).sum(), [x, w])
        g_ref = torch.autograd.grad((ref * ref.detach()).sum(), [x, w])
        for a, r in zip(g, g_ref, strict=True):
            _close(a, r)
    m = max(n, 1)
    x2 = torch.randn(m, c_in, *size)
    w2 = torch.randn(c_in, 1, 1, 1, 1)
    for run, ref2 in (
        (functools.partial(fast_conv3d, x2, w, b, 1, 1), F.conv3d(x2, w, b, 1, 1)),
        (functools.partial(fast_conv3d, x2, w2, None, 1, 0, 1, c_in),
         F.conv3d(x2, w2, None, 1, 0, 1, c_in)),
    ):  # fmt: skip
        assert "aten::mkldnn_convolution" in _kernels(run)
        _close(run(), ref2)


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_conv3d_one_channel_strided_view(threads):
    """A one-channel input cropped to a view (as the compact path crops unread columns): with
    one thread oneDNN misread the channels_last_3d copy's strides (found by the hypothesis
    test below under OMP_NUM_THREADS=1); to_fast_layout gives it the plain strides."""
    torch.manual_seed(0)
    weight = torch.randn(1, 1, 1, 1, 3)
    x = to_fast_layout(torch.randn(1, 1, 6, 7, 4))[..., :3]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = fast_conv3d(x, weight, None, (1, 1, 2), 0)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, F.conv3d(x.contiguous(), weight, None, (1, 1, 2)))


def test_fast_conv3d_rejects_string_padding():
    with pytest.raises(ValueError, match="integer padding"):
        fast_conv3d(torch.randn(1, 2, 3, 4, 4), torch.randn(2, 2, 1, 1, 1), padding="same")


def test_fast_conv3d_is_differentiable():
    x = torch.randn(1, 3, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    fast_conv3d(x, w, None, 1, 1).sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.conv3d(x2, w2, None, 1, 1).sum().backward()
    _close(x.grad, x2.grad)
    _close(w.grad, w2.grad)


def test_accelerate_dense_equal_outputs_and_restores(small_net):
    clip = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        ref = small_net(clip)
        with accelerate_dense(small_net):
            names = _kernels(lambda: small_net(to_fast_layout(clip)))
            y = small_net(clip)
    _close(y, ref)
    assert "aten::slow_conv3d" not in names
    assert all("forward" not in m.__dict__ for m in small_net.modules())
    pickle.dumps(small_net)


def test_route_restores_on_error(small_net):
    def boom(name, conv, x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), route_conv3d(small_net, boom):
        small_net(torch.randn(1, 3, 4, 16, 16))
    assert all("forward" not in m.__dict__ for m in small_net.modules())


def test_padding_modes_through_fast_forward():
    for mode in ("zeros", "reflect", "replicate", "circular"):
        conv = nn.Conv3d(3, 4, 3, padding=(1, 2, 1), padding_mode=mode)
        x = torch.randn(1, 3, 4, 7, 6)
        with torch.no_grad(), accelerate_dense(conv):
            y = conv(x)
        _close(y, F.conv3d(F.pad(x, (1, 1, 2, 2, 1, 1), mode="constant" if mode == "zeros" else mode), conv.weight, conv.bias))  # fmt: skip


# ----------------------------------------------------------------------------- executor
def _masked_reference(model, clip, masks):
    """The model with each named layer reading apply_masks(x, masks[name]) (forward pre-hooks)."""
    mods = dict(model.named_modules())
    handles = [
        mods[name].register_forward_pre_hook(lambda m, a, v=v: (apply_masks(a[0], v),))
        for name, v in masks.items()
    ]
    try:
        return model(clip)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "keep",
    [{"channel": 0.5}, {"frame": 0.5}, {"channel": 0.7, "frame": 0.6, "feature": 0.5}],
)
@pytest.mark.parametrize("n", [1, 2])
def test_executor_equals_masked_model(small_net, keep, n):
    clip = torch.randn(n, 3, 4, 16, 16)
    ex = CompactExecutor(small_net)
    shapes = {k: v for k, v in conv3d_input_shapes(small_net, clip).items() if k in ex.layer_names}
    masks = random_masks(shapes, keep, batch_size=n, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        ref = _masked_reference(small_net, clip, masks)
        y = ex(clip, masks)
        dense = small_net(clip)
    _close(y, ref)
    assert (y - dense).abs().max() > 1e-3  # the masks did change the output
    assert all("forward" not in m.__dict__ for m in small_net.modules())


def test_executor_rejects_unknown_layers(small_net):
    ex = CompactExecutor(small_net)
    with pytest.raises(KeyError, match="not instrumented"):
        ex(torch.randn(1, 3, 4, 16, 16), {"stem.0": {"channel": torch.ones(1, 3)}})


def test_compact_forward_without_masks_is_the_dense_conv():
    conv = nn.Conv3d(3, 4, 3, padding="same")
    x = torch.randn(1, 3, 4, 6, 6)
    with torch.no_grad():
        _close(compact_forward(conv, x, None), conv(x))
        _close(compact_forward(conv, x, {}), conv(x))


def test_random_masks_keep_counts():
    m = random_masks({"a": (10, 4, 8, 8)}, {"channel": 0.3, "frame": 0.5, "feature": 0.25},
                     batch_size=3)  # fmt: skip
    assert m["a"]["channel"].sum(1).tolist() == [3.0, 3.0, 3.0]
    assert m["a"]["frame"].sum(1).tolist() == [2.0, 2.0, 2.0]
    assert m["a"]["feature"].sum((1, 2)).tolist() == [16.0, 16.0, 16.0]  # 4 of 16 4x4 blocks


# ----------------------------------------------------------------------------- static top-k
@st.composite
def static_cases(draw):
    depthwise = draw(st.booleans())
    c_in = draw(st.integers(1, 6))
    groups = c_in if depthwise else 1
    c_out = c_in * draw(st.sampled_from([1, 2])) if depthwise else draw(st.integers(1, 5))
    kernel = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(3))
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(3))
    pad = draw(st.sampled_from([0, 1, (1, 0, 1)]))
    t, h, w = draw(st.integers(3, 6)), draw(st.integers(5, 8)), draw(st.integers(5, 8))
    n = draw(st.sampled_from([1, 2, 3]))
    conv = nn.Conv3d(c_in, c_out, kernel, stride, pad, 1, groups, bias=draw(st.booleans()))
    x = torch.randn(n, c_in, t, h, w)
    kc = draw(st.one_of(st.none(), st.integers(1, c_in)))
    kt = draw(st.one_of(st.none(), st.integers(1, t)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    ci = fi = None
    if kc is not None:
        ci = torch.stack([torch.randperm(c_in, generator=g)[:kc].sort().values for _ in range(n)])
    if kt is not None:
        fi = torch.stack([torch.randperm(t, generator=g)[:kt].sort().values for _ in range(n)])
    return conv, x, ci, fi


@HYP
@given(static_cases())
def test_static_topk_equals_masked_dense(case):
    conv, x, ci, fi = case
    n, c, t = x.shape[:3]
    values = {}
    if ci is not None:
        values["channel"] = torch.zeros(n, c).scatter(1, ci, 1.0)
        assert torch.equal(mask_to_index(values["channel"], ci.shape[1]), ci)
    if fi is not None:
        values["frame"] = torch.zeros(n, t).scatter(1, fi, 1.0)
    with torch.no_grad():
        _close(static_topk_conv3d(conv, x, channel_idx=ci, frame_idx=fi),
               conv(apply_masks(x, values)))  # fmt: skip


@HYP
@given(static_cases(), st.integers(0, 1000))
def test_static_topk_output_subsets_and_gathered_inputs(case, seed):
    """``out_idx``: the masked conv's outputs at those channels (per sample, in that order);
    ``input_gathered``: the same from an input that holds only ``channel_idx``."""
    conv, x, ci, fi = case
    assume(conv.groups == 1)
    n, c, t = x.shape[:3]
    g = torch.Generator().manual_seed(seed)
    k_o = int(torch.randint(1, conv.out_channels + 1, (), generator=g))
    oi = torch.stack([torch.randperm(conv.out_channels, generator=g)[:k_o] for _ in range(n)])
    values = {}
    if ci is not None:
        values["channel"] = torch.zeros(n, c).scatter(1, ci, 1.0)
    if fi is not None:
        values["frame"] = torch.zeros(n, t).scatter(1, fi, 1.0)
    with torch.no_grad():
        full = conv(apply_masks(x, values))
        ref = torch.stack([full[i, oi[i]] for i in range(n)])
        _close(static_topk_conv3d(conv, x, channel_idx=ci, frame_idx=fi, out_idx=oi), ref)
        if ci is not None:
            held = torch.stack([x[i, ci[i]] for i in range(n)])  # the kept channels, in order
            got = static_topk_conv3d(conv, held, channel_idx=ci, frame_idx=fi, out_idx=oi,
                                     input_gathered=True)  # fmt: skip
            _close(got, ref)
    shape = tuple(x.shape[1:])
    kc = ci.shape[1] if ci is not None else None
    kt = fi.shape[1] if fi is not None else None
    full_macs = static_executed_macs(conv, shape, k_channel=kc, k_frame=kt)
    assert (
        static_executed_macs(conv, shape, k_channel=kc, k_frame=kt, k_out=k_o) * (conv.out_channels)
        == full_macs * k_o
    )


def test_static_topk_output_subset_errors():
    x = torch.randn(1, 4, 3, 5, 5)
    with pytest.raises(NotImplementedError, match="groups == 1"):
        static_topk_conv3d(nn.Conv3d(4, 4, 1, groups=4), x, out_idx=torch.tensor([[0]]))
    with pytest.raises(ValueError, match="input_gathered=True needs channel_idx"):
        static_topk_conv3d(nn.Conv3d(4, 4, 1), x, input_gathered=True)
    with pytest.raises(ValueError, match="holding those k channels"):
        static_topk_conv3d(nn.Conv3d(4, 4, 1), x, channel_idx=torch.tensor([[0, 2]]),
                           input_gathered=True)  # fmt: skip


def test_static_macs_match_the_counter_where_exact():
    conv = nn.Conv3d(8, 6, (1, 3, 3), padding=(0, 1, 1))
    shape = (8, 6, 10, 10)
    counted = conv3d_executed_macs_batch(
        conv, shape, channel=torch.tensor([[1.0] * 3 + [0] * 5]),
        frame=torch.tensor([[1.0, 1, 0, 0, 0, 0]]),
    )  # fmt: skip
    assert static_executed_macs(conv, shape, k_channel=3, k_frame=2) == int(counted[0])
    conv3 = nn.Conv3d(8, 6, 3, padding=1)  # kT=3: all (kept frame, tap) pairs: 2 * 3 planes
    assert static_executed_macs(conv3, shape, k_frame=2) == 6 * 8 * 9 * 6 * 100


class _TinyTopK(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1)
        self.conv = StaticTopKConv3d(nn.Conv3d(8, 6, 3, padding=1), k_channel=3, k_frame=2)
        self.dw = StaticTopKConv3d(nn.Conv3d(6, 6, 3, padding=1, groups=6), k_channel=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv(h, h.mean((2, 3, 4)), h.mean((1, 3, 4))))
        return self.dw(h, h.amax((2, 3, 4))).mean((2, 3, 4))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_static_topk_traces_and_exports():
    torch.manual_seed(0)
    model = _TinyTopK().eval()
    x, other = torch.randn(2, 3, 4, 8, 8), 4 * torch.randn(2, 3, 4, 8, 8) - 2
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        exported = torch.export.export(model, (x,)).module()
        eager = model(other)
        _close(traced(other), eager, 1e-6)
        _close(exported(other), eager, 1e-6)

        # the selection is data dependent inside the graphs: the two clips keep different
        # channels, so a graph that froze the first clip's indices would fail the checks above
        def kept(clip):
            return torch.relu(model.stem(clip)).mean((2, 3, 4)).topk(3).indices.sort().values

        assert not torch.equal(kept(x), kept(other))


def test_static_topk_errors():
    with pytest.raises(NotImplementedError, match="groups=1 and depthwise"):
        StaticTopKConv3d(nn.Conv3d(8, 8, 3, groups=2), k_channel=2)
    with pytest.raises(ValueError, match=r"k_channel must be in \[1, 8\]"):
        StaticTopKConv3d(nn.Conv3d(8, 8, 3), k_channel=9)
    layer = StaticTopKConv3d(nn.Conv3d(8, 8, 3), k_frame=2)
    with pytest.raises(ValueError, match="pass frame_scores"):
        layer(torch.randn(1, 8, 4, 6, 6))
    dw, idx = nn.Conv3d(8, 8, 3, padding=1, groups=8), torch.tensor([[1, 4]])
    with pytest.raises(NotImplementedError, match="out_idx needs a groups == 1 conv"):
        static_topk_conv3d(dw, torch.randn(1, 8, 4, 6, 6), channel_idx=idx, out_idx=idx)
    x2 = torch.randn(1, 2, 4, 6, 6)  # a depthwise conv reads gathered channels
    ref = dw(apply_masks(torch.zeros(1, 8, 4, 6, 6).index_copy(1, idx[0], x2),
                         {"channel": torch.zeros(1, 8).index_fill(1, idx[0], 1.0)}))  # fmt: skip
    _close(static_topk_conv3d(dw, x2, channel_idx=idx, input_gathered=True), ref)


def test_profile_layers_reports_each_masked_layer(small_net):
    clip = torch.randn(1, 3, 4, 16, 16)
    masks = {"conv_a.0": {"channel": torch.tensor([[1.0, 0, 1, 0, 1, 0, 1, 0]])}}
    prof = profile_layers(small_net, clip, masks, repeats=1)
    assert list(prof) == ["conv_a.0"]
    row = prof["conv_a.0"]
    assert row["dense_ms"] > 0 and row["compact_ms"] > 0
    assert row["ratio"] == pytest.approx(row["compact_ms"] / row["dense_ms"])


@pytest.mark.slow
def test_latency_benchmark_smoke(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_benchmark.py"
    spec = importlib.util.spec_from_file_location("latency_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "latency.json"
    bench.main(["--smoke", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["model"] == "tiny_c3d" and result["max_rel_error_vs_masked_model"] < 1e-4
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["dense fast"]["speedup"] == 1.0
    # the dense model is also timed compiled; speedup_best is over the fastest dense form
    dense_rows = [r for name, r in rows.items() if name.startswith("dense")]
    assert {"dense compiled", "dense compiled cl"} <= set(rows)
    assert max(r["speedup_best"] for r in dense_rows) == 1.0
    for r in rows.values():
        assert r["speedup_best"] == pytest.approx(
            min(d["median_ms"] for d in dense_rows) / r["median_ms"], rel=0.02
        )
    compact = rows["channel+frame @0.5 compact"]
    assert abs(compact["mac_ratio"] - 0.5) < 0.1 and compact["ran_ratio"] < compact["mac_ratio"]
    inputs_only = rows["channel+frame @0.5 inputs-only"]
    assert inputs_only["ran_ratio"] == inputs_only["mac_ratio"] == compact["mac_ratio"]
    assert abs(rows["channel+frame @0.5 multiple-8"]["mac_ratio"] - 0.5) < 0.1
    # the JSON holds rounded figures (speedup to 3, ratios to 4 decimals): products agree to
    # within that rounding, not exactly (0.247 vs 0.248 happened)
    assert compact["realized_over_ideal"] == pytest.approx(
        compact["speedup"] * compact["ran_ratio"], abs=2e-3
    )
    assert compact["realized_over_ideal_counted"] == pytest.approx(
        compact["speedup"] * compact["mac_ratio"], abs=2e-3
    )
    assert rows["channel+frame @0.5 tuned"]["ran_ratio"] >= compact["ran_ratio"] - 1e-6
    assert {r["variant"] for r in result["batch"]} == {
        "dense fast",
        "compact group",
        "compact union",
    }
    assert result["clip_length"][0]["T"] == 8
    # the materialized static projection (channel-only topk configs)
    from lightning_dance.models import create_model

    model = create_model("tiny_c3d", num_classes=4).eval()
    pruner = AdaptivePruner(model, dims=("channel",), policy="topk", budget=0.5).eval()
    variant, err = bench.materialized_variant("m", pruner, torch.randn(1, 3, 8, 32, 32))
    assert err < 1e-4 and 0.2 < variant.mac_ratio == variant.ran_ratio < 0.6
    variant.run()
    # its compiled twins: the same model as one frozen graph, in both layouts
    clip = torch.randn(1, 3, 8, 32, 32)
    twins = bench.compiled_variants(variant, clip)
    assert [t.name for t in twins] == ["m compiled", "m compiled cl"]
    assert all(t.mac_ratio == variant.mac_ratio and t.module is variant.module for t in twins)
    with torch.no_grad():
        want = variant.module(clip)
    for t in twins:
        torch.testing.assert_close(t.run(), want, atol=1e-4, rtol=1e-4)
    # the selected variants' traffic and energy: measured bytes of both runs, their ratio
    from lightning_dance.bytes import measure_traffic
    from lightning_dance.execution import CompactPruner

    clip = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        pruner(clip)
    t = bench.traffic_and_energy(measure_traffic(model, clip), CompactPruner(pruner), clip)
    assert t["dense_bytes"] == measure_traffic(model, clip).total
    assert t["traffic_saving"] == pytest.approx(t["dense_bytes"] / t["compact_bytes"], abs=1e-3)
    assert {"dram", "jetson_nano", "snapdragon_8_gen_1"} <= set(t["energy_saving"])
    assert all(v > 0 for v in t["energy_saving"].values())
    # a materialized model's bytes: measured on the plain model, fewer than dense's
    m = bench.traffic_and_energy(measure_traffic(model, clip), variant.module, clip)
    assert m["compact_bytes"] == measure_traffic(variant.module, clip).total
    assert m["traffic_saving"] > 1.0
    # threshold: the per-layer selections run (what pays on this machine may be nothing)
    bench.main(["--smoke", "--policy", "threshold", "--threads", "1", "--out", str(out)])
    for row in json.loads(out.read_text())["results"][0]["rows"]:
        if "selected" in row["variant"] and "traffic" in row:
            assert row["traffic"]["traffic_saving"] > 0
        if row["variant"].endswith("channels materialized"):
            assert row["mac_ratio"] == row["ran_ratio"] < 1.0
    # --hybrid: Torch-Pruning alone at the budget, and to budget / F then the policy per clip
    import argparse

    from lightning_dance.macs import count_macs

    args = argparse.Namespace(policy="threshold", seed=0, calib_clips=1, calib_iters=12,
                              feature_site="inputs", hybrid=0.7)  # fmt: skip
    big = torch.randn(1, 3, 8, 48, 48)
    (alone, e0), (hybrid, e1) = bench.static_then_dynamic("c", model, 0.5, big, args)
    dense = count_macs(model, big).total
    assert e0 == 0.0 and e1 < 1e-4
    assert alone.mac_ratio == pytest.approx(count_macs(alone.module, big).total / dense)
    assert abs(alone.mac_ratio - 0.5) < 0.05
    static = hybrid.compact.pruner.model  # pruned to 0.5 / 0.7, then per clip
    assert count_macs(static, big).total / dense == pytest.approx(0.5 / 0.7, abs=0.05)
    assert abs(hybrid.mac_ratio - 0.5) < 0.1 and hybrid.ran_ratio <= hybrid.mac_ratio + 1e-6
    with torch.no_grad():
        torch.testing.assert_close(alone.run(), alone.module(big), rtol=1e-4, atol=1e-4)
        hybrid.run()


# ----------------------------------------------------------------------------- tuning
def test_layer_tuning_decisions():
    t = LayerTuning(10.0, channel_ms={1: 1.0, 8: 4.0, 12: 6.0, 16: 3.0, 32: 10.0})
    assert t.snap_channels(10, 32) == 16  # a faster, larger kernel size: snap up
    assert t.snap_channels(12, 32) == 16
    assert t.snap_channels(17, 32) == 17  # interpolated 3.4 ms beats everything above
    assert t.snap_channels(32, 32) == 32
    slow = LayerTuning(2.0, channel_ms={1: 3.0, 4: 3.5, 8: 2.0})
    assert slow.snap_channels(3, 8) == 8  # compact never beats dense: the dense conv
    assert LayerTuning(1.0).snap_channels(3, 8) == 3  # nothing measured: exact
    frames = LayerTuning(5.0, frame_ms={1: 1.0, 2: 3.0, 4: 6.0})
    assert frames.frames_pay(1) and frames.frames_pay(3) and not frames.frames_pay(4)
    feats = LayerTuning(5.0, feature_ms={0.3: 2.0, 1.0: 7.0})
    assert feats.features_pay(0.5) and not feats.features_pay(0.95)
    assert LayerTuning(1.0).frames_pay(8) and LayerTuning(1.0).features_pay(1.0)
    assert frames.break_even() == {"frame": 0.5}


def test_profitable_layers_and_estimates():
    fast = LayerTuning(10.0, channel_ms={1: 1.0, 4: 5.0, 8: 10.0}, frame_ms={1: 6.0, 2: 10.0})
    assert fast.estimate_ms(0.5) == pytest.approx(3.0)  # 10 ms * 5/10 * 6/10
    assert fast.estimate_ms(1.0) == pytest.approx(10.0)
    slow = LayerTuning(1.0, channel_ms={1: 1.5, 8: 1.0})  # per-call costs dominate
    untuned = LayerTuning(1.0)  # nothing prunable measured: no saving expected
    tunings = {"a": fast, "b": slow, "c": untuned}
    assert profitable_layers(tunings, keep=0.5) == ["a"]
    assert profitable_layers(tunings, keep=1.0) == []
    with pytest.raises(ValueError, match="keep"):
        profitable_layers(tunings, keep=0.0)


def test_channel_grid():
    assert channel_grid(1) == [1]
    assert channel_grid(40) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 32, 40]
    big = channel_grid(576)
    assert big[0] == 1 and big[-1] == 576 and len(big) < 40 and big == sorted(set(big))


@st.composite
def tunings(draw, conv: nn.Conv3d, shape: tuple[int, ...]):
    """Random cost tables: every decision (snap up, dense fallback, compact) gets exercised."""
    c, t = shape[0], shape[1]
    ms = st.floats(0.1, 10.0)
    channel = {k: draw(ms) for k in channel_grid(c)} if draw(st.booleans()) else {}
    frame = {k: draw(ms) for k in range(1, t + 1)} if draw(st.booleans()) else {}
    feature = {f: draw(ms) for f in (0.25, 0.5, 1.0)} if draw(st.booleans()) else {}
    return LayerTuning(draw(ms), channel, frame, feature)


@HYP
@given(conv_cases(), st.data())
def test_tuned_compact_still_equals_masked_dense(case, data):
    conv, x, values = case
    tuning = data.draw(tunings(conv, tuple(x.shape[1:])))
    with torch.no_grad():
        ref = conv(apply_masks(x, values))
        with count_executed_macs() as macs:
            y = compact_conv3d(conv, x, values, tuning=tuning)
    _close(y, ref)
    counted = conv3d_executed_macs_batch(conv, tuple(x.shape[1:]), batch_size=x.shape[0], **values)
    dense = conv3d_executed_macs_batch(conv, tuple(x.shape[1:]), batch_size=x.shape[0])
    assert int(counted.sum()) <= macs.total <= int(dense.sum())  # snaps only add work


def test_snapped_channels_read_zeroed_weights():
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 8, 3, padding=1)
    x = torch.randn(1, 16, 3, 6, 6)
    keep = torch.zeros(1, 16)
    keep[0, [2, 9, 11]] = 1
    snap = LayerTuning(9.0, channel_ms={1: 5.0, 2: 5.0, 3: 5.0, 4: 1.0, 8: 2.0, 16: 9.0})
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, {"channel": keep}, tuning=snap)
    _close(y, conv(apply_masks(x, {"channel": keep})).detach())
    assert macs.total == 8 * 4 * 27 * 3 * 36  # 3 kept channels snapped up to 4
    dense = LayerTuning(1.0, channel_ms={1: 5.0, 16: 9.0})
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, {"channel": keep}, tuning=dense)
    _close(y, conv(apply_masks(x, {"channel": keep})).detach())
    assert macs.total == 8 * 16 * 27 * 3 * 36 and macs.calls == 1


def test_frame_fallback_runs_one_dense_conv():
    conv = nn.Conv3d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 5, 5)
    keep = {"frame": torch.tensor([[1.0, 1, 0, 1, 1, 1]])}
    slow_taps = LayerTuning(1.0, frame_ms={k: 2.0 for k in range(1, 7)})
    with torch.no_grad(), count_executed_macs() as macs:
        y = compact_conv3d(conv, x, keep, tuning=slow_taps)
    _close(y, conv(apply_masks(x, keep)).detach())
    assert macs.calls == 1 and macs.total == 4 * 4 * 27 * 6 * 25


def test_tune_conv3d_measures_each_dim():
    conv = nn.Conv3d(6, 8, 3, padding=1)
    t = tune_conv3d(conv, (6, 3, 8, 8), repeats=1, grid=2)
    assert t.dense_ms > 0
    assert sorted(t.channel_ms) == channel_grid(6) and t.channel_ms[6] == t.dense_ms
    assert sorted(t.frame_ms) == [1, 2, 3]
    assert t.feature_ms and all(0 < f <= 1 for f in t.feature_ms)
    grouped = tune_conv3d(nn.Conv3d(6, 6, 1, groups=3), (6, 1, 4, 4), ("channel", "frame"))
    assert not grouped.channel_ms and not grouped.frame_ms  # not snappable / one frame
    with pytest.raises(ValueError, match="unknown dims"):
        tune_conv3d(conv, (6, 3, 8, 8), ("time",))


def test_executor_tune_keeps_outputs(small_net):
    clip = torch.randn(1, 3, 4, 16, 16)
    ex = CompactExecutor(small_net)
    tunings = ex.tune(clip, ("channel", "frame"), repeats=1)
    assert sorted(tunings) == sorted(ex.layer_names)
    shapes = {k: v for k, v in conv3d_input_shapes(small_net, clip).items() if k in ex.layer_names}
    masks = random_masks(
        shapes, {"channel": 0.4, "frame": 0.5}, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        _close(ex(clip, masks), _masked_reference(small_net, clip, masks))
    with pytest.raises(KeyError, match="did not run"):
        tune_layers(small_net, clip, ["head"])


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize(
    "keep",
    [
        {"channel": 0.5},
        {"frame": 0.5, "feature": 0.5},
        {"channel": 0.3, "frame": 0.7, "feature": 0.6},
    ],
)
def test_union_batch_mode_equals_masked_dense(keep):
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 6, 3, padding=1, stride=(1, 2, 1))
    x = torch.randn(4, 8, 5, 8, 8)
    values = random_masks({"c": (8, 5, 8, 8)}, keep, batch_size=4, grid=2,
                          generator=torch.Generator().manual_seed(2))["c"]  # fmt: skip
    with torch.no_grad():
        ref = conv(apply_masks(x, values))
        with count_executed_macs() as group:
            a = compact_conv3d(conv, x, values)
        with count_executed_macs() as union:
            b = compact_conv3d(conv, x, values, batch_mode="union")
    _close(a, ref)
    _close(b, ref)
    assert union.calls <= group.calls and union.total >= group.total
    with pytest.raises(ValueError, match="batch_mode"):
        compact_conv3d(conv, x, values, batch_mode="pad")


# ----------------------------------------------------------------------------- AdaptivePruner
def _randomized(pruner: AdaptivePruner, seed: int) -> AdaptivePruner:
    """Large random controller weights: varied, input-dependent masks (as in test_aap)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return pruner.eval()


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    dims=st.sampled_from([("channel",), ("frame",), ("feature",), ("channel", "frame"), DIMS]),
    policy=st.sampled_from(["threshold", "topk"]),
    budget=st.sampled_from([0.15, 0.5, 0.9]),
    n=st.sampled_from([1, 2]),
    seed=st.integers(0, 100),
    batch_mode=st.sampled_from(["group", "union"]),
)
def test_compact_pruner_equals_the_masked_model(dims, policy, budget, n, seed, batch_mode):
    from tests.conftest import SmallNet

    torch.manual_seed(seed)
    net = SmallNet().eval()
    # the full count (credit_outputs=False) is what the inputs-only path runs
    pruner = _randomized(AdaptivePruner(net, dims=dims, policy=policy, budget=budget,
                                        credit_outputs=False), seed)  # fmt: skip
    clip = torch.randn(n, 3, 6, 16, 16, generator=torch.Generator().manual_seed(seed))
    # both the general plan and the batch-1 index plan perform exactly the counted MACs
    fast = CompactPruner(pruner, batch_mode=batch_mode, index_plan=False)
    inputs_only = CompactPruner(pruner, batch_mode=batch_mode, skip_outputs=False, index_plan=False)
    indexed = CompactPruner(pruner, batch_mode=batch_mode)
    with torch.no_grad():
        ref = pruner(clip)
        with count_executed_macs() as macs:
            y = fast(clip)
        with count_executed_macs() as macs_inputs_only:
            y_inputs_only = inputs_only(clip)
        with count_executed_macs() as macs_indexed:
            y_indexed = indexed(clip)
    _close(y, ref)
    _close(y_inputs_only, ref)
    _close(y_indexed, ref)
    # res.0 -> BN -> ReLU -> the depthwise res.3: a chain into a depthwise consumer
    assert sorted(fast.chains) == (["res.0"] if "channel" in dims else [])
    stats = pruner.last_stats
    counted = sum(int(s.executed_macs.sum()) for s in stats.layers.values())
    skipped = _skipped_macs_reference(pruner, fast.chains)
    if batch_mode == "group":
        assert macs_inputs_only.total == counted  # exactly the pruner's executed count
        assert macs.total == skipped  # minus the outputs res.3 drops
        if n == 1:
            assert macs_indexed.total == skipped
    else:
        assert macs_inputs_only.total >= counted and macs.total >= skipped
    assert all("forward" not in m.__dict__ for m in net.modules())


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["threshold", "topk"])
def test_compact_pruner_on_tiny_c3d(policy):
    from lightning_dance.models import create_model

    torch.manual_seed(0)
    net = create_model("tiny_c3d", num_classes=5).eval().to(memory_format=CL)
    # the full count (credit_outputs=False): the reference's input
    pruner = _randomized(AdaptivePruner(net, policy=policy, budget=0.4, credit_outputs=False), 1)
    fast = CompactPruner(pruner)
    exact = CompactPruner(pruner, index_plan=False)
    clips = [torch.randn(1, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32)]
    with torch.no_grad():
        for clip in clips:
            ref = pruner(clip)
            with count_executed_macs() as macs:
                y = exact(clip)
            with count_executed_macs() as macs_fast:
                y_fast = fast(clip)  # batch 1: the index plan
            _close(y, ref)
            _close(y_fast, ref)
            assert len(fast.chains) == 2  # conv2 -> conv3, res.conv1 -> res.conv2
            assert macs.total == _skipped_macs_reference(pruner, fast.chains)
            assert macs_fast.total == macs.total
        with pruner.dense():  # all kept: the model itself
            _close(fast(clips[0]), net(clips[0]))
    fast.tune(clips[0], repeats=1)
    assert sorted(fast.tunings) == sorted(pruner.layer_names)
    with torch.no_grad():
        _close(fast(clips[1]), pruner(clips[1]))


def test_compact_pruner_budget_conditioned_and_errors(small_net, clip):
    pruner = _randomized(AdaptivePruner(small_net, budget_conditioned=True, budget=0.3), 4)
    fast = CompactPruner(pruner)
    with torch.no_grad():
        _close(fast(clip), pruner(clip))
        pruner.set_budget(0.8)
        _close(fast(clip), pruner(clip))
    pruner.train()
    with pytest.raises(RuntimeError, match="eval"):
        fast(clip)
    pruner.eval()
    with pytest.raises(ValueError, match="reads 3 channels"):
        fast(torch.randn(1, 4, 4, 16, 16))
    with pytest.raises(ValueError, match="batch_mode"):
        CompactPruner(pruner, batch_mode="loop")


def test_compact_path_never_uses_slow_conv3d():
    """Pruned layers with few channels stay on oneDNN (F.conv3d would pick slow_conv3d)."""
    conv = nn.Conv3d(32, 32, 3, padding=1).to(memory_format=CL)
    x = torch.randn(1, 32, 8, 14, 14)
    keep = torch.zeros(1, 32)
    keep[0, ::3] = 1  # 11 channels
    values = {"channel": keep, "frame": torch.tensor([[1.0, 0, 1, 1, 0, 1, 0, 1]])}
    assert "aten::slow_conv3d" in _kernels(lambda: conv(apply_masks(x, values)))
    names = _kernels(lambda: compact_conv3d(conv, x, values))
    assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d" not in names


# ----------------------------------------------------------------------------- output skipping
class ChainNet(nn.Module):
    """R(2+1)D-like: spatial -> BN -> ReLU -> temporal convs (channel chains), a BatchNorm
    without running stats, functional ReLU, dropout, and a residual that ends the chains."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(),
        )
        self.s1 = nn.Conv3d(8, 12, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(12)
        self.t1 = nn.Conv3d(12, 8, (3, 1, 1), padding=(1, 0, 0))
        self.bn2 = nn.BatchNorm3d(8, track_running_stats=False)
        self.s2 = nn.Conv3d(8, 10, 3, padding=1)
        self.drop = nn.Dropout3d(0.1)
        self.t2 = nn.Conv3d(10, 8, (3, 1, 1), padding=(1, 0, 0))
        self.head = nn.Linear(8, 4)
        with torch.no_grad():  # non-trivial running statistics
            for bn in (self.stem[1], self.bn1):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn2(self.t1(torch.relu(self.bn1(self.s1(x))))))
        y = self.t2(self.drop(self.s2(y)))
        return self.head(torch.relu(x + y).mean((2, 3, 4)))


def test_channel_chains_of_a_graph():
    from lightning_dance.execution.chains import ChannelChain, channel_chains

    assert channel_chains(ChainNet()) == {
        "s1": ChannelChain("s1", "t1", ("bn1",)),
        "t1": ChannelChain("t1", "s2", ("bn2",)),
        "s2": ChannelChain("s2", "t2", ()),
    }
    # a grouped (not depthwise) consumer, a conv called twice and a conv read twice end no
    # chain; a depthwise consumer does
    shared = nn.Conv3d(4, 4, 1)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.g = nn.Conv3d(4, 4, 1), shared, nn.Conv3d(4, 4, 1, groups=2)
            self.c, self.dw = nn.Conv3d(4, 6, 1), nn.Conv3d(6, 12, 3, groups=6)

        def forward(self, x):
            y = self.b(self.b(x))
            z = self.a(y)
            return self.g(torch.relu(z)) + self.b(y) + self.dw(torch.sigmoid(self.c(x))).mean()

    assert channel_chains(Shared()) == {"c": ChannelChain("c", "dw", ())}


def test_conv_norms_of_a_graph():
    """The BatchNorm that alone reads a conv's output, whatever its statistics (folding checks
    them); not a conv read twice, a norm after another op, a norm called twice."""
    from lightning_dance.execution.chains import conv_norms
    from lightning_dance.models import create_model

    assert conv_norms(ChainNet()) == {"stem.0": "stem.1", "s1": "bn1", "t1": "bn2"}
    bn = nn.BatchNorm3d(4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Conv3d(4, 4, 1) for _ in range(4))
            self.bn_a, self.bn_b, self.shared = nn.BatchNorm3d(4), nn.BatchNorm3d(4), bn

        def forward(self, x):
            y = self.a(x)
            y = self.bn_a(y) + y  # the conv output is read twice
            y = self.bn_b(torch.relu(self.b(y)))  # an op in between
            return self.shared(self.c(y)) + self.shared(self.d(y))  # a norm called twice

    assert conv_norms(Odd()) == {}
    r2 = conv_norms(create_model("r2plus1d_18", num_classes=4, width=0.25))
    assert len(r2) == 2 + 8 * 4 + 3  # the stem (2+1)D pair, 4 per basic block, 3 shortcuts


def test_channel_chains_of_video_models():
    from lightning_dance.execution.chains import ChannelChain, channel_chains
    from lightning_dance.models import create_model

    r2 = channel_chains(create_model("r2plus1d_18", num_classes=4, width=0.25))
    # per basic block: spatial1 -> temporal1 -> spatial2 -> temporal2 (3 chains); + the stem
    assert len(r2) == 8 * 3 + 1
    assert r2["layer1.0.conv1.0.0"].consumer == "layer1.0.conv1.0.3"
    assert r2["layer1.0.conv1.0.3"].consumer == "layer1.0.conv2.0.0"
    assert "layer1.0.conv2.0.3" not in r2  # meets the residual add
    # torchvision-style Conv3d subclasses (Conv3DSimple) are found too
    assert len(channel_chains(create_model("r3d_18", num_classes=4, width=0.25))) == 8
    # X3D-XS: each of its 26 bottlenecks' conv_a -> norm_a -> ReLU -> depthwise conv_b, the
    # 15 squeeze-excitation conv pairs, the stem's conv_t -> depthwise conv_xy
    x3d = channel_chains(create_model("x3d_xs", num_classes=4))
    blocks = [n[: -len(".conv_a")] for n in x3d if n.endswith("branch2.conv_a")]
    assert len(blocks) == 26 and len(x3d) == 26 + 15 + 1
    for b in blocks:
        assert x3d[f"{b}.conv_a"] == ChannelChain(f"{b}.conv_a", f"{b}.conv_b", (f"{b}.norm_a",))
    assert x3d["blocks.0.conv.conv_t"].consumer == "blocks.0.conv.conv_xy"


def test_channel_chains_untraceable_model_warns():
    from lightning_dance.execution.chains import channel_chains, conv_norms

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv3d(3, 4, 1), nn.Conv3d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.warns(UserWarning, match="could not trace"):
        assert channel_chains(Branchy()) == {}
    with pytest.warns(UserWarning, match="no BatchNorm will be folded"):
        assert conv_norms(Branchy()) == {}


@st.composite
def subset_cases(draw):
    """A dense (groups == 1) conv case with held input channels and chosen output channels."""
    conv, x, values = draw(conv_cases())
    assume(conv.groups == 1)
    c_in, c_out = conv.in_channels, conv.out_channels
    kept = (values["channel"] > 0.5).any(0) if "channel" in values else torch.ones(c_in, dtype=bool)
    extra = torch.tensor(draw(st.lists(st.booleans(), min_size=c_in, max_size=c_in)))
    held = (kept | extra).nonzero().flatten()
    out = torch.tensor(draw(st.lists(st.booleans(), min_size=c_out, max_size=c_out)))
    return conv, x, values, held, out.nonzero().flatten()


@HYP
@given(subset_cases(), st.sampled_from(["group", "union"]))
def test_compact_held_inputs_and_chosen_outputs(case, batch_mode):
    conv, x, values, held, out = case
    with torch.no_grad():
        ref = conv(apply_masks(x, values))[:, out]
        with count_executed_macs() as macs:
            y = compact_conv3d(conv, x[:, held], values, in_channels=held, out_channels=out,
                               batch_mode=batch_mode)  # fmt: skip
    assert y.shape == ref.shape
    if ref.numel():
        _close(y, ref)
    counted = conv3d_executed_macs_batch(conv, tuple(x.shape[1:]), batch_size=x.shape[0], **values)
    if batch_mode == "group" or x.shape[0] == 1:
        assert macs.total * conv.out_channels == int(counted.sum()) * len(out)


def test_compact_channel_subsets_errors():
    conv = nn.Conv3d(4, 6, 1)
    x = torch.randn(1, 4, 2, 3, 3)
    keep = {"channel": torch.tensor([[1.0, 0, 1, 0]])}
    with pytest.raises(ValueError, match="x holds 4 channels but in_channels names 2"):
        compact_conv3d(conv, x, keep, in_channels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="does not hold"):
        compact_conv3d(conv, x[:, :2], keep, in_channels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sorted, unique"):
        compact_conv3d(conv, x, {}, out_channels=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 6\)"):
        compact_conv3d(conv, x, {}, out_channels=torch.tensor([6]))
    with pytest.raises(TypeError, match="LongTensor"):
        compact_conv3d(conv, x, {}, out_channels=[0, 1])
    with pytest.raises(ValueError, match="groups == 1"):
        compact_conv3d(nn.Conv3d(4, 4, 1, groups=2), x, {}, out_channels=torch.tensor([0]))
    nothing = compact_conv3d(conv, x, keep, out_channels=torch.tensor([], dtype=torch.long))
    assert nothing.shape == (1, 0, 2, 3, 3)


def _skipped_macs_reference(pruner: AdaptivePruner, chains) -> int:
    """MACs with output skipping, from the pruner's own per-layer counts: a producer computes
    |union over the batch of its consumer's kept channels| of its C_out outputs."""
    layers = pruner.last_stats.layers
    total = 0
    for name, s in layers.items():
        e = int(s.executed_macs.sum())
        conv = dict(pruner.model.named_modules())[name]
        if name in chains:
            k = int((layers[chains[name].consumer].masks["channel"] > 0.5).any(0).sum())
            assert e % conv.out_channels == 0
            e = e // conv.out_channels * k
        total += e
    return total


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    dims=st.sampled_from([("channel",), ("channel", "frame"), DIMS]),
    policy=st.sampled_from(["threshold", "topk"]),
    budget=st.sampled_from([0.1, 0.5, 1.0]),
    n=st.sampled_from([1, 2]),
    seed=st.integers(0, 100),
)
def test_compact_pruner_skips_outputs_exactly(dims, policy, budget, n, seed):
    torch.manual_seed(seed)
    net = ChainNet().eval()
    pruner = _randomized(AdaptivePruner(net, dims=dims, policy=policy, budget=budget,
                                        credit_outputs=False), seed)  # fmt: skip
    clip = torch.randn(n, 3, 5, 12, 12, generator=torch.Generator().manual_seed(seed))
    fast, inputs_only = CompactPruner(pruner), CompactPruner(pruner, skip_outputs=False)
    assert sorted(fast.chains) == ["s1", "s2", "t1"] and inputs_only.chains == {}
    with torch.no_grad():
        ref = pruner(clip)
        with count_executed_macs() as skipped:
            y = fast(clip)
        with count_executed_macs() as plain:
            y_plain = inputs_only(clip)
    _close(y, ref)
    _close(y_plain, ref)
    assert skipped.total == _skipped_macs_reference(pruner, fast.chains)
    assert plain.total == sum(int(s.executed_macs.sum()) for s in pruner.last_stats.layers.values())
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_compact_pruner_output_skipping_on_r2plus1d():
    """A real R(2+1)D: same logits as the masked model, far fewer MACs than input skipping."""
    from lightning_dance.models import create_model

    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=5, width=0.25).eval().to(memory_format=CL)
    pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.4,
                            credit_outputs=False).eval()  # fmt: skip
    clip = torch.randn(1, 3, 4, 32, 32)
    fast = CompactPruner(pruner)
    with torch.no_grad():
        ref = pruner(clip)
        with count_executed_macs() as macs:
            y = fast(clip)
    _close(y, ref)
    assert len(fast.chains) == 24
    assert macs.total == _skipped_macs_reference(pruner, fast.chains)
    counted = sum(int(s.executed_macs.sum()) for s in pruner.last_stats.layers.values())
    assert macs.total < 0.7 * counted


def test_compact_pruner_skip_outputs_errors():
    pruner = AdaptivePruner(ChainNet(), dims=("channel",), policy="topk", budget=0.2).eval()
    with pytest.raises(TypeError, match="skip_outputs must be a bool"):
        CompactPruner(pruner, skip_outputs="yes")
    fast = CompactPruner(pruner)
    clip = torch.randn(1, 3, 4, 12, 12)
    with torch.no_grad():
        fast(clip)
    pruner.model.bn1.train()  # a norm left in training mode would update sliced statistics
    with pytest.raises(RuntimeError, match="training mode"), torch.no_grad():
        fast(clip)
    assert all("forward" not in m.__dict__ for m in pruner.model.modules())


def test_gather_weight_copy_follows_weight_updates():
    """Channels-last weights are gathered from a cached NCDHW copy: an in-place update of the
    weight (an optimizer step, loading a checkpoint) must reach the next call."""
    conv = nn.Conv3d(6, 5, (1, 3, 3), padding=(0, 1, 1)).to(memory_format=CL)
    x = torch.randn(1, 6, 3, 8, 8)
    keep = {"channel": torch.tensor([[1.0, 0, 1, 1, 0, 1]])}
    out = torch.tensor([0, 2, 3])
    for _ in range(2):
        with torch.no_grad():
            _close(compact_conv3d(conv, x, keep, out_channels=out),
                   conv(apply_masks(x, keep))[:, out])  # fmt: skip
            conv.weight.mul_(-2.0)
    with torch.no_grad():
        conv.load_state_dict({"weight": torch.randn(5, 6, 1, 3, 3), "bias": torch.zeros(5)})
        _close(compact_conv3d(conv, x, keep, out_channels=out), conv(apply_masks(x, keep))[:, out])
    y = compact_conv3d(conv, x, keep, out_channels=out)  # with autograd: no cached copy
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad[:, [1, 4]].abs().sum() == 0


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    dims=st.sampled_from([("channel",), ("channel", "frame"), DIMS]),
    policy=st.sampled_from(["threshold", "topk"]),
    budget=st.sampled_from([0.1, 0.4, 1.0]),
    seed=st.integers(0, 100),
)
def test_credited_count_is_what_the_fast_path_runs(dims, policy, budget, seed):
    """``credit_outputs=True``: the pruner's per-clip count equals the MACs the output-skipping
    fast path runs on that clip alone (the reference: each clip of the batch run by itself)."""
    torch.manual_seed(seed)
    pruner = AdaptivePruner(ChainNet().eval(), dims=dims, policy=policy, budget=budget,
                            credit_outputs=True)  # fmt: skip
    pruner = _randomized(pruner, seed)
    clip = torch.randn(2, 3, 5, 12, 12, generator=torch.Generator().manual_seed(seed))
    fast = CompactPruner(pruner)
    with torch.no_grad():
        pruner(clip)
        counted = sum(s.executed_macs for s in pruner.last_stats.layers.values())
        per_clip = []
        for i in range(2):  # alone (ChainNet has a BatchNorm on batch statistics)
            one = clip[i : i + 1]
            ref = pruner(one)
            assert sum(s.executed_macs for s in pruner.last_stats.layers.values()) == counted[i]
            with count_executed_macs() as macs:
                _close(fast(one), ref)
            per_clip.append(macs.total)
    assert counted.tolist() == per_clip
    # the uncredited count of the same masks is the inputs-only path's
    plain = AdaptivePruner(pruner.model, dims=dims, policy=policy, budget=budget,
                           credit_outputs=False)  # fmt: skip
    plain.load_state_dict(pruner.state_dict())
    if policy == "threshold":  # same masks (topk keeps more when credited, below)
        with torch.no_grad():
            plain.eval()(clip)
        uncredited = sum(s.executed_macs for s in plain.last_stats.layers.values())
        assert (counted <= uncredited).all() and (budget == 1.0 or (counted < uncredited).any())


def test_credited_count_is_differentiable():
    """Training: the credited expected count equals the hard one in value and carries the
    consumer's channel-gate gradients into the producer's term."""
    clip = torch.randn(2, 3, 5, 12, 12)
    grads = {}
    for credit in (False, True):
        torch.manual_seed(0)
        pruner = AdaptivePruner(ChainNet(), dims=("channel",), policy="threshold", budget=0.3,
                                credit_outputs=credit).train()  # fmt: skip
        pruner(clip)
        stats = pruner.last_stats
        torch.testing.assert_close(stats.expected_macs(), stats.executed_macs().double())
        consumer = pruner.output_chains()["s1"].consumer if credit else "t1"
        start, stop = pruner.controller._channel_slices[consumer]
        (g,) = torch.autograd.grad(stats.layers["s1"].expected_macs.sum(),
                                   pruner.controller.channel_head.bias)  # fmt: skip
        grads[credit] = g[start:stop].abs().sum()
    assert grads[False] == 0 and grads[True] > 0  # the producer's count reads the consumer's gates


def test_credited_topk_keeps_more_and_meets_the_budget_uncalibrated():
    """topk with credit solves its keep ratio for the credited count: on R(2+1)D the eval MAC
    ratio lands on the budget without calibration, keeping more channels than without credit."""
    from lightning_dance.models import create_model

    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=5, width=0.25).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    ratios, keeps = {}, {}
    for credit in (False, True):
        pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.4,
                                credit_outputs=credit).eval()  # fmt: skip
        with torch.no_grad():
            pruner(clip)
        ratios[credit] = float(pruner.last_stats.mac_ratio())
        keeps[credit] = pruner.keep_ratio()
    assert abs(ratios[True] - 0.4) < 0.03 and abs(ratios[False] - 0.4) < 0.03, ratios
    assert keeps[True] > keeps[False] + 0.1, keeps


def test_credit_outputs_arguments_and_untraceable_models():
    with pytest.raises(TypeError, match="credit_outputs must be a bool or None"):
        AdaptivePruner(ChainNet(), credit_outputs=1)
    with pytest.raises(ValueError, match="needs 'channel' in dims"):
        AdaptivePruner(ChainNet(), dims=("frame",), credit_outputs=True)

    class Branchy(nn.Module):  # fx cannot trace it: no chains, nothing credited
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Conv3d(3, 4, 1), nn.Conv3d(4, 4, 1), nn.Conv3d(4, 2, 1)

        def forward(self, x):
            y = self.b(self.a(self.stem(x)))
            return y.mean((1, 2, 3, 4)) if x.sum() > -1e9 else y.sum()

    clip, net = torch.randn(1, 3, 2, 4, 4), Branchy()
    counts = []
    for credit in (False, True):
        pruner = _randomized(AdaptivePruner(net, dims=("channel",), budget=0.5,
                                            credit_outputs=credit), 0)  # fmt: skip
        if credit:
            with pytest.warns(UserWarning, match="could not trace"):
                pruner(clip)
        else:
            pruner(clip)
        counts.append(pruner.last_stats.executed_macs())
    torch.testing.assert_close(counts[0], counts[1])


def test_credit_outputs_is_on_by_default_wherever_it_applies():
    """The default count is what the compact path runs: credited wherever channels are pruned
    by a policy with a controller; off without channels and for a policy that scores each
    layer's own input (no look-ahead); a checkpointed wrapper keeps the count it trained with."""
    from lightning_dance.wrapper import DANCEWrapper

    assert AdaptivePruner(ChainNet()).credit_outputs is True
    assert AdaptivePruner(ChainNet(), policy="topk", dims=("channel",)).credit_outputs is True
    assert AdaptivePruner(ChainNet(), dims=("frame", "feature")).credit_outputs is False
    assert AdaptivePruner(ChainNet(), policy="attention",
                          dims=("channel", "feature")).credit_outputs is False  # fmt: skip
    assert AdaptivePruner(ChainNet(), credit_outputs=False).credit_outputs is False
    old = DANCEWrapper(ChainNet(), dims=("channel",), credit_outputs=False)
    assert old.hparams.credit_outputs is False and old.pruner.credit_outputs is False
    assert DANCEWrapper(ChainNet(), dims=("channel",)).pruner.credit_outputs is True
    # the default count equals the MACs the output-skipping path runs on a clip (batch 1)
    pruner = _randomized(AdaptivePruner(ChainNet().eval(), dims=("channel",), budget=0.4), 2)
    clip = torch.randn(1, 3, 5, 12, 12)
    with torch.no_grad():
        pruner(clip)
        with count_executed_macs() as macs:
            CompactPruner(pruner)(clip)
    assert sum(int(s.executed_macs) for s in pruner.last_stats.layers.values()) == macs.total
