"""Model names of the DD literature -> constructors, plus torchvision and timm models by prefix.

``create_model("ConvNetBN")``, ``create_model("ResNet18BN")``, ``create_model("torchvision.resnet18")``,
``create_model("timm.resnet18")``. Every built-in carries ``elf_split_point``: the paper's default ELF cut.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ELFError
from .alexnet import AlexNet
from .convnet import ConvNet
from .resnet import resnet18
from .vgg import vgg11

__all__ = ["create_model", "list_models", "default_split_point", "register_model", "ModelInfo"]

_NORM_CODES = {"BN": "batchnorm", "IN": "instancenorm", "LN": "layernorm", "GN": "groupnorm", "NN": "none"}
_ACT_CODES = {"AS": "sigmoid", "AR": "relu", "AL": "leakyrelu"}
_POOL_CODES = {"NP": "none", "MP": "maxpooling", "AP": "avgpooling"}
_CONVNET_RE = re.compile(r"^ConvNet((?:W\d+|D\d+|BN|IN|LN|GN|NN|AS|AR|AL|NP|MP|AP)*)$")
_CONVNET_TOKEN = re.compile(r"W\d+|D\d+|BN|IN|LN|GN|NN|AS|AR|AL|NP|MP|AP")


@dataclass(frozen=True)
class ModelInfo:
    """A registered model name: ``builder(channel, num_classes, im_size)`` and a one-line description."""

    name: str
    builder: Callable[[int, int, tuple[int, int]], nn.Module]
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, builder: Callable[[int, int, tuple[int, int]], nn.Module], description: str = "") -> None:
    """Make ``create_model(name)`` build ``builder(channel, num_classes, im_size)``; the hook for custom models.

    Give the returned module an ``elf_split_point`` attribute to set its default ELF cut.
    """
    _REGISTRY[name] = ModelInfo(name, builder, description)


def _convnet_from_name(name: str, overrides: dict[str, object]) -> Callable[[int, int, tuple[int, int]], nn.Module] | None:
    m = _CONVNET_RE.match(name)
    if not m:
        return None
    kw: dict[str, object] = {}
    for tok in _CONVNET_TOKEN.findall(m.group(1)):
        if tok[0] == "W" and tok[1:].isdigit():
            kw["width"] = int(tok[1:])
        elif tok[0] == "D" and tok[1:].isdigit():
            kw["depth"] = int(tok[1:])
        elif tok in _NORM_CODES:
            kw["norm"] = _NORM_CODES[tok]
        elif tok in _ACT_CODES:
            kw["activation"] = _ACT_CODES[tok]
        elif tok in _POOL_CODES:
            kw["pooling"] = _POOL_CODES[tok]
    kw.update(overrides)
    return lambda channel, num_classes, im_size: ConvNet(channel, num_classes, im_size=im_size, **kw)  # type: ignore[arg-type]


def _vgg_with_point(norm: str) -> Callable[[int, int, tuple[int, int]], nn.Module]:
    def build(channel: int, num_classes: int, im_size: tuple[int, int]) -> nn.Module:
        model = vgg11(channel, num_classes, norm, im_size)
        # paper: after the 5th conv block at 32x32 (512x4x4); at 64x64 after the pool that follows the 6th
        model.elf_split_point = "features.17" if im_size[0] < 64 else "features.21"  # type: ignore[assignment]
        return model

    return build


for _name, _norm in (("ResNet18", "instancenorm"), ("ResNet18BN", "batchnorm")):
    register_model(
        _name,
        lambda c, k, s, _n=_norm: resnet18(c, k, _n, s),
        f"ResNet-18, CIFAR stem, {_norm}; default cut layer4.0 (paper's conv5_2), 512x4x4",
    )
for _name, _norm in (("VGG11", "instancenorm"), ("VGG11BN", "batchnorm")):
    register_model(_name, _vgg_with_point(_norm), f"VGG-11, {_norm}; default cut after the 5th conv (features.17), 512x4x4")
register_model("AlexNet", lambda c, k, s: AlexNet(c, k, s), "AlexNet of the DC code; default cut features, 192x4x4")

_CONVNET_EXAMPLES = {
    "ConvNet": "width 128, depth 3, instance norm, ReLU, avg pool; default cut features, 128x4x4",
    "ConvNetBN": "ConvNet with batch norm",
    "ConvNetIN": "ConvNet with instance norm (same as ConvNet)",
    "ConvNetLN": "ConvNet with layer norm",
    "ConvNetGN": "ConvNet with group norm (4 groups)",
    "ConvNetNN": "ConvNet without normalization",
    "ConvNetW256": "ConvNet of width 256 (teacher for 256-channel students)",
    "ConvNetW512": "ConvNet of width 512 (ELF teacher for ResNet-18 / VGG-11), 512x4x4",
    "ConvNetD4": "ConvNet of depth 4 (64x64 inputs, Tiny-ImageNet)",
    "ConvNetD5": "ConvNet of depth 5 (128x128 inputs)",
    "ConvNetAS": "ConvNet with sigmoid activation",
    "ConvNetAL": "ConvNet with leaky ReLU",
    "ConvNetMP": "ConvNet with max pooling",
    "ConvNetNP": "ConvNet without pooling",
}


def list_models() -> dict[str, str]:
    """Built-in names -> one-line description. ConvNet names combine tokens: ``ConvNetW512BN``, ``ConvNetD4W512``."""
    out = dict(_CONVNET_EXAMPLES)
    out.update({k: v.description for k, v in _REGISTRY.items()})
    out["torchvision.<name>"] = "any torchvision classification model, e.g. torchvision.resnet18 (no default cut)"
    out["timm.<name>"] = "any timm model when timm is installed, e.g. timm.resnet18 (no default cut)"
    return out


def create_model(name: str, channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32), **kwargs: object) -> nn.Module:
    """Build a model by its literature name (case and '-'/'_' are ignored for built-ins).

    Args:
        name: e.g. "ConvNet", "ConvNet-BN", "ConvNetW512", "ResNet18BN", "VGG11", "AlexNet",
            "torchvision.resnet18", "timm.resnet18".
        channel: input channels. num_classes: classes. im_size: input (H, W).
        kwargs: ConvNet arguments (``width=64``) for ConvNet names, or passed to torchvision/timm constructors.
    """
    name, spec_kwargs = parse_model_spec(name)
    kwargs = {**spec_kwargs, **kwargs}
    if name.startswith(("torchvision.", "tv.")):
        import torchvision.models as tvm

        tv_name = name.split(".", 1)[1]
        if channel != 3:
            raise ELFError(f"torchvision models take 3-channel images; {name} cannot be built with channel={channel}")
        try:
            return tvm.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        except ValueError as e:
            raise ELFError(f"unknown torchvision model {tv_name!r}; see torchvision.models.list_models()") from e
    if name.startswith("timm."):
        try:
            import timm
        except ImportError as e:
            raise ELFError(f"{name} needs timm: pip install 'elf-dd[timm]'") from e
        timm_name = name.split(".", 1)[1]
        common = dict(pretrained=False, num_classes=num_classes, in_chans=channel)
        if "img_size" not in kwargs:
            # models with a fixed input grid (ViTs) are built for the images at hand; others take no img_size
            try:
                return timm.create_model(timm_name, img_size=tuple(int(s) for s in im_size), **common, **kwargs)
            except TypeError:
                pass
        return timm.create_model(timm_name, **common, **kwargs)
    canonical = _canonical(name)
    im = (int(im_size[0]), int(im_size[1]))
    if canonical in _REGISTRY:
        if kwargs:
            raise ELFError(f"{name} takes no extra arguments (got {sorted(kwargs)}); register a variant with register_model")
        model = _REGISTRY[canonical].builder(channel, num_classes, im)
    else:
        builder = _convnet_from_name(canonical, dict(kwargs))
        if builder is None:
            known = list(list_models())
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ELFError(f"unknown model {name!r}.{hint} Known: {', '.join(known)} (see `elf models`).")
        try:
            model = builder(channel, num_classes, im)
        except TypeError as e:
            raise ELFError(f"{name}: bad ConvNet argument ({e}); ConvNet takes width, depth, activation, norm, pooling") from e
    model.elf_model_name = canonical  # type: ignore[assignment]
    return model


def parse_model_spec(spec: str) -> tuple[str, dict[str, object]]:
    """Split ``"NAME:key=value,key=value"`` into the name and constructor keyword arguments.

    Values are Python literals (``patch_size=4``, ``drop_rate=0.1``, ``norm='batchnorm'``) or bare words taken as
    strings, e.g. ``"timm.vit_tiny_patch16_224:patch_size=4"``.
    """
    import ast

    if ":" not in spec:
        return spec, {}
    name, _, rest = spec.partition(":")
    kwargs: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ELFError(f"model spec {spec!r}: expected NAME:key=value[,key=value...], got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name, kwargs


def _canonical(name: str) -> str:
    flat = name.replace("-", "").replace("_", "")
    for key in list(_REGISTRY) + ["ConvNet"]:
        if flat.lower() == key.lower():
            return key
    if flat.lower().startswith("convnet"):
        return "ConvNet" + flat[len("convnet") :].upper()
    return flat


def has_default_split_point(model: nn.Module) -> bool:
    """True when ``model`` declares its default ELF cut (``elf_split_point``)."""
    return isinstance(getattr(model, "elf_split_point", None), str)


def default_split_point(model: nn.Module) -> str:
    """The model's default ELF cut: its ``elf_split_point`` attribute (set on every built-in).

    Raises :class:`ELFError` for models without one, pointing at ``list_split_points``.
    """
    point = getattr(model, "elf_split_point", None)
    if isinstance(point, str):
        return point
    raise ELFError(
        f"{type(model).__name__} has no default ELF split point: pass split_at= (or teacher_point=) explicitly; "
        "elf.list_split_points(model, input_shape) lists the valid points and their output shapes"
    )
