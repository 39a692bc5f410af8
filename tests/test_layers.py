import pytest
import torch.nn as nn

from lightning_dance.layers import NoConv3dError, all_conv3d, select_conv3d, stem_names


class TwoPathway(nn.Module):
    """A SlowFast-like model: two stems reading RGB, a fusion conv, nested containers."""

    def __init__(self):
        super().__init__()
        self.slow = nn.Sequential(nn.Conv3d(3, 8, (1, 3, 3)), nn.Conv3d(8, 8, 3))
        self.fast = nn.ModuleDict({"stem": nn.Conv3d(3, 4, (3, 3, 3)), "body": nn.Conv3d(4, 4, 1)})
        self.fuse = nn.Conv3d(12, 8, 1, groups=4)


def test_stems_of_a_multi_pathway_model():
    m = TwoPathway()
    # registration order: slow.0 (3->8), slow.1 (8->8) ... the stem run stops at slow.1
    assert stem_names(m) == ["slow.0"]
    m2 = nn.Sequential(nn.Conv3d(3, 8, 1), nn.Conv3d(3, 4, 1), nn.Conv3d(12, 8, 1))
    assert stem_names(m2) == ["0", "1"]


@pytest.mark.parametrize(
    "selector,expected",
    [
        (None, ["slow.1", "fast.stem", "fast.body", "fuse"]),
        ("^fast", ["fast.stem", "fast.body"]),
        (["fuse", "slow.1"], ["slow.1", "fuse"]),
        (lambda name, m: m.groups > 1, ["fuse"]),
    ],
)
def test_selection(selector, expected):
    assert list(select_conv3d(TwoPathway(), selector)) == expected


def test_include_stem():
    assert "slow.0" in select_conv3d(TwoPathway(), include_stem=True)


def test_no_conv3d_is_a_clear_error():
    with pytest.raises(NoConv3dError, match="no nn.Conv3d"):
        select_conv3d(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    assert all_conv3d(nn.Linear(2, 2)) == {}


def test_empty_or_wrong_selection_lists_candidates():
    with pytest.raises(ValueError, match="matches no Conv3d.*candidates"):
        select_conv3d(TwoPathway(), "nothing_like_this")
    with pytest.raises(ValueError, match="stem layers run dense"):
        select_conv3d(TwoPathway(), ["slow.0"])
    with pytest.raises(ValueError, match="not instrumentable"):
        select_conv3d(TwoPathway(), ["typo"])
