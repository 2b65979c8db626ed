"""Synthetic-set file formats: ours, and those published by the dataset-distillation code bases, read into a SyntheticSet.

* our format: :func:`save_synthetic` / :func:`load_synthetic` (safetensors + string metadata);
* MTT / ELF / TESLA / DATM ``images_best.pt`` + ``labels_best.pt`` (+ ``lr_best.pt``): :func:`load_mtt`;
* DC / DSA / DM ``res_<method>_<dataset>_<model>_<ipc>ipc.pt``: :func:`load_dc_result`;
* KIP-style ``.npz`` (NHWC images, one-hot labels): :func:`load_npz`;
* a folder of class subfolders of PNG images: :func:`load_image_dir`;
* any of these, chosen by name: :func:`load_any`; bare ``(images, labels)`` files: :func:`load_tensor_pair`.

The set type itself is :class:`elf.synthetic.SyntheticSet`. MTT expert buffers (``replay_buffer_<n>.pt``) are read
by :func:`elf.teacher.load_expert_buffer` and :func:`elf.teacher.load_parameters_into`, and BatchNorm statistics
re-estimated by :func:`elf.batchnorm.recompute_bn_stats`; those names, ``SyntheticSet`` and ``LABEL_KINDS`` are
re-exported here so the old imports keep working for this release.

Every ``.pt`` file is read with ``torch.load(weights_only=True)`` (:func:`elf.fileio.safe_torch_load`): a file
that would run code when unpickled is refused with an :class:`ELFError`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .batchnorm import recompute_bn_stats  # re-exported: lived here before elf.batchnorm
from .data import CIFAR10_CLASSES, decode_image_tree
from .errors import ELFError
from .fileio import file_sha256, load_tensors, safe_torch_load, save_tensors
from .losses import infer_label_kind  # re-exported: was importable from here
from .pixel_space import CIFAR10_MTT, CIFAR100_DC, NO_NORMALIZATION, Normalization
from .synthetic import LABEL_KINDS, SyntheticSet  # re-exported: lived here before elf.synthetic
from .teacher import load_expert_buffer, load_parameters_into  # re-exported: lived here before elf.teacher

__all__ = [
    "SyntheticSet",
    "LABEL_KINDS",
    "infer_label_kind",
    "load_tensor_pair",
    "load_assuming",
    "save_synthetic",
    "load_synthetic",
    "load_mtt",
    "load_dc_result",
    "load_npz",
    "load_image_dir",
    "load_any",
    "float_images",
    "load_expert_buffer",
    "load_parameters_into",
    "recompute_bn_stats",
]

PathLike = str | os.PathLike[str]
_FORMAT = "elf-dd/synthetic"


# --------------------------------------------------------------------------------------------------------------
# Our format


def save_synthetic(path: PathLike, sset: SyntheticSet) -> Path:
    """Write ``sset`` to a safetensors file (tensors "images", "labels", optional 0-dim "lr"; fields in metadata)."""
    tensors = {"images": sset.images, "labels": sset.labels}
    if sset.lr is not None:
        tensors["lr"] = torch.tensor(sset.lr, dtype=torch.float64)
    meta = {
        "format": _FORMAT,
        "format_version": "1",
        "label_kind": sset.label_kind,
        "normalization": json.dumps(sset.normalization.to_dict() if sset.normalization else None),
        "zca": json.dumps(sset.zca),
        "classes": json.dumps(sset.classes),
        "ipc": json.dumps(sset.ipc),
        "metadata": json.dumps(sset.metadata, sort_keys=True),
    }
    return save_tensors(path, tensors, meta)


def load_synthetic(path: PathLike) -> SyntheticSet:
    """Read a file written by :func:`save_synthetic`."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != _FORMAT:
        raise ELFError(f"{path}: not an elf-dd synthetic set (format {meta.get('format')!r}); load published files with load_any")
    try:
        norm = json.loads(meta["normalization"])
        lr = tensors.get("lr")
        return SyntheticSet(
            images=tensors["images"],
            labels=tensors["labels"],
            label_kind=meta["label_kind"],
            normalization=Normalization.from_dict(norm) if norm else None,
            zca=json.loads(meta["zca"]),
            classes=json.loads(meta["classes"]),
            ipc=json.loads(meta["ipc"]),
            lr=float(lr) if lr is not None else None,
            metadata=json.loads(meta["metadata"]),
        )
    except (KeyError, ValueError) as e:
        if isinstance(e, ELFError):
            raise
        raise ELFError(f"{path}: incomplete synthetic-set file (missing or bad {e}); write it again with save_synthetic") from e


# --------------------------------------------------------------------------------------------------------------
# Published formats


def float_images(images: Tensor, normalization: Normalization | None, source: Any) -> Tensor:
    """The one uint8 policy of every loader: float images pass through (as float32); uint8 images (0-255) are
    converted with ``x / 255`` then ``normalization`` (the file's recorded one, else the given one) with a one-line
    notice, or refused with the fix when no normalization is known. Other integer types are refused."""
    if images.dtype == torch.uint8:
        if normalization is None:
            raise ELFError(f"{source}: the images are uint8 (0-255) and no normalization is recorded or given: pass "
                           "normalization= (elf eval: --normalization) to convert them with x/255 then normalize, or save "
                           "float images normalized like the test data")
        warnings.warn(f"{source}: uint8 images converted to float with x/255, then normalized with "
                      f"{normalization.name!r}", stacklevel=3)
        return normalization.normalize(images.float() / 255.0)
    if not images.is_floating_point():
        raise ELFError(f"{source}: images must be float (normalized) or uint8 (0-255), got {images.dtype}")
    images = images.float()
    identity = normalization is not None and normalization.is_identity
    if not identity and images.numel() >= 1000 and images.min() >= 0 and images.max() <= 1:
        space = f"normalization {normalization.name!r}" if normalization is not None else "a normalized space"
        warnings.warn(f"{source}: every pixel is in [0, 1]: these look like un-normalized images (e.g. IDC's data.pt), "
                      f"not images in {space}, whose values go below 0; normalize them first (Normalization.normalize) "
                      "or load them with normalization=NO_NORMALIZATION if that is the space they were made in", stacklevel=3)
    return images


def _load_tensor(path: Path, what: str) -> Tensor:
    obj = safe_torch_load(path)
    if not isinstance(obj, Tensor):
        raise ELFError(f"{path}: expected a single tensor of {what}, found {type(obj).__name__}")
    return obj.detach()


def _mtt_paths(images_path: Path, labels_path: PathLike | None, lr_path: PathLike | None) -> tuple[Path, Path, Path | None]:
    if images_path.is_dir():
        d = images_path
        images_path = d / "images_best.pt"
        if not images_path.is_file():
            found = sorted(p.name for p in d.glob("images_*.pt"))
            raise ELFError(f"{d}: no images_best.pt inside (found: {', '.join(found) or 'no images_*.pt'}); pass the images file itself")
    m = re.fullmatch(r"images(_.*)?\.pt", images_path.name)
    suffix = (m.group(1) or "") if m else "_best"
    zca_view = re.fullmatch(r"images_zca_(\d+)\.pt", images_path.name)
    if zca_view:  # MTT's distill.py writes these with the whitening undone, for viewing: not what the student trained on
        it = zca_view.group(1)
        raise ELFError(f"{images_path}: MTT writes images_zca_<it>.pt with the ZCA whitening undone (for viewing), not "
                       f"the whitened images it trained on: load images_{it}.pt (with labels_{it}.pt) and zca=True "
                       "(elf eval: --zca) instead")
    if labels_path is None:
        labels_path = images_path.with_name(f"labels{suffix}.pt")
        if not labels_path.is_file():
            raise ELFError(f"{images_path}: no {labels_path.name} next to it; pass labels_path= (elf eval: --labels)")
    if lr_path is None:
        cand = images_path.with_name(f"lr{suffix}.pt")
        lr_path = cand if cand.is_file() else None
    return images_path, Path(labels_path), Path(lr_path) if lr_path is not None else None


def load_mtt(
    images_path: PathLike,
    labels_path: PathLike | None = None,
    lr_path: PathLike | None = None,
    *,
    normalization: Normalization | None = None,
    zca: bool = False,
    classes: list[str] | None = None,
    label_kind: str = "auto",
) -> SyntheticSet:
    """MTT / ELF / TESLA / DATM results: ``images_best.pt`` float (N, C, H, W); ``labels_best.pt`` int (N,) ("index"),
    (N, K) probabilities ("prob", TESLA) or (N, K) logits ("logits", DATM); optional ``lr_best.pt`` 0-dim.

    A directory finds those names inside it; ``images_<x>.pt`` finds ``labels_<x>.pt`` / ``lr_<x>.pt`` beside it.
    The files do not record the normalization or whether ZCA was used: pass ``normalization`` and ``zca``.
    With ``zca=True`` the default normalization is :data:`~elf.pixel_space.NO_NORMALIZATION`: these code bases fit
    and apply ZCA to un-normalized [0, 1] images (another normalization with ``zca=True`` warns).
    uint8 images (0-255) are converted with ``normalization`` (x/255, then normalized), or refused without one.
    """
    if zca and normalization is None:
        normalization = NO_NORMALIZATION
    elif zca and not normalization.is_identity:
        warnings.warn(f"load_mtt: zca=True with normalization {normalization.name!r}: MTT, TESLA and DATM whiten "
                      "un-normalized images, so their ZCA sets are in normalization 'none' (NO_NORMALIZATION); "
                      f"{normalization.name!r} is right only for a set whitened after normalizing", stacklevel=2)
    ip, lp, rp = _mtt_paths(Path(images_path).expanduser(), labels_path, lr_path)
    images = float_images(_load_tensor(ip, "images (N, C, H, W)"), normalization, ip)
    labels = _load_tensor(lp, "labels")
    lr = _load_tensor(rp, "the learned lr") if rp is not None else None
    if lr is not None and lr.numel() != 1:
        raise ELFError(f"{rp}: expected a single learned lr, found a tensor of shape {tuple(lr.shape)}")
    meta = {"format": "mtt", "images_path": str(ip), "images_sha256": file_sha256(ip), "labels_path": str(lp)}
    if rp is not None:
        meta["lr_path"] = str(rp)
    return SyntheticSet(images, labels, label_kind, normalization, zca, classes, None, lr, meta)


def _numpy_float64_allowlist() -> list[Any]:
    """The globals a pickled ``numpy.float64`` needs under ``weights_only=True``: numpy's scalar reconstructor
    (under its numpy>=2 and numpy 1.x module names), ``numpy.dtype`` and the float64 dtype class."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
        type(np.dtype(np.float64)),
    ]


_DC_NAME = re.compile(r"res_(?P<method>[A-Za-z0-9]+)_(?P<dataset>[A-Za-z0-9]+)_(?P<model>.+)_(?P<ipc>\d+)ipc\.pt")
_DC_NORMALIZATION = {"cifar10": CIFAR10_MTT, "cifar100": CIFAR100_DC}


def load_dc_result(
    path: PathLike,
    experiment: int = 0,
    *,
    normalization: Normalization | None | str = "auto",
    classes: list[str] | None = None,
) -> SyntheticSet:
    """DC / DSA / DM results ``res_<method>_<dataset>_<model>_<ipc>ipc.pt`` = ``{'data': [[images, labels], ...],
    'accs_all_exps': {model: [float64, ...]}}``; returns experiment ``experiment`` (negative counts from the end).

    ``metadata`` records the file's ``sha256`` and the experiment's index from the start (-1 becomes e.g. "4"): DC
    rewrites the file after each experiment, so a negative index names another set as the run goes on.

    Method, dataset, model and ipc come from the file name. ``normalization="auto"`` uses the DC code's statistics
    for CIFAR10 / CIFAR100 (:data:`CIFAR10_MTT` / :data:`CIFAR100_DC`) and None for other datasets.
    """
    path = Path(path).expanduser()
    try:  # hashed before and after the load: the recorded hash must name the bytes that were read
        sha256 = file_sha256(path)
    except OSError:
        sha256 = ""  # missing or unreadable: safe_torch_load says which
    obj = safe_torch_load(path, allowlist=_numpy_float64_allowlist())
    if not isinstance(obj, dict) or "data" not in obj or not isinstance(obj["data"], (list, tuple)):
        raise ELFError(f"{path}: not a DC/DSA/DM result (expected a dict with a 'data' list of [images, labels])")
    data = obj["data"]
    if not -len(data) <= experiment < len(data):
        raise ELFError(f"{path}: experiment {experiment} does not exist; the file holds {len(data)} experiment(s) (0..{len(data) - 1})")
    experiment %= len(data)  # recorded from the start: DC appends an experiment per rewrite, so -1 moves on
    entry = data[experiment]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(isinstance(t, Tensor) for t in entry):
        raise ELFError(f"{path}: data[{experiment}] should be [images, labels] tensors")
    if file_sha256(path) != sha256:
        raise ELFError(f"{path}: the file changed while it was read (a DC/DSA/DM run still writing it?); load it again "
                       "once the run has finished")
    images, labels = entry[0].detach(), entry[1].detach()
    meta: dict[str, str] = {"format": "dc", "path": str(path), "sha256": sha256, "experiment": str(experiment),
                            "num_experiments": str(len(data))}
    m = _DC_NAME.fullmatch(path.name)
    ipc = None
    if m:
        meta.update(method=m["method"], dataset=m["dataset"], model=m["model"], ipc=m["ipc"])
        ipc = int(m["ipc"])
    accs = obj.get("accs_all_exps")
    if isinstance(accs, dict):
        meta["accs_all_exps"] = json.dumps({str(k): [float(a) for a in v] for k, v in accs.items()})
    dataset = (m["dataset"].lower() if m else "")
    if normalization == "auto":
        normalization = _DC_NORMALIZATION.get(dataset)
    images = float_images(images, normalization, path)  # type: ignore[arg-type]
    if classes is None and dataset == "cifar10" and labels.dim() == 1 and (not labels.numel() or int(labels.max()) < 10):
        classes = list(CIFAR10_CLASSES)
    return SyntheticSet(images, labels, "auto", normalization, False, classes, ipc, None, meta)  # type: ignore[arg-type]


def _one_hot_index(labels: np.ndarray) -> np.ndarray | None:
    """Class indices when every row is one-hot up to a constant shift (0/1, or centered 1-1/K and -1/K as KIP's
    regression targets), else None. Label-smoothed rows (e.g. 0.8/0.1/0.1) are not one-hot and stay soft."""
    mx = labels.max(1, keepdims=True)
    mn = labels.min(1, keepdims=True)
    is_max = labels == mx
    if labels.shape[1] < 2 or not (is_max.sum(1) == 1).all() or not ((labels == mn) | is_max).all():
        return None
    if not np.allclose(mx - mn, 1.0, atol=1e-6):
        return None
    return labels.argmax(1)


#: Why ``zca`` on a KIP ``.npz`` set is not KIP's space: the test images are whitened the MTT/TESLA way
KIP_ZCA_NOTE = ("KIP's released .npz sets were whitened KIP's way (per-channel standardization, layer norm, then ZCA "
                "regularized by 0.1 x the mean eigenvalue), while elf-dd whitens the test images as MTT and TESLA do "
                "(kornia ZCA, eps 0.1, on [0, 1] images): the two spaces differ, so the accuracies are not KIP's; "
                "a set whitened the MTT way is fine")


def load_npz(
    path: PathLike,
    *,
    normalization: Normalization | None = None,
    zca: bool = False,
    classes: list[str] | None = None,
    images_key: str | None = None,
    labels_key: str | None = None,
) -> SyntheticSet:
    """KIP-style ``.npz``: float images NHWC (N, H, W, C) (NCHW also accepted) and labels one-hot (N, K) or (N,).

    One-hot rows (also centered ones such as 0.9/-0.1) become "index" labels; other (N, K) labels stay soft
    ("prob" when rows are distributions, else "logits"). ``zca=True`` warns (:data:`KIP_ZCA_NOTE`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ELFError(f"{path}: no such file")
    if zca:
        warnings.warn(f"load_npz(zca=True): {KIP_ZCA_NOTE}", stacklevel=2)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            ik = images_key or next((k for k in ("images", "x", "X", "x_train", "data", "image") if k in keys), None)
            lk = labels_key or next((k for k in ("labels", "y", "Y", "y_train", "targets", "label") if k in keys), None)
            if ik is None or lk is None or ik not in keys or lk not in keys:
                raise ELFError(f"{path}: cannot find images and labels among the arrays {keys}; pass images_key= and labels_key=")
            x, y = np.asarray(z[ik]), np.asarray(z[lk])
    except ELFError:
        raise
    except PermissionError as e:
        raise ELFError(f"{path}: cannot read it ({e}); check its permissions") from e
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:  # what numpy and zipfile raise on a cut .npz
        raise ELFError(f"{path}: the .npz file is truncated or corrupt ({type(e).__name__}: {e}); download or copy it "
                       "again") from e
    except ValueError as e:
        raise ELFError(f"{path}: not a readable .npz of plain arrays ({e}); object arrays are refused because they need "
                       "unpickling (a damaged file can fail this way too: then download or copy it again)") from e
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ELFError(f"{path}: images array {ik!r} has shape {x.shape}; expected (N, H, W, C)")
    if x.shape[-1] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3, 4):
        raise ELFError(f"{path}: cannot tell the channel axis of images with shape {x.shape}; expected (N, H, W, C) with C in 1, 3, 4")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    elif x.dtype != np.uint8:  # int32/int64 0-255 images must not pass as normalized floats (float_images refuses them)
        raise ELFError(f"{path}: images array {ik!r} is {x.dtype}; expected float (normalized) or uint8 (0-255): "
                       "convert 0-255 integer images with .astype(np.uint8) first")
    images = float_images(torch.from_numpy(np.ascontiguousarray(x)), normalization, path)
    if y.ndim == 2 and y.shape[1] == 1 and np.issubdtype(y.dtype, np.integer):
        y = y[:, 0]  # a column of class indices, not one-hot rows of one class
    if y.ndim == 2 and np.issubdtype(y.dtype, np.number):
        idx = _one_hot_index(y)
        labels = torch.from_numpy(idx.astype(np.int64)) if idx is not None else torch.from_numpy(y.astype(np.float32))
    elif y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        labels = torch.from_numpy(y.astype(np.int64))
    else:
        raise ELFError(f"{path}: labels array {lk!r} has shape {y.shape} dtype {y.dtype}; expected one-hot (N, K) or integer (N,)")
    meta = {"format": "npz", "path": str(path), "sha256": file_sha256(path)}
    return SyntheticSet(images, labels, "auto", normalization, zca, classes, None, None, meta)


def load_image_dir(path: PathLike, normalization: Normalization | None = None, *, mode: str = "RGB") -> SyntheticSet:
    """A folder of class subfolders of images (PNG, ...) -> float set (N, C, H, W), [0, 1] then ``normalization``.

    Sorted folder names give the class indices; images are class-major. 8-bit files quantize the images, so a set
    saved this way is not bit-identical to the float original. The files record no normalization, so one must be
    given (:data:`~elf.pixel_space.NO_NORMALIZATION` keeps [0, 1]), as for uint8 tensors.
    """
    if normalization is None:
        raise ELFError(f"{path}: a folder of 8-bit images records no normalization, and the set must be in the pixel "
                       "space of the test data and the teacher: pass normalization= (e.g. elf.pixel_space.CIFAR10_MTT; "
                       "NO_NORMALIZATION keeps [0, 1]); elf eval: --normalization")
    imgs = decode_image_tree(path, None, mode=mode)
    meta = {"format": "image_dir", "path": str(path), "source_hash": imgs.source_hash}
    return SyntheticSet(imgs.as_float(normalization), imgs.labels, "index", normalization, False, imgs.classes, None, None, meta)


_SUPPORTED = (
    "elf-dd synthetic sets (*.safetensors, save_synthetic); "
    "MTT/ELF/TESLA/DATM images_best.pt (+ labels_best.pt, lr_best.pt) or a folder holding them; "
    "DC/DSA/DM res_<method>_<dataset>_<model>_<ipc>ipc.pt; "
    "KIP-style *.npz; "
    "a folder of class subfolders of images"
)


def load_any(path: PathLike, **kw: Any) -> SyntheticSet:
    """Load a synthetic set in any supported format, chosen by file name / extension; keywords go to that loader."""
    p = Path(path).expanduser()
    name = p.name.lower()
    if p.is_dir():
        if (p / "images_best.pt").is_file():
            loader: Any = load_mtt
        elif any(c.is_dir() for c in p.iterdir()):
            loader = load_image_dir
        else:
            raise ELFError(f"{p}: folder holds no images_best.pt and no class subfolders. Supported: {_SUPPORTED}")
    elif not p.exists():
        raise ELFError(f"{p}: no such file or directory")
    elif name.endswith(".safetensors"):
        loader = load_synthetic
    elif name.startswith("res_") and name.endswith(".pt"):
        loader = load_dc_result
    elif name.startswith("replay_buffer") and name.endswith(".pt"):
        raise ELFError(f"{p}: an MTT expert buffer (teacher weights), not a synthetic set; use load_expert_buffer")
    elif name.startswith("images") and name.endswith(".pt"):
        loader = load_mtt
    elif name.endswith(".npz"):
        loader = load_npz
    else:
        raise ELFError(f"{p}: unknown synthetic-set format. Supported: {_SUPPORTED}")
    accepted = set(inspect.signature(loader).parameters)
    extra = sorted(set(kw) - accepted)
    if extra:
        raise ELFError(f"{p}: {loader.__name__} does not take {', '.join(extra)} (it takes {', '.join(sorted(accepted - {'path', 'images_path'}))})")
    return loader(p, **kw)


def load_tensor_pair(path: PathLike, normalization: Normalization | None = None) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` from the files people pass around: a ``.pt`` holding ``{"images", "labels"}`` or an
    ``(images, labels)`` pair, a ``.safetensors`` file with those two tensors (elf-dd sets included), or any format
    :func:`load_any` reads. Images come back as float ``(N, C, H, W)``; ``.pt`` files are read with ``weights_only``.
    uint8 images are converted with the file's recorded normalization, else ``normalization``, else refused."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        tensors, meta = load_tensors(p)
        if {"images", "labels"} <= set(tensors):
            try:
                recorded = json.loads(meta.get("normalization") or "null")
            except ValueError:
                recorded = None
            norm = Normalization.from_dict(recorded) if isinstance(recorded, dict) else normalization
            return float_images(tensors["images"], norm, p), tensors["labels"]
    elif p.suffix == ".pt" and not p.name.startswith(("images", "res_", "replay_buffer")):
        obj = safe_torch_load(p)
        if isinstance(obj, dict) and "images" in obj and "labels" in obj and isinstance(obj["images"], Tensor):
            return float_images(obj["images"], normalization, p), obj["labels"]
        if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj):
            return float_images(obj[0], normalization, p), obj[1]
        raise ELFError(f"{p}: expected {{'images': ..., 'labels': ...}} or an (images, labels) pair of tensors")
    sset = load_assuming(p, normalization)
    return sset.images, sset.labels


def load_assuming(path: PathLike, normalization: Normalization | None, **kw: Any) -> SyntheticSet:
    """:func:`load_any`, with ``normalization`` given to the formats that record none (MTT files, ``.npz``, image
    folders: the space their float images are taken to be in, and how their 8-bit pixels are converted); an elf-dd
    set keeps its own and a DC result infers it from its file name. The set's ``normalization`` can still be None
    (e.g. a DC result of a dataset without known statistics): the caller decides what to assume and says so."""
    p = Path(path).expanduser()
    return load_any(p, normalization=normalization, **kw) if _takes_normalization(p) else load_any(p, **kw)


def _takes_normalization(p: Path) -> bool:
    """True when :func:`load_any` would read ``p`` with a loader that takes ``normalization=`` (not an elf-dd
    set, which records its own, nor a DC result, which infers it from the file name)."""
    name = p.name.lower()
    return not (name.endswith(".safetensors") or (name.startswith("res_") and name.endswith(".pt")))
