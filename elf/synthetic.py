"""The synthetic-set type: :class:`SyntheticSet`, a distilled image set with its labels and pixel space.

Reading and writing synthetic sets (our safetensors format and the formats the dataset-distillation code bases
publish) is :mod:`elf.io`'s job; this module holds only the type and its validation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import ELFError
from .losses import infer_label_kind, is_distribution
from .pixel_space import Normalization

__all__ = ["SyntheticSet", "LABEL_KINDS"]

#: The kinds of labels a synthetic set can carry: class indices, probabilities (rows sum to 1) or logits.
LABEL_KINDS = ("index", "prob", "logits")


@dataclass
class SyntheticSet:
    """A distilled image set.

    ``images``: float (N, C, H, W), in the space the set was distilled in (normalized, and ZCA-whitened when
    ``zca``); ``labels``: int64 (N,) for ``label_kind`` "index", float (N, K) for "prob" (rows sum to 1) or
    "logits" ("auto" infers the kind); ``ipc``: images per class, inferred when the (argmax) labels are class-major
    and balanced; ``lr``: the learned learning rate (MTT/DATM), if any; ``metadata``: free-form strings
    (method, source, ...).
    """

    images: Tensor
    labels: Tensor
    label_kind: str = "auto"
    normalization: Normalization | None = None
    zca: bool = False
    classes: list[str] | None = None
    ipc: int | None = None
    lr: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor):
            raise ELFError(f"SyntheticSet.images must be a tensor, got {type(self.images).__name__}")
        if not isinstance(self.labels, Tensor):
            self.labels = torch.as_tensor(self.labels)
        self.images = self.images.detach()
        self.labels = self.labels.detach()
        x = self.images
        if x.dim() != 4 or not x.is_floating_point():
            fix = (": convert uint8 images with x.float() / 255 and normalize (elf.io.float_images does it)"
                   if x.dtype == torch.uint8 else "")
            raise ELFError(f"synthetic images must be float (N, C, H, W), got {x.dtype} {tuple(x.shape)}{fix}")
        if not bool(torch.isfinite(x).all()):
            raise ELFError("synthetic images contain NaN or inf values; the file is corrupt or the distillation diverged")
        n = x.shape[0]
        if self.labels.shape[:1] != (n,):
            raise ELFError(f"labels have shape {tuple(self.labels.shape)} but there are {n} images; need one label per image")
        if self.label_kind == "auto":
            self.label_kind = infer_label_kind(self.labels)
        if self.label_kind not in LABEL_KINDS:
            raise ELFError(f"label_kind must be one of {', '.join(LABEL_KINDS)} or 'auto', got {self.label_kind!r}")
        if self.label_kind == "index":
            if self.labels.dim() != 1 or self.labels.is_floating_point() or self.labels.dtype == torch.bool:
                raise ELFError(f"index labels must be integer (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
            self.labels = self.labels.long()
            if n and int(self.labels.min()) < 0:
                raise ELFError("index labels must be non-negative class indices")
        else:
            if self.labels.dim() != 2 or not self.labels.is_floating_point():
                raise ELFError(f"{self.label_kind} labels must be float (N, K), got {self.labels.dtype} {tuple(self.labels.shape)}")
            if not bool(torch.isfinite(self.labels).all()):
                raise ELFError("soft labels contain NaN or inf values")
            if self.label_kind == "prob" and not is_distribution(self.labels):
                raise ELFError("label_kind 'prob' needs non-negative rows that sum to 1; use 'logits' for unnormalized scores")
        if isinstance(self.normalization, dict):
            self.normalization = Normalization.from_dict(self.normalization)
        if self.normalization is not None and self.normalization.channels != x.shape[1]:
            raise ELFError(f"normalization {self.normalization.name!r} has {self.normalization.channels} channels but images have {x.shape[1]}")
        self.zca = bool(self.zca)
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
            if self.label_kind != "index" and len(self.classes) != self.labels.shape[1]:
                raise ELFError(f"{len(self.classes)} class names given but soft labels have {self.labels.shape[1]} columns")
            if self.label_kind == "index" and n and int(self.labels.max()) >= len(self.classes):
                raise ELFError(f"label {int(self.labels.max())} has no class name ({len(self.classes)} names given)")
        if self.lr is not None:
            self.lr = float(self.lr.detach().reshape(-1)[0]) if isinstance(self.lr, Tensor) else float(self.lr)
            if not math.isfinite(self.lr):
                raise ELFError(f"learned lr is {self.lr}; expected a finite number")
        if self.ipc is None:
            self.ipc = self._infer_ipc()
        elif int(self.ipc) <= 0:
            raise ELFError(f"ipc must be positive, got {self.ipc}")
        else:
            self.ipc = int(self.ipc)
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def content_sha256(self) -> str:
        """SHA-256 of the images and labels: what a run trains on (a file replaced under the same name gets another);
        records of ``elf eval`` and ``elf study`` keep it to refuse resuming or summarizing across sets."""
        from .fileio import tensor_sha256

        return tensor_sha256(self.images, self.labels)

    @property
    def num_classes(self) -> int:
        """K: the soft-label width, else the number of class names, else max label + 1."""
        if self.label_kind != "index":
            return int(self.labels.shape[1])
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self) else 0

    def label_real(self, real: Any, what: str = "the test split", log: Callable[[str], None] | None = None) -> Any:
        """Real images (an :class:`elf.data.ImageSet`) labelled as this set numbers its classes: by name when the
        set has names (a test split whose folders sort differently cannot shift the labels); without names, the
        real data's class count must cover every label of the set, and its names then name the set's labels.
        Raises :class:`ELFError` naming the classes when they cannot match."""
        if self.classes is not None:
            matched = real.with_classes(self.classes, what, "the synthetic set's classes")
            if matched is not real and log is not None:
                log(f"{what}: classes matched to the set's by name: {', '.join(self.classes)}")
            return matched
        k = self.num_classes
        if k > real.num_classes or (self.label_kind != "index" and k != real.num_classes):
            raise ELFError(f"the synthetic set has {k} classes (labels up to {k - 1}) but {what} has "
                           f"{real.num_classes} ({', '.join(real.classes)}); check the labels file and the data")
        names = list(real.classes)
        if all(c.isdigit() for c in names) and names != sorted(names, key=int):
            warnings.warn(f"the synthetic set records no class names and {what}'s class folders are numbers sorted as "
                          f"text ({', '.join(names[:4])}, ...), so the set's label 2 is matched with folder "
                          f"{names[2]!r}; if the set numbers classes numerically, zero-pad the folder names "
                          "(or give the set its class names)", stacklevel=2)
        if self.label_kind == "index":
            self.classes = names  # the set records no names: the real data's classes name its labels
        return real

    def hard_labels(self) -> Tensor:
        """int64 (N,) class indices (argmax of soft labels)."""
        return self.labels if self.label_kind == "index" else self.labels.argmax(1)

    def _infer_ipc(self) -> int | None:
        if not len(self):
            return None
        y = self.hard_labels().cpu()
        counts = torch.bincount(y, minlength=self.num_classes)
        sorted_ = bool((y[1:] >= y[:-1]).all())
        if sorted_ and bool((counts == counts[0]).all()) and int(counts[0]) > 0:
            return int(counts[0])
        return None
