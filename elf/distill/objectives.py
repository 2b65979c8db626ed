"""Distillation objectives that compare synthetic images with real ones through networks from a pool.

* :class:`DistributionMatching` (DM; Zhao & Bilen, WACV 2023): per iteration one network, and per class the squared
  distance between the mean embeddings of a real batch and of the synthetic images, both under the same (Siamese)
  DSA augmentation.
* :class:`GradientMatching` (DC, Zhao et al. ICLR 2021; DSA, Zhao & Bilen ICML 2021; the conv-only MSE variant of
  IDC/Acc-DD): per class the distance between the network's loss gradients on a real batch and on the synthetic
  images, optionally with DC's outer/inner loop (the network is trained on the synthetic set between image updates).

Every random choice (network, real batches, augmentation parameters) is drawn from the ``generator`` the loop
passes in. What a network draws from torch's global RNG itself (dropout masks in train mode, e.g. VGG11's head from 64
pixels up) comes from a fork of it seeded from that generator's state (:func:`~elf.distill.base.seeded_global_rng`).
DSA's op choice (mode "S") needs a host-side generator: on the CPU it is that same generator; on an accelerator the
objective keeps its own CPU generator, seeded once from the loop's generator and saved in :meth:`state_dict`, so no
call waits for the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import DSA, OFFICIAL_STRATEGY
from ..batchnorm import batchnorm_layers, batchnorm_momentum, has_batchnorm
from ..errors import ELFError
from ..models import ResNet
from .base import Objective, seeded_global_rng
from .pool import ModelPool
from .real import RealSampler

__all__ = [
    "DistributionMatching",
    "GradientMatching",
    "embed",
    "dc_distance",
    "mse_distance",
    "cos_distance",
    "GRADIENT_DISTANCES",
    "DC_LOOPS",
    "dc_loops",
    "METHOD_DEFAULTS",
]

#: DC/DSA's (outer_loop, inner_loop) per images-per-class (public DC/DSA code, ``get_loops``).
DC_LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    """DC's ``(outer_loop, inner_loop)`` for ``ipc``; ipc values DC does not list take the nearest listed one."""
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    nearest = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[nearest]


def _as_dsa(dsa: DSA | str | bool | None) -> DSA | None:
    if dsa is None or dsa is False:
        return None
    if dsa is True:
        return DSA(OFFICIAL_STRATEGY)
    if isinstance(dsa, str):
        d = DSA(dsa)
        return d if d.enabled else None
    if isinstance(dsa, DSA):
        return dsa if dsa.enabled else None
    raise ELFError(f"dsa must be a DSA, a strategy string, True/False or None; got {type(dsa).__name__}")


def embed(net: nn.Module, x: Tensor) -> Tensor:
    """The network's embedding ``(N, D)``: the features before its classification head (DM's ``net.embed``).

    A model's own ``embed`` method wins; built-ins use ``forward_features`` (flattened; ResNet: global average pooled),
    timm models ``forward_head(..., pre_logits=True)``. With a one-layer head (ConvNet, ResNet, AlexNet, MLP, VGG11
    below 64 pixels) that is the input of the final linear layer; LeNet (120-84 hidden layers) and VGG11 from 64 pixels
    up (4096-4096 head) give their flattened conv features, before the hidden linear layers.
    """
    own = getattr(net, "embed", None)
    if callable(own):
        return own(x)
    forward_features = getattr(net, "forward_features", None)
    if not callable(forward_features):
        raise ELFError(
            f"{type(net).__name__} has no forward_features/embed: DM needs the embedding before the classifier. Give the "
            "model an embed(x) -> (N, D) method, or use a built-in / timm model"
        )
    f = forward_features(x)
    if isinstance(net, ResNet):
        return F.adaptive_avg_pool2d(f, 1).flatten(1)
    head = getattr(net, "forward_head", None)
    if callable(head) and "pre_logits" in inspect.signature(head).parameters:
        return head(f, pre_logits=True).flatten(1)
    return f.flatten(1)


# ---------------------------------------------------------------------------------------------- gradient distances
def dc_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor]) -> Tensor:
    """DC's layer-wise distance ("ours"): for each gradient with dim >= 2, reshaped to ``(out, -1)``, the sum over
    output rows of ``1 - cos(g_real_row, g_syn_row)`` (denominator + 1e-6); 1-D gradients (biases, norm layers)
    contribute 0. Summed over layers."""
    total: Tensor | None = None
    for s, r in zip(g_syn, g_real):
        if r.dim() < 2:
            continue
        s2, r2 = s.reshape(s.shape[0], -1), r.reshape(r.shape[0], -1)
        d = (1 - (s2 * r2).sum(-1) / (s2.norm(dim=-1) * r2.norm(dim=-1) + 1e-6)).sum()
        total = d if total is None else total + d
    if total is None:
        raise ELFError("no matched gradient has an output dimension (dim >= 2): DC's distance skips 1-D tensors; match more parameters")
    return total


def mse_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor]) -> Tensor:
    """Sum of squared differences over every matched gradient (IDC / Acc-DD's "mse")."""
    return sum(((s - r) ** 2).sum() for s, r in zip(g_syn, g_real))  # type: ignore[return-value]


def cos_distance(g_syn: Sequence[Tensor], g_real: Sequence[Tensor]) -> Tensor:
    """``1 - cos`` of all matched gradients flattened into one vector each (DC's "cos")."""
    s = torch.cat([g.reshape(-1) for g in g_syn])
    r = torch.cat([g.reshape(-1) for g in g_real])
    return 1 - (s * r).sum() / (s.norm() * r.norm() + 1e-6)


GRADIENT_DISTANCES: dict[str, Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]] = {
    "dc": dc_distance, "mse": mse_distance, "cos": cos_distance,
}


# ---------------------------------------------------------------------------------------------- shared machinery
class _PoolObjective(Objective):
    """What DM and gradient matching share: real batches per class, a model pool, Siamese DSA, the host generator."""

    def __init__(self, sampler: RealSampler, pool: ModelPool, batch_real: int, dsa: DSA | str | bool | None) -> None:
        if not isinstance(sampler, RealSampler):
            raise ELFError(f"sampler must be a RealSampler, got {type(sampler).__name__}")
        if not isinstance(pool, ModelPool):
            raise ELFError(f"pool must be a ModelPool (RandomInitPool, EarlyStagePool, PerturbedPool), got {type(pool).__name__}")
        if batch_real < 1:
            raise ELFError(f"batch_real must be >= 1, got {batch_real}")
        self.sampler = sampler
        self.pool = pool
        self.batch_real = int(batch_real)
        self.dsa = _as_dsa(dsa)
        self._host_gen: torch.Generator | None = None

    def _op_generator(self, generator: torch.Generator) -> torch.Generator:
        if generator.device.type == "cpu":
            return generator
        if self._host_gen is None:
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device)[0])
            self._host_gen = torch.Generator().manual_seed(seed)
        return self._host_gen

    def _ipc(self, images: Tensor) -> int:
        k = self.sampler.num_classes
        if images.dim() != 4 or images.shape[0] % k or images.shape[0] == 0:
            raise ELFError(f"the synthetic images {tuple(images.shape)} must be (K * ipc, C, H, W), class-major, with K = {k} classes")
        if tuple(images.shape[1:]) != self.sampler.image_shape:
            raise ELFError(f"synthetic images are {tuple(images.shape[1:])} per image but the real images are {self.sampler.image_shape}")
        if images.device.type != self.sampler.device.type:
            raise ELFError(f"synthetic images are on {images.device} but the real images on {self.sampler.device}; put both on one device")
        return images.shape[0] // k

    def _siamese(self, real: Tensor, syn: Tensor, generator: torch.Generator, opg: torch.Generator) -> tuple[Tensor, Tensor]:
        """The same DSA draw (one parameter set for the whole batch) applied to the real and the synthetic batch."""
        if self.dsa is None:
            return real, syn
        s = self.dsa.sample(syn.shape, syn.device, generator, batch_shared=True, op_generator=opg)
        return self.dsa.apply(real, s), self.dsa.apply(syn, s)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self._host_gen is None else {"host_rng": self._host_gen.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "host_rng" in state:
            self._host_gen = torch.Generator()
            self._host_gen.set_state(state["host_rng"].cpu())

    def metadata(self) -> dict[str, str]:
        return {"method": self.name, "pool": self.pool.describe(), "batch_real": str(self.batch_real),
                "dsa": self.dsa.strategy if self.dsa is not None else "none",
                "dsa_mode": self.dsa.mode if self.dsa is not None else "none",
                "source_hash": self.sampler.source_hash}


class DistributionMatching(_PoolObjective):
    """DM: ``sum_c || mean(embed(aug(real_c))) - mean(embed(aug(syn_c))) ||^2`` with a fresh network per iteration.

    Args:
        sampler: real images per class. pool: where the network comes from (DM: :class:`RandomInitPool` of ConvNet).
        batch_real: real images per class per iteration (DM: 256).
        dsa: DSA strategy (DM: the official ``color_crop_cutout_flip_scale_rotate``), a :class:`~elf.DSA`, or None.

    The network runs in train mode with ``requires_grad_(False)``. For networks with BatchNorm the real batches of all
    classes go through it together, and so do the synthetic ones (as the DM code does for ConvNetBN); otherwise class
    by class. The real embeddings are computed without a graph.
    """

    name = "dm"

    def __init__(self, sampler: RealSampler, pool: ModelPool, *, batch_real: int = 256,
                 dsa: DSA | str | bool | None = OFFICIAL_STRATEGY) -> None:
        super().__init__(sampler, pool, batch_real, dsa)

    def loss(self, images: Tensor, labels: Tensor, step: int, generator: torch.Generator) -> Tensor:
        with seeded_global_rng(generator, images.device):  # dropout masks: reproducible from the loop's generator
            return self._loss(images, generator)

    def _loss(self, images: Tensor, generator: torch.Generator) -> Tensor:
        ipc = self._ipc(images)
        net = self.pool.sample(generator)
        net.train()
        net.requires_grad_(False)
        opg = self._op_generator(generator)
        pairs = []
        for c in range(self.sampler.num_classes):
            real = self.sampler.batch(c, self.batch_real, generator)
            pairs.append(self._siamese(real, images[c * ipc : (c + 1) * ipc], generator, opg))
        if has_batchnorm(net):
            sizes = [r.shape[0] for r, _ in pairs]
            with torch.no_grad():
                real_emb = embed(net, torch.cat([r for r, _ in pairs])).split(sizes)
            syn_emb = embed(net, torch.cat([s for _, s in pairs])).split(ipc)
            means = [(r.mean(0), s.mean(0)) for r, s in zip(real_emb, syn_emb)]
        else:
            means = []
            for real, syn in pairs:
                with torch.no_grad():
                    mr = embed(net, real).mean(0)
                means.append((mr, embed(net, syn).mean(0)))
        return torch.stack([((mr - ms) ** 2).sum() for mr, ms in means]).sum()


class GradientMatching(_PoolObjective):
    """Gradient matching: ``sum_c D(grad_theta CE(net(aug(real_c)), c), grad_theta CE(net(aug(syn_c)), c))``.

    Args:
        sampler, pool: real data and the network pool (DC/DSA: :class:`RandomInitPool` of ConvNet; Acc-DD:
            :class:`PerturbedPool` over an :class:`EarlyStagePool`).
        batch_real: real images per class (DC/DSA: 256).
        dsa: Siamese augmentation (DSA: the official strategy; DC: None).
        params: "all" (every parameter; DC/DSA) or "conv" (conv weights only; Acc-DD).
        distance: "dc" (layer-wise 1 - cos per output row, 1-D tensors skipped; DC/DSA), "mse" (Acc-DD/IDC) or
            "cos" (one cosine over all gradients), or a callable ``(g_syn, g_real) -> scalar``.
        outer_loop: image updates per network; ``1`` (default) draws a fresh network for every step. With
            ``outer_loop = O > 1`` steps ``t`` with ``t % O == 0`` draw a network and the others reuse it, after
            training it for ``inner_loop`` epochs on the current synthetic set (DC/DSA: ``dc_loops(ipc)``).
        inner_loop: epochs of network training on the synthetic set between image updates (DSA augmentation per
            sample when ``dsa`` is on), SGD lr ``lr_net`` (DC: 0.01, no momentum), batches of ``batch_train``.
        bn_real_per_class: for networks with BatchNorm, real images per class whose batch statistics become the
            running statistics before each match (BatchNorm then in eval mode; DC uses 16).

    One step of :func:`~elf.distill.distill` is one image update, so DC's ``Iteration`` = steps / ``outer_loop``.
    """

    def __init__(
        self,
        sampler: RealSampler,
        pool: ModelPool,
        *,
        batch_real: int = 256,
        dsa: DSA | str | bool | None = OFFICIAL_STRATEGY,
        params: str = "all",
        distance: str | Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor] = "dc",
        outer_loop: int = 1,
        inner_loop: int = 0,
        lr_net: float = 0.01,
        batch_train: int = 256,
        bn_real_per_class: int = 16,
        name: str | None = None,
    ) -> None:
        super().__init__(sampler, pool, batch_real, dsa)
        if params not in ("all", "conv"):
            raise ELFError(f"params must be 'all' (every parameter, DC/DSA) or 'conv' (conv weights, Acc-DD), got {params!r}")
        if isinstance(distance, str):
            if distance not in GRADIENT_DISTANCES:
                raise ELFError(f"unknown gradient distance {distance!r}; choose one of {sorted(GRADIENT_DISTANCES)} or pass a callable")
            self.distance_name, self.distance = distance, GRADIENT_DISTANCES[distance]
        elif callable(distance):
            self.distance_name, self.distance = getattr(distance, "__name__", "custom"), distance
        else:
            raise ELFError(f"distance must be a name or a callable, got {type(distance).__name__}")
        if outer_loop < 1 or inner_loop < 0 or batch_train < 1 or lr_net <= 0 or bn_real_per_class < 1:
            raise ELFError("need outer_loop >= 1, inner_loop >= 0, batch_train >= 1, lr_net > 0 and bn_real_per_class >= 1")
        self.params = params
        self.outer_loop, self.inner_loop = int(outer_loop), int(inner_loop)
        self.lr_net, self.batch_train, self.bn_real_per_class = float(lr_net), int(batch_train), int(bn_real_per_class)
        self.name = name or ("dsa" if self.dsa is not None else "dc")
        self._net: nn.Module | None = None

    # ---- the network ------------------------------------------------------------------------------------------
    def _matched(self, net: nn.Module) -> list[nn.Parameter]:
        if self.params == "all":
            chosen = list(net.parameters())
        else:
            chosen = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
            if not chosen:
                raise ELFError(f"params='conv' but {type(net).__name__} has no nn.Conv2d layers; use params='all'")
        return chosen

    def _train_net(self, net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator, opg: torch.Generator) -> None:
        """``inner_loop`` epochs of plain SGD on the (detached) synthetic set."""
        opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)
        net.train()
        n = images.shape[0]
        for _ in range(self.inner_loop):
            perm = torch.randperm(n, generator=generator, device=images.device)
            for start in range(0, n, self.batch_train):
                idx = perm[start : start + self.batch_train]
                x = images[idx]
                if self.dsa is not None:
                    x = self.dsa(x, generator, op_generator=opg)
                loss = F.cross_entropy(net(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        opt.zero_grad(set_to_none=True)

    def _freeze_bn(self, net: nn.Module, generator: torch.Generator) -> None:
        """Running statistics := the batch statistics of ``bn_real_per_class`` real images per class; BN to eval.

        (DC blends that batch into the initial statistics with momentum 0.1; we use the batch statistics exactly.)
        """
        bns = batchnorm_layers(net)
        real = torch.cat([self.sampler.batch(c, self.bn_real_per_class, generator) for c in range(self.sampler.num_classes)])
        for m in bns:
            m.reset_running_stats()
        net.train()
        with batchnorm_momentum(net, None), torch.no_grad():  # cumulative average: after one batch, exactly its statistics
            net(real)
        for m in bns:
            m.eval()

    def loss(self, images: Tensor, labels: Tensor, step: int, generator: torch.Generator) -> Tensor:
        with seeded_global_rng(generator, images.device):  # dropout masks: reproducible from the loop's generator
            return self._loss(images, labels, step, generator)

    def _loss(self, images: Tensor, labels: Tensor, step: int, generator: torch.Generator) -> Tensor:
        ipc = self._ipc(images)
        opg = self._op_generator(generator)
        if step % self.outer_loop == 0 or self._net is None:
            if step % self.outer_loop != 0:
                raise ELFError(
                    f"step {step} continues a network drawn at step {step - step % self.outer_loop}, but none is held "
                    "(resuming from a checkpoint without the objective's state?); resume with the full checkpoint"
                )
            self._net = self.pool.sample(generator)
            self._net.requires_grad_(True)
        elif self.inner_loop > 0:
            self._train_net(self._net, images.detach(), labels, generator, opg)
        net = self._net
        if has_batchnorm(net):
            self._freeze_bn(net, generator)
        else:
            net.train()
        matched = self._matched(net)
        total: Tensor | None = None
        for c in range(self.sampler.num_classes):
            real = self.sampler.batch(c, self.batch_real, generator)
            real, syn = self._siamese(real, images[c * ipc : (c + 1) * ipc], generator, opg)
            y_real = torch.full((real.shape[0],), c, dtype=torch.long, device=real.device)
            y_syn = torch.full((syn.shape[0],), c, dtype=torch.long, device=syn.device)
            g_real = torch.autograd.grad(F.cross_entropy(net(real), y_real), matched)
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn), y_syn), matched, create_graph=True)
            d = self.distance(g_syn, g_real)
            total = d if total is None else total + d
        assert total is not None
        return total

    # ---- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self.outer_loop > 1 and self._net is not None:
            state.update({f"net.{k}": v for k, v in self._net.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        if net_state:
            net = self.pool.build()
            try:
                net.load_state_dict(net_state)
            except RuntimeError as e:
                raise ELFError(f"the checkpoint's network does not fit the pool's architecture ({self.pool.describe()}): {e}") from e
            self._net = net.to(self.pool.device).requires_grad_(True)
        else:
            self._net = None

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "params": self.params, "distance": self.distance_name,
                "outer_loop": str(self.outer_loop), "inner_loop": str(self.inner_loop), "lr_net": repr(self.lr_net),
                "batch_train": str(self.batch_train)}


#: Per-method defaults of the public DC/DSA/DM code (VICO-UoE/DatasetCondensation: main.py, main_DM.py and the README
#: commands): pixel lr and momentum (SGD), initialization, real batch per class, DSA strategy, DC's ``Iteration``
#: (outer iterations; gradient matching runs ``outer_loop`` image updates in each), and the network's lr; MTT's from
#: GeorgeCazenavette/mtt-distillation ``distill.py``.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dm": {"lr_img": 1.0, "momentum_img": 0.5, "init": "real", "batch_real": 256, "dsa": OFFICIAL_STRATEGY,
           "iterations": 20000, "source": "main_DM.py: Iteration 20000, lr_img 1.0, momentum 0.5, init real, batch_real 256"},
    "dsa": {"lr_img": 0.1, "momentum_img": 0.5, "init": "real", "batch_real": 256, "dsa": OFFICIAL_STRATEGY,
            "iterations": 1000, "lr_net": 0.01, "batch_train": 256,
            "source": "main.py --method DSA (README: --init real): Iteration 1000, lr_img 0.1, momentum 0.5, lr_net 0.01, get_loops(ipc)"},
    "dc": {"lr_img": 0.1, "momentum_img": 0.5, "init": "noise", "batch_real": 256, "dsa": None,
           "iterations": 1000, "lr_net": 0.01, "batch_train": 256,
           "source": "main.py --method DC: Iteration 1000, lr_img 0.1, momentum 0.5, init noise, lr_net 0.01, get_loops(ipc)"},
    "mtt": {"lr_img": 1000.0, "momentum_img": 0.5, "init": "real", "dsa": OFFICIAL_STRATEGY, "iterations": 5000,
            "source": "MTT distill.py: Iteration 5000, lr_img 1000, momentum 0.5, pix_init real"},
}
