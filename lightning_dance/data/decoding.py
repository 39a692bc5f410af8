"""Video decoding with PyAV: frame-indexed reads of one video, and probing files for readability.

``torchvision.io.read_video`` is gone in torchvision 0.29, and ``pytorchvideo``'s PyAV path
converts every decoded frame to RGB: :class:`VideoReader` seeks to the keyframe before the first
needed frame, decodes forward only until the last needed frame, and converts only the frames it
keeps. Frame ``i`` is the frame shown at time ``i / fps`` (``fps`` = the stream's average rate),
so variable-frame-rate video is sampled uniformly in time.

Example:
    >>> import tempfile
    >>> try:
    ...     probe_video(tempfile.mkdtemp() + "/missing.mp4")
    ... except FileNotFoundError:  # PyAV's, an OSError
    ...     print("unreadable")
    unreadable
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import torch

from lightning_dance.data.folders import Sample
from lightning_dance.errors import DanceError

__all__ = ["VideoDecodeError", "VideoReader", "probe_all", "probe_video"]


class VideoDecodeError(DanceError, RuntimeError):
    """A video could not be opened or decoded. The message starts with the file's path."""


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


def probe_all(
    samples: Sequence[Sample], threads: int
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """``samples`` split into the readable ones and ``(path, reason)`` for the others."""

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
