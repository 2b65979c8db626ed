"""GLaD: distill into the intermediate feature space of an image generator (Cazenavette et al., CVPR 2023).

Each synthetic image is ``G_tail(f_i, w_i)`` where ``f_i`` is a learnable feature map at an intermediate layer of a
frozen generator ``G`` (and ``w_i`` an optional learnable style vector, for generators that have one). The layers
before the cut run once, at initialization, on random latents ``z_i ~ N(0, I)`` (one per image, from a seeded
``torch.Generator``); afterwards only the tail runs. Images are mapped ``[-1, 1] -> [0, 1] -> normalization``.

Memory (as GLaD's public code): :meth:`GeneratorLatentParam.images_for_loss` renders the images chunk by chunk
without a graph and returns them as a detached leaf; after ``loss.backward()``,
:meth:`GeneratorLatentParam.finish_backward` re-renders each chunk with a graph and back-propagates that chunk's
slice of ``images.grad`` into the latents, so the generator's activations are held for one chunk at a time. This is
exact only when a chunk's images do not depend on the other images of the batch: the generator is put in eval mode
(BatchNorm uses its running statistics, dropout is off) and its weights are frozen.

Learning rates (GLaD public code, SGD momentum 0.5): DM 10 (feature maps) / 0.01 (style); DC/DSA 1 / 0.001;
MTT 10000 / 10 (:data:`GLAD_LRS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ELFError
from ..fileio import state_dict_sha256
from ..pixel_space import Normalization
from ..split import split_model
from ..synthetic import SyntheticSet
from .base import Parameterization
from .generators import SmallGenerator, load_generator, to_pm1, train_generator

__all__ = ["GLAD_LRS", "GeneratorLatentParam", "build_glad_param", "glad_lrs"]

#: (feature-map lr, style lr) of the GLaD public code, per distillation method; SGD momentum 0.5.
GLAD_LRS: dict[str, tuple[float, float]] = {
    "dm": (10.0, 0.01),
    "dc": (1.0, 0.001),
    "dsa": (1.0, 0.001),
    "mtt": (10000.0, 10.0),
}


def glad_lrs(method: str) -> tuple[float, float]:
    """``(feature-map lr, style lr)`` of GLaD for ``method`` ("dm", "dc", "dsa", "mtt")."""
    key = method.lower()
    if key not in GLAD_LRS:
        raise ELFError(f"no GLaD learning rates for method {method!r}; choose one of {sorted(GLAD_LRS)} or pass lr_features/lr_style")
    return GLAD_LRS[key]


def _is_styled(generator: nn.Module) -> bool:
    return callable(getattr(generator, "glad_head", None)) and callable(getattr(generator, "glad_tail", None))


class GeneratorLatentParam(Parameterization):
    """A synthetic set parameterized by generator feature maps (and style vectors): GLaD.

    Args:
        generator: a frozen image generator mapping latents ``(N, Z)`` to images in ``[-1, 1]`` ``(N, C, H, W)``:
            either a module with ``glad_head(z, at) -> (f, w | None)`` and ``glad_tail(f, w, at)`` (e.g.
            :class:`~elf.distill.generators.SmallGenerator`; a non-None ``w`` is optimized too), or any module that
            :func:`~elf.split.split_model` can cut at ``split_at`` (only the feature maps are optimized). It is
            switched to eval mode and its parameters get ``requires_grad=False``; it stays a submodule, so
            ``state_dict()`` holds it next to the latents.
        split_at: the layer whose output is learned (default: the generator's ``glad_split_point``).
        num_classes, ipc: the set's size (class-major labels). normalization: the images' pixel space (None: ``[0, 1]``).
        method: picks default lrs from :data:`GLAD_LRS` ("dm", "dc", "dsa", "mtt").
        lr_features, lr_style: override the method's lrs. momentum: SGD momentum of both groups (0.5).
        chunk_size: images rendered at once in :meth:`images_for_loss` / :meth:`finish_backward` (GLaD: 10).
        seed: seeds the initial latents ``z ~ N(0, I)`` (drawn on the CPU, so the init does not depend on the device).
        latents: initial latents ``(N, Z)`` instead of random ones (e.g. an encoder's means of real images).
        z_dim: the latent size when the generator has no ``z_dim`` attribute.
        generator_kind: a word recorded on export ("random", "trained", "checkpoint", ...).
    """

    def __init__(
        self,
        generator: nn.Module,
        split_at: str | None,
        num_classes: int,
        ipc: int,
        normalization: Normalization | None,
        *,
        method: str = "dm",
        lr_features: float | None = None,
        lr_style: float | None = None,
        momentum: float = 0.5,
        chunk_size: int = 10,
        seed: int = 0,
        latents: Tensor | None = None,
        z_dim: int | None = None,
        generator_kind: str = "custom",
    ) -> None:
        if chunk_size < 1:
            raise ELFError(f"chunk_size must be >= 1, got {chunk_size}")
        at = split_at if split_at is not None else getattr(generator, "glad_split_point", None)
        if not isinstance(at, str):
            raise ELFError(f"{type(generator).__name__} has no glad_split_point; pass split_at= (a layer name of the generator)")
        n = num_classes * ipc
        zd = z_dim if z_dim is not None else getattr(generator, "z_dim", None)
        if latents is None and not isinstance(zd, int):
            raise ELFError(f"cannot tell the latent size of {type(generator).__name__}; pass z_dim= (or latents=)")
        generator.eval()
        generator.requires_grad_(False)
        try:
            p0 = next(generator.parameters())
            device, dtype = p0.device, p0.dtype
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.float32
        if latents is None:
            z = torch.randn(n, int(zd), generator=torch.Generator().manual_seed(seed)).to(device, dtype)  # type: ignore[arg-type]
        else:
            if latents.dim() != 2 or latents.shape[0] != n:
                raise ELFError(f"latents must be (num_classes * ipc, Z) = ({n}, Z), got {tuple(latents.shape)}")
            z = latents.detach().to(device, dtype)
        styled = _is_styled(generator)
        if styled:
            head: Callable[[Tensor], tuple[Tensor, Tensor | None]] = lambda zz: generator.glad_head(zz, at)  # noqa: E731
        else:
            halves = split_model(generator, at)
            head = lambda zz: (halves.front(zz), None)  # noqa: E731
        with torch.no_grad():
            fs, ws = [], []
            for i in range(0, n, chunk_size):
                f, w = head(z[i : i + chunk_size])
                if not isinstance(f, Tensor):
                    raise ELFError(f"the generator's output at {at!r} is a {type(f).__name__}, not one tensor; choose another split point")
                fs.append(f)
                ws.append(w)
        with_style = styled and ws[0] is not None
        feats = torch.cat(fs).detach().clone()
        tail = self._tail_fn(generator, at, styled, None if styled else halves)
        with torch.no_grad():
            probe = tail(feats[:1], ws[0][:1] if with_style else None)
        if probe.dim() != 4:
            raise ELFError(f"the generator must output images (N, C, H, W); got shape {tuple(probe.shape)}")
        super().__init__(num_classes, ipc, tuple(probe.shape[1:]), normalization)  # type: ignore[arg-type]
        if normalization is not None and normalization.channels != probe.shape[1]:
            raise ELFError(f"normalization {normalization.name!r} has {normalization.channels} channels but the generator makes {probe.shape[1]}")
        self.generator = generator
        self.split_at = at
        self.styled = styled
        self.chunk_size = int(chunk_size)
        self.momentum = float(momentum)
        self.generator_kind = generator_kind
        # which generator (its weights) and which starting latents: a resumed run must continue the same ones
        self.generator_sha256 = state_dict_sha256(generator)
        self.latent_init = "given latents" if latents is not None else f"noise (seed {seed})"
        self.method = method
        lr_f, lr_s = glad_lrs(method) if method else (None, None)
        if (lr_features if lr_features is not None else lr_f) is None or (lr_style if lr_style is not None else lr_s) is None:
            raise ELFError("without a method, pass both lr_features and lr_style")
        self.lr_features = float(lr_features if lr_features is not None else lr_f)  # type: ignore[arg-type]
        self.lr_style = float(lr_style if lr_style is not None else lr_s)  # type: ignore[arg-type]
        self._tail_holder = (tail,)  # a tuple: the tail shares the generator's modules, not registered twice
        self.features = nn.Parameter(feats)
        self.styles: nn.Parameter | None
        self.register_parameter("styles", nn.Parameter(torch.cat(ws).detach().clone()) if with_style else None)  # type: ignore[arg-type]

    @staticmethod
    def _tail_fn(generator: nn.Module, at: str, styled: bool, halves: Any) -> Callable[[Tensor, Tensor | None], Tensor]:
        if styled:
            return lambda f, w: generator.glad_tail(f, w, at)
        return lambda f, w: halves.rear(f)

    # ------------------------------------------------------------------ rendering
    def train(self, mode: bool = True) -> GeneratorLatentParam:
        """The generator stays in eval mode whatever ``mode`` is (chunked rendering needs per-image independence)."""
        super().train(mode)
        self.generator.eval()
        return self

    def _render(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` ``(stop - start, C, H, W)``, normalized; differentiable when grad is enabled."""
        if self.generator.training:
            self.generator.eval()
        w = self.styles[start:stop] if self.styles is not None else None
        x = self._tail_holder[0](self.features[start:stop], w)
        x = (x + 1.0) * 0.5
        return self.normalization.normalize(x) if self.normalization is not None else x

    def images(self) -> Tensor:
        """All images ``(N, C, H, W)``, normalized, differentiable w.r.t. the feature maps (and styles)."""
        return self._render(0, self.features.shape[0])

    def class_images(self, c: int) -> Tensor:
        """The ``ipc`` images of class ``c`` ``(ipc, C, H, W)``, rendering only those."""
        return self._render(c * self.ipc, (c + 1) * self.ipc)

    def images_for_loss(self) -> Tensor:
        """All images rendered ``chunk_size`` at a time without a graph: a detached leaf ``(N, C, H, W)`` with
        ``requires_grad=True``. Call :meth:`finish_backward` with it after ``loss.backward()``."""
        n = self.features.shape[0]
        with torch.no_grad():
            x = torch.cat([self._render(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)])
        return x.detach().requires_grad_(True)

    def finish_backward(self, images: Tensor) -> None:
        """Re-render each chunk with a graph and back-propagate its slice of ``images.grad`` into the latents
        (gradients accumulate in ``features.grad`` / ``styles.grad``); peak memory: one chunk's graph."""
        if images.grad_fn is not None:
            return  # images came from images(): autograd already reached the latents
        if images.grad is None:
            raise ELFError("images.grad is None: call loss.backward() on a loss computed from images_for_loss() before finish_backward")
        n = self.features.shape[0]
        if images.shape[0] != n:
            raise ELFError(f"finish_backward got {images.shape[0]} images but the set has {n}; pass the tensor images_for_loss() returned")
        grad = images.grad
        with torch.enable_grad():
            for i in range(0, n, self.chunk_size):
                j = min(i + self.chunk_size, n)
                torch.autograd.backward(self._render(i, j), grad[i:j])

    # ------------------------------------------------------------------ optimization and export
    def param_groups(self) -> list[dict[str, Any]]:
        """``[{"name": "features", lr_features, momentum}]`` plus ``{"name": "styles", lr_style}`` when styled."""
        groups: list[dict[str, Any]] = [{"params": [self.features], "lr": self.lr_features, "momentum": self.momentum, "name": "features"}]
        if self.styles is not None:
            groups.append({"params": [self.styles], "lr": self.lr_style, "momentum": self.momentum, "name": "styles"})
        return groups

    def metadata(self) -> dict[str, str]:
        """The settings (constant during a run; the distillation loop refuses to resume a checkpoint written with
        others, e.g. another generator or latent init): generator class, kind and weights' hash, split point, learned
        shapes, latent init, chunk size, lrs and momentum."""
        return {
            "parameterization": "GLaD",
            "generator": type(self.generator).__name__,
            "generator_kind": self.generator_kind,
            "generator_sha256": self.generator_sha256,
            "split_at": self.split_at,
            "feature_shape": "x".join(str(s) for s in self.features.shape[1:]),
            "style": str(self.styles is not None),
            "latent_init": self.latent_init,
            "chunk_size": str(self.chunk_size),
            "lr_features": repr(self.lr_features),
            "lr_style": repr(self.lr_style),
            "momentum": repr(self.momentum),
        }

    @torch.no_grad()
    def export(self, metadata: dict[str, str] | None = None, lr: float | None = None) -> SyntheticSet:
        """The rendered set as a :class:`~elf.io.SyntheticSet`; metadata records :meth:`metadata` (parameterization
        "GLaD", the generator's class, kind and weights' hash, the split point, the learned shapes, the lrs)."""
        return super().export({**self.metadata(), **(metadata or {})}, lr)


def build_glad_param(
    kind: str,
    num_classes: int,
    ipc: int,
    normalization: Normalization | None,
    *,
    image_size: int = 32,
    channels: int = 3,
    method: str = "dm",
    split_at: str | None = None,
    generator: nn.Module | None = None,
    checkpoint: str | None = None,
    real_images: Tensor | None = None,
    real_labels: Tensor | None = None,
    train_epochs: int = 10,
    init: str = "noise",
    z_dim: int = 128,
    width: int = 32,
    style_dim: int = 0,
    chunk_size: int = 10,
    lr_features: float | None = None,
    lr_style: float | None = None,
    momentum: float = 0.5,
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = print,
) -> GeneratorLatentParam:
    """A GLaD parameterization for the command line.

    Args:
        kind: "random" (a randomly initialized :class:`SmallGenerator`, seeded with ``seed``), "trained" (one
            trained for ``train_epochs`` as a VAE decoder on ``real_images``, see :func:`train_generator`) or
            "checkpoint" (``checkpoint``, a file from :func:`save_generator`, or a state dict for the module
            ``generator`` that the caller constructed).
        real_images: normalized real images ``(M, C, S, S)`` (kind "trained", and ``init="real"``);
            real_labels ``(M,)`` for ``init="real"``.
        init: "noise" (latents ``z ~ N(0, I)``) or "real" (latents = the encoder's means of ``ipc`` random real
            images per class; needs an encoder: kind "trained", or a checkpoint saved with one).
        Other arguments: see :class:`GeneratorLatentParam` and :class:`SmallGenerator`.
    """
    encoder = None
    if kind == "random":
        with torch.random.fork_rng(devices=[]):  # built on the CPU: seed the CPU generator only (not CUDA's)
            torch.default_generator.manual_seed(seed)
            gen: nn.Module = SmallGenerator(z_dim, channels, width, image_size, style_dim)
    elif kind == "trained":
        if real_images is None:
            raise ELFError("generator kind 'trained' needs real_images (the real training set) to train the generator on")
        result = train_generator(real_images, normalization=normalization, epochs=train_epochs, z_dim=z_dim, width=width,
                                 style_dim=style_dim, seed=seed, device=device, log=log)
        gen, encoder = result.generator, result.encoder
    elif kind == "checkpoint":
        if checkpoint is None:
            raise ELFError("generator kind 'checkpoint' needs checkpoint= (a generator .safetensors file)")
        gen, encoder = load_generator(checkpoint, generator, with_encoder=True)
    else:
        raise ELFError(f"unknown generator kind {kind!r}; choose 'random', 'trained' or 'checkpoint'")
    if device is not None:
        gen.to(device)
    latents = None
    if init == "real":
        if encoder is None:
            raise ELFError("init='real' needs the generator's encoder (generator kind 'trained', or a checkpoint saved with its encoder); use init='noise'")
        if real_images is None or real_labels is None:
            raise ELFError("init='real' needs real_images and real_labels")
        latents = _encode_real(encoder, real_images, real_labels, normalization, num_classes, ipc, seed)
    elif init != "noise":
        raise ELFError(f"unknown init {init!r}; choose 'noise' or 'real'")
    return GeneratorLatentParam(gen, split_at, num_classes, ipc, normalization, method=method, lr_features=lr_features,
                                lr_style=lr_style, momentum=momentum, chunk_size=chunk_size, seed=seed, latents=latents,
                                z_dim=getattr(gen, "z_dim", z_dim), generator_kind=kind)


@torch.no_grad()
def _encode_real(encoder: nn.Module, images: Tensor, labels: Tensor, normalization: Normalization | None,
                 num_classes: int, ipc: int, seed: int) -> Tensor:
    """Encoder means of ``ipc`` random real images per class, class-major ``(num_classes * ipc, Z)``."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise ELFError(f"class {c} has {idx.numel()} real images; init='real' needs at least ipc={ipc}")
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:ipc]])
    sel = torch.cat(picks)
    dev = next(encoder.parameters()).device
    mus = [encoder(to_pm1(images[sel[i : i + 256]], normalization).to(dev))[0] for i in range(0, sel.numel(), 256)]
    return torch.cat(mus)
