"""MTT: matching training trajectories (Cazenavette et al., CVPR 2022).

A student network starts at the parameters ``θ*_t`` of an expert (trained on real data) at epoch ``t``, takes ``N``
SGD steps on the synthetic images with a learnable step size ``α`` (differentiably: ``create_graph=True``), and the
loss is how far it lands from the expert ``M`` epochs later, relative to how far the expert moved::

    θ_0 = θ*_t,   θ_{k+1} = θ_k - α ∇_θ CE(f(DSA(x_k); θ_k), y_k),   L = ||θ_N - θ*_{t+M}||² / ||θ*_t - θ*_{t+M}||²

The gradient of ``L`` reaches the synthetic images and ``α``. Defaults: N = 20 (``syn_steps``, the MTT code's
default), M = 2 (``expert_epochs``) and t uniform in ``[0, max_start_epoch)`` with max_start_epoch 20 (the paper's
CIFAR-10 setting at 10 images per class; the code's defaults are 3 and 25), α initialized to 0.01 (``lr_teacher``)
and trained by SGD with lr 1e-5 (``lr_lr``) and momentum 0.5; mini-batches of ``batch_syn`` images (default: all)
drawn without replacement; DSA (official strategy) with a fresh draw on every inner step.

Expert trajectories come from ``elf train-teacher`` directories (``epoch_001.safetensors`` ... after each epoch: the
initial weights are not saved, so those trajectories start at epoch 1) or from MTT's ``replay_buffer_<n>.pt`` files
(list of trajectories; each a list of ``epochs + 1`` snapshots starting at the initialization; each snapshot a list of
tensors in ``model.parameters()`` order). Parameters are kept as flat float32 vectors on the CPU.

The student must not have BatchNorm: the unrolled steps run the model functionally on parameters only, and MTT's
experts carry no running statistics (MTT uses the instance-norm ConvNet); BatchNorm students are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..augment import DSA, OFFICIAL_STRATEGY
from ..batchnorm import has_batchnorm
from ..checkpoint import load_state_dict
from ..errors import ELFError
from ..fileio import PathLike, portable_path, safe_torch_load
from ..models import create_model
from ..pixel_space import check_same_space
from .base import Objective, seeded_global_rng

__all__ = [
    "ExpertSegment",
    "ExpertTrajectories",
    "TrajectoryMatching",
    "build_mtt_objective",
    "expert_trajectory_from_dir",
]

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.safetensors")
_BUFFER_FILE = re.compile(r"replay_buffer_(\d+)\.pt")


def _flatten(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in params])


def _epoch_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in directory.iterdir():
        m = _EPOCH_FILE.fullmatch(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def expert_trajectory_from_dir(directory: PathLike, model: nn.Module,
                               space: dict[str, str] | None = None) -> list[list[Tensor]]:
    """The per-epoch parameters of one ``elf train-teacher`` run: ``[[tensors of epoch 1], [epoch 2], ...]``.

    Each snapshot lists ``model.named_parameters()`` in order (so MTT's ``model.parameters()`` order), read by name
    from ``epoch_XXX.safetensors``; BatchNorm buffers are not part of it. ``train_teacher`` saves after each epoch,
    never the initialization, so the trajectory starts at epoch 1 (index 0 = epoch 1).

    Args:
        directory: the ``out_dir`` of :func:`elf.teacher.train_teacher`.
        model: a module of the teacher's architecture (only its parameter names and shapes are used).
        space: the pixel space of the distillation's real images (:func:`elf.pixel_space.space_metadata`); experts
            whose checkpoints record another one (normalization, ZCA) are refused.
    """
    d = Path(directory).expanduser()
    files = _epoch_files(d) if d.is_dir() else []
    if not files:
        raise ELFError(f"{d}: no epoch_XXX.safetensors files; point at the output directory of `elf train-teacher`")
    epochs = [e for e, _ in files]
    if epochs != list(range(epochs[0], epochs[0] + len(epochs))):
        raise ELFError(f"{d}: epochs {epochs} are not consecutive; a trajectory needs every epoch's checkpoint")
    named = list(model.named_parameters())
    out: list[list[Tensor]] = []
    for k, (_, path) in enumerate(files):
        state, meta = load_state_dict(path)
        if k == 0 and meta.get("model") and not _same_structure(meta["model"], model):
            name = getattr(model, "elf_model_name", type(model).__name__)
            raise ELFError(
                f"{path} was trained as {meta['model']!r}, a different architecture from the student {name!r}; MTT needs "
                "the experts' architecture (same norm, activation, pooling, width and depth) for the student"
            )
        if k == 0 and space:
            check_same_space(meta, space, f"the expert {path}", "the real images of this distillation")
        snap = []
        for name, p in named:
            if name not in state:
                raise ELFError(f"{path} has no parameter {name!r}; it was saved from another architecture than {type(model).__name__}")
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ELFError(f"{path}: parameter {name!r} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}; build the experts' architecture")
            snap.append(t.detach().float())
        out.append(snap)
    return out


def _same_structure(expert_name: str, model: nn.Module) -> bool:
    """Whether the model named ``expert_name`` has the module types of ``model`` (norm, activation, pooling): equal
    parameter shapes do not tell ConvNetBN from ConvNet (instance norm). Unknown names are not checked."""
    try:
        expert = create_model(expert_name)
    except (ELFError, TypeError, ValueError):
        return True
    return [type(m) for m in expert.modules()] == [type(m) for m in model.modules()]


class ExpertSegment(NamedTuple):
    """One sampled piece of an expert trajectory: start ``θ*_t`` and target ``θ*_{t+M}`` as flat ``(P,)`` vectors."""

    trajectory: int
    start_index: int
    start: Tensor
    target: Tensor


@dataclass
class ExpertTrajectories:
    """Expert trajectories: ``trajectories[i][k]`` is a flat float32 CPU vector ``(P,)`` of snapshot ``k``.

    ``first_epoch[i]`` is the training epoch of snapshot 0 (0 for MTT buffers, which start at the initialization;
    1 for ``train-teacher`` directories). ``shapes`` are the per-parameter shapes when known (for checks).
    """

    trajectories: list[list[Tensor]]
    first_epoch: list[int]
    shapes: list[tuple[int, ...]] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.trajectories or any(not t for t in self.trajectories):
            raise ELFError("expert trajectories: need at least one trajectory with at least one snapshot")
        sizes = {int(s.numel()) for t in self.trajectories for s in t}
        if len(sizes) != 1:
            raise ELFError(f"expert trajectories hold snapshots of different sizes {sorted(sizes)}; they must come from one architecture")
        if len(self.first_epoch) != len(self.trajectories):
            raise ELFError("first_epoch needs one entry per trajectory")

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def num_params(self) -> int:
        """P, the length of every flat snapshot."""
        return int(self.trajectories[0][0].numel())

    @property
    def min_length(self) -> int:
        """Snapshots in the shortest trajectory."""
        return min(len(t) for t in self.trajectories)

    @classmethod
    def from_snapshots(cls, trajectories: Sequence[Sequence[Sequence[Tensor]]], first_epoch: int = 0, source: str = "") -> ExpertTrajectories:
        """From nested lists ``[trajectory][snapshot][parameter tensor]`` (MTT's in-memory layout)."""
        try:
            flat = [[_flatten(snap) for snap in traj] for traj in trajectories]
            shapes = [tuple(t.shape) for t in trajectories[0][0]]
        except (TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise ELFError(f"expert trajectories must be lists of lists of parameter-tensor lists ({e})") from e
        return cls(flat, [first_epoch] * len(flat), shapes, source)

    @classmethod
    def from_replay_buffers(cls, paths: PathLike | Sequence[PathLike]) -> ExpertTrajectories:
        """Load MTT ``replay_buffer_<n>.pt`` files (a file, a list of files, or a directory holding them)."""
        files: list[Path] = []
        for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
            p = Path(p).expanduser()
            if p.is_dir():
                found = sorted((int(m.group(1)), q) for q in p.iterdir() if (m := _BUFFER_FILE.fullmatch(q.name)))
                if not found:
                    raise ELFError(f"{p}: no replay_buffer_<n>.pt files in this directory")
                files += [q for _, q in found]
            elif p.is_file():
                files.append(p)
            else:
                raise ELFError(f"{p}: no such file or directory")
        trajs: list[list[list[Tensor]]] = []
        for f in files:
            obj = safe_torch_load(f)
            if not isinstance(obj, (list, tuple)) or not obj:
                raise ELFError(f"{f}: not an MTT expert buffer (expected a non-empty list of trajectories)")
            for i, traj in enumerate(obj):
                if not isinstance(traj, (list, tuple)) or not traj or not all(
                    isinstance(s, (list, tuple)) and s and all(isinstance(t, Tensor) for t in s) for s in traj
                ):
                    raise ELFError(f"{f}: trajectory {i} is not a list of snapshots (lists of parameter tensors)")
                trajs.append(list(traj))
        return cls.from_snapshots(trajs, 0, ", ".join(portable_path(f) for f in files))

    @classmethod
    def from_teacher_dirs(cls, directories: PathLike | Sequence[PathLike], model: nn.Module,
                          space: dict[str, str] | None = None) -> ExpertTrajectories:
        """Load ``train-teacher`` runs: each directory holds ``epoch_XXX.safetensors`` (one trajectory) or
        subdirectories that do (one trajectory each, e.g. several seeds). Trajectories start at epoch 1."""
        dirs: list[Path] = []
        for d in [directories] if isinstance(directories, (str, Path)) else list(directories):
            d = Path(d).expanduser()
            if not d.is_dir():
                raise ELFError(f"{d}: not a directory (expected the output directory of `elf train-teacher`)")
            if _epoch_files(d):
                dirs.append(d)
            else:
                subs = sorted(s for s in d.iterdir() if s.is_dir() and _epoch_files(s))
                if not subs:
                    raise ELFError(f"{d}: no epoch_XXX.safetensors here or in its subdirectories; train experts with `elf train-teacher`")
                dirs += subs
        trajs = [expert_trajectory_from_dir(d, model, space) for d in dirs]
        first = [_epoch_files(d)[0][0] for d in dirs]
        out = cls.from_snapshots(trajs, 1, ", ".join(portable_path(d) for d in dirs))
        out.first_epoch = first
        return out

    @classmethod
    def load(cls, source: PathLike | Sequence[PathLike], model: nn.Module | None = None,
             space: dict[str, str] | None = None) -> ExpertTrajectories:
        """Replay-buffer files / a directory of them, or ``train-teacher`` directories (these need ``model``; with
        ``space``, their recorded pixel space must be it; replay buffers record none)."""
        items = [source] if isinstance(source, (str, Path)) else list(source)
        paths = [Path(p).expanduser() for p in items]
        buffers = [p for p in paths if p.is_file() or (p.is_dir() and any(_BUFFER_FILE.fullmatch(q.name) for q in p.iterdir()))]
        if len(buffers) == len(paths):
            return cls.from_replay_buffers(paths)
        if buffers:
            raise ELFError("mixing replay-buffer files and train-teacher directories in one expert source is not supported")
        if model is None:
            raise ELFError("reading train-teacher directories needs the model (its parameter names); pass model=")
        return cls.from_teacher_dirs(paths, model, space)

    def sample(self, generator: torch.Generator, max_start_epoch: int, expert_epochs: int = 2) -> ExpertSegment:
        """Draw a trajectory uniformly and a start index ``t`` uniformly in ``[0, min(max_start_epoch, len - M))``.

        Returns the flat CPU vectors ``θ*_t`` and ``θ*_{t+M}`` (M = ``expert_epochs``). Random numbers come from
        ``generator`` (on any device; two scalars are read back).
        """
        if expert_epochs < 1 or max_start_epoch < 1:
            raise ELFError(f"expert_epochs and max_start_epoch must be >= 1, got {expert_epochs} and {max_start_epoch}")
        dev = generator.device
        i = int(torch.randint(len(self.trajectories), (1,), generator=generator, device=dev)[0])
        traj = self.trajectories[i]
        high = min(max_start_epoch, len(traj) - expert_epochs)
        if high < 1:
            raise ELFError(
                f"expert trajectory {i} has {len(traj)} snapshots; matching {expert_epochs} expert epochs needs at least "
                f"{expert_epochs + 1}. Train the experts longer or lower expert_epochs (--expert-epochs)"
            )
        t = int(torch.randint(high, (1,), generator=generator, device=dev)[0])
        return ExpertSegment(i, t, traj[t], traj[t + expert_epochs])


class TrajectoryMatching(Objective):
    """The MTT objective: the normalized distance between a student unrolled on the synthetic set and the expert.

    Args:
        model: the student: a model name for :func:`~elf.create_model` (e.g. "ConvNet") or an ``nn.Module``; the
            experts' architecture, without BatchNorm. Its own parameters are never used (the unrolled steps run
            ``torch.func.functional_call`` on the expert's), only its structure and buffers.
        trajectories: the experts (:class:`ExpertTrajectories`).
        channel, num_classes, im_size: how to build a named model.
        syn_steps: N, student steps per iteration (20). expert_epochs: M (2). max_start_epoch: start index bound (20).
        syn_lr: initial α (0.01), learned. lr_lr, lr_momentum: α's SGD lr (1e-5) and momentum (0.5).
        batch_syn: synthetic images per student step (None: all of them).
        dsa: a :class:`~elf.augment.DSA`, a strategy string, or None for no augmentation (official: DSA on).
        device: where α and the student live; must be the synthetic images' device.
    """

    name = "mtt"

    def __init__(
        self,
        model: str | nn.Module,
        trajectories: ExpertTrajectories,
        *,
        channel: int = 3,
        num_classes: int = 10,
        im_size: tuple[int, int] = (32, 32),
        syn_steps: int = 20,
        expert_epochs: int = 2,
        max_start_epoch: int = 20,
        syn_lr: float = 0.01,
        lr_lr: float = 1e-5,
        lr_momentum: float = 0.5,
        batch_syn: int | None = None,
        dsa: DSA | str | None = OFFICIAL_STRATEGY,
        device: torch.device | str | None = None,
    ) -> None:
        if syn_steps < 1 or expert_epochs < 1 or max_start_epoch < 1:
            raise ELFError(f"syn_steps, expert_epochs and max_start_epoch must be >= 1, got {syn_steps}, {expert_epochs}, {max_start_epoch}")
        if batch_syn is not None and batch_syn < 1:
            raise ELFError(f"batch_syn must be >= 1 (or None for all images), got {batch_syn}")
        self.model_name = model if isinstance(model, str) else str(getattr(model, "elf_model_name", type(model).__name__))
        net = create_model(model, channel=channel, num_classes=num_classes, im_size=im_size) if isinstance(model, str) else model
        if has_batchnorm(net):
            raise ELFError(
                f"MTT's student {self.model_name} has BatchNorm: the unrolled steps use the experts' parameters only, and "
                "MTT experts carry no running statistics. Use an instance-norm model (e.g. 'ConvNet', as MTT does) "
                "for distillation; evaluate on BatchNorm models afterwards"
            )
        if trajectories.min_length < expert_epochs + 1:
            raise ELFError(
                f"the shortest expert trajectory has {trajectories.min_length} snapshots; expert_epochs={expert_epochs} "
                f"needs at least {expert_epochs + 1}. Train the experts longer or lower expert_epochs (--expert-epochs)"
            )
        named = list(net.named_parameters())
        self._names = [n for n, _ in named]
        self._shapes = [tuple(p.shape) for _, p in named]
        numel = sum(p.numel() for _, p in named)
        if numel != trajectories.num_params or (trajectories.shapes is not None and trajectories.shapes != self._shapes):
            raise ELFError(
                f"the experts have {trajectories.num_params} parameters (shapes {trajectories.shapes}) but the student "
                f"{self.model_name} has {numel} ({self._shapes}); build the experts' architecture (width, depth, norm, "
                "image size, classes)"
            )
        dev = torch.device(device) if device is not None else torch.device("cpu")
        net.requires_grad_(False)
        self.model = net.to(dev).train()
        self.trajectories = trajectories
        self.syn_steps, self.expert_epochs, self.max_start_epoch = int(syn_steps), int(expert_epochs), int(max_start_epoch)
        self.batch_syn = batch_syn
        self.init_syn_lr = float(syn_lr)
        self.lr_lr, self.lr_momentum = float(lr_lr), float(lr_momentum)
        self.syn_lr = torch.tensor(float(syn_lr), device=dev, requires_grad=True)
        self.dsa: DSA | None = DSA(dsa) if isinstance(dsa, str) else dsa
        if self.dsa is not None and not self.dsa.enabled:
            self.dsa = None
        self._op_gen: torch.Generator | None = None
        self.last_segment: ExpertSegment | None = None

    # ------------------------------------------------------------------ the loss
    def _unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat ``(P,)`` -> ``{name: view}`` in the model's parameter shapes (views keep the graph)."""
        sizes = [int(torch.Size(s).numel()) for s in self._shapes]
        return {n: t.view(s) for n, t, s in zip(self._names, theta.split(sizes), self._shapes)}

    def _augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.dsa is None:
            return x
        if generator.device.type == "cpu":
            op_gen = generator
        else:  # DSA chooses its op on the CPU: seed a CPU generator once from the caller's
            if self._op_gen is None:
                seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device)[0])
                self._op_gen = torch.Generator().manual_seed(seed)
            op_gen = self._op_gen
        return self.dsa(x, generator, op_generator=op_gen)

    def loss(self, images: Tensor, labels: Tensor, step: int, generator: torch.Generator) -> Tensor:
        """``||θ_N - θ*_{t+M}||² / ||θ*_t - θ*_{t+M}||²`` for a sampled expert segment; 0-dim, differentiable w.r.t.
        ``images`` ``(N_img, C, H, W)`` and :attr:`syn_lr`. ``labels``: ``(N_img,)`` indices or ``(N_img, K)`` soft.
        The student's own draws from torch's global RNG (dropout) come from a fork seeded from ``generator``."""
        with seeded_global_rng(generator, images.device):
            return self._loss(images, labels, generator)

    def _loss(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        dev = images.device
        if self.syn_lr.device != dev:
            raise ELFError(f"the synthetic images are on {dev} but MTT's learned lr is on {self.syn_lr.device}; build TrajectoryMatching with device={str(dev)!r}")
        if next(self.model.buffers(), images).device != dev:
            self.model.to(dev)
        seg = self.trajectories.sample(generator, self.max_start_epoch, self.expert_epochs)
        self.last_segment = seg
        start = seg.start.to(dev, images.dtype)
        target = seg.target.to(dev, images.dtype)
        n = images.shape[0]
        bs = self.batch_syn or n
        theta = start.clone().requires_grad_(True)
        batches: list[Tensor] = []
        for _ in range(self.syn_steps):
            if not batches:
                batches = list(torch.randperm(n, generator=generator, device=generator.device).to(dev).split(bs))
            idx = batches.pop(0)
            x = self._augment(images[idx], generator)
            out = functional_call(self.model, self._unflatten(theta), (x,))
            ce = F.cross_entropy(out, labels[idx])
            (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
            theta = theta - self.syn_lr * grad
        num = (theta - target).pow(2).sum()
        den = (start - target).pow(2).sum().clamp_min(1e-30)
        return num / den

    # ------------------------------------------------------------------ the learned lr
    def param_groups(self) -> list[dict[str, Any]]:
        """``[{"params": [syn_lr], "lr": lr_lr, "momentum": lr_momentum, "name": "syn_lr"}]``."""
        return [{"params": [self.syn_lr], "lr": self.lr_lr, "momentum": self.lr_momentum, "name": "syn_lr"}]

    def learned_lr(self) -> float:
        """The current α, to store with the set: :func:`~elf.distill.distill` calls it and exports it as the set's lr
        (by hand: ``param.export(lr=objective.learned_lr())``). Reads the value back from the device."""
        return float(self.syn_lr.detach())

    def state_dict(self) -> dict[str, Tensor]:
        """The learned lr and, once drawn (images on a GPU), the CPU generator DSA picks its ops with."""
        state = {"syn_lr": self.syn_lr.detach().clone()}
        if self._op_gen is not None:
            state["op_rng"] = self._op_gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "syn_lr" not in state:
            raise ELFError("MTT state has no 'syn_lr'; it was saved by another objective")
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].reshape(()))
        if "op_rng" in state:  # (without it, as before 2026-12-02, a resumed GPU run re-seeds it from the loop's draws)
            self._op_gen = torch.Generator()
            self._op_gen.set_state(state["op_rng"].cpu())

    def metadata(self) -> dict[str, str]:
        """The settings (constant during a run: the distillation loop fingerprints checkpoints with them); the learned
        lr is exported as the set's ``lr``, not here."""
        return {
            "method": self.name,
            "student": self.model_name,
            "syn_steps": str(self.syn_steps),
            "expert_epochs": str(self.expert_epochs),
            "max_start_epoch": str(self.max_start_epoch),
            "batch_syn": str(self.batch_syn or "all"),
            "syn_lr_init": repr(self.init_syn_lr),
            "lr_lr": repr(self.lr_lr),
            "dsa": self.dsa.strategy if self.dsa is not None else "none",
            "experts": str(len(self.trajectories)),
            "expert_first_epoch": str(min(self.trajectories.first_epoch)),
            "expert_source": self.trajectories.source,
        }


def build_mtt_objective(
    model_name: str,
    expert_source: PathLike | Sequence[PathLike],
    *,
    channel: int = 3,
    num_classes: int = 10,
    im_size: tuple[int, int] = (32, 32),
    space: dict[str, str] | None = None,
    **settings: Any,
) -> TrajectoryMatching:
    """The MTT objective for the command line.

    Args:
        model_name: the student / expert architecture, e.g. "ConvNet".
        expert_source: a ``train-teacher`` output directory (or a directory of such runs, or a list of them), or MTT
            ``replay_buffer_<n>.pt`` files / a directory holding them.
        channel, num_classes, im_size: the data's shape.
        space: the real images' pixel space (:func:`elf.pixel_space.space_metadata`); ``train-teacher`` experts
            recorded in another one are refused.
        settings: :class:`TrajectoryMatching` keywords (syn_steps, expert_epochs, max_start_epoch, syn_lr, lr_lr,
            lr_momentum, batch_syn, dsa, device).
    """
    model = create_model(model_name, channel=channel, num_classes=num_classes, im_size=im_size)
    trajectories = ExpertTrajectories.load(expert_source, model, space)
    try:
        return TrajectoryMatching(model, trajectories, channel=channel, num_classes=num_classes, im_size=im_size, **settings)
    except TypeError as e:
        raise ELFError(f"unknown MTT setting ({e}); TrajectoryMatching takes syn_steps, expert_epochs, max_start_epoch, "
                       "syn_lr, lr_lr, lr_momentum, batch_syn, dsa, device") from e
