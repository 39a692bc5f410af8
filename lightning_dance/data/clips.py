"""Clips of listed videos as a Dataset: temporal sampling, decoding and the clip transform.

Example:
    >>> ds = VideoFolderDataset([("v.mp4", 0)], ["a"], frames=4, frame_stride=3)
    >>> ds.clip_indices(num_frames=30, fps=25.0)  # centred
    [10, 13, 16, 19]
    >>> ds.clip_indices(num_frames=5, fps=25.0)  # short: past the end reads the last frame
    [0, 3, 6, 9]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_dance.data.decoding import VideoDecodeError, VideoReader
from lightning_dance.data.transforms import ClipTransform

__all__ = ["VideoFolderDataset"]


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
