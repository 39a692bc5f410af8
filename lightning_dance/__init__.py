"""lightning-dance: DANCE (AVA + AAP) dynamic pruning of 3D CNNs for PyTorch Lightning."""

from lightning_dance.layers import NoConv3dError, all_conv3d, select_conv3d, stem_names

__version__ = "0.1.0"

__all__ = ["NoConv3dError", "all_conv3d", "select_conv3d", "stem_names", "__version__"]
