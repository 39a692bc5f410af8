"""What the compact path pays per layer besides the kept work, and that the shortcuts which
remove it change nothing else.

- :func:`~lightning_dance.execution.pixels.pixelwise` convs with a feature mask run on the kept
  positions only (one gather, one write), equal to the masked conv, with the counted MACs;
- masks that keep everything run the plain conv (one kernel call, nothing padded or copied),
  except where exactness needs the frame taps (temporal padding, untuned);
- :meth:`~lightning_dance.decision.DecisionPlan.prefetch` makes every layer's eval masks in a
  few ops, bit-for-bit those made layer by layer.

References: ``conv(apply_masks(x, values))`` with the plain ``nn.Conv3d``, the executed-MAC
counter, :meth:`DecisionPlan.masks` made one layer at a time, ``torch.profiler`` op names.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from lightning_dance.aap import AdaptivePruner
from lightning_dance.decision import DecisionPlan
from lightning_dance.executed import conv3d_executed_macs_batch
from lightning_dance.execution import CompactPruner, LayerTuning, compact_conv3d
from lightning_dance.execution import count_executed_macs as count_ran
from lightning_dance.execution.compact import skip_unread
from lightning_dance.execution.pixels import pixelwise
from lightning_dance.geometry import cached_geometry
from lightning_dance.masks import apply_masks, expand_blocks
from lightning_dance.models import create_model
from lightning_dance.policies import get_policy
from lightning_dance.policies.threshold import ThresholdPolicy

CL = torch.channels_last_3d


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    err = ((y - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
    assert err <= rtol, f"max relative error {err:.2e}"


def _ops(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}


# ----------------------------------------------------------------------- pixelwise convs
@pytest.mark.parametrize(
    "kernel, stride, padding, pixel",
    [
        ((3, 1, 1), 1, (1, 0, 0), True),  # R(2+1)D's temporal conv
        ((1, 1, 1), (1, 2, 2), 0, True),  # a strided 1x1x1 shortcut (after skip_unread)
        ((1, 1, 1), 1, 0, True),
        ((3, 1, 1), (2, 1, 1), (1, 0, 0), True),
        ((1, 3, 3), 1, (0, 1, 1), False),  # reads a halo
        ((1, 1, 1), 1, (0, 1, 1), False),  # outputs on padding
    ],
)
def test_pixelwise_geometry(kernel, stride, padding, pixel):
    conv = nn.Conv3d(4, 4, kernel, stride=stride, padding=padding)
    g = cached_geometry(conv, (4, 4, 8, 8))
    assert pixelwise(skip_unread(g, torch.zeros(1, 4, 4, 8, 8), None, None)[0]) == pixel


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "kernel, stride, padding",
    [((3, 1, 1), 1, (1, 0, 0)), ((1, 1, 1), (2, 2, 2), 0), ((3, 1, 1), (2, 1, 1), (1, 0, 0))],
)
@pytest.mark.parametrize("n", [1, 3])
def test_pixelwise_conv_runs_the_kept_positions(kernel, stride, padding, bias, n):
    """Equal to the masked conv, the counted MACs ran, one gather of the kept positions."""
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 5, kernel, stride=stride, padding=padding, bias=bias).eval()
    x = torch.randn(n, 6, 6, 12, 12).contiguous(memory_format=CL)
    g = torch.Generator().manual_seed(1)
    blocks = (torch.rand(n, 3, 3, generator=g) < 0.5).float()
    blocks[:, 0, 0] = 1.0
    values = {
        "feature": expand_blocks(blocks, (12, 12)),
        "frame": (torch.rand(n, 6, generator=g) < 0.7).float(),
        "channel": (torch.rand(n, 6, generator=g) < 0.6).float(),
    }
    values["frame"][:, 0] = values["channel"][:, 0] = 1.0
    with torch.no_grad():
        ref = conv(apply_masks(x, values))
        with count_ran() as ran:
            y = compact_conv3d(conv, x, values)
    _close(y, ref)
    counted = conv3d_executed_macs_batch(conv, tuple(x.shape[1:]), batch_size=n, **values)
    assert ran.total == int(counted.sum())
    # kept positions only: the conv sees fewer positions than the whole map
    assert (
        ran.total
        < conv3d_executed_macs_batch(
            conv, tuple(x.shape[1:]), batch_size=n, frame=values["frame"], channel=values["channel"]
        ).sum()
    )


def test_pixelwise_conv_with_nothing_kept_is_the_bias():
    conv = nn.Conv3d(3, 4, (3, 1, 1), padding=(1, 0, 0)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    values = {"feature": torch.zeros(1, 8, 8)}
    with torch.no_grad(), count_ran() as ran:
        y = compact_conv3d(conv, x, values)
    assert ran.total == 0
    assert torch.equal(y, conv.bias.view(1, 4, 1, 1, 1).expand_as(y))


def test_pixelwise_conv_reads_only_the_held_channels_and_computes_the_asked_outputs():
    """As a channel chain's consumer (x holds the kept channels) and producer (out_idx)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 6, (3, 1, 1), padding=(1, 0, 0)).eval()
    full = torch.randn(1, 8, 4, 8, 8)
    held = torch.tensor([0, 2, 3, 6])
    m_c = torch.zeros(1, 8)
    m_c[0, held] = 1.0
    blocks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    values = {"channel": m_c, "feature": expand_blocks(blocks, (8, 8))}
    out_idx = torch.tensor([1, 4, 5])
    with torch.no_grad():
        ref = conv(apply_masks(full, values))[:, out_idx]
        y = compact_conv3d(
            conv, full[:, held].contiguous(memory_format=CL), values,
            in_channels=held, out_channels=out_idx,
        )  # fmt: skip
    _close(y, ref)


# ----------------------------------------------------------------- masks that drop nothing
def test_masks_that_keep_everything_run_the_plain_conv():
    """One kernel call, no padding copy, no gather; the counted MACs (every output active)."""
    conv = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)).to(memory_format=CL).eval()
    x = torch.randn(1, 8, 4, 16, 16).contiguous(memory_format=CL)
    values = {"frame": torch.ones(1, 4), "channel": torch.ones(1, 8),
              "feature": torch.ones(1, 16, 16)}  # fmt: skip
    with torch.no_grad():
        ref = conv(x)
        with count_ran() as ran:
            y = compact_conv3d(conv, x, values)
        ops = _ops(lambda: compact_conv3d(conv, x, values))
    _close(y, ref)
    counted = conv3d_executed_macs_batch(conv, (8, 4, 16, 16), batch_size=1, **values)
    assert ran.total == int(counted.sum())
    convs = sum(c for k, c in ops.items() if "convolution" in k and "mkldnn" in k)
    if torch.backends.mkldnn.is_available():
        assert convs == 1, ops
    for op in ("aten::constant_pad_nd", "aten::index_select", "aten::gather", "aten::mul"):
        assert op not in ops, ops


@pytest.mark.parametrize("tuned", [False, True])
def test_all_kept_frames_with_temporal_padding(tuned):
    """Untuned: the taps on padding frames stay skipped, as counted; tuned: the plain conv
    (faster), computing those taps as the dense model does. Same outputs either way."""
    conv = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0)).eval()
    x = torch.randn(1, 4, 6, 8, 8)
    values = {"frame": torch.ones(1, 6)}
    tuning = LayerTuning(1.0, frame_ms={6: 5.0}) if tuned else None
    with torch.no_grad(), count_ran() as ran:
        y = compact_conv3d(conv, x, values, tuning=tuning)
    _close(y, conv(x))
    counted = int(conv3d_executed_macs_batch(conv, (4, 6, 8, 8), batch_size=1, **values).sum())
    dense = 6 * 8 * 8 * 4 * 4 * 3
    assert counted < dense
    assert ran.total == (dense if tuned else counted)


def test_all_kept_features_whose_outputs_read_only_padding_stay_exact():
    """A 1x1x1 conv padded by 1: the border outputs read only padding, the count leaves them
    out, so an all-kept feature mask is not dropped there."""
    conv = nn.Conv3d(2, 2, 1, padding=(0, 1, 1), bias=False).eval()
    x = torch.randn(1, 2, 3, 4, 4)
    values = {"feature": torch.ones(1, 4, 4)}
    with torch.no_grad(), count_ran() as ran:
        y = compact_conv3d(conv, x, values)
    _close(y, conv(x))
    counted = conv3d_executed_macs_batch(conv, (2, 3, 4, 4), batch_size=1, **values)
    assert ran.total == int(counted.sum()) == 3 * 4 * 4 * 2 * 2


# ------------------------------------------------------------------- batched decisions
def _pruner(policy="threshold", dims=("frame", "channel", "feature"), **kw) -> AdaptivePruner:
    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=4, width=0.25).eval()
    p = AdaptivePruner(net, dims=dims, policy=policy, budget=0.4, **kw).eval()
    with torch.no_grad():  # spread the untrained controller's scores around the threshold
        for prm in p.controller.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    return p


def _stem_out(p: AdaptivePruner, clip: torch.Tensor) -> torch.Tensor:
    return p.model.get_submodule(p.stem_name)(clip)


def _shapes(p: AdaptivePruner, clip: torch.Tensor) -> dict[str, tuple[int, ...]]:
    from lightning_dance.geometry import conv3d_input_shapes

    shapes = conv3d_input_shapes(p.model, clip[:1])
    return {n: p.mask_shape(n, shapes[n]) for n in p.layer_names}


@pytest.mark.parametrize(
    "policy, kw",
    [
        ("threshold", {}),
        ("threshold", {"budget_conditioned": True}),
        ("threshold", {"feature_site": "outputs"}),
        ("topk", {}),
        ("width", {"dims": ("channel",)}),
    ],
)
@pytest.mark.parametrize("n", [1, 2])
def test_prefetched_masks_are_the_layer_by_layer_masks(policy, kw, n):
    p = _pruner(policy, **kw)
    clip = torch.randn(n, 3, 4, 32, 32)
    shapes = _shapes(p, clip)
    with torch.no_grad():
        p.prepare(clip)
        stem = _stem_out(p, clip)
        one_by_one, batched = p.decide(stem), p.decide(stem)
        assert batched.prefetch(shapes) == len(shapes)
        kept = []
        for name, shape in shapes.items():
            want = one_by_one.masks(name, shape)
            got = batched._masks[(name, shape)]
            assert list(got.values) == list(want.values)
            for dim in want.values:
                assert torch.equal(got.values[dim], want.values[dim]), (name, dim)
                assert torch.equal(got.probs[dim], want.probs[dim]), (name, dim)
                assert got.values[dim].shape == want.values[dim].shape
            kept += [float(v.mean()) for v in want.values.values()]
            assert batched.masks(name, shape) is got  # served from the prefetch
    assert 0.0 < min(kept) and min(kept) < 1.0  # the decisions are not trivial


def test_decide_prefetches_the_layers_a_plan_was_asked_for():
    """The first plan of a clip shape notes what it is asked; the next ones decide all of it
    at once; the compact path's output is unchanged."""
    p = _pruner()
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        ref = p(clip)
        assert ref.abs().max() > 1e-3  # the pruned network still carries a signal
        fast = CompactPruner(p)
        first = fast(clip)
        p.prepare(clip)
        plan = p.decide(_stem_out(p, clip), prefetch=True)
        assert len(plan._masks) == len(p.layer_names)  # all made before anyone asked
        again = fast(clip)
    _close(first, ref)
    assert torch.equal(first, again)


def test_prefetch_does_nothing_where_it_cannot_be_exact():
    p = _pruner()
    clip = torch.randn(1, 3, 4, 32, 32)
    shapes = _shapes(p, clip)
    with torch.no_grad():
        p.prepare(clip)
        stem = _stem_out(p, clip)
        plan = p.decide(stem)
        plan.margins = []  # margins are recorded decision by decision
        assert plan.prefetch(shapes) == 0
        p.train()
        assert p.decide(stem).prefetch(shapes) == 0  # training gates draw noise per layer
        p.eval()

        class Batchwise(ThresholdPolicy):  # a gate that looks across rows
            name = ""
            rowwise_eval = False

        plan = DecisionPlan(p.controller, p.controller(stem), Batchwise())
        assert plan.prefetch(shapes) == 0 and not plan._masks
    assert get_policy("threshold").rowwise_eval


# ------------------------------------------------------------- joint cost of many dims
def test_tuning_measures_every_dim_cut_at_once():
    """Two or more tuned dims: the joint cost is measured (per-dim costs each carry the layer's
    fixed costs, so their product overstates); one dim: nothing joint."""
    from lightning_dance.execution import tune_conv3d

    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0)).eval()
    both = tune_conv3d(conv, (16, 4, 16, 16), ("frame", "channel", "feature"), repeats=1)
    assert sorted(both.joint_ms) == [0.25, 0.5, 0.75, 1.0]
    assert all(ms > 0 for ms in both.joint_ms.values())
    assert both.estimate_ms(0.5) == both.joint_ms[0.5]
    assert both.estimate_ms(0.1) == both.joint_ms[0.25]  # clamped to the measured range
    one = tune_conv3d(conv, (16, 4, 16, 16), ("channel",), repeats=1)
    assert one.joint_ms == {} and one.estimate_ms(0.5) > 0


def test_estimate_without_joint_points_multiplies_the_dims():
    t = LayerTuning(10.0, channel_ms={1: 1.0, 4: 5.0, 8: 10.0}, frame_ms={1: 6.0, 2: 10.0})
    assert t.estimate_ms(0.5) == pytest.approx(3.0)
    t.joint_ms = {0.25: 12.0, 1.0: 10.0}
    assert t.estimate_ms(0.25) == 12.0  # measured: slower than dense, whatever the product says
