"""AlexNet as used in the dataset-distillation literature (DC/DSA code bases)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ELFError
from .base import FeaturesHeadNet
from .registry import register_model

__all__ = ["AlexNet"]


class AlexNet(FeaturesHeadNet):
    """Five convs (128-192-256-192-192) with three 2x2 max-pools, then one linear layer; ``norm="batchnorm"``
    puts a BatchNorm after every conv (the DC code's AlexNetBN).

    At 32x32, ``features`` outputs ``(N, 192, 4, 4)``: the default ELF cut.
    """

    elf_split_point = "features"

    def __init__(self, channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32),
                 norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "batchnorm"):
            raise ELFError(f"AlexNet norm must be 'none' or 'batchnorm', got {norm!r}")

        def conv(c_in: int, c_out: int, kernel: int, padding: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=padding)]
            if norm == "batchnorm":
                layers.append(nn.BatchNorm2d(c_out))
            return [*layers, nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(channel, 128, 5, 4 if channel == 1 else 2),
            nn.MaxPool2d(kernel_size=2, stride=2),
            *conv(128, 192, 5, 2),
            nn.MaxPool2d(kernel_size=2, stride=2),
            *conv(192, 256, 3, 1),
            *conv(256, 192, 3, 1),
            *conv(192, 192, 3, 1),
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


@register_model("AlexNetBN")
def alexnet_bn(channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32)) -> AlexNet:
    """AlexNet with BatchNorm after every conv (DC/DM's AlexNetBN); default cut features, 192x4x4"""
    return AlexNet(channel, num_classes, im_size, norm="batchnorm")
