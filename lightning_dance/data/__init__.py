"""Video data: built-in synthetic clips and class-per-folder video files."""

from lightning_dance.data.synthetic import (
    MOTIONS,
    SyntheticVideoConfig,
    SyntheticVideoDataModule,
    SyntheticVideoDataset,
    render_clips,
)
from lightning_dance.data.transforms import KINETICS_MEAN, KINETICS_STD, ClipTransform
from lightning_dance.data.video_folder import (
    VideoDecodeError,
    VideoFolderDataModule,
    VideoFolderDataset,
)

__all__ = [
    "KINETICS_MEAN",
    "KINETICS_STD",
    "ClipTransform",
    "VideoDecodeError",
    "VideoFolderDataModule",
    "VideoFolderDataset",
    "MOTIONS",
    "SyntheticVideoConfig",
    "SyntheticVideoDataModule",
    "SyntheticVideoDataset",
    "render_clips",
]
