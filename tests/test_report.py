"""MacReport and EnergyModel: totals over clips, the three ways to feed a report, output.

The per-layer counts a report sums are checked against a brute force in ``test_macs.py``; here
the report's bookkeeping is checked against those counts.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lightning_dance.energy import EnergyModel
from lightning_dance.executed import conv3d_executed_macs
from lightning_dance.geometry import conv3d_input_shapes
from lightning_dance.macs import count_macs, quiet_fvcore
from lightning_dance.report import MacReport
from lightning_dance.traffic import conv3d_memory_traffic


# ---------------------------------------------------------------------------------- energy
def test_energy_model_figures():
    fp32 = EnergyModel.fp32()
    assert fp32.mac_pj == pytest.approx(3.7 + 0.9) and fp32.byte_pj == pytest.approx(640 / 4)
    int8 = EnergyModel.int8("sram_8kb")
    assert int8.mac_pj == pytest.approx(0.23) and int8.byte_pj == pytest.approx(5 / 4)
    assert int8.bytes_per_element == 1
    assert fp32.energy_pj(10, 8) == pytest.approx(10 * 4.6 + 8 * 160)
    assert fp32.ratio(100, 40, 25, 10) == pytest.approx(4.0)
    t = fp32.energy_pj(torch.tensor([1, 2]), torch.tensor([0, 4]))
    assert torch.allclose(t, torch.tensor([4.6, 9.2 + 640], dtype=torch.float64))
    with pytest.raises(ValueError, match="memory must be one of"):
        EnergyModel.preset("fp32", "hbm")
    mixed = EnergyModel.fp32(copies="sram_8kb")  # copies priced at 8 KB SRAM
    assert mixed.copy_byte_pj == pytest.approx(5 / 4) and "copies sram_8kb" in mixed.name
    assert mixed.energy_pj(1, 8, 4) == pytest.approx(4.6 + 8 * 160 + 4 * 1.25)
    assert fp32.energy_pj(1, 8, 4) == pytest.approx(4.6 + 12 * 160)
    assert mixed.ratio(10, 8, 5, 4, 4) == pytest.approx((46 + 1280) / (23 + 640 + 5))
    with pytest.raises(ValueError, match="copies must be one of"):
        EnergyModel.preset("fp32", "dram", "l2")
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        EnergyModel.preset("bf16")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
        self.conv1 = nn.Conv3d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1, groups=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv1(x)
        return self.head(self.conv2(x).mean((2, 3, 4)))


def _random_masks(n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv1": {
            "frame": (torch.rand(n, 3, generator=gen) > 0.3).float(),
            "channel": (torch.rand(n, 4, generator=gen) > 0.4).float(),
        },
        "conv2": {"feature": (torch.rand(n, 6, 6, generator=gen) > 0.6).float()},
    }


# ---------------------------------------------------------------------------------- report
def test_report_totals_per_clip():
    model, clip_shape = TinyNet(), (3, 3, 6, 6)
    ctrl = nn.Linear(4, 3)
    report = MacReport(model, clip_shape, controller=ctrl, controller_input=torch.randn(2, 4))
    masks_a, masks_b = _random_masks(3, 0), _random_masks(4, 1)
    report.update(masks_a)
    report.update(masks_b)
    dense = count_macs(model, clip_shape).total
    assert report.controller_macs == 12
    shapes = {"conv1": (4, 3, 6, 6), "conv2": (4, 3, 6, 6)}
    totals = []
    for masks in (masks_a, masks_b):
        n = next(iter(masks["conv1"].values())).shape[0]
        for i in range(n):
            total = dense + 12
            for name, dims in masks.items():
                conv = getattr(model, name)
                ref = conv3d_executed_macs(conv, shapes[name], **{d: m[i] for d, m in dims.items()})
                total += ref - conv3d_executed_macs(conv, shapes[name])
            totals.append(total)
    d = report.compute()
    assert d["samples"] == 7 and d["dense_macs"] == dense
    assert d["executed_macs_mean"] == pytest.approx(np.mean(totals))
    assert d["executed_macs_p5"] == pytest.approx(np.percentile(totals, 5))
    assert d["executed_macs_p95"] == pytest.approx(np.percentile(totals, 95))
    assert d["macs_ratio"] == pytest.approx(np.mean(totals) / dense)
    kept = torch.cat([masks_a["conv1"]["channel"], masks_b["conv1"]["channel"]]).mean()
    layer1 = next(x for x in d["layers"] if x["name"] == "conv1")
    assert layer1["kept"]["channel"] == pytest.approx(float(kept))
    assert layer1["kept"]["feature"] == 1.0
    assert d["traffic_saving"] > 0 and d["energy_saving"] > 0
    # one update with everything == two updates
    joint = MacReport.from_masks(
        model, clip_shape,
        {k: {d: torch.cat([masks_a[k][d], masks_b[k][d]]) for d in masks_a[k]} for k in masks_a},
        controller=12,
    )  # fmt: skip
    assert joint.compute()["executed_macs_mean"] == pytest.approx(d["executed_macs_mean"])


def test_report_dense_batch_traffic_and_energy_match_dense():
    model = TinyNet()
    report = MacReport(model, (3, 3, 6, 6))
    report.update({}, batch_size=2)
    d = report.compute()
    assert d["executed_macs_mean"] == d["dense_macs"] and d["macs_saving"] == 1.0
    assert d["traffic_saving"] == 1.0 and d["energy_saving"] == pytest.approx(1.0)
    shapes = conv3d_input_shapes(model, (3, 3, 6, 6))
    dense_bytes = sum(
        4 * (math.prod(s) + m.weight.numel() + m.bias.numel())
        + 4 * m(torch.zeros(1, *s)).numel()
        for n, m in model.named_modules() if isinstance(m, nn.Conv3d) for s in [shapes[n]]
    )  # fmt: skip
    assert d["dense_bytes"] == dense_bytes


def test_report_output_and_logging(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    report = MacReport.from_masks(TinyNet(), (3, 3, 6, 6), _random_masks(4, 2))
    plain = report.render(rich=False)
    assert plain.splitlines()[0].split()[:3] == ["layer", "conv", "input"]
    text = str(report)
    for word in ("conv1", "conv2", "energy ESTIMATE", "p95", "kept c"):
        assert word in text
    conv2_row = next(line for line in text.splitlines() if "conv2" in line)
    assert conv2_row.count(" - ") == 2  # frames and channels are not masked in conv2
    path = report.to_json(tmp_path / "r.json")
    loaded = json.loads(path.read_text())
    assert loaded["samples"] == 4 and [x["name"] for x in loaded["layers"]] == ["conv1", "conv2"]
    logger = CSVLogger(tmp_path, name="macs")
    metrics = report.log_to(logger, prefix="dance/", step=0)
    logger.save()
    assert metrics["dance/macs_ratio"] == pytest.approx(loaded["macs_ratio"])
    csv = (tmp_path / "macs" / "version_0" / "metrics.csv").read_text()
    assert "dance/macs_ratio" in csv and "dance/energy_saving" in csv
    with pytest.raises(TypeError, match="log_metrics"):
        report.log_to(object())


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_report_logs_from_a_lightning_module():
    import lightning.pytorch as pl

    report = MacReport.from_masks(TinyNet(), (3, 3, 6, 6), _random_masks(2, 3))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()

        def training_step(self, batch, _):
            return self.net(batch[0]).sum()

        def on_train_epoch_end(self):
            report.log_to(self, per_layer=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 3, 3, 6, 6)))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(Module(), data)
    assert "dance/macs_ratio" in trainer.callback_metrics
    assert "dance/conv1/kept_frame" in trainer.callback_metrics
    assert "dance/conv2/kept_frame" not in trainer.callback_metrics  # not masked there


def test_report_bad_inputs():
    report = MacReport(TinyNet(), (3, 3, 6, 6))
    with pytest.raises(ValueError, match="not instrumented.*'stem'"):
        report.update({"stem": {"channel": torch.ones(1, 3)}})
    with pytest.raises(ValueError, match="unknown mask dims"):
        report.update({"conv1": {"time": torch.ones(1, 3)}})
    with pytest.raises(ValueError, match="batched"):
        report.update({"conv1": {"frame": torch.ones(3)}})
    with pytest.raises(ValueError, match="disagree"):
        report.update(
            {"conv1": {"frame": torch.ones(2, 3)}, "conv2": {"channel": torch.ones(3, 4)}}
        )
    with pytest.raises(ValueError, match=r"frame mask .* \[N, 3\]"):
        report.update({"conv1": {"frame": torch.ones(2, 5)}})
    with pytest.raises(RuntimeError, match="update"):
        report.compute()
    with pytest.raises(ValueError, match="controller_input"):
        MacReport(TinyNet(), (3, 3, 6, 6), controller=nn.Linear(2, 2))


# ------------------------------------------------------------- stats and per-sample counts
def _stats_from_masks(model, clip_shape, masks, *, with_masks: bool):
    """A PruningStats as AdaptivePruner records it, from known masks (optionally carrying the
    hard masks, as ``LayerStats.masks``)."""
    from lightning_dance.aap import LayerStats, PruningStats

    shapes = conv3d_input_shapes(model, clip_shape)
    layers = {}
    for name, dims in masks.items():
        conv = getattr(model, name)
        executed = torch.stack([
            torch.tensor(conv3d_executed_macs(conv, shapes[name], **{d: m[i] for d, m in dims.items()}))
            for i in range(next(iter(dims.values())).shape[0])
        ])  # fmt: skip
        kept = {d: m.flatten(1).float().mean(1) for d, m in dims.items()}
        stats = LayerStats(shapes[name], conv3d_executed_macs(conv, shapes[name]), executed,
                           executed.double(), kept)  # fmt: skip
        if with_masks:
            stats.masks = dims
        layers[name] = stats
    return PruningStats(layers, count_macs(model, clip_shape).total, controller_macs=7)


def test_update_stats_equals_update_with_masks():
    model, clip = TinyNet(), (3, 3, 6, 6)
    masks = _random_masks(5, 4)
    ref = MacReport.from_masks(model, clip, masks, controller=7).to_dict()
    exact = MacReport(model, clip)
    exact.update_stats(_stats_from_masks(model, clip, masks, with_masks=True))
    assert exact.controller_macs == 7  # taken from the stats
    assert exact.to_dict() == ref
    assert ref["layers"][0]["mac_factor"]["channel"] == pytest.approx(
        float(masks["conv1"]["channel"].mean())
    )
    # without the hard masks: same MACs and kept fractions, traffic bounded as documented
    approx = MacReport(model, clip, controller=7)
    approx.update_stats(_stats_from_masks(model, clip, masks, with_masks=False))
    d = approx.to_dict()
    for key in ("executed_macs_mean", "executed_macs_p5", "executed_macs_p95", "macs_ratio"):
        assert d[key] == ref[key]
    for got, want in zip(d["layers"], ref["layers"], strict=True):
        assert got["kept"] == pytest.approx(want["kept"]) and got["mac_factor"] is None
        assert got["executed_bytes_mean"] >= want["executed_bytes_mean"]
    conv2 = next(x for x in d["layers"] if x["name"] == "conv2")  # no frame mask: exact
    assert conv2["executed_bytes_mean"] == ref["layers"][1]["executed_bytes_mean"]
    # update_executed: the same from plain per-sample counts and kept fractions
    stats = _stats_from_masks(model, clip, masks, with_masks=False)
    plain = MacReport(model, clip, controller=7)
    plain.update_executed({n: s.executed_macs for n, s in stats.layers.items()},
                          {n: s.kept for n, s in stats.layers.items()})  # fmt: skip
    assert plain.to_dict() == d


def test_report_for_an_adaptive_pruner():
    from lightning_dance.aap import AdaptivePruner

    with quiet_fvcore():
        from lightning_dance.models import create_model

    torch.manual_seed(0)
    pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4, width=0.5), init_keep=0.5)
    pruner.eval()
    clip = (3, 8, 32, 32)
    report = MacReport.for_pruner(pruner, clip)
    assert list(report.layers) == pruner.layer_names
    executed = []
    with torch.no_grad():
        for seed in (0, 1):
            pruner(torch.randn(3, *clip, generator=torch.Generator().manual_seed(seed)))
            stats = pruner.last_stats
            report.update_stats(stats)
            executed.append(stats.executed_macs())
    assert report.controller_macs == stats.controller_macs > 0
    assert torch.equal(report.per_sample()["macs"], torch.cat(executed))
    d = report.to_dict()
    assert d["samples"] == 6 and d["dense_macs"] == stats.dense_total
    assert d["macs_ratio"] == pytest.approx(float(torch.cat(executed).double().mean())
                                            / stats.dense_total)  # fmt: skip
    assert all(set(x["masked_dims"]) == {"frame", "channel", "feature"} for x in d["layers"])
    with pytest.raises(ValueError, match="another model or clip shape"):
        MacReport.for_pruner(pruner, (3, 8, 16, 16)).update_stats(stats)


def test_report_update_errors_for_counts():
    report = MacReport(TinyNet(), (3, 3, 6, 6), controller=3)
    with pytest.raises(ValueError, match="not instrumented"):
        report.update_executed({"stem": torch.ones(2)})
    with pytest.raises(ValueError, match="without executed MACs"):
        report.update_executed({"conv1": torch.ones(2)}, {"conv2": {"frame": torch.ones(2)}})
    with pytest.raises(ValueError, match="unknown dims"):
        report.update_executed({"conv1": torch.ones(2)}, {"conv1": {"time": torch.ones(2)}})
    with pytest.raises(ValueError, match=r"\[N\] = \[2\]"):
        report.update_executed({"conv1": torch.ones(2, 1)}, batch_size=2)
    stats = _stats_from_masks(TinyNet(), (3, 3, 6, 6), _random_masks(2, 0), with_masks=False)
    with pytest.raises(ValueError, match="controller MACs"):
        report.update_stats(stats)  # 7 in the stats, 3 here
    assert report.samples == 0 and all(not x.executed for x in report.layers.values())


def test_report_copies_are_tracked_and_priced_separately():
    model, clip, masks = TinyNet(), (3, 3, 6, 6), _random_masks(3, 5)
    dram = MacReport.from_masks(model, clip, masks)
    sram = MacReport.from_masks(model, clip, masks, energy=EnergyModel.fp32(copies="sram_8kb"))
    shapes = conv3d_input_shapes(model, clip)
    copies = sum(
        conv3d_memory_traffic(getattr(model, n), shapes[n], **dims).copy_bytes
        for n, dims in masks.items()
    )
    per = dram.per_sample()
    assert torch.equal(per["copy_bytes"], copies) and (copies > 0).all()
    d_dram, d_sram = dram.to_dict(), sram.to_dict()
    assert d_dram["copy_bytes_mean"] == pytest.approx(float(copies.double().mean()))
    assert d_sram["executed_bytes_mean"] == d_dram["executed_bytes_mean"]
    assert d_sram["energy_saving"] > d_dram["energy_saving"]
    assert d_sram["dense_energy_pj"] == d_dram["dense_energy_pj"]  # dense has no copies
