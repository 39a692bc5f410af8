import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dance.masks import (
    DIMS,
    LayerMasks,
    apply_masks,
    check_dims,
    expand_blocks,
    keep_count,
    threshold_gate,
    topk_gate,
)


@pytest.mark.parametrize("min_keep", [1, 2, 3])
def test_threshold_eval_is_binary_and_keeps_at_least_min_keep(min_keep):
    logits = torch.tensor([[-5.0, -1.0, -2.0, -3.0], [1.0, 2.0, -1.0, 0.5]])
    m = threshold_gate(logits, training=False, min_keep=min_keep)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.sum(1) >= min_keep).all()
    # row 0: nothing positive -> exactly the min_keep best; row 1: positives kept
    assert m[0].sum() == min_keep and m[0, 1] == 1
    assert m[1, :2].tolist() == [1.0, 1.0] and m[1, 3] == 1.0


def test_threshold_training_is_hard_forward_soft_backward():
    torch.manual_seed(0)
    logits = torch.randn(64, 16, requires_grad=True)
    m = threshold_gate(logits, training=True, tau=0.5)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    (m * torch.arange(16.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # noise makes the training mask a Bernoulli(sigmoid(logit)) sample: check its mean
    big = torch.full((20000, 1), 1.0)
    frac = threshold_gate(big, training=True, min_keep=0).mean()
    assert abs(float(frac) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.02


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("training", [False, True])
def test_topk_keeps_exactly_k(k, training):
    logits = torch.randn(5, 8, requires_grad=True)
    m = topk_gate(logits, k, training=training)
    assert torch.equal(m.detach().sum(1), torch.full((5,), float(k)))
    if not training:  # the k largest logits
        ref = torch.zeros(5, 8).scatter(1, logits.topk(k, 1).indices, 1.0)
        assert torch.equal(m, ref)
    else:
        m.sum().backward()
        assert logits.grad.abs().sum() > 0


def test_topk_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        topk_gate(torch.zeros(1, 4), 0, training=False)


@pytest.mark.parametrize(
    "ratio,size,expected", [(0.5, 8, 4), (0.01, 8, 1), (1.0, 8, 8), (0.3, 10, 3)]
)
def test_keep_count(ratio, size, expected):
    assert keep_count(ratio, size) == expected


@pytest.mark.parametrize(
    "ratio,size,min_keep,multiple,expected",
    [
        (0.4, 72, 1, 8, 32),  # 29 -> nearest multiple of 8
        (0.97, 115, 1, 8, 112),  # 112 is a multiple
        (0.99, 115, 1, 8, 115),  # 114: the whole layer is nearer than 112
        (0.01, 72, 1, 8, 8),  # at least one multiple
        (0.5, 8, 1, 8, 4),  # sizes up to the multiple are not rounded
        (0.5, 12, 1, 8, 8),
        (1.0, 72, 1, 8, 72),
        (0.01, 72, 10, 8, 10),  # min_keep wins over the multiple
        (0.4, 72, 1, 1, 29),
    ],
)
def test_keep_count_multiple(ratio, size, min_keep, multiple, expected):
    assert keep_count(ratio, size, min_keep, multiple) == expected


@given(
    size=st.integers(1, 600),
    multiple=st.sampled_from([1, 2, 8, 16]),
    ratios=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2),
)
@settings(max_examples=200, deadline=None, derandomize=True)
def test_keep_count_multiple_properties(size, multiple, ratios):
    """Within [1, size], a multiple or the whole layer, nearest to the unrounded count, and
    monotone in the ratio (so bisection calibration still converges)."""
    lo, hi = sorted(ratios)
    k_lo, k_hi = keep_count(lo, size, 1, multiple), keep_count(hi, size, 1, multiple)
    assert 1 <= k_lo <= k_hi <= size
    plain = keep_count(lo, size)
    if size > multiple:
        allowed = [*range(multiple, size + 1, multiple), size]
        assert k_lo in allowed
        assert abs(k_lo - plain) == min(abs(c - plain) for c in allowed)
    else:
        assert k_lo == plain


@pytest.mark.parametrize("size", [(8, 8), (7, 5), (3, 3), (16, 9)])
def test_expand_blocks_tiles_the_frame(size):
    h, w = size
    gh, gw = min(4, h), min(4, w)
    blocks = torch.arange(gh * gw, dtype=torch.float32).view(1, gh, gw)
    full = expand_blocks(blocks, (h, w))
    assert full.shape == (1, h, w)
    for r in range(h):
        for c in range(w):  # reference: row r belongs to block floor(r * gh / h)
            assert full[0, r, c] == blocks[0, (r * gh) // h, (c * gw) // w]
    assert set(full.unique().tolist()) == set(blocks.unique().tolist())


def test_apply_masks_matches_broadcast_reference():
    x = torch.randn(2, 3, 4, 5, 6)
    mt = (torch.rand(2, 4) > 0.5).float()
    mc = (torch.rand(2, 3) > 0.5).float()
    mf = (torch.rand(2, 5, 6) > 0.5).float()
    ref = x * mt[:, None, :, None, None] * mc[:, :, None, None, None] * mf[:, None, None]
    out = apply_masks(x, {"frame": mt, "channel": mc, "feature": mf})
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(apply_masks(x, {}), x)
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        apply_masks(torch.randn(2, 3, 4, 5), {})


def test_kept_fraction():
    m = LayerMasks({"channel": torch.tensor([[1.0, 0.0, 1.0, 1.0]])}, {})
    assert m.kept_fraction()["channel"].tolist() == [0.75]


@pytest.mark.parametrize(
    "dims,match",
    [((), "at least one"), (("time",), "unknown dims"), (("frame", "frame"), "repeat")],
)
def test_bad_dims(dims, match):
    with pytest.raises(ValueError, match=match):
        check_dims(dims)


def test_dims_are_canonically_ordered():
    assert check_dims(("feature", "frame")) == ("frame", "feature")
    assert check_dims(DIMS) == DIMS
