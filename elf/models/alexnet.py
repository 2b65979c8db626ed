"""AlexNet as used in the dataset-distillation literature (DC/DSA code bases)."""

from __future__ import annotations

import torch
from torch import nn

from .base import FeaturesHeadNet
from .registry import register_model

__all__ = ["AlexNet"]


class AlexNet(FeaturesHeadNet):
    """Five convs (128-192-256-192-192) with three 2x2 max-pools, then one linear layer.

    At 32x32, ``features`` outputs ``(N, 192, 4, 4)``: the default ELF cut.
    """

    elf_split_point = "features"

    def __init__(self, channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, kernel_size=5, stride=1, padding=4 if channel == 1 else 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        h = (32 if im_size[0] == 28 else im_size[0]) // 8
        w = (32 if im_size[1] == 28 else im_size[1]) // 8
        self.fc = nn.Linear(192 * h * w, num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@register_model("AlexNet")
def alexnet(channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> AlexNet:
    """AlexNet of the DC code; default cut features, 192x4x4"""
    return AlexNet(channel, num_classes, im_size)
