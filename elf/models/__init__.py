"""Baseline models of the dataset-distillation literature and the model registry."""

from .alexnet import AlexNet
from .convnet import ConvNet
from .registry import ModelInfo, create_model, default_split_point, has_default_split_point, list_models, register_model
from .resnet import BasicBlock, ResNet, resnet18
from .vgg import VGG, vgg11

ConvNet.elf_split_point = "features"  # type: ignore[attr-defined]
ResNet.elf_split_point = "layer4.0"  # type: ignore[attr-defined]
AlexNet.elf_split_point = "features"  # type: ignore[attr-defined]
VGG.elf_split_point = "features.17"  # type: ignore[attr-defined]

__all__ = [
    "AlexNet",
    "BasicBlock",
    "ConvNet",
    "ModelInfo",
    "ResNet",
    "VGG",
    "create_model",
    "default_split_point",
    "has_default_split_point",
    "list_models",
    "register_model",
    "resnet18",
    "vgg11",
]
