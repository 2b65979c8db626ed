"""Networks that distillation objectives match through: random initializations, early-stage models, perturbations.

* :class:`RandomInitPool`: a freshly initialized network per draw (DC, DSA, DM).
* :class:`EarlyStagePool`: networks trained on real data for a few epochs (Acc-DD, Zhang et al. CVPR 2023), trained
  once and cached as safetensors checkpoints keyed by the data's content hash and the training settings.
* :class:`PerturbedPool`: Acc-DD's parameter perturbation of a drawn network,
  ``w <- w + a * d1 + b * d2`` with filter-normalized Gaussian directions and ``a, b ~ ±U(0.01, 0.09)``.

Every draw comes from the caller's ``torch.Generator``. Choosing a model (an index, or the seed of an
initialization) reads one integer back from that generator's device: one host synchronization per drawn network.
A pool returns a model the caller owns: it may be trained or perturbed in place.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import default_cache_dir
from ..errors import ELFError
from ..fileio import PathLike, tensor_sha256
from ..models import create_model

__all__ = [
    "ModelPool",
    "RandomInitPool",
    "EarlyStagePool",
    "PerturbedPool",
    "perturb_",
    "filter_normalized_direction",
    "POOL_AUGMENT",
]

#: Augmentation for training the early-stage pool: random crop (4 px at 32x32) and horizontal flip, both applied to
#: every batch (DSA mode "M"): the standard CIFAR augmentation. Acc-DD adds CutMix, which elf-dd does not.
POOL_AUGMENT = "crop_flip"


def _draw_int(generator: torch.Generator, high: int) -> int:
    """One integer in ``[0, high)`` from ``generator`` (read back to the host)."""
    return int(torch.randint(high, (1,), generator=generator, device=generator.device)[0])


class ModelPool:
    """Where an objective gets its networks: :meth:`sample` returns a model the caller owns, on the pool's device."""

    device: torch.device

    def sample(self, generator: torch.Generator) -> nn.Module:
        """A network drawn with ``generator`` (in train mode; the objective sets the mode and ``requires_grad``)."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        """A network of the pool's architecture with arbitrary weights (to load saved weights into); draws nothing
        from any generator the distillation uses."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the metadata of a distilled set."""
        return type(self).__name__


class RandomInitPool(ModelPool):
    """A fresh random initialization of ``model_name`` per draw: the network's seed is drawn from the generator and
    the model is built on the CPU under that seed (torch's CPU generator is forked and seeded; no other generator is
    touched, CUDA's included), then moved to ``device``; the same seed gives the same network on every device.

    Args:
        model_name: a :func:`~elf.create_model` name ("ConvNet", "ConvNetBN", ...).
        channel, num_classes, im_size: what the network is built for. device: where it runs.
    """

    def __init__(self, model_name: str, channel: int, num_classes: int, im_size: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        self.model_name = model_name
        self.channel, self.num_classes, self.im_size = int(channel), int(num_classes), (int(im_size[0]), int(im_size[1]))
        self.device = torch.device(device)
        self.build()  # fail early on a bad name

    def _create(self, seed: int | None) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: the model is initialized on the CPU
            if seed is not None:
                torch.default_generator.manual_seed(seed)  # (torch.manual_seed would also reseed every CUDA generator)
            model = create_model(self.model_name, channel=self.channel, num_classes=self.num_classes, im_size=self.im_size)
        return model.to(self.device).train()

    def sample(self, generator: torch.Generator) -> nn.Module:
        return self._create(_draw_int(generator, 2**31 - 1))

    def build(self) -> nn.Module:
        return self._create(0)

    def describe(self) -> str:
        return f"random-init {self.model_name}"


class EarlyStagePool(ModelPool):
    """A fixed list of networks (all of one architecture); a draw is a copy of one, chosen uniformly.

    Build one trained on real data with :meth:`train` (Acc-DD's pool of early-stage models).
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device | str | None = None, description: str = "") -> None:
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ELFError("EarlyStagePool needs a non-empty list of nn.Module networks")
        if device is None:
            first = next(iter(models[0].parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.models = [m.to(self.device).train() for m in models]
        self.description = description or f"early-stage pool of {len(models)} {type(models[0]).__name__}"

    def __len__(self) -> int:
        return len(self.models)

    def sample(self, generator: torch.Generator) -> nn.Module:
        return copy.deepcopy(self.models[_draw_int(generator, len(self.models))]).train()

    def build(self) -> nn.Module:
        return copy.deepcopy(self.models[0])

    def describe(self) -> str:
        return self.description

    @classmethod
    def train(
        cls,
        model_name: str,
        images: Tensor,
        labels: Tensor,
        num_models: int = 10,
        *,
        epochs: int = 2,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
        augment: str | None = POOL_AUGMENT,
        dsa_mode: str = "M",
        seed: int = 0,
        num_classes: int | None = None,
        source_hash: str | None = None,
        cache_dir: PathLike | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        log: object = None,
    ) -> EarlyStagePool:
        """Train ``num_models`` networks on real data for ``epochs`` epochs each (seeds ``seed + i``), or load them.

        The training is :class:`~elf.ELFTrainer` with a plain protocol (no ELF terms, constant lr, no extra epoch):
        Acc-DD's settings by default (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, 2 epochs) with crop +
        flip augmentation instead of Acc-DD's augmentation + CutMix. Checkpoints go to
        ``cache_dir/pools/<key>/model_<i>.safetensors`` (default cache: :func:`~elf.data.default_cache_dir`), where
        the key hashes the data (``source_hash``, default: a hash of the tensors), the pixel space the images are
        in (a hash of the first images as given: another normalization or ZCA gets another pool) and every
        setting; a later call with the same data and settings loads them instead of training.

        Args:
            images: real images ``(N, C, H, W)``, normalized like the synthetic set. labels: ``(N,)`` class indices.
            log: optional ``callable(str)`` for progress lines.
        """
        from ..protocol import Protocol
        from ..trainer import ELFTrainer

        if num_models < 1 or epochs < 1:
            raise ELFError(f"an early-stage pool needs num_models >= 1 and epochs >= 1, got {num_models} and {epochs}")
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ELFError("EarlyStagePool.train needs normalized float real images (N, C, H, W); convert an ImageSet with as_float(normalization)")
        labels = torch.as_tensor(labels)
        k = int(num_classes) if num_classes is not None else int(labels.max()) + 1
        c, h, w = (int(s) for s in images.shape[1:])
        dev = torch.device(device) if device is not None else images.device
        data_hash = source_hash or tensor_sha256(images.detach().cpu(), labels.cpu())
        # source_hash names the raw data; the first images as given name the pixel space (normalization, ZCA) too
        space_hash = tensor_sha256(images[:8].detach().cpu())
        # version 3: the optimizer (and its momentum) is kept through the whole run (version 2 re-created it at epoch
        # epochs // 2 + 1, the evaluation protocol's lr-decay point, although the pool's lr is constant)
        settings = {"version": 3, "data": data_hash, "pixels": space_hash, "model": model_name, "shape": [c, h, w], "classes": k,
                    "epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "batch_size": batch_size, "augment": augment, "dsa_mode": dsa_mode}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        folder = folder / "pools" / key
        protocol = Protocol(name="early-stage-pool", epochs=epochs, extra_epoch=False, lr=lr, momentum=momentum,
                            weight_decay=weight_decay, batch_size=batch_size, lr_decay=1.0,
                            reset_optimizer_at_decay=False, augment=augment, dsa_mode=dsa_mode, lambda_front=0.0, lambda_rear=0.0,
                            notes="Acc-DD early-stage pool: a few epochs on real data (no CutMix)")
        say = log if callable(log) else (lambda s: None)
        models: list[nn.Module] = []
        for i in range(num_models):
            path = folder / f"model_{seed + i}.safetensors"
            model = create_model(model_name, channel=c, num_classes=k, im_size=(h, w))
            if path.exists():
                load_checkpoint(model, path)
                say(f"pool model {i + 1}/{num_models}: loaded {path}")
            else:
                trainer = ELFTrainer(model_name, images, labels, protocol=protocol, num_classes=k, device=dev,
                                     progress=progress, log_every=max(1, epochs))
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    trainer.fit(seed + i)
                assert trainer.model is not None
                model.load_state_dict(trainer.model.state_dict())
                save_checkpoint(model, path, {"pool_settings": json.dumps(settings, sort_keys=True), "seed": str(seed + i)})
                say(f"pool model {i + 1}/{num_models}: trained {epochs} epoch(s), saved {path}")
            models.append(model.to(dev))
        return cls(models, dev, f"early-stage pool: {num_models} x {model_name}, {epochs} epoch(s) on real data (lr {lr}, "
                                f"momentum {momentum}, wd {weight_decay}, batch {batch_size}, augment {augment}), key {key}")


def filter_normalized_direction(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Gaussian direction shaped like ``weight`` (dim >= 2) with every output filter (``d[i]``, a slice along dim
    0) rescaled to the norm of the same filter of ``weight``: ``||d[i]|| = ||weight[i]||``."""
    if weight.dim() < 2:
        raise ELFError("filter-normalized directions are for weights with an output dimension (dim >= 2)")
    d = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
    w_norm = weight.detach().flatten(1).norm(dim=1)
    d_norm = d.flatten(1).norm(dim=1)
    scale = w_norm / d_norm.clamp_min(1e-12)
    return d * scale.view(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def perturb_(model: nn.Module, generator: torch.Generator | None, a_range: tuple[float, float] = (0.01, 0.09)) -> tuple[Tensor, Tensor]:
    """Acc-DD's perturbation, in place: every parameter with dim >= 2 becomes ``w + a * d1 + b * d2`` with ``d1, d2``
    from :func:`filter_normalized_direction`; 1-D parameters (biases, norm weights) and buffers are untouched.

    ``a`` and ``b`` are drawn once per call, ``|a|, |b| ~ U(a_range)`` with independent random signs. Draw order:
    magnitudes (2), signs (2), then ``d1, d2`` per parameter in ``model.parameters()`` order. Returns ``(a, b)``
    (0-dim tensors on the generator's device).
    """
    lo, hi = float(a_range[0]), float(a_range[1])
    if not 0 <= lo <= hi:
        raise ELFError(f"a_range must be (low, high) with 0 <= low <= high, got {a_range}")
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ELFError("perturb_ needs a model with parameters")
    dev = generator.device if generator is not None else first.device
    mags = lo + (hi - lo) * torch.rand(2, generator=generator, device=dev)
    signs = torch.randint(0, 2, (2,), generator=generator, device=dev) * 2 - 1
    coef = mags * signs
    for p in model.parameters():
        if p.dim() < 2:
            continue
        d1 = filter_normalized_direction(p, generator)
        d2 = filter_normalized_direction(p, generator)
        c = coef.to(p.device, p.dtype)
        p.add_(c[0] * d1 + c[1] * d2)
    return coef[0], coef[1]


class PerturbedPool(ModelPool):
    """Acc-DD's pool: a draw from ``base`` (a model the caller owns), perturbed in place by :func:`perturb_`."""

    def __init__(self, base: ModelPool, a_range: tuple[float, float] = (0.01, 0.09)) -> None:
        if not isinstance(base, ModelPool):
            raise ELFError(f"PerturbedPool wraps a ModelPool, got {type(base).__name__}")
        self.base = base
        self.a_range = (float(a_range[0]), float(a_range[1]))
        self.device = base.device

    def sample(self, generator: torch.Generator) -> nn.Module:
        model = self.base.sample(generator)
        perturb_(model, generator, self.a_range)
        return model

    def build(self) -> nn.Module:
        return self.base.build()

    def describe(self) -> str:
        return f"{self.base.describe()}; perturbed (a, b ~ ±U{self.a_range})"
