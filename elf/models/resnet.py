"""ResNet-18 as used in the dataset-distillation literature, with its CIFAR, ImageNet and average-pool variants.

The CIFAR stem (3x3 conv, no max-pool) below 64 pixels, the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) of the ELF
code's ``ResNet18ImageNet`` from 64 pixels up, and DC/MTT's ``ResNet18_AP``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ELFError
from .base import FeaturesHeadNet
from .registry import register_model

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet18_ap"]


def _norm(norm: str, c: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(c)
    raise ELFError(f"ResNet supports norm 'instancenorm' or 'batchnorm', got {norm!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; ``(N, in_planes, H, W)`` -> ``(N, planes, H/stride, W/stride)``.

    ``avgpool_down=True`` is DC's ``BasicBlock_AP`` (``ResNet18_AP``): the convs keep stride 1 and a 2x2 average pool
    downsamples, after the first conv's ReLU and in the shortcut (after its 1x1 conv, before its norm).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "instancenorm",
                 avgpool_down: bool = False) -> None:
        super().__init__()
        self.down = nn.AvgPool2d(2, 2) if avgpool_down and stride != 1 else nn.Identity()
        conv_stride = 1 if avgpool_down else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pool = [nn.AvgPool2d(2, 2)] if avgpool_down and stride != 1 else []
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=conv_stride, bias=False), *pool,
                                          _norm(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(FeaturesHeadNet):
    """ResNet; four stages of 64/128/256/512 channels, global average pool, linear classifier.

    ``stem="cifar"``: a 3x3 conv, no max-pool (DC/MTT/ELF at 32x32): the stages output 32, 16, 8 and 4 pixels and the
    default cut ``layer4.0`` (the paper's "conv5_2") gives ``(N, 512, 4, 4)``. ``stem="imagenet"``: a 7x7 stride-2
    conv and a 3x3 stride-2 max-pool (the ELF code's ``ResNet18ImageNet``, its Tiny-ImageNet model): at 64x64 the
    stages output 16, 8, 4 and 2 pixels and the default cut is ELF's, after the third stage: ``layer3``,
    ``(N, 256, 4, 4)`` (teacher ``ConvNetD4W256``).
    """

    elf_split_point: str

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        channel: int = 3,
        num_classes: int = 10,
        norm: str = "instancenorm",
        stem: str = "cifar",
        avgpool_down: bool = False,
        im_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ELFError(f"ResNet stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.avgpool_down = avgpool_down
        self.in_planes = 64
        if stem == "cifar":
            self.conv1 = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(channel, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.elf_split_point = "layer4.0" if stem == "cifar" else "layer3"
        self.bn1 = _norm(norm, 64)
        self.layer1 = self._stage(64, num_blocks[0], 1, norm)
        self.layer2 = self._stage(128, num_blocks[1], 2, norm)
        self.layer3 = self._stage(256, num_blocks[2], 2, norm)
        self.layer4 = self._stage(512, num_blocks[3], 2, norm)
        # DC's ResNet_AP flattens the last stage (no global pool): 512 x (H/8) x (W/8) inputs to the classifier
        side = (im_size[0] // 8) * (im_size[1] // 8) if avgpool_down else 1
        self.classifier = nn.Linear(512 * BasicBlock.expansion * side, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, norm, self.avgpool_down))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> last stage output ``(N, 512, H/8, W/8)`` (CIFAR stem; ``H/32`` with the ImageNet stem)."""
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage output -> logits ``(N, num_classes)`` (global average pool; flattened for the ``_AP`` model)."""
        return self.classifier(torch.flatten(x if self.avgpool_down else F.adaptive_avg_pool2d(x, 1), 1))



def resnet18(channel: int = 3, num_classes: int = 10, norm: str = "instancenorm", im_size: tuple[int, int] = (32, 32),
             stem: str | None = None) -> ResNet:
    """ResNet-18: the CIFAR stem below 64 pixels, the ImageNet stem (ELF's ``ResNet18ImageNet``) from 64 up;
    ``stem`` forces one."""
    return ResNet((2, 2, 2, 2), channel, num_classes, norm, stem or ("imagenet" if im_size[0] >= 64 else "cifar"))


def resnet18_ap(channel: int = 3, num_classes: int = 10, norm: str = "instancenorm",
                im_size: tuple[int, int] = (32, 32)) -> ResNet:
    """DC's ResNet-18_AP: the CIFAR stem, stride-1 convs with 2x2 average pools, the last stage flattened."""
    return ResNet((2, 2, 2, 2), channel, num_classes, norm, "cifar", avgpool_down=True, im_size=im_size)


for _model_name, _norm_kind in (("ResNet18", "instancenorm"), ("ResNet18BN", "batchnorm")):
    register_model(_model_name, functools.partial(resnet18, norm=_norm_kind),
                   f"ResNet-18, {_norm_kind}; CIFAR stem, default cut layer4.0 (paper's conv5_2), 512x4x4; from 64x64 "
                   "ELF's ImageNet stem, cut layer3, 256x4x4")
    register_model(f"{_model_name}_AP", functools.partial(resnet18_ap, norm=_norm_kind),
                   f"ResNet-18, {_norm_kind}, downsampling by 2x2 average pools, flattened head, as DC/MTT's "
                   f"{_model_name}_AP (MTT's cross-architecture pool); default cut layer4.0, 512x4x4 at 32x32")
    register_model(f"{_model_name}ImageNet", functools.partial(resnet18, norm=_norm_kind, stem="imagenet"),
                   f"ResNet-18, {_norm_kind}, ImageNet stem (7x7/2 conv + max-pool) at any size, as the ELF code's "
                   f"{_model_name}ImageNet; default cut layer3 (256x4x4 at 64x64)")
