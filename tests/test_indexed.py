"""The index plan of CompactPruner (topk channel pruning at batch 1, run from the top-k indices):
same result and multiply-adds as the general mask-based plan and the masked model, far fewer ops,
and the general plan wherever it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import lightning_dance.execution.compact as compact
import lightning_dance.execution.executor as executor
import lightning_dance.execution.indexed as indexed
from lightning_dance.aap import AdaptivePruner
from lightning_dance.execution import CompactPruner, count_executed_macs
from lightning_dance.execution.compact import kept_weight
from lightning_dance.execution.indexed import (
    indexed_conv3d,
    indexed_depthwise,
    indexed_norm,
    topk_indices,
)
from lightning_dance.masks import apply_masks
from tests.conftest import SmallNet
from tests.test_execution import (
    CL,
    ChainNet,
    _close,
    _kernels,
    _randomized,
    _skipped_macs_reference,
)


def _both_plans(pruner: AdaptivePruner, clip: torch.Tensor):
    """Outputs and executed MACs of the index plan and the general plan, and the masked model."""
    out = {}
    with torch.no_grad():
        ref = pruner(clip)
        for flag in (True, False):
            with count_executed_macs() as macs:
                y = CompactPruner(pruner, index_plan=flag)(clip)
            out[flag] = (y, macs.total)
    return out[True], out[False], ref


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    budget=st.sampled_from([0.05, 0.3, 0.6, 1.0]),
    multiple=st.sampled_from([1, 4]),
    conditioned=st.booleans(),
    seed=st.integers(0, 100),
    model=st.sampled_from([ChainNet, SmallNet]),  # SmallNet: a chain into a depthwise conv
    policy=st.sampled_from(["topk", "threshold", "width"]),
)
def test_index_plan_equals_the_general_plan_and_the_masked_model(
    budget, multiple, conditioned, seed, model, policy
):
    torch.manual_seed(seed)
    net = model().eval()
    if seed % 2:
        net = net.to(memory_format=CL)  # weights in either layout
    multiple = multiple if policy == "topk" else 1  # channel_multiple: fixed counts only
    pruner = AdaptivePruner(net, dims=("channel",), policy=policy, budget=budget,
                            channel_multiple=multiple, budget_conditioned=conditioned)  # fmt: skip
    pruner = _randomized(pruner, seed)
    clip = torch.randn(1, 3, 5, 12, 12, generator=torch.Generator().manual_seed(seed))
    (y_idx, macs_idx), (y_gen, macs_gen), ref = _both_plans(pruner, clip)
    _close(y_idx, ref)
    _close(y_idx, y_gen)
    assert macs_idx == macs_gen  # the same kept channels, the same output skipping
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_index_plan_on_r2plus1d_runs_far_fewer_ops():
    """A real R(2+1)D: same logits and MACs, and about two thirds of the general plan's ops
    (the per-layer mask round trip and the four BatchNorm gathers are gone)."""
    from lightning_dance.models import create_model

    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=5, width=0.25).eval().to(memory_format=CL)
    pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.4).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    (y_idx, macs_idx), (y_gen, macs_gen), ref = _both_plans(pruner, clip)
    _close(y_idx, ref)
    assert macs_idx == macs_gen
    ops = {}
    with torch.no_grad():
        for flag in (True, False):
            fast = CompactPruner(pruner, index_plan=flag)
            fast(clip)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fast(clip)
            events = prof.key_averages()
            ops[flag] = sum(e.count for e in events if e.key.startswith("aten::"))
            names = {e.key for e in events}
            assert "aten::slow_conv3d_forward" not in names
            # the general plan turns masks back into indices; the index plan never does
            assert ("aten::nonzero" in names) == (not flag)
    assert ops[True] < 0.7 * ops[False], ops  # here ~2000 vs ~3100


class _OddNet(nn.Module):
    """Instrumented layers the index plan leaves to compact_conv3d (grouped, "same" and reflect
    padding), a chain from a "same"-padded conv into an ordinary one, and a chain into a
    depthwise conv (which the index plan runs itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 8, 3, padding=1)
        self.grouped = nn.Conv3d(8, 8, 3, padding=1, groups=2)
        self.same = nn.Conv3d(8, 12, (2, 3, 3), padding="same")
        self.s = nn.Conv3d(12, 12, (1, 3, 3), padding=(0, 1, 1))
        self.bn = nn.BatchNorm3d(12)
        self.t = nn.Conv3d(12, 8, (3, 1, 1), padding=(1, 0, 0))
        self.dw = nn.Conv3d(8, 8, 3, padding=1, groups=8)
        self.reflect = nn.Conv3d(8, 6, 3, padding=1, padding_mode="reflect")
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = self.same(torch.relu(self.grouped(self.stem(x))))
        x = self.t(torch.relu(self.bn(self.s(x))))
        return self.reflect(self.dw(x)).mean((2, 3, 4))


@pytest.mark.parametrize("budget", [0.2, 0.7])
def test_index_plan_with_odd_layers(budget):
    pruner = _randomized(AdaptivePruner(_OddNet(), dims=("channel",), policy="topk",
                                        budget=budget), 3)  # fmt: skip
    clip = torch.randn(1, 3, 4, 10, 10)
    (y_idx, macs_idx), (y_gen, macs_gen), ref = _both_plans(pruner, clip)
    _close(y_idx, ref)
    assert macs_idx == macs_gen
    # "same" padding: the general plan; t -> dw: a chain into a depthwise conv
    assert sorted(CompactPruner(pruner).chains) == ["s", "same", "t"]


class _DepthwiseTail(nn.Module):
    """stem -> 1x1x1 conv -> BN -> ReLU -> depthwise conv (channel multiplier 2) with any
    padding: a chain into a depthwise consumer the index plan or compact_conv3d runs."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.stem, self.a, self.bn = (
            nn.Conv3d(3, 8, 3, padding=1),
            nn.Conv3d(8, 12, 1),
            nn.BatchNorm3d(12),
        )
        pad = {"padding": "same"} if mode == "same" else {"padding": 1, "padding_mode": mode}
        self.dw = nn.Conv3d(12, 24, (2, 3, 3) if mode == "same" else 3, groups=12, **pad)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.dw(torch.relu(self.bn(self.a(self.stem(x))))).mean((2, 3, 4))


@pytest.mark.parametrize("mode", ["zeros", "same", "reflect", "circular"])
@pytest.mark.parametrize(
    "dims, n, batch_mode",
    [(("channel",), 1, "group"), (("channel",), 2, "group"), (("channel",), 2, "union"),
     (("channel", "frame"), 1, "group")],
)  # fmt: skip
def test_chain_into_a_depthwise_conv_with_any_padding(mode, dims, n, batch_mode):
    """Both plans (the index plan where it applies: channels, batch 1, zero padding) equal the
    masked model; in ``group`` mode the MACs are the exact output-skipping count."""
    # the full count (credit_outputs=False): the reference's input
    pruner = AdaptivePruner(_DepthwiseTail(mode).eval(), dims=dims, policy="topk", budget=0.8,
                            credit_outputs=False)  # fmt: skip
    pruner = _randomized(pruner, 1)
    with torch.no_grad():
        for seed in range(20):  # a batch whose samples keep different channels of dw
            clip = torch.randn(n, 3, 4, 9, 9, generator=torch.Generator().manual_seed(seed))
            clip[-1] = clip[-1] * 3 + 1
            ref = pruner(clip)
            kept = pruner.last_stats.layers["dw"].masks["channel"] > 0.5
            if n == 1 or not torch.equal(kept[0], kept[1]):
                break
        assert 1 < int(kept[0].sum()) < 12 and (n == 1 or not torch.equal(kept[0], kept[1]))
        for flag in (True, False):
            fast = CompactPruner(pruner, index_plan=flag, batch_mode=batch_mode)
            assert list(fast.chains) == ["a"]
            with count_executed_macs() as macs:
                y = fast(clip)
            _close(y, ref)
            if batch_mode == "group":
                assert macs.total == _skipped_macs_reference(pruner, fast.chains)


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = executor.IndexedRun

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(executor, "IndexedRun", counting)
    return calls


@pytest.mark.parametrize(
    "policy, dims, n, use",
    [("topk", ("channel",), 1, True), ("topk", ("channel",), 2, False),
     ("threshold", ("channel",), 1, True), ("threshold", ("channel",), 2, False),
     ("width", ("channel",), 1, True), ("threshold", ("channel", "frame"), 1, True),
     ("threshold", ("frame", "channel", "feature"), 1, True), ("threshold", ("frame",), 1, True),
     ("topk", ("channel", "frame"), 1, True), ("topk", ("channel", "frame"), 2, False),
     ("attention", ("channel",), 1, False)],
)  # fmt: skip
def test_index_plan_only_where_it_applies(monkeypatch, policy, dims, n, use):
    calls = _spy(monkeypatch)
    pruner = _randomized(AdaptivePruner(ChainNet(), dims=dims, policy=policy, budget=0.4), 0)
    clip = torch.randn(n, 3, 4, 12, 12)
    with torch.no_grad():
        _close(CompactPruner(pruner)(clip), pruner(clip))
        assert len(calls) == int(use)
        CompactPruner(pruner, index_plan=False)(clip)
        assert len(calls) == int(use)


def test_tunings_use_the_general_plan(monkeypatch):
    calls = _spy(monkeypatch)
    pruner = _randomized(AdaptivePruner(ChainNet(), dims=("channel",), policy="topk"), 0)
    clip = torch.randn(1, 3, 4, 12, 12)
    fast = CompactPruner(pruner)
    fast.tune(clip, repeats=1)
    with torch.no_grad():
        _close(fast(clip), pruner(clip))
    assert calls == []


def test_index_plan_follows_weight_and_statistics_updates():
    """Input-major weight copies and BatchNorm scale/shift are cached: an in-place update (an
    optimizer step, a loaded checkpoint) must reach the next call."""
    net = ChainNet().eval().to(memory_format=CL)
    pruner = _randomized(AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.3), 5)
    fast, clip = CompactPruner(pruner), torch.randn(1, 3, 4, 12, 12)
    with torch.no_grad():
        for _ in range(2):
            _close(fast(clip), pruner(clip))
            net.s1.weight.mul_(-1.5)
            net.bn1.running_var.mul_(3.0)
            net.bn1.weight.add_(0.5)
        net.load_state_dict({k: v * 0.5 for k, v in net.state_dict().items()})
        _close(fast(clip), pruner(clip))


def test_index_plan_errors():
    pruner = AdaptivePruner(ChainNet(), dims=("channel",), policy="topk", budget=0.2).eval()
    with pytest.raises(TypeError, match="index_plan must be a bool"):
        CompactPruner(pruner, index_plan=1)
    fast, clip = CompactPruner(pruner), torch.randn(1, 3, 4, 12, 12)
    with torch.no_grad():
        fast(clip)  # (the first call counts dense MACs in eval mode, resetting bn1's mode)
    pruner.model.bn1.train()
    with pytest.raises(RuntimeError, match="training mode"), torch.no_grad():
        fast(clip)
    pruner.model.bn1.eval()
    with pytest.raises(ValueError, match="reads 3 channels"), torch.no_grad():
        fast(torch.randn(1, 4, 4, 12, 12))
    with pytest.raises(ValueError, match="NaN"), torch.no_grad():
        fast(torch.full((1, 3, 4, 12, 12), float("nan")))
    assert all("forward" not in m.__dict__ for m in pruner.model.modules())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel, stride, padding", [
    ((3, 1, 1), 1, (1, 0, 0)), (1, 2, 0), (1, 1, 0), (1, (2, 1, 1), 0)])  # fmt: skip
@pytest.mark.parametrize("cl_min", [0, compact.CHANNELS_LAST_GATHER_MIN])
def test_indexed_conv3d_against_the_masked_conv(monkeypatch, bias, kernel, stride, padding, cl_min):
    """One conv: kept inputs in any order, chosen outputs in any order, gathered inputs; 1x1x1
    convs run as a GEMM from the gathered weight rows, with the same values and MACs; weight
    blocks gathered in either layout."""
    monkeypatch.setattr(compact, "CHANNELS_LAST_GATHER_MIN", cl_min)
    torch.manual_seed(3)
    conv = nn.Conv3d(10, 7, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(1, 10, 4, 6, 6)
    in_idx, out_idx = torch.tensor([7, 0, 3, 9]), torch.tensor([5, 1, 2])
    mask = torch.zeros(1, 10).index_fill_(1, in_idx, 1.0)
    ref = conv(apply_masks(x, {"channel": mask}))
    kvol = conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2]
    with torch.no_grad():
        with count_executed_macs() as macs:
            _close(indexed_conv3d(conv, x, in_idx), ref)
        assert macs.total == ref.numel() * len(in_idx) * kvol
        with count_executed_macs() as macs:
            _close(indexed_conv3d(conv, x, in_idx, out_idx), ref[:, out_idx])
        assert macs.total == ref[:, out_idx].numel() * len(in_idx) * kvol
        _close(indexed_conv3d(conv, x[:, in_idx], in_idx, out_idx, gathered=True), ref[:, out_idx])
        _close(indexed_conv3d(conv, x, None, out_idx), conv(x)[:, out_idx])
        for y in (indexed_conv3d(conv, x, in_idx), indexed_conv3d(conv, x, in_idx, out_idx)):
            assert y.is_contiguous(memory_format=CL)
    names = _kernels(lambda: indexed_conv3d(conv, x, in_idx, out_idx))
    gemm = kvol == 1 and torch.backends.mkldnn.is_available()
    assert ("aten::mkldnn_convolution" in names) != gemm
    assert bool({"aten::mm", "aten::addmm"} & names) == gemm


@pytest.mark.parametrize("cl_min", [0, 10**9])  # channels_last gather / NCDHW index_selects
@pytest.mark.parametrize("in_idx, out_idx", [
    ([7, 0, 3, 9], [5, 1, 2]), ([1, 2], None), (None, [6, 0]), (None, None)])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True])
def test_kept_weight_is_the_kept_block(monkeypatch, cl_min, in_idx, out_idx, channels_last):
    """The kept block of the weight, contiguous in the layout of the gather that ran; in-place
    weight updates are seen (cached copies are renewed)."""
    monkeypatch.setattr(compact, "CHANNELS_LAST_GATHER_MIN", cl_min)
    conv = nn.Conv3d(10, 7, (3, 1, 2))
    if channels_last:
        conv = conv.to(memory_format=CL)
    i = None if in_idx is None else torch.tensor(in_idx)
    o = None if out_idx is None else torch.tensor(out_idx)
    for _ in range(2):
        ref = conv.weight.detach()
        ref = ref if o is None else ref[o]
        ref = ref if i is None else ref[:, i]
        with torch.no_grad():
            w = kept_weight(conv, i, o)
        layout = CL if cl_min == 0 and i is not None else torch.contiguous_format
        if i is None and o is None:  # nothing dropped: the weight itself, in its own layout
            assert w is conv.weight
        assert w.is_contiguous(memory_format=layout) or w is conv.weight
        assert torch.equal(w, ref)
        with torch.no_grad():
            conv.weight.mul_(-2.0)


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_indexed_depthwise_against_the_masked_conv(mult, bias, stride):
    """A depthwise conv on its kept channels only: the same output as the masked conv (the
    dropped channels' outputs are the bias), from the full input or the gathered one, and the
    multiply-adds of the kept channels only."""
    torch.manual_seed(stride + 2 * mult)
    conv = nn.Conv3d(6, 6 * mult, 3, stride=(1, stride, stride), padding=1, groups=6, bias=bias)
    x = torch.randn(1, 6, 4, 7, 7)
    in_idx = torch.tensor([1, 2, 5])
    mask = torch.zeros(1, 6).index_fill_(1, in_idx, 1.0)
    with torch.no_grad():
        ref = conv(apply_masks(x, {"channel": mask}))
        with count_executed_macs() as macs:
            y = indexed_depthwise(conv, x, in_idx)
        _close(y, ref)
        assert y.is_contiguous(memory_format=CL)
        _close(indexed_depthwise(conv, x[:, in_idx], in_idx, gathered=True), ref)
    assert macs.total == 3 * mult * 27 * ref[0, 0].numel()  # of 6 * mult output channels


def test_x3d_index_plan_runs_depthwise_convs_on_kept_channels(monkeypatch):
    """A real X3D-XS: the same logits as the masked model; every bottleneck's conv_a computes
    only the channels its depthwise conv_b keeps; no layer falls back to the general plan."""
    from lightning_dance.models import create_model

    torch.manual_seed(0)
    net = create_model("x3d_xs", num_classes=5).eval().to(memory_format=CL)
    with torch.no_grad():  # non-trivial BatchNorm statistics (fresh ones are the identity)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.4,
                            credit_outputs=False).eval()  # fmt: skip
    pruner = _randomized(pruner, 3)
    clip = torch.randn(1, 3, 4, 64, 64)
    fast = CompactPruner(pruner)
    general: list[nn.Conv3d] = []
    real = indexed._compact_conv3d
    monkeypatch.setattr(indexed, "_compact_conv3d",
                        lambda conv, *a: general.append(conv) or real(conv, *a))  # fmt: skip
    with torch.no_grad():
        ref = pruner(clip)
        with count_executed_macs() as macs:
            y = fast(clip)
    assert ref.abs().max() > 0
    _close(y, ref)
    assert general == []
    chains = fast.chains
    assert sum(n.endswith("conv_a") for n in chains) == 26
    assert macs.total == _skipped_macs_reference(pruner, chains)


def test_indexed_norm_and_indices():
    bn = nn.BatchNorm3d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        x = torch.randn(1, 6, 3, 4, 4)
        idx = torch.tensor([4, 1, 5])
        _close(indexed_norm(bn, x[:, idx], idx), bn(x)[:, idx])
    pruner = _randomized(AdaptivePruner(ChainNet(), dims=("channel",), policy="topk",
                                        budget=0.4), 2)  # fmt: skip
    clip = torch.randn(1, 3, 4, 12, 12)
    with torch.no_grad():
        pruner(clip)
        stem = pruner.model.stem[0](clip)
        idx = topk_indices(pruner, pruner.decide(stem))
    for name, stats in pruner.last_stats.layers.items():
        kept = stats.masks["channel"][0].nonzero().flatten()
        got = idx[name]
        if got is None:
            assert len(kept) == pruner._layers[name].in_channels
        else:
            assert got.tolist() == kept.tolist()  # sorted, the masks' kept channels


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 2e-2), (torch.float64, 1e-10)])
def test_both_plans_in_other_dtypes(dtype, rtol):
    """A pruner cast for deployment (bfloat16) or checking (float64): the masked model, both
    plans and the float32 model agree (oneDNN's bfloat16 convs need AVX-512 BW/VL/DQ; without
    them the convs fall back to F.conv3d instead of failing)."""
    net = ChainNet().eval()
    pruner = _randomized(AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.4), 1)
    clip = torch.randn(1, 3, 4, 12, 12)
    with torch.no_grad():
        ref32 = pruner(clip)
        pruner.to(dtype)
        low = clip.to(dtype)
        ref = pruner(low)
        assert ref.dtype == dtype
        for flag in (True, False):
            y = CompactPruner(pruner, index_plan=flag)(low)
            assert y.dtype == dtype
            _close(y.double(), ref.double(), rtol)
        _close(ref.double(), ref32.double(), max(rtol, 1e-5) * 3)


def test_recurring_channel_sets_gather_their_weights_once():
    from lightning_dance.execution.weights import (
        RECURRING_BLOCKS,
        _recurring,
        forget_recurring_blocks,
    )

    def kept_sets(conv):
        return list(_recurring[conv].blocks) if conv in _recurring else []

    torch.manual_seed(0)
    conv = nn.Conv3d(16, 12, (1, 3, 3)).eval()
    in_idx, out_idx = torch.tensor([1, 4, 7, 9]), torch.tensor([0, 5, 6])
    with torch.no_grad():
        first = kept_weight(conv, in_idx, out_idx)  # seen once: gathered, not kept
        torch.testing.assert_close(first, conv.weight[out_idx][:, in_idx])
        assert not kept_sets(conv)
        block = kept_weight(conv, in_idx.clone(), out_idx.clone())  # again: kept from now on
        assert block is not first and len(kept_sets(conv)) == 1
        assert kept_weight(conv, in_idx.clone(), out_idx.clone()) is block  # no gather
        torch.testing.assert_close(block, conv.weight[out_idx][:, in_idx])
        conv.weight.mul_(2.0)  # an update makes it again, from the new weight
        again = kept_weight(conv, in_idx, out_idx)
        torch.testing.assert_close(again, conv.weight[out_idx][:, in_idx])
        # sets that never recur are not kept; sets cycling through more slots than there
        # are keep the first ones admitted (a newcomer needs more sightings), never thrash
        for k in range(2, 12):
            kept_weight(conv, torch.arange(1, k), None)
        assert len(kept_sets(conv)) == 1
        for _ in range(3):
            for k in range(2, 12):
                kept_weight(conv, torch.arange(1, k), None)
        assert len(kept_sets(conv)) == RECURRING_BLOCKS
        hits = [kept_weight(conv, torch.arange(1, k), None) for k in range(2, 12)]
        again = [kept_weight(conv, torch.arange(1, k), None) for k in range(2, 12)]
        assert sum(a is b for a, b in zip(hits, again, strict=True)) >= RECURRING_BLOCKS - 1
        for got, k in zip(again, range(2, 12), strict=True):
            torch.testing.assert_close(got, conv.weight[:, 1:k])
        forget_recurring_blocks(nn.Sequential(conv))
        assert not kept_sets(conv)
    # training: never cached (autograd must see the gather)
    w1 = kept_weight(conv, in_idx, out_idx)
    assert w1.requires_grad and kept_weight(conv, in_idx, out_idx) is not w1


def test_a_stream_of_clips_with_recurring_channels_moves_fewer_bytes():
    """A topk pruner frozen to one channel set per layer (its static projection): measured as a
    stream (the clip after another one), it gathers no weights; measured alone (the default),
    it pays for them as a clip with new sets does. Outputs are the masked model's either way."""
    from lightning_dance.bytes import measure_traffic
    from lightning_dance.models import create_model
    from lightning_dance.priors import channel_frequencies, freeze_channels

    torch.manual_seed(0)
    clips = [torch.randn(1, 3, 4, 32, 32) for _ in range(3)]
    net = create_model("r2plus1d_18", num_classes=6, width=0.25).eval()
    pruner = AdaptivePruner(net, policy="topk", dims=("channel",), budget=0.35).eval()
    freeze_channels(pruner, channel_frequencies(pruner, clips))
    fast = CompactPruner(pruner)
    alone = measure_traffic(fast, clips[0])
    stream = measure_traffic(fast, clips[0], warmup=[clips[1]])
    dense = measure_traffic(net, clips[0])
    gathered = sum(alone.by_kind.get("index_select", (0, 0)))
    assert gathered > 0.3 * alone.total  # alone: weight blocks gathered on the call
    assert sum(stream.by_kind.get("index_select", (0, 0))) < 0.05 * gathered
    assert stream.total < alone.total - 0.9 * gathered
    assert stream.total < dense.total / 1.3  # when written: 9.9 vs 16.2 MB (x1.64)
    with torch.no_grad():
        torch.testing.assert_close(fast(clips[2]), pruner(clips[2]), atol=1e-4, rtol=1e-4)


def test_recurring_blocks_step_aside_where_sets_never_recur(monkeypatch):
    """A conv whose sets never repeat stops paying for the bookkeeping after a window, and looks
    again after the next one (a model whose choices settle is served again)."""
    import lightning_dance.execution.weights as weights

    monkeypatch.setattr(weights, "RECURRING_WINDOW", 16)
    conv = nn.Conv3d(40, 8, 1).eval()
    calls = []

    def make():
        calls.append(1)
        return conv.weight.detach()[:, :2]

    keys = []
    monkeypatch.setattr(torch.Tensor, "numpy", lambda t, _real=torch.Tensor.numpy: keys.append(1)
                        or _real(t))  # fmt: skip
    with torch.no_grad():
        for k in range(16):  # 16 different sets: no hit in the first window
            weights.recurring_block(conv, torch.tensor([k, k + 1]), None, make)
        state = weights._recurring[conv]
        assert state.skip and len(calls) == 16
        before = len(keys)
        for _ in range(15):  # skipped: no key made, no sightings
            weights.recurring_block(conv, torch.tensor([0, 1]), None, make)
        assert len(keys) == before and len(calls) == 31
        for _ in range(40):  # the next window looks again: one set, seen again and again
            weights.recurring_block(conv, torch.tensor([0, 1]), None, make)
        assert not state.skip and state.blocks and len(calls) < 31 + 40
