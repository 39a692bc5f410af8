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

Decoding uses PyAV directly, seeking and converting only the frames a clip needs
(:mod:`~lightning_dance.data.decoding`); the file lists and splits come from
:mod:`~lightning_dance.data.folders`, the clips from :mod:`~lightning_dance.data.clips`. This
module holds the DataModule and its training sampler.

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

import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from lightning_dance.data.clips import VideoFolderDataset
from lightning_dance.data.decoding import VideoDecodeError, VideoReader, probe_all, probe_video
from lightning_dance.data.folders import (
    VIDEO_EXTENSIONS,
    Sample,
    check_extensions,
    find_classes,
    read_class_list,
    read_split_list,
    scan_video_folder,
    split_by_class,
)
from lightning_dance.data.transforms import KINETICS_MEAN, KINETICS_STD, ClipTransform

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

_SPLITS = ("train", "val", "test")
_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


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
        self.extensions = check_extensions(extensions)
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
                kept, lost = probe_all(self._samples[split], self.num_workers)
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
