import pytest
import torch
import torch.nn as nn
from conftest import SmallNet, randomize_norms

from lightning_dance.aap import AdaptivePruner
from lightning_dance.channel_maps import ChannelGather, ChannelScatter
from lightning_dance.errors import DanceError
from lightning_dance.macs import count_macs
from lightning_dance.materialize import MaterializeError, materialize
from lightning_dance.models import create_model
from lightning_dance.priors import channel_frequencies, freeze_channels


def _frozen(model: nn.Module, shape, budget=0.35, seed=0, policy="topk") -> AdaptivePruner:
    """A ``topk`` (or ``policy``) channel pruner whose random controller is frozen to its most
    frequent channels (a static projection), BatchNorms with non-trivial statistics."""
    torch.manual_seed(seed)
    model = randomize_norms(model.eval())
    pruner = AdaptivePruner(model, dims=("channel",), policy=policy, budget=budget).eval()
    with torch.no_grad():  # a controller whose choice varies per clip before it is frozen
        for p in pruner.controller.parameters():
            p.normal_(std=0.5)
    clips = [torch.randn(2, *shape) for _ in range(2)]
    freeze_channels(pruner, channel_frequencies(pruner, clips), standalone=True)
    return pruner


CASES = [
    ("tiny_c3d", {}, (3, 8, 32, 32), "topk"),
    ("r2plus1d_18", {"width": 0.25}, (3, 4, 32, 32), "topk"),
    ("x3d_xs", {}, (3, 4, 32, 32), "topk"),
    ("r2plus1d_18", {"width": 0.25}, (3, 4, 32, 32), "threshold"),  # DANCE's policy, frozen
]


@pytest.mark.parametrize("name,kwargs,shape,policy", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])  # fmt: skip
def test_the_copy_computes_what_the_pruner_computes_and_runs_the_counted_macs(
    name, kwargs, shape, policy
):
    pruner = _frozen(create_model(name, num_classes=5, **kwargs), shape, policy=policy)
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    small = materialize(pruner, torch.randn(1, *shape))
    clip = torch.randn(3, *shape)
    with torch.no_grad():
        want, got = pruner(clip), small(clip)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # an independent count (fvcore on the copy) against the pruner's executed count
    stats = pruner.last_stats
    dense_conv = count_macs(pruner.model, clip[:1]).by_operator["conv"]
    executed = sum(int(s.executed_macs[0]) for s in stats.layers.values())
    expected = dense_conv - sum(s.dense_macs for s in stats.layers.values()) + executed
    got = count_macs(small, clip[:1]).by_operator["conv"]
    if name == "x3d_xs":  # narrow tails: a dropped channel costs C_out MACs per clip
        assert got < expected < dense_conv
    else:
        assert got == expected < dense_conv
    size = sum(p.numel() for p in small.parameters())
    assert size < sum(p.numel() for p in pruner.model.parameters())
    # the user's model is untouched
    for k, v in pruner.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_chains_are_narrowed_without_gathers_and_block_inputs_are_gathered():
    pruner = _frozen(create_model("r2plus1d_18", num_classes=5, width=0.25), (3, 4, 32, 32))
    small = materialize(pruner, torch.randn(1, 3, 4, 32, 32))
    chains = {c.consumer: c for c in pruner.output_chains().values()}
    modules = dict(small.named_modules())
    gathers = {n.rsplit(".", 1)[0] for n, m in modules.items() if isinstance(m, ChannelGather)}
    assert chains and gathers
    for consumer, chain in chains.items():
        assert consumer not in gathers  # the producer computes only what the consumer reads
        producer = modules[chain.producer]
        producer = producer[1] if isinstance(producer, nn.Sequential) else producer
        narrow, full = modules[consumer], pruner.model.get_submodule(consumer)
        assert producer.out_channels == narrow.in_channels < full.in_channels
        for norm in chain.norms:
            assert modules[norm].num_features == producer.out_channels
    # every gathered layer is a pruned layer that no chain feeds
    assert gathers <= set(pruner.layer_names) - set(chains)


def test_depthwise_layers_fill_dropped_channels_with_their_bias():
    conv = nn.Conv3d(4, 8, 3, padding=1, groups=4)  # channel multiplier 2
    keep = torch.tensor([1, 3])
    rows = (keep.view(-1, 1) * 2 + torch.arange(2)).flatten()
    scatter = ChannelScatter(rows, conv.bias.detach())
    x = torch.randn(2, 4, 3, 5, 5)
    masked = x * torch.tensor([0.0, 1, 0, 1]).view(1, 4, 1, 1, 1)
    narrow = nn.Conv3d(2, 4, 3, padding=1, groups=2)
    narrow.weight.data, narrow.bias.data = conv.weight.data[rows], conv.bias.data[rows]
    torch.testing.assert_close(scatter(narrow(x[:, keep])), conv(masked))


def test_channel_gather_keeps_the_fast_layout():
    x = torch.randn(2, 6, 3, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    idx = torch.tensor([5, 0, 2])
    y = ChannelGather(idx)(x)
    assert torch.equal(y, x[:, idx])
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_the_copy_runs_on_the_fast_kernels_folds_its_norms_and_moves_fewer_bytes():
    from lightning_dance.bytes import measure_traffic
    from lightning_dance.execution import accelerate_dense
    from lightning_dance.execution.chains import conv_norms

    pruner = _frozen(create_model("r2plus1d_18", num_classes=5, width=0.25), (3, 4, 32, 32))
    clip = torch.randn(1, 3, 4, 32, 32)
    small = materialize(pruner, clip)
    with torch.no_grad():
        want = small(clip)
        with accelerate_dense(small, fold_norms=True):
            fast = small(clip)
    torch.testing.assert_close(fast, want, atol=1e-4, rtol=1e-4)
    # torch.fx traces the copy (gathers included): its BatchNorms fold like the dense model's
    assert len(conv_norms(small)) == len(conv_norms(pruner.model))
    dense, own = measure_traffic(pruner.model, clip), measure_traffic(small, clip)
    assert own.total < 0.8 * dense.total
    assert own.macs < 0.5 * dense.macs


def test_the_copy_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from lightning_dance.export.onnx import export_onnx, quiet_session

    pruner = _frozen(create_model("r2plus1d_18", num_classes=5, width=0.25), (3, 4, 32, 32))
    clip = torch.randn(1, 3, 4, 32, 32)
    small = materialize(pruner, clip)
    session = quiet_session(export_onnx(small, clip, tmp_path / "small.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: clip.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), pruner(clip), atol=1e-4, rtol=1e-4)


def test_the_copy_saves_and_reloads(tmp_path):
    pruner = _frozen(SmallNet(), (3, 8, 16, 16))
    clip = torch.randn(2, 3, 8, 16, 16)
    small = materialize(pruner, clip)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    again = materialize(pruner, clip)
    for p in again.parameters():
        p.data.zero_()
    again.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(again(clip), small(clip))


def test_per_clip_decisions_and_bad_clips_are_refused_with_the_fix():
    clip = torch.randn(1, 3, 8, 16, 16)
    dynamic = AdaptivePruner(SmallNet(), dims=("channel",), policy="topk").train()
    with pytest.raises(MaterializeError, match="freeze_channels") as err:
        materialize(dynamic, clip)
    assert isinstance(err.value, DanceError)  # the package's errors share one base
    everything = AdaptivePruner(SmallNet(), policy="threshold")
    with pytest.raises(MaterializeError, match="dims=\\('channel',\\)"):
        materialize(everything, clip)
    pruner = _frozen(SmallNet(), (3, 8, 16, 16))
    pruner.train()
    with pytest.raises(ValueError, match="reads 3 channels"):  # the pruner's clip check
        materialize(pruner, torch.randn(1, 4, 8, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        materialize(pruner, torch.full((1, 3, 8, 16, 16), float("nan")))
    assert pruner.training  # the mode is restored after a refused call


def test_a_copy_that_differs_from_the_pruner_is_never_returned(monkeypatch):
    import lightning_dance.materialize as mod

    pruner = _frozen(SmallNet(), (3, 8, 16, 16))
    sliced = mod._sliced_conv

    def broken(conv, inputs, outputs):
        new = sliced(conv, inputs, outputs)
        new.weight.data.mul_(1.5)
        return new

    monkeypatch.setattr(mod, "_sliced_conv", broken)
    with pytest.raises(MaterializeError, match="differs from the pruner"):
        materialize(pruner, torch.randn(1, 3, 8, 16, 16))


def test_x3d_bottleneck_tails_run_on_the_kept_channels():
    from lightning_dance.models.bottleneck_tail import NarrowBottleneck, NarrowTail

    shape = (3, 4, 32, 32)
    pruner = _frozen(create_model("x3d_xs", num_classes=5), shape)
    small = materialize(pruner, torch.randn(1, *shape))
    blocks = [m for m in small.modules() if isinstance(m, NarrowBottleneck)]
    # every bottleneck of X3D-XS (26), with and without squeeze-excitation (every other one: 15)
    assert len(blocks) == sum(n.endswith("conv_b") for n in pruner.layer_names) == 26
    assert sum(b.tail.se is not None for b in blocks) == 15
    scatters = [n for n, m in small.named_modules() if isinstance(m, ChannelScatter)]
    assert all(n.startswith("blocks.0.") for n in scatters)  # only the stem's depthwise conv
    for block in blocks:  # no tensor as wide as the expansion is made any more
        assert block.conv_b.out_channels == block.tail.kept.numel() < block.tail.const.numel()
    r21d = materialize(_frozen(create_model("r2plus1d_18", num_classes=5, width=0.25), shape),
                       torch.randn(1, *shape))  # fmt: skip
    assert not any(isinstance(m, NarrowTail) for m in r21d.modules())


def test_the_copy_exports_for_jetson_and_snapdragon(tmp_path):
    pytest.importorskip("onnxruntime")
    from lightning_dance.export import export_model

    shape = (3, 4, 32, 32)
    pruner = _frozen(create_model("r2plus1d_18", num_classes=5, width=0.25), shape)
    clip = torch.randn(1, *shape)
    small = materialize(pruner, clip)
    result = export_model(small, clip, targets=("jetson", "snapdragon"), formats=("onnx", "qnn"),
                          out_dir=tmp_path / "export")  # fmt: skip
    artifacts = {(a["target"], a["format"]): a for a in result.manifest["artifacts"]}
    for key in [("jetson", "onnx"), ("snapdragon", "qnn")]:
        artifact = artifacts[key]
        assert artifact["status"] == "ok", (key, artifact["reason"])
        assert artifact["parity_max_abs_error"] <= artifact["parity_tolerance"]
        assert artifact["ops"].get("Gather", 0) > 0  # the block inputs' channel gathers


def test_a_copy_that_does_not_run_is_refused_with_a_clear_error(monkeypatch):
    import lightning_dance.materialize as mod

    pruner = _frozen(SmallNet(), (3, 8, 16, 16))
    monkeypatch.setattr(mod, "_slice_norm", lambda bn, keep: None)  # BatchNorms left wide
    with pytest.raises(MaterializeError, match="does not run on the clip"):
        materialize(pruner, torch.randn(1, 3, 8, 16, 16))


def test_a_threshold_pruner_with_channel_only_layer_dims_materializes():
    """``layer_dims`` that prune channels only (a ``best dim`` selection) count as channel
    pruning: the projection stands alone and materializes, equal to the pruner."""
    torch.manual_seed(0)
    model = create_model("r2plus1d_18", num_classes=5, width=0.25).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)][1:6]
    pruner = AdaptivePruner(model, policy="threshold", budget=0.5, layers=convs,
                            layer_dims={n: ("channel",) for n in convs}).eval()  # fmt: skip
    assert pruner.dims == ("frame", "channel", "feature") and pruner.pruned_dims() == ("channel",)
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.normal_(std=0.5)
    clip = torch.randn(1, 3, 4, 32, 32)
    freeze_channels(pruner, channel_frequencies(pruner, [clip]), standalone=True)
    small = materialize(pruner, clip)
    with torch.no_grad():
        torch.testing.assert_close(small(clip), pruner(clip), atol=1e-4, rtol=1e-4)
    assert count_macs(small, clip).total < count_macs(model, clip).total
    mixed = AdaptivePruner(model, policy="threshold", layers=convs,
                           layer_dims={convs[0]: ("frame",)})  # fmt: skip
    with pytest.raises(ValueError, match="also decides \\['frame'"):
        freeze_channels(mixed, channel_frequencies(mixed, [clip]), standalone=True)
