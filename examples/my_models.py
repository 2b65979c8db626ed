"""Two models elf-dd has never seen, registered for the API, the command line and studies.

    elf models --import examples/my_models.py
    elf split-points SmallCNN --import examples/my_models.py --shape 128x4x4
    elf eval --import examples/my_models.py --models SmallCNN CifarResNet18 --adapter auto \
        --images elf/assets/demo_set.safetensors --teacher elf/assets/demo_teacher.safetensors --data cifar10

- ``SmallCNN``: a plain CNN of our own whose ``stage3`` has the bundled ConvNet teacher's shape (128x4x4 at 32x32).
- ``CifarResNet18``: torchvision's resnet18 with a CIFAR stem (3x3 stride-1 first conv, no max-pool), so its stages
  keep the resolution a 32x32 image needs; ``layer4.0`` gives 512x4x4 there, as the literature's ResNet-18 does.

In a package of your own, declare this module as an entry point and ``pip install`` makes both models appear in
``elf models`` with no ``--import``::

    [project.entry-points."elf_dd.models"]
    my_models = "my_models"
"""

from __future__ import annotations

import torch
from torch import nn

import elf


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU (-> 2x2 max-pool): ``(N, c_in, H, W)`` -> ``(N, c_out, H/2 or H, ...)``."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """stem -> three pooled stages (64, 128, 128 channels) -> one unpooled 256-channel stage -> global pool -> fc."""

    def __init__(self, channel: int = 3, num_classes: int = 10, width: int = 128) -> None:
        super().__init__()
        self.stem = conv_block(channel, 32, pool=False)
        self.stage1 = conv_block(32, 64, pool=True)  # H/2
        self.stage2 = conv_block(64, width, pool=True)  # H/4
        self.stage3 = conv_block(width, width, pool=True)  # H/8: width x 4 x 4 at 32x32, the ConvNet teacher's shape
        self.stage4 = conv_block(width, 256, pool=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.stage4(x))


@elf.register_model("SmallCNN", split_point="stage3")
def small_cnn(channel: int = 3, num_classes: int = 10, width: int = 128) -> SmallCNN:
    """example CNN of our own (BatchNorm); stage3 is width x H/8 x W/8"""
    return SmallCNN(channel, num_classes, width)


@elf.register_model("CifarResNet18", split_point=lambda hw: "layer4.0" if hw[0] <= 32 else "layer4")
def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision resnet18 with a CIFAR stem (3x3 conv, no max-pool); layer4.0 is 512x4x4 at 32x32"""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
