"""VGG-11 as used in the dataset-distillation literature, at CIFAR and Tiny-ImageNet sizes.

One linear classifier below 64 pixels (DC/MTT/ELF), and the ELF code's ``VGG11ImageNet`` head (4096-4096 with
dropout) from 64 pixels up.
"""

from __future__ import annotations

import functools

from torch import nn

from ..errors import ELFError
from .base import FeaturesHeadNet
from .registry import register_model

__all__ = ["VGG", "VGG_CONFIGS", "vgg11"]

VGG_CONFIGS: dict[str, list[int | str]] = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(FeaturesHeadNet):
    """VGG feature stack of conv3x3 -> norm -> ReLU and 2x2 max-pools, then ``Linear(512 * (H/32)**2, classes)``
    below 64 pixels; from 64 pixels up ELF's ``VGG11ImageNet`` head, ``Linear(512 * (H/32)**2, 4096)`` -> ReLU ->
    Dropout -> ``Linear(4096, 4096)`` -> ReLU -> Dropout -> ``Linear(4096, classes)``.

    ``self.features`` is one ``nn.Sequential``; ``features.<i>`` names the point after layer ``i``. The default ELF
    cut (``elf_split_point``) is the paper's: after the 5th conv block at 32x32 (``features.17``, 512x4x4); at 64x64
    and above after the pool that follows the 6th (``features.21``).
    """

    elf_split_point: str

    def __init__(
        self,
        name: str = "VGG11",
        channel: int = 3,
        num_classes: int = 10,
        norm: str = "instancenorm",
        im_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        if name not in VGG_CONFIGS:
            raise ELFError(f"unknown VGG configuration {name!r}; known: {sorted(VGG_CONFIGS)}")
        if norm not in ("instancenorm", "batchnorm"):
            raise ELFError(f"VGG supports norm 'instancenorm' or 'batchnorm', got {norm!r}")
        layers: list[nn.Module] = []
        in_c = channel
        for i, v in enumerate(VGG_CONFIGS[name]):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(v, int)
            # DC's 28x28 one-channel input is padded to 32 by the first conv; ELF's VGG11ImageNet pads by 1 only
            layers.append(nn.Conv2d(in_c, v, 3, padding=3 if channel == 1 and i == 0 and im_size[0] < 64 else 1))
            layers.append(nn.GroupNorm(v, v, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_c = v
        self.features = nn.Sequential(*layers)
        side = max(1, im_size[0] // 32) * max(1, im_size[1] // 32)
        if im_size[0] < 64:
            self.classifier: nn.Module = nn.Linear(512 * side, num_classes)
        else:
            self.classifier = nn.Sequential(nn.Linear(512 * side, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                            nn.Linear(4096, num_classes))
        self.elf_split_point = "features.17" if im_size[0] < 64 else "features.21"





def vgg11(channel: int = 3, num_classes: int = 10, norm: str = "instancenorm", im_size: tuple[int, int] = (32, 32)) -> VGG:
    """VGG-11 for ``channel``-channel ``im_size`` images."""
    return VGG("VGG11", channel, num_classes, norm, im_size)


for _model_name, _norm_kind in (("VGG11", "instancenorm"), ("VGG11BN", "batchnorm")):
    register_model(_model_name, functools.partial(vgg11, norm=_norm_kind),
                   f"VGG-11, {_norm_kind}; default cut after the 5th conv (features.17), 512x4x4; from 64x64 ELF's "
                   "VGG11ImageNet head (4096-4096, dropout), cut features.21, 512x4x4")
