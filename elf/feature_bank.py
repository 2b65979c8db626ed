"""FeatureBank: the teacher's feature F(x) for every synthetic image, computed once and kept on the device.

Stored as safetensors with string metadata (teacher and image content hashes, split point, shape, dtype, a hash
of the features themselves, library version). A cache directory keyed by the content hashes makes evaluating the
same (teacher, images, point) again compute nothing; every read is verified against the stored hash.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_state_dict
from .errors import ELFError
from .fileio import PathLike, file_sha256, load_tensors, portable_path, save_tensors, state_dict_sha256, tensor_sha256
from .models import create_model, default_split_point
from .modes import in_mode
from .pixel_space import check_same_space, space_metadata
from .split import SplitOptions, split_model
from .synthetic import SyntheticSet

__all__ = ["FeatureBank"]

FORMAT = "elf-feature-bank/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ELFError(f"feature storage dtype must be one of {sorted(_DTYPES)}, got {dtype}")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ELFError(f"feature storage dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    _dtype_name(dtype)
    return dtype


def _unpack_images(images: Any, space: dict[str, str] | None) -> tuple[torch.Tensor, dict[str, str] | None]:
    """Images as a tensor plus their pixel-space record; a SyntheticSet supplies both."""
    if isinstance(images, SyntheticSet):
        return images.images, space or space_metadata(images.normalization, images.zca)
    if not isinstance(images, torch.Tensor):
        raise ELFError(f"images must be a tensor (N, C, H, W) or a SyntheticSet, got {type(images).__name__}")
    return images, space


def teacher_sha256(teacher: nn.Module) -> str:
    """Content hash of a teacher: its weights and buffers *and* its architecture (the module tree's repr), so two
    teachers with equal weights but, say, different activations or pooling never share cached features."""
    return hashlib.sha256(f"{state_dict_sha256(teacher)}|{teacher!r}".encode()).hexdigest()


def front_code_sha256(front: nn.Module) -> str:
    """Hash of the code that computes a teacher's features: the generated code of every traced (fx) module in
    ``front`` and the source of every other module class in it that is not torch's own, so a teacher whose
    ``forward`` was edited (same modules, same weights) does not get the features cached for the old code. A class
    without retrievable source (defined in a REPL) counts by its qualified name."""
    parts = []
    seen: set[type] = set()
    for name, module in front.named_modules():
        cls = type(module)
        if isinstance(module, torch.fx.GraphModule):
            parts.append(f"{name}:{module.code}")
        elif cls not in seen and not cls.__module__.startswith("torch."):
            seen.add(cls)
            try:
                parts.append(inspect.getsource(cls))
            except (OSError, TypeError):
                parts.append(f"{cls.__module__}.{cls.__qualname__}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def images_sha256(images: torch.Tensor) -> str:
    """Content hash of images as float32, so a float64 copy of the same set hashes the same."""
    return tensor_sha256(images.detach().to(torch.float32))


def _options_signature(options: SplitOptions | None) -> str:
    """The leaf modules and autowrapped functions of ``options`` by qualified name ('' when there are none)."""
    if options is None:
        return ""
    names = [f"leaf:{c.__module__}.{c.__qualname__}" for c in options.leaf_modules]
    names += [f"fn:{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}" for f in options.autowrap_functions]
    return ",".join(sorted(names))


class FeatureBank:
    """Teacher features ``(N, C, h, w)`` aligned with the synthetic images, resident on one device.

    Build with :meth:`build` (a teacher module) or :meth:`from_checkpoint` (a file plus a model name); save and load
    with :meth:`save` / :meth:`load`. Index with a LongTensor of image indices to get float32 features.

    A bank made by :meth:`build` or :meth:`from_checkpoint` keeps its teacher module in :attr:`teacher` (in memory
    only, never saved), so a protocol with ``features_on_augmented`` can run it on each augmented batch; a bank read
    with :meth:`load` has ``teacher = None``.
    """

    def __init__(self, features: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
        if features.dim() < 2:
            raise ELFError(f"features must be (N, ...) with one row per image, got shape {tuple(features.shape)}")
        self.features = features
        self.metadata: dict[str, str] = dict(metadata or {})
        self.teacher: nn.Module | None = None

    # ---- access -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        """Features of the given images as float32 (storage may be float16/bfloat16)."""
        return self.features[index].float()

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-image feature shape, e.g. ``(512, 4, 4)``."""
        return tuple(self.features.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def point(self) -> str | None:
        return self.metadata.get("point")

    def to(self, device: torch.device | str) -> FeatureBank:
        """Move the features to ``device`` (returns ``self``)."""
        self.features = self.features.to(device)
        return self

    def __repr__(self) -> str:
        return f"FeatureBank(n={len(self)}, shape={self.shape}, dtype={self.features.dtype}, point={self.point!r}, device={self.device})"

    # ---- building -----------------------------------------------------------------------------------------
    @staticmethod
    def cache_key(teacher_sha256: str, images_sha256: str, point: str, dtype: torch.dtype,
                  options: SplitOptions | None = None, code_sha256: str = "") -> str:
        """Content key of a bank: hash of the teacher's weights, the images, the point, the storage dtype, the
        trace options (leaf modules and autowrapped functions rename graph nodes, so one node-name point can mean
        two tensors under two options) and the front's code (:func:`front_code_sha256`)."""
        raw = f"{FORMAT}|{teacher_sha256}|{images_sha256}|{point}|{_dtype_name(dtype)}"
        traced = _options_signature(options)
        extra = (f"|{traced}" if traced else "") + (f"|code:{code_sha256}" if code_sha256 else "")
        return hashlib.sha256((raw + extra).encode()).hexdigest()

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        images: torch.Tensor | SyntheticSet,
        point: str | None = None,
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        cache_dir: PathLike | None = None,
        progress: bool = False,
        space: dict[str, str] | None = None,
        options: SplitOptions | None = None,
    ) -> FeatureBank:
        """Run ``teacher`` up to ``point`` on every image (eval mode, no grad, in batches) and keep the result.

        Args:
            teacher: the distillation model trained on real data (e.g. ``ConvNetW512``).
            images: synthetic images ``(N, C, H, W)``, normalized as the teacher expects, un-augmented; or a
                :class:`~elf.synthetic.SyntheticSet`, whose pixel space (normalization, ZCA) is then recorded.
            point: split point of the teacher (default: its ``elf_split_point``, "features" for ConvNet).
            batch_size: images per teacher forward. device: where to compute and keep the features
                (default: the teacher's device). dtype: storage dtype, float32 (default), float16 or bfloat16.
            cache_dir: if given, reuse ``<cache_dir>/<key>.safetensors`` when its key matches, else write it.
            progress: print a progress bar over batches.
            space: the images' pixel space (:func:`elf.data.space_metadata`), recorded in the metadata; a
                :class:`~elf.synthetic.SyntheticSet` passed as ``images`` supplies it.
            options: how to trace the teacher (leaf modules, autowrap functions; see :class:`~elf.SplitOptions`),
                added to what the teacher declares itself; ``options.at`` is the point when ``point`` is None.
        """
        images, space = _unpack_images(images, space)
        if images.dim() != 4:
            raise ELFError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ELFError("FeatureBank.build got no images (an empty set); pass the synthetic images (N, C, H, W), N >= 1")
        if not images.is_floating_point():
            raise ELFError(f"FeatureBank.build needs float images normalized as the teacher expects, got {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise ELFError("FeatureBank.build: the images contain NaN or inf values; the bank would be NaN. Fix the images first")
        point = point or (options.at if options is not None and options.at not in (None, "auto") else None) \
            or default_split_point(teacher)
        dtype = _resolve_dtype(dtype)
        param = next(teacher.parameters(), None)
        dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
        front = split_model(teacher, point, options=options).front
        teacher_hash = teacher_sha256(teacher)
        images_hash = images_sha256(images)
        key = cls.cache_key(teacher_hash, images_hash, point, dtype, options, front_code_sha256(front))
        cache_file = Path(cache_dir) / f"features-{key[:40]}.safetensors" if cache_dir is not None else None
        if cache_file is not None and cache_file.exists():
            try:
                bank = cls.load(cache_file, device=dev)
                if bank.metadata.get("key") == key:
                    bank.teacher = teacher
                    # the features follow from teacher and pixel values (the key); the space is this call's claim
                    bank.metadata = {k: v for k, v in bank.metadata.items() if not k.startswith("space_")}
                    bank.metadata.update(space or {})
                    return bank
                warnings.warn(f"feature cache {cache_file} holds another key; recomputing", stacklevel=2)
            except ELFError as e:
                warnings.warn(f"feature cache {cache_file} is unusable ({e}); recomputing", stacklevel=2)
        chunks = []
        peak = torch.zeros((), device=dev)  # the largest |feature| before the cast to ``dtype``
        batches = range(0, images.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="teacher features", unit="batch")
        try:
            with torch.no_grad(), in_mode(teacher, False):
                for start in batches:
                    x = images[start : start + batch_size].to(dev, non_blocking=True)
                    out = front(x)
                    peak = torch.maximum(peak, out.detach().abs().amax().float())
                    chunks.append(out.to(dtype))
        except RuntimeError as e:
            raise ELFError(f"the teacher {type(teacher).__name__} cannot run on images of shape {tuple(images.shape[1:])} "
                           f"({e}); build the teacher for these images (channels, size)") from e
        features = torch.cat(chunks)
        if not bool(torch.isfinite(features).all()):  # one read-back per bank
            top = float(peak)
            if math.isfinite(top) and top > torch.finfo(dtype).max:
                raise ELFError(f"teacher features reach {top:.4g}, beyond {_dtype_name(dtype)}'s range (max "
                               f"{torch.finfo(dtype).max:.6g}): they would be stored as inf; build the bank in "
                               "bfloat16 or float32 (dtype=, --feature-dtype)")
            raise ELFError(f"the teacher {type(teacher).__name__} gives non-finite features (inf or nan) for these "
                           "images: check its checkpoint and the images' pixel space")
        meta = {
            "format": FORMAT,
            "key": key,
            "teacher_sha256": teacher_hash,
            "teacher_class": type(teacher).__name__,
            "teacher_model": str(getattr(teacher, "elf_model_name", type(teacher).__name__)),
            "images_sha256": images_hash,
            "point": point,
            "shape": ",".join(map(str, features.shape)),
            "dtype": _dtype_name(dtype),
            **(space or {}),
        }
        bank = cls(features, meta)
        bank.metadata.update(bank._file_stamp())  # what a cache hit reads back, so a miss and a hit describe alike
        bank.teacher = teacher
        if cache_file is not None:
            try:
                bank._write(cache_file)  # stamped just above: no second hash of the features
            except (OSError, ELFError) as e:  # the features are computed: keep them, say the cache is not written
                warnings.warn(f"could not write the feature cache {cache_file} ({e}); the features are kept in memory "
                              "and will be recomputed next time", stacklevel=2)
        return bank

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: PathLike,
        model: str,
        images: torch.Tensor | SyntheticSet,
        point: str | None = None,
        *,
        num_classes: int = 10,
        **build_kwargs: Any,
    ) -> FeatureBank:
        """Build from a teacher checkpoint file (safetensors or ``weights_only`` torch file) and its model name.

        When both the checkpoint and the images record their pixel space (normalization, ZCA), they must agree.
        """
        images, space = _unpack_images(images, build_kwargs.pop("space", None))
        if images.dim() != 4:
            raise ELFError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        teacher = create_model(model, channel=images.shape[1], num_classes=num_classes, im_size=tuple(images.shape[2:]))
        _, ckpt_meta = load_state_dict(checkpoint)
        check_same_space(ckpt_meta, space or {}, f"teacher checkpoint {checkpoint}", "the synthetic images")
        load_checkpoint(teacher, checkpoint)
        build_kwargs["space"] = space
        accuracy = {f"teacher_{k}": ckpt_meta[k] for k in ("test_accuracy", "test_n") if k in ckpt_meta}
        device = build_kwargs.get("device")
        if device is not None:
            teacher.to(device)
        bank = cls.build(teacher, images, point, **build_kwargs)
        bank.metadata.update(accuracy)  # the teacher's own test accuracy, when its checkpoint records it
        bank.metadata.update(teacher_checkpoint=portable_path(checkpoint), teacher_checkpoint_sha256=file_sha256(checkpoint))
        return bank

    # ---- files ----------------------------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """Write features and metadata to a safetensors file (atomic), with a hash of the features for verification."""
        self.metadata.update(self._file_stamp())
        return self._write(path)

    def _write(self, path: PathLike) -> Path:
        """Write features and the metadata as they are (stamped by :meth:`_file_stamp`), atomically."""
        return save_tensors(path, {"features": self.features}, {"format": FORMAT, **self.metadata})

    def _file_stamp(self) -> dict[str, str]:
        """The metadata :meth:`save` derives from the features: hash, shape, dtype, and the writing elf-dd version."""
        from .version import __version__

        return {"features_sha256": tensor_sha256(self.features), "shape": ",".join(map(str, self.features.shape)),
                "dtype": _dtype_name(self.features.dtype), "elf_version": __version__}

    @classmethod
    def load(cls, path: PathLike, device: torch.device | str = "cpu", verify: bool = True) -> FeatureBank:
        """Read a bank written by :meth:`save`; ``verify`` checks the stored hash, shape and dtype.

        Raises:
            ELFError: missing, truncated or tampered file.
        """
        tensors, meta = load_tensors(path)
        if "features" not in tensors or meta.get("format") != FORMAT:
            raise ELFError(f"{path}: not an elf-dd feature bank (expected a 'features' tensor and format {FORMAT!r})")
        features = tensors["features"]
        if verify:
            expected_shape = ",".join(map(str, features.shape))
            if meta.get("shape") != expected_shape or meta.get("dtype") != _dtype_name(features.dtype):
                raise ELFError(f"{path}: features have shape {expected_shape} / {features.dtype} but the metadata says "
                               f"{meta.get('shape')} / {meta.get('dtype')}; the file was modified, rebuild it")
            if meta.get("features_sha256") != tensor_sha256(features):
                raise ELFError(f"{path}: the features do not match their stored hash; the file was modified or corrupted, rebuild it")
        return cls(features.to(device), meta)

    def check_matches(self, images: torch.Tensor) -> None:
        """Raise if this bank was computed for other images (by count, and by content hash when recorded)."""
        if images.shape[0] != len(self):
            raise ELFError(f"the feature bank holds {len(self)} features but there are {images.shape[0]} images")
        recorded = self.metadata.get("images_sha256")
        if recorded is not None and recorded != images_sha256(images):
            raise ELFError("the feature bank was computed for other images (content hash differs); rebuild it for these images")


