"""Evaluation protocols: every number of an evaluation run, with the official ELF values as defaults.

Sources (see docs/trainer.md): the public ELF evaluation code (Dec 2023), which builds on DC/DSA's
``evaluate_synset``: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, ``Epoch = 1000`` with the loop running
``Epoch + 1`` epochs, lr x0.1 after epoch index ``Epoch // 2 + 1`` with the optimizer re-created (momentum reset),
DSA ``color_crop_cutout_flip_scale_rotate``, λ_front = λ_rear = 1, soft-target CE as the feature distance, test
accuracy once at the end.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ELFError

__all__ = ["Protocol", "PROTOCOLS", "PROTOCOL_FIELDS", "get_protocol", "seed_list", "ADAPTER_MODES", "ALIGN_MODES", "ELF_TERM_FIELDS"]
#: Protocol fields that act only through the ELF terms (a baseline run, with both lambdas 0, ignores them).
ELF_TERM_FIELDS = frozenset({"distance", "features_on_augmented", "rear_bn_stats_from_features", "adapter",
                             "align_targets"})

#: ``Protocol.adapter`` values: None (shapes must match, as in the paper), "auto" (adapters where they differ) or
#: "always" (learned projections even where the shapes are equal).
ADAPTER_MODES: tuple[str | None, ...] = (None, "auto", "always")
#: ``Protocol.align_targets``: off, every geometric DSA op, or flips only.
ALIGN_MODES: tuple[bool | str, ...] = (False, True, "flip")
#: Protocol fields that must be ``True`` or ``False`` (``align_targets`` also takes ``"flip"``, see ALIGN_MODES).
_BOOL_FIELDS: tuple[str, ...] = ("extra_epoch", "reset_optimizer_at_decay", "features_on_augmented",
                                 "rear_bn_stats_from_features", "learned_lr")


@dataclass(frozen=True)
class Protocol:
    """Training and evaluation settings; every number is a field. ``replace(**kw)`` returns a modified copy.

    Attributes:
        epochs: the official code's ``Epoch``. With ``extra_epoch`` (official) the loop runs ``epochs + 1`` passes.
        lr, momentum, weight_decay, batch_size: SGD settings (lr per step, batch in images).
        lr_decay_epoch: epoch index after which lr is multiplied by ``lr_decay``; ``None`` = ``epochs // 2 + 1``.
        reset_optimizer_at_decay: re-create SGD at the decay (momentum buffers reset), as the official code does.
        augment: DSA strategy for the student's images, ``None`` for none, or ``"dc:<ops>"`` for DC's per-image
            augmentation (:mod:`elf.dc_augment`, e.g. ``"dc:crop_noise"``). dsa_mode: "S" one op per batch.
        lambda_task, lambda_front, lambda_rear: loss weights; 0 switches a term off (λ_front = λ_rear = 0 is the
            plain baseline). distance: "ce" | "mse" | "mae" | "cos" | "cos-batch" (the official code's COS) or a callable ``(pred, target) -> scalar``.
        features_on_augmented: the front term's target is the teacher run on each augmented batch (teacher in the
            loop) instead of the features computed once on the un-augmented images (official); the rear term still
            reads those. Needs the teacher module, not only a bank (not for a baseline: with λ_front = 0 the
            teacher never runs).
        rear_bn_stats_from_features: True: the rear's pass on the teacher features F(x) also updates the running
            statistics of BatchNorm layers in the rear (what a train-mode call does; the official loop,
            preset ``"elf-official"``). False (library default, chosen on validation data; docs/protocols.md):
            those statistics follow the student's own path only, the one the model sees at test time (batch
            statistics are still used in the pass on F(x)). Models with no BatchNorm in the rear are unaffected.
        adapter: ``None`` (the student's feature at the cut must have the bank's shape, as in the paper) or
            ``"auto"``: when the shapes differ, learned adapters map the student's feature to the teacher's
            (front term) and the teacher's to the student's (rear term); see :mod:`elf.adapters`. They train with
            the model and are not part of it. ``"always"``: learned 1x1 projections both ways even for equal shapes.
        align_targets: apply the geometric part of each batch's DSA draw (crop, flip, scale, rotate) to the teacher
            feature maps too, so targets line up with the augmented images the student sees (official: off; the
            4x4 targets then stay un-augmented). The rear term then also sees the aligned maps. ``"flip"``: the
            flips only, which move a map exactly (crop shifts, scales and rotations resample a 4x4 map bilinearly).
        eval_batch_size: images per forward when testing.
        learned_lr: train with the set's learned lr (MTT/DATM ``lr_best.pt``) when it has one
            (:meth:`ELFTrainer.from_synthetic`); the official ELF code ignores it.
    """

    name: str = "elf"
    epochs: int = 1000
    extra_epoch: bool = True
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_epoch: int | None = None
    lr_decay: float = 0.1
    reset_optimizer_at_decay: bool = True
    augment: str | None = "color_crop_cutout_flip_scale_rotate"
    dsa_mode: str = "S"
    lambda_task: float = 1.0
    lambda_front: float = 1.0
    lambda_rear: float = 1.0
    distance: str | Callable[..., Any] = "ce"
    features_on_augmented: bool = False
    rear_bn_stats_from_features: bool = False
    adapter: str | None = None
    align_targets: bool | str = False
    eval_batch_size: int = 512
    learned_lr: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_MODES:
            raise ELFError(f"protocol adapter must be one of {ADAPTER_MODES}, got {self.adapter!r}")
        for name in _BOOL_FIELDS:  # a string "false" (a quoted YAML/TOML value) would count as true
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ELFError(f"protocol {name} must be True or False, got {value!r} ({type(value).__name__}): "
                               "pass a bool (in a TOML/YAML file, true or false unquoted)")
        if not isinstance(self.align_targets, (bool, str)) or self.align_targets not in ALIGN_MODES:
            raise ELFError(f"protocol align_targets must be one of {ALIGN_MODES} (True/False, or the string 'flip'), "
                           f"got {self.align_targets!r}")
        if not callable(self.distance):
            from .losses import DISTANCES

            if self.distance not in DISTANCES:
                raise ELFError(f"protocol distance must be one of {sorted(DISTANCES)} or a callable, got {self.distance!r}")
        from .dc_augment import DC_PREFIX, make_augmentation

        try:
            make_augmentation(self.augment, self.dsa_mode)
        except ELFError as e:
            raise ELFError(f"protocol augment {self.augment!r}: {e}") from None
        if self.align_targets and isinstance(self.augment, str) and self.augment.startswith(DC_PREFIX):
            raise ELFError(f"protocol align_targets needs a DSA strategy (whose geometric draws it applies to the teacher "
                           f"maps); augment {self.augment!r} is DC's augmentation: set align_targets off")
        if self.align_targets and self.features_on_augmented:
            raise ELFError("align_targets and features_on_augmented (--align-targets, --teacher-on-augmented) both make "
                           "targets match the augmented view: choose one")
        for name in ("epochs", "batch_size", "eval_batch_size", "lr_decay_epoch"):
            value = getattr(self, name)
            if value is None and name == "lr_decay_epoch":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ELFError(f"protocol {name} must be a whole number, got {value!r}")
            low = 0 if name in ("epochs", "lr_decay_epoch") else 1
            if value < low:
                raise ELFError(f"protocol {name} must be >= {low}, got {value}")
        for name in ("lr", "momentum", "weight_decay", "lr_decay", "lambda_task", "lambda_front", "lambda_rear"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ELFError(f"protocol {name} must be a finite number, got {value!r}")
            if name in ("lr", "lr_decay") and value <= 0:
                raise ELFError(f"protocol {name} must be > 0, got {value}")
            if value < 0:
                raise ELFError(f"protocol {name} must be >= 0, got {value}")

    @property
    def total_epochs(self) -> int:
        """Passes over the synthetic set: ``epochs + 1`` with the official extra epoch."""
        return self.epochs + (1 if self.extra_epoch else 0)

    @property
    def decay_epoch(self) -> int:
        """Epoch index after which the lr decays (official: ``epochs // 2 + 1``)."""
        return self.epochs // 2 + 1 if self.lr_decay_epoch is None else self.lr_decay_epoch

    def after_epoch(self, epoch: int, lr: float, opt: torch.optim.Optimizer,
                    new_optimizer: Callable[[float], torch.optim.Optimizer]) -> tuple[float, torch.optim.Optimizer]:
        """The learning rate and optimizer for the epoch after ``epoch``: at :attr:`decay_epoch` the lr is multiplied
        by ``lr_decay`` and either a fresh optimizer is made (``new_optimizer(lr)``, momentum dropped, when
        ``reset_optimizer_at_decay``) or ``opt``'s groups get the new lr; otherwise both are returned unchanged."""
        if epoch != self.decay_epoch:
            return lr, opt
        lr *= self.lr_decay
        if self.reset_optimizer_at_decay:
            return lr, new_optimizer(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr, opt

    @property
    def uses_features(self) -> bool:
        """True when a feature term is on (λ_front > 0 or λ_rear > 0)."""
        return self.lambda_front > 0 or self.lambda_rear > 0

    def replace(self, **changes: Any) -> Protocol:
        """A copy with some fields changed; unknown field names raise :class:`ELFError`.

        ``align_targets`` and ``features_on_augmented`` are two ways to make the front target match the augmented
        view: a change that turns one on without naming the other turns the other off (so ``elf-cross``, whose
        targets are aligned, takes ``features_on_augmented=True``); both turned on at once is an error. Likewise a
        change of ``lr`` without ``learned_lr`` turns ``learned_lr`` off: the lr you give is the lr that trains
        (``get_protocol("mtt", lr=0.005)`` ignores a set's learned lr)."""
        unknown = sorted(set(changes) - PROTOCOL_FIELDS)
        if unknown:
            raise ELFError(f"unknown protocol field(s) {unknown}; fields are {sorted(PROTOCOL_FIELDS)}")
        if changes.get("features_on_augmented") and "align_targets" not in changes:
            changes["align_targets"] = False
        if changes.get("align_targets") and "features_on_augmented" not in changes:
            changes["features_on_augmented"] = False
        if "lr" in changes and "learned_lr" not in changes:
            changes["learned_lr"] = False
        return dataclasses.replace(self, **changes)

    def baseline(self) -> Protocol:
        """The same protocol with both ELF terms off (plain training on the synthetic set)."""
        return self.replace(lambda_front=0.0, lambda_rear=0.0)

    def with_elf(self) -> Protocol:
        """This protocol with the ELF terms on: unchanged if either λ is set, else λ_front = λ_rear = 1 (official)."""
        return self if self.uses_features else self.replace(lambda_front=1.0, lambda_rear=1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (a callable distance is recorded by its name)."""
        out = dataclasses.asdict(self)
        if callable(self.distance):
            out["distance"] = getattr(self.distance, "__name__", repr(self.distance))
        return out


#: The names of :class:`Protocol`'s fields (what ``get_protocol``/``replace`` and study variants accept).
PROTOCOL_FIELDS = frozenset(f.name for f in dataclasses.fields(Protocol))

_OFFICIAL = Protocol(name="elf-official", rear_bn_stats_from_features=True,
                     notes="the public ELF evaluation code exactly (Dec 2023): ELF terms on, lr 0.01, 1000 epochs, DSA; "
                           "the rear's pass on F(x) also updates BatchNorm running statistics")
_ELF = _OFFICIAL.replace(name="elf", rear_bn_stats_from_features=False,
                         notes="the official ELF numbers (lr, epochs, schedule, DSA, λ) with one change: BatchNorm "
                               "running statistics of the rear follow the student's path only (library default, "
                               "chosen on validation data; same as elf-official for models without BatchNorm in the "
                               "rear, e.g. ConvNet)")

PROTOCOLS: dict[str, Protocol] = {
    "elf": _ELF,
    "elf-official": _OFFICIAL,
    "elf-cross": _ELF.replace(name="elf-cross", adapter="auto", align_targets=True,
                              notes="'elf' + learned adapters (any teacher for any student) + targets aligned with the "
                                    "student's DSA geometry: the best setting on validation data across ResNet-18, "
                                    "VGG-11 and ViT students among the cached-target loops (benchmarks/results/gpu-val-study); "
                                    "still the choice for the ViT"),
    "elf-aug": _ELF.replace(name="elf-aug", adapter="auto", features_on_augmented=True,
                            notes="'elf' + learned adapters + the teacher run on every augmented batch for the front "
                                  "target (exact for every DSA op; one teacher forward per step): the setting chosen "
                                  "on validation data for seven of the eight models of issue #9's table (ConvNet-BN, "
                                  "ResNet-18 IN/BN, VGG-11 IN/BN, AlexNet, torchvision's resnet18; "
                                  "benchmarks/gpu_chosen_table_study.toml)"),
    # the same training with the ELF terms off: how DSA / DM / MTT-era papers evaluate (DSA and DM code: 1000 epochs)
    "dsa": _ELF.replace(name="dsa", lambda_front=0.0, lambda_rear=0.0,
                             notes="DSA sets as the DC/DSA repository's main.py (which sets epoch_eval_train to 1000 "
                                   "for DSA), DM and ELF evaluate them: lr 0.01, 1000 (+1) epochs, DSA, no ELF terms"),
    "dm": _ELF.replace(name="dm", lambda_front=0.0, lambda_rear=0.0,
                            notes="DM public code main_DM.py: epoch_eval_train 1000, lr 0.01, DSA"),
    "dc": _ELF.replace(name="dc", epochs=300, augment=None, lambda_front=0.0, lambda_rear=0.0,
                            notes="DC/DSA repository main.py for a DC set and any student but ConvNet-BN: epoch_eval_train "
                                  "300, no augmentation (CIFAR); for a ConvNet-BN student use 'dc-aug'"),
    "dc-aug": _ELF.replace(name="dc-aug", augment="dc:crop_noise", lambda_front=0.0, lambda_rear=0.0,
                                notes="DC/DSA repository main.py for a DC set and a ConvNet-BN student: get_daparam's "
                                      "per-image crop/noise augmentation (elf.dc_augment), epoch_eval_train 1000"),
    "mtt": _ELF.replace(name="mtt", lambda_front=0.0, lambda_rear=0.0, learned_lr=True,
                             notes="MTT public code distill.py: epoch_eval_train 1000, learned lr when present, DSA, "
                                   "ZCA images evaluated in ZCA space"),
    "glad": _ELF.replace(name="glad", lambda_front=0.0, lambda_rear=0.0, learned_lr=True,
                              notes="as 'mtt' (GLaD builds on MTT's code base; not checked against GLaD's own scripts); GLaD sets are "
                                    "never ZCA'd"),
}


def get_protocol(protocol: Protocol | str | None, **overrides: Any) -> Protocol:
    """A :class:`Protocol` from a preset name (``"elf"``, ...) or an instance, with field overrides."""
    if protocol is None:
        protocol = "elf"
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ELFError(f"unknown protocol {protocol!r}; presets: {sorted(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    return protocol.replace(**overrides) if overrides else protocol


def seed_list(seeds: Any, what: str = "seeds") -> list[int]:
    """The seeds of an evaluation: an int ``k`` means ``0..k-1`` (``k >= 1``), else a non-empty sequence of whole
    numbers without repeats. Anything else (0 runs, a negative count, floats, an empty list) raises :class:`ELFError`,
    so a run count of 0 cannot report "nan ± nan"."""
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ELFError(f"{what}: the number of runs must be >= 1, got {seeds}")
        return list(range(int(seeds)))
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise ELFError(f"{what} must be a number of runs (>= 1) or a list of integer seeds, got {seeds!r}")
    out = list(seeds)
    if not out:
        raise ELFError(f"{what}: the list of seeds is empty; give at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in out):
        raise ELFError(f"{what} must be whole numbers, got {out!r}")
    if len(set(out)) != len(out):
        raise ELFError(f"{what} repeat a seed: {out!r}")
    return [int(s) for s in out]
