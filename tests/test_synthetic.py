import pytest
import torch

from lightning_dance.data import MOTIONS, SyntheticVideoConfig, SyntheticVideoDataModule
from lightning_dance.data.synthetic import MEAN, STD


def _dm(**kw):
    base = dict(num_classes=12, frames=8, size=32, train_size=48, val_size=24, test_size=24)
    return SyntheticVideoDataModule(**(base | kw))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shapes_dtype_range(split):
    ds = _dm().datasets[split]
    clip, label = ds[3]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 12
    pixels = clip * STD + MEAN  # back to [0, 1]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.std() > 0.02  # not a blank clip


def test_deterministic_by_seed_and_independent_of_access_order():
    a, b = _dm(seed=7).train_dataset, _dm(seed=7).train_dataset
    order = [5, 0, 17, 5]
    for i in order:
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)
    assert not torch.equal(a[5][0], _dm(seed=8).train_dataset[5][0])
    assert not torch.equal(a[5][0], a[6][0])


def test_splits_differ():
    dm = _dm()
    assert not torch.equal(dm.train_dataset[0][0], dm.val_dataset[0][0])


@pytest.mark.parametrize("num_classes,n", [(10, 100), (7, 50), (12, 13)])
def test_label_balance(num_classes, n):
    ds = _dm(num_classes=num_classes, train_size=n).train_dataset
    counts = torch.bincount(torch.stack([ds[i][1] for i in range(n)]), minlength=num_classes)
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == n


def _trajectory(label_name, **cfg):
    dm = _dm(partial_visibility=0.0, **cfg)
    ds = dm.train_dataset
    for i in range(len(ds)):
        if MOTIONS[ds.label(i)] == label_name:
            return ds.render(i)[2]
    raise AssertionError(label_name)


@pytest.mark.parametrize(
    "motion,key,axis,sign",
    [
        ("right", "center", 0, 1),
        ("left", "center", 0, -1),
        ("down", "center", 1, 1),
        ("up", "center", 1, -1),
        ("grow", "axis", None, 1),
        ("shrink", "axis", None, -1),
        ("rotate_cw", "angle", None, 1),
        ("rotate_ccw", "angle", None, -1),
    ],
)
def test_motions_need_time(motion, key, axis, sign):
    """The class is a direction of change over time: monotone trajectories with the right sign."""
    info = _trajectory(motion)
    track = info[key] if axis is None else info[key][:, axis]
    steps = torch.diff(track)
    assert (sign * steps > 0).all(), (motion, track)


def test_blink_turns_the_target_off_and_on():
    info = _trajectory("blink")
    presence = info["presence"]
    assert presence.min() == 0 and presence.max() == 1


def test_clips_vary_like_video():
    ds = _dm(train_size=200, partial_visibility=0.5).train_dataset
    infos = [ds.render(i)[2] for i in range(200)]
    partial = sum(bool((~info["visible"]).any()) for info in infos) / 200
    assert 0.3 < partial < 0.7  # about half the clips lose the target for part of the time
    sizes = torch.stack([info["object_size"] for info in infos])
    assert sizes.max() / sizes.min() > 1.5
    assert len({int(info["num_distractors"]) for info in infos}) >= 3
    difficulty = torch.stack([info["difficulty"] for info in infos])
    assert difficulty.min() < 0.1 and difficulty.max() > 0.9


def test_target_is_drawn_where_the_trajectory_says():
    """With no noise or distractors the target changes the pixels at its centre."""
    dm = _dm(partial_visibility=0.0, noise=0.0, max_distractors=0, size=48)
    ds = dm.train_dataset
    clip, _, info = ds.render(2)  # "down"
    x, y = (info["center"][0] * 48).long().clamp(0, 47).tolist()
    x_far = (x + 24) % 48
    at_center = clip[:, 0, y, x]
    far = clip[:, 0, y, x_far]
    assert (at_center - far).abs().max() > 0.5  # contrast in normalized units


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=13), "num_classes"),
        (dict(frames=2), "frames"),
        (dict(size=8), "size"),
        (dict(noise=-1.0), "noise"),
        (dict(batch_size=0), "batch_size"),
        (dict(partial_visibility=1.5), "partial_visibility"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _dm(**kw)


def test_empty_split_and_bad_index():
    dm = _dm(val_size=0)
    with pytest.raises(ValueError, match="val split is empty"):
        dm.val_dataloader()
    with pytest.raises(IndexError):
        dm.train_dataset.render(10_000)


def test_dataloader_batches():
    dm = _dm(batch_size=5)
    clip, label = next(iter(dm.train_dataloader()))
    assert clip.shape == (5, 3, 8, 32, 32) and label.shape == (5,)
    assert dm.num_classes == 12 and dm.classes == list(MOTIONS)
    assert SyntheticVideoConfig().num_classes == 10
