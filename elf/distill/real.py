"""Class-wise random batches of real images, drawn on the training device from a ``torch.Generator``.

Distillation objectives compare the synthetic images of class ``c`` with a fresh random batch of real images of the
same class every iteration (DC/DSA/DM: ``get_images(c, batch_real)``, 256 images without replacement). The sampler
keeps the real images on the device sorted by class, so a batch is one ``randperm`` and one gather: no host
synchronization, no DataLoader.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import ImageSet
from ..errors import ELFError
from ..fileio import tensor_sha256
from ..pixel_space import Normalization

__all__ = ["RealSampler"]


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ELFError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ELFError(
            f"the generator lives on {generator.device} but the real images on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


class RealSampler:
    """Real images ``(N, C, H, W)`` (normalized float) and labels ``(N,)``, indexed per class.

    Args:
        images: normalized float images ``(N, C, H, W)``, as the synthetic set will be.
        labels: int class indices ``(N,)``.
        num_classes: K (default ``max(labels) + 1``).
        device: where the images are kept and batches are drawn (default: the images' device).
        source_hash: identifies the real data in the metadata of distilled sets (default: a hash of the tensors).
        normalization: the pixel space of ``images`` (recorded, not applied).

    Construction reads the labels once on the host; :meth:`batch` never synchronizes.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int | None = None,
        *,
        device: torch.device | str | None = None,
        source_hash: str | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ELFError(
                f"real images must be a float tensor (N, C, H, W), normalized like the synthetic set; got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}. "
                "Convert an ImageSet with RealSampler.from_imageset(data, normalization)"
            )
        labels_cpu = torch.as_tensor(labels).detach().cpu()
        if labels_cpu.dim() != 1 or labels_cpu.shape[0] != images.shape[0] or labels_cpu.is_floating_point():
            raise ELFError(f"labels must be integer class indices (N,) with N = {images.shape[0]}, got {labels_cpu.dtype} {tuple(labels_cpu.shape)}")
        if labels_cpu.numel() == 0:
            raise ELFError("no real images given: the sampler needs at least one image per class")
        labels_cpu = labels_cpu.long()
        if int(labels_cpu.min()) < 0:
            raise ELFError("labels must be non-negative class indices")
        k = int(labels_cpu.max()) + 1 if num_classes is None else int(num_classes)
        if int(labels_cpu.max()) >= k:
            raise ELFError(f"label {int(labels_cpu.max())} is out of range for num_classes={k}")
        self.device = torch.device(device) if device is not None else images.device
        order = torch.argsort(labels_cpu, stable=True)
        counts = torch.bincount(labels_cpu, minlength=k)
        self.num_classes = k
        self.counts: list[int] = [int(n) for n in counts]
        self.offsets: list[int] = [0] + torch.cumsum(counts, 0)[:-1].tolist()
        self.source_hash = source_hash or tensor_sha256(images.detach().cpu(), labels_cpu)
        self.normalization = normalization
        if bool((labels_cpu[1:] >= labels_cpu[:-1]).all()):  # already class-major (ImageSet): no copy
            self.images = images.detach().to(self.device, torch.float32)
        else:
            self.images = images.detach()[order.to(images.device)].to(self.device, torch.float32)
        self.labels = labels_cpu[order].to(self.device)

    @classmethod
    def from_imageset(
        cls,
        data: ImageSet,
        normalization: Normalization | None,
        device: torch.device | str | None = None,
    ) -> RealSampler:
        """A sampler over an :class:`~elf.data.ImageSet` (uint8), normalized with ``normalization`` on ``device``."""
        if not isinstance(data, ImageSet):
            raise ELFError(f"from_imageset needs an elf.data.ImageSet, got {type(data).__name__}")
        images = data.as_float(normalization, device=device)
        return cls(images, data.labels, data.num_classes, device=device, source_hash=data.source_hash, normalization=normalization)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def batch_size(self, c: int, n: int) -> int:
        """How many images :meth:`batch` returns for class ``c``: ``min(n, images of class c)``."""
        self._check_class(c)
        return min(int(n), self.counts[c])

    def _check_class(self, c: int) -> None:
        if not 0 <= c < self.num_classes:
            raise ELFError(f"class {c} is out of range: the real data has {self.num_classes} classes")
        if self.counts[c] == 0:
            raise ELFError(f"class {c} has no real images; every class needs real images to distill from")

    def batch(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``min(n, count_c)`` distinct random images of class ``c``: ``(n, C, H, W)`` on the sampler's device.

        As DC/DSA/DM's ``get_images``: a random permutation of the class, first ``n`` (all of them when the class is
        smaller). ``generator`` must live on the sampler's device.
        """
        if n < 1:
            raise ELFError(f"batch size must be >= 1, got {n}")
        self._check_class(c)
        _check_generator(generator, self.device)
        count = self.counts[c]
        perm = torch.randperm(count, generator=generator, device=self.device)[: min(int(n), count)]
        return self.images[self.offsets[c] + perm]

    def class_images(self, c: int) -> Tensor:
        """All real images of class ``c`` ``(count_c, C, H, W)`` (a view)."""
        self._check_class(c)
        return self.images[self.offsets[c] : self.offsets[c] + self.counts[c]]

    def __repr__(self) -> str:
        return f"RealSampler({int(self.images.shape[0])} images, {self.num_classes} classes, {self.image_shape}, {self.device})"
