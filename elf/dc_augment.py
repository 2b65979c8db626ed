"""DC's per-image augmentation (crop, noise, scale) for evaluating sets the way DC's ``main.py`` does.

Dataset Condensation (Zhao, Mopuri & Bilen, ICLR 2021) evaluates a ConvNet-BN student with its own augmentation,
not DSA: every image of a batch gets one op chosen uniformly from the strategy (``"crop_noise"`` for a ConvNet-BN
student on CIFAR; ``"crop_scale_rotate"`` on MNIST), with its published ranges:

* ``crop``: the image is padded by ``crop`` pixels with the batch's per-channel mean and a window of the original
  size is taken at offsets ``0 .. 2 * crop - 1`` in each direction (shifts ``-crop .. crop - 1``);
* ``noise``: ``noise * N(0, 1)`` added per pixel;
* ``scale``: each side resized (nearest) by a factor from ``U(1 - scale, 1 + scale)``, centred on a zero canvas and
  centre-cropped back to the original size.

DC's ``rotate`` uses SciPy's spline rotation, which is not reproduced here: a strategy with it is refused. The
object has the interface the trainer's loop uses for :class:`~elf.augment.DSA` (``ops``, ``sample``, ``apply``,
``op_generator``), so protocols select it with ``augment="dc:crop_noise"`` (:func:`make_augmentation`). It is not
differentiable in its parameters and has no geometric transform for feature maps (``align_targets`` is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import DSA
from .errors import ELFError

__all__ = ["DC_PREFIX", "DC_OPS", "DCAugment", "DCSample", "make_augmentation"]

#: How a protocol's ``augment`` names DC's augmentation: ``"dc:" + strategy``, e.g. ``"dc:crop_noise"``.
DC_PREFIX = "dc:"
#: The ops of DC's ``augment`` that elf-dd implements.
DC_OPS: tuple[str, ...] = ("crop", "noise", "scale")


@dataclass(frozen=True)
class DCSample:
    """One batch's draw: ``choice`` ``(N,)`` indexes ``ops`` per image; the ops' parameters (None when unused):
    ``shift`` ``(N, 2)`` crop window offsets in pixels, ``noise`` ``(N, C, H, W)``, ``size`` ``(N, 2)`` scaled
    heights and widths in pixels."""

    ops: tuple[str, ...]
    choice: Tensor
    shift: Tensor | None = None
    noise: Tensor | None = None
    size: Tensor | None = None


class DCAugment:
    """DC's augmentation: one op per image, chosen uniformly from ``strategy`` (ops joined by ``'_'``).

    Args:
        strategy: e.g. ``"crop_noise"`` (DC's choice for a ConvNet-BN student); ops from :data:`DC_OPS`.
        crop, noise, scale: DC's ranges (4 pixels, 0.001, 0.2).

    All random numbers come from the caller's per-sample ``generator`` on the images' device, so a seeded loop is
    repeatable. ``scale`` reads the drawn sizes on the host (one sync per batch that uses it).
    """

    def __init__(self, strategy: str = "crop_noise", *, crop: int = 4, noise: float = 0.001, scale: float = 0.2) -> None:
        ops = tuple(s for s in str(strategy).split("_") if s)
        if not ops:
            raise ELFError(f"DC augmentation strategy {strategy!r} names no op; use ops from {list(DC_OPS)}, e.g. "
                           "'crop_noise'")
        if "rotate" in ops:
            raise ELFError(f"DC augmentation {strategy!r}: 'rotate' (DC rotates with SciPy's spline interpolation) is "
                           f"not implemented; the ops are {list(DC_OPS)}")
        unknown = [op for op in ops if op not in DC_OPS]
        if unknown:
            raise ELFError(f"DC augmentation {strategy!r}: unknown op(s) {unknown}; the ops are {list(DC_OPS)}")
        if crop < 1 or noise < 0 or not 0 <= scale < 1:
            raise ELFError(f"DC augmentation ranges: crop >= 1, noise >= 0 and 0 <= scale < 1; got crop={crop}, "
                           f"noise={noise}, scale={scale}")
        self.ops, self.crop, self.noise, self.scale = ops, int(crop), float(noise), float(scale)

    @property
    def strategy(self) -> str:
        return "_".join(self.ops)

    @property
    def op_generator(self) -> None:
        """None: the op is drawn per image from the per-sample generator (a :class:`~elf.augment.DSA` draws its op
        per batch from a generator of its own, which a saved training state records)."""
        return None

    def __repr__(self) -> str:
        return f"DCAugment(strategy={self.strategy!r}, crop={self.crop}, noise={self.noise}, scale={self.scale})"

    def sample(self, shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> DCSample:
        """Draw the ops and their parameters for a batch of shape ``(N, C, H, W)`` on ``device``."""
        n, c, h, w = (int(d) for d in shape)
        dev = torch.device("cpu") if device is None else torch.device(device)
        choice = torch.randint(len(self.ops), (n,), generator=generator, device=dev)
        shift = noise = size = None
        if "crop" in self.ops:
            shift = torch.randint(2 * self.crop, (n, 2), generator=generator, device=dev)
        if "noise" in self.ops:
            noise = self.noise * torch.randn((n, c, h, w), generator=generator, device=dev)
        if "scale" in self.ops:
            factor = 1 - self.scale + 2 * self.scale * torch.rand((n, 2), generator=generator, device=dev)
            size = (factor * torch.tensor([h, w], device=dev)).long()  # int() of DC's floats: truncation
        return DCSample(self.ops, choice, shift, noise, size)

    def apply(self, x: Tensor, sample: DCSample) -> Tensor:
        """The augmented batch: each image ``x[i]`` ``(C, H, W)`` through its op ``sample.ops[sample.choice[i]]``."""
        if x.dim() != 4:
            raise ELFError(f"DC augmentation expects images (N, C, H, W), got shape {tuple(x.shape)}")
        out = x
        for k, op in enumerate(sample.ops):
            chosen = (sample.choice == k).view(-1, 1, 1, 1)
            out = torch.where(chosen, _APPLY[op](self, x, sample), out)
        return out

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``apply(x, sample(x.shape, x.device, generator))``."""
        return self.apply(x, self.sample(x.shape, x.device, generator))


def _crop(aug: DCAugment, x: Tensor, sample: DCSample) -> Tensor:
    n, c, h, w = x.shape
    p = aug.crop
    mean = x.mean(dim=(0, 2, 3)).view(1, c, 1, 1)  # the batch's per-channel mean, as DC pads
    padded = mean.expand(n, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p:p + h, p:p + w] = x
    assert sample.shift is not None
    rows = sample.shift[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = sample.shift[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _noise(aug: DCAugment, x: Tensor, sample: DCSample) -> Tensor:
    assert sample.noise is not None
    return x + sample.noise.to(x.dtype)


def _scale(aug: DCAugment, x: Tensor, sample: DCSample) -> Tensor:
    n, c, h, w = x.shape
    assert sample.size is not None
    out = torch.empty_like(x)
    for i, (sh, sw) in enumerate(sample.size.tolist()):
        resized = F.interpolate(x[i:i + 1], size=[sh, sw])[0]  # nearest, DC's call
        m = max(sh, sw, h, w)
        canvas = x.new_zeros(c, m, m)
        top, left = (m - sh) // 2, (m - sw) // 2
        canvas[:, top:top + sh, left:left + sw] = resized
        top, left = (m - h) // 2, (m - w) // 2
        out[i] = canvas[:, top:top + h, left:left + w]
    return out


_APPLY = {"crop": _crop, "noise": _noise, "scale": _scale}


def make_augmentation(strategy: str | None, mode: str = "S", seed: int | None = None) -> DSA | DCAugment | None:
    """The augmentation a protocol's ``augment`` names: ``None``/``"none"`` none, ``"dc:<ops>"`` :class:`DCAugment`,
    else a :class:`~elf.augment.DSA` strategy (``mode`` and ``seed`` go to it)."""
    if strategy is None or strategy == "none":
        return None
    if isinstance(strategy, str) and strategy.startswith(DC_PREFIX):
        return DCAugment(strategy[len(DC_PREFIX):])
    dsa = DSA(strategy, mode=mode, seed=seed)
    return dsa if dsa.ops else None
