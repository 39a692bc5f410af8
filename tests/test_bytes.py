"""The byte counter (lightning_dance.bytes) and the memory-level-aware energy model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_dance.aap import AdaptivePruner
from lightning_dance.bytes import ByteCounter, compare_traffic, measure_traffic, tensor_bytes
from lightning_dance.energy import TARGETS, EnergyModel, cache_pj_per_byte
from lightning_dance.execution import CompactPruner
from lightning_dance.models import create_model

F4 = 4  # bytes per float32


def _count(fn):
    with ByteCounter() as bc:
        fn()
    return bc.result


def test_conv3d_reads_input_weight_bias_writes_output():
    x, w, b = torch.randn(1, 2, 3, 4, 4), torch.randn(5, 2, 1, 3, 3), torch.randn(5)
    m = _count(lambda: torch.nn.functional.conv3d(x, w, b, padding=(0, 1, 1)))
    assert m.read == (2 * 3 * 16 + 5 * 2 * 9 + 5) * F4
    assert m.written == 5 * 3 * 16 * F4
    assert m.macs == 5 * 3 * 16 * 2 * 9
    assert set(m.by_kind) == {"conv"}


def test_add_views_and_inplace():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    m = _count(lambda: a + b)
    assert (m.read, m.written) == (2 * 24 * F4, 24 * F4)
    m = _count(lambda: a.view(4, 6).permute(1, 0).t()[1:3].expand(2, 6))
    assert (m.read, m.written, m.ops) == (0, 0, 0)
    assert m.calls["view"] == 1
    m = _count(lambda: a.add_(1.0))  # in place: reads and writes a
    assert (m.read, m.written) == (24 * F4, 24 * F4)
    m = _count(lambda: a.permute(1, 0).contiguous())  # a copy that materializes
    assert (m.read, m.written) == (24 * F4, 24 * F4)
    # a broadcast operand is read once (its distinct elements), not at the output's size
    assert tensor_bytes(torch.zeros(4).expand(6, 4)) == 4 * F4
    m = _count(lambda: a + torch.zeros(4))
    assert m.read == (24 + 4) * F4


def test_gathers_and_scatters_move_only_the_selected_part():
    src, idx = torch.randn(10, 8), torch.tensor([1, 4, 7])
    m = _count(lambda: src.index_select(0, idx))
    assert m.read == 3 * 8 * F4 + 3 * 8  # selected rows + int64 index
    assert m.written == 3 * 8 * F4
    dst, rows = torch.zeros(10, 8), torch.randn(3, 8)
    m = _count(lambda: dst.index_copy_(0, idx, rows))
    assert (m.read, m.written) == (3 * 8 * F4 + 3 * 8, 3 * 8 * F4)
    m = _count(lambda: dst.copy_(src))  # overwrites: dst is not read
    assert (m.read, m.written) == (80 * F4, 80 * F4)


def test_two_layer_net_per_layer_and_total():
    net = nn.Sequential(nn.Conv3d(2, 4, 1, bias=False), nn.ReLU(), nn.Conv3d(4, 3, 1))
    x = torch.randn(1, 2, 2, 3, 3)  # 18 positions
    m = measure_traffic(net, x, fast=False)
    conv0 = (2 * 18 + 4 * 2 + 4 * 18) * F4
    relu = (4 * 18 + 4 * 18) * F4
    conv2 = (4 * 18 + 3 * 4 + 3 + 3 * 18) * F4
    assert m.by_layer == {"0": (2 * 18 * F4 + 8 * F4, 72 * F4), "1": (72 * F4, 72 * F4),
                          "2": (conv2 - 54 * F4, 54 * F4)}  # fmt: skip
    assert m.total == conv0 + relu + conv2
    assert m.layer_total("") == m.total and m.layer_total("1") == relu


def test_rejects_a_masked_model_and_names_the_fix():
    pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), budget=0.5)
    with pytest.raises(TypeError, match="CompactPruner"):
        measure_traffic(pruner, torch.randn(1, 3, 8, 32, 32))


def _topk(name: str, clip: tuple[int, ...], fold_norms: bool = True, **kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, **kw).eval()
    # the full count (credit_outputs=False): at a counted 0.35 the compact path runs about 0.2
    # of the MACs (with the default credited count it runs 0.35 and, at 4x32x32, moves more
    # bytes than dense: docs/benchmarks.md)
    pruner = AdaptivePruner(model, dims=("channel",), policy="topk", budget=0.35,
                            credit_outputs=False).eval()  # fmt: skip
    return compare_traffic(CompactPruner(pruner, fold_norms=fold_norms), torch.randn(1, 3, *clip))


@pytest.fixture(scope="module")
def topk_comparison():
    return _topk("r2plus1d_18", (4, 32, 32), width=0.25)


def test_compact_moves_fewer_bytes_than_dense(topk_comparison):
    """topk channels at a full count of 0.35 on R(2+1)D (width 0.25, 4x32x32): the compact path
    moves fewer bytes than the dense fast path (16.2 MB -> 13.4 MB when written), although it slices the
    kept weight rows and columns on every call (index_select)."""
    c = topk_comparison
    assert c.compact.macs < 0.6 * c.dense.macs
    assert c.compact.total < 0.9 * c.dense.total
    assert c.compact.layer_total("controller") > 0  # the controller's own traffic is counted
    assert "index_select" in c.compact.by_kind and "index_select" not in c.dense.by_kind
    assert c.to_dict()["saving"] == pytest.approx(c.dense.total / c.compact.total)


def test_controller_statistics_outweigh_the_savings_on_tiny_c3d():
    """A finding, kept as a test: on tiny_c3d the controller's input statistics read the stem
    output many times; without them the compact path moves less than dense, with them more
    (BatchNorms unfolded on both sides, as measured in docs/accounting.md)."""
    c = _topk("tiny_c3d", (8, 64, 64), fold_norms=False)
    controller = c.compact.layer_total("controller")
    assert c.compact.total - controller < c.dense.total < c.compact.total
    assert controller > 5 * c.dense.by_layer["stem.0"][1]  # > 5x the stem output it reads


def test_measurement_is_deterministic_and_steady_state():
    torch.manual_seed(0)
    pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), dims=("channel",),
                            policy="topk", budget=0.5).eval()  # fmt: skip
    fast, clip = CompactPruner(pruner), torch.randn(1, 3, 8, 32, 32)
    first, second = measure_traffic(fast, clip), measure_traffic(fast, clip)
    assert first.total == second.total and first.by_layer == second.by_layer


def test_energy_prices_a_tensor_under_the_llc_at_cache_energy():
    e = EnergyModel(mac_pj=1.0, byte_pj=160.0, cache_bytes=1 << 20)
    a = torch.randn(64, 64)  # 16 KB: fits in the 1 MB cache
    m = _count(lambda: a + a)
    # 3 accesses of 16 KB tensors at 12.5 pJ/B (Horowitz's 1 MB cache: 100 pJ per 64 bit)
    assert e.measured_energy_pj(0, m) == pytest.approx(3 * 16384 * 12.5)
    big = torch.randn(512, 1024)  # 2 MB: does not fit, DRAM
    m = _count(lambda: big.neg())
    assert e.measured_energy_pj(10, m) == pytest.approx(10 + 2 * (2 << 20) * 160.0)
    assert EnergyModel().measured_energy_pj(0, m) == pytest.approx(2 * (2 << 20) * 160.0)


def test_targets_and_cache_energy_scaling():
    assert cache_pj_per_byte(4 << 20) == pytest.approx(2 * 12.5)  # sqrt(4 MB / 1 MB)
    nano = EnergyModel.for_target("jetson_nano")
    assert nano.cache_bytes == TARGETS["jetson_nano"].llc_bytes == 2 << 20
    assert nano.access_pj_per_byte(3 << 20) == nano.byte_pj == 160.0
    here = EnergyModel.for_target("this_machine")
    assert here.cache_bytes > 0
    with pytest.raises(ValueError, match="jetson_nano"):
        EnergyModel.for_target("pixel")
    with pytest.raises(ValueError, match="cache_bytes"):
        EnergyModel(cache_bytes=0)


def test_energy_saving_under_targets(topk_comparison):
    c = topk_comparison
    savings = {t: c.energy_saving(EnergyModel.for_target(t)) for t in TARGETS}
    assert all(s > 1 for s in savings.values())
    flat = c.energy_saving(EnergyModel())  # everything at DRAM
    assert flat > 1


def test_mac_report_records_measured_traffic():
    from lightning_dance.report import MacReport

    torch.manual_seed(0)
    pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), dims=("channel",),
                            policy="topk", budget=0.5).eval()  # fmt: skip
    report = MacReport.for_pruner(pruner, (3, 8, 32, 32))
    assert report.measured_dict() is None
    clips = torch.randn(2, 3, 8, 32, 32)
    last = report.measure(pruner, clips)
    with torch.no_grad():
        pruner(clips)
    report.update_stats(pruner.last_stats)
    m = report.to_dict()["measured"]
    assert m["clips"] == 2 and m["dense_bytes"] == last.dense.total
    assert set(m["energy_saving"]) == {"dram", *TARGETS, "this_machine"}
    assert "MEASURED traffic" in report.render(rich=False)
    assert "dance/measured_energy_saving/jetson_nano" in report.metrics()
    with pytest.raises(ValueError, match="clip shape"):
        report.measure(pruner, torch.randn(1, 3, 4, 32, 32))
    report.reset()
    assert report.measured_dict() is None
