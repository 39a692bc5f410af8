import pytest
import torch
import torch.nn as nn

# CI machines have 2 cores, often shared: one intra-op thread keeps small-tensor tests fast
# and their timings stable (two threads on tiny convs were up to 15x slower under load).
torch.set_num_threads(1)


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm3d of ``model`` non-trivial statistics and affine weights (so that a
    wrong or missing channel shows in the logits); returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


class SmallNet(nn.Module):
    """A small 3D CNN covering what DANCE must handle: stem, residual, depthwise, strides."""

    def __init__(self, num_classes: int = 4, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv3d(3, w, 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.BatchNorm3d(w),
            nn.ReLU(),
        )
        self.conv_a = nn.Sequential(
            nn.Conv3d(w, 2 * w, 3, padding=1), nn.BatchNorm3d(2 * w), nn.ReLU()
        )
        self.res = nn.Sequential(
            nn.Conv3d(2 * w, 2 * w, (1, 3, 3), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(2 * w),
            nn.ReLU(),
            nn.Conv3d(2 * w, 2 * w, 3, padding=1, groups=2 * w),  # depthwise
        )
        self.down = nn.Conv3d(2 * w, 4 * w, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv_a(x)
        x = torch.relu(x + self.res(x))
        x = torch.relu(self.down(x))
        return self.head(x.mean(dim=(2, 3, 4)))


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    return SmallNet().eval()


@pytest.fixture
def clip():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 16, 16)
