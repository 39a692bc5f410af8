"""The static alternative at the same cost: Torch-Pruning to a MAC budget."""

import pytest
import torch

from lightning_dance.baselines import conv3d_macs, torch_prune
from lightning_dance.macs import count_macs
from lightning_dance.models import create_model

pytest.importorskip("torch_pruning")


@pytest.mark.parametrize("budget", [0.35, 0.7])
def test_torch_prune_meets_the_budget_and_keeps_the_head(budget):
    torch.manual_seed(0)
    net = create_model("tiny_c3d", num_classes=5).eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    dense = conv3d_macs(net, clip[:1])
    small, ratio = torch_prune(net, clip[:1], budget)
    assert abs(ratio - budget) < 0.03
    assert conv3d_macs(small, clip[:1]) == pytest.approx(ratio * dense)
    with torch.no_grad():
        out = small(clip)
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,kwargs", [("tiny_c3d", {}), ("r2plus1d_18", {"width": 0.25})])
def test_conv3d_macs_is_fvcore_on_the_convs(name, kwargs):
    net = create_model(name, num_classes=5, **kwargs).eval()
    clip = torch.zeros(1, 3, 4, 16, 16)
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d)]
    by_module = count_macs(net, clip).by_module
    assert conv3d_macs(net, clip) == sum(by_module[n] for n in convs)


def test_torch_prune_refuses_a_bad_budget():
    net = create_model("tiny_c3d", num_classes=5).eval()
    with pytest.raises(ValueError, match="budget"):
        torch_prune(net, torch.zeros(1, 3, 8, 32, 32), 0.0)
