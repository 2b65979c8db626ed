"""Learnable pixels: the parameterization of DC, DSA, DM and MTT, with IDC's optional multi-formation.

``factor = 1``: the synthetic set is a tensor ``(K * ipc, C, H, W)`` of learnable normalized pixels.

``factor = f > 1`` (multi-formation, IDC, Kim et al. ICML 2022; also used by Acc-DD): each of the ``ipc`` *stored*
images of a class holds an ``f x f`` grid of tiles of size ``(H / f, W / f)``; decoding splits the grid and upsamples
every tile bilinearly to ``(H, W)``, so a class decodes to ``ipc * f**2`` training images at the storage cost of
``ipc``. Initialization from real images tiles ``f**2`` downsampled real images into each stored image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ELFError
from ..pixel_space import Normalization
from ..synthetic import SyntheticSet
from .base import Parameterization
from .real import RealSampler

__all__ = ["PixelParam", "encode_tiles", "decode_tiles"]

INITS = ("real", "noise")


def decode_tiles(stored: Tensor, factor: int, size: tuple[int, int]) -> Tensor:
    """``(M, C, H, W)`` stored images -> ``(M * f**2, C, H, W)`` decoded images, tile-major within each stored image
    (decoded index ``j * f**2 + r * f + s`` is tile row ``r``, column ``s`` of stored image ``j``), each tile
    bilinearly upsampled to ``size``."""
    if factor == 1:
        return stored
    m, c, h, w = stored.shape
    th, tw = h // factor, w // factor
    tiles = stored.reshape(m, c, factor, th, factor, tw).permute(0, 2, 4, 1, 3, 5).reshape(m * factor * factor, c, th, tw)
    return F.interpolate(tiles, size=size, mode="bilinear", align_corners=False)


def encode_tiles(images: Tensor, factor: int) -> Tensor:
    """Inverse layout of :func:`decode_tiles`: ``(M * f**2, C, H, W)`` full-size images -> ``(M, C, H, W)`` stored
    images, each image downsampled (antialiased bilinear) to ``(H / f, W / f)`` and placed in the grid."""
    if factor == 1:
        return images
    n, c, h, w = images.shape
    if n % (factor * factor):
        raise ELFError(f"encode_tiles needs a multiple of factor**2 = {factor * factor} images, got {n}")
    th, tw = h // factor, w // factor
    small = F.interpolate(images, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    m = n // (factor * factor)
    return small.reshape(m, factor, factor, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(m, c, h, w)


class PixelParam(Parameterization):
    """Learnable pixels ``(K * ipc, C, H, W)`` in the normalized space of the real data.

    Args:
        num_classes: K. ipc: stored images per class (the storage budget).
        image_shape: ``(C, H, W)``. normalization: the pixel space (recorded on export; taken from the sampler when
            None and a sampler is given).
        init: "real" (random distinct real images of each class, drawn from ``sampler`` with ``generator``) or
            "noise" (standard Gaussian in normalized space, as DC's default).
        sampler: a :class:`RealSampler` (required for ``init="real"``); the pixels are created on its device.
        generator: the ``torch.Generator`` the initialization draws from (on the sampler's device, or on ``device``
            for noise).
        factor: multi-formation factor f (1: off). ``images()`` then has ``ipc * f**2`` images per class; H and W
            must be divisible by f.
        lr, momentum: the "pixels" optimizer group (method defaults live in the CLI presets: DM 1.0 / 0.5, DC/DSA
            0.1 / 0.5, from the public DC/DSA/DM code).
        device: where noise-initialized pixels live (default: the sampler's device, else CPU).
    """

    def __init__(
        self,
        num_classes: int,
        ipc: int,
        image_shape: tuple[int, int, int],
        normalization: Normalization | None = None,
        *,
        init: str = "real",
        sampler: RealSampler | None = None,
        generator: torch.Generator | None = None,
        factor: int = 1,
        lr: float = 1.0,
        momentum: float = 0.5,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ELFError(f"factor must be an integer >= 1 (1 turns multi-formation off), got {factor!r}")
        if init not in INITS:
            raise ELFError(f"init must be one of {INITS}, got {init!r}")
        if lr <= 0 or momentum < 0:
            raise ELFError(f"need lr > 0 and momentum >= 0 for the pixels, got lr={lr}, momentum={momentum}")
        if normalization is None and sampler is not None:
            normalization = sampler.normalization
        super().__init__(num_classes, ipc * factor * factor, image_shape, normalization)
        c, h, w = self.image_shape
        if h % factor or w % factor:
            raise ELFError(f"multi-formation factor {factor} must divide the image size {h}x{w}; pick a factor that divides both")
        self.storage_ipc = int(ipc)
        self.factor = factor
        self.init = init
        self.lr = float(lr)
        self.momentum = float(momentum)
        if sampler is not None:
            if sampler.num_classes != num_classes:
                raise ELFError(f"the real data has {sampler.num_classes} classes but num_classes={num_classes}")
            if sampler.image_shape != self.image_shape:
                raise ELFError(f"the real images are {sampler.image_shape} but image_shape={self.image_shape}")
        dev = torch.device(device) if device is not None else (sampler.device if sampler is not None else torch.device("cpu"))
        if init == "noise":
            data = torch.randn((num_classes * ipc, c, h, w), generator=generator, device=dev)
        else:
            if sampler is None:
                raise ELFError("init='real' needs real images: pass sampler=RealSampler(...) (or use init='noise')")
            per = ipc * factor * factor
            blocks = []
            for k in range(num_classes):
                if sampler.counts[k] < per:
                    raise ELFError(
                        f"init='real' needs {per} distinct real images of class {k} (ipc {ipc} x factor**2 {factor * factor}) "
                        f"but there are {sampler.counts[k]}; use fewer images per class, a smaller factor, or init='noise' (--init noise)"
                    )
                blocks.append(encode_tiles(sampler.batch(k, per, generator), factor))
            data = torch.cat(blocks).to(dev)
        self.pixels = nn.Parameter(data.detach().clone().float())
        self.labels = self.labels.to(dev)

    def images(self) -> Tensor:
        """Decoded images ``(K * ipc * f**2, C, H, W)``, class-major, differentiable w.r.t. the pixels."""
        return decode_tiles(self.pixels, self.factor, self.image_shape[1:])  # type: ignore[arg-type]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.pixels], "lr": self.lr, "momentum": self.momentum, "name": "pixels"}]

    def metadata(self) -> dict[str, str]:
        """Settings recorded in the exported set."""
        return {"init": self.init, "factor": str(self.factor), "storage_ipc": str(self.storage_ipc),
                "lr_pixels": repr(self.lr), "momentum_pixels": repr(self.momentum)}

    @torch.no_grad()
    def export(self, metadata: dict[str, str] | None = None, lr: float | None = None) -> SyntheticSet:
        """The current set (a copy: later updates of the pixels do not change it), with :meth:`metadata`."""
        sset = super().export({**self.metadata(), **(metadata or {})}, lr=lr)
        if sset.images.data_ptr() == self.pixels.data_ptr():  # factor 1 on the CPU: detach().cpu() is a view
            sset.images = sset.images.clone()
        return sset
