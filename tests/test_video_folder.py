"""VideoFolderDataModule on tiny videos written with PyAV into tmp_path.

References are independent of the module: a plain sequential PyAV decode of every frame, frame
numbers written into the videos as grey levels, and constant-colour videos whose normalized
value is known in closed form.
"""

from __future__ import annotations

import gc
import random
import re
import warnings
import weakref
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from lightning_dance.data import video_folder as vf
from lightning_dance.data.transforms import ClipTransform
from lightning_dance.data.video_folder import (
    VideoDecodeError,
    VideoFolderDataModule,
    VideoFolderDataset,
    VideoReader,
    split_by_class,
)

CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
COLOURS = {"blue": (40, 60, 200), "green": (50, 190, 70), "red": (210, 50, 40)}
LEVEL0, LEVEL_STEP = 8, 12  # frame k of a "counter" video is grey level 8 + 12 k


def write_video(path: Path, frames: np.ndarray, codec: str = CODEC, rate: int = 25) -> Path:
    """Encode uint8 frames [T, H, W, 3] with a keyframe every 4 frames (so reads must seek)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 4
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def counter_frames(n: int, size: int = 32) -> np.ndarray:
    levels = LEVEL0 + LEVEL_STEP * np.arange(n, dtype=np.int64)
    assert levels.max() <= 255
    return np.broadcast_to(levels[:, None, None, None], (n, size, size, 3)).astype(np.uint8)


def colour_frames(colour: tuple[int, int, int], n: int = 12, size: int = 32) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (n, size, size, 3)).copy()


def textured_frames(n: int, seed: int, size: int = 32) -> np.ndarray:
    """A random 4x4-block texture scrolling one block per frame (distinct, compressible frames)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    return np.stack([np.roll(base, 4 * k, axis=1) for k in range(n)])


def frame_numbers(clip: torch.Tensor, mean: float = 0.45, std: float = 0.225) -> list[int]:
    """Recover the source frame numbers of a normalized counter clip [3, T, H, W]."""
    grey = (clip * std + mean).mean(dim=(0, 2, 3)) * 255
    return [round((float(g) - LEVEL0) / LEVEL_STEP) for g in grey]


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory) -> Path:
    """3 classes x 5 constant-colour videos (12 frames, 32x32); brightness varies per video."""
    root = tmp_path_factory.mktemp("colours")
    for name, colour in COLOURS.items():
        for i in range(5):
            shade = tuple(min(255, c + 6 * i) for c in colour)
            write_video(root / name / f"v_{name}_g{i // 2:02d}_c{i:02d}.mp4", colour_frames(shade))
    return root


def small_dm(root, **kw) -> VideoFolderDataModule:
    base = dict(frames=4, frame_stride=2, short_side=32, crop_size=32, batch_size=4, seed=0)
    return VideoFolderDataModule(root, **(base | kw))


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("mpeg4", "avi"), ("libvpx", "webm")])
def test_reader_matches_sequential_decode(tmp_path, codec, ext):
    path = write_video(tmp_path / f"v.{ext}", textured_frames(30, seed=1), codec=codec)
    with av.open(str(path)) as c:
        reference = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    n = len(reference)
    rng = random.Random(0)
    for _ in range(12):
        indices = rng.sample(range(n + 6), rng.randint(1, 6))  # unsorted, some past the end
        with VideoReader(path) as reader:
            assert reader.num_frames == n
            got = reader.read(indices).numpy()
        expected = reference[[min(i, n - 1) for i in indices]]
        np.testing.assert_array_equal(got, expected)


def test_reader_seeks_instead_of_decoding_everything(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.mp4", textured_frames(48, seed=2))
    decoded = []
    original = VideoReader._index
    monkeypatch.setattr(
        VideoReader, "_index", lambda self, f, pos: decoded.append(pos) or original(self, f, pos)
    )
    with VideoReader(path) as reader:
        reader.read([40, 42])
    assert 0 < len(decoded) <= 8, f"decoded {len(decoded)} of 48 frames to read 2"


# ------------------------------------------------------------------------------ samples


@pytest.mark.parametrize(
    "mean,std",
    [((0.45, 0.45, 0.45), (0.225, 0.225, 0.225)), ((0.5, 0.4, 0.3), (0.15, 0.3, 0.45))],
)
def test_shapes_labels_and_normalization(colour_root, mean, std):
    dm = small_dm(colour_root, val_fraction=0.4, crop_size=24, short_side=28, mean=mean, std=std)
    assert dm.classes == sorted(COLOURS) and dm.num_classes == 3
    dm.setup("fit")
    for dataset in (dm.train_dataset, dm.val_dataset):
        for i in range(len(dataset)):
            clip, label = dataset[i]
            assert clip.shape == (3, 4, 24, 24) and clip.dtype == torch.float32
            assert label.dtype == torch.int64 and label.ndim == 0
            path = Path(dataset.samples[i][0])
            assert dm.classes[int(label)] == path.parent.name
            shade = int(re.search(r"_c(\d+)", path.name).group(1))
            rgb = torch.tensor([min(255, c + 6 * shade) for c in COLOURS[path.parent.name]])
            expected = (rgb / 255 - torch.tensor(mean)) / torch.tensor(std)
            # yuv420 round trip: a few grey levels of error
            tol = 5 / 255 / min(std)
            torch.testing.assert_close(clip.mean(dim=(1, 2, 3)), expected, atol=tol, rtol=0)
            assert float((clip - expected.view(3, 1, 1, 1)).abs().max()) < 2 * tol


@pytest.mark.parametrize("frames,stride", [(4, 3), (5, 2), (3, 1)])
def test_eval_clip_is_centred_strided_and_deterministic(tmp_path, frames, stride):
    n = 20
    write_video(tmp_path / "root" / "a" / "x.mp4", counter_frames(n))
    write_video(tmp_path / "root" / "b" / "y.mp4", counter_frames(n))
    dm = small_dm(tmp_path / "root", frames=frames, frame_stride=stride, val_fraction=0.0)
    dm.setup("fit")
    eval_ds = VideoFolderDataset(
        dm.train_dataset.samples, dm.classes, frames, stride, transform=dm.transform
    )
    clip = eval_ds[0][0]
    got = frame_numbers(clip)
    assert np.diff(got).tolist() == [stride] * (frames - 1)
    # centred: the clip's middle is within half a frame of the video's middle
    assert abs((got[0] + got[-1]) / 2 - (n - 1) / 2) <= 0.5
    torch.testing.assert_close(eval_ds[0][0], clip, rtol=0, atol=0)


def test_train_clips_random_but_reproducible(tmp_path):
    n, frames, stride = 20, 4, 2
    for name in ("a", "b"):
        write_video(tmp_path / "root" / name / "x.mp4", counter_frames(n))
    dm = small_dm(tmp_path / "root", frames=frames, frame_stride=stride, val_fraction=0.0)
    ds = dm.train_dataset
    starts = set()
    for key in range(12):
        got = frame_numbers(ds[(0, key)][0])
        assert np.diff(got).tolist() == [stride] * (frames - 1)
        assert 0 <= got[0] and got[-1] <= n - 1
        starts.add(got[0])
        torch.testing.assert_close(ds[(0, key)][0], ds[(0, key)][0], rtol=0, atol=0)
    assert len(starts) >= 4, starts


@pytest.mark.parametrize("stride,expected", [(1, [0, 1, 2, 3, 4, 5, 5, 5]), (2, [0, 2, 4, 5, 5])])
def test_short_video_padded_with_last_frame(tmp_path, stride, expected):
    path = write_video(tmp_path / "short.mp4", counter_frames(6))
    transform = ClipTransform(short_side=32, crop_size=32)
    ds = VideoFolderDataset([(path, 0)], ["a"], len(expected), stride, transform=transform)
    assert frame_numbers(ds[0][0]) == expected
    ds.train = True
    assert frame_numbers(ds[(0, 123)][0]) == expected  # no room to move: start 0


def test_clip_duration_spreads_frames_over_seconds(tmp_path):
    path = write_video(tmp_path / "v.mp4", counter_frames(20), rate=25)
    ds = VideoFolderDataset(
        [(path, 0)], ["a"], frames=4, clip_duration=0.58, transform=ClipTransform(32, 32)
    )
    # frames 0.145 s apart at 25 fps: 3.625 frames -> nearest frames 0, 4, 7, 11 after the start
    assert np.diff(frame_numbers(ds[0][0])).tolist() == [4, 3, 4]


# ------------------------------------------------------------------------------ transforms


def test_crop_is_a_window_and_flip_mirrors():
    h, w, ch, cw = 20, 28, 12, 16
    values = torch.arange(h * w * 3, dtype=torch.int64).view(h, w, 3) % 251
    frames = values.to(torch.uint8).expand(2, h, w, 3).contiguous()
    source = frames.permute(3, 0, 1, 2).float() / 255  # [3, T, H, W]; h is the short side

    def locate(out: torch.Tensor) -> list[tuple[int, int, bool]]:
        windows = [
            (top, left, flip)
            for top in range(h - ch + 1)
            for left in range(w - cw + 1)
            for flip in (False, True)
        ]
        return [
            (top, left, flip)
            for top, left, flip in windows
            if torch.allclose(
                out,
                source[..., top : top + ch, left : left + cw].flip(-1)
                if flip
                else source[..., top : top + ch, left : left + cw],
                atol=1e-6,
                rtol=0,
            )
        ]

    plain = dict(short_side=h, crop_size=(ch, cw), mean=(0, 0, 0), std=(1, 1, 1))
    t = ClipTransform(**plain)
    assert locate(t(frames)) == [((h - ch) // 2, (w - cw) // 2, False)]  # eval: centre
    found = [locate(t(frames, torch.Generator().manual_seed(seed))) for seed in range(24)]
    assert all(len(m) == 1 for m in found)
    flips = sum(m[0][2] for m in found)
    assert 4 <= flips <= 20 and len({m[0][:2] for m in found}) > 10
    no_flip = ClipTransform(**plain, horizontal_flip=False)
    found = [locate(no_flip(frames, torch.Generator().manual_seed(seed))) for seed in range(8)]
    assert all(len(m) == 1 and not m[0][2] for m in found)


def test_resize_short_side_keeps_aspect_and_value():
    frames = torch.full((3, 24, 48, 3), 160, dtype=torch.uint8)
    out = ClipTransform(short_side=12, crop_size=12)(frames)
    assert out.shape == (3, 3, 12, 12)
    torch.testing.assert_close(out, torch.full_like(out, (160 / 255 - 0.45) / 0.225))
    assert ClipTransform(short_side=12, crop_size=12).resized_hw(24, 48) == (12, 24)
    assert ClipTransform(short_side=8, crop_size=(8, 20)).resized_hw(16, 16) == (20, 20)


# ------------------------------------------------------------------------------ splits


def _fake_samples(per_class: int, classes: int, groups: int = 0) -> list[tuple[str, int]]:
    return [
        (f"/d/c{c}/v_c{c}_g{(i % groups) if groups else i:02d}_c{i:02d}.mp4", c)
        for c in range(classes)
        for i in range(per_class)
    ]


def test_split_by_class_disjoint_stratified_seeded():
    samples, names = _fake_samples(10, 3), ["c0", "c1", "c2"]
    train, val, test = split_by_class(samples, names, [0.2, 0.3], seed=5)
    paths = [set(p for p, _ in part) for part in (train, val, test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert set().union(*paths) == {p for p, _ in samples}
    for c in range(3):
        assert [sum(y == c for _, y in part) for part in (train, val, test)] == [5, 2, 3]
    assert split_by_class(samples, names, [0.2, 0.3], seed=5) == [train, val, test]
    assert split_by_class(samples, names, [0.2, 0.3], seed=6)[1] != val
    # one class's split does not depend on the other classes
    alone = split_by_class([s for s in samples if s[1] == 1], names, [0.2, 0.3], seed=5)
    assert alone[1] == [s for s in val if s[1] == 1]


def test_split_keeps_groups_together():
    samples, names = _fake_samples(12, 2, groups=4), ["c0", "c1"]
    train, val = split_by_class(samples, names, [0.25], seed=0, group_pattern=r"_g(\d+)_")

    def groups(part):
        return {(y, re.search(r"_g(\d+)_", p).group(1)) for p, y in part}

    assert not groups(train) & groups(val)
    assert [sum(y == c for _, y in val) for c in (0, 1)] == [3, 3]  # 1 group of 3 per class


def test_split_too_small_class():
    with pytest.raises(ValueError, match="'c0' has 2 video group"):
        split_by_class(_fake_samples(2, 1), ["c0"], [0.4, 0.4])


def test_datamodule_split_disjoint_and_deterministic(colour_root):
    dm = small_dm(colour_root, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    parts = [{p for p, _ in dm.datasets[s].samples} for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [9, 3, 3]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = small_dm(colour_root, val_fraction=0.2, test_fraction=0.2)
    again.setup()
    assert again.val_dataset.samples == dm.val_dataset.samples


def test_explicit_dirs_and_split_lists(tmp_path, colour_root):
    for split, n in (("train", 2), ("val", 1)):
        for name in ("blue", "red"):
            for i in range(n):
                write_video(tmp_path / split / name / f"{i}.mp4", colour_frames(COLOURS[name], 6))
    dm = VideoFolderDataModule(train_dir=tmp_path / "train", val_dir=tmp_path / "val", frames=2)
    dm.setup("fit")
    assert dm.classes == ["blue", "red"]
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    assert sorted(y for _, y in dm.val_dataset.samples) == [0, 1]

    # UCF101-style lists: "<class>/<file> <1-based label>", CRLF line ends
    blue = sorted(p.name for p in (colour_root / "blue").iterdir())
    red = sorted(p.name for p in (colour_root / "red").iterdir())
    train_list = tmp_path / "trainlist.txt"
    train_list.write_text("".join(f"blue/{f} 1\r\n" for f in blue[:3]) + f"red/{red[0]} 3\r\n")
    test_list = tmp_path / "testlist.txt"
    test_list.write_text(f"blue/{blue[4]}\n\n# comment\nred/{red[4]}\n")
    dm = VideoFolderDataModule(
        colour_root, train_list=train_list, test_list=test_list, val_fraction=0.0, frames=2
    )
    dm.setup()
    assert [Path(p).name for p, _ in dm.test_dataset.samples] == [blue[4], red[4]]
    assert [y for _, y in dm.test_dataset.samples] == [0, 2]
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 0


def test_class_order_from_class_list(tmp_path, colour_root):
    # UCF101's classInd.txt orders case-insensitively: not Python's sorted()
    ucf = tmp_path / "classInd.txt"
    ucf.write_text("2 HammerThrow\r\n1 Hammering\r\n3 JumpingJack\r\n4 JumpRope\r\n")
    names = vf.read_class_list(ucf)
    assert names == ["Hammering", "HammerThrow", "JumpingJack", "JumpRope"] != sorted(names)

    order = tmp_path / "order.txt"
    order.write_text("red\nblue\ngreen\n")
    dm = small_dm(colour_root, classes=order, val_fraction=0.0)
    assert dm.classes == ["red", "blue", "green"]
    for path, label in dm.train_dataset.samples:
        assert dm.classes[label] == Path(path).parent.name
    clip, label = dm.train_dataset[0]  # a red video, label 0
    assert int(label) == 0 and clip[0].mean() > clip[2].mean()
    assert small_dm(colour_root, classes=["green", "blue", "red"]).classes[0] == "green"
    with pytest.raises(
        ValueError, match=r"folders not listed \['green'\].*without a folder \['pink'\]"
    ):
        _ = small_dm(colour_root, classes=["red", "blue", "pink"]).classes


# ------------------------------------------------------------------------------ bad input


def _write_tree(root: Path, spec: dict[str, int]) -> None:
    for name, count in spec.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            write_video(root / name / f"{i}.mp4", colour_frames((90, 90, 90), 4, 16))


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda r: None, FileNotFoundError, "does not exist"),
        (lambda r: r.mkdir(), FileNotFoundError, "is empty"),
        (lambda r: _write_tree(r, {"a": 1, "b": 0}), FileNotFoundError, r"b' contains no video"),
        (
            lambda r: (r.mkdir(), write_video(r / "x.mp4", colour_frames((9, 9, 9), 4, 16))),
            FileNotFoundError,
            "one folder per class",
        ),
    ],
    ids=["missing", "empty", "empty-class", "no-class-folders"],
)
def test_bad_folders(tmp_path, make, error, match):
    root = tmp_path / "root"
    make(root)
    with pytest.raises(error, match=match):
        small_dm(root).setup("fit")


def test_bad_lists_and_dirs(tmp_path, colour_root):
    bad = tmp_path / "list.txt"
    bad.write_text("blue/v_blue_g00_c00.mp4\npurple/x.mp4\n")
    with pytest.raises(ValueError, match="line 2: 'purple/x.mp4'"):
        small_dm(colour_root, train_list=bad).setup()
    missing = tmp_path / "missing.txt"
    missing.write_text("blue/v_blue_g00_c00.mp4\nblue/nope.mp4\nred/v_red_g00_c00.mp4\n")
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        small_dm(colour_root, train_list=missing).setup()
    _write_tree(tmp_path / "val", {"blue": 1, "purple": 1})
    with pytest.raises(ValueError, match=r"not training classes: \['purple'\]"):
        VideoFolderDataModule(train_dir=colour_root, val_dir=tmp_path / "val").setup()
    same = tmp_path / "same.txt"
    same.write_text("blue/v_blue_g00_c00.mp4\nred/v_red_g00_c00.mp4\n")
    with pytest.raises(ValueError, match="both the train and test"):
        small_dm(colour_root, train_list=same, test_list=same).setup()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(on_error="ignore"), "on_error"),
        (dict(val_fraction=0.6, test_fraction=0.4), "must be < 1"),
        (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
        (dict(frame_stride=2, clip_duration=1.0), "not both"),
        (dict(frame_stride=0), "frame_stride"),
        (dict(frames=0), "frames must be"),
        (dict(crop_size=64, short_side=32), "does not fit"),
        (dict(std=(0.2, 0.0, 0.2)), "std must be > 0"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_dir="x", val_list="y"), "val_dir or val_list"),
        (dict(train_dir="x"), "either root or train_dir"),
        (dict(root=None), "give root"),
        (dict(root=None, train_dir="x", test_list="t.txt"), "need root"),
    ],
)
def test_bad_arguments(kwargs, match):
    base = dict(root="somewhere", frames=4, short_side=32, crop_size=32) | kwargs
    with pytest.raises(ValueError, match=match):
        VideoFolderDataModule(base.pop("root"), **base)


# ------------------------------------------------------------------------------ unreadable files


def write_audio_only(path: Path) -> None:
    """A valid .mp4 without a video stream: PyAV opens it, the error message is ours."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, 1024 * i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(params=["garbage", "audio-only"])
def root_with_corrupt(tmp_path, request) -> tuple[Path, Path]:
    root = tmp_path / "root"
    for name in ("blue", "red"):
        for i in range(2):
            write_video(root / name / f"{i}.mp4", colour_frames(COLOURS[name], 6, 16))
    bad = root / "red" / "broken.mp4"
    if request.param == "garbage":
        bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    else:
        write_audio_only(bad)
    return root, bad


def test_corrupt_file_raises_naming_it(root_with_corrupt):
    root, bad = root_with_corrupt
    dm = small_dm(root, val_fraction=0.0, short_side=16, crop_size=16, frames=2)
    ds = dm.train_dataset
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(VideoDecodeError, match="^" + re.escape(str(bad))):
        ds[index]


def test_skip_mode_drops_with_one_warning_and_later_failures_raise(root_with_corrupt):
    root, bad = root_with_corrupt
    dm = small_dm(root, val_fraction=0.0, short_side=16, crop_size=16, frames=2, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "on_error='skip'" in str(w.message)]
    assert len(messages) == 1 and "dropped 1 unreadable" in messages[0] and str(bad) in messages[0]
    assert [p for p, _ in dm.dropped] == [str(bad)]
    assert len(dm.train_dataset) == 4 and str(bad) not in {p for p, _ in dm.train_dataset.samples}
    # a file that passed the probe and breaks afterwards is never replaced by something else
    victim = Path(dm.train_dataset.samples[0][0])
    victim.write_bytes(b"garbage" * 50)
    with pytest.raises(VideoDecodeError, match=re.escape(str(victim))):
        dm.train_dataset[0]


# ------------------------------------------------------------------------------ loaders


def test_train_batches_reproducible_and_independent_of_workers(colour_root):
    def batches(workers: int, seed: int = 0) -> list[torch.Tensor]:
        dm = small_dm(
            colour_root,
            val_fraction=0.0,
            short_side=36,
            crop_size=24,
            seed=seed,
            num_workers=workers,
        )
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        return [torch.cat([x.flatten(), y.float()]) for x, y in loader]

    first = batches(0)
    assert len(first) == 4  # 15 videos, batch 4
    for a, b in zip(first, batches(1), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(0, seed=1), strict=True))


def test_sampler_epochs_and_distributed_sharding():
    sampler = vf._EpochKeyedSampler(10, seed=0)
    epoch0, epoch1 = list(sampler), list(sampler)  # moves to the next epoch by itself
    assert sorted(i for i, _ in epoch0) == list(range(10)) and epoch0 != epoch1
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    # one sampler per process, as under DDP; Lightning calls set_epoch on the wrapper
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            wrapper = DistributedSamplerWrapper(
                vf._EpochKeyedSampler(10, 0), num_replicas=2, rank=rank
            )
            wrapper.set_epoch(epoch)
            shards.append(list(wrapper))
        assert sorted(i for shard in shards for i, _ in shard) == list(range(10))
        assert {key for shard in shards for _, key in shard} == {
            key for _, key in (epoch0, epoch1)[epoch]
        }


def test_datamodule_does_not_keep_callers_locals_alive(colour_root):
    """A caller's DataLoader (with live workers) must die when the caller returns, not at a GC."""

    class Marker:
        pass

    def make():
        dm = small_dm(colour_root, frames=3)
        marker = Marker()
        return weakref.ref(marker), dict(dm.hparams)

    gc.disable()
    try:
        ref, hparams = make()
        assert ref() is None
    finally:
        gc.enable()
    assert hparams["frames"] == 3 and hparams["root"] == colour_root and hparams["seed"] == 0


class TinyC3D(L.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(4, 8, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(8, num_classes),
        )

    def training_step(self, batch, batch_idx):
        clip, label = batch
        assert clip.shape[1:] == (3, 4, 24, 24) and label.dtype == torch.int64
        loss = F.cross_entropy(self.net(clip), label)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        clip, label = batch
        self.log("val_loss", F.cross_entropy(self.net(clip), label))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit(colour_root, tmp_path):
    dm = small_dm(colour_root, val_fraction=0.4, short_side=28, crop_size=24)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyC3D(dm.num_classes), dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_corrupt_file_in_worker_names_it(tmp_path):
    # Last in the file on purpose: a DataLoader whose worker raised takes ~5 s to shut down
    # (torch's join timeout), and in this process later worker shutdowns stalled too. Only the
    # audio-only case (its message is entirely ours) runs through a worker.
    for name in ("blue", "red"):
        write_video(tmp_path / name / "ok.mp4", colour_frames(COLOURS[name], 6, 16))
    bad = tmp_path / "red" / "audio.mp4"
    write_audio_only(bad)
    dm = small_dm(tmp_path, val_fraction=0.0, short_side=16, crop_size=16, frames=2, num_workers=1)
    batches = iter(dm.train_dataloader())
    with pytest.raises(VideoDecodeError) as info:
        for _ in batches:
            pass
    message = str(info.value)
    del info, batches  # stop the worker now, not when some later test collects garbage
    gc.collect()
    assert "DataLoader worker" in message
    assert f"{bad}: cannot decode this video (ValueError: the file has no video stream)" in message
