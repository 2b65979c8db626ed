"""Differentiable Siamese Augmentation (DSA) as used by dataset-distillation evaluation.

DSA (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021) is a set of
image augmentations written with differentiable tensor operations, so gradients flow back to the (synthetic)
images. The official ELF evaluation trains every student on DSA-augmented images with the strategy
``"color_crop_cutout_flip_scale_rotate"`` in mode ``"S"``: one op is chosen per batch and applied with
per-sample random parameters.

Design points of this implementation (our own code, following the published definitions):

* Sampling and applying are separate: :meth:`DSA.sample` draws a :class:`DSASample` (the op names and the
  parameter tensors), :meth:`DSA.apply` applies it. Applying one sample to two batches gives the *Siamese*
  augmentation; ``batch_shared=True`` draws one parameter set for the whole batch, which can then be applied to
  batches of any size. Both sides are table-driven: one sampler and one apply function per op.
* Per-sample random numbers are drawn on the images' device from the caller's ``generator`` (or the global RNG of
  that device). The op choice in mode ``"S"`` is drawn on the CPU (from ``op_generator``, the DSA object's own
  seeded generator, or torch's global CPU RNG), so no call ever waits for the accelerator: there is no
  ``.item()``/``.cpu()`` on device tensors and no Python branching on tensor values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ELFError

__all__ = [
    "AUGMENT_OPS",
    "OFFICIAL_STRATEGY",
    "DSAParams",
    "DSASample",
    "DSA",
    "parse_strategy",
]

#: The ops DSA knows, in the order the official code lists them.
AUGMENT_OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

#: The strategy of the official DSA/ELF evaluation.
OFFICIAL_STRATEGY = "color_crop_cutout_flip_scale_rotate"

_MODES = ("S", "M")


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the DSA ops; the defaults are the official ones (DSA paper and public code, used by ELF).

    Attributes:
        prob_flip: probability of a horizontal flip.
        ratio_scale: scale factors are drawn from U(1/ratio_scale, ratio_scale), per axis.
        ratio_rotate: rotation angles are drawn from U(-ratio_rotate, ratio_rotate) degrees.
        ratio_crop_pad: maximal integer translation, as a fraction of the side (rounded half up).
        ratio_cutout: side of the cut-out square, as a fraction of the side (rounded half up).
        brightness: additive brightness shift is (u - 0.5) * brightness, u ~ U(0, 1).
        saturation: saturation factor is u * saturation, u ~ U(0, 1).
        contrast: contrast factor is u + contrast, u ~ U(0, 1).
    """

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ELFError(f"DSAParams.{f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ELFError(f"DSAParams.{f.name} must be >= 0, got {value!r}")
        if self.prob_flip > 1:
            raise ELFError(f"DSAParams.prob_flip must be in [0, 1], got {self.prob_flip!r}")
        if self.ratio_cutout > 1:
            raise ELFError(f"DSAParams.ratio_cutout must be in [0, 1], got {self.ratio_cutout!r}")
        if self.ratio_scale <= 0:
            raise ELFError(f"DSAParams.ratio_scale must be > 0 (1.0 turns scaling off), got {self.ratio_scale!r}")


@dataclass(frozen=True)
class DSASample:
    """One draw of DSA parameters: which ops to apply, in order, and their parameter tensors.

    Every parameter tensor has a leading batch dimension of size N (one set per sample) or 1 (one set shared by
    the whole batch; it broadcasts to any batch size). Only the fields of the ops in :attr:`ops` are needed.

    Attributes:
        ops: op names applied in this order (one op in mode ``"S"``, the whole strategy in mode ``"M"``,
            none for the identity).
        brightness: (N,) additive shift.
        saturation: (N,) factor applied to the deviation from the per-pixel channel mean.
        contrast: (N,) factor applied to the deviation from the per-image mean.
        crop: (N, 2) integer shifts (dy, dx): ``out[..., i, j] = x[..., i + dy, j + dx]``, 0 outside the image.
        cutout: (N, 2) integer centres (cy, cx); the zeroed square covers rows ``cy - size_h // 2`` to
            ``cy - size_h // 2 + size_h - 1`` (likewise columns), clipped to the image, where
            ``size_h = int(H * ratio_cutout + 0.5)`` is computed when applied, from the DSA's params.
        flip: (N,) bool, True flips horizontally (last dimension).
        scale: (N, 2) factors (sx, sy) of the normalized sampling grid (sx along the width); > 1 shrinks the image.
        rotate: (N,) angles in degrees.
    """

    ops: tuple[str, ...]
    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    crop: Tensor | None = None
    cutout: Tensor | None = None
    flip: Tensor | None = None
    scale: Tensor | None = None
    rotate: Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        """The batch size the parameters were drawn for (1 when shared), or None for the identity."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                return int(value.shape[0])
        return None

    def to(self, device: torch.device | str) -> DSASample:
        """A copy with every parameter tensor on ``device``."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, Tensor) else value
        return DSASample(**moved)


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """Split a DSA strategy such as ``"color_crop_flip"`` into op names; ``None``/``"none"``/``""`` -> ``()``."""
    if strategy is None:
        return ()
    if not isinstance(strategy, str):
        raise ELFError(f"DSA strategy must be a string or None, got {type(strategy).__name__}")
    text = strategy.strip()
    if text == "" or text.lower() == "none":
        return ()
    ops = tuple(text.split("_"))
    unknown = [op for op in ops if op not in AUGMENT_OPS]
    if unknown:
        raise ELFError(
            f"unknown DSA op(s) {unknown} in strategy {strategy!r}; valid ops are {list(AUGMENT_OPS)} joined "
            f"by '_' (e.g. {OFFICIAL_STRATEGY!r}), or 'none' for no augmentation"
        )
    return ops


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ELFError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gdev = generator.device
    same = gdev.type == device.type and (gdev.index is None or device.index is None or gdev.index == device.index)
    if not same:
        raise ELFError(
            f"the generator lives on {gdev} but the images on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


class DSA:
    """Differentiable Siamese Augmentation.

    Args:
        strategy: ops joined by ``'_'`` (from :data:`AUGMENT_OPS`); ``None`` or ``"none"`` turns DSA off.
        params: the ranges of the ops (:class:`DSAParams`, official defaults).
        mode: ``"S"`` applies one op chosen uniformly per call (official default); ``"M"`` applies every op of the
            strategy in order.
        seed: seeds the DSA object's own CPU generator for the op choice of mode ``"S"``. Without a seed the op
            is drawn from torch's global CPU RNG (as the official code does), unless ``op_generator`` is passed.

    ``dsa(x, generator)`` returns augmented images; it works on any device, is differentiable with respect to
    ``x``, and never synchronizes with the device. Bit-identical outputs for the same seeds (CPU).
    """

    def __init__(
        self,
        strategy: str | None = OFFICIAL_STRATEGY,
        params: DSAParams | None = None,
        mode: str = "S",
        seed: int | None = None,
    ) -> None:
        if params is None:
            params = DSAParams()
        if not isinstance(params, DSAParams):
            raise ELFError(f"params must be a DSAParams, got {type(params).__name__}")
        if mode not in _MODES:
            raise ELFError(f"DSA mode must be one of {list(_MODES)} ('S': one op per call, 'M': all ops), got {mode!r}")
        self.ops: tuple[str, ...] = parse_strategy(strategy)
        self.strategy: str = "_".join(self.ops) if self.ops else "none"
        self.params: DSAParams = params
        self.mode: str = mode
        self._op_generator: torch.Generator | None = None
        if seed is not None:
            self.manual_seed(seed)

    # ------------------------------------------------------------------ state
    @property
    def enabled(self) -> bool:
        """False for the identity strategy."""
        return bool(self.ops)

    def manual_seed(self, seed: int) -> DSA:
        """Seed the CPU generator that chooses the op in mode ``"S"``; returns ``self``."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ELFError(f"DSA seed must be an int, got {seed!r}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self._op_generator = gen
        return self

    @property
    def op_generator(self) -> torch.Generator | None:
        """The DSA object's own CPU generator for the op choice (None until seeded)."""
        return self._op_generator

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        gen = state.pop("_op_generator")
        state["_op_generator_state"] = None if gen is None else gen.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        gen_state = state.pop("_op_generator_state")
        self.__dict__.update(state)
        self._op_generator = None
        if gen_state is not None:
            self._op_generator = torch.Generator(device="cpu")
            self._op_generator.set_state(gen_state)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, params={self.params!r})"

    # ------------------------------------------------------------------ sampling
    def _choose_ops(self, op_generator: torch.Generator | None) -> tuple[str, ...]:
        if self.mode == "M" or len(self.ops) <= 1:
            return self.ops
        gen = op_generator if op_generator is not None else self._op_generator
        if gen is not None and gen.device.type != "cpu":
            raise ELFError(f"op_generator must be a CPU torch.Generator (no device sync), got one on {gen.device}")
        # A CPU tensor: int() reads host memory, no accelerator synchronization.
        index = int(torch.randint(len(self.ops), (1,), generator=gen, device="cpu")[0])
        return (self.ops[index],)

    def sample(
        self,
        shape: torch.Size | tuple[int, ...] | Tensor,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        *,
        batch_shared: bool = False,
        op_generator: torch.Generator | None = None,
    ) -> DSASample:
        """Draw the op(s) and their parameters for a batch of images of the given shape.

        Args:
            shape: the batch's shape (N, C, H, W), e.g. ``x.shape``; a tensor stands for its own shape (and
                device, when ``device`` is None). H and W set the crop and cutout ranges.
            device: where the parameter tensors are drawn (the images' device); default CPU.
            generator: per-sample RNG, on ``device``; None uses that device's global RNG.
            batch_shared: draw one parameter set (leading dimension 1) for the whole batch, as DSA's Siamese
                distillation does; it applies to batches of any size.
            op_generator: CPU generator for the op choice in mode ``"S"`` (default: the object's own seeded
                generator, else torch's global CPU RNG).
        """
        if isinstance(shape, Tensor):
            if device is None:
                device = shape.device
            shape = shape.shape
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ELFError(f"shape must be the images' shape (N, C, H, W), got {shape!r}") from None
        if len(dims) != 4 or min(dims) < 0:
            raise ELFError(f"shape must be the images' shape (N, C, H, W), got {shape!r}")
        n, _, h, w = dims
        dev = torch.device("cpu") if device is None else torch.device(device)
        _check_generator(generator, dev)
        ops = self._choose_ops(op_generator)
        draw = _Draw(generator, dev, 1 if batch_shared else n, h, w)
        values: dict[str, Tensor] = {}
        for op in ops:  # one sampler per op, in the ops' order: the generator's draws follow that order
            values.update(_SAMPLE[op](draw, self.params))
        return DSASample(ops=ops, **values)

    # ------------------------------------------------------------------ applying
    def apply(self, x: Tensor, sample: DSASample) -> Tensor:
        """Apply a drawn :class:`DSASample` to ``x`` (N, C, H, W); differentiable with respect to ``x``.

        The ops applied are the sample's (``sample.ops``), not this object's strategy; this object supplies the
        cut-out ratio (the square's side is computed from ``x``'s H and W). Applying one sample to two batches
        gives them the same augmentation (Siamese use).
        """
        _check_images(x)
        if not isinstance(sample, DSASample):
            raise ELFError(f"sample must be a DSASample (from DSA.sample), got {type(sample).__name__}")
        for op in sample.ops:
            if op not in AUGMENT_OPS:
                raise ELFError(f"unknown DSA op {op!r} in sample; valid ops are {list(AUGMENT_OPS)}")
            x = _APPLY[op](x, sample, self.params)
        return x

    def apply_geometric(self, features: Tensor, sample: DSASample, image_size: tuple[int, int],
                        only: Sequence[str] | None = None) -> Tensor:
        """Apply the geometric part of ``sample`` (crop, flip, scale, rotate) to feature maps ``(N, C, h, w)`` of the
        images it augments (``image_size`` = their ``(H, W)``), so a teacher's map lines up with the student's view.

        Colour and cut-out change no geometry and are skipped. Crop shifts are converted to fractions of a feature
        cell (``dy * h / H``) and resampled bilinearly with zeros outside; flips, scales and rotations use the
        same normalized transform as on the images. ``only`` (e.g. ``("flip",)``) applies just those ops.
        """
        if features.dim() != 4 or not features.is_floating_point():
            raise ELFError(f"features must be float maps (N, C, h, w), got {tuple(features.shape)} {features.dtype}")
        for op in sample.ops:
            if only is not None and op not in only:
                continue
            if op == "crop":
                features = _shift_map(features, _int_param(sample, "crop", features), image_size)
            elif op in ("flip", "scale", "rotate"):
                features = _APPLY[op](features, sample, self.params)
        return features

    def __call__(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        batch_shared: bool = False,
        op_generator: torch.Generator | None = None,
    ) -> Tensor:
        """Augment ``x`` (N, C, H, W): ``apply(x, sample(x.shape, x.device, generator, ...))``.

        With the identity strategy ``x`` itself is returned (no copy).
        """
        if not self.ops:
            return x
        _check_images(x)
        s = self.sample(x.shape, x.device, generator, batch_shared=batch_shared, op_generator=op_generator)
        return self.apply(x, s)


# ---------------------------------------------------------------------- helpers

def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ELFError(f"DSA expects a tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ELFError(f"DSA expects images shaped (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ELFError(f"DSA expects floating-point images, got dtype {x.dtype}")


def _crop_shift(side: int, ratio: float) -> int:
    """Largest crop translation for a side: int(side * ratio + 0.5), as in the DSA code."""
    return int(side * ratio + 0.5)


def _cutout_size(side: int, ratio: float) -> int:
    """Cut-out side length: int(side * ratio + 0.5), as in the DSA code."""
    return int(side * ratio + 0.5)


def _param(sample: DSASample, name: str, x: Tensor, tail: tuple[int, ...]) -> Tensor:
    """The parameter tensor ``name`` on x's device, checked to be (1 or N, *tail)."""
    value = getattr(sample, name)
    if value is None:
        raise ELFError(f"the DSASample applies op {name!r} but has no {name!r} parameters")
    if not isinstance(value, Tensor):
        raise ELFError(f"DSASample.{name} must be a tensor, got {type(value).__name__}")
    n = x.shape[0]
    if value.dim() != 1 + len(tail) or tuple(value.shape[1:]) != tail or value.shape[0] not in (1, n):
        want = ", ".join(["1 or N"] + [str(t) for t in tail])
        raise ELFError(
            f"DSASample.{name} has shape {tuple(value.shape)} but the batch needs ({want}) with N={n}; "
            "draw the sample for this batch, or with batch_shared=True to reuse it across batch sizes"
        )
    return value.to(device=x.device)


class _Draw:
    """What a sampler draws with: ``count`` values per call from ``generator`` on ``device``, for images ``h`` x ``w``."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, count: int, h: int, w: int) -> None:
        self.generator, self.device, self.count, self.h, self.w = generator, device, count, h, w

    def rand(self) -> Tensor:
        """``count`` floats from U[0, 1)."""
        return torch.rand(self.count, generator=self.generator, device=self.device, dtype=torch.float32)

    def randint(self, low: int, high_inclusive: int) -> Tensor:
        """``count`` integers from U{low, ..., high_inclusive}."""
        return torch.randint(low, high_inclusive + 1, (self.count,), generator=self.generator, device=self.device)


# Samplers: one per op, each returning the DSASample fields of its op. The order of the draws inside a sampler is
# part of the reproducibility contract (tests pin the values): change it only with a new seed convention.


def _sample_color(d: _Draw, p: DSAParams) -> dict[str, Tensor]:
    brightness = (d.rand() - 0.5) * p.brightness
    saturation = d.rand() * p.saturation
    contrast = d.rand() + p.contrast
    return {"brightness": brightness, "saturation": saturation, "contrast": contrast}


def _sample_crop(d: _Draw, p: DSAParams) -> dict[str, Tensor]:
    sh, sw = _crop_shift(d.h, p.ratio_crop_pad), _crop_shift(d.w, p.ratio_crop_pad)
    dy = d.randint(-sh, sh)
    dx = d.randint(-sw, sw)
    return {"crop": torch.stack([dy, dx], dim=1)}


def _sample_cutout(d: _Draw, p: DSAParams) -> dict[str, Tensor]:
    ch, cw = _cutout_size(d.h, p.ratio_cutout), _cutout_size(d.w, p.ratio_cutout)
    # Centres as in the DSA paper's code: U{0, ..., H - 1 + (1 - size % 2)}.
    cy = d.randint(0, d.h - 1 + (1 - ch % 2))
    cx = d.randint(0, d.w - 1 + (1 - cw % 2))
    return {"cutout": torch.stack([cy, cx], dim=1)}


def _sample_flip(d: _Draw, p: DSAParams) -> dict[str, Tensor]:
    return {"flip": d.rand() < p.prob_flip}


def _sample_scale(d: _Draw, p: DSAParams) -> dict[str, Tensor]:
    r = p.ratio_scale
    lo, hi = min(r, 1.0 / r), max(r, 1.0 / r)
    sx = d.rand() * (hi - lo) + lo
    sy = d.rand() * (hi - lo) + lo
    return {"scale": torch.stack([sx, sy], dim=1)}


def _sample_rotate(d: _Draw, p: DSAParams) -> dict[str, Tensor]:
    return {"rotate": (d.rand() * 2.0 - 1.0) * p.ratio_rotate}


_SAMPLE = {
    "color": _sample_color,
    "crop": _sample_crop,
    "cutout": _sample_cutout,
    "flip": _sample_flip,
    "scale": _sample_scale,
    "rotate": _sample_rotate,
}


def _apply_color(x: Tensor, sample: DSASample, params: DSAParams) -> Tensor:
    b = _param(sample, "brightness", x, ()).to(x.dtype).view(-1, 1, 1, 1)
    s = _param(sample, "saturation", x, ()).to(x.dtype).view(-1, 1, 1, 1)
    c = _param(sample, "contrast", x, ()).to(x.dtype).view(-1, 1, 1, 1)
    x = x + b
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * s + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _int_param(sample: DSASample, name: str, x: Tensor) -> Tensor:
    value = _param(sample, name, x, (2,))
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ELFError(f"DSASample.{name} must hold integers, got dtype {value.dtype}")
    return value.to(torch.int64)


def _apply_crop(x: Tensor, sample: DSASample, params: DSAParams) -> Tensor:
    n, c, h, w = x.shape
    shift = _int_param(sample, "crop", x).expand(n, 2)
    # Zero-pad by one pixel and clamp the source indices into the padding: every pixel shifted in from outside
    # reads a zero. out[i, j] = x[i + dy, j + dx].
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(h, device=x.device).unsqueeze(0) + shift[:, :1] + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).unsqueeze(0) + shift[:, 1:] + 1).clamp(0, w + 1)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def _apply_cutout(x: Tensor, sample: DSASample, params: DSAParams) -> Tensor:
    centre = _int_param(sample, "cutout", x)
    h, w = x.shape[2], x.shape[3]
    # The square's side follows the images being augmented: int(side * ratio_cutout + 0.5).
    size_h, size_w = _cutout_size(h, params.ratio_cutout), _cutout_size(w, params.ratio_cutout)
    top = centre[:, :1] - size_h // 2
    left = centre[:, 1:] - size_w // 2
    ar_h = torch.arange(h, device=x.device).unsqueeze(0)
    ar_w = torch.arange(w, device=x.device).unsqueeze(0)
    in_rows = (ar_h >= top) & (ar_h < top + size_h)
    in_cols = (ar_w >= left) & (ar_w < left + size_w)
    keep = ~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))
    return x * keep.unsqueeze(1).to(x.dtype)


def _apply_flip(x: Tensor, sample: DSASample, params: DSAParams) -> Tensor:
    flip = _param(sample, "flip", x, ()).to(torch.bool).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _shift_map(m: Tensor, shift: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``out[i, j] = m[i + dy * h / H, j + dx * w / W]`` (bilinear, zeros outside) for integer image shifts (dy, dx)."""
    n = m.shape[0]
    big_h, big_w = image_size
    shift = shift.to(m.dtype).expand(n, 2)
    # with align_corners=False one image pixel spans 2 / H in normalized coordinates, whatever the map's size
    ty, tx = shift[:, 0] * (2.0 / big_h), shift[:, 1] * (2.0 / big_w)
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    theta = torch.stack([torch.stack([one, zero, tx], 1), torch.stack([zero, one, ty], 1)], 1)
    grid = F.affine_grid(theta, list(m.shape), align_corners=False)
    return F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _apply_scale(x: Tensor, sample: DSASample, params: DSAParams) -> Tensor:
    s = _param(sample, "scale", x, (2,)).to(x.dtype)
    sx, sy = s[:, 0], s[:, 1]
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _apply_rotate(x: Tensor, sample: DSASample, params: DSAParams) -> Tensor:
    angle = _param(sample, "rotate", x, ()).to(x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_APPLY = {
    "color": _apply_color,
    "crop": _apply_crop,
    "cutout": _apply_cutout,
    "flip": _apply_flip,
    "scale": _apply_scale,
    "rotate": _apply_rotate,
}
