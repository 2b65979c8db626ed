"""A distillation recipe: every setting of ``elf distill`` as one value, and the function that builds it.

``build_distillation(recipe, sampler, ...)`` turns a :class:`DistillRecipe` into the parameterization, the objective
and the number of image updates that :func:`~elf.distill.distill` runs: the same construction for the command line
and for Python users. Unset fields (None) take the method's published defaults (:data:`METHOD_DEFAULTS`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ELFError
from ..pixel_space import Normalization, space_metadata
from .base import Objective, Parameterization
from .objectives import METHOD_DEFAULTS, DistributionMatching, GradientMatching, dc_loops
from .pixels import PixelParam
from .pool import EarlyStagePool, ModelPool, PerturbedPool, RandomInitPool
from .real import RealSampler

__all__ = ["DistillRecipe", "Distillation", "build_distillation", "build_pool", "METHODS", "PARAMS"]

METHODS = ("dm", "dc", "dsa", "mtt")
PARAMS = ("pixels", "glad")


@dataclass
class DistillRecipe:
    """What to distill and how (the options of ``elf distill``; see docs/distill.md).

    Core: ``method`` ("dm" | "dc" | "dsa" | "mtt"), ``ipc`` (stored images per class), ``model`` (the network the
    objective matches through), ``param`` ("pixels" | "glad"), ``iterations`` (image updates; None: the method's
    default), ``seed``. Pixels: ``init`` ("real" | "noise"), ``factor`` (IDC multi-formation), ``lr_img``,
    ``momentum_img``. Real batches: ``batch_real`` per class, ``dsa_strategy`` ("none" turns DSA off).
    Gradient matching: ``match`` ("all" | "conv"), ``distance`` ("dc" | "mse" | "cos"), ``outer_loop``,
    ``inner_loop``, ``lr_net``. MTT: ``experts`` and the MTT settings. GLaD: ``generator`` ("random" | "trained" |
    a checkpoint path), ``generator_epochs``, ``glad_init``, ``glad_split``, ``chunk_size``. Pool: ``pool``
    ("random" | "early"), ``pool_size``, ``pool_epochs``, ``perturb`` (Acc-DD).

    :meth:`check` refuses options that a run would ignore: the pixel options (``init``, ``factor`` > 1, ``lr_img``,
    ``momentum_img``) with ``param="glad"``, and an early-stage or perturbed pool with ``method="mtt"``.
    """

    method: str
    ipc: int
    model: str = "ConvNet"
    param: str = "pixels"
    iterations: int | None = None
    seed: int = 0
    init: str | None = None
    factor: int = 1
    lr_img: float | None = None
    momentum_img: float | None = None
    batch_real: int | None = None
    dsa_strategy: str | None = None
    match: str = "all"
    distance: str = "dc"
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_net: float = 0.01
    experts: str | None = None
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    syn_lr: float = 0.01
    lr_lr: float = 1e-5
    generator: str = "random"
    generator_epochs: int = 10
    glad_init: str = "noise"
    glad_split: str | None = None
    chunk_size: int = 10
    pool: str = "random"
    pool_size: int = 5
    pool_epochs: int = 2
    perturb: bool = False

    def check(self) -> None:
        """Raise :class:`ELFError` for settings no run can use."""
        if self.method not in METHODS:
            raise ELFError(f"unknown distillation method {self.method!r}; choose one of {METHODS}")
        if self.param not in PARAMS:
            raise ELFError(f"unknown parameterization {self.param!r}; choose one of {PARAMS}")
        if self.ipc < 1:
            raise ELFError(f"ipc must be >= 1, got {self.ipc}")
        if self.iterations is not None and self.iterations < 0:
            raise ELFError(f"iterations must be >= 0, got {self.iterations}")
        if self.pool not in ("random", "early"):
            raise ELFError(f"pool must be 'random' or 'early', got {self.pool!r}")
        if self.method == "mtt" and not self.experts:
            raise ELFError("method 'mtt' needs experts (--experts): an `elf train-teacher` output folder or MTT "
                           "replay_buffer_*.pt files")
        if self.method == "mtt" and (self.pool != "random" or self.perturb):
            raise ELFError("method 'mtt' draws no network from a pool (it matches the experts' trajectories), so "
                           "--pool early / --perturb would do nothing; drop them, or use --method dm, dc or dsa for an "
                           "Acc-DD pool")
        if self.param == "glad":
            given = [flag for flag, set_ in (("--init", self.init is not None), ("--factor", self.factor != 1),
                                             ("--lr-img", self.lr_img is not None),
                                             ("--momentum-img", self.momentum_img is not None)) if set_]
            if given:
                raise ELFError("--param glad learns generator latents, not pixels, so the pixel option(s) "
                               f"{', '.join(given)} would be ignored; drop them. The latents start from --glad-init "
                               "(noise | real) and take GLaD's own lrs and momentum (docs/glad.md; from Python: "
                               "build_glad_param(lr_features=, lr_style=, momentum=))")


@dataclass
class Distillation:
    """A built recipe: run it with ``distill(d.param, d.objective, d.iterations, ...)``."""

    param: Parameterization
    objective: Objective
    iterations: int
    pool: ModelPool | None  # None for MTT, which draws no network
    metadata: dict[str, str] = field(default_factory=dict)


def build_pool(recipe: DistillRecipe, sampler: RealSampler, *, device: torch.device, cache_dir: Path | None = None,
               source_hash: str = "", progress: bool = True, log: Callable[[str], None] = print) -> ModelPool:
    """The networks the objective draws: fresh random ones, or an Acc-DD pool trained briefly on real data (cached
    under ``cache_dir``), optionally perturbed."""
    c, h, w = sampler.image_shape
    pool: ModelPool
    if recipe.pool == "random":
        pool = RandomInitPool(recipe.model, c, sampler.num_classes, (h, w), device)
    else:
        if cache_dir is None:
            from ..data import default_cache_dir

            cache_dir = default_cache_dir()
        pool = EarlyStagePool.train(recipe.model, sampler.images, sampler.labels, recipe.pool_size,
                                    epochs=recipe.pool_epochs, seed=recipe.seed, num_classes=sampler.num_classes,
                                    source_hash=source_hash, cache_dir=cache_dir, device=device, progress=progress, log=log)
    return PerturbedPool(pool) if recipe.perturb else pool


def build_distillation(
    recipe: DistillRecipe,
    sampler: RealSampler,
    normalization: Normalization,
    *,
    device: torch.device,
    cache_dir: Path | None = None,
    source_hash: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Distillation:
    """Build the pool, the objective and the parameterization of ``recipe`` for the real data in ``sampler``.

    Args:
        recipe: the settings. sampler: real images ``(M, C, H, W)`` by class, on ``device``.
        normalization: the pixel space of the real images and of the set. cache_dir: where an early-stage pool
            is cached. source_hash: the real data's content hash (keys that cache).
    """
    recipe.check()
    preset: dict[str, Any] = METHOD_DEFAULTS.get(recipe.method, {})
    c, h, w = sampler.image_shape
    k = sampler.num_classes
    t_pool = time.perf_counter()
    pool: ModelPool | None = None
    if recipe.method != "mtt":  # MTT matches expert trajectories: no network pool
        pool = build_pool(recipe, sampler, device=device, cache_dir=cache_dir, source_hash=source_hash, progress=progress, log=log)
    pool_seconds = time.perf_counter() - t_pool

    dsa = recipe.dsa_strategy if recipe.dsa_strategy is not None else preset.get("dsa")
    batch_real = recipe.batch_real or preset.get("batch_real", 256)
    iterations = recipe.iterations
    objective: Objective
    if recipe.method == "dm":
        assert pool is not None
        objective = DistributionMatching(sampler, pool, batch_real=batch_real, dsa=dsa)
        iterations = iterations if iterations is not None else preset["iterations"]
    elif recipe.method in ("dc", "dsa"):
        assert pool is not None
        outer, inner = dc_loops(recipe.ipc)
        outer = recipe.outer_loop if recipe.outer_loop is not None else outer
        inner = recipe.inner_loop if recipe.inner_loop is not None else inner
        objective = GradientMatching(sampler, pool, batch_real=batch_real, dsa=dsa, params=recipe.match,
                                     distance=recipe.distance, outer_loop=outer, inner_loop=inner, lr_net=recipe.lr_net,
                                     batch_train=preset["batch_train"], name=recipe.method)
        iterations = iterations if iterations is not None else preset["iterations"] * outer
    else:  # mtt
        from .mtt import build_mtt_objective

        objective = build_mtt_objective(recipe.model, recipe.experts, channel=c, num_classes=k, im_size=(h, w),  # type: ignore[arg-type]
                                        space=space_metadata(normalization, False),  # (elf distill does not whiten)
                                        syn_steps=recipe.syn_steps, expert_epochs=recipe.expert_epochs,
                                        max_start_epoch=recipe.max_start_epoch, syn_lr=recipe.syn_lr,
                                        lr_lr=recipe.lr_lr, dsa=dsa, device=device)
        iterations = iterations if iterations is not None else preset["iterations"]

    init_gen = torch.Generator(device=device)
    init_gen.manual_seed(recipe.seed + 1)  # the loop's generator uses the seed itself
    param: Parameterization
    if recipe.param == "pixels":
        param = PixelParam(k, recipe.ipc, (c, h, w), normalization, init=recipe.init or preset.get("init", "real"),
                           sampler=sampler, generator=init_gen, factor=recipe.factor,
                           lr=recipe.lr_img or preset.get("lr_img", 0.1),
                           momentum=recipe.momentum_img if recipe.momentum_img is not None else preset.get("momentum_img", 0.5),
                           device=device)
    else:  # glad
        from .glad import build_glad_param

        kind = recipe.generator if recipe.generator in ("random", "trained") else "checkpoint"
        param = build_glad_param(kind, k, recipe.ipc, normalization, image_size=h, channels=c,
                                 method="dsa" if recipe.method == "dc" else recipe.method, split_at=recipe.glad_split,
                                 checkpoint=recipe.generator if kind == "checkpoint" else None,
                                 real_images=sampler.images, real_labels=sampler.labels,
                                 train_epochs=recipe.generator_epochs, init=recipe.glad_init,
                                 chunk_size=recipe.chunk_size, seed=recipe.seed, device=device, log=log)
    meta = {"model": recipe.model, "ipc_requested": str(recipe.ipc), "preset_source": preset.get("source", ""),
            "pool_build_time_s": f"{pool_seconds:.1f}"}
    if recipe.param == "glad":
        meta.update(glad_init=recipe.glad_init, generator_source=str(recipe.generator))
    return Distillation(param, objective, int(iterations), pool, meta)
