"""Feature masks on layer outputs (feature_site="outputs"): counts, masked model, compact path,
exports; each against an independent reference (a dense conv masked by hand, hand-computed
MAC counts, the executed-MAC recorder)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_dance.aap import AdaptivePruner
from lightning_dance.executed import conv3d_executed_macs_batch, conv3d_expected_macs
from lightning_dance.execution import CompactPruner, compact_conv3d, count_executed_macs
from lightning_dance.feature_sites import INPUTS, OUTPUTS, get_feature_site
from lightning_dance.masks import expand_blocks
from lightning_dance.models import create_model


def _by_hand(conv, x, values, feature_out):
    """The reference: the dense conv on the channel/frame-masked input, outputs then masked."""
    xm = x
    if "frame" in values:
        xm = xm * values["frame"].view(x.shape[0], 1, -1, 1, 1)
    if "channel" in values:
        xm = xm * values["channel"].view(x.shape[0], -1, 1, 1, 1)
    y = conv(xm)
    m = feature_out.view(y.shape[0], 1, 1, *y.shape[3:])
    b = torch.zeros(1) if conv.bias is None else conv.bias.view(1, -1, 1, 1, 1)
    return torch.where(m > 0.5, y, b.expand_as(y))


def test_site_names_and_errors():
    assert get_feature_site("outputs") is OUTPUTS and get_feature_site(INPUTS) is INPUTS
    assert OUTPUTS == "outputs" and INPUTS != OUTPUTS
    with pytest.raises(ValueError, match="feature_site must be one of"):
        get_feature_site("output")
    with pytest.raises(ValueError, match="feature_site"):
        AdaptivePruner(create_model("tiny_c3d", num_classes=2), feature_site="middle")
    with pytest.raises(ValueError, match="feature_site='inputs'"):
        AdaptivePruner(create_model("tiny_c3d", num_classes=2), policy="attention",
                       dims=("channel", "feature"), feature_site="outputs")  # fmt: skip


def test_executed_count_by_hand():
    conv = nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1)  # 8x8 -> 4x4
    m = torch.zeros(1, 4, 4)
    m[0, :2, :2] = 1  # 4 of 16 output positions
    got = conv3d_executed_macs_batch(conv, (4, 2, 8, 8), feature=m, feature_at_output=True)
    assert int(got[0]) == 6 * 4 * 27 * 2 * 4
    # an input mask of the same block keeps far more outputs (its fields overlap the block)
    m_in = expand_blocks(torch.tensor([[[1.0, 0], [0, 0]]]), (8, 8))
    assert int(conv3d_executed_macs_batch(conv, (4, 2, 8, 8), feature=m_in)[0]) > int(got[0])
    with pytest.raises(ValueError, match="H_out, W_out"):
        conv3d_executed_macs_batch(conv, (4, 2, 8, 8), feature=m_in, feature_at_output=True)


def test_expected_count_matches_executed_and_has_gradients():
    conv = nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1))
    blocks = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    hard = conv3d_executed_macs_batch(
        conv, (4, 2, 6, 6), feature=expand_blocks(blocks, (6, 6)), feature_at_output=True
    )
    exp = conv3d_expected_macs(conv, (4, 2, 6, 6), feature_blocks_p=blocks, feature_at_output=True)
    assert float(exp[0]) == float(hard[0])
    p = torch.full((1, 2, 2), 0.5, requires_grad=True)
    conv3d_expected_macs(
        conv, (4, 2, 6, 6), feature_blocks_p=p, feature_at_output=True
    ).sum().backward()
    assert (p.grad > 0).all()


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(6, 8, 3, padding=1),
        nn.Conv3d(6, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
        nn.Conv3d(6, 8, (3, 1, 1), padding=(1, 0, 0)),
        nn.Conv3d(6, 6, 3, padding=2, dilation=(1, 2, 2), groups=6),
        nn.Conv3d(6, 8, 3, padding=1, padding_mode="replicate"),
    ],
)
@pytest.mark.parametrize("grid", [None, (3, 3), (2, 4)])
def test_compact_conv_equals_masked_outputs(conv, grid):
    torch.manual_seed(0)
    n, t, h = 2, 5, 11
    x = torch.randn(n, 6, t, h, h)
    out_hw = conv(x).shape[3:]
    gh, gw = grid or (4, 4)
    blocks = (torch.rand(n, gh, gw) > 0.4).float()
    blocks[:, 0, 0] = 1
    values = {
        "frame": (torch.rand(n, t) > 0.3).float(),
        "channel": (torch.rand(n, 6) > 0.3).float(),
        "feature": expand_blocks(blocks, tuple(out_hw)),
    }
    values["frame"][:, 0] = values["channel"][:, 0] = 1
    ref = _by_hand(conv, x, values, values["feature"])
    for mode in ("group", "union"):
        with torch.no_grad(), count_executed_macs() as ran:
            y = compact_conv3d(conv, x, values, batch_mode=mode, feature_at_output=True,
                               feature_grid=grid)  # fmt: skip
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
        if mode == "group":  # exactly the counted work
            counted = conv3d_executed_macs_batch(conv, tuple(x.shape[1:]), **values,
                                                 feature_at_output=True)  # fmt: skip
            assert ran.total == int(counted.sum())
    with pytest.raises(ValueError, match="feature mask must have shape"):
        compact_conv3d(conv, x, {"feature": torch.ones(n, h, h + 1)}, feature_at_output=True)
    with pytest.raises(ValueError, match="feature_at_output=True"):
        compact_conv3d(conv, x, values, feature_grid=(gh, gw))
    if grid is not None:
        ragged = values["feature"].clone()
        ragged[:, 0, 0] = 1 - ragged[:, 0, 1]  # no longer constant on the first block
        with pytest.raises(ValueError, match="not constant on the blocks"):
            compact_conv3d(conv, x, {"feature": ragged}, feature_at_output=True, feature_grid=grid)
        with pytest.raises(ValueError, match="does not fit"):
            compact_conv3d(conv, x, {"feature": values["feature"]}, feature_at_output=True,
                           feature_grid=(out_hw[0] + 1, 1))  # fmt: skip


def test_pruner_masks_outputs_and_counts_them():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, stride=(1, 2, 2), padding=1),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    p = AdaptivePruner(net, dims=("feature",), feature_site="outputs", init_keep=0.5, grid=2)
    p.eval()
    x = torch.randn(2, 3, 4, 8, 8)
    with torch.no_grad():
        out = p(x)
        layer = p.last_stats.layers["2"]
        m = layer.masks["feature"]
        assert tuple(m.shape) == (2, 4, 4)  # the output's positions
        h = net[1](net[0](x))
        ref = net[3:](_by_hand(net[2], h, {}, m))
    torch.testing.assert_close(out, ref)
    assert layer.feature_at_output
    kept_outputs = m.flatten(1).sum(1)
    assert torch.equal(layer.executed_macs, (8 * 8 * 27 * 4 * kept_outputs).long())


@pytest.mark.parametrize(("name", "kw", "shape"), [
    ("tiny_c3d", {}, (3, 8, 32, 32)),
    ("r2plus1d_18", {"width": 0.25}, (3, 8, 56, 56)),
    ("x3d_xs", {}, (3, 4, 64, 64)),
])  # fmt: skip
@pytest.mark.parametrize("policy", ["threshold", "topk"])
def test_compact_pruner_equals_masked_model(name, kw, shape, policy):
    torch.manual_seed(0)
    net = create_model(name, num_classes=4, **kw).eval()
    p = AdaptivePruner(net, dims=("frame", "channel", "feature"), policy=policy, budget=0.4,
                       feature_site="outputs", init_keep=0.3).eval()  # fmt: skip
    clip = torch.randn(1, *shape)
    with torch.no_grad():
        ref = p(clip)
        with count_executed_macs() as ran:
            out = CompactPruner(p)(clip)
        general = CompactPruner(p, index_plan=False, skip_outputs=False)(clip)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(general, ref, atol=1e-5, rtol=1e-4)  # the mask-based plan too
    st = p.last_stats
    counted = float(st.executed_macs().sum()) - st.fixed_macs - st.controller_macs
    assert ran.total == pytest.approx(counted, rel=1e-9)
    assert float(st.mac_ratio().mean()) < 0.9


def test_outputs_save_more_at_the_same_blocks():
    """The same kept blocks: masking outputs counts fewer MACs than masking inputs."""
    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=4, width=0.25).eval()
    clip = torch.randn(1, 3, 8, 56, 56)
    ratio = {}
    for site in ("inputs", "outputs"):
        torch.manual_seed(1)
        p = AdaptivePruner(net, dims=("feature",), policy="topk", budget=0.5,
                           feature_site=site).eval()  # fmt: skip
        with torch.no_grad():
            p(clip)
        ratio[site] = float(p.last_stats.mac_ratio())
    assert ratio["outputs"] < ratio["inputs"] - 0.05  # measured: 0.51 vs 0.60


def test_exports_mask_outputs():
    from lightning_dance.export.modes import build_export_module

    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=4, width=0.25).eval()
    clip = torch.randn(1, 3, 8, 56, 56)
    for policy, mode, kw in (("threshold", "threshold", {}), ("threshold", "masked", {}),
                             ("topk", "topk", {"skip_outputs": False})):  # fmt: skip
        p = AdaptivePruner(net, dims=("frame", "channel", "feature"), policy=policy, budget=0.4,
                           feature_site="outputs", init_keep=0.6).eval()  # fmt: skip
        with torch.no_grad():
            ref = p(clip)
            module, _ = build_export_module(p, mode, clip, **kw)
            torch.testing.assert_close(module(clip), ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the default skips no producer outputs for such a pruner
        module, _ = build_export_module(p, "topk", clip)
        torch.testing.assert_close(module(clip), p(clip), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="leave skip_outputs at its default"):
        build_export_module(p, "topk", clip, skip_outputs=True)


def test_tuning_times_output_tiles():
    from lightning_dance.execution.tuning import tune_conv3d

    conv = nn.Conv3d(4, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    tuned = tune_conv3d(conv, (4, 2, 16, 16), ("feature",), repeats=1, feature_site="outputs")
    # kept output blocks of the 4x4 grid over the 8x8 output: the fractions themselves
    assert sorted(tuned.feature_ms) == [0.25, 0.5, 0.75, 1.0]
    inputs = tune_conv3d(conv, (4, 2, 16, 16), ("feature",), repeats=1)
    assert min(inputs.feature_ms) > 0.25  # an input block's field spills over its neighbours


def test_controller_shares_per_context_work():
    """The global heads run once per forward, not once per layer (same logits either way)."""
    torch.manual_seed(0)
    net = create_model("tiny_c3d", num_classes=2).eval()
    p = AdaptivePruner(net, dims=("frame", "channel", "feature")).eval()
    calls = []
    p.controller.frame_global.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        p(torch.randn(1, 3, 8, 32, 32))
    assert len(calls) == 1 and len(p.layer_names) > 1


def test_wrapper_trains_and_reloads_the_site(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dance import DANCEWrapper
    from lightning_dance.checkpoints import load_module

    torch.manual_seed(0)
    wrapper = DANCEWrapper("tiny_c3d", num_classes=2, dims=("frame", "channel", "feature"),
                           feature_site="outputs", budget=0.5)  # fmt: skip
    assert wrapper.pruner.feature_site is OUTPUTS
    data = TensorDataset(torch.randn(4, 3, 8, 32, 32), torch.tensor([0, 1, 0, 1]))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(wrapper, DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "outputs.ckpt")
    restored = load_module(tmp_path / "outputs.ckpt").eval()
    assert restored.pruner.feature_site is OUTPUTS
    clip = torch.randn(1, 3, 8, 32, 32)
    wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(clip), wrapper(clip))
        masks = restored.pruner.last_stats.layers["conv2.0"].masks["feature"]
    assert tuple(masks.shape) == (1, 8, 8)  # the conv's output grid (16x16 input, stride 2)


def test_a_pickle_from_before_feature_sites_loads_with_input_masks():
    import pickle

    p = AdaptivePruner(create_model("tiny_c3d", num_classes=2), dims=("channel", "feature"))
    del p.__dict__["feature_site"]  # as pickled before the attribute existed
    old = pickle.loads(pickle.dumps(p))
    assert old.feature_site is INPUTS
    with torch.no_grad():
        old.eval()(torch.randn(1, 3, 8, 32, 32))
