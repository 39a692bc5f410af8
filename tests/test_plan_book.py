import copy

import pytest
import torch
import torch.nn as nn
from conftest import randomize_norms

from lightning_dance.aap import AdaptivePruner
from lightning_dance.errors import DanceError
from lightning_dance.macs import count_macs
from lightning_dance.materialize import materialize
from lightning_dance.models import create_model
from lightning_dance.plan_book import PlanBook, PlanBookError, plan_book
from lightning_dance.priors import channel_frequencies, freeze_channels

SHAPE = (3, 4, 32, 32)


def _per_clip(model: nn.Module, seed: int = 0, **kwargs) -> AdaptivePruner:
    """A ``threshold`` channel pruner whose random controller decides differently per clip, with
    BatchNorms of non-trivial statistics (so a wrong channel shows in the logits)."""
    torch.manual_seed(seed)
    model = randomize_norms(model.eval())
    kwargs = {"dims": ("channel",), "policy": "threshold", "budget": 0.4, **kwargs}
    pruner = AdaptivePruner(model, **kwargs).eval()
    with torch.no_grad():
        for p in pruner.controller.parameters():
            p.normal_(std=0.5)
    return pruner


def _r2plus1d(**kwargs) -> AdaptivePruner:
    return _per_clip(create_model("r2plus1d_18", num_classes=5, width=0.25), **kwargs)


def _decisions(pruner: AdaptivePruner, clip: torch.Tensor) -> list[tuple]:
    """Each clip's kept channels of every layer, from the masked forward."""
    with torch.no_grad():
        pruner(clip)
    layers = pruner.last_stats.layers.values()
    return [
        tuple(tuple(s.masks["channel"][i].bool().tolist()) for s in layers)
        for i in range(clip.shape[0])
    ]


def test_a_plan_per_distinct_decision_computes_what_the_pruner_computes_clip_by_clip():
    pruner = _r2plus1d()
    clips = [torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    distinct = {d for clip in clips for d in _decisions(pruner, clip)}
    assert len(distinct) > 1  # the controller really chooses per clip
    before = {k: v.clone() for k, v in pruner.state_dict().items()}
    book = plan_book(pruner, clips, plans=64)
    assert len(book.networks) == len(distinct)
    mixed = []
    for clip in clips:
        with torch.no_grad():
            want = pruner(clip)
        got = book(clip)  # a batch of clips with different plans, in their order
        mixed.append(len(set(book.last_plans.tolist())) > 1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # the conv MACs each clip runs are those the pruner counts for it (fvcore on the
        # sub-network, the stem once)
        stats = pruner.last_stats
        dense_conv = count_macs(pruner.model, clip[:1]).by_operator["conv"]
        stem = count_macs(book.stem, clip[:1]).by_operator["conv"]
        with torch.no_grad():
            stem_out = book.stem(clip)
        for i, j in enumerate(book.last_plans.tolist()):
            executed = sum(int(s.executed_macs[i]) for s in stats.layers.values())
            counted = dense_conv - sum(s.dense_macs for s in stats.layers.values()) + executed
            ran = count_macs(book.networks[j], stem_out[i : i + 1]).by_operator["conv"] + stem
            assert ran == counted < dense_conv
    assert any(mixed)
    # the user's pruner is untouched: its weights, and its (per-clip) controller
    for k, v in pruner.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(pruner.controller).__name__ == "Controller"


def test_one_plan_is_the_static_projection():
    pruner = _r2plus1d(seed=1)
    clips = [torch.randn(4, *SHAPE) for _ in range(2)]
    book = plan_book(pruner, clips, plans=1)
    frozen = copy.deepcopy(pruner)
    freeze_channels(frozen, channel_frequencies(frozen, clips), standalone=True)
    projection = materialize(frozen, clips[0][:1])
    clip = torch.randn(3, *SHAPE)
    with torch.no_grad():
        want = projection(clip)
    torch.testing.assert_close(book(clip), want, atol=1e-4, rtol=1e-4)
    assert book.last_plans.tolist() == [0, 0, 0]
    assert book.assign(clip).tolist() == [0, 0, 0]


def test_macs_per_clip_follow_the_assigned_plan_and_the_stem_is_counted_once():
    pruner = _r2plus1d(seed=2)
    clips = [torch.randn(4, *SHAPE) for _ in range(2)]
    book = plan_book(pruner, clips, plans=3)
    clip = clips[0]
    table = book.plan_macs(clip)
    assert len(table) == len(book.networks)
    with torch.no_grad():
        stem_out = book.stem(clip[:1])
    stem = count_macs(book.stem, clip[:1]).total
    control = pruner.controller.macs(tuple(stem_out.shape[1:]))
    for j, net in enumerate(book.networks):
        assert table[j] == stem + control + count_macs(net, stem_out).total
    dense = count_macs(pruner.model, clip[:1]).total
    assert all(0 < m < dense for m in table)
    assert book.macs(clip).tolist() == [table[j] for j in book.assign(clip).tolist()]


def test_without_a_shared_stem_each_plan_runs_the_clip_and_counts_the_stem_twice():
    pruner = _r2plus1d(seed=3)
    clips = [torch.randn(4, *SHAPE)]
    shared = plan_book(pruner, clips, plans=2)
    own = plan_book(pruner, clips, plans=2, share_stem=False)
    torch.testing.assert_close(own(clips[0]), shared(clips[0]), atol=1e-4, rtol=1e-4)
    x = clips[0][:1]
    stem, control = count_macs(shared.stem, x).total, shared.plan_macs(x)[0]
    control -= stem + count_macs(shared.networks[0], shared.stem(x)).total
    for j, net in enumerate(own.networks):  # the clip in: each network runs the stem again
        assert own.plan_macs(x)[j] == stem + control + count_macs(net, x).total
        assert own.plan_macs(x)[j] > shared.plan_macs(x)[j]


class _Scaled(nn.Module):
    """A model that changes its input before the stem (a normalization inside forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("tiny_c3d", num_classes=4)

    def forward(self, x):
        return self.net(2.0 * x - 1.0)


def test_a_model_that_changes_its_input_before_the_stem_is_refused_with_the_fix():
    pruner = _per_clip(_Scaled())
    clips = [torch.randn(3, 3, 8, 32, 32)]
    with pytest.raises(PlanBookError, match="share_stem=False"):
        plan_book(pruner, clips, plans=2)
    book = plan_book(pruner, clips, plans=64, share_stem=False)  # a plan per decision
    assert len(book.networks) == len({*_decisions(pruner, clips[0])})
    with torch.no_grad():
        want = pruner(clips[0])
    torch.testing.assert_close(book(clips[0]), want, atol=1e-4, rtol=1e-4)
    # compiled: only the plans (the stem runs inside the model's forward), each on the clip
    with book.compiled(clips[0][:1]):
        assert set(book._graphs) == {id(net) for net in book.networks}
        for i in range(3):
            torch.testing.assert_close(
                book(clips[0][i : i + 1]), want[i : i + 1], atol=1e-4, rtol=1e-4
            )


def test_bad_arguments_and_clips_get_clear_errors():
    pruner = _r2plus1d()
    clips = [torch.randn(2, *SHAPE)]
    for plans in (0, -1, 1.5, True):
        with pytest.raises(PlanBookError, match="plans must be an int"):
            plan_book(pruner, clips, plans=plans)
    with pytest.raises(PlanBookError, match="at least one batch"):
        plan_book(pruner, [], plans=2)
    both = _per_clip(create_model("tiny_c3d", num_classes=4), dims=("channel", "frame"))
    with pytest.raises(PlanBookError, match="dims=\\('channel',\\)"):
        plan_book(both, [torch.randn(2, 3, 8, 32, 32)])
    book = plan_book(pruner, clips, plans=2)
    assert isinstance(book, PlanBook)
    for bad in (torch.randn(2, 4, *SHAPE[1:]), torch.randn(0, *SHAPE), torch.randn(2, *SHAPE[1:])):
        with pytest.raises((DanceError, ValueError, TypeError)):
            book(bad)
    nan = torch.randn(1, *SHAPE)
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises((DanceError, ValueError), match="(?i)nan"):
        book(nan)


def test_a_wrapper_is_taken_and_fewer_distinct_decisions_give_fewer_plans():
    from lightning_dance.wrapper import DANCEWrapper

    model = create_model("tiny_c3d", num_classes=4)
    wrapper = DANCEWrapper(model, budget=0.5, dims=("channel",), policy="threshold").eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    book = plan_book(wrapper, [clip, clip], plans=8)  # an untrained controller: one decision
    assert len(book.networks) == len({*_decisions(wrapper.pruner, clip)}) == 1
    with torch.no_grad():
        torch.testing.assert_close(book(clip), wrapper(clip), atol=1e-4, rtol=1e-4)


def test_the_accelerated_form_computes_the_same_on_the_fast_kernels_with_norms_folded():
    from torch.profiler import profile

    pruner = _r2plus1d(seed=4)
    clips = [torch.randn(4, *SHAPE)]
    book = plan_book(pruner, clips, plans=2)
    clip = clips[0][:1]
    want = book(clip)
    with book.accelerated(), profile() as prof:
        got = book(clip)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::slow_conv3d_forward" not in ops
    plain = count_batch_norms(book, clip)
    with book.accelerated():
        folded = count_batch_norms(book, clip)
    assert folded < plain


def count_batch_norms(book: PlanBook, clip: torch.Tensor) -> int:
    from torch.profiler import profile

    with profile() as prof:
        book(clip)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::native_batch_norm")


def test_a_book_stays_in_eval_mode_and_survives_a_save_and_reload(tmp_path):
    pruner = _r2plus1d(seed=5)
    clips = [torch.randn(4, *SHAPE)]
    book = plan_book(pruner, clips, plans=2)
    want = book(clips[0])
    book.train()
    assert not book.training and not book.pruner.training
    assert not any(m.training for m in book.modules())
    torch.save(book, tmp_path / "book.pt")
    again = torch.load(tmp_path / "book.pt", weights_only=False)
    torch.testing.assert_close(again(clips[0]), want)
    assert torch.equal(again.last_plans, book.last_plans)


def test_the_compiled_form_runs_frozen_graphs_and_computes_the_same(tmp_path):
    from torch.profiler import profile

    pruner = _r2plus1d(seed=4)
    clips = [torch.randn(4, *SHAPE)]
    book = plan_book(pruner, clips, plans=2)
    assert len(book.networks) == 2
    want, plans = [], []
    for i in range(4):  # eager
        want.append(book(clips[0][i : i + 1]))
        plans.append(book.last_plans)
    plans = torch.cat(plans)
    assert len(set(plans.tolist())) == 2  # both plans run below
    with book.compiled(clips[0][:1]):  # compiled once, here
        for i in range(4):
            clip = clips[0][i : i + 1]
            with profile() as prof:
                got = book(clip)
            torch.testing.assert_close(got, want[i], atol=1e-4, rtol=1e-4)
            assert book.last_plans == plans[i]
            ops = {e.key for e in prof.key_averages()}
            # the graphs ran: inductor's fused oneDNN convs, no eager conv or BatchNorm
            assert not ops & {"aten::mkldnn_convolution", "aten::native_batch_norm"}, ops
            assert any("convolution_pointwise" in op for op in ops), ops
        # another shape runs eager, and is still right; a save drops the graphs
        torch.testing.assert_close(book(clips[0]), torch.cat(want), atol=1e-4, rtol=1e-4)
        torch.save(book, tmp_path / "book.pt")
    assert book._graphs is None
    again = torch.load(tmp_path / "book.pt", weights_only=False)
    torch.testing.assert_close(again(clips[0]), book(clips[0]))
