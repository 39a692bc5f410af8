"""Procedurally generated video clips whose classes can only be told apart over time.

Each clip shows one *target* object (an elongated soft ellipse) performing a motion pattern that
defines the class (moving right/left/down/up, growing, shrinking, rotating either way, blinking,
bouncing, circling), on a textured, noisy background with distracting blobs. Clips vary the way
real video does, which gives an input-aware pruner something to exploit:

- the target is visible in only part of the frames in about half the clips (the rest are empty
  background), so some frames carry no signal;
- the target has a random size, position, colour and contrast, so the informative region and the
  number of useful channels change from clip to clip;
- backgrounds are smooth random textures with per-frame sensor noise, and 0-3 small distractor
  blobs jitter around, so there is clutter to ignore;
- a per-clip difficulty mixes these: hard clips have low contrast, strong noise, short visibility
  and more distractors, easy clips the opposite.

Generation is vectorized torch and deterministic: clip ``i`` of a split depends only on
``(seed, split, i)``, so results do not depend on workers, shuffling or DDP sharding.

Example:
    >>> dm = SyntheticVideoDataModule(num_classes=4, frames=8, size=32, train_size=8,
    ...                               val_size=4, test_size=4, batch_size=4)
    >>> dm.setup("fit")
    >>> clip, label = dm.train_dataset[0]
    >>> tuple(clip.shape), label.dtype
    ((3, 8, 32, 32), torch.int64)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["MOTIONS", "SyntheticVideoConfig", "SyntheticVideoDataset", "SyntheticVideoDataModule"]

#: The motion patterns, in class-index order; ``num_classes=k`` uses the first ``k``.
MOTIONS: tuple[str, ...] = (
    "right",
    "left",
    "down",
    "up",
    "grow",
    "shrink",
    "rotate_cw",
    "rotate_ccw",
    "blink",
    "bounce_horizontal",
    "bounce_vertical",
    "circle",
)

_SPLITS = {"train": 0, "val": 1, "test": 2}
# Normalization used for the clips (the Kinetics statistics most video models expect).
MEAN, STD = 0.45, 0.225


@dataclass(frozen=True)
class SyntheticVideoConfig:
    """What the generated clips look like.

    Args:
        num_classes: number of motion classes (2 to ``len(MOTIONS)``).
        frames: frames per clip (>= 4).
        size: height = width of a frame in pixels (>= 16).
        partial_visibility: fraction of clips where the target is visible in only part of the
            frames (a contiguous window of 50-85% of the clip).
        max_distractors: maximum number of jittering distractor blobs per clip.
        noise: maximum per-pixel Gaussian noise std (hard clips get close to it).
    """

    num_classes: int = 10
    frames: int = 16
    size: int = 64
    partial_visibility: float = 0.5
    max_distractors: int = 3
    noise: float = 0.12

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(MOTIONS):
            raise ValueError(f"num_classes must be in [2, {len(MOTIONS)}], got {self.num_classes}")
        if self.frames < 4:
            raise ValueError(f"frames must be >= 4 (motion needs time), got {self.frames}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        if not 0.0 <= self.partial_visibility <= 1.0:
            raise ValueError(f"partial_visibility must be in [0, 1], got {self.partial_visibility}")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _ellipses(
    cx: torch.Tensor,
    cy: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Soft-edged ellipse alpha maps. All parameters [N, T] (fractions of the frame) -> [N,T,H,W]."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)
    dx, dy = xx - cx[..., None, None], yy - cy[..., None, None]
    cos, sin = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    u = (dx * cos + dy * sin) / a[..., None, None]
    v = (-dx * sin + dy * cos) / b[..., None, None]
    radius = torch.sqrt(u * u + v * v)
    # ~1.5 px soft edge, whatever the object's size
    edge = (1.5 / size) / b[..., None, None]
    return torch.sigmoid((1.0 - radius) / edge.clamp_min(1e-3))


def _triangle(phase: torch.Tensor) -> torch.Tensor:
    """Triangle wave in [-1, 1] with period 1."""
    return 4.0 * torch.abs(phase - torch.floor(phase + 0.5)) - 1.0


def render_clips(
    labels: torch.Tensor, config: SyntheticVideoConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render one clip per label, vectorized over clips, frames and pixels.

    Returns:
        clips: float32 [N, 3, T, S, S], normalized with mean 0.45 / std 0.225.
        info: per-clip ground truth: ``visible`` [N, T] (bool, target on screen), ``difficulty``
            [N] in [0, 1], ``object_size`` [N] (semi-major axis, fraction of the frame),
            ``num_distractors`` [N], and the target's trajectory: ``center`` [N, T, 2] (x, y),
            ``axis`` [N, T] (semi-major axis), ``angle`` [N, T], ``presence`` [N, T] (visible and
            not blinked off).
    """
    g, c = generator, config
    n, t_len, s = labels.numel(), c.frames, c.size
    t = torch.arange(t_len, dtype=torch.float32).view(1, -1)  # [1, T]
    tn = t / (t_len - 1) - 0.5  # [-0.5, 0.5]
    difficulty = torch.rand(n, generator=g)
    d = difficulty.view(-1, 1)

    # --- target: size, elongation, colour, contrast --------------------------------------
    a0 = _uniform(g, n, 0.10, 0.22).view(-1, 1)  # semi-major axis
    aspect = _uniform(g, n, 2.0, 3.0).view(-1, 1)
    theta0 = _uniform(g, n, 0.0, math.pi).view(-1, 1)
    cx0 = _uniform(g, n, 0.3, 0.7).view(-1, 1)
    cy0 = _uniform(g, n, 0.3, 0.7).view(-1, 1)
    travel = _uniform(g, n, 0.25, 0.45).view(-1, 1)  # distance covered by linear motions
    cycles = _uniform(g, n, 1.0, 2.0).view(-1, 1)  # periods for bounce / circle / blink
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)

    cx, cy = cx0.expand(n, t_len).clone(), cy0.expand(n, t_len).clone()
    a, theta = a0.expand(n, t_len).clone(), theta0.expand(n, t_len).clone()
    on = torch.ones(n, t_len)
    names = [MOTIONS[int(k)] for k in labels]

    def rows(*which: str) -> torch.Tensor:
        return torch.tensor([m in which for m in names], dtype=torch.bool)

    lin = travel * tn  # [N, T]
    cx = torch.where(rows("right").view(-1, 1), cx0 + lin, cx)
    cx = torch.where(rows("left").view(-1, 1), cx0 - lin, cx)
    cy = torch.where(rows("down").view(-1, 1), cy0 + lin, cy)
    cy = torch.where(rows("up").view(-1, 1), cy0 - lin, cy)
    scale = torch.exp(torch.log(torch.tensor(2.5)) * tn)  # x2.5 over the clip
    a = torch.where(rows("grow").view(-1, 1), a0 * 0.7 * scale, a)
    a = torch.where(rows("shrink").view(-1, 1), a0 * 0.7 / scale, a)
    spin = (math.pi * 0.75) * (t / (t_len - 1))  # 135 degrees over the clip
    theta = torch.where(rows("rotate_cw").view(-1, 1), theta0 + spin, theta)
    theta = torch.where(rows("rotate_ccw").view(-1, 1), theta0 - spin, theta)
    blink_phase = cycles * 1.5 * t / t_len + torch.rand(n, 1, generator=g)
    on = torch.where(rows("blink").view(-1, 1), (torch.frac(blink_phase) < 0.5).float(), on)
    bounce = 0.5 * travel * _triangle(cycles * t / t_len + 0.25 * (1 + sign))
    cx = torch.where(rows("bounce_horizontal").view(-1, 1), cx0 + bounce, cx)
    cy = torch.where(rows("bounce_vertical").view(-1, 1), cy0 + bounce, cy)
    angle = 2 * math.pi * cycles * 0.6 * t / t_len * sign
    radius = 0.5 * travel
    circ = rows("circle").view(-1, 1)
    cx = torch.where(circ, 0.5 + radius * torch.cos(angle), cx)
    cy = torch.where(circ, 0.5 + radius * torch.sin(angle), cy)

    # --- partial visibility: a contiguous window of 50-85% of the frames -------------------
    partial = torch.rand(n, generator=g) < c.partial_visibility
    win = (_uniform(g, n, 0.5, 0.85) * t_len).round().clamp(min=4, max=t_len)
    start = torch.floor(torch.rand(n, generator=g) * (t_len - win + 1))
    in_window = (t >= start.view(-1, 1)) & (t < (start + win).view(-1, 1))
    visible = torch.where(partial.view(-1, 1), in_window, torch.ones_like(in_window))
    presence = on * visible.float()  # [N, T]

    # --- background: smooth texture + colour cast, drifting slightly -------------------------
    coarse = torch.rand(n, 3, 1, 5, 5, generator=g)
    texture = torch.nn.functional.interpolate(
        coarse, size=(1, s, s), mode="trilinear", align_corners=False
    )
    bg_level = _uniform(g, n, 0.25, 0.6).view(-1, 1, 1, 1, 1)
    bg = bg_level + (0.35 * (1 - 0.5 * d)).view(-1, 1, 1, 1, 1) * (texture - 0.5)
    frames = bg.expand(n, 3, t_len, s, s).clone()

    # --- distractors: small blobs doing a random walk ----------------------------------------
    k_max = c.max_distractors
    if k_max > 0:
        count = torch.floor(torch.rand(n, generator=g) * (k_max + 1) * (0.5 + d.view(-1)))
        count = count.clamp(max=k_max)
        steps = torch.randn(n, k_max, 2, t_len, generator=g) * 0.02
        pos = torch.rand(n, k_max, 2, 1, generator=g) * 0.8 + 0.1 + torch.cumsum(steps, dim=-1)
        dsize = _uniform(g, n * k_max, 0.04, 0.08).view(n, k_max, 1).expand(n, k_max, t_len)
        dcolor = torch.rand(n, k_max, 3, generator=g)
        for k in range(k_max):
            alpha = _ellipses(
                pos[:, k, 0], pos[:, k, 1], dsize[:, k], dsize[:, k], torch.zeros(n, t_len), s
            ) * (k < count).float().view(-1, 1, 1, 1)
            alpha = alpha.unsqueeze(1)  # [N, 1, T, S, S]
            frames = frames * (1 - alpha) + dcolor[:, k].view(n, 3, 1, 1, 1) * alpha
    else:
        count = torch.zeros(n)

    # --- target on top, with a contrast that falls with difficulty ---------------------------
    alpha = _ellipses(cx, cy, a, a / aspect, theta, s) * presence[..., None, None]
    contrast = (0.55 - 0.35 * d.view(-1)) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    hue = torch.rand(n, 3, generator=g) * 0.4 - 0.2
    color = (bg_level.view(n, 1) + contrast.view(n, 1) + hue).clamp(0.0, 1.0)
    alpha = alpha.unsqueeze(1)
    frames = frames * (1 - alpha) + color.view(n, 3, 1, 1, 1) * alpha

    noise_std = c.noise * (0.2 + 0.8 * d).view(-1, 1, 1, 1, 1)
    frames = frames + noise_std * torch.randn(frames.shape, generator=g)
    clips = (frames.clamp(0.0, 1.0) - MEAN) / STD
    info = {
        "visible": visible,
        "difficulty": difficulty,
        "object_size": a0.view(-1),
        "num_distractors": count.long(),
        "center": torch.stack([cx, cy], dim=-1),
        "axis": a,
        "angle": theta,
        "presence": presence,
    }
    return clips.contiguous(), info


class SyntheticVideoDataset(Dataset):
    """A split of synthetic clips; item ``i`` is ``(clip [3,T,S,S] float32, label int64)``.

    Labels cycle through the classes (``(i + offset) % num_classes``), so every split is balanced
    to within one clip per class. Items are rendered on access (about 1 ms each for 16x64x64).
    """

    def __init__(
        self, size: int, config: SyntheticVideoConfig, seed: int = 0, split: str = "train"
    ) -> None:
        if size < 0:
            raise ValueError(f"split size must be >= 0, got {size}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.size, self.config, self.seed, self.split = size, config, seed, split

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return (index + _SPLITS[self.split]) % self.config.num_classes

    def _generator(self, index: int) -> torch.Generator:
        key = (self.seed * 1_000_003 + _SPLITS[self.split]) * 10_000_019 + index
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Clip, label and ground-truth info (visibility, difficulty...) of item ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a split of {self.size} clips")
        label = torch.tensor([self.label(index)], dtype=torch.long)
        clips, info = render_clips(label, self.config, self._generator(index))
        return clips[0], label[0], {k: v[0] for k, v in info.items()}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip, label, _ = self.render(index)
        return clip, label


class SyntheticVideoDataModule(L.LightningDataModule):
    """Synthetic motion-pattern video classification, no download needed.

    Args:
        num_classes: motion classes (2-12), see :data:`MOTIONS`.
        frames: frames per clip.
        size: frame height and width.
        train_size, val_size, test_size: clips per split.
        batch_size: clips per batch.
        num_workers: DataLoader workers.
        seed: everything generated depends only on it (and the split and index).
        partial_visibility, max_distractors, noise: see :class:`SyntheticVideoConfig`.

    Example:
        >>> import lightning as L
        >>> from lightning_dance import SyntheticVideoDataModule, VideoClassifier
        >>> dm = SyntheticVideoDataModule(num_classes=6, frames=8, size=32, train_size=8,
        ...                               val_size=4, test_size=4, batch_size=4)
        >>> dm.setup("fit")
        >>> clip, label = dm.train_dataset[0]
        >>> tuple(clip.shape), clip.dtype, 0 <= int(label) < 6
        ((3, 8, 32, 32), torch.float32, True)
        >>> L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False,
        ...           ).fit(VideoClassifier("tiny_c3d", 6), dm)
    """

    def __init__(
        self,
        num_classes: int = 10,
        frames: int = 16,
        size: int = 64,
        train_size: int = 2048,
        val_size: int = 512,
        test_size: int = 512,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        partial_visibility: float = 0.5,
        max_distractors: int = 3,
        noise: float = 0.12,
    ) -> None:
        super().__init__()
        # Pin the frame: without it Lightning walks up the stack and may keep a caller's
        # locals (e.g. a subclass's big tensors) alive in `hparams`.
        self.save_hyperparameters(frame=sys._getframe())
        self.config = SyntheticVideoConfig(
            num_classes=num_classes,
            frames=frames,
            size=size,
            partial_visibility=partial_visibility,
            max_distractors=max_distractors,
            noise=noise,
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.datasets = {
            split: SyntheticVideoDataset(n, self.config, seed, split)
            for split, n in self.sizes.items()
        }

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def classes(self) -> list[str]:
        return list(MOTIONS[: self.config.num_classes])

    @property
    def train_dataset(self) -> SyntheticVideoDataset:
        return self.datasets["train"]

    @property
    def val_dataset(self) -> SyntheticVideoDataset:
        return self.datasets["val"]

    @property
    def test_dataset(self) -> SyntheticVideoDataset:
        return self.datasets["test"]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.sizes[split] == 0:
            raise ValueError(f"the {split} split is empty: set {split}_size > 0")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
