"""Video models for lightning-dance: one factory for torchvision, pytorchvideo, timm and tiny nets.

Example:
    >>> import torch
    >>> from lightning_dance.models import create_model, list_models
    >>> net = create_model("tiny_c3d", num_classes=4, width=0.5)
    >>> net(torch.randn(2, 3, 8, 32, 32)).shape
    torch.Size([2, 4])
"""

from lightning_dance.models.checkpoint import CheckpointError, load_checkpoint
from lightning_dance.models.factory import (
    TIMM_PREFIX,
    ModelInfo,
    create_model,
    list_models,
    model_info,
)
from lightning_dance.models.inflate import GlobalPool3d, InflationError, inflate_2d_to_3d
from lightning_dance.models.pytorchvideo_models import SlowFastSingleClip, pack_pathways
from lightning_dance.models.tiny import TinyC3D
from lightning_dance.models.video_resnet import SlimVideoResNet

__all__ = [
    "CheckpointError",
    "GlobalPool3d",
    "InflationError",
    "ModelInfo",
    "SlimVideoResNet",
    "SlowFastSingleClip",
    "TIMM_PREFIX",
    "TinyC3D",
    "create_model",
    "inflate_2d_to_3d",
    "list_models",
    "load_checkpoint",
    "model_info",
    "pack_pathways",
]
