"""The small baselines of the DC code's cross-architecture tables: a 3-layer MLP and LeNet.

DC names their linear layers ``fc_1``..``fc_3``; here they are ``fc1``..``fc3``, because torch.fx point names treat a
``_<n>`` suffix as a repeat counter (``fc_1`` would be listed as ``fc``). ``load_checkpoint`` of a DC state dict needs
the keys renamed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeaturesHeadNet
from .registry import register_model

__all__ = ["MLP", "LeNet"]


class MLP(FeaturesHeadNet):
    """Flattened image -> ``fc1`` (128) -> ReLU -> ``fc2`` (128) -> ReLU -> ``fc3`` (classes), as DC's ``MLP``.

    ``forward_features`` gives the ``(N, 128)`` hidden code after ``fc2``'s ReLU; no default ELF cut: its features
    are vectors, which no teacher map or adapter fits, so the MLP serves baselines.
    """

    def __init__(self, channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channel * im_size[0] * im_size[1], 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 128)``."""
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(x)


class LeNet(FeaturesHeadNet):
    """Two 5x5 convs (6, 16 channels) with ReLU and 2x2 max-pools, then 120-84-classes linear layers, as DC's
    ``LeNet`` (a one-channel input is padded by 2 in the first conv: 28x28 MNIST gives the same 16x5x5 as 32x32).

    The default ELF cut is ``features``, the last conv block: ``(N, 16, 5, 5)`` at 32x32.
    """

    elf_split_point = "features"

    def __init__(self, channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        pad = 2 if channel == 1 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        )
        h, w = (((s + 2 * pad - 4) // 2 - 4) // 2 for s in im_size)
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


@register_model("MLP")
def mlp(channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> MLP:
    """3-layer MLP of the DC code (128 hidden units); no default cut"""
    return MLP(channel, num_classes, im_size)


@register_model("LeNet")
def lenet(channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> LeNet:
    """LeNet of the DC code; default cut features, 16x5x5"""
    return LeNet(channel, num_classes, im_size)
