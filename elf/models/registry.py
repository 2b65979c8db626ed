"""The model registry: names of the DD literature, user-registered models and plugins -> constructors.

``create_model("ConvNetBN")``, ``create_model("ResNet18BN")``, ``create_model("torchvision.resnet18")``,
``create_model("timm.resnet18")``, ``create_model("MyNet")`` after ``@elf.register_model("MyNet", split_point=...)``.
Built-ins register themselves in their own files and declare their default ELF cut there. Installed packages add
models through the ``elf_dd.models`` entry-point group (see :mod:`elf.plugins`), loaded on first use.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from ..errors import ELFError
from ..split import SplitOptions

__all__ = ["create_model", "list_models", "default_split_point", "register_model", "ModelInfo", "build_model",
           "has_default_split_point", "parse_model_spec", "model_info", "RESERVED_PREFIXES", "canonical_name"]

_NORM_CODES = {"BN": "batchnorm", "IN": "instancenorm", "LN": "layernorm", "GN": "groupnorm", "NN": "none"}
_ACT_CODES = {"ASwish": "swish", "AS": "sigmoid", "AR": "relu", "AL": "leakyrelu"}
_POOL_CODES = {"NP": "none", "MP": "maxpooling", "AP": "avgpooling"}
_CONVNET_RE = re.compile(r"^ConvNet((?:W\d+|D\d+|BN|IN|LN|GN|NN|ASwish|AS|AR|AL|NP|MP|AP)*)$")
_CONVNET_TOKEN = re.compile(r"W\d+|D\d+|BN|IN|LN|GN|NN|ASwish|AS|AR|AL|NP|MP|AP")
RESERVED_PREFIXES = ("torchvision.", "tv.", "timm.")

SplitPointSpec = str | Callable[[tuple[int, int]], str] | None
Builder = TypeVar("Builder", bound=Callable[..., nn.Module])
_IMAGE_ARGS = ("channel", "num_classes", "im_size")


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: how to build it, its default cut and how to trace it.

    Attributes:
        name: the registered name. builder: returns the ``nn.Module``; it is called with whichever of ``channel``,
            ``num_classes``, ``im_size`` (``(H, W)``) it accepts, as keywords, plus the caller's keyword arguments.
            (A builder taking exactly three positional arguments with other names is called positionally, the
            0.1 convention.)
        description: one line for ``elf models``.
        split_point: the default ELF cut, a point name or a function of ``(H, W)`` returning one; None keeps the
            model's own ``elf_split_point`` (or none: ``split_at="auto"`` then chooses).
        options: leaf modules and autowrap functions that every trace of this model uses.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str = ""
    split_point: SplitPointSpec = None
    options: SplitOptions = field(default_factory=SplitOptions)

    def default_point(self, im_size: tuple[int, int]) -> str | None:
        """The registered default cut for images of ``(H, W)``, or None."""
        point = self.split_point(im_size) if callable(self.split_point) else self.split_point
        if point is not None and not isinstance(point, str):
            raise ELFError(f"{self.name}: split_point must be a name or return one, got {point!r}")
        return point

    def build(self, channel: int, num_classes: int, im_size: tuple[int, int], **kwargs: Any) -> nn.Module:
        """Call the builder for ``channel``-channel ``(H, W)`` images and ``num_classes`` classes; checks the result."""
        where = f"{getattr(self.builder, '__module__', '?')}.{getattr(self.builder, '__qualname__', self.builder)}"
        args, call_kwargs = _builder_arguments(self.builder, channel, num_classes, im_size, kwargs)
        try:
            inspect.signature(self.builder).bind(*args, **call_kwargs)
        except TypeError as e:
            raise ELFError(
                f"model {self.name!r}: its builder {where} cannot be called with {sorted(call_kwargs) or 'no arguments'} "
                f"({e}); a builder takes any of channel=, num_classes=, im_size=(H, W) and its own keyword arguments"
            ) from e
        except ValueError:  # no signature to check (some builtins): call and see
            pass
        model = self.builder(*args, **call_kwargs)
        if not isinstance(model, nn.Module):
            raise ELFError(f"model {self.name!r}: its builder {where} returned {type(model).__name__}, not an nn.Module")
        point = self.default_point(im_size)
        if point is not None:
            model.elf_split_point = point  # type: ignore[assignment]
        if self.options.leaf_modules or self.options.autowrap_functions:
            model.elf_split_options = self.options  # type: ignore[assignment]
        return model


def _builder_arguments(builder: Callable[..., nn.Module], channel: int, num_classes: int, im_size: tuple[int, int],
                       kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``builder``: the image arguments it accepts, and ``kwargs``."""
    image = {"channel": channel, "num_classes": num_classes, "im_size": im_size}
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return (), {**image, **kwargs}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return (), {**image, **kwargs}
    named = [k for k in _IMAGE_ARGS if k in params]
    positional = [p for p in params.values() if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                              inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if not named and len(positional) >= 3 and all(p.default is inspect.Parameter.empty for p in positional[:3]):
        return (channel, num_classes, im_size), dict(kwargs)  # builder(c, k, s): the 0.1 convention
    return (), {**{k: image[k] for k in named}, **kwargs}


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    builder: Callable[..., nn.Module] | None = None,
    description: str = "",
    *,
    split_point: SplitPointSpec = None,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    override: bool = False,
) -> Any:
    """Make ``create_model(name)`` (and ``elf eval --models NAME``, studies, ``elf split-points``) build a model.

    Use as a decorator or a call::

        @elf.register_model("MyNet", split_point="blocks.2", leaf_modules=[MyAttention])
        def my_net(num_classes: int = 10, im_size=(32, 32), width: int = 64) -> nn.Module: ...

        elf.register_model("MyNet", my_net, "my CNN", split_point=lambda hw: "stage3" if hw[0] <= 32 else "stage4")

    Args:
        name: the model name (case, '-' and '_' are ignored when looking it up); names starting with
            "torchvision.", "tv." or "timm." are reserved.
        builder: returns the model; takes any of ``channel``, ``num_classes``, ``im_size`` ``(H, W)`` and its own
            keyword arguments (``create_model("MyNet", width=32)``, ``--models MyNet:width=32``).
        description: one line for ``elf models`` (default: the builder's first docstring line).
        split_point: the default ELF cut: a point name, or a function of the image size ``(H, W)`` returning one.
        leaf_modules, autowrap_functions: how torch.fx traces this model, everywhere it is traced.
        override: replace an existing registration (a built-in included); without it that is an error.

    Returns:
        The builder (so the decorator leaves the function usable), or the decorator when ``builder`` is omitted.
    """
    if not isinstance(name, str) or not name.strip():
        raise ELFError(f"register_model needs a non-empty name, got {name!r}")
    if name.startswith(RESERVED_PREFIXES):
        raise ELFError(f"model names starting with {', '.join(RESERVED_PREFIXES)} are reserved for torchvision and timm; "
                       f"register {name!r} under another name")
    options = SplitOptions(None, tuple(leaf_modules), tuple(autowrap_functions))
    if split_point is not None and not (isinstance(split_point, str) or callable(split_point)):
        raise ELFError(f"split_point must be a point name or a function of (H, W), got {split_point!r}")

    def register(fn: Builder) -> Builder:
        if not callable(fn):
            raise ELFError(f"register_model({name!r}): the builder must be callable, got {type(fn).__name__}")
        key = _flat(name)
        clash = next((k for k in _REGISTRY if _flat(k) == key), None)
        if clash is None and _CONVNET_RE.match(_canonical(name, aliases=False)):  # "ConvNet_L3" may be registered
            clash = name
        if clash is not None and not override:
            raise ELFError(f"a model named {clash!r} is already registered; pass override=True to replace it, or choose "
                           "another name")
        if clash is not None:
            _REGISTRY.pop(clash, None)
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        _REGISTRY[name] = ModelInfo(name, fn, description or (doc[0] if doc else ""), split_point, options)
        return fn

    return register if builder is None else register(builder)


def _convnet_from_name(name: str, overrides: dict[str, object]) -> Callable[..., nn.Module] | None:
    from .convnet import ConvNet

    m = _CONVNET_RE.match(name)
    if not m:
        return None
    kw: dict[str, object] = {}
    given: dict[str, str] = {}
    for tok in _CONVNET_TOKEN.findall(m.group(1)):
        if tok[0] == "W" and tok[1:].isdigit():
            key, value = "width", int(tok[1:])
        elif tok[0] == "D" and tok[1:].isdigit():
            key, value = "depth", int(tok[1:])
        elif tok in _NORM_CODES:
            key, value = "norm", _NORM_CODES[tok]
        elif tok in _ACT_CODES:
            key, value = "activation", _ACT_CODES[tok]
        elif tok in _POOL_CODES:
            key, value = "pooling", _POOL_CODES[tok]
        else:
            continue
        if key in given:  # ConvNetBNIN, ConvNetD4D3: not the last part silently
            raise ELFError(f"model name {name!r} gives the ConvNet's {key} twice ({given[key]} and {tok}); give it once")
        given[key], kw[key] = tok, value
    kw.update(overrides)
    return lambda channel, num_classes, im_size: ConvNet(channel, num_classes, im_size=im_size, **kw)  # type: ignore[arg-type]


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
    "ConvNetASwish": "ConvNet with Swish (x * sigmoid(x)); ConvNetASwishBN is in DM's BatchNorm evaluation pool",
    "ConvNetMP": "ConvNet with max pooling",
    "ConvNetNP": "ConvNet without pooling",
}


def list_models() -> dict[str, str]:
    """Model names -> one-line description: built-ins, registered models and plugins (``elf_dd.models`` entry
    points). ConvNet names combine tokens: ``ConvNetW512BN``, ``ConvNetD4W512``."""
    from ..plugins import load_entry_points

    load_entry_points()
    out = dict(_CONVNET_EXAMPLES)
    for k, v in _REGISTRY.items():
        cut = v.split_point if isinstance(v.split_point, str) else ("by image size" if v.split_point else None)
        out[k] = v.description + (f" [default cut {cut}]" if cut and cut not in v.description else "")
    out["torchvision.<name>"] = "any torchvision classification model, e.g. torchvision.resnet18 (no default cut)"
    out["timm.<name>"] = "any timm model when timm is installed, e.g. timm.resnet18 (no default cut)"
    return out


def model_info(name: str) -> ModelInfo | None:
    """The registration behind ``name`` (case, '-' and '_' ignored), or None for ConvNet names, torchvision and timm."""
    from ..plugins import load_entry_points

    load_entry_points()
    return _REGISTRY.get(_canonical(parse_model_spec(name)[0]))


def create_model(name: str, channel: int = 3, num_classes: int = 10, im_size: tuple[int, int] = (32, 32), **kwargs: object) -> nn.Module:
    """Build a model by name: a literature name, a registered or plugin model, ``torchvision.*`` or ``timm.*``.

    Args:
        name: e.g. "ConvNet", "ConvNet-BN", "ConvNetW512", "ResNet18BN", "VGG11", "AlexNet",
            "torchvision.resnet18", "timm.resnet18", a registered "MyNet"; ``"NAME:key=value,..."`` adds keyword
            arguments (see :func:`parse_model_spec`).
        channel: input channels. num_classes: classes. im_size: input (H, W).
        kwargs: ConvNet arguments (``width=64``) for ConvNet names, a registered builder's own keyword arguments,
            or torchvision/timm constructor arguments.
    """
    from ..plugins import load_entry_points

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
    load_entry_points()
    canonical = _canonical(name)
    im = (int(im_size[0]), int(im_size[1]))
    if canonical in _REGISTRY:
        model = _REGISTRY[canonical].build(channel, num_classes, im, **kwargs)
    else:
        builder = _convnet_from_name(canonical, dict(kwargs))
        if builder is None:
            known = list(list_models())
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ELFError(f"unknown model {name!r}.{hint} Known: {', '.join(known)} (see `elf models`; models of "
                           "your own: elf.register_model, or --import MODULE on the command line).")
        try:
            model = builder(channel, num_classes, im)
        except TypeError as e:
            raise ELFError(f"{name}: bad ConvNet argument ({e}); ConvNet takes width, depth, activation, norm, pooling") from e
    # the spec that builds it again: its constructor arguments too (records name "ConvNet:width=32", not "ConvNet")
    model.elf_model_name = model_spec(canonical, kwargs)  # type: ignore[assignment]
    return model


def model_spec(name: str, kwargs: Mapping[str, object] | None = None) -> str:
    """``"NAME:key=value,..."`` (values as Python literals), the inverse of :func:`parse_model_spec`."""
    if not kwargs:
        return name
    return f"{name}:" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())


def build_model(spec: str | nn.Module | Callable[[], nn.Module], image_shape: tuple[int, int, int], num_classes: int,
                *, fresh: bool = True) -> nn.Module:
    """The one way the trainer and the evaluation helpers turn a model spec into a module.

    Args:
        spec: a name for :func:`create_model`, a module (a re-initialized deep copy is returned when ``fresh``, via
            each submodule's ``reset_parameters``; the module itself when not), or a zero-argument factory.
        image_shape: ``(C, H, W)`` of the images. num_classes: classes of the labels.
    """
    import copy

    c, h, w = (int(v) for v in image_shape)
    if isinstance(spec, str):
        return create_model(spec, channel=c, num_classes=num_classes, im_size=(h, w))
    if isinstance(spec, nn.Module):
        if not fresh:
            return spec
        model = copy.deepcopy(spec)
        kept = []
        for prefix, m in model.named_modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                kept += [f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False)]
        if kept:
            shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
            warnings.warn(f"model given as a module: {shown} belong to modules without reset_parameters(), so every "
                          "seed starts from the given module's values for them; pass a factory (e.g. "
                          "lambda: MyNet()) for a fresh initialization per seed", stacklevel=2)
        return model
    if callable(spec):
        model = spec()
        if not isinstance(model, nn.Module):
            raise ELFError(f"the model factory returned {type(model).__name__}, not an nn.Module")
        return model
    raise ELFError(f"model must be a name, an nn.Module, a factory or (front, rear); got {type(spec).__name__}")


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
    for item in filter(None, (part.strip() for part in _top_level_items(rest))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ELFError(f"model spec {spec!r}: expected NAME:key=value[,key=value...], got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name, kwargs


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes (``depths=(1, 1),x=2`` -> two items)."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _flat(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


#: The ELF code's names for its layered models (``ConvNet_L3``, ``ResNet18_Layered``, ``VGG11ImageNet_L6``, ...): the
#: same networks as ours, the suffix naming where its forward splits (here: the default split point). Only the names
#: its ``get_network`` knows are aliases: another number would name another cut, not ours.
_ELF_LAYERED = re.compile(r"^(.+?)_(L\d+|Layered)$", re.IGNORECASE)
_ELF_LAYERED_NAMES = (
    "ConvNet_L3", "ConvNetNN_L3", "ConvNetBN_L3", "ConvNetLN_L3", "ConvNetIN_L3", "ConvNetGN_L3", "ConvNetD4_L4",
    "ConvNetD4BN_L4", "ConvNetW512_L3", "ConvNetW256_L3", "ConvNetD4W256_L4", "ConvNetD4W512_L4", "VGG11_L5",
    "VGG11BN_L5", "ResNet18_Layered", "ResNet18BN_Layered", "ResNet18ImageNet_L4", "ResNet18BNImageNet_L4",
    "VGG11ImageNet_L6", "VGG11BNImageNet_L6")
_ELF_ALIASES = {"vgg11imagenet": "VGG11", "vgg11bnimagenet": "VGG11BN"}  # its 64x64 VGG: our VGG11 at 64x64


def _canonical(name: str, aliases: bool = True) -> str:
    """The registry's spelling of ``name`` (case, '-' and '_' ignored); with ``aliases`` also the ELF code's names."""
    flat = name.replace("-", "").replace("_", "")
    for key in list(_REGISTRY) + ["ConvNet"]:
        if flat.lower() == _flat(key):
            return key
    layered = _ELF_LAYERED.match(name) if aliases else None
    if layered:
        if name.replace("-", "").lower() not in {n.lower() for n in _ELF_LAYERED_NAMES}:
            raise ELFError(f"{name!r} is not one of the ELF code's layered models (its suffix names where the model is "
                           f"cut: {', '.join(_ELF_LAYERED_NAMES)}); give the plain name "
                           f"{layered.group(1)!r} and the cut with split_at= / --split-at (elf split-points lists them)")
        return _canonical(layered.group(1))
    if aliases and flat.lower() in _ELF_ALIASES:
        return _ELF_ALIASES[flat.lower()]
    if flat.lower().startswith("convnet"):
        return "ConvNet" + flat[len("convnet") :].upper().replace("ASWISH", "ASwish")  # tokens are upper case but one
    return flat


def canonical_name(name: str) -> str:
    """The registry's spelling of a model name: ``"resnet18-bn"`` -> ``"ResNet18BN"``, ``"ConvNet_L3"`` ->
    ``"ConvNet"`` (case, '-' and '_' ignored; the ELF code's layered names resolved); keyword arguments dropped."""
    return _canonical(parse_model_spec(name)[0])


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
        f"{type(model).__name__} has no default ELF split point: name the cut explicitly (a student: split_at=; "
        "a teacher: FeatureBank.build(point=), ELFTrainer(teacher_point=), --teacher-point), or declare one with "
        "register_model(..., split_point=); elf.list_split_points(model, input_shape) lists the valid points and "
        "their output shapes"
    )
