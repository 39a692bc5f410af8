"""Video data: built-in synthetic clips and class-per-folder video files."""

from lightning_dance.data.synthetic import (
    MOTIONS,
    SyntheticVideoConfig,
    SyntheticVideoDataModule,
    SyntheticVideoDataset,
    render_clips,
)

__all__ = [
    "MOTIONS",
    "SyntheticVideoConfig",
    "SyntheticVideoDataModule",
    "SyntheticVideoDataset",
    "render_clips",
]
