"""BatchNorm folding in the fast paths (lightning_dance.execution.folding): parity and bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_dance.aap import AdaptivePruner
from lightning_dance.bytes import compare_traffic
from lightning_dance.execution import CompactPruner, accelerate_dense, to_fast_layout
from lightning_dance.execution.folding import foldable_norms, folded_conv
from lightning_dance.models import create_model


def _random_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (fresh ones are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return model.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_conv_equals_conv_then_norm_and_follows_updates(bias, channels_last):
    net = _random_norms(nn.Sequential(nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=bias),
                                      nn.BatchNorm3d(6)))  # fmt: skip
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.no_grad():
        folded = folded_conv(net[0], net[1])
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
        assert folded_conv(net[0], net[1]) is folded  # cached
        assert net[0].bias is None or not torch.equal(folded.bias, net[0].bias)
        net[1].running_mean.add_(1.0)  # a statistic changes: made again
        torch.testing.assert_close(folded_conv(net[0], net[1])(x), net(x), atol=1e-5, rtol=1e-5)
    net[1].train()
    with pytest.raises(ValueError, match="eval"):
        folded_conv(net[0], net[1])


def test_accelerate_dense_folds_every_pair():
    model = _random_norms(create_model("tiny_c3d", num_classes=4))
    assert foldable_norms(model) == {"stem.0": "stem.1", "conv2.0": "conv2.1",
                                     "conv3.0": "conv3.1", "res.conv1.0": "res.conv1.1",
                                     "res.conv2.0": "res.conv2.1"}  # fmt: skip
    assert "stem.0" not in foldable_norms(model, keep=("stem.0",))
    clip = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        ref = model(clip)
        with accelerate_dense(model, fold_norms=True):
            got = model(to_fast_layout(clip))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert "forward" not in model.stem[1].__dict__  # routing undone


@pytest.mark.parametrize(
    ("policy", "dims"), [("topk", ("channel",)), ("threshold", ("frame", "channel", "feature"))]
)
def test_compact_pruner_folding_parity_and_bytes(policy, dims):
    """Index plan (topk channels) and general plan (threshold, all dims): same outputs as the
    masked model; BatchNorms move no bytes but the stem's (the controller reads its raw
    output); the dense baseline folds too."""
    torch.manual_seed(0)
    model = _random_norms(create_model("tiny_c3d", num_classes=4))
    pruner = AdaptivePruner(model, dims=dims, policy=policy, budget=0.4).eval()
    clip = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        ref = pruner(clip)
        plain = CompactPruner(pruner, fold_norms=False)(clip)
        folded = CompactPruner(pruner, fold_norms=True)(clip)
    torch.testing.assert_close(folded, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(folded, plain, atol=1e-4, rtol=1e-4)
    c = compare_traffic(CompactPruner(pruner, fold_norms=True), clip)
    assert "batch_norm" not in c.dense.by_kind and "addcmul" not in c.compact.by_kind
    assert set(c.compact.by_layer) & {"conv2.1", "conv3.1", "res.conv1.1", "res.conv2.1"} == set()
    assert c.compact.by_layer["stem.1"][1] > 0  # the stem's BatchNorm still runs
    unfolded = compare_traffic(CompactPruner(pruner, fold_norms=False), clip)
    assert c.compact.total < unfolded.compact.total and c.dense.total < unfolded.dense.total


def test_fold_norms_must_be_a_bool():
    pruner = AdaptivePruner(create_model("tiny_c3d", num_classes=4), budget=0.5)
    with pytest.raises(TypeError, match="fold_norms"):
        CompactPruner(pruner, fold_norms="yes")
