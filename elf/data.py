"""Real datasets: uint8 image sets and their loading from ImageFolder trees, tar archives and torchvision, with a cache.

Images are kept as uint8 tensors of shape (N, C, H, W) on the CPU and converted to normalized float on demand
(:meth:`ImageSet.as_float`). Decoding an image tree is slow, so :func:`load_image_folder` stores the decoded
tensors in a safetensors cache keyed by the source's content hash; the second load only hashes and reads.

The pixel space (normalization conventions, ZCA whitening, space metadata) lives in :mod:`elf.pixel_space`; its
names are re-exported here so ``from elf.data import Normalization, ZCA`` keeps working for this release.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ELFError
from .fileio import file_sha256, load_tensors, save_tensors, tensor_sha256
from . import pixel_space
from .pixel_space import *  # noqa: F401,F403  (the pixel space lived here before elf.pixel_space; kept for this release)
from .pixel_space import Normalization

__all__ = [
    "CIFAR10_CLASSES",
    "ImageSet",
    "default_cache_dir",
    "default_data_path",
    "decode_image_tree",
    "image_folder_source_hash",
    "load_image_folder",
    "load_cifar",
    "load_dataset",
    *pixel_space.__all__,  # moved to elf.pixel_space, re-exported for this release
]

PathLike = str | os.PathLike[str]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_CACHE_VERSION = "2"  # 2: "L" decoded by PIL only; duplicate archive members kept once

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------------------------------------------
# ImageSet


def _as_index_tensor(indices: Tensor | Sequence[int] | np.ndarray) -> Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or (idx.numel() and idx.is_floating_point()):
        raise ELFError(f"indices must be a 1-D integer or boolean sequence, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    return idx.long()


@dataclass
class ImageSet:
    """A labelled real image set.

    ``images``: uint8 (N, C, H, W) on CPU; ``labels``: int64 (N,); ``classes``: class names (index = label);
    ``source_hash``: hex digest identifying the content (source file, split and decoding), used as a cache key.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    source_hash: str
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ELFError(
                f"ImageSet.images must be a uint8 tensor (N, C, H, W), got "
                f"{getattr(self.images, 'dtype', type(self.images))} {tuple(getattr(self.images, 'shape', ()))}"
            )
        self.images = self.images.cpu()
        self.labels = torch.as_tensor(self.labels).cpu().long()
        if self.labels.shape != (self.images.shape[0],):
            raise ELFError(f"ImageSet.labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        self.classes = list(self.classes)
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ELFError(f"ImageSet labels must lie in [0, {len(self.classes)}) (one per class name)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes K (length of ``classes``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> Tensor:
        """Images per class, int64 (K,)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def as_float(
        self,
        normalization: Normalization | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Images as float (N, C, H, W) on ``device``: scaled to [0, 1], then normalized if ``normalization`` is given."""
        x = self.images.to(device=device or "cpu").to(dtype).div_(255.0)
        if normalization is not None:
            mean, std = normalization._stats(x)
            x.sub_(mean).div_(std)
        return x

    def subset(self, indices: Tensor | Sequence[int] | np.ndarray) -> "ImageSet":
        """The images at ``indices`` (int or bool), in that order; the result gets a derived ``source_hash``."""
        idx = _as_index_tensor(indices)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ELFError(f"subset indices out of range for an ImageSet of {len(self)} images")
        h = hashlib.sha256(f"{self.source_hash}|subset|{tensor_sha256(idx)}".encode()).hexdigest()
        return ImageSet(self.images[idx].clone(), self.labels[idx].clone(), list(self.classes), h, self.origin)

    def with_classes(self, classes: Sequence[str], what: str = "this split", reference: str = "the training classes") -> "ImageSet":
        """The same images labelled by position in ``classes`` (matched by name, not by folder count).

        Used to line a test split up with the training split or a synthetic set: a class folder missing or empty
        in one split cannot shift the labels of the others. Images of a class not in ``classes`` raise
        :class:`ELFError` naming the classes; classes of ``classes`` without images here are fine.
        """
        classes = [str(c) for c in classes]
        if classes == self.classes:
            return self
        index = {c: i for i, c in enumerate(classes)}
        present = [self.classes[int(k)] for k in torch.unique(self.labels)]
        unknown = [c for c in present if c not in index]
        if unknown:
            raise ELFError(f"{what} has images of class(es) {unknown} that are not among {reference} {classes}; "
                           "class folders must carry the same names in every split")
        lookup = torch.tensor([index.get(c, -1) for c in self.classes], dtype=torch.int64)
        h = hashlib.sha256(f"{self.source_hash}|classes|{json.dumps(classes)}".encode()).hexdigest()
        return ImageSet(self.images, lookup[self.labels], classes, h, self.origin)

    def _per_class_indices(self, k: int, generator: torch.Generator | None, what: str) -> Tensor:
        if k <= 0:
            raise ELFError(f"{what}: k must be positive, got {k}")
        picks = []
        for c in range(self.num_classes):
            idx = (self.labels == c).nonzero().flatten()
            if idx.numel() < k:
                raise ELFError(f"{what}: class {c} ({self.classes[c]!r}) has {idx.numel()} images, fewer than k={k}")
            chosen = idx[torch.randperm(idx.numel(), generator=generator)[:k]]
            picks.append(chosen.sort().values)
        return torch.cat(picks)

    def per_class(self, k: int, generator: torch.Generator | None = None) -> "ImageSet":
        """A random class-balanced subset of ``k`` images per class, class-major (all of class 0, then class 1, ...)."""
        return self.subset(self._per_class_indices(k, generator, "per_class"))

    def split_validation(self, k: int, generator: torch.Generator | None = None) -> tuple["ImageSet", "ImageSet"]:
        """``(rest, validation)``: hold out ``k`` random images per class of this (training) set.

        Anything tuned (lr, λ, feature epoch) should be chosen on such a split of the real *training* data,
        never on the test set.
        """
        val = self._per_class_indices(k, generator, "split_validation")
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[val] = False
        return self.subset(keep.nonzero().flatten()), self.subset(val)


# --------------------------------------------------------------------------------------------------------------
# Decoding image trees


def default_cache_dir() -> Path:
    """Cache directory: env ``ELF_CACHE`` or ``~/.cache/elf-dd``."""
    env = os.environ.get("ELF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "elf-dd"


def default_download_root() -> Path:
    """Where torchvision's CIFAR downloads go by default: ``torchvision/`` in :func:`default_cache_dir`."""
    return default_cache_dir() / "torchvision"


def default_data_path() -> Path | None:
    """The dataset path in env ``ELF_DATA``, or None when unset."""
    env = os.environ.get("ELF_DATA")
    return Path(env).expanduser() if env else None


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(ARCHIVE_SUFFIXES)


def _classify(rel: str, split: str | None) -> tuple[tuple[str, ...], str] | None:
    """Map a relative file path to (prefix folders, class name), or None when the file is not part of the split."""
    parts = tuple(p for p in rel.replace("\\", "/").split("/") if p not in ("", "."))
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return None
    if split is not None:
        if len(parts) < 3 or parts[-3] != split:
            return None
        return parts[:-3], parts[-2]
    if len(parts) < 2:
        raise ELFError(f"image {rel!r} is not inside a class folder; an image tree must look like <class>/<image> or <split>/<class>/<image>")
    return parts[:-2], parts[-2]


def _classify_folder(rel: str, split: str | None) -> tuple[tuple[str, ...], str] | None:
    """Map a relative folder path to (prefix folders, class name) when it may be a class folder, else None."""
    parts = tuple(p for p in rel.replace("\\", "/").split("/") if p not in ("", "."))
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if split is not None:
        return (parts[:-2], parts[-1]) if len(parts) >= 2 and parts[-2] == split else None
    return parts[:-1], parts[-1]


def _list_class_folders(root: Path, split: str | None) -> set[tuple[tuple[str, ...], str]]:
    """(prefix, class) of every folder under ``root`` that may be a class folder (with images or without)."""
    out = set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        for d in dirnames:
            key = _classify_folder(os.path.relpath(os.path.join(dirpath, d), root).replace(os.sep, "/"), split)
            if key is not None:
                out.add(key)
    return out


def _decode_bytes(data: bytes, name: str, mode: str) -> Tensor:
    """Encoded image bytes -> uint8 (C, H, W); ``mode`` "RGB" (C=3) or "L" (C=1).

    RGB uses ``torchvision.io.decode_image`` (about 3x faster than PIL on small JPEGs; the same pixels) when it
    exists, else PIL. "L" always uses PIL's ``convert("L")`` (torchvision's GRAY conversion differs by up to 12 grey
    levels on JPEGs, and formats it cannot read fall back to PIL: one tree would mix two conversions).
    """
    decode_image: Any = None
    if mode == "RGB":
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:  # torchvision moved image decoding to torchcodec; PIL is always there
            decode_image = None
    if decode_image is not None:
        try:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # formats torchvision cannot decode (bmp, tiff, ...): fall back to PIL
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert(mode))
    except Exception as e:
        raise ELFError(f"{name}: cannot decode this image ({e}); remove or replace the file") from e
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _iter_archive(path: Path, split: str | None,
                  folders: set[tuple[tuple[str, ...], str]] | None = None) -> Iterator[tuple[str, tuple[str, ...], str, bytes]]:
    """Stream (name, prefix, class, bytes) for the image members of a tar archive, without extracting to disk;
    folder members that may be class folders are added to ``folders``."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if member.isdir() and folders is not None:
                    key = _classify_folder(member.name, split)
                    if key is not None:
                        folders.add(key)
                key = _classify(member.name, split)
                if key is not None and member.islnk():  # a stream cannot go back to the linked member's bytes
                    raise ELFError(f"{path}: image {member.name} is a hard link to {member.linkname}, which this reader "
                                   "(one pass over the archive) cannot follow: extract the archive and pass the folder, "
                                   "or re-create it without hard links (GNU tar: --hard-dereference)")
                if not member.isfile() or key is None:
                    continue
                f = tf.extractfile(member)
                if f is None:
                    continue
                yield member.name, key[0], key[1], f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ELFError(f"{path}: cannot read this tar archive ({e}); check that the file is complete") from e


def _list_directory(root: Path, split: str | None) -> list[tuple[str, tuple[str, ...], str]]:
    """(relative path, prefix, class) for the image files under ``root``, in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
            key = _classify(rel, split)
            if key is not None:
                out.append((rel, key[0], key[1]))
    return out


def _directory_hash(root: Path, files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        data = (root / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _top_level_folders(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    names: set[str] = set()
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if len(parts) > 1 or m.isdir():
                names.add(parts[0])
    return sorted(names)


def _decode_all(
    path: Path, items: Iterable[tuple[str, tuple[str, ...], str, bytes]], mode: str, prefixes: set[tuple[str, ...]]
) -> list[tuple[str, str, Tensor]]:
    """Decode every item into (class, name, uint8 (C, H, W)), checking that all share one shape. A name seen twice
    (a member appended to an archive with ``tar -r``/``-u``) keeps its last copy, as extracting the archive would."""
    records: dict[str, tuple[str, str, Tensor]] = {}
    first: tuple[str, tuple[int, ...]] | None = None
    for name, prefix, cls, blob in items:
        prefixes.add(prefix)
        img = _decode_bytes(blob, f"{path}:{name}", mode)
        if first is None:
            first = (name, tuple(img.shape))
        elif tuple(img.shape) != first[1]:
            raise ELFError(
                f"{path}: image {name} has shape (C, H, W) = {tuple(img.shape)} but {first[0]} has {first[1]}; "
                "all images must share one size: resize them beforehand"
            )
        records[posixpath.normpath(name)] = (cls, name, img)
    return list(records.values())


def _assemble(
    path: Path,
    items: Iterable[tuple[str, tuple[str, ...], str, bytes]],
    split: str | None,
    mode: str,
    progress: bool,
    total: int | None,
    folders: set[tuple[tuple[str, ...], str]] | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode items into class-major uint8 images (N, C, H, W), labels (N,) and sorted class names.

    Class names are the class folders' names, empty folders included (read from ``folders`` once the items are
    consumed), so a class with no images in one split does not shift the labels of the classes after it."""
    from tqdm.auto import tqdm

    prefixes: set[tuple[str, ...]] = set()
    bar = tqdm(items, total=total, desc=f"decoding {path.name}" + (f" [{split}]" if split else ""), unit="img", disable=not progress)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image decoders with a warning on every call
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
            records = _decode_all(path, bar, mode, prefixes)
    finally:
        bar.close()
    if not records:
        folders = _top_level_folders(path)
        where = f"under a {split!r} folder " if split else ""
        raise ELFError(
            f"{path}: found no images {where}(expected <split>/<class>/<image> or <class>/<image>; "
            f"top-level folders: {', '.join(folders) or 'none'}). Pass split= one of those folders (on the command line: point at the folder holding train/ and test/) or fix the layout"
        )
    if len(prefixes) > 1:
        shown = sorted("/".join(p) or "." for p in prefixes)
        raise ELFError(
            f"{path}: images sit under several parent folders ({', '.join(shown[:6])}); "
            "pass split= to pick one of them (e.g. 'train' or 'test') or point at a single <class>/<image> tree"
        )
    (prefix,) = prefixes
    empty = sorted({c for pre, c in (folders or ()) if pre == prefix} - {r[0] for r in records})
    if empty:
        warnings.warn(f"{path}: class folder(s) {', '.join(map(repr, empty))}" + (f" under {split!r}" if split else "")
                      + " hold no images; they keep their place among the classes (labels follow sorted folder names)",
                      stacklevel=3)
    classes = sorted({r[0] for r in records} | set(empty))
    index = {c: i for i, c in enumerate(classes)}
    records.sort(key=lambda r: (index[r[0]], r[1]))
    images = torch.stack([r[2] for r in records])
    labels = torch.tensor([index[r[0]] for r in records], dtype=torch.int64)
    return images, labels, classes


def decode_image_tree(path: PathLike, split: str | None = None, *, mode: str = "RGB", progress: bool = False) -> ImageSet:
    """Decode an ImageFolder directory or tar archive without any caching (for small trees); see :func:`load_image_folder`."""
    path = Path(path)
    content, files, folders = _source_content(path, split)
    items, total = _items(path, split, files, folders)
    images, labels, classes = _assemble(path, items, split, mode, progress, total, folders)
    return ImageSet(images, labels, classes, _source_key(content, split, mode), str(path))


def _source_content(path: Path, split: str | None) -> tuple[str, list[tuple[str, tuple[str, ...], str]] | None,
                                                             set[tuple[tuple[str, ...], str]]]:
    """``(content hash, image files, class folders)`` of an ImageFolder source: an archive's SHA-256 (its files and
    folders are found while reading it: None and an empty set to fill), or a hash over a directory's image files."""
    if _is_archive(path):
        return file_sha256(path), None, set()
    if path.is_dir():
        files = _list_directory(path, split)
        folders = _list_class_folders(path, split)
        return _with_empty_folders(_directory_hash(path, (f[0] for f in files)), files, folders), files, folders
    if path.exists():
        raise ELFError(f"{path}: not a directory or a tar archive ({', '.join(ARCHIVE_SUFFIXES)}); give an ImageFolder tree")
    raise ELFError(f"{path}: no such file or directory")


def _items(path: Path, split: str | None, files: list[tuple[str, tuple[str, ...], str]] | None,
           folders: set[tuple[tuple[str, ...], str]]) -> tuple[Iterable[tuple[str, tuple[str, ...], str, bytes]], int | None]:
    """The image files of a source to decode, as ``(name, prefix, class, bytes)``, and their number when known."""
    if files is None:
        return _iter_archive(path, split, folders), None
    return ((rel, pre, cls, (path / rel).read_bytes()) for rel, pre, cls in files), len(files)


def image_folder_source_hash(path: PathLike, split: str | None = None, mode: str = "RGB") -> str:
    """The ``source_hash`` :func:`load_image_folder` gives this source, split and mode, without decoding an image
    (hashes the archive, or a directory's image files): what identifies real data in records."""
    return _source_key(_source_content(Path(path).expanduser(), split)[0], split, mode)


def _with_empty_folders(content_hash: str, files: list[tuple[str, tuple[str, ...], str]],
                        folders: set[tuple[tuple[str, ...], str]]) -> str:
    """The directory's content hash, extended by its image-less class folders (they are classes too) when it has any."""
    empty = sorted(folders - {(pre, cls) for _, pre, cls in files})
    if not empty:
        return content_hash  # unchanged for trees without empty class folders (existing caches stay valid)
    return hashlib.sha256(f"{content_hash}|empty-class-folders|{json.dumps(empty)}".encode()).hexdigest()


def _source_key(content_hash: str, split: str | None, mode: str) -> str:
    return hashlib.sha256(f"elf-imageset|v{_CACHE_VERSION}|{content_hash}|split={split}|mode={mode}".encode()).hexdigest()


def load_image_folder(
    path: PathLike,
    split: str | None = None,
    *,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    mode: str = "RGB",
) -> ImageSet:
    """Load an ImageFolder tree (``<class>/<image>``; sorted class names give labels) from a directory or tar archive.

    ``split`` picks a top-level folder (``"train"``/``"test"``). Images are decoded once (``mode`` "RGB": C=3,
    "L": C=1) into uint8 (N, C, H, W), class-major, and cached under ``cache_dir`` (default
    :func:`default_cache_dir`) keyed by the content hash of the source (the archive's sha256, or a hash over the
    relative paths and bytes of a directory's image files) plus split and mode. A cache whose tensors do not match
    their stored hash is reported with a warning and rebuilt.
    """
    path = Path(path).expanduser()
    if mode not in ("RGB", "L"):
        raise ELFError(f"mode must be 'RGB' or 'L', got {mode!r}")
    content, files, folders = _source_content(path, split)
    key = _source_key(content, split, mode)
    cache_file = Path(cache_dir or default_cache_dir()).expanduser() / f"imageset-{key[:40]}.safetensors"

    if cache_file.is_file():
        cached = _read_cache(cache_file, key)
        if cached is not None:
            images, labels, classes = cached
            return ImageSet(images, labels, classes, key, str(path))

    items, total = _items(path, split, files, folders)
    images, labels, classes = _assemble(path, items, split, mode, progress, total, folders)
    meta = {
        "format": "elf-dd/imageset",
        "version": _CACHE_VERSION,
        "source_hash": key,
        "content_sha256": content,
        "split": json.dumps(split),
        "mode": mode,
        "classes": json.dumps(classes),
        "origin": str(path),
        "tensor_sha256": tensor_sha256(images, labels),
    }
    try:
        save_tensors(cache_file, {"images": images, "labels": labels}, meta)
    except OSError as e:
        warnings.warn(f"could not write the image cache {cache_file} ({e}); set ELF_CACHE or cache_dir= to a writable folder", stacklevel=2)
    return ImageSet(images, labels, classes, key, str(path))


def _read_cache(cache_file: Path, key: str) -> tuple[Tensor, Tensor, list[str]] | None:
    """Read and verify a decoded-image cache; None (with a warning) when it is unusable."""
    try:
        tensors, meta = load_tensors(cache_file)
        images, labels = tensors["images"], tensors["labels"]
        ok = (
            meta.get("format") == "elf-dd/imageset"
            and meta.get("source_hash") == key
            and meta.get("tensor_sha256") == tensor_sha256(images, labels)
        )
        classes = json.loads(meta["classes"])
    except (ELFError, KeyError, ValueError) as e:
        warnings.warn(f"image cache {cache_file} is unreadable ({e}); decoding the source again", stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"image cache {cache_file} does not match its stored hash; decoding the source again", stacklevel=3)
        return None
    return images, labels, classes


# --------------------------------------------------------------------------------------------------------------
# torchvision CIFAR and the generic entry point


def load_cifar(name: str, root: PathLike, train: bool, download: bool = True) -> ImageSet:
    """CIFAR-10/100 through ``torchvision.datasets`` (``name`` "cifar10" or "cifar100"); images uint8 (N, 3, 32, 32)."""
    import torchvision.datasets as tvd

    key = name.lower().replace("-", "")
    classes_by_name = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
    if key not in classes_by_name:
        raise ELFError(f"unknown CIFAR variant {name!r}; use 'cifar10' or 'cifar100'")
    root = Path(root).expanduser()
    try:
        ds = getattr(tvd, classes_by_name[key])(root=str(root), train=train, download=download)
    except Exception as e:  # URLError, OSError, RuntimeError('Dataset not found or corrupted'), ...
        raise ELFError(
            f"could not {'download' if download else 'find'} {key} under {root} ({type(e).__name__}: {e}). "
            "If this machine is offline, pass a local ImageFolder directory or .tar/.tar.gz archive instead, e.g. "
            "load_dataset('/path/to/cifar10-jpeg.tar.gz', split='train'), or set ELF_DATA to that path"
        ) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    split = "train" if train else "test"
    h = hashlib.sha256(f"torchvision:{key}|{split}|{tensor_sha256(images, labels)}".encode()).hexdigest()
    return ImageSet(images, labels, list(ds.classes), h, f"torchvision:{key}:{split}")


def load_dataset(spec: str | PathLike, split: str | None = "train", **kw: Any) -> ImageSet:
    """Load a real dataset: ``spec`` "cifar10"/"cifar100" (torchvision; keywords ``root``, ``download``) or a path
    to an ImageFolder directory / tar archive (keywords of :func:`load_image_folder`)."""
    s = str(spec)
    if s.lower().replace("-", "") in ("cifar10", "cifar100") and not Path(s).exists():
        if split not in ("train", "test"):
            raise ELFError(f"{s}: split must be 'train' or 'test', got {split!r}")
        root = kw.pop("root", default_download_root())
        download = kw.pop("download", True)
        if kw:
            raise ELFError(f"load_dataset({s!r}) does not take {', '.join(sorted(kw))}; it takes root= and download=")
        return load_cifar(s, root, train=split == "train", download=download)
    path = Path(s).expanduser()
    if not path.exists():
        raise ELFError(f"{s!r} is neither a known dataset name (cifar10, cifar100) nor an existing directory or archive")
    return load_image_folder(path, split, **kw)
