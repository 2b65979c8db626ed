"""ELFTrainer: train an evaluation model on a synthetic set with ELF and report its test accuracy.

    L = λ_task · CE(rear(front(aug(x))), y) + λ_front · D(front(aug(x)), F(x)) + λ_rear · CE(rear(F(x)), y)

F(x) comes from a :class:`~elf.FeatureBank` (teacher features of the un-augmented images, computed once). The
synthetic set, its labels and the features live on the training device as tensors: batches are index slices, with
no DataLoader and no host synchronization per step (values are read back only when logging).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ELFAdapters, build_adapters, token_grid
from .augment import DSA, DSASample
from .batchnorm import frozen_bn_stats
from .dc_augment import DCAugment, make_augmentation
from .errors import DivergedError, ELFError
from .feature_bank import FeatureBank, teacher_sha256
from .fileio import PathLike, tensor_sha256
from .losses import check_test_labels, feature_distance, prepare_targets
from .models import build_model, default_split_point, has_default_split_point
from .modes import in_mode
from .protocol import PROTOCOL_FIELDS, Protocol, get_protocol
from .protocol import seed_list as resolve_seeds
from .resume import SavedState, changed_settings, read_state, write_state
from .split import SplitOptions, auto_split_point, list_split_points, split_model

__all__ = ["ELFTrainer", "Callback", "DivergenceWatch", "EvalResult", "ModelSpec"]

ModelSpec = nn.Module | str | Callable[[], nn.Module] | tuple[nn.Module, nn.Module]
STATE_FORMAT = "elf-trainer-state/1"


@dataclass
class _LoopState:
    """What save_state needs from the running fit: seed, optimizer, RNGs, current lr, last finished epoch."""

    seed: int
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    dsa: DSA | DCAugment | None
    lr: float
    epoch: int
    cut: bool = False  # the last epoch was stopped after a batch: the state is not at an epoch boundary


class DivergenceWatch:
    """The first epoch whose summed loss is not finite, per seed, kept on the device (no host sync per epoch).

    ``update(epoch, loss_sums)`` each epoch with the summed losses, shape ``()`` or ``(k,)`` for k seeds;
    ``first()`` (one host read, at logged epochs) returns ``(seed index, epoch, mean loss)`` of the first diverged
    seed, or None."""

    def __init__(self, shape: tuple[int, ...], n: int, device: torch.device) -> None:
        self.n = n
        self.epoch = torch.full(shape, -1, dtype=torch.long, device=device)
        self.loss = torch.zeros(shape, device=device)

    def update(self, epoch: int, loss_sums: torch.Tensor) -> None:
        newly = (self.epoch < 0) & ~torch.isfinite(loss_sums)
        self.epoch = torch.where(newly, epoch, self.epoch)
        self.loss = torch.where(newly, loss_sums / self.n, self.loss)

    def first(self) -> tuple[int, int, float] | None:
        bad = self.epoch.reshape(-1).tolist()
        i = next((i for i, e in enumerate(bad) if e >= 0), None)
        return None if i is None else (i, bad[i], float(self.loss.reshape(-1)[i]))


def cannot_run(model_name: str, image_shape: tuple[int, ...], error: BaseException) -> ELFError:
    """The error for a model that fails on images of ``image_shape`` ``(C, H, W)``: built for other images."""
    return ELFError(f"{model_name} cannot run on images of shape {image_shape} ({error}); build it for these images "
                    "(channels, size: a registered builder gets channel=, im_size= only if it takes them) or pass "
                    "images that fit it")


def finite_state(params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                 seeds: int = 1) -> dict[str, torch.Tensor]:
    """Per parameter and floating buffer (``"parameter 'name'"``, ``"buffer 'name'"``), whether its values are all
    finite: a ``(seeds,)`` bool on the device (tensors stacked over ``seeds`` seeds, :mod:`elf.batched`; else
    ``(1,)``). No host read."""
    named = {f"parameter {n!r}": t for n, t in params.items()}
    named.update({f"buffer {n!r}": t for n, t in buffers.items() if t.is_floating_point()})
    return {what: torch.isfinite(t.detach().reshape(seeds, -1)).all(1) for what, t in named.items()}


def newly_nonfinite(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> tuple[int, str] | None:
    """``(seed index, entry)`` of the first entry finite in ``before`` but not in ``after`` (both from
    :func:`finite_state`), else None; one host read. A buffer that holds inf on purpose from the start (an attention
    mask) is not flagged."""
    keys = [k for k in after if k in before]
    if not keys:
        return None
    turned = torch.stack([before[k] & ~after[k] for k in keys]).tolist()  # (entries, seeds)
    return next(((i, k) for i in range(len(turned[0])) for k, row in zip(keys, turned) if row[i]), None)


class Callback:
    """Base class for trainer callbacks; override what you need. ``logs`` hold detached tensors (call
    ``.item()`` yourself if you need numbers: that synchronizes with the device). Set
    ``trainer.stop_training = True`` to stop after the current batch."""

    def on_fit_start(self, trainer: ELFTrainer) -> None: ...

    def on_epoch_start(self, trainer: ELFTrainer, epoch: int) -> None: ...

    def on_batch_end(self, trainer: ELFTrainer, step: int, logs: dict[str, torch.Tensor]) -> None: ...

    def on_epoch_end(self, trainer: ELFTrainer, epoch: int, logs: dict[str, torch.Tensor]) -> None: ...

    def on_fit_end(self, trainer: ELFTrainer) -> None: ...


@dataclass
class EvalResult:
    """Test accuracies (percent) of one model under one protocol over several seeds.

    ``std`` is the population standard deviation (``numpy.std``), as the DD code bases report it.
    """

    model: str
    accuracies: list[float]
    seeds: list[int]
    protocol: dict[str, Any]
    wall_time_s: list[float] = field(default_factory=list)
    histories: list[list[dict[str, float]]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    also: dict[str, list[float]] = field(default_factory=dict)  # accuracies on run(also_evaluate=...)'s sets

    def evaluate_also(self, trainer: ELFTrainer, sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Test the trainer's current model on each named ``(images, labels)`` set into :attr:`also`."""
        for name, (images, labels) in (sets or {}).items():
            self.also.setdefault(name, []).append(trainer.evaluate(images, labels))

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies)) if self.accuracies else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies)) if self.accuracies else float("nan")

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "mean": self.mean,
            "std": self.std,
            "accuracies": self.accuracies,
            "seeds": self.seeds,
            "protocol": self.protocol,
            "wall_time_s": self.wall_time_s,
            "histories": self.histories,
            "data": self.data,
            **({"also": self.also} if self.also else {}),
        }


def _memory_format(model: nn.Module) -> torch.memory_format:
    """The layout to give ``model`` its inputs in: channels-last when its 4-D weights are stored so (a fit with
    ``channels_last=True``), else contiguous."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Joined(nn.Module):
    """``rear(front(x))`` for a user-given (front, rear) pair."""

    def __init__(self, front: nn.Module, rear: nn.Module) -> None:
        super().__init__()
        self.front = front
        self.rear = rear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rear(self.front(x))


def _model_name(spec: ModelSpec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, tuple):
        return f"{type(spec[0]).__name__}+{type(spec[1]).__name__}"
    if isinstance(spec, nn.Module):
        return str(getattr(spec, "elf_model_name", type(spec).__name__))
    return getattr(spec, "__name__", "model")


class ELFTrainer:
    """Evaluate a model on a synthetic set with ELF (or the plain baseline when both λ are 0).

    Args:
        model: a model name for :func:`~elf.create_model` ("ResNet18BN"), an ``nn.Module`` (each fit trains a
            re-initialized copy, via ``reset_parameters``), a zero-argument factory, or a ``(front, rear)`` pair
            for models that cannot be traced.
        images: synthetic images ``(N, C, H, W)``, float, normalized as the test data.
        labels: class indices ``(N,)``, or soft labels ``(N, K)`` (probabilities or logits).
        feature_bank: teacher features of ``images`` (see :class:`FeatureBank`).
        teacher: alternatively the teacher module; a bank is built from it at ``teacher_point``. With
            ``features_on_augmented`` it also runs on each augmented batch (default: the bank's own
            :attr:`FeatureBank.teacher`).
        split_at: where to cut the model (default: its ``elf_split_point``, or ``"auto"`` for a model without one,
            e.g. torchvision/timm models); ``"auto"`` picks the deepest point
            matching the bank's shape (with ``adapter="auto"``: else its spatial grid) and reports it in
            :attr:`split_point`. Ignored for a (front, rear) pair.
        protocol: a preset name or :class:`Protocol`; ``**overrides`` change single fields (``epochs=300``).
        label_kind: "auto" | "index" | "prob" | "logits". num_classes: required for names when labels are hard
            and some classes are absent.
        device: training device (default: CUDA when available). callbacks: :class:`Callback` objects.
        progress: show a progress bar. log_every: epochs between logged (synchronized) loss values.
        channels_last: train and test in the channels-last memory format (model weights and image batches), off by
            default; the same training up to float rounding, faster for convolutions on some devices. Sequential
            fits only: ``run(batched=...)`` ignores it for the vectorized seeds (see docs/trainer.md).
        leaf_modules, autowrap_functions: module classes torch.fx must not trace into and functions it keeps as
            single nodes, in every trace (the model, the teacher, the feature bank); or pass them as
            ``split_options=SplitOptions(...)``. Models registered with them carry them already.
    """

    def __init__(
        self,
        model: ModelSpec,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        feature_bank: FeatureBank | None = None,
        teacher: nn.Module | None = None,
        teacher_point: str | None = None,
        split_at: str | None = None,
        protocol: Protocol | str | None = "elf",
        label_kind: str = "auto",
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        callbacks: Iterable[Callback] | None = (),
        progress: bool = True,
        log_every: int | None = None,
        leaf_modules: Sequence[type] = (),
        autowrap_functions: Sequence[Callable[..., Any]] = (),
        split_options: SplitOptions | None = None,
        channels_last: bool = False,
        **overrides: Any,
    ) -> None:
        if not isinstance(channels_last, bool):
            raise ELFError(f"channels_last must be True or False, got {channels_last!r}")
        self.channels_last = channels_last
        self.protocol = get_protocol(protocol, **overrides)
        self.device = torch.device(device) if device is not None else _default_device()
        _check_images(images)
        if not isinstance(labels, torch.Tensor):
            raise ELFError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.shape[0] != images.shape[0]:
            raise ELFError(f"there are {images.shape[0]} images but {labels.shape[0]} labels; they must match one to one")
        targets, hard, self.num_classes = prepare_targets(labels, label_kind, num_classes)
        self.images = images.detach().to(self.device, torch.float32)
        self.targets = targets.to(self.device)
        self.hard_labels = hard.to(self.device)
        self.model_spec = model
        self.model_name = _model_name(model)
        self.split_options = (split_options or SplitOptions()).merged(
            SplitOptions(None, tuple(leaf_modules), tuple(autowrap_functions)))
        self.split_at = split_at if split_at is not None else self.split_options.at
        self.leaf_modules = self.split_options.leaf_modules
        self.callbacks = list(callbacks or ())
        self.progress = progress
        self.log_every = log_every
        self.teacher = teacher
        self.teacher_point = teacher_point
        self.stop_training = False
        self.model: nn.Module | None = None
        self.front: nn.Module | None = None
        self.rear: nn.Module | None = None
        self.adapters: ELFAdapters | None = None
        self._adapters_told = False  # the adapters' shapes are printed once per trainer (with progress)
        self.split_point: str | None = None
        self.history: list[dict[str, float]] = []
        self._loop: _LoopState | None = None
        self._inputs_sha256: str | None = None
        self.data_info: dict[str, Any] = {}
        p = self.protocol
        runs_teacher = p.features_on_augmented and p.lambda_front > 0  # a baseline (λ = 0) never runs the teacher
        if runs_teacher and teacher is None and feature_bank is not None and feature_bank.teacher is not None:
            teacher = self.teacher = feature_bank.teacher  # the bank's own teacher
        if runs_teacher and teacher is not None and feature_bank is not None:
            recorded = feature_bank.metadata.get("teacher_sha256")
            # hashed even when it is the bank's own module: its weights may have changed since the bank was built
            if recorded and teacher_sha256(teacher) != recorded:
                same = teacher is feature_bank.teacher
                raise ELFError(("the feature bank's teacher has changed since the bank was built (its weights or "
                                "buffers were modified in place)" if same else
                                "teacher= is not the teacher the feature bank was built with (another architecture or "
                                "other weights)") + ", so the front target and the rear term's features would come "
                               "from two networks: rebuild the bank from the teacher as it is now (FeatureBank.build), "
                               "or pass the teacher the bank was built with")
        if runs_teacher and teacher is None:
            raise ELFError(f"protocol {p.name!r} has features_on_augmented=True, which runs the teacher on every "
                           "augmented batch: pass teacher=, or a "
                           "feature_bank made in this process by FeatureBank.build / from_checkpoint (a bank read "
                           "from a file does not hold its teacher)")
        if feature_bank is None and teacher is not None and p.uses_features:
            teacher = teacher.to(self.device)
            feature_bank = FeatureBank.build(teacher, self.images, teacher_point, device=self.device,
                                             options=self.split_options)
        if p.uses_features and feature_bank is None:
            raise ELFError(
                "ELF needs teacher features: pass feature_bank= (FeatureBank.build(teacher, images)) or teacher=; "
                "for the plain baseline use protocol.baseline() or lambda_front=0, lambda_rear=0"
            )
        if feature_bank is not None:
            feature_bank.check_matches(images)
            feature_bank = feature_bank.to(self.device)
            if p.lambda_front > 0 and p.distance == "ce" and bool((feature_bank.features < 0).any()):
                warnings.warn(f"the teacher features (point {feature_bank.point!r}) have negative values, but the front "
                              "term's soft-target CE (distance='ce') weights log-probabilities by them: its loss has no "
                              "lower bound. Cut the teacher after a ReLU (its default point is), or use distance='mse'",
                              stacklevel=2)
        self.feature_bank = feature_bank

    @classmethod
    def from_synthetic(cls, model: ModelSpec, synthetic: Any, **kwargs: Any) -> ELFTrainer:
        """A trainer for a loaded :class:`~elf.io.SyntheticSet`, carrying its metadata into the results.

        Uses the set's label kind; with a protocol whose ``learned_lr`` is on ("mtt", "glad", or
        ``learned_lr=True`` given here) its learned lr replaces the protocol lr. Field overrides given here apply
        first, so ``learned_lr=False`` keeps the protocol lr; an explicit ``lr=`` always wins (a protocol made with
        an explicit ``lr`` has ``learned_lr`` off, see :meth:`Protocol.replace`). A feature bank or teacher given
        here must come from the same pixel space (normalization, ZCA) as the set when both record it.
        """
        from .pixel_space import check_same_space, space_metadata

        space = space_metadata(synthetic.normalization, synthetic.zca)
        bank = kwargs.get("feature_bank")
        if bank is not None:
            check_same_space(bank.metadata, space, "the feature bank", "the synthetic set")
        # field overrides first (learned_lr=... decides whether the set's lr applies), then the set's lr
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in PROTOCOL_FIELDS}
        proto = get_protocol(kwargs.pop("protocol", "elf"), **overrides)
        if "lr" not in overrides:  # an explicit lr wins over the set's learned one
            proto = protocol_for_set(proto, synthetic.lr)  # recorded in the trainer's protocol as used
        kwargs.setdefault("label_kind", synthetic.label_kind)
        kwargs.setdefault("num_classes", synthetic.num_classes)  # class names count even when a class has no image
        trainer = cls(model, synthetic.images, synthetic.labels, protocol=proto, **kwargs)
        trainer.data_info = {
            "n": len(synthetic), "ipc": synthetic.ipc, "label_kind": synthetic.label_kind, "zca": synthetic.zca,
            "normalization": synthetic.normalization.to_dict() if synthetic.normalization else None,
            "learned_lr": synthetic.lr, "classes": synthetic.classes, **synthetic.metadata,
        }
        return trainer

    # ---- model ----------------------------------------------------------------------------------------------
    def _build_model(self) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
        spec = self.model_spec
        # fit() seeded torch's global RNG: init, dropout and drop-path all follow the seed
        if isinstance(spec, tuple):
            if len(spec) != 2 or not all(isinstance(m, nn.Module) for m in spec):
                raise ELFError("a model given as a tuple must be (front, rear), two nn.Modules")
            # one copy of the pair, so modules the halves share stay shared (tied weights stay tied)
            model = build_model(_Joined(spec[0], spec[1]), tuple(self.images.shape[1:]), self.num_classes)
            return model.to(self.device), model.front, model.rear
        model = build_model(spec, tuple(self.images.shape[1:]), self.num_classes).to(self.device)
        if not (self.protocol.uses_features or (self.split_at and self.split_at != "auto")):
            return model, None, None  # a baseline needs no cut ("auto" picks one only for a feature bank)
        point = self._resolve_split(model)
        front, rear = split_model(model, point, options=self.split_options)
        return model, front, rear

    def _resolve_split(self, model: nn.Module) -> str:
        """The cut for ``model``: ``split_at``, its default, or for ``"auto"`` the point chosen for the bank (once)."""
        if self.split_at != "auto" and (self.split_at or has_default_split_point(model)):
            self.split_point = self.split_at or default_split_point(model)
            return self.split_point
        if self.split_point is None:
            if self.feature_bank is None:
                raise ELFError(f"split_at='auto' chooses the cut of {self.model_name} for a teacher feature bank, and there "
                               "is none: pass split_at= or feature_bank= (or teacher=)")
            point, why = auto_split_point(model, tuple(self.images.shape[1:]), self.feature_bank.shape,
                                          adapter=self.protocol.adapter is not None, options=self.split_options)
            self.split_point = point
            if self.progress:
                print(f"{self.model_name}: split_at='auto' chose {point!r} ({why})", file=sys.stderr)
        return self.split_point

    def _check_shapes(self, model: nn.Module, front: nn.Module | None) -> tuple[int, ...] | None:
        """Check the model's output against the labels and its front against the bank (unless adapters may bridge
        them); returns the front's per-image output shape, or None without a front or bank."""
        with in_mode(model, False), torch.no_grad():
            x = self.images[:2]
            try:
                out = model(x.clone())  # a copy: a model that edits its input in place must not edit the set
            except RuntimeError as e:
                raise cannot_run(self.model_name, tuple(x.shape[1:]), e) from e
            if not isinstance(out, torch.Tensor):
                raise ELFError(_not_logits(self.model_name, out, "in eval mode"))
            if out.dim() != 2 or out.shape[1] != self.num_classes:
                raise ELFError(
                    f"{self.model_name} outputs shape {tuple(out.shape)} but the labels have {self.num_classes} classes; "
                    "build the model with num_classes matching the labels"
                )
            if front is None or self.feature_bank is None:
                return None
            h = front(x.clone())
            if not isinstance(h, torch.Tensor):
                raise ELFError(f"{self.model_name}'s front (cut at {self.split_point!r}) returns a {type(h).__name__}, "
                               "not a tensor; cut where one tensor flows (elf.list_split_points lists such points)")
            got = tuple(h.shape[1:])
            if got != self.feature_bank.shape and self.protocol.adapter is None:
                raise ELFError(self._shape_mismatch_message(model, got, self.feature_bank.shape))
            return got

    def _shape_mismatch_message(self, model: nn.Module, got: tuple[int, ...], want: tuple[int, ...]) -> str:
        if isinstance(model, _Joined):  # a (front, rear) pair: split_at does not apply, the pair itself must change
            return (f"the given front of {self.model_name} outputs {got} per image, but the teacher features are {want}: "
                    f"give a front that outputs {want} (and a rear that takes it), pass the whole model with split_at= "
                    "to cut it by name, use a teacher of this feature shape, or pass adapter='auto' (--adapter auto) "
                    "to bridge the shapes with learned adapters.")
        point = self.split_point or getattr(model, "elf_split_point", "(given front)")
        msg = f"{self.model_name} cut at {point!r} outputs {got} per image, but the teacher features are {want}."
        try:
            matches = [p.name for p in list_split_points(model, tuple(self.images.shape[1:]), options=self.split_options,
                                                         shape=want)]
        except ELFError:
            matches = []
        if matches:
            msg += f" Split points of {self.model_name} with shape {want}: {', '.join(matches)}."
        else:
            msg += f" No split point of {self.model_name} gives {want}: use a teacher whose feature shape this model can match"
            msg += f" (`elf split-points {self.model_name}` lists its shapes), or pass (front, rear) yourself."
        msg += " Or pass adapter='auto' (--adapter auto) to bridge the shapes with learned adapters."
        return msg

    def _trained_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's parameters, then the adapters' (the order of momentum buffers in a saved state)."""
        extra = list(self.adapters.parameters()) if self.adapters is not None else []
        return list(model.parameters()) + extra

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        p = self.protocol
        return torch.optim.SGD(self._trained_parameters(model), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)

    # ---- training -------------------------------------------------------------------------------------------
    def _init_model(self, seed: int) -> tuple[nn.Module, nn.Module | None, nn.Module | None, ELFAdapters | None]:
        """The model, its front and rear, and the adapters as ``fit(seed)`` starts them (seeds torch's global RNG)."""
        torch.manual_seed(seed)
        model, front, rear = self._build_model()
        self.adapters = None
        got = self._check_shapes(model, front)
        # adapters are drawn from the global RNG after the model, so ELF and baseline models start alike
        adapters = None
        if got is not None and self.feature_bank is not None:
            adapters = build_adapters(self.protocol.adapter, got, self.feature_bank.shape, rear=rear,
                                      image_size=(int(self.images.shape[-2]), int(self.images.shape[-1])),
                                      grid=token_grid(model, got))
            if adapters is not None:
                adapters.to(self.device)
                if self.progress and not self._adapters_told:
                    why = {"learned": "learned constant, the rear reads the patch tokens",
                           "pooled": "average of the patch tokens + learned offset, the rear reads only the prefix tokens"}
                    tokens = (f"; prefix tokens for the rear: {why[adapters.to_student.prefix_mode]}"
                              if adapters.to_student.target.prefix else "")
                    print(f"{self.model_name}: adapters bridge {adapters.extra_repr()}{tokens}", file=sys.stderr)
                    self._adapters_told = True
        return model, front, rear, adapters

    def teacher_front(self) -> nn.Module | None:
        """The teacher up to the bank's cut, in eval mode on the trainer's device, when the protocol runs it on every
        augmented batch (``features_on_augmented`` with a front term); else None. Its output ``(B, *F)`` is the front
        term's target."""
        if not self.protocol.features_on_augmented or self.protocol.lambda_front <= 0:
            return None
        assert self.teacher is not None and self.feature_bank is not None
        self.teacher.to(self.device).eval()
        # cut where the bank was cut: the front target and the rear's input must be the same feature
        return split_model(self.teacher, self.feature_bank.point or self.teacher_point
                           or default_split_point(self.teacher), options=self.split_options).front

    def fit(self, seed: int = 0, *, resume_from: PathLike | None = None) -> list[dict[str, float]]:
        """Train a fresh model (initialized from ``seed``) with the protocol; returns the logged history.

        The same seed on CPU gives the same weights: fit seeds torch's global RNG with ``seed`` (model init, dropout,
        drop-path) as the DD code bases do, and batch order and augmentation use generators seeded from it.
        ``resume_from`` continues from a file written by :meth:`save_state` (e.g. from a callback's
        ``on_epoch_end``) at the epoch after the saved one, with the same weights, momentum, lr and RNG states.
        """
        p = self.protocol
        model, front, rear, self.adapters = self._init_model(seed)
        if self.channels_last:  # after the seeded init: the same initial weights as a contiguous fit
            for module in (model, front, rear, self.adapters):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.model, self.front, self.rear = model, front, rear
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        dsa = make_augmentation(p.augment, p.dsa_mode, seed)
        distance = feature_distance(p.distance)
        teacher_front = self.teacher_front()
        lr = p.lr
        opt = self._optimizer(model, lr)
        start_epoch = 0
        if resume_from is not None:
            start_epoch, lr, saved = self._load_state(resume_from, model, gen, dsa, seed)
            opt = self._optimizer(model, lr)
            saved.restore_momentum(opt)
        self._loop = _LoopState(seed, opt, gen, dsa, lr, start_epoch - 1)
        finite_before = finite_state(dict(model.named_parameters()), dict(model.named_buffers()))  # read after training
        n, bs = self.images.shape[0], p.batch_size
        total = p.total_epochs
        log_every = self.log_every or max(1, total // 20)
        self.history = []
        self.stop_training = False
        for cb in self.callbacks:
            cb.on_fit_start(self)
        epochs: Iterable[int] = range(start_epoch, total)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(epochs, desc=f"{self.model_name} seed {seed}", unit="ep", leave=False, initial=start_epoch, total=total)
            epochs = bar
        step = 0
        start_time = time.perf_counter()
        # divergence: read at the logged epochs (the last one always), so a NaN/inf run stops there, never scored
        watch = DivergenceWatch((), n, self.device)

        def check_diverged() -> None:
            found = watch.first()
            if found is not None:
                if bar is not None:
                    bar.close()
                raise DivergedError(f"diverged: loss is {found[2]} at epoch {found[1] + 1} of "
                                    f"{self.model_name} seed {seed}; lower lr or lambda")

        for epoch in epochs:
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            model.train()
            sums = torch.zeros(5, device=self.device)  # loss, task, front, rear, correct
            perm = torch.randperm(n, generator=gen, device=self.device)
            seen = 0  # images trained on this epoch: n, or fewer when a callback stops it after a batch
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                seen += idx.numel()
                logs = self._step(model, front, rear, opt, idx, dsa, gen, distance, teacher_front)
                sums += torch.stack([logs["loss"] * idx.numel(), logs["task"] * idx.numel(), logs["front"] * idx.numel(),
                                     logs["rear"] * idx.numel(), logs["correct"]])
                for cb in self.callbacks:
                    cb.on_batch_end(self, step, logs)
                step += 1
                if self.stop_training:
                    break
            epoch_lr = lr
            lr, opt = p.after_epoch(epoch, lr, opt, lambda new_lr: self._optimizer(model, new_lr))
            self._loop = _LoopState(seed, opt, gen, dsa, lr, epoch, cut=seen < n)
            watch.update(epoch, sums[0])
            logged = epoch % log_every == 0 or epoch == total - 1 or self.stop_training
            if logged:
                check_diverged()
            epoch_logs = {"loss": sums[0] / seen, "task": sums[1] / seen, "front": sums[2] / seen, "rear": sums[3] / seen,
                          "train_acc": sums[4] / seen * 100, "lr": torch.tensor(epoch_lr, dtype=torch.float64)}
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, epoch_logs)
            if self.stop_training and not logged:  # stopped by on_epoch_end: this epoch is logged (and checked) too
                logged = True
                check_diverged()
            if logged:
                record = {"epoch": float(epoch), **{k: float(v) for k, v in epoch_logs.items()}}
                record["time_s"] = time.perf_counter() - start_time
                self.history.append(record)
                if bar is not None:
                    # the task CE and train accuracy read as usual; the total (soft-target CE of the front term,
                    # order 1e2-1e3 by construction) is in the history, not here, where it would look like divergence
                    bar.set_postfix(task_loss=f"{record['task']:.3g}", train_acc=f"{record['train_acc']:.1f}%")
            if self.stop_training:
                break
        if bar is not None:
            bar.close()
        # the loss watch sees losses before each step: a last step that blows up shows only in the weights
        bad = newly_nonfinite(finite_before, finite_state(dict(model.named_parameters()), dict(model.named_buffers())))
        if bad is not None:
            raise DivergedError(f"diverged: {bad[1]} of {self.model_name} seed {seed} is NaN or inf after the last step "
                                "(the losses before it were finite); lower lr or lambda")
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def _step(
        self,
        model: nn.Module,
        front: nn.Module | None,
        rear: nn.Module | None,
        opt: torch.optim.Optimizer,
        idx: torch.Tensor,
        dsa: DSA | DCAugment | None,
        gen: torch.Generator,
        distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        teacher_front: nn.Module | None,
    ) -> dict[str, torch.Tensor]:
        x, y, feats = self.batch(idx, dsa, gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = self.front_target(teacher_front, x)
        loss, loss_task, loss_front, loss_rear, out = self.loss_terms(model, front, rear, self.adapters, x, y, feats,
                                                                       distance, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct = (out.detach().argmax(1) == self.hard_labels[idx]).sum()
        return {"loss": loss.detach(), "task": loss_task.detach(), "front": loss_front.detach(),
                "rear": loss_rear.detach(), "correct": correct.float()}

    def batch(self, idx: torch.Tensor, dsa: DSA | DCAugment | None,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images ``(B, C, H, W)`` (augmented with a draw from ``dsa`` and ``gen``), targets and teacher features
        (aligned with the draw when the protocol says so; None without feature terms) of the batch ``idx``.

        With :meth:`loss_terms`, the two pieces of a training step that every loop shares (``fit`` and the batched
        seeds of :mod:`elf.batched`); a custom loop may use them to train exactly what ``fit`` trains."""
        p = self.protocol
        x = self.images[idx]
        y = self.targets[idx]
        sample = None
        if dsa is not None and dsa.ops:
            sample = dsa.sample(x.shape, x.device, gen)
            x = dsa.apply(x, sample)
        # gathered once per step, shared by the front target and the rear input
        feats = self.feature_bank[idx] if self.feature_bank is not None and p.uses_features else None
        if feats is not None and p.align_targets and isinstance(sample, DSASample):
            only = ("flip",) if p.align_targets == "flip" else None
            feats = dsa.apply_geometric(feats, sample, (x.shape[2], x.shape[3]), only=only)  # type: ignore[union-attr]
        return x, y, feats

    @staticmethod
    def front_target(teacher_front: nn.Module | None, x: torch.Tensor) -> torch.Tensor | None:
        """The teacher's features ``(B, *F)`` (float32, no gradient) of the augmented batch ``x`` ``(B, C, H, W)``
        for the front term, when ``teacher_front`` (from :meth:`teacher_front`) is given; else None."""
        if teacher_front is None:
            return None
        with torch.no_grad():
            return teacher_front(x).float()

    def loss_terms(
        self,
        model: nn.Module,
        front: nn.Module | None,
        rear: nn.Module | None,
        adapters: ELFAdapters | None,
        x: torch.Tensor,
        y: torch.Tensor,
        feats: torch.Tensor | None,
        distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weighted loss and its task, front and rear terms (scalars), and the logits ``(B, K)`` of one batch.

        ``feats`` ``(B, *F)`` (from :meth:`batch`) are the rear term's input and the front term's target, unless
        ``target`` ``(B, *F)`` is given for the front term (the teacher on the augmented batch, :meth:`front_target`).
        """
        p = self.protocol
        zero = x.new_zeros(())
        loss_front = loss_rear = zero
        if p.lambda_front > 0:
            assert front is not None and rear is not None
            h = front(x)
            out = rear(h)
            if target is None:
                assert feats is not None
                target = feats
            loss_front = distance(adapters.to_teacher(h) if adapters is not None else h, target)
        else:
            out = model(x)
        if not isinstance(out, torch.Tensor):  # e.g. torchvision's googlenet/inception: (logits, aux) in train mode
            raise ELFError(_not_logits(self.model_name, out, "in train mode"))
        loss_task = F.cross_entropy(out, y)
        loss = p.lambda_task * loss_task + p.lambda_front * loss_front
        if p.lambda_rear > 0:
            assert rear is not None and feats is not None
            with contextlib.nullcontext() if p.rear_bn_stats_from_features else frozen_bn_stats(rear):
                loss_rear = F.cross_entropy(rear(adapters.to_student(feats) if adapters is not None else feats), y)
            loss = loss + p.lambda_rear * loss_rear
        return loss, loss_task, loss_front, loss_rear, out

    # ---- resumable state ----------------------------------------------------------------------------------
    def save_state(self, path: PathLike) -> Path:
        """Write everything needed to resume the current fit after the last finished epoch (safetensors).

        Holds the model's state dict, the optimizer's momentum buffers, lr, seed, epoch and the RNG states.
        Call it from a callback's ``on_epoch_end``; resume with ``fit(seed, resume_from=path)``.
        """
        if self.model is None or self._loop is None:
            raise ELFError("save_state() needs a running or finished fit()")
        loop = self._loop
        if loop.cut:  # a resume would count the cut epoch as whole and skip the rest of its batches
            raise ELFError(f"save_state(): the fit was stopped after a batch in the middle of epoch {loop.epoch}, so "
                           "there is no state after a finished epoch to resume from; set stop_training in "
                           "on_epoch_end (the epoch then finishes) to save and resume exactly")
        sections = {"model": self.model.state_dict()}
        if self.adapters is not None:
            sections["adapter"] = self.adapters.state_dict()
        meta = {"epoch": str(loop.epoch), "lr": repr(loop.lr), "seed": str(loop.seed),
                "model": self.model_name, "protocol": json.dumps(self.protocol.to_dict(), default=str),
                **self._run_inputs()}
        return write_state(path, STATE_FORMAT, sections=sections, optimizer=loop.optimizer,
                           generators={"batches": loop.generator, "dsa": loop.dsa.op_generator if loop.dsa else None,
                                       **self._global_generators()},
                           meta=meta)

    def _run_inputs(self) -> dict[str, str]:
        """What a saved state was trained on besides the protocol: the set's content hash (images and labels), the
        cut, and the teacher feature (hash and point) when the protocol uses one."""
        if self._inputs_sha256 is None:  # the set does not change during the trainer's life: hashed once
            self._inputs_sha256 = tensor_sha256(self.images, self.targets)
        out = {"inputs_sha256": self._inputs_sha256, "split_at": str(self.split_point)}
        if self.feature_bank is not None and self.protocol.uses_features:
            out["teacher_sha256"] = str(self.feature_bank.metadata.get("teacher_sha256", ""))
            out["teacher_point"] = str(self.feature_bank.point)
            out["teacher_dtype"] = str(self.feature_bank.features.dtype)  # a float32 run does not go on in bfloat16
        return out

    def _global_generators(self) -> dict[str, torch.Generator]:
        """torch's global generators a fit draws from (dropout, drop-path): CPU, and the fit's CUDA device."""
        gens = {"global": torch.default_generator}
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            gens["global_cuda"] = torch.cuda.default_generators[index]
        return gens

    def _load_state(self, path: PathLike, model: nn.Module, gen: torch.Generator, dsa: DSA | DCAugment | None,
                    seed: int) -> tuple[int, float, SavedState]:
        saved = read_state(path, STATE_FORMAT, what="an ELFTrainer state file (written by save_state)")
        meta = saved.meta
        if int(meta["seed"]) != seed:
            raise ELFError(f"{path} was saved by a fit with seed {meta['seed']}; resume it with fit(seed={meta['seed']})")
        if "protocol" in meta:  # what decides training must not change mid-run (evaluation batch size may)
            ignored = {"name", "notes", "eval_batch_size"}
            saved_p, now = json.loads(meta["protocol"]), json.loads(json.dumps(self.protocol.to_dict(), default=str))
            if all(p.get("lr_decay") == 1.0 or p.get("lr_decay_epoch") is not None for p in (saved_p, now)):
                ignored.add("epochs")  # the schedule does not depend on it: more epochs continue the same run
            shown = changed_settings(saved_p, now, ignored)
            if shown:
                raise ELFError(f"{path} was saved by a fit under another protocol ({shown}); resume it with the same "
                               "protocol, or start over (fit without resume_from; elf train-teacher: --no-resume or "
                               "another --out)")
        now_inputs = self._run_inputs()  # keys an older file lacks are not compared
        keys = ("inputs_sha256", "split_at", "teacher_sha256", "teacher_point", "teacher_dtype")
        shown = changed_settings({k: meta[k] for k in keys if k in meta}, now_inputs)
        if shown:
            raise ELFError(f"{path} was saved by a fit on other inputs (set: inputs_sha256, cut: split_at, teacher: "
                           f"teacher_sha256 / teacher_point / teacher_dtype; {shown}); resume it with the same inputs, or start over "
                           "(fit without resume_from; elf train-teacher: --no-resume or another --out)")
        try:
            model.load_state_dict(saved.section("model"))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ELFError(f"{path} holds weights of another model ({meta.get('model')}, this fit trains "
                           f"{self.model_name}): {first}") from e
        adapter_state = saved.section("adapter")
        if bool(adapter_state) != (self.adapters is not None):
            raise ELFError(f"{path} was saved {'with' if adapter_state else 'without'} feature adapters, but this fit "
                           f"{'has' if self.adapters is not None else 'has none'}: resume with the same protocol and bank")
        if self.adapters is not None:
            self.adapters.load_state_dict(adapter_state)
        saved.restore_generator("batches", gen)
        saved.restore_generator("dsa", dsa.op_generator if dsa is not None else None)
        for name, generator in self._global_generators().items():  # absent in older state files: skipped
            saved.restore_generator(name, generator)
        return int(meta["epoch"]) + 1, float(meta["lr"]), saved

    # ---- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None) -> float:
        """Top-1 accuracy (percent) of the trained model on ``images`` ``(M, C, H, W)`` and labels ``(M,)``."""
        if self.model is None:
            raise ELFError("evaluate() needs a trained model: call fit() first")
        _check_images(images, what="test images")
        if labels.shape[0] != images.shape[0] or labels.dim() != 1:
            raise ELFError(f"test labels must be (M,) with M = {images.shape[0]} images, got {tuple(labels.shape)}")
        if tuple(images.shape[1:]) != tuple(self.images.shape[1:]):
            raise ELFError(f"test images are {tuple(images.shape[1:])} per image but the synthetic images are {tuple(self.images.shape[1:])}")
        check_test_labels(labels, self.num_classes)
        bs = batch_size or self.protocol.eval_batch_size
        layout = _memory_format(self.model)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        with in_mode(self.model, False):
            for start in range(0, images.shape[0], bs):
                x = images[start : start + bs].to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=layout)
                y = labels[start : start + bs].to(self.device, non_blocking=True)
                correct += (self.model(x).argmax(1) == y).sum()
        return float(correct) / images.shape[0] * 100.0

    def run(self, test_images: torch.Tensor, test_labels: torch.Tensor, seeds: int | Sequence[int] = 5, *,
            batched: bool | int = False, compile: bool = False,
            also_evaluate: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            fall_back: bool = True) -> EvalResult:
        """``fit`` then ``evaluate`` once per seed (an int ``k`` means seeds ``0..k-1``); accuracy at the final epoch.

        ``batched=True`` trains the seeds at once as one vectorized model (:mod:`elf.batched`; same accuracies up to
        float rounding), an int ``m`` in groups of at most ``m`` seeds, or runs them one by one with a printed reason
        when it cannot; ``compile=True`` also wraps that batched step in ``torch.compile``. ``channels_last`` (set on
        the trainer) applies to sequential runs only: batched seeds ignore it (vmap has no channels-last path), say so
        in one line and record ``data["channels_last"] = False``; seeds that fall back to sequential runs use it.
        ``also_evaluate`` names more ``(images, labels)`` sets to test each seed's final model on (e.g. the test split
        next to a validation split); their accuracies land in ``result.also[name]``, in seed order.
        ``fall_back=False``: seeds that cannot be batched are not run one by one here; the result comes back without
        accuracies, ``data["batched"]["fallback"]`` saying why (for a caller that runs seeds its own way).
        """
        seed_list = resolve_seeds(seeds, "run() seeds")
        result = EvalResult(self.model_name, [], seed_list, self.protocol.to_dict(), data=dict(self.data_info))
        if compile and not batched:
            raise ELFError("compile=True compiles the batched step: pass batched=True as well (it works for one seed too)")
        if not isinstance(batched, int) or (not isinstance(batched, bool) and batched < 1):
            raise ELFError(f"batched must be True, False or a number of seeds per group >= 1, got {batched!r}")
        if batched:
            from .batched import run_batched

            group = None if batched is True else int(batched)
            batched = run_batched(self, test_images, test_labels, result, compile=compile, group=group,
                                  also_evaluate=also_evaluate)
            if not batched and not fall_back:
                return result
            if batched and self.channels_last:  # the vectorized seeds ran (and were tested) contiguous
                print(f"{self.model_name}: batched seeds ignore channels_last (vmap has no channels-last path); "
                      "they ran in the contiguous format", file=sys.stderr)
                result.data["channels_last"] = False
        for seed in [] if batched else seed_list:
            t0 = time.perf_counter()
            history = self.fit(seed)
            acc = self.evaluate(test_images, test_labels)
            result.accuracies.append(acc)
            result.evaluate_also(self, also_evaluate)
            result.wall_time_s.append(time.perf_counter() - t0)
            result.histories.append(history)
        if self.channels_last and not batched:
            result.data["channels_last"] = True
        result.data["split_at"] = self.split_point
        if self.adapters is not None:
            result.data["adapters"] = repr(self.adapters)
        if self.feature_bank is not None and self.protocol.uses_features:  # which teacher feature it trained against
            result.data["teacher"] = {k: self.feature_bank.metadata[k] for k in
                                      ("teacher_model", "teacher_sha256", "point", "shape", "dtype", "images_sha256")
                                      if k in self.feature_bank.metadata}
        return result


def _check_images(images: Any, what: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise ELFError(f"{what} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ELFError(f"{what} must have shape (N, C, H, W); got {images.dim()} dimensions {tuple(images.shape)}"
                       + (" (add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""))
    if not images.is_floating_point():
        raise ELFError(f"{what} must be float (normalized); got {images.dtype}. Convert uint8 images with x.float() / 255 and normalize")
    if images.shape[0] == 0:
        raise ELFError(f"{what} is empty")
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise ELFError(f"{what} contain NaN or inf values in {bad} image(s); fix or drop them before training")


def protocol_for_set(protocol: Protocol, learned_lr: float | None) -> Protocol:
    """The protocol a run on a set trains with: with ``learned_lr`` on (presets "mtt", "glad") and a set that
    learned its lr (``SyntheticSet.lr``), that lr; else ``protocol`` as it is. Records store this one."""
    if protocol.learned_lr and learned_lr is not None:
        return protocol.replace(lr=float(learned_lr), learned_lr=True)
    return protocol


def _not_logits(model_name: str, out: Any, when: str) -> str:
    """The error for a model whose forward returns something other than the logits tensor ``(B, K)``."""
    return (f"{model_name} returns a {type(out).__name__} {when}, not a logits tensor (B, num_classes): ELF trains and "
            "tests on the logits; wrap the model so that forward returns them (torchvision's googlenet / inception_v3: "
            "build with aux_logits=False, e.g. 'torchvision.googlenet:aux_logits=False')")
