"""Pixel space: the normalization conventions and ZCA whitening that synthetic sets, teachers and banks live in.

A *pixel space* is how float images are prepared before a model sees them: per-channel :class:`Normalization`
(the code bases disagree, see :data:`CIFAR10_MTT` and :data:`CIFAR100_DC`), optionally followed by :class:`ZCA`
whitening. :func:`space_metadata` records a space as strings next to teachers, feature banks and synthetic sets;
:func:`check_same_space` refuses to mix two of them. Mixing spaces between distillation and evaluation is the most
common cause of near-chance accuracy.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .errors import ELFError
from .fileio import PathLike, load_tensors, save_tensors, tensor_sha256

if TYPE_CHECKING:
    from .data import ImageSet

__all__ = [
    "Normalization",
    "CIFAR10_MTT",
    "CIFAR100_DC",
    "IMAGENET",
    "NO_NORMALIZATION",
    "NORMALIZATIONS",
    "get_normalization",
    "ZCA",
    "fit_zca_cached",
    "space_metadata",
    "check_same_space",
]


# --------------------------------------------------------------------------------------------------------------
# Normalization


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalization ``(x - mean) / std`` for float images in [0, 1] of shape (N, C, H, W) or (C, H, W)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ELFError(f"normalization {self.name!r}: mean has {len(self.mean)} values and std {len(self.std)}; give one of each per channel")
        if any(s <= 0 for s in self.std):
            raise ELFError(f"normalization {self.name!r}: std {self.std} must be positive")

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return len(self.mean)

    @property
    def is_identity(self) -> bool:
        """Whether it leaves [0, 1] images as they are (mean 0, std 1 everywhere; :data:`NO_NORMALIZATION`)."""
        return all(m == 0 for m in self.mean) and all(v == 1 for v in self.std)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ELFError(
                f"normalization {self.name!r} is for {self.channels} channels but got a tensor of shape {tuple(x.shape)}; "
                "expected (N, C, H, W) or (C, H, W)"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] float images (N, C, H, W) -> normalized images, same shape."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalized images (N, C, H, W) -> [0, 1] float images (not clamped), same shape."""
        mean, std = self._stats(x)
        return x * std + mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict ``{"name", "mean", "std"}``."""
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), name=str(d.get("name", "custom")))
        except (KeyError, TypeError) as e:
            raise ELFError(f"not a normalization description: {d!r}; expected keys 'mean', 'std' and optionally 'name'") from e


#: CIFAR-10 statistics as used by DC/DSA/DM for CIFAR-10 and by MTT/ELF/TESLA/DATM for CIFAR-10 *and* CIFAR-100.
CIFAR10_MTT = Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "cifar10_mtt")
#: CIFAR-100's own statistics, used by DC/DSA/DM for CIFAR-100 (not by MTT, which reuses CIFAR10_MTT).
CIFAR100_DC = Normalization((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), "cifar100_dc")
#: The usual ImageNet statistics (torchvision models, Tiny-ImageNet in the DD code bases).
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")

#: The identity (3 channels): images stay in [0, 1]. MTT (and TESLA, DATM, which build on it) whiten *these* with
#: ``--zca``: ZCA of un-normalized images, not of normalized ones, so its ZCA sets live in ``NO_NORMALIZATION`` + ZCA.
NO_NORMALIZATION = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none")

NORMALIZATIONS: dict[str, Normalization] = {n.name: n for n in (CIFAR10_MTT, CIFAR100_DC, IMAGENET, NO_NORMALIZATION)}


def get_normalization(name: str) -> Normalization:
    """Look up a named normalization (``cifar10_mtt``, ``cifar100_dc``, ``imagenet``, ``none``)."""
    key = name.lower().replace("-", "_")
    if key not in NORMALIZATIONS:
        raise ELFError(f"unknown normalization {name!r}; known: {', '.join(sorted(NORMALIZATIONS))}")
    return NORMALIZATIONS[key]



# --------------------------------------------------------------------------------------------------------------
# ZCA whitening


class ZCA:
    """ZCA whitening of flattened images as in the DD code bases (kornia ``ZCAWhitening``, eps 0.1).

    With the data mean m and the unbiased covariance U diag(S) U^T of the flattened (N, C*H*W) images,
    ``transform(x) = (x - m) W`` with W = U diag(1/sqrt(S + eps)) U^T, and ``inverse(z) = z W^-1 + m``.
    Fit it on the whole training set in the pixel space the set lives in and apply it to images in that space:
    MTT, TESLA and DATM fit and apply it to un-normalized [0, 1] images (:data:`NO_NORMALIZATION`).
    """

    def __init__(self, mean: Tensor, W: Tensor, W_inv: Tensor, shape: tuple[int, ...], eps: float, info: dict[str, str] | None = None):
        d = int(np.prod(shape))
        if mean.shape != (d,) or W.shape != (d, d) or W_inv.shape != (d, d):
            raise ELFError(f"ZCA tensors do not match image shape {shape}: mean {tuple(mean.shape)}, W {tuple(W.shape)}")
        self.mean, self.W, self.W_inv = mean, W, W_inv
        self.shape = tuple(int(s) for s in shape)
        self.eps = float(eps)
        self.info = dict(info or {})

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1, batch_size: int = 4096) -> "ZCA":
        """Fit on float images (N, C, H, W) (already normalized)."""
        if x.dim() != 4 or not x.is_floating_point():
            raise ELFError(f"ZCA.fit needs float images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        return cls._fit_batches(lambda: (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)), tuple(x.shape[1:]), x.shape[0], eps)

    @classmethod
    def _fit_batches(cls, batches: Callable[[], Iterable[Tensor]], shape: tuple[int, ...], n: int, eps: float) -> "ZCA":
        """Two passes over ``batches()`` (mean, then centered Gram matrix accumulated in float64)."""
        if n < 2:
            raise ELFError("ZCA.fit needs at least 2 images")
        d = int(np.prod(shape))
        total = torch.zeros(d, dtype=torch.float64)
        for b in batches():
            total += b.reshape(b.shape[0], -1).double().sum(0).cpu()
        mean = total / n
        mean32 = mean.float()
        gram = torch.zeros(d, d, dtype=torch.float64)
        for b in batches():
            xc = b.reshape(b.shape[0], -1).float().cpu() - mean32
            gram += (xc.T @ xc).double()
        cov = gram / (n - 1)
        S, U = torch.linalg.eigh(cov)
        S = S.clamp_min(0.0)
        W = (U * (S + eps).rsqrt()) @ U.T
        W_inv = (U * (S + eps).sqrt()) @ U.T
        return cls(mean32, W.float(), W_inv.float(), shape, eps)

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ELFError(f"ZCA was fit on images of shape {self.shape}, got {tuple(x.shape)}; expected (N, {', '.join(map(str, self.shape))})")
        return x.reshape(x.shape[0], -1)

    def transform(self, x: Tensor) -> Tensor:
        """Whiten float images (N, C, H, W) -> (N, C, H, W)."""
        flat = self._flat(x)
        W, m = self.W.to(flat.device, flat.dtype), self.mean.to(flat.device, flat.dtype)
        return ((flat - m) @ W).reshape(x.shape)

    __call__ = transform

    def inverse(self, x: Tensor) -> Tensor:
        """Undo :meth:`transform`: whitened (N, C, H, W) -> normalized images (N, C, H, W)."""
        flat = self._flat(x)
        W_inv, m = self.W_inv.to(flat.device, flat.dtype), self.mean.to(flat.device, flat.dtype)
        return (flat @ W_inv + m).reshape(x.shape)

    def to(self, device: str | torch.device) -> "ZCA":
        """A copy with its matrices on ``device`` (avoids a transfer on every call)."""
        return ZCA(self.mean.to(device), self.W.to(device), self.W_inv.to(device), self.shape, self.eps, self.info)

    def save(self, path: PathLike) -> Path:
        """Write to a safetensors file (atomic)."""
        meta = {"format": "elf-dd/zca", "eps": repr(self.eps), "shape": json.dumps(list(self.shape)), "info": json.dumps(self.info),
                "tensors_sha256": tensor_sha256(self.mean, self.W, self.W_inv)}
        return save_tensors(path, {"mean": self.mean, "W": self.W, "W_inv": self.W_inv}, meta)

    @classmethod
    def load(cls, path: PathLike) -> "ZCA":
        """Read a file written by :meth:`save`, verified against the hash of its matrices it records (files written
        before the hash was recorded are read unverified)."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != "elf-dd/zca":
            raise ELFError(f"{path}: not an elf-dd ZCA file (format {meta.get('format')!r}); create it with ZCA.save")
        try:
            zca = cls(tensors["mean"], tensors["W"], tensors["W_inv"], tuple(json.loads(meta["shape"])), float(meta["eps"]), json.loads(meta.get("info", "{}")))
        except (KeyError, ValueError) as e:
            raise ELFError(f"{path}: incomplete ZCA file ({e}); delete it and fit again") from e
        recorded = meta.get("tensors_sha256")
        if recorded is not None and recorded != tensor_sha256(zca.mean, zca.W, zca.W_inv):
            raise ELFError(f"{path}: damaged ZCA file (its matrices do not match the hash it records); delete it and fit again")
        return zca


def fit_zca_cached(
    imageset: ImageSet,
    normalization: Normalization | None,
    eps: float = 0.1,
    cache_dir: PathLike | None = None,
    batch_size: int = 4096,
) -> ZCA:
    """Fit :class:`ZCA` on ``imageset`` normalized with ``normalization``; cached under ``cache_dir`` keyed by
    the set's ``source_hash``, the normalization and ``eps``."""
    from .data import default_cache_dir  # data.py imports this module

    norm = json.dumps(normalization.to_dict() if normalization else None, sort_keys=True)
    key = hashlib.sha256(f"elf-zca|v1|{imageset.source_hash}|{norm}|{eps!r}".encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()).expanduser() / f"zca-{key[:40]}.safetensors"
    if path.is_file():
        try:
            zca = ZCA.load(path)
            if zca.info.get("key") == key:
                return zca
            warnings.warn(f"ZCA cache {path} belongs to another key; fitting again", stacklevel=2)
        except ELFError as e:
            warnings.warn(f"ZCA cache {path} is unusable ({e}); fitting again", stacklevel=2)
    n = len(imageset)

    def batches() -> Iterator[Tensor]:
        for i in range(0, n, batch_size):
            x = imageset.images[i : i + batch_size].float().div_(255.0)
            yield normalization.normalize(x) if normalization is not None else x

    zca = ZCA._fit_batches(batches, imageset.image_shape, n, eps)
    zca.info = {"key": key, "source_hash": imageset.source_hash, "normalization": norm}
    try:
        zca.save(path)
    except (OSError, ELFError) as e:  # the fit is done: keep it, say the cache is not written
        warnings.warn(f"could not write the ZCA cache {path} ({e}); the fit is kept in memory and will be redone "
                      "next time", stacklevel=2)
    return zca


# --------------------------------------------------------------------------------------------------------------
# The "space" images live in: recorded with teachers, feature banks and synthetic sets, checked where they meet


def space_metadata(normalization: Normalization | None, zca: bool) -> dict[str, str]:
    """String metadata describing the pixel space: ``space_mean``/``space_std`` (omitted if unknown) and ``space_zca``."""
    meta = {"space_zca": "true" if zca else "false"}
    if normalization is not None:
        meta["space_mean"] = ",".join(f"{m:.4f}" for m in normalization.mean)
        meta["space_std"] = ",".join(f"{v:.4f}" for v in normalization.std)
    return meta


def check_same_space(a: dict[str, str], b: dict[str, str], what_a: str, what_b: str) -> None:
    """Raise :class:`ELFError` when two records of :func:`space_metadata` disagree on a key both of them have.

    Mixing normalizations or ZCA and non-ZCA images is the most common cause of near-chance accuracy in DD.
    """
    for key, label in (("space_zca", "ZCA whitening"), ("space_mean", "normalization mean"), ("space_std", "normalization std")):
        if key in a and key in b and a[key] != b[key]:
            raise ELFError(
                f"{what_a} and {what_b} live in different pixel spaces: {label} is {a[key]} vs {b[key]}. Use a teacher "
                "trained on images prepared like the synthetic set (same mean/std, ZCA only if the set is ZCA'd)"
            )
