"""Class-per-folder video files (the UCF101 / HMDB51 / Kinetics layout) as a LightningDataModule.

Layout: ``root/<class_name>/<video>.<ext>`` (sub-folders inside a class folder are searched too;
hidden folders are ignored). Class indices follow the sorted folder names (case-sensitive, like
torchvision's ``ImageFolder``) unless ``classes`` gives the order: UCF101's ``classInd.txt`` sorts
case-insensitively (``Hammering`` before ``HammerThrow``), so pass ``classes="classInd.txt"`` to
get its indices minus one.

Splits, from one of three sources per split:

- one ``root`` split into train / val / test by ``val_fraction`` / ``test_fraction``, per class
  (stratified) and deterministically by ``seed``. ``group_pattern`` keeps the videos of one group
  together (UCF101: ``r"_g(\\d+)_"``, clips cut from the same long video would otherwise leak
  between train and val);
- split list files relative to ``root`` (UCF101's ``trainlist01.txt`` / ``testlist01.txt``: the
  first token of each line is ``<class>/<file>``, a trailing label column is ignored);
- separate ``train_dir`` / ``val_dir`` / ``test_dir`` folders with the same class folders.

A split without its own dir or list is carved out of the training pool by its fraction.

Decoding uses PyAV directly (``torchvision.io.read_video`` is gone in torchvision 0.29, and
``pytorchvideo``'s PyAV path converts every decoded frame to RGB): the reader seeks to the
keyframe before the first needed frame, decodes forward only until the last needed frame, and
converts only the frames it keeps. Frame ``i`` is the frame shown at time ``i / fps`` (``fps`` =
the stream's average rate), so variable-frame-rate video is sampled uniformly in time.

Clips: ``frames`` frames ``frame_stride`` source frames apart (or spread over ``clip_duration``
seconds); random temporal position, random crop and random horizontal flip for training;
centre position and centre crop for val / test. **Videos shorter than a clip are padded by
repeating their last frame.** Training randomness comes from keys drawn by the training sampler
from ``(seed, epoch)`` in the main process, so batches are the same whatever ``num_workers``.

Example:
    >>> dm = VideoFolderDataModule(  # doctest: +SKIP
    ...     "UCF-101", classes="ucfTrainTestlist/classInd.txt",
    ...     train_list="ucfTrainTestlist/trainlist01.txt",
    ...     test_list="ucfTrainTestlist/testlist01.txt", val_fraction=0.1,
    ...     group_pattern=r"_g(\\d+)_", frames=16, frame_stride=2, batch_size=8, num_workers=4)
    >>> dm.setup("fit")  # doctest: +SKIP
    >>> clip, label = dm.train_dataset[0]  # float32 [3, 16, 112, 112], int64  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import av
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_dance.data.transforms import KINETICS_MEAN, KINETICS_STD, ClipTransform
from lightning_dance.errors import DanceError

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoDecodeError",
    "VideoReader",
    "VideoFolderDataset",
    "VideoFolderDataModule",
    "find_classes",
    "read_class_list",
    "scan_video_folder",
    "read_split_list",
    "split_by_class",
    "probe_video",
]

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4",
    ".avi",
    ".mkv",
    ".webm",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".ogv",
    ".flv",
    ".wmv",
    ".3gp",
)
_SPLITS = ("train", "val", "test")
_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
Sample = tuple[str, int]


class VideoDecodeError(DanceError, RuntimeError):
    """A video could not be opened or decoded. The message starts with the file's path."""


# --------------------------------------------------------------------------- scanning


def _extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str) or not extensions:
        raise ValueError(
            f"extensions must be a non-empty sequence like ('.mp4',), got {extensions!r}"
        )
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def find_classes(directory: str | Path) -> list[str]:
    """Sorted names of the (non-hidden) class folders in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"video folder {str(directory)!r} does not exist or is not a folder"
        )
    entries = [e for e in os.scandir(directory) if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = [e.name for e in entries if e.is_file()]
        hint = (
            f" (it holds {len(loose)} file(s) directly, e.g. {loose[0]!r}: videos must sit in one "
            "folder per class, root/<class_name>/<video>)"
            if loose
            else " (it is empty)"
        )
        raise FileNotFoundError(f"no class folders in {str(directory)!r}{hint}")
    return classes


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a file with one ``[index] name`` per line, ordered by index if given.

    UCF101's ``classInd.txt`` (``1 ApplyEyeMakeup``...) reads as its 101 names in that order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {str(path)!r} does not exist")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    try:
        keyed = [(int(r[0]) if len(r) > 1 else n, r[-1]) for n, r in enumerate(rows)]
    except ValueError as err:
        raise ValueError(
            f"class list {str(path)!r}: lines must be '[index] name' ({err})"
        ) from None
    return [name for _, name in sorted(keyed)]


def scan_video_folder(
    directory: str | Path,
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> tuple[list[str], list[Sample]]:
    """List ``(path, label)`` of the videos under ``directory/<class>/``, sorted.

    ``classes`` fixes the class order (e.g. the training folder's); every class folder found in
    ``directory`` must be one of them, and each must hold at least one video.
    """
    exts = _extensions(extensions)
    found = find_classes(directory)
    classes = list(found if classes is None else classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"{str(directory)!r} has class folders that are not training classes: {unknown[:10]}"
        )
    samples: list[Sample] = []
    for name in found:
        label = classes.index(name)
        files = []
        for dirpath, dirnames, filenames in os.walk(Path(directory) / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [
                os.path.join(dirpath, f)
                for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts
            ]
        if not files:
            raise FileNotFoundError(
                f"class folder {str(Path(directory) / name)!r} contains no video files "
                f"(looked for {', '.join(exts)})"
            )
        samples += [(f, label) for f in sorted(files)]
    return classes, samples


def read_split_list(
    list_file: str | Path, root: str | Path, classes: Sequence[str]
) -> list[Sample]:
    """Read a split list (one ``<class>/<file> [label]`` per line, relative to ``root``).

    The label comes from the class folder named in the path (a label column, like UCF101's
    1-based one, is ignored). Blank lines and lines starting with ``#`` are skipped.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {str(list_file)!r} does not exist")
    index = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel = line.split()[0].replace("\\", "/")
        name = rel.split("/")[0]
        if "/" not in rel or name not in index:
            raise ValueError(
                f"{str(list_file)!r} line {lineno}: {rel!r} is not '<class>/<file>' with one of "
                f"the class folders of {str(root)!r}"
            )
        samples.append((os.path.join(root, rel), index[name]))
    if not samples:
        raise ValueError(f"split list {str(list_file)!r} names no videos")
    return samples


def split_by_class(
    samples: Sequence[Sample],
    classes: Sequence[str],
    fractions: Sequence[float],
    seed: int = 0,
    group_pattern: str | None = None,
) -> list[list[Sample]]:
    """Split ``samples`` into ``len(fractions) + 1`` parts: the rest first, then one per fraction.

    Per class, the videos (or their groups: the first capture group of ``group_pattern`` in the
    file name, or its whole match; a name without a match is its own group) are shuffled with a
    generator seeded by ``(seed, class name)``; each held-out part takes ``round(n * fraction)``
    groups. The result depends only on the seed, the file names and the class, not on the other
    classes. Every class keeps at least one group in the first part.
    """
    pattern = re.compile(group_pattern) if group_pattern is not None else None
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[int, list[Sample]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append((path, label))
    for label, items in sorted(by_class.items()):
        groups: dict[str, list[Sample]] = {}
        for path, lab in sorted(items):
            name = os.path.basename(path)
            match = pattern.search(name) if pattern is not None else None
            key = (match.group(1) if match.groups() else match.group(0)) if match else name
            groups.setdefault(key, []).append((path, lab))
        keys = sorted(groups)
        random.Random(f"{seed}/{classes[label]}").shuffle(keys)
        counts = [int(len(keys) * f + 0.5) for f in fractions]
        if fractions and sum(counts) >= len(keys) and any(f > 0 for f in fractions):
            raise ValueError(
                f"class {classes[label]!r} has {len(keys)} video group(s): too few to hold out "
                f"fractions {list(fractions)} and keep one for training"
            )
        start = sum(counts)
        parts[0] += [s for k in keys[start:] for s in groups[k]]
        for i, n in enumerate(counts):
            begin = sum(counts[:i])
            parts[i + 1] += [s for k in keys[begin : begin + n] for s in groups[k]]
    return [sorted(p, key=lambda s: (s[1], s[0])) for p in parts]


# --------------------------------------------------------------------------- decoding


class VideoReader:
    """Frame-indexed reading of one video's first video stream with PyAV.

    ``num_frames`` comes from the container header when present, otherwise from the stream or
    container duration times the average frame rate (an estimate), otherwise by decoding
    everything once. ``read(indices)`` returns uint8 ``[len(indices), H, W, 3]`` (RGB); an index
    past the last frame gives the last frame.

    Example:
        >>> with VideoReader("clip.mp4") as r:  # doctest: +SKIP
        ...     frames = r.read([0, 2, 4, 6])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._container: av.container.InputContainer | None = None
        try:
            self._open()
            stream = self._stream
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or float(rate) <= 0:
                raise ValueError("the video stream has no frame rate")
            self.fps = float(rate)
            self._time_base = float(stream.time_base)
            self._start = stream.start_time or 0
            self.num_frames = self._count_frames()
            if self.num_frames <= 0:
                raise ValueError("the video has no frames")
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self.close()
        self._container = av.open(self.path, metadata_errors="ignore")
        if not self._container.streams.video:
            raise ValueError("the file has no video stream")
        self._stream = self._container.streams.video[0]

    def _count_frames(self) -> int:
        stream, container = self._stream, self._container
        if stream.frames > 0:
            return int(stream.frames)
        if stream.duration:
            return round(stream.duration * self._time_base * self.fps)
        if container.duration:
            return round(container.duration / av.time_base * self.fps)
        count = sum(1 for _ in container.decode(stream))
        self._open()
        return count

    def _index(self, frame: av.VideoFrame, position: int) -> int:
        if frame.pts is None:
            return position
        return round((frame.pts - self._start) * self._time_base * self.fps)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        wanted = [int(i) for i in indices]
        if not wanted or min(wanted) < 0:
            raise ValueError(
                f"indices must be a non-empty list of frame numbers >= 0, got {wanted}"
            )
        targets = sorted(set(wanted))
        arrays = None
        if targets[0] > 0:
            # seek half a frame early: the demuxer lands on the keyframe at or before that time
            seconds = max(0.0, targets[0] - 0.5) / self.fps
            try:
                self._container.seek(
                    self._start + int(seconds / self._time_base), stream=self._stream, backward=True
                )
            except av.error.FFmpegError:  # not seekable: decode from the start below
                pass
            else:
                arrays = self._collect(targets, seeked=True)
            if arrays is None:  # seek overshot or found nothing: decode from the start
                self._open()
        if arrays is None:
            arrays = self._collect(targets, seeked=False)
        by_index = dict(zip(targets, arrays, strict=True))
        return torch.from_numpy(np.stack([by_index[i] for i in wanted]))

    def _collect(self, targets: list[int], seeked: bool) -> list[np.ndarray] | None:
        """Decode forward, giving target ``t`` the last frame whose index is <= ``t``."""
        out: list[np.ndarray] = []
        cache: tuple[av.VideoFrame | None, np.ndarray | None] = (None, None)

        def rgb(frame: av.VideoFrame) -> np.ndarray:
            nonlocal cache
            if cache[0] is not frame:
                cache = (frame, frame.to_ndarray(format="rgb24"))
            return cache[1]

        prev = None
        for position, frame in enumerate(self._container.decode(self._stream)):
            if seeked and frame.pts is None:
                return None
            i = self._index(frame, position)
            if seeked and prev is None and i > targets[0]:
                return None
            while len(out) < len(targets) and targets[len(out)] < i:
                out.append(rgb(prev if prev is not None else frame))
            while len(out) < len(targets) and targets[len(out)] == i:
                out.append(rgb(frame))
            if len(out) == len(targets):
                return out
            prev = frame
        if prev is None:
            if seeked:
                return None
            raise ValueError("no frame could be decoded")
        out += [rgb(prev)] * (len(targets) - len(out))  # past the end: repeat the last frame
        return out

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_video(path: str | Path) -> tuple[int, float]:
    """Open ``path`` and decode its first frame; returns ``(num_frames, fps)`` or raises."""
    with VideoReader(path) as reader:
        reader.read([0])
        return reader.num_frames, reader.fps


def _probe_all(
    samples: Sequence[Sample], threads: int
) -> tuple[list[Sample], list[tuple[str, str]]]:
    def check(sample: Sample) -> str | None:
        try:
            probe_video(sample[0])
        except Exception as err:  # noqa: BLE001 - any failure means "unreadable"
            return f"{type(err).__name__}: {err}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(check, samples))
    kept = [s for s, r in zip(samples, reasons, strict=True) if r is None]
    dropped = [(s[0], r) for s, r in zip(samples, reasons, strict=True) if r is not None]
    return kept, dropped


# --------------------------------------------------------------------------- dataset


class _EpochKeyedSampler(Sampler[tuple[int, int]]):
    """Random order plus one random key per item, both drawn from ``(seed, epoch)``.

    The keys travel with the indices to the workers, so the random clip position, crop and flip
    of an item do not depend on the number of workers. ``set_epoch`` (called by Lightning each
    epoch) picks the epoch; without it every iteration moves to the next epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        self.epoch += 1
        order = torch.randperm(self.size, generator=g).tolist()
        keys = torch.randint(2**62, (self.size,), generator=g).tolist()
        return iter(list(zip(order, keys, strict=True)))


class VideoFolderDataset(Dataset):
    """Clips from a list of ``(path, label)`` videos; item: ``(clip [3,T,h,w] float32, label int64)``.

    Args:
        samples: ``(path, label)`` pairs, e.g. from :func:`scan_video_folder`.
        classes: class names, index = label.
        frames: frames per clip.
        frame_stride: source frames between two clip frames (default 2; not with clip_duration).
        clip_duration: seconds the clip spans instead (frames ``clip_duration / frames`` s apart).
        transform: resize / crop / flip / normalize (default :class:`ClipTransform`).
        train: random temporal position, crop and flip (else centre, deterministic).

    An item index may be ``i`` or ``(i, key)``: the key seeds the training randomness (the
    DataModule's sampler provides it); a plain ``i`` in training mode draws the key from torch's
    global generator. A file that fails to decode raises :class:`VideoDecodeError` naming it.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        classes: Sequence[str],
        frames: int = 16,
        frame_stride: int | None = None,
        clip_duration: float | None = None,
        transform: ClipTransform | None = None,
        train: bool = False,
    ) -> None:
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        if clip_duration is not None and frame_stride is not None:
            raise ValueError("give frame_stride or clip_duration, not both")
        if clip_duration is not None and not clip_duration > 0:
            raise ValueError(f"clip_duration must be > 0 seconds, got {clip_duration!r}")
        if frame_stride is None and clip_duration is None:
            frame_stride = 2
        if frame_stride is not None and (not isinstance(frame_stride, int) or frame_stride < 1):
            raise ValueError(f"frame_stride must be a positive int, got {frame_stride!r}")
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.classes = list(classes)
        bad = [y for _, y in self.samples if not 0 <= y < len(self.classes)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} outside [0, {len(self.classes)})")
        self.frames, self.frame_stride, self.clip_duration = frames, frame_stride, clip_duration
        self.transform = transform if transform is not None else ClipTransform()
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def clip_indices(
        self, num_frames: int, fps: float, generator: torch.Generator | None = None
    ) -> list[int]:
        """Source frame numbers of a clip: random start with a generator, else centred.

        Numbers past ``num_frames - 1`` (short videos) read as the last frame.
        """
        if self.clip_duration is not None:
            step = self.clip_duration * fps / self.frames
        else:
            step = float(self.frame_stride)
        max_start = max(0, math.floor(num_frames - 1 - (self.frames - 1) * step))
        if generator is None:
            start = max_start // 2
        else:
            start = int(torch.randint(max_start + 1, (1,), generator=generator))
        return [start + round(k * step) for k in range(self.frames)]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, key = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        generator = None
        if self.train:
            if key is None:
                key = int(torch.randint(2**62, (1,)))
            generator = torch.Generator().manual_seed(int(key))
        try:
            with VideoReader(path) as reader:
                frames = reader.read(self.clip_indices(reader.num_frames, reader.fps, generator))
        except Exception as err:
            raise VideoDecodeError(
                f"{path}: cannot decode this video ({type(err).__name__}: {err})"
            ) from err
        return self.transform(frames, generator), torch.tensor(label, dtype=torch.long)


# --------------------------------------------------------------------------- datamodule


class VideoFolderDataModule(L.LightningDataModule):
    """Video classification from class-per-folder video files (see the module docstring).

    Args:
        root: folder of class folders; also the base of the ``*_list`` files' paths.
        classes: class order (label = position): names, or a class list file such as UCF101's
            ``classInd.txt`` (see :func:`read_class_list`). Default: sorted folder names. Every
            class folder must be listed and every listed class must have a folder.
        train_dir, val_dir, test_dir: separate class-per-folder trees (``train_dir`` replaces
            ``root`` as the training pool and the source of the class names).
        train_list, val_list, test_list: split list files with paths relative to ``root``.
        val_fraction, test_fraction: share of each class's training pool held out for a split
            that has no dir or list of its own (ignored for one that has).
        group_pattern: regex on file names; videos with the same match stay in the same split.
        frames, frame_stride, clip_duration: clip sampling (see :class:`VideoFolderDataset`).
        short_side, crop_size, horizontal_flip, mean, std: see :class:`ClipTransform`.
        batch_size, num_workers, pin_memory: DataLoader settings.
        persistent_workers: keep the workers between epochs (when ``num_workers > 0``).
        seed: fixes the split and every training clip position / crop / flip.
        on_error: ``"raise"``: a file that fails to decode raises :class:`VideoDecodeError`
            naming it. ``"skip"``: at setup every file is opened and its first frame decoded
            (threads, ``max(num_workers, 1)``); unreadable ones are dropped with one warning
            listing them (kept in ``dropped``). A file that passes the probe but fails later
            still raises naming it: nothing is silently replaced.
        extensions: file name endings counted as videos.

    ``classes`` / ``num_classes`` only list folders, so they work before ``setup`` (e.g. to build
    the model). ``train_dataset`` / ``val_dataset`` / ``test_dataset`` run the matching ``setup``
    stage on first access; ``dropped`` lists ``(path, reason)`` of the videos skipped so far.
    An empty val split gives an empty val loader (Lightning then skips validation with a
    warning); an empty train or test split raises when its loader is asked for.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        classes: Sequence[str] | str | Path | None = None,
        train_dir: str | Path | None = None,
        val_dir: str | Path | None = None,
        test_dir: str | Path | None = None,
        train_list: str | Path | None = None,
        val_list: str | Path | None = None,
        test_list: str | Path | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        group_pattern: str | None = None,
        frames: int = 16,
        frame_stride: int | None = None,
        clip_duration: float | None = None,
        short_side: int = 128,
        crop_size: int | tuple[int, int] = 112,
        horizontal_flip: bool = True,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        seed: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
    ) -> None:
        super().__init__()
        # An explicit frame: the no-argument form makes a reference cycle that keeps the caller's
        # frame (and locals such as DataLoaders with live workers) alive until a GC pass.
        self.save_hyperparameters(frame=sys._getframe())
        dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        lists = {"train": train_list, "val": val_list, "test": test_list}
        if root is None and train_dir is None:
            raise ValueError("give root (a folder of class folders) or train_dir")
        if root is not None and train_dir is not None and not any(lists.values()):
            raise ValueError(
                "give either root or train_dir: root is only needed with train_dir to resolve "
                "split list files"
            )
        for split in _SPLITS:
            if dirs[split] is not None and lists[split] is not None:
                raise ValueError(f"give {split}_dir or {split}_list, not both")
        if any(lists.values()) and root is None:
            raise ValueError("split list files need root: their paths are relative to it")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 (training needs videos)")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if group_pattern is not None:
            re.compile(group_pattern)
        self.root = None if root is None else Path(root)
        self.dirs = {k: None if v is None else Path(v) for k, v in dirs.items()}
        self.lists = {k: None if v is None else Path(v) for k, v in lists.items()}
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.group_pattern, self.seed, self.on_error = group_pattern, seed, on_error
        self.extensions = _extensions(extensions)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.persistent_workers = persistent_workers
        self.transform = ClipTransform(short_side, crop_size, horizontal_flip, mean, std)
        # validates frames / frame_stride / clip_duration now rather than at setup
        self._clip_args = dict(
            frames=frames, frame_stride=frame_stride, clip_duration=clip_duration
        )
        VideoFolderDataset([], [], **self._clip_args)
        if classes is not None and not isinstance(classes, (str, Path)):
            classes = [str(c) for c in classes]
            if len(set(classes)) != len(classes) or not classes:
                raise ValueError(f"classes must be distinct names, got {classes}")
        self._class_spec = classes
        self._classes: list[str] | None = None
        self._samples: dict[str, list[Sample]] | None = None
        self._probed: set[str] = set()
        self.datasets: dict[str, VideoFolderDataset] = {}
        self.dropped: list[tuple[str, str]] = []

    # ---- classes and splits
    @property
    def classes(self) -> list[str]:
        """Class names, label order: ``classes`` if given, else the sorted folder names."""
        if self._classes is None:
            source = self.dirs["train"] if self.dirs["train"] is not None else self.root
            folders = find_classes(source)
            spec = self._class_spec
            if spec is None:
                self._classes = folders
            else:
                names = read_class_list(spec) if isinstance(spec, (str, Path)) else list(spec)
                if len(set(names)) != len(names):
                    raise ValueError(f"class list {str(spec)!r} repeats names")
                unlisted, missing = (
                    sorted(set(folders) - set(names)),
                    sorted(set(names) - set(folders)),
                )
                if unlisted or missing:
                    raise ValueError(
                        f"classes do not match the class folders of {str(source)!r}: folders not "
                        f"listed {unlisted[:10]}, listed classes without a folder {missing[:10]}"
                    )
                self._classes = names
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _pool(self, split: str) -> list[Sample] | None:
        if self.dirs[split] is not None:
            return scan_video_folder(self.dirs[split], self.classes, self.extensions)[1]
        if self.lists[split] is not None:
            return read_split_list(self.lists[split], self.root, self.classes)
        if split == "train":
            return scan_video_folder(self.root, self.classes, self.extensions)[1]
        return None

    def _build_splits(self) -> dict[str, list[Sample]]:
        own = {split: self._pool(split) for split in _SPLITS}
        carved = [s for s in ("val", "test") if own[s] is None]
        fractions = [self.fractions[s] for s in carved]
        parts = split_by_class(own["train"], self.classes, fractions, self.seed, self.group_pattern)
        samples = {"train": parts[0], **dict(zip(carved, parts[1:], strict=True))}
        samples |= {s: own[s] for s in ("val", "test") if own[s] is not None}
        train_paths = {os.path.realpath(p) for p, _ in samples["train"]}
        for split in ("val", "test"):
            shared = [p for p, _ in samples[split] if os.path.realpath(p) in train_paths]
            if shared:
                raise ValueError(
                    f"{len(shared)} video(s) are in both the train and {split} splits, e.g. "
                    f"{shared[0]!r}: check the split lists / folders"
                )
        if self.on_error == "raise":
            missing = [p for s in samples.values() for p, _ in s if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} listed video(s) do not exist, e.g. {missing[:5]}"
                )
        return samples

    def setup(self, stage: str | None = None) -> None:
        if self._samples is None:
            self._samples = self._build_splits()
        needed = _STAGE_SPLITS.get(stage, _SPLITS) if stage else _SPLITS
        if self.on_error == "skip":
            todo = [s for s in needed if s not in self._probed]
            dropped: list[tuple[str, str]] = []
            for split in todo:
                kept, lost = _probe_all(self._samples[split], self.num_workers)
                self._samples[split], self._probed = kept, self._probed | {split}
                dropped += lost
                self.datasets.pop(split, None)
            if dropped:
                self.dropped += dropped
                shown = "\n".join(f"  {p}: {r}" for p, r in dropped[:50])
                more = f"\n  ... and {len(dropped) - 50} more" if len(dropped) > 50 else ""
                empty = ""
                if "train" in todo:
                    left = {y for _, y in self._samples["train"]}
                    lost = [c for i, c in enumerate(self.classes) if i not in left]
                    empty = f"\nclasses left without training videos: {lost}" if lost else ""
                rank_zero_warn(
                    f"on_error='skip': dropped {len(dropped)} unreadable video(s):\n{shown}{more}"
                    f"{empty}"
                )
        for split in _SPLITS:
            if split not in self.datasets:
                self.datasets[split] = VideoFolderDataset(
                    self._samples[split],
                    self.classes,
                    transform=self.transform,
                    train=split == "train",
                    **self._clip_args,
                )
        if "train" in needed and not self.datasets["train"].samples:
            raise ValueError("the training split has no (readable) videos")

    # ---- datasets and loaders
    def _dataset(self, split: str) -> VideoFolderDataset:
        if split not in self.datasets or (self.on_error == "skip" and split not in self._probed):
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self.datasets[split]

    @property
    def train_dataset(self) -> VideoFolderDataset:
        return self._dataset("train")

    @property
    def val_dataset(self) -> VideoFolderDataset:
        return self._dataset("val")

    @property
    def test_dataset(self) -> VideoFolderDataset:
        return self._dataset("test")

    def _loader(self, split: str) -> DataLoader:
        dataset = self._dataset(split)
        if not len(dataset) and split != "val":  # an empty val loader makes Lightning skip val
            hint = " (give test_dir, test_list or test_fraction > 0)" if split == "test" else ""
            raise ValueError(f"the {split} split has no videos{hint}")
        sampler = _EpochKeyedSampler(len(dataset), self.seed) if split == "train" else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
