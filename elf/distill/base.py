"""The small design every distiller shares: a parameterization of the synthetic set, and how it is exported.

A :class:`Parameterization` owns the learnable variables of a synthetic set (pixels, generator latents, ...), exposes
them as optimizer parameter groups (each with its own lr and momentum), produces differentiable normalized images
``(N, C, H, W)`` with their labels, and exports to the :class:`~elf.io.SyntheticSet` that ELFTrainer and ``elf eval``
read. Objectives (DM, DC/DSA, MTT) only ever see ``images()`` and ``labels``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ELFError
from ..pixel_space import Normalization
from ..synthetic import SyntheticSet

__all__ = ["Parameterization", "Objective", "class_major_labels", "seeded_global_rng"]


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator, device: torch.device | str) -> Iterator[None]:
    """Torch's global RNG (the CPU one, and ``device``'s when it is a CUDA device) forked and seeded from the state
    of ``generator``: what a network draws from it (dropout masks) is then reproducible from the loop's generator,
    and the global RNG is as before afterwards.

    The seed hashes ``generator.get_state()`` (read, not drawn: the generator's stream is unchanged, and nothing
    waits for a device). Other accelerators' (MPS, XPU) global generators are neither forked nor seeded.
    """
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") >> 1  # 63 bits
    dev = torch.device(device)
    cuda = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every CUDA device, unforked
        if cuda:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)  # the current (= dev's) generator only
        yield


def class_major_labels(num_classes: int, ipc: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[0]*ipc + [1]*ipc + ...``: int64 ``(num_classes * ipc,)``, the DD literature's class-major order."""
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


class Parameterization(nn.Module):
    """Base class of synthetic-set parameterizations.

    Subclasses implement :meth:`images` and :meth:`param_groups`; ``labels`` is a buffer of class-major hard labels.

    Args:
        num_classes: classes K. ipc: images per class. image_shape: ``(C, H, W)`` of one output image.
        normalization: the pixel space the images live in (recorded on export).
    """

    labels: torch.Tensor

    def __init__(self, num_classes: int, ipc: int, image_shape: tuple[int, int, int], normalization: Normalization | None) -> None:
        super().__init__()
        if num_classes < 1 or ipc < 1:
            raise ELFError(f"need num_classes >= 1 and ipc >= 1, got {num_classes} and {ipc}")
        self.num_classes = num_classes
        self.ipc = ipc
        self.image_shape = tuple(int(s) for s in image_shape)
        self.normalization = normalization
        self.register_buffer("labels", class_major_labels(num_classes, ipc))

    def images(self) -> torch.Tensor:
        """All synthetic images ``(num_classes * ipc, C, H, W)``, normalized, differentiable w.r.t. the parameters."""
        raise NotImplementedError

    def class_images(self, c: int) -> torch.Tensor:
        """The ``ipc`` images of class ``c`` ``(ipc, C, H, W)`` (default: a slice of :meth:`images`)."""
        return self.images()[c * self.ipc : (c + 1) * self.ipc]

    def images_for_loss(self) -> torch.Tensor:
        """The images an objective computes its loss on; ``loss.backward()`` must reach the parameters after
        :meth:`finish_backward`. Default: :meth:`images` itself (autograd does everything). A generator
        parameterization returns a detached leaf computed chunk by chunk without a graph, and replays the chunks in
        :meth:`finish_backward` (peak memory: one chunk)."""
        return self.images()

    def finish_backward(self, images: torch.Tensor) -> None:
        """Push ``images.grad`` into the parameters when :meth:`images_for_loss` returned a detached leaf."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, e.g. ``[{"params": [...], "lr": 1.0, "momentum": 0.5, "name": "pixels"}]``."""
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer:
        """SGD over :meth:`param_groups` (each group's own lr and momentum)."""
        groups = [{k: v for k, v in g.items() if k != "name"} for g in self.param_groups()]
        return torch.optim.SGD(groups, lr=groups[0]["lr"])

    @torch.no_grad()
    def export(self, metadata: dict[str, str] | None = None, lr: float | None = None) -> SyntheticSet:
        """The current set as a :class:`~elf.io.SyntheticSet` (detached, on CPU) with ``metadata``."""
        return SyntheticSet(
            self.images().detach().float().cpu().clone(),  # a copy: on CPU, detach().cpu() would alias the live parameters
            self.labels.cpu(),
            label_kind="index",
            normalization=self.normalization,
            ipc=self.ipc,
            lr=lr,
            metadata={"parameterization": type(self).__name__, **(metadata or {})},
        )


class Objective:
    """A distillation objective: a scalar loss on the synthetic images, differentiable w.r.t. them.

    ``loss(images, labels, step, generator)``: ``images`` ``(N, C, H, W)`` from :meth:`Parameterization.images_for_loss`,
    ``labels`` ``(N,)`` class-major, ``step`` the outer iteration, ``generator`` a ``torch.Generator`` on the images'
    device that every random choice (networks, real batches, augmentation) must draw from.
    """

    name = "objective"

    def loss(self, images: torch.Tensor, labels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra learnable parameters of the objective (MTT's learned lr), as optimizer groups."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the set (for resuming)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def metadata(self) -> dict[str, str]:
        """Settings recorded in the exported set."""
        return {"method": self.name}
