"""Baseline models of the dataset-distillation literature and the model registry."""

from .registry import (ModelInfo, build_model, create_model, default_split_point, has_default_split_point, list_models,
                       model_info, register_model)
from .alexnet import AlexNet  # noqa: E402  (the model files register themselves with the registry above)
from .convnet import ConvNet
from .resnet import BasicBlock, ResNet, resnet18
from .small import MLP, LeNet
from .vgg import VGG, vgg11

__all__ = [
    "AlexNet",
    "BasicBlock",
    "ConvNet",
    "LeNet",
    "MLP",
    "ModelInfo",
    "ResNet",
    "VGG",
    "create_model",
    "default_split_point",
    "has_default_split_point",
    "list_models",
    "register_model",
    "build_model",
    "model_info",
    "resnet18",
    "vgg11",
]
