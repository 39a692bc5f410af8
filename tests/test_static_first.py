import lightning as L
import pytest
import torch

from lightning_dance import DANCEWrapper, VideoClassifier
from lightning_dance.data import SyntheticVideoDataModule
from lightning_dance.models import create_model
from lightning_dance.priors import magnitude_importance
from lightning_dance.static_first import StaticFirst


def _dm():
    return SyntheticVideoDataModule(num_classes=4, frames=4, size=16, train_size=8, val_size=8,
                                    test_size=8, batch_size=2)  # fmt: skip


def _wrapper(**kw):
    torch.manual_seed(0)
    args = dict(budget=0.5, policy="topk", dims=("channel",), noise_anneal=0.0,
                freeze_backbone=False)  # fmt: skip
    return DANCEWrapper(create_model("tiny_c3d", num_classes=4), **{**args, **kw})


class Watch(L.Callback):
    """Per step (after the batch): the head's input weights and the kept channels per clip."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, wrapper, outputs, batch, batch_idx):
        weight = float(wrapper.pruner.controller.channel_head.weight.detach().abs().sum())
        kept = {n: s.masks["channel"].detach().bool()
                for n, s in wrapper.last_stats.layers.items() if "channel" in s.masks}  # fmt: skip
        self.steps.append((trainer.global_step, weight, kept))


def _fit(wrapper, callbacks, steps=8, **kw):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
                        **kw)  # fmt: skip
    trainer.fit(wrapper, datamodule=_dm())
    return trainer


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_static_decisions_first_then_per_clip(policy):
    wrapper, watch = _wrapper(policy=policy), Watch()
    convs = dict(wrapper.pruner.model.named_modules())
    before = {n: magnitude_importance(convs[n]) for n in wrapper.pruner.layer_names}
    _fit(wrapper, [StaticFirst(until=0.5), watch])
    static = [s for s in watch.steps if s[0] <= 4]
    dynamic = [s for s in watch.steps if s[0] > 5]
    assert static and dynamic
    for _, weight, kept in static:
        assert weight == 0.0  # input-independent: the biases decide
        for name, masks in kept.items():
            assert (masks == masks[0]).all(), name  # the same channels for every clip
    # the first step keeps the magnitude ranking's channels (the prior, of the weights it ran)
    _, _, kept = static[0]
    for name, masks in kept.items():
        k = int(masks[0].sum())
        top = before[name].topk(k).indices.sort().values
        assert torch.equal(masks[0].nonzero().flatten(), top), name
    assert all(weight > 0.0 for _, weight, _ in dynamic)  # then the per-clip part trains
    assert all(p.requires_grad for p in wrapper.pruner.controller.parameters())


def test_resuming_does_not_apply_the_prior_twice(tmp_path, monkeypatch):
    import lightning_dance.static_first as module

    calls = []
    real = module.apply_channel_prior
    monkeypatch.setattr(
        module, "apply_channel_prior", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    wrapper = _wrapper()
    trainer = _fit(wrapper, [StaticFirst(until=0.5)], steps=2)
    assert calls == [1]
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    resumed = StaticFirst(until=0.5)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[resumed])  # fmt: skip
    trainer.fit(_wrapper(), datamodule=_dm(), ckpt_path=path)
    assert trainer.global_step == 4
    assert resumed.prepared and calls == [1]  # restored: the prior is not added again
    assert StaticFirst().state_dict()["prepared"] is False


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"noise_anneal": 0.7}, "noise_anneal=0"),
        ({"dims": ("channel", "frame")}, "pruning \\['frame', 'channel'\\]"),
        ({"policy": "threshold", "dims": ("channel", "frame"), "layer_dims": {"conv2.0": ("frame",)}},
         "pruning \\['frame', 'channel'\\]"),
        ({"policy": "width"}, "policy='width'"),
        ({"freeze_backbone": True}, "freeze_backbone=False"),
    ],
)
def test_wrong_wrapper_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        _fit(_wrapper(**kw), [StaticFirst()], steps=1)


def test_layer_dims_that_prune_channels_only_are_accepted():
    names = ["conv2.0", "conv3.0", "res.conv1.0", "res.conv2.0"]
    layer_dims = {n: ("channel",) for n in names[1:]} | {names[0]: ()}
    wrapper = _wrapper(policy="threshold", dims=("channel", "frame"), layer_dims=layer_dims)
    watch = Watch()
    _fit(wrapper, [StaticFirst(until=0.5), watch], steps=2)
    assert set(watch.steps[0][2]) == set(names[1:])  # conv2.0 prunes nothing: no channel mask
    assert watch.steps[0][1] == 0.0  # static at first


def test_bad_arguments_and_modules():
    for until in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="until must be in"):
            StaticFirst(until=until)
    with pytest.raises(ValueError, match="prior_scale"):
        StaticFirst(prior_scale=-1.0)
    with pytest.raises(TypeError, match="DANCEWrapper"):
        _fit(VideoClassifier(create_model("tiny_c3d", num_classes=4)), [StaticFirst()], steps=1)


def test_an_interrupted_fit_leaves_the_controller_trainable():
    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, wrapper, *args):
            assert not wrapper.pruner.controller.channel_head.weight.requires_grad  # static
            raise RuntimeError("stopped")

    wrapper = _wrapper()
    with pytest.raises(RuntimeError, match="stopped"):
        _fit(wrapper, [StaticFirst(until=0.5), Stop()], steps=8)
    assert all(p.requires_grad for p in wrapper.pruner.controller.parameters())
