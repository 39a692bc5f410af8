"""Per-layer dims (``AdaptivePruner(layer_dims=...)``): a layer prunes only the dims it is
given, every runtime and count agrees, calibration concentrates the cuts there, and
``profitable_dims`` picks the dims from measured costs.

References: the masked model (every runtime must equal it), the executed-MAC recorder of the
compact path, hand-built tunings.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from lightning_dance.aap import AdaptivePruner
from lightning_dance.execution import CompactPruner, LayerTuning, profitable_dims
from lightning_dance.execution import count_executed_macs as count_ran
from lightning_dance.models import create_model
from lightning_dance.wrapper import DANCEWrapper

ONLY = {
    "layer1.0.conv1.0.0": ("channel",),
    "layer1.0.conv1.0.3": (),
    "layer1.0.conv2.0.0": ("frame", "feature"),
    "layer2.0.conv1.0.0": ("frame", "channel"),
}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("r2plus1d_18", num_classes=4, width=0.25).eval()


def _pruner(**kw) -> AdaptivePruner:
    kw.setdefault("layer_dims", ONLY)
    p = AdaptivePruner(_net(), budget=0.4, **kw).eval()
    with torch.no_grad():  # spread the untrained controller's scores around the threshold
        for prm in p.controller.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    return p


@pytest.mark.parametrize("site", ["inputs", "outputs"])
@pytest.mark.parametrize("n", [1, 2])
def test_layers_prune_only_their_dims_in_every_runtime(site, n):
    p = _pruner(feature_site=site)
    clip = torch.randn(n, 3, 4, 32, 32)
    with torch.no_grad():
        ref = p(clip)
        stats = p.last_stats
        assert ref.abs().max() > 1e-3  # the pruned network still carries a signal
        for name, layer in stats.layers.items():
            assert set(layer.masks) == set(ONLY.get(name, p.dims)), name
            if not layer.masks:
                assert torch.equal(layer.executed_macs, torch.full_like(layer.executed_macs,
                                                                        layer.dense_macs))  # fmt: skip
        assert p.dims_of("layer1.0.conv1.0.3") == () and p.dims_of("layer3.0.conv1.0.0") == p.dims
        for index_plan in (True, False):  # output skipping: credited in the count
            with count_ran() as ran:
                out = CompactPruner(p, index_plan=index_plan)(clip)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
            if n == 1:  # a batch computes the union of its clips' channels
                fixed = stats.fixed_macs + stats.controller_macs
                assert ran.total + fixed == int(stats.executed_macs().sum())
        # output skipping: only along chains whose consumer prunes channels
        assert "layer1.0.conv1.0.0" not in p.output_chains()  # its consumer keeps its channels
        assert "layer2.0.conv1.0.0" in p.output_chains()
        assert "layer1.0.conv2.0.0" in p.output_chains()  # a producer pruning no channels
        out = CompactPruner(p, skip_outputs=False)(clip)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


def test_a_chain_producer_that_prunes_nothing_still_skips_what_its_consumer_drops():
    """Only the temporal conv prunes (its input channels); the spatial conv before it is
    instrumented with no dims, computes only the channels kept, and is charged so."""
    only = {"layer1.0.conv1.0.0": (), "layer1.0.conv1.0.3": ("channel",)}
    p = _pruner(layers=list(only), layer_dims=only, credit_outputs=True)
    assert list(p.output_chains()) == ["layer1.0.conv1.0.0"]
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        ref = p(clip)
        stats = p.last_stats
        kept = int(stats.layers["layer1.0.conv1.0.3"].masks["channel"].sum())
        producer = stats.layers["layer1.0.conv1.0.0"]
        c_out = p.model.get_submodule("layer1.0.conv1.0.0").out_channels
        assert 0 < kept < c_out  # the untrained controller drops some
        assert int(producer.executed_macs) == producer.dense_macs // c_out * kept
        for index_plan in (True, False):
            with count_ran() as ran:
                out = CompactPruner(p, index_plan=index_plan)(clip)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
            assert ran.total + stats.fixed_macs + stats.controller_macs == int(
                stats.executed_macs().sum()
            )


def test_calibration_puts_the_cuts_where_they_are_allowed():
    """Only the allowed (layer, dim)s cut; calibration still meets the budget with them."""
    net = _net()
    layers = ["layer1.0.conv1.0.0", "layer1.0.conv2.0.0", "layer1.1.conv1.0.0"]
    only = {n: ("channel", "frame") for n in layers}
    p = AdaptivePruner(net, budget=0.8, layers=layers, layer_dims=only).eval()
    clips = [torch.randn(1, 3, 4, 32, 32) for _ in range(2)]
    with torch.no_grad():
        p(clips[0])
        p.calibrate(clips, iters=20, tol=0.005)
        p(clips[0])
    stats = p.last_stats
    ratio = float(stats.executed_macs().sum()) / stats.dense_total
    assert abs(ratio - 0.8) < 0.03
    for layer in stats.layers.values():
        assert set(layer.masks) == {"frame", "channel"}


def test_bad_layer_dims_are_refused():
    net = _net()
    with pytest.raises(KeyError, match="not instrumented"):
        AdaptivePruner(net, layer_dims={"nope": ("channel",)})
    with pytest.raises(ValueError, match="does not prune"):
        AdaptivePruner(net, dims=("channel",), layer_dims={"layer1.0.conv1.0.0": ("frame",)})
    with pytest.raises(ValueError, match="unknown|does not prune"):
        AdaptivePruner(net, layer_dims={"layer1.0.conv1.0.0": ("time",)})
    with pytest.raises(TypeError, match="string"):
        AdaptivePruner(net, layer_dims={"layer1.0.conv1.0.0": "channel"})
    with pytest.raises(TypeError, match="map"):
        AdaptivePruner(net, layer_dims=["layer1.0.conv1.0.0"])
    with pytest.raises(ValueError, match="topk"):
        AdaptivePruner(net, policy="topk", layer_dims={"layer1.0.conv1.0.0": ("channel",)})


def test_layer_dims_survive_pickles_and_the_wrapper_checkpoint(tmp_path):
    p = _pruner()
    again = pickle.loads(pickle.dumps(p))
    assert again.layer_dims == p.layer_dims
    old = pickle.loads(pickle.dumps(p))
    del old.__dict__["layer_dims"]  # a pruner pickled before per-layer dims
    old = pickle.loads(pickle.dumps(old))
    assert old.layer_dims == {} and old.dims_of("layer1.0.conv1.0.3") == old.dims
    wrapper = DANCEWrapper("r2plus1d_18", num_classes=4, model_kwargs={"width": 0.25},
                           layer_dims={k: list(v) for k, v in ONLY.items()})  # fmt: skip
    assert wrapper.pruner.layer_dims == ONLY
    path = tmp_path / "w.pt"
    torch.save({"hparams": dict(wrapper.hparams)}, path)
    hp = torch.load(path, weights_only=False)["hparams"]
    assert DANCEWrapper(**hp).pruner.layer_dims == ONLY


def test_profitable_dims_reads_each_dims_measured_cost():
    tunings = {
        "big": LayerTuning(
            10.0,
            channel_ms={4: 3.0, 8: 10.0},
            frame_ms={2: 4.0, 4: 6.0, 8: 11.0},
            feature_ms={0.5: 12.0, 1.0: 10.0},
        ),  # fmt: skip
        "small": LayerTuning(1.0, channel_ms={4: 1.5, 8: 1.0}, frame_ms={4: 2.0, 8: 1.0}),
        "none": LayerTuning(1.0),
    }
    got = profitable_dims(tunings, keep=0.5)
    assert got == {"big": ("frame", "channel"), "small": (), "none": ()}
    assert profitable_dims(tunings, keep=0.5, margin=0.5) == {"big": ("channel",), "small": (),
                                                             "none": ()}  # fmt: skip
    with pytest.raises(ValueError, match="keep"):
        profitable_dims(tunings, keep=0.0)


def test_profitable_dims_credits_a_chain_consumer_with_its_producers_skipped_outputs():
    """``small``'s own channel cut never pays (0.15 ms slower); with half of ``big``'s outputs
    spared (estimated 0.5 * 3 ms at keep 0.5) it does. Only a chain whose producer is pruned
    anyway counts, and nothing the layer's own timing picked is taken away."""
    from lightning_dance.execution import ChannelChain

    tunings = {
        "big": LayerTuning(10.0, channel_ms={4: 3.0, 8: 10.0}),
        "small": LayerTuning(1.0, channel_ms={4: 1.15, 8: 1.0}, frame_ms={2: 0.5, 4: 0.8}),
        "idle": LayerTuning(10.0, channel_ms={4: 11.0, 8: 10.0}),
        "after_idle": LayerTuning(1.0, channel_ms={4: 1.15, 8: 1.0}),
    }
    chains = {"big": ChannelChain("big", "small"), "idle": ChannelChain("idle", "after_idle")}
    assert profitable_dims(tunings, keep=0.5)["small"] == ("frame",)
    got = profitable_dims(tunings, keep=0.5, chains=chains)
    assert got == {"big": ("channel",), "small": ("frame", "channel"), "idle": (),
                   "after_idle": ()}  # fmt: skip
    # the spared time shrinks with the kept fraction: at keep 7/8, 1/8 of 5 ms < 1.6 - 0.9 ms
    tunings["big"] = LayerTuning(10.0, channel_ms={4: 3.0, 7: 5.0, 8: 10.0})
    tunings["small"].channel_ms = {4: 1.15, 7: 1.6, 8: 1.0}
    assert profitable_dims(tunings, keep=0.875, chains=chains)["small"] == ("frame",)
    assert profitable_dims(tunings, keep=0.5, chains=chains)["small"] == ("frame", "channel")
    # nor one to a layer whose channels were not tuned (a pruner without channels)
    frames_only = dict(tunings, small=LayerTuning(1.0, frame_ms={2: 0.5, 4: 1.0}))
    assert profitable_dims(frames_only, keep=0.5, chains=chains)["small"] == ("frame",)
    # a chain to a layer that was not tuned changes nothing
    only = profitable_dims({"big": tunings["big"]}, keep=0.5, chains=chains)
    assert only == {"big": ("channel",)}


@pytest.mark.parametrize("mode", ["masked", "threshold"])
@pytest.mark.parametrize("site", ["inputs", "outputs"])
def test_exports_prune_only_each_layers_dims(mode, site):
    from lightning_dance.export.modes import build_export_module

    p = _pruner(feature_site=site)
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        ref = p(clip)
        assert ref.abs().max() > 1e-3
        module, _ = build_export_module(p, mode, clip)
        torch.testing.assert_close(module(clip), ref, rtol=1e-4, atol=1e-6)
        everywhere = _pruner(feature_site=site, layer_dims=None)  # same weights, all dims
        assert (everywhere(clip) - ref).abs().max() > 0.02 * ref.abs().max()  # it matters here


def test_profitable_dims_max_dims_keeps_the_fastest_dims_chain_credit_included():
    from lightning_dance.execution import ChannelChain

    tunings = {
        "big": LayerTuning(10.0, channel_ms={4: 4.0, 8: 10.0}, frame_ms={2: 6.0, 4: 10.0}),
        # alone, frames (0.7 ms) beat channels (0.85 ms); with 2 ms of big's outputs spared,
        # channels are estimated at -1.15 ms and rank first
        "small": LayerTuning(1.0, channel_ms={4: 0.85, 8: 1.0}, frame_ms={2: 0.7, 4: 1.0}),
    }
    assert profitable_dims(tunings, keep=0.5, max_dims=1) == {"big": ("channel",),
                                                             "small": ("frame",)}  # fmt: skip
    chains = {"big": ChannelChain("big", "small")}
    got = profitable_dims(tunings, keep=0.5, max_dims=1, chains=chains)
    assert got == {"big": ("channel",), "small": ("channel",)}
    assert profitable_dims(tunings, keep=0.5, max_dims=2) == profitable_dims(tunings, keep=0.5)
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_dims"):
            profitable_dims(tunings, keep=0.5, max_dims=bad)
    for bad in (["big"], {"big": "small"}, {"big": ("big", "small")}):
        with pytest.raises(TypeError, match="channel_chains"):
            profitable_dims(tunings, keep=0.5, chains=bad)
