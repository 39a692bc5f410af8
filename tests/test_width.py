"""The ``width`` policy (per-clip counts of nested channels) and the prefix fast path: the gate
against hand-computed counts, the compact path against the masked model, the executed MACs
against the count, and the bytes it moves against dense and against ``topk`` at one budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_dance.aap import AdaptivePruner
from lightning_dance.bytes import compare_traffic
from lightning_dance.execution import CompactPruner, count_executed_macs
from lightning_dance.execution.weights import PREFIX_BLOCKS, prefix_block, prefix_length
from lightning_dance.models import create_model
from lightning_dance.policies import WidthPolicy, get_policy
from tests.conftest import SmallNet
from tests.test_execution import ChainNet, _close, _randomized, _skipped_macs_reference


def _logits_for(counts: list[float], size: int) -> torch.Tensor:
    """Scores whose soft count is about ``counts`` (the first ones high, the rest low)."""
    rows = []
    for c in counts:
        row = torch.full((size,), -20.0)
        whole = int(c)
        row[:whole] = 20.0
        if c > whole:  # sigmoid(x) = the fractional part
            frac = torch.tensor(c - whole)
            row[whole] = torch.log(frac / (1 - frac))
        rows.append(row)
    return torch.stack(rows)


def test_gate_keeps_a_prefix_of_the_snapped_soft_count():
    p = WidthPolicy(multiple=8)
    logits = _logits_for([11.0, 12.5, 3.0, 30.0, 0.0], 32)
    mask = p.gate(logits, training=False)
    # 11 -> 8, 12.5 -> 16 (nearer multiple), 3 -> 8 (at least one multiple), 30 -> 32 (the
    # whole layer is nearer than 32... it is a multiple too), 0 -> 8
    assert mask.sum(1).tolist() == [8, 16, 8, 32, 8]
    for row in mask:  # always the first entries
        k = int(row.sum())
        assert row[:k].eq(1).all() and row[k:].eq(0).all()
    # the layer's size is a snap target when nearer than a multiple
    assert WidthPolicy(multiple=8).gate(_logits_for([19.0], 20), training=False).sum() == 20
    # sizes up to the multiple are not snapped; min_keep holds
    small = WidthPolicy(multiple=8).gate(_logits_for([2.2, 0.0], 6), training=False, min_keep=1)
    assert small.sum(1).tolist() == [2, 1]
    assert WidthPolicy(multiple=1).gate(_logits_for([4.6], 10), training=False).sum() == 5


def test_training_gate_is_exactly_binary_and_passes_gradients():
    torch.manual_seed(0)
    logits = torch.randn(4, 24, requires_grad=True)
    mask = get_policy("width").gate(logits, training=True, noise=1.0)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    for row in mask.detach():
        k = int(row.sum())
        assert row[:k].eq(1).all()
    (mask * torch.arange(24.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_width_policy_arguments_and_dims():
    with pytest.raises(ValueError, match="multiple must be an int >= 1"):
        WidthPolicy(multiple=0)
    with pytest.raises(ValueError, match=r"decides \['channel'\] only.*dims=\('channel',\)"):
        AdaptivePruner(SmallNet(), policy="width", dims=("channel", "frame"))
    assert WidthPolicy(4) == WidthPolicy(4) and WidthPolicy(4) != WidthPolicy(8)
    # 16 is half a multiple from both boundaries (12, 20); 12 is on one
    assert WidthPolicy().margin(_logits_for([16.0], 32)) == pytest.approx(4 / 32, abs=1e-3)
    assert WidthPolicy().margin(_logits_for([12.0], 32)) == pytest.approx(0, abs=1e-3)


def test_calibration_meets_the_budget():
    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=4, width=0.25).eval()
    pruner = AdaptivePruner(net, policy="width", dims=("channel",), budget=0.35).eval()
    clips = torch.randn(4, 3, 4, 32, 32)
    with torch.no_grad():
        ratio = pruner.calibrate([clips])
        pruner(clips)
    assert ratio == pytest.approx(0.35, abs=0.03)
    assert float(pruner.last_stats.mac_ratio().mean()) == pytest.approx(ratio, abs=1e-6)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    budget=st.sampled_from([0.1, 0.4, 0.8]),
    n=st.sampled_from([1, 2]),
    seed=st.integers(0, 100),
    model=st.sampled_from([ChainNet, SmallNet]),
    multiple=st.sampled_from([1, 4]),
)
def test_compact_path_equals_the_masked_model(budget, n, seed, model, multiple):
    torch.manual_seed(seed)
    net = model().eval()
    # the full count (credit_outputs=False): the reference's input
    pruner = AdaptivePruner(net, dims=("channel",), policy=WidthPolicy(multiple), budget=budget,
                            credit_outputs=False)  # fmt: skip
    pruner = _randomized(pruner, seed)
    clip = torch.randn(n, 3, 5, 12, 12, generator=torch.Generator().manual_seed(seed))
    fast = CompactPruner(pruner)
    with torch.no_grad():
        ref = pruner(clip)
        with count_executed_macs() as macs:
            y = fast(clip)
        general = CompactPruner(pruner, index_plan=False)(clip)
    _close(y, ref)
    _close(general, ref)
    for s in pruner.last_stats.layers.values():  # every kept set is a prefix
        for row in s.masks["channel"]:
            k = int(row.sum())
            assert row[:k].eq(1).all() and row[k:].eq(0).all()
    if n == 1:  # the exact plan: the count minus the outputs the chains skip
        assert macs.total == _skipped_macs_reference(pruner, fast.chains)


def test_prefix_blocks_are_views_or_kept_copies_and_bounded():
    conv = nn.Conv3d(16, 12, (3, 1, 1)).eval()
    with torch.no_grad():
        rows = prefix_block(conv, 5, 16)
        assert rows.data_ptr() == conv.weight.data_ptr() and rows.shape == (5, 16, 3, 1, 1)
        block = prefix_block(conv, 5, 8)
        torch.testing.assert_close(block, conv.weight[:5, :8])
        assert block.is_contiguous()
        assert prefix_block(conv, 5, 8) is block  # kept: no copy on the next call
        conv.weight.add_(1.0)  # an update makes it again
        again = prefix_block(conv, 5, 8)
        torch.testing.assert_close(again, conv.weight[:5, :8])
        for cols in range(1, 16):  # more sizes than are kept: the least recently used go
            prefix_block(conv, 12, cols)
    from lightning_dance.execution.weights import _derived

    kept = [k for k in _derived[conv] if k.startswith("prefix:")]
    assert len(kept) == PREFIX_BLOCKS
    assert prefix_length(torch.arange(4)) == 4 and prefix_length(torch.tensor([1, 2])) is None


def test_width_moves_fewer_bytes_than_topk_and_half_of_dense():
    """R(2+1)D width 0.25, 4x32x32, channels at 0.35 (input-credited MACs): the width policy's
    prefixes are slices and kept blocks, topk gathers its kept weights on every call. When
    written: dense 16.3 MB, topk x1.2 less, width x2.4 less."""
    torch.manual_seed(0)
    clip = torch.randn(1, 3, 4, 32, 32)
    savings = {}
    for policy in ("topk", "width"):
        net = create_model("r2plus1d_18", num_classes=4, width=0.25).eval()
        pruner = AdaptivePruner(net, dims=("channel",), policy=policy, budget=0.35,
                                credit_outputs=False).eval()  # fmt: skip
        with torch.no_grad():
            pruner.calibrate([torch.randn(4, 3, 4, 32, 32)])
        c = compare_traffic(pruner, clip)
        assert c.compact.macs < 0.5 * c.dense.macs
        savings[policy] = c.dense.total / c.compact.total
    assert savings["width"] > 2.0
    assert savings["width"] > 1.5 * savings["topk"]


def test_building_the_pruner_nests_chain_channels_without_changing_the_model():
    """R(2+1)D: every spatial -> temporal chain ends up ordered by importance, most important
    first, and the model computes what it computed before (eval)."""
    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=4, width=0.25).eval()
    with torch.no_grad():  # non-trivial statistics, so that the order is not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 2.0)
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        before = net(clip)
        pruner = AdaptivePruner(net, dims=("channel",), policy="width", budget=0.5).eval()
        torch.testing.assert_close(net(clip), before, atol=1e-4, rtol=1e-4)
    chains = pruner.output_chains()
    assert len(chains) >= 8  # two per residual block
    modules = dict(net.named_modules())
    for chain in chains.values():
        w = modules[chain.consumer].weight.transpose(0, 1).flatten(1).norm(dim=1)
        for name in chain.norms:
            bn = modules[name]
            w = w * (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).abs()
        assert (w[:-1] >= w[1:] - 1e-6).all()  # non-increasing importance
