"""The ConvNet of the dataset-distillation literature (DC, DSA, DM, MTT, ELF).

Module names and parameter order equal the published ConvNet, so state dicts and MTT parameter lists
(one tensor per ``model.parameters()`` entry) load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ELFError
from .base import FeaturesHeadNet

__all__ = ["ConvNet", "NORMS", "ACTIVATIONS", "POOLINGS"]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "swish")
POOLINGS = ("avgpooling", "maxpooling", "none")
_POOL_ALIASES = {"avg": "avgpooling", "max": "maxpooling", "avgpool": "avgpooling", "maxpool": "maxpooling"}


def _norm_layer(norm: str, shape: Sequence[int]) -> nn.Module:
    c = shape[0]
    if norm == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if norm == "layernorm":
        return nn.LayerNorm(list(shape), elementwise_affine=True)
    if norm == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    raise ELFError(f"unknown normalization {norm!r}; choose one of {NORMS}")


def _activation(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "swish":
        return nn.SiLU()  # x * sigmoid(x): the DC code's Swish
    raise ELFError(f"unknown activation {act!r}; choose one of {ACTIVATIONS}")


class ConvNet(FeaturesHeadNet):
    """``depth`` x [conv3x3(width) -> norm -> act -> pool], then one linear classifier.

    Input ``(N, channel, H, W)``; ``self.features`` outputs ``(N, width, H / 2**depth, W / 2**depth)`` with pooling
    (the ELF teacher feature), the classifier returns logits ``(N, num_classes)``.

    Args:
        channel: input channels. num_classes: output classes.
        width: conv channels (literature default 128). depth: conv blocks (default 3; 4 for 64x64 inputs).
        activation: "relu" | "leakyrelu" | "sigmoid" | "swish". norm: "instancenorm" (``GroupNorm(C, C)`` with affine, the
            literature's default) | "batchnorm" | "layernorm" | "groupnorm" | "none".
        pooling: "avgpooling" | "maxpooling" | "none" ("avg"/"max" accepted). im_size: input (H, W); 28x28 inputs
            are treated as 32x32 (the first conv pads by 3 for one-channel input), as in the published code.
    """

    elf_split_point = "features"  # the default ELF cut: the teacher feature of the paper

    def __init__(
        self,
        channel: int = 3,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        activation: str = "relu",
        norm: str = "instancenorm",
        pooling: str = "avgpooling",
        im_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        pooling = _POOL_ALIASES.get(pooling, pooling)
        if pooling not in POOLINGS:
            raise ELFError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if depth < 1 or width < 1:
            raise ELFError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        h, w = (32, 32) if tuple(im_size)[0] == 28 else tuple(im_size)
        if pooling != "none" and (h >> depth) < 1:
            raise ELFError(f"ConvNet depth {depth} pools a {h}x{w} input below 1 pixel; use depth <= {h.bit_length() - 1}")
        self.width, self.depth, self.norm = width, depth, norm
        layers: list[nn.Module] = []
        shape = [channel, h, w]
        in_c = channel
        for d in range(depth):
            layers.append(nn.Conv2d(in_c, width, kernel_size=3, padding=3 if channel == 1 and d == 0 else 1))
            shape[0] = width
            if norm != "none":
                layers.append(_norm_layer(norm, shape))
            layers.append(_activation(activation))
            in_c = width
            if pooling != "none":
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpooling" else nn.MaxPool2d(2, 2))
                shape[1] //= 2
                shape[2] //= 2
        self.features = nn.Sequential(*layers)
        self.feature_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        self.classifier = nn.Linear(shape[0] * shape[1] * shape[2], num_classes)
