"""Image generators for GLaD: a small DCGAN-style generator, a cheap way to train it, and loading checkpoints.

GLaD (Cazenavette et al., CVPR 2023) distills into the intermediate feature space of a pretrained StyleGAN-XL. Those
weights are downloaded at run time by the public code, which is impossible here, so this module gives a stand-in:

* :class:`SmallGenerator`: latents ``z (N, z_dim)`` -> images in ``[-1, 1]`` ``(N, C, S, S)``: linear stem to a
  ``4x4`` map, ``log2(S) - 2`` blocks [nearest upsample x2 -> conv3x3 -> GroupNorm -> LeakyReLU], conv3x3 to ``C``
  channels, tanh. GroupNorm (per-sample statistics) keeps every image independent of the others in its batch, so
  rendering in chunks is exact in train and eval mode alike. With ``style_dim > 0`` a mapping MLP turns ``z`` into a
  style vector ``w (N, style_dim)`` that modulates every block (``GroupNorm(h) * (1 + s(w)) + b(w)``, as StyleGAN's
  AdaIN), and GLaD then optimizes ``w`` as well as the feature maps.
* :func:`train_generator`: trains it as the decoder of a small variational autoencoder (MSE reconstruction on
  ``[-1, 1]`` images summed over pixels + ``beta`` x KL to N(0, I)), which runs on a CPU in minutes and gives blurry
  but recognizable images from random latents; the encoder is kept so latents can start at real images.
* :func:`save_generator` / :func:`load_generator`: safetensors checkpoints with the constructor arguments in the
  metadata (a user-constructed module of any class loads through :func:`elf.checkpoint.load_checkpoint`).

The GLaD interface of a generator (:class:`~elf.distill.glad.GeneratorLatentParam`) is either any module mapping
``(N, Z)`` latents to ``[-1, 1]`` images that ``split_model`` can cut, or one with the methods
``glad_head(z, at) -> (f, w | None)`` and ``glad_tail(f, w, at) -> images`` (the "styled" protocol
:class:`SmallGenerator` implements).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from ..errors import ELFError
from ..fileio import PathLike
from ..pixel_space import Normalization

__all__ = [
    "SmallGenerator",
    "LatentEncoder",
    "GeneratorTraining",
    "train_generator",
    "to_pm1",
    "save_generator",
    "load_generator",
    "encoder_path",
]

_GEN_FORMAT = "elf-generator/1"


def _num_blocks(image_size: int) -> int:
    n = int(round(math.log2(image_size))) - 2 if image_size > 0 else -1
    if n < 1 or 4 * 2**n != image_size:
        raise ELFError(f"SmallGenerator makes square images of side 8, 16, 32, 64, ...; got image_size={image_size}")
    return n


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _Block(nn.Module):
    """Nearest upsample x2 -> conv3x3 -> GroupNorm (affine, or modulated by a style) -> LeakyReLU(0.2).

    ``(N, in_ch, h, w)`` -> ``(N, out_ch, 2h, 2w)``; ``w`` ``(N, style_dim)`` is required when ``style_dim > 0``.
    """

    def __init__(self, in_ch: int, out_ch: int, style_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(out_ch), out_ch, affine=style_dim == 0)
        self.style = nn.Linear(style_dim, 2 * out_ch) if style_dim > 0 else None
        if self.style is not None:  # small random modulation: the style matters from the start, also untrained
            nn.init.normal_(self.style.weight, std=0.5 / math.sqrt(style_dim))
            nn.init.zeros_(self.style.bias)

    def forward(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        h = self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
        if self.style is not None:
            if w is None:
                raise ELFError("this generator block is style-modulated; pass the style vector w")
            scale, bias = self.style(w).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
            h = h * (1 + scale) + bias
        return F.leaky_relu(h, 0.2)


class SmallGenerator(nn.Module):
    """DCGAN-style generator: ``z (N, z_dim)`` -> images ``(N, channels, image_size, image_size)`` in ``[-1, 1]``.

    Layers: ``stem`` (linear to ``4*width`` x 4 x 4, GroupNorm, LeakyReLU), ``blocks.0 .. blocks.{n-1}`` (each doubles
    the side; channels ``2*width, width, width, ...``), ``to_rgb`` (conv3x3) and tanh. GLaD split points are the names
    ``"stem"`` and ``"blocks.i"``: the feature map after that layer is what GLaD optimizes; the default
    (:attr:`glad_split_point`) is ``"blocks.0"`` (``2*width x 8 x 8``), an intermediate layer as in GLaD.

    Args:
        z_dim: latent size Z. channels: image channels C. width: base channel count. image_size: side S (8, 16, 32,
            ...). style_dim: 0 for a plain generator (``forward`` is fx-traceable and ``split_model`` cuts it), or the
            size of a style vector ``w = mapping(z)`` that modulates every block.
    """

    glad_split_point = "blocks.0"

    def __init__(self, z_dim: int = 128, channels: int = 3, width: int = 32, image_size: int = 32, style_dim: int = 0) -> None:
        super().__init__()
        if z_dim < 1 or width < 1 or channels < 1 or style_dim < 0:
            raise ELFError(f"SmallGenerator needs z_dim, width, channels >= 1 and style_dim >= 0; got {z_dim}, {width}, {channels}, {style_dim}")
        n = _num_blocks(image_size)
        self.config: dict[str, int] = {"z_dim": z_dim, "channels": channels, "width": width, "image_size": image_size, "style_dim": style_dim}
        self.z_dim, self.channels, self.width, self.image_size, self.style_dim = z_dim, channels, width, image_size, style_dim
        chans = [width * 2 ** max(0, 2 - i) for i in range(n + 1)]  # stem output, then each block's output
        self.stem = nn.Sequential(
            nn.Linear(z_dim, chans[0] * 16), nn.Unflatten(1, (chans[0], 4, 4)), nn.GroupNorm(_groups(chans[0]), chans[0]), nn.LeakyReLU(0.2)
        )
        self.mapping = (
            nn.Sequential(nn.Linear(z_dim, style_dim), nn.LeakyReLU(0.2), nn.Linear(style_dim, style_dim)) if style_dim > 0 else None
        )
        self.blocks = nn.ModuleList(_Block(chans[i], chans[i + 1], style_dim) for i in range(n))
        self.to_rgb = nn.Conv2d(chans[-1], channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.to_rgb.weight, std=0.5 / math.sqrt(chans[-1] * 9))

    def split_points(self) -> list[str]:
        """Valid GLaD cut names, in forward order: ``["stem", "blocks.0", ...]``."""
        return ["stem"] + [f"blocks.{i}" for i in range(len(self.blocks))]

    def _cut_index(self, at: str) -> int:
        points = self.split_points()
        if at not in points:
            raise ELFError(f"SmallGenerator has no split point {at!r}; choose one of {points}")
        return points.index(at)  # 0: after the stem, i+1: after blocks.i

    def glad_head(self, z: Tensor, at: str) -> tuple[Tensor, Tensor | None]:
        """``z (N, z_dim)`` -> (feature map after layer ``at`` ``(N, C', h, w)``, style ``(N, style_dim)`` or None)."""
        k = self._cut_index(at)
        w = self.mapping(z) if self.mapping is not None else None
        h = self.stem(z)
        for block in list(self.blocks)[:k]:
            h = block(h, w)
        return h, w

    def glad_tail(self, f: Tensor, w: Tensor | None, at: str) -> Tensor:
        """Feature map after layer ``at`` (and style) -> images in ``[-1, 1]`` ``(N, C, S, S)``."""
        k = self._cut_index(at)
        if self.mapping is not None and w is None:
            raise ELFError("this SmallGenerator is styled (style_dim > 0); glad_tail needs the style vectors w")
        h = f
        for block in list(self.blocks)[k:]:
            h = block(h, w)
        return torch.tanh(self.to_rgb(h))

    def forward(self, z: Tensor) -> Tensor:
        """``z (N, z_dim)`` -> images in ``[-1, 1]`` ``(N, C, S, S)``."""
        w = self.mapping(z) if self.mapping is not None else None
        h = self.stem(z)
        for block in self.blocks:
            h = block(h, w)
        return torch.tanh(self.to_rgb(h))


class LatentEncoder(nn.Module):
    """The VAE encoder of :func:`train_generator`: images in ``[-1, 1]`` ``(N, C, S, S)`` -> ``(mu, logvar)`` ``(N, z_dim)``.

    Stride-2 conv3x3 + LeakyReLU layers down to ``4x4`` (channels ``width, 2*width, 4*width, ...`` capped at
    ``4*width``), then a linear layer to ``2 * z_dim``.
    """

    def __init__(self, z_dim: int = 128, channels: int = 3, width: int = 32, image_size: int = 32) -> None:
        super().__init__()
        n = _num_blocks(image_size)
        self.config = {"z_dim": z_dim, "channels": channels, "width": width, "image_size": image_size}
        layers: list[nn.Module] = []
        c = channels
        for i in range(n):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = out
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(c * 16, 2 * z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


@dataclass
class GeneratorTraining:
    """Result of :func:`train_generator`: the generator (eval mode), its encoder, and the mean loss per epoch."""

    generator: SmallGenerator
    encoder: LatentEncoder
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def to_pm1(images: Tensor, normalization: Normalization | None) -> Tensor:
    """Normalized (or ``[0, 1]`` when ``normalization`` is None) images -> ``[-1, 1]``."""
    x = normalization.denormalize(images) if normalization is not None else images
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).float()


def train_generator(
    images: Tensor,
    *,
    normalization: Normalization | None = None,
    epochs: int = 10,
    z_dim: int = 128,
    width: int = 32,
    style_dim: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    beta: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = print,
) -> GeneratorTraining:
    """Train a :class:`SmallGenerator` as the decoder of a small VAE on real images (our StyleGAN-XL stand-in).

    Loss per image: ``sum_pixels (decoder(z) - x)^2 + beta * KL(q(z|x) || N(0, I))`` with
    ``z = mu + sigma * eps`` (reparameterization), ``x`` in ``[-1, 1]``; Adam(lr, betas (0.5, 0.999)). Random
    latents ``z ~ N(0, I)`` then decode to blurry, image-like pictures, and ``encoder(x).mu`` to reconstructions.

    Args:
        images: real images ``(N, C, S, S)``, normalized with ``normalization`` (None: already in ``[0, 1]``).
        epochs, batch_size, lr, beta: the training numbers. z_dim, width, style_dim: the generator's shape.
        seed: seeds initialization, shuffling and the reparameterization noise.
        device: where to train (default: the images' device). log: called with one line per epoch (None: quiet).
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ELFError(f"train_generator needs square images (N, C, S, S), got {tuple(images.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ELFError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = torch.device(device) if device is not None else images.device
    x_all = to_pm1(images, normalization)
    c, s = int(images.shape[1]), int(images.shape[-1])
    cpu_gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: seed the CPU generator only (not CUDA's)
        torch.default_generator.manual_seed(seed)
        generator = SmallGenerator(z_dim, c, width, s, style_dim)
        encoder = LatentEncoder(z_dim, c, width, s)
    generator.to(dev).train()
    encoder.to(dev).train()
    opt = torch.optim.Adam(list(generator.parameters()) + list(encoder.parameters()), lr=lr, betas=(0.5, 0.999))
    losses: list[float] = []
    t0 = time.perf_counter()
    n = int(images.shape[0])
    for epoch in range(epochs):
        order = torch.randperm(n, generator=cpu_gen)
        total = torch.zeros((), device=dev)
        for idx in order.split(batch_size):
            x = x_all[idx].to(dev)
            mu, logvar = encoder(x)
            eps = torch.randn(mu.shape, generator=cpu_gen).to(dev)
            z = mu + torch.exp(0.5 * logvar) * eps
            recon = (generator(z) - x).pow(2).flatten(1).sum(1)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
            loss = (recon + beta * kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * x.shape[0]
        losses.append(float(total) / n)
        if log is not None:
            log(f"generator epoch {epoch + 1}/{epochs}: VAE loss {losses[-1]:.2f} per image ({time.perf_counter() - t0:.0f} s)")
    generator.eval()
    encoder.eval()
    return GeneratorTraining(generator, encoder, losses, time.perf_counter() - t0)


def encoder_path(path: PathLike) -> Path:
    """Where :func:`save_generator` puts the encoder next to a generator file: ``<stem>.encoder.safetensors``."""
    p = Path(path)
    return p.with_name(p.name[: -len(".safetensors")] + ".encoder.safetensors" if p.name.endswith(".safetensors") else p.name + ".encoder.safetensors")


def save_generator(generator: nn.Module, path: PathLike, encoder: LatentEncoder | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Save a generator (safetensors; a :class:`SmallGenerator` records its constructor arguments) and optionally its
    encoder at :func:`encoder_path`. Returns the generator's path."""
    meta: dict[str, Any] = {"generator_format": _GEN_FORMAT, **(metadata or {})}
    config = getattr(generator, "config", None)
    if isinstance(generator, SmallGenerator) and isinstance(config, dict):
        meta["generator_config"] = json.dumps(config)
    out = save_checkpoint(generator, path, meta)
    if encoder is not None:
        save_checkpoint(encoder, encoder_path(path), {"encoder_config": json.dumps(encoder.config)})
    return out


def load_generator(path: PathLike, generator: nn.Module | None = None, *, with_encoder: bool = False) -> Any:
    """Load a generator checkpoint (eval mode).

    Args:
        path: a ``.safetensors`` (or ``.pt`` state dict) file.
        generator: a module of the checkpoint's architecture, constructed by the caller (any class); None rebuilds
            the :class:`SmallGenerator` whose arguments :func:`save_generator` recorded.
        with_encoder: also return the encoder saved next to it (None when there is none): ``(generator, encoder)``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ELFError(f"generator checkpoint {p} does not exist")
    if generator is None:
        _, meta = load_state_dict(p)
        if "generator_config" not in meta:
            raise ELFError(
                f"{p} does not record a SmallGenerator configuration; construct the generator module yourself and pass "
                "it (load_generator(path, generator=MyGenerator(...)))"
            )
        generator = SmallGenerator(**json.loads(meta["generator_config"]))
    load_checkpoint(generator, p)
    generator.eval()
    if not with_encoder:
        return generator
    enc_file = encoder_path(p)
    encoder = None
    if enc_file.exists():
        _, emeta = load_state_dict(enc_file)
        encoder = LatentEncoder(**json.loads(emeta["encoder_config"]))
        load_checkpoint(encoder, enc_file)
        encoder.eval()
    return generator, encoder
