"""Dataset distillation: parameterizations of a synthetic set, model pools, objectives and the shared loop.

Design (see docs/distill.md): a :class:`Parameterization` owns the learnable variables and produces normalized images;
an :class:`Objective` turns them into a loss, drawing networks from a :class:`ModelPool` and real batches from a
:class:`RealSampler`; :func:`distill` runs the optimization with checkpoints and exact resume and exports a
:class:`~elf.io.SyntheticSet` that :class:`~elf.ELFTrainer` and ``elf eval`` read.
"""

from .base import Objective, Parameterization, class_major_labels
from .loop import distill, make_optimizer
from .objectives import (
    DC_LOOPS,
    GRADIENT_DISTANCES,
    METHOD_DEFAULTS,
    DistributionMatching,
    GradientMatching,
    cos_distance,
    dc_distance,
    dc_loops,
    embed,
    mse_distance,
)
from .pixels import PixelParam, decode_tiles, encode_tiles
from .pool import EarlyStagePool, ModelPool, PerturbedPool, RandomInitPool, filter_normalized_direction, perturb_
from .real import RealSampler

__all__ = [
    "DC_LOOPS",
    "GRADIENT_DISTANCES",
    "METHOD_DEFAULTS",
    "DistributionMatching",
    "EarlyStagePool",
    "GradientMatching",
    "ModelPool",
    "Objective",
    "Parameterization",
    "PerturbedPool",
    "PixelParam",
    "RandomInitPool",
    "RealSampler",
    "class_major_labels",
    "cos_distance",
    "dc_distance",
    "dc_loops",
    "decode_tiles",
    "distill",
    "embed",
    "encode_tiles",
    "filter_normalized_direction",
    "make_optimizer",
    "mse_distance",
    "perturb_",
]

from .generators import SmallGenerator, load_generator, save_generator, train_generator  # noqa: E402
from .glad import GeneratorLatentParam, build_glad_param  # noqa: E402
from .mtt import ExpertTrajectories, TrajectoryMatching, build_mtt_objective, expert_trajectory_from_dir  # noqa: E402
from .recipe import Distillation, DistillRecipe, build_distillation, build_pool  # noqa: E402

__all__ += [
    "Distillation",
    "DistillRecipe",
    "ExpertTrajectories",
    "GeneratorLatentParam",
    "SmallGenerator",
    "TrajectoryMatching",
    "build_distillation",
    "build_glad_param",
    "build_pool",
    "build_mtt_objective",
    "expert_trajectory_from_dir",
    "load_generator",
    "save_generator",
    "train_generator",
]
