"""``elf study``: the paper's table for your own sets — synthetic sets x models x {baseline, ELF, ablations} x seeds.

A study is described by a TOML or YAML file (or a :class:`StudyConfig`); each run (one set, model, variant, seed)
writes ``<out>/runs/<run id>.json`` with every setting, versions, device, wall time and per-epoch history, so a
restarted study skips finished runs. References under the same protocol: a random real subset of the same size as
each set, and optionally the model trained on the full real training data. ``summarize`` writes ``summary.csv``,
``summary.md`` (mean ± std per cell and the ELF gain) and, with matplotlib, ``summary.png``.

Runs are split across processes with ``shard=(i, n)`` or, under ``torchrun``, by the torch.distributed rank.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DivergedError, ELFError
from .fileio import PathLike, atomic_write
from .run_lock import RunLock

__all__ = ["StudyConfig", "RunSpec", "load_config", "plan_runs", "plan_units", "run_study", "summarize", "distributed_shard",
           "stale_runs"]

RANDOM_REAL = "random-real"
VARIANT_KEYS = ("teacher", "split_at")  # what a variant may hold besides protocol fields
TEACHER_KEYS = {"checkpoint", "model", "point", "accuracy"}  # accuracy: the teacher's test accuracy (%), recorded in runs
FULL_DATA = "full-data"


@dataclass
class StudyConfig:
    """What to run. ``variants`` maps a name to protocol overrides; a variant is an ELF run when either λ is
    positive (``{}`` under the name ``"elf"`` gives the official ELF terms) and a baseline otherwise. A variant may
    name a ``teacher`` (a key of ``teachers``), e.g. to compare feature epochs; otherwise each model gets the
    teacher whose feature shape matches its split point (or, with ``adapter = "auto"``, the first teacher). Any
    field of a variant (or of ``overrides``) may be a table per model with ``"*"`` for the others, e.g. one
    ``chosen`` variant holding each model's setting picked on validation data.

    ``validation_per_class = k`` measures on ``k`` images per class held out from the real *training* data (seed 0)
    instead of the test set, for choosing settings; random-real references are then drawn from the rest.

    ``import = ["my_models", "models.py"]`` (``imports`` in Python) names modules that register models of your own
    (:func:`elf.register_model`); :func:`load_config` imports them, module names and ``.py`` paths taken from the
    study file's folder. Installed plugins (entry points ``elf_dd.models``) need no entry.

    ``channels_last = true`` trains and tests each run in the channels-last memory format (same numbers up to float
    rounding; batched cells ignore it); each run's record then has ``channels_last`` (True where it was used).

    ``checkpoint_minutes`` (default 10; 0 turns it off): a run trained one by one saves its state under
    ``<out>/partial/`` that often, and a restarted study resumes it there (:class:`elf.run_checkpoint.RunCheckpoint`;
    the record then lists ``resumed_at_epochs``). Batched cells train from the start again.

    ``also_test = true`` (with ``validation_per_class``) tests each trained model on the dataset's test split as well
    (``test_accuracy`` in its record, a second table in ``summary.md``): training does not depend on the held-out
    images, so one study gives the validation numbers to choose by and the test numbers to report."""

    sets: dict[str, str]
    models: list[str]
    data: str
    teachers: dict[str, dict[str, str]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    protocol: str = "elf"
    overrides: dict[str, Any] = field(default_factory=dict)
    normalization: str = "cifar10_mtt"
    random_real: bool = True
    full_data: bool = False
    test_per_class: int | None = None
    validation_per_class: int | None = None
    out: str = "study"
    name: str = "study"
    order: str = "cells"
    imports: list[str] = field(default_factory=list)
    batched: bool | int = False
    compile: bool = False
    channels_last: bool = False
    checkpoint_minutes: float = 10.0
    also_test: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        d = dict(d)
        if "import" in d:  # the TOML/YAML key; "import" is a Python keyword
            if "imports" in d:
                raise ELFError("a study takes 'import' or 'imports', not both")
            d["imports"] = d.pop("import")
        if isinstance(d.get("imports"), str):
            d["imports"] = [d["imports"]]
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ELFError(f"unknown study setting(s) {unknown}; known: {sorted(known)}")
        for key in ("sets", "models", "data"):
            if key not in d:
                raise ELFError(f"a study needs '{key}'")
        d = dict(d)
        if "seeds" in d:
            from .protocol import seed_list

            d["seeds"] = seed_list(d["seeds"], "study seeds")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self, running: bool = False) -> None:
        """Refuse, before anything runs, what would fail or mislead later: no seeds or models, a variant whose
        protocol numbers are out of range, a variant naming an unknown teacher; with ``running`` (as
        :func:`run_study` calls it) also an ELF variant in a study without teachers."""
        from .protocol import seed_list

        self.seeds = seed_list(self.seeds, "study seeds")
        if self.compile and not self.batched:
            raise ELFError("compile = true compiles the batched step: set batched = true as well")
        if not isinstance(self.batched, bool) and (not isinstance(self.batched, int) or self.batched < 1):
            raise ELFError(f"batched takes true/false or a number of seeds >= 1, got {self.batched!r}")
        if not isinstance(self.channels_last, bool):
            raise ELFError(f"channels_last takes true/false, got {self.channels_last!r}")
        if not isinstance(self.also_test, bool):
            raise ELFError(f"also_test takes true/false, got {self.also_test!r}")
        if self.also_test and not self.validation_per_class:
            raise ELFError("also_test = true adds test accuracies to a study measured on validation data: set "
                           "validation_per_class too (without it, runs are measured on the test split already)")
        if (isinstance(self.checkpoint_minutes, bool) or not isinstance(self.checkpoint_minutes, (int, float))
                or self.checkpoint_minutes < 0):
            raise ELFError(f"checkpoint_minutes takes a number of minutes >= 0 (0: no checkpoints inside runs), "
                           f"got {self.checkpoint_minutes!r}")
        if isinstance(self.models, tuple):
            self.models = list(self.models)
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise ELFError(f"models takes a list of model names, e.g. [\"ConvNet\", \"ResNet18BN\"], got {self.models!r}")
        if not isinstance(self.sets, dict) or not all(isinstance(v, (str, os.PathLike)) for v in self.sets.values()):
            raise ELFError(f"sets takes a table of name = file, e.g. [sets] dm = \"dm.safetensors\", got {self.sets!r}")
        self.sets = {k: os.fspath(v) for k, v in self.sets.items()}  # (Path objects from Python: as strings)
        for key in ("random_real", "full_data"):
            if not isinstance(getattr(self, key), bool):
                raise ELFError(f"{key} takes true/false, got {getattr(self, key)!r}")
        for key in ("test_per_class", "validation_per_class"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ELFError(f"{key} takes a number of images per class >= 1, got {value!r}")
        if not self.models:
            raise ELFError("a study needs at least one model in 'models'")
        if not self.sets:
            raise ELFError("a study needs at least one synthetic set in 'sets'")
        for name, t in self.teachers.items():
            if not isinstance(t, dict) or "checkpoint" not in t:
                raise ELFError(f"teacher {name!r} needs a 'checkpoint' (and usually a 'model')")
            unknown = sorted(set(t) - TEACHER_KEYS)
            if unknown:
                raise ELFError(f"teacher {name!r}: unknown key(s) {unknown}; a teacher takes {sorted(TEACHER_KEYS)}")
            if "accuracy" in t and not isinstance(t["accuracy"], (int, float)):
                raise ELFError(f"teacher {name!r}: accuracy must be a number (its test accuracy in %), got {t['accuracy']!r}")
        self._check_field_names()
        self._check_run_names()
        by_case = {m.lower(): m for m in self.models}
        for where, key, names in self.other_models():
            typos = [(n, by_case[n.lower()]) for n in names if n.lower() in by_case]
            if typos:  # a table shared with studies of other models is fine; a model spelt another way is not
                raise ELFError(f"{where}: {key} names {typos[0][0]!r}, but the study's model is {typos[0][1]!r}; a "
                               'per-model table takes model names exactly as listed in models ("*" for the others)')
        for variant, changes in self.variants.items():
            per_model = any(isinstance(v, dict) for v in {**self.overrides, **changes}.values())
            for model in self.models:
                where = f"variant {variant!r}" + (f" for {model}" if per_model else "")
                try:
                    proto, teacher, _ = _resolved_settings(self, variant, model)
                except ELFError as e:
                    raise ELFError(f"{where}: {e}") from None
                if teacher is not None and teacher not in self.teachers:
                    raise ELFError(f"{where} names teacher {teacher!r}, not one of {sorted(self.teachers)}")
                if running and proto.uses_features and not self.teachers:
                    raise ELFError(f"{where} uses the ELF terms but the study has no [teachers]; add one "
                                   "(checkpoint, model) or set lambda_front = lambda_rear = 0")

    def _check_run_names(self) -> None:
        """Every run needs a file of its own: names with ``__`` (the run id's separator), a set named like a reference
        (``full-data``, ``random-real:...``: its runs would train on real data) and two names that give one run id
        (``/`` becomes ``-`` in file names; case is ignored, as on macOS and Windows file systems) are refused."""
        for kind, names in (("set", list(self.sets)), ("model", list(self.models)), ("variant", list(self.variants))):
            bad = next((n for n in names if "__" in str(n)), None)
            if bad is not None:
                raise ELFError(f"{kind} name {bad!r} contains '__', which separates the parts of run ids "
                               f"(SET__MODEL__VARIANT__sSEED): rename it")
        reserved = next((s for s in self.sets if s.lower() == FULL_DATA or s.lower().startswith(RANDOM_REAL + ":")), None)
        if reserved is not None:
            raise ELFError(f"set name {reserved!r} is the name of a reference the study plans itself ({FULL_DATA!r}, "
                           f"{random_real_name(10)!r}, ...): its runs would train on real data; rename the set")
        seen: dict[str, tuple[str, str, str]] = {}
        for s in self.sets:
            for m in self.models:
                for v in self.variants:
                    key = RunSpec(s, m, v, 0).run_id.casefold()
                    if key in seen and seen[key] == (s, m, v):
                        raise ELFError(f"model {m!r} is listed twice in models")
                    if key in seen:
                        raise ELFError(f"(set, model, variant) {seen[key]} and {(s, m, v)} give the same run file "
                                       f"({RunSpec(s, m, v, 0).run_id}.json: '/' is written '-', case is ignored); "
                                       "rename one")
                    seen[key] = (s, m, v)

    def _check_field_names(self) -> None:
        """Every key of ``overrides`` and of each variant must name a protocol field (or ``teacher`` / ``split_at``)
        before per-model tables are resolved: a per-model table that names neither the model nor ``"*"`` is left
        out for that model, so a misplaced table would otherwise vanish without a word. The usual cause is a dot in
        a variant's name (TOML reads ``[variants.front0.3]`` as variant ``front0`` with a table ``3``)."""
        from .protocol import PROTOCOL_FIELDS

        allowed = PROTOCOL_FIELDS | set(VARIANT_KEYS)
        for name, changes in [(None, self.overrides), *self.variants.items()]:
            for key, value in changes.items():
                if key in allowed:
                    continue
                where, hint = "overrides" if name is None else f"variant {name!r}", ""
                if name is not None and isinstance(value, dict) and value and set(value) <= allowed:
                    hint = (f" (it holds protocol fields: TOML reads [variants.{name}.{key}] as a table {key!r} inside "
                            f'variant {name!r}; quote a name with a dot, [variants."{name}.{key}"], or drop the dot)')
                raise ELFError(f"{where}: unknown field {key!r}{hint}; fields are {sorted(allowed)}")

    def other_models(self) -> list[tuple[str, str, list[str]]]:
        """``(where, field, names)`` for per-model tables naming models this study does not have (a table shared
        with other studies; those entries are ignored here)."""
        out = []
        for where, changes in [("overrides", self.overrides)] + [(f"variant {v!r}", c) for v, c in self.variants.items()]:
            for key, value in changes.items():
                names = sorted(set(value) - set(self.models) - {"*"}) if isinstance(value, dict) else []
                if names:
                    out.append((where, key, names))
        return out


def load_config(path: PathLike) -> StudyConfig:
    """Read a study from ``.toml`` or ``.yaml``/``.yml``; relative paths in it are taken from the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ELFError(f"{p}: no such study file")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError as e:
                raise ELFError("reading TOML on Python 3.10 needs tomli: pip install tomli (or use YAML)") from e
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ELFError(f"{p}: not valid TOML ({e})") from None
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ELFError("reading YAML needs pyyaml: pip install 'elf-dd[yaml]' (or use TOML)") from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ELFError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        raise ELFError(f"{p}: a study file must end in .toml, .yaml or .yml")
    if not isinstance(raw or {}, dict):
        raise ELFError(f"{p}: a study file must hold settings (key = value), got {type(raw).__name__}")
    cfg = StudyConfig.from_dict(raw or {})
    base = p.parent

    def resolve(s: str) -> str:
        return s if s.lower() in ("cifar10", "cifar100") or Path(s).is_absolute() else str(base / s)

    cfg.sets = {k: resolve(v) for k, v in cfg.sets.items()}
    cfg.data = resolve(cfg.data)
    cfg.teachers = {k: {**v, "checkpoint": resolve(v["checkpoint"])} for k, v in cfg.teachers.items()}
    cfg.out = resolve(cfg.out)
    if cfg.imports:
        from .plugins import import_plugins

        import_plugins(cfg.imports, base_dir=base)
    return cfg


@dataclass(frozen=True)
class RunSpec:
    """One run: a synthetic set (or a reference), a model, a variant, a seed."""

    set: str
    model: str
    variant: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.set}__{self.model}__{self.variant}__s{self.seed}".replace("/", "-")


def _is_elf(cfg: StudyConfig, variant: str) -> bool:
    """Whether a variant uses the ELF terms for some model of the study (its λ as each model's settings give them,
    over the study's protocol: under ``protocol = "dsa"``, whose λ are 0, a variant ``{}`` is a baseline)."""
    return any(_resolved_settings(cfg, variant, m)[0].uses_features for m in cfg.models)


def _model_settings(cfg: StudyConfig, variant: str, model: str) -> dict[str, Any]:
    """A variant's fields over the study's ``overrides`` for one model. Any field may be a table per model
    (``{ "VGG11" = true, "*" = false }``): the model's entry, else ``"*"``'s; with neither, the field is left out
    (the study's ``overrides`` or the protocol's value applies; for ``split_at`` the model's default cut)."""
    def pick(fields: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in fields.items():
            if not isinstance(value, dict):
                out[key] = value
            elif model in value or "*" in value:
                out[key] = value.get(model, value.get("*"))
        return out

    return {**pick(cfg.overrides), **pick(cfg.variants.get(variant, {}))}


def _images_per_class(sset: Any) -> int:
    return int(sset.ipc or max(1, len(sset) // sset.num_classes))


def random_real_name(ipc: int) -> str:
    """The reference "set" name of a random real subset with ``ipc`` images per class, e.g. ``random-real:ipc10``."""
    return f"{RANDOM_REAL}:ipc{ipc}"


def plan_runs(cfg: StudyConfig, *, sets_at_hand: bool = False) -> list[RunSpec]:
    """Every run of the study in a fixed order (sets, models, variants, seeds; then references; with
    ``order = "seeds"`` the same runs sorted by seed, stably).

    Random-real references are planned once per distinct set size (``random-real:ipc10`` serves every 10-per-class
    set): the subset depends only on the size, so one per set would repeat identical runs. Planning them reads
    each set's size; ``sets_at_hand=True`` leaves out the sizes of set files that do not exist here (their sets'
    own runs are still planned) instead of failing on them.
    """
    runs = [RunSpec(s, m, v, seed) for s in cfg.sets for m in cfg.models for v in cfg.variants for seed in cfg.seeds]
    if cfg.order not in ("cells", "seeds"):
        raise ELFError(f"study order must be 'cells' or 'seeds', got {cfg.order!r}")
    ref_variant = _reference_variant(cfg)
    if ref_variant is None:  # the references train as baselines: with no baseline variant they have no column
        return _in_order(cfg, runs)
    if cfg.random_real:
        sizes = dict.fromkeys(_images_per_class(_load_set(cfg, path)) for path in cfg.sets.values()
                              if not sets_at_hand or Path(path).exists())
        runs += [RunSpec(random_real_name(n), m, ref_variant, seed) for n in sizes for m in cfg.models for seed in cfg.seeds]
    if cfg.full_data:
        runs += [RunSpec(FULL_DATA, m, ref_variant, seed) for m in cfg.models for seed in cfg.seeds]
    return _in_order(cfg, runs)


def _in_order(cfg: StudyConfig, runs: list[RunSpec]) -> list[RunSpec]:
    if cfg.order == "seeds":  # every cell's first seed before any cell's second: a study cut short has whole rows
        runs.sort(key=lambda r: cfg.seeds.index(r.seed))
    return runs


def _reference_variant(cfg: StudyConfig) -> str | None:
    """The variant the random-real and full-data references train under: the first baseline variant (no ELF terms;
    they have no teacher features), or None when the study has none (then no reference is planned)."""
    return next((v for v in cfg.variants if not _is_elf(cfg, v)), None)


DISTRIBUTED_TIMEOUT_S = 7 * 24 * 3600  # how long rank 0 waits at the end for the other ranks' runs


def distributed_shard() -> tuple[int, int]:
    """``(rank, world_size)`` from torch.distributed (initialized from torchrun's environment, each rank on
    ``cuda:LOCAL_RANK`` when CUDA is available), else ``(0, 1)``.

    The process group is made with a timeout of :data:`DISTRIBUTED_TIMEOUT_S` (torch's default, 10-30 minutes,
    would end rank 0's wait for slower ranks at the end of a study, and torchrun would then stop them mid-run)."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=DISTRIBUTED_TIMEOUT_S))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Resources:
    """Data, sets and feature banks, loaded once per process and only when a run needs them."""

    def __init__(self, cfg: StudyConfig, device: torch.device | None, log: Callable[[str], None]) -> None:
        from .evaluation import git_revision

        self.cfg, self.device, self.log = cfg, device, log
        self._cache: dict[str, Any] = {}
        self.git_revision = git_revision()  # the code that runs, read when the study starts ("+dirty": uncommitted changes)

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def norm(self) -> Any:
        from .pixel_space import get_normalization

        return get_normalization(self.cfg.normalization)

    def _load(self, which: str) -> Any:
        """The dataset's own ``"train"`` or ``"test"`` split."""
        from .data import default_download_root, load_cifar, load_dataset

        def make() -> Any:
            spec = self.cfg.data
            if spec.lower() in ("cifar10", "cifar100"):
                return load_cifar(spec.lower(), default_download_root(), train=which == "train")
            return load_dataset(spec, which, progress=False)

        return self._get(f"raw:{which}", make)

    def real(self, split: str) -> Any:
        """The real ``"train"`` or ``"test"`` images; with ``validation_per_class``, ``"train"`` is the training data
        without the held-out images and ``"test"`` the held-out validation images."""

        def make() -> Any:
            k = self.cfg.validation_per_class
            if not k:
                return self._load(split)
            rest, val = self._load("train").split_validation(k, torch.Generator().manual_seed(0))
            return rest if split == "train" else val

        return self._get(f"real:{split}", make)

    def test(self, set_name: str, final: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """What runs on ``set_name`` are measured on: images ``(N, C, H, W)`` in that set's pixel space (its
        normalization, ZCA-whitened when the set is) and labels ``(N,)`` numbered as the set numbers its classes (by
        name when it has names, as ``elf eval`` does). That is the validation split with ``validation_per_class``,
        unless ``final``: then (and without validation) the dataset's test split (or its ``test_per_class`` subset)."""
        validation = bool(self.cfg.validation_per_class) and not final
        split = "validation" if validation else "test"

        def real() -> Any:
            if validation:
                return self.real("test")
            t = self._load("test").with_classes(self.real("train").classes, "the test split")  # as training has them
            if self.cfg.test_per_class:
                t = t.per_class(self.cfg.test_per_class, torch.Generator().manual_seed(0))
            return t

        images = self._get(f"split:{split}", real)
        sset = self.synthetic(set_name)
        norm = sset.normalization

        def in_space() -> torch.Tensor:
            x = images.as_float(norm)
            return self.zca(norm).transform(x) if sset.zca else x

        x = self._get(f"images:{split}:{json.dumps([norm.to_dict(), sset.zca])}", in_space)
        y = self._get(f"labels:{split}:{set_name}", lambda: sset.label_real(images, f"the {split} split", self.log).labels)
        return x, y

    def zca(self, norm: Any) -> Any:
        """ZCA (eps 0.1) fit on the dataset's whole training split in ``norm``, as the code bases whiten (cached)."""
        from .pixel_space import fit_zca_cached

        return self._get(f"zca:{json.dumps(norm.to_dict())}", lambda: fit_zca_cached(self._load("train"), norm, eps=0.1))

    def synthetic(self, name: str) -> Any:
        from .synthetic import SyntheticSet

        def make() -> Any:
            if name.startswith(RANDOM_REAL + ":"):
                size = name.split(":", 1)[1]
                if not (size.startswith("ipc") and size[3:].isdigit()):
                    raise ELFError(f"reference {name!r}: expected {random_real_name(10)!r}-style names")
                sub = self.real("train").per_class(int(size[3:]), torch.Generator().manual_seed(0))
                return SyntheticSet(sub.as_float(self.norm()), sub.labels, normalization=self.norm(), classes=sub.classes,
                                    metadata={"method": "random real subset"})
            if name == FULL_DATA:
                train = self.real("train")
                return SyntheticSet(train.as_float(self.norm()), train.labels, normalization=self.norm(),
                                    classes=train.classes, metadata={"method": "full real training set"})
            sset = _load_set(self.cfg, self.cfg.sets[name])
            # classes that cannot match the real data's fail here, before training; a set without names gets theirs
            sset.label_real(self.real("train"), "the real training data")
            return sset

        return self._get(f"set:{name}", make)

    def set_sha256(self, name: str) -> str:
        """``content_sha256`` of a set as the runs get it (a random-real subset drawn from other data gets another)."""
        return self._get(f"sha256:{name}", lambda: self.synthetic(name).content_sha256())

    def teacher_of(self, set_name: str, bank: Any) -> dict[str, str]:
        """The study file's label of ``bank``'s teacher and the SHA-256 of its checkpoint file, for the record (a
        checkpoint replaced later makes the run stale, see :func:`stale_runs`)."""
        label = next(k for k, b in self.banks(set_name).items() if b is bank)
        return {"teacher_label": label, "teacher_checkpoint_sha256": self.file_sha256(self.cfg.teachers[label]["checkpoint"])}

    def data_source(self) -> dict[str, str] | None:
        """:func:`_data_source` of the study's real data, hashed once per process."""
        return self._get("data_source", lambda: _data_source(self.cfg))

    def file_sha256(self, path: str) -> str:
        """SHA-256 of a file (a teacher checkpoint), hashed once per process."""
        from .fileio import file_sha256

        return self._get(f"file:{path}", lambda: file_sha256(path))

    def banks(self, set_name: str) -> dict[str, Any]:
        from .feature_bank import FeatureBank

        def make() -> dict[str, Any]:
            sset = self.synthetic(set_name)
            out = {}
            for label, t in self.cfg.teachers.items():
                out[label] = FeatureBank.from_checkpoint(t["checkpoint"], t.get("model", "ConvNet"), sset, t.get("point"),
                                                         num_classes=sset.num_classes, device=self.device)
                if "accuracy" in t and "teacher_test_accuracy" not in out[label].metadata:
                    out[label].metadata.update(teacher_test_accuracy=str(t["accuracy"]),
                                               teacher_test_accuracy_source="study file")
                self.log(f"teacher {label}: features {out[label].shape} for {set_name}")
            return out

        return self._get(f"banks:{set_name}", make)


def _load_set(cfg: StudyConfig, path: str) -> Any:
    """A set file as every run of the study reads it (planning, training, the stale check alike): in the study's
    normalization where the file records none (MTT files, ``.npz``, image folders)."""
    from .io import load_assuming
    from .pixel_space import get_normalization

    norm = get_normalization(cfg.normalization)
    sset = load_assuming(path, norm)
    if sset.normalization is None:  # e.g. a DC result of a dataset without known statistics
        sset.normalization = norm
    return sset


def printed_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """``mean(a) - mean(b)`` of the means as printed (2 decimals each), so a table's numbers add up as read."""
    return round(float(np.mean(a)), 2) - round(float(np.mean(b)), 2)


def _resolved_settings(cfg: StudyConfig, variant: str, model: str) -> tuple[Any, str | None, str | None]:
    """``(protocol, teacher label, split point)`` the study file gives ``model`` in ``variant`` (over ``overrides``)."""
    from .protocol import get_protocol

    overrides = _model_settings(cfg, variant, model)
    teacher_label, split_at = (overrides.pop(key, None) for key in VARIANT_KEYS)
    return get_protocol(cfg.protocol, **overrides), teacher_label, split_at


def _decisive_fields(proto: Any, *, baseline_ignores_elf_terms: bool = False) -> dict[str, Any]:
    """The protocol fields that decide a run, JSON-normalized: not ``name`` and ``notes`` (which may be reworded);
    with ``baseline_ignores_elf_terms``, a protocol without ELF terms also leaves out the fields that act only
    through them."""
    from .protocol import ELF_TERM_FIELDS

    ignored = {"name", "notes"} | (ELF_TERM_FIELDS if baseline_ignores_elf_terms and not proto.uses_features else set())
    return json.loads(json.dumps({k: v for k, v in proto.to_dict().items() if k not in ignored}, default=str))


def _prepare(run: RunSpec, cfg: StudyConfig, res: _Resources) -> tuple[Any, Any, Any, Any] | dict[str, Any]:
    """``(protocol, set, bank, split_at)`` of a run, or its record when the paper's ELF cannot fill its cell. A bank
    holds its teacher module, which runs on every augmented batch when the protocol has ``features_on_augmented``."""
    from .evaluation import choose_bank
    from .trainer import protocol_for_set

    proto, teacher_label, split_at = _resolved_settings(cfg, run.variant, run.model)
    sset = res.synthetic(run.set)
    proto = protocol_for_set(proto, sset.lr)  # with a learned-lr preset, the set's lr: what trains and is recorded
    bank = None
    if proto.uses_features:
        banks = res.banks(run.set)
        if teacher_label is not None:
            if teacher_label not in banks:
                raise ELFError(f"variant {run.variant!r} names teacher {teacher_label!r}, not one of {sorted(banks)}")
            bank = banks[teacher_label]
        else:
            try:
                bank = choose_bank(run.model, tuple(sset.images.shape[1:]), sset.num_classes, list(banks.values()),
                                   split_at, proto.adapter)
            except ELFError as e:
                if proto.adapter is not None:
                    raise
                # the paper's ELF needs equal shapes: a cell it cannot fill is recorded as such, not as an error
                return {"run": asdict(run), "run_id": run.run_id, "accuracy": None, "not_applicable": str(e),
                        "protocol": proto.to_dict(), "study": cfg.name}
    return proto, sset, bank, split_at


def _record_context(cfg: StudyConfig, res: _Resources, set_name: str, bank: Any, trainer: Any) -> dict[str, Any]:
    """The fields every finished run's record shares: teacher and set metadata, environment, code revision, what
    it was measured on, and when it finished."""
    from .evaluation import environment

    return {"teacher": bank.metadata if bank is not None else None, "data": trainer.data_info,
            "set_sha256": res.set_sha256(set_name), **(res.teacher_of(set_name, bank) if bank is not None else {}),
            "environment": environment(res.device), "git_revision": res.git_revision, "study": cfg.name,
            "measured_on": _measured_on(cfg), "test_n": int(res.test(set_name)[1].shape[0]),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _final_test(accuracy: float, cfg: StudyConfig, res: _Resources, set_name: str) -> dict[str, Any]:
    """A run record's ``also_test`` fields: the accuracy (%) on the dataset's test split and its size."""
    return {"test_accuracy": accuracy, "test_accuracy_n": int(res.test(set_name, final=True)[1].shape[0]),
            "test_accuracy_on": "the dataset's test split" + (f", {cfg.test_per_class} per class"
                                                             if cfg.test_per_class else "")}


def _partial_folder(cfg: StudyConfig) -> Path:
    """Where runs in progress keep their checkpoints."""
    return Path(cfg.out) / "partial"


def _discard_partial(cfg: StudyConfig, run_id: str) -> None:
    """Remove a run's checkpoints once its record is written."""
    from .run_checkpoint import RunCheckpoint

    if _partial_folder(cfg).exists():
        RunCheckpoint(_partial_folder(cfg), run_id, 0, {}).discard()


def _execute(run: RunSpec, cfg: StudyConfig, res: _Resources, progress: bool) -> dict[str, Any]:
    from .evaluation import environment
    from .run_checkpoint import RunCheckpoint
    from .trainer import ELFTrainer

    prepared = _prepare(run, cfg, res)
    if isinstance(prepared, dict):
        return prepared
    proto, sset, bank, split_at = prepared
    ckpt = None
    if cfg.checkpoint_minutes:
        identity = {"model": run.model, "seed": run.seed, "set": run.set, "set_sha256": res.set_sha256(run.set),
                    "protocol": _decisive_fields(proto),
                    "split_at": split_at, "teacher": bank.metadata if bank is not None else None,
                    "channels_last": cfg.channels_last}
        ckpt = RunCheckpoint(_partial_folder(cfg), run.run_id, cfg.checkpoint_minutes * 60, identity, res.log)
    trainer = ELFTrainer.from_synthetic(run.model, sset, protocol=proto, feature_bank=bank, split_at=split_at,
                                        device=res.device, progress=progress, channels_last=cfg.channels_last,
                                        callbacks=[ckpt] if ckpt is not None else ())
    t0 = time.perf_counter()
    try:
        history = trainer.fit(run.seed, resume_from=ckpt.load() if ckpt is not None else None)
    except DivergedError as e:  # a diverged run is a result (recorded as failed), never given an accuracy
        seconds = time.perf_counter() - t0
        return {"run": asdict(run), "run_id": run.run_id, "accuracy": None, "failed": str(e),
                "wall_time_s": ckpt.total_seconds(seconds) if ckpt is not None else seconds,
                "protocol": proto.to_dict(), "study": cfg.name, **(res.teacher_of(run.set, bank) if bank is not None else {}),
                "environment": environment(res.device), "git_revision": res.git_revision,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    acc = trainer.evaluate(*res.test(run.set))
    test = _final_test(trainer.evaluate(*res.test(run.set, final=True)), cfg, res, run.set) if cfg.also_test else {}
    seconds = time.perf_counter() - t0
    resumed = ckpt.resumed_at if ckpt is not None else []
    if ckpt is not None:
        history, seconds = ckpt.full_history(history), ckpt.total_seconds(seconds)
    return {
        "run": asdict(run), "run_id": run.run_id, "accuracy": acc, "wall_time_s": seconds,
        "protocol": proto.to_dict(), "split_at": trainer.split_point or split_at,
        "adapters": repr(trainer.adapters) if trainer.adapters is not None else None,
        **({"channels_last": True} if cfg.channels_last else {}),
        **({"resumed_at_epochs": resumed} if resumed else {}), **test, "history": history,
        **_record_context(cfg, res, run.set, bank, trainer),
    }


def _execute_cell(runs: list[RunSpec], cfg: StudyConfig, res: _Resources, progress: bool) -> list[dict[str, Any]]:
    """The seeds of one cell (same set, model, variant) trained at once (``batched``); records as :func:`_execute`
    writes them. A cell whose batched run diverges is rerun seed by seed, so only the diverged seed is recorded failed;
    one whose model cannot be batched runs seed by seed through :func:`_execute`, each run with its checkpoints as
    without ``batched``."""
    from .trainer import ELFTrainer

    prepared = _prepare(runs[0], cfg, res)
    if isinstance(prepared, dict):
        return [{**prepared, "run": asdict(r), "run_id": r.run_id} for r in runs]
    proto, sset, bank, split_at = prepared
    trainer = ELFTrainer.from_synthetic(runs[0].model, sset, protocol=proto, feature_bank=bank, split_at=split_at,
                                        device=res.device, progress=progress, channels_last=cfg.channels_last)
    try:
        result = trainer.run(*res.test(runs[0].set), [r.seed for r in runs], batched=cfg.batched, compile=cfg.compile,
                             also_evaluate={"test": res.test(runs[0].set, final=True)} if cfg.also_test else None,
                             fall_back=False)
    except DivergedError:
        return [_execute(r, cfg, res, progress) for r in runs]
    why = result.data["batched"].get("fallback")
    if why is not None:
        res.log(f"{runs[0].set}/{runs[0].model}/{runs[0].variant}: batched seeds fall back to one run at a time: {why}")
        return [{**_execute(r, cfg, res, progress), "batched": {"fallback": why}} for r in runs]
    return [{
        "run": asdict(r), "run_id": r.run_id, "accuracy": result.accuracies[i], "wall_time_s": result.wall_time_s[i],
        "protocol": proto.to_dict(), "split_at": result.data.get("split_at") or split_at,
        "adapters": result.data.get("adapters"), "batched": result.data.get("batched"),
        **({"channels_last": result.data.get("channels_last")} if cfg.channels_last else {}),
        **(_final_test(result.also["test"][i], cfg, res, r.set) if cfg.also_test else {}), "history": result.histories[i],
        **_record_context(cfg, res, r.set, bank, trainer),
    } for i, r in enumerate(runs)]


def _measured_on(cfg: StudyConfig) -> str:
    """What a run's ``accuracy`` is measured on, as its record says: held-out validation images or the test split."""
    if cfg.validation_per_class:
        return f"validation: {cfg.validation_per_class} per class held out of the training data"
    return "test"


def _variant_settings(run: RunSpec, cfg: StudyConfig, set_lr: float | None = None) -> dict[str, Any]:
    """What the study file asks of ``run`` now: its protocol fields that decide the run (not name and notes; for a
    baseline, not the fields of the ELF terms), the set's learned lr under a learned-lr preset (``set_lr``), and its
    explicit split point."""
    from .trainer import protocol_for_set

    proto, teacher_label, split_at = _resolved_settings(cfg, run.variant, run.model)
    proto = protocol_for_set(proto, set_lr)
    return {"protocol": _decisive_fields(proto, baseline_ignores_elf_terms=True), "split_at": split_at,
            "teacher_label": teacher_label if proto.uses_features else None}


def _teacher_signature(cfg: StudyConfig, label: str, file_hash: Callable[[str], str]) -> dict[str, Any]:
    """What decides a teacher's features: its model, feature point and checkpoint file's SHA-256."""
    t = cfg.teachers[label]
    return {"model": t.get("model", "ConvNet"), "point": t.get("point"), "checkpoint_sha256": file_hash(t["checkpoint"])}


def _data_name(spec: str) -> str:
    """The real data as a record names it: ``cifar10`` / ``cifar100``, else the file or folder name (a study moved
    to another folder keeps its records)."""
    return spec.lower() if spec.lower() in ("cifar10", "cifar100") else Path(spec).name


def _data_source(cfg: StudyConfig) -> dict[str, str] | None:
    """The ``source_hash`` of the real data's train and test splits (an archive's or a folder's content, without
    decoding it), so that other data under the same name is found; None for torchvision's CIFAR downloads (fixed
    datasets) and for data not at hand."""
    from .data import image_folder_source_hash

    if cfg.data.lower() in ("cifar10", "cifar100") or not Path(cfg.data).expanduser().exists():
        return None
    return {split: image_folder_source_hash(cfg.data, split) for split in ("train", "test")}


def _asked(cfg: StudyConfig, run: RunSpec, used_teacher: str | None, file_hash: Callable[[str], str],
           data_source: dict[str, str] | None = None) -> dict[str, Any]:
    """What the study file asked of ``run`` beyond its protocol, for its record (``asked``) and :func:`stale_runs`:
    the split point as written (``None``: the model's default), the real data's name and content (``data_source``,
    :func:`_data_source`, when known), the normalization and ``test_per_class``; for an ELF run, the teachers its
    choice of teacher depended on (label and :func:`_teacher_signature`): the one a variant names, else the teachers
    tried in order up to the one used (all of them for a run no teacher fits)."""
    proto, named, split_at = _resolved_settings(cfg, run.variant, run.model)
    asked: dict[str, Any] = {"split_at": split_at, "data": _data_name(cfg.data), "normalization": cfg.normalization,
                             "test_per_class": cfg.test_per_class}
    if data_source is not None:
        asked["data_source"] = data_source
    if proto.uses_features:
        labels = list(cfg.teachers)
        if named is not None:
            considered = [named] if named in labels else []
        elif used_teacher in labels:
            considered = labels[:labels.index(used_teacher) + 1]  # the first teacher that fits is used
        else:
            considered = labels
        asked["teachers"] = [[label, _teacher_signature(cfg, label, file_hash)] for label in considered]
    return asked


def stale_runs(cfg: StudyConfig) -> list[tuple[str, str]]:
    """Finished runs whose record disagrees with the study file as it is now: ``(run id, first difference)``.

    A protocol field is compared when both the record and the current protocol have it (fields added to the library
    later are absent from old records), so a changed value (in the file, or a changed library default) is found,
    while a new field with its default is not. A record's split point is compared when the variant sets one, its
    teacher label when the variant names a teacher, and what its accuracy was measured on (validation or test); its
    set's content hash (sets of the file, not the references) and its teacher's checkpoint file hash when the record
    has them (records written since the evening of 2026-12-01; older ones are not compared on these): a set or
    teacher file replaced under the same name is found too. Records written since 2026-12-02 also hold what the study
    file ``asked`` (:func:`_asked`), compared in full: a split point set back to the default, another teacher list
    where the library chose the teacher (a teacher added before the one used, or one that now fits a run no teacher
    fitted), a teacher's ``point`` or model, other real data, normalization or ``test_per_class``. A set whose file is
    not at hand is not compared on its hash, and the random-real references of a size no set at hand has are not
    compared at all (their size cannot be read).
    """
    from .fileio import file_sha256

    out = Path(cfg.out) / "runs"
    stale = []
    set_hashes: dict[str, str] = {}
    set_lrs: dict[str, float | None] = {}
    file_hashes: dict[str, str] = {}
    sources: dict[str, dict[str, str] | None] = {}

    def load_set(name: str) -> None:
        if name not in set_hashes:
            if not Path(cfg.sets[name]).exists():  # a set file not at hand (e.g. under benchmarks/work/): not compared
                set_hashes[name], set_lrs[name] = "", None
                return
            sset = _load_set(cfg, cfg.sets[name])
            set_hashes[name], set_lrs[name] = sset.content_sha256(), sset.lr

    def set_hash(name: str) -> str:
        load_set(name)
        return set_hashes[name]

    def set_lr(name: str) -> float | None:
        if name not in cfg.sets:  # the random-real references: no learned lr
            return None
        load_set(name)
        return set_lrs[name]

    def teacher_file_hash(path: str) -> str:
        if path not in file_hashes:
            file_hashes[path] = file_sha256(path) if Path(path).is_file() else "(missing)"
        return file_hashes[path]

    def teacher_hash(label: str) -> str:
        return teacher_file_hash(cfg.teachers[label]["checkpoint"])

    def data_source() -> dict[str, str] | None:
        if "data" not in sources:  # (hashed once, and only when a record is compared)
            sources["data"] = _data_source(cfg)
        return sources["data"]

    for run in plan_runs(cfg, sets_at_hand=True):
        path = out / f"{run.run_id}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        want = _variant_settings(run, cfg, set_lr(run.set))
        saved = record.get("protocol") or {}
        why = next((f"{key}: recorded {saved[key]!r}, study file now {want['protocol'][key]!r}"
                    for key in sorted(set(saved) & set(want["protocol"])) if saved[key] != want["protocol"][key]), None)
        if why is None and want["split_at"] not in (None, "auto") and "split_at" in record \
                and record["split_at"] != want["split_at"]:
            why = f"split_at: recorded {record['split_at']!r}, study file now {want['split_at']!r}"
        if why is None and "measured_on" in record and record["measured_on"] != _measured_on(cfg):
            why = f"measured on {record['measured_on']!r}, the study file now asks for {_measured_on(cfg)!r}"
        if why is None and want["teacher_label"] is not None and record.get("teacher_label") not in (None, want["teacher_label"]):
            why = f"teacher: recorded {record['teacher_label']!r}, study file now {want['teacher_label']!r}"
        if why is None and "set_sha256" in record and run.set in cfg.sets and set_hash(run.set) \
                and record["set_sha256"] != set_hash(run.set):
            why = f"set {run.set!r}: {cfg.sets[run.set]} now holds other images or labels than the run trained on"
        label = record.get("teacher_label")
        if why is None and label is not None and record.get("teacher_checkpoint_sha256"):
            if label not in cfg.teachers:
                why = f"teacher {label!r} is no longer in the study file"
            elif record["teacher_checkpoint_sha256"] != teacher_hash(label):
                why = f"teacher {label!r}: {cfg.teachers[label]['checkpoint']} is not the checkpoint the run used"
        if why is None and isinstance(record.get("asked"), dict):
            now = _asked(cfg, run, record.get("teacher_label"), teacher_file_hash, data_source())
            if "data_source" in record["asked"] and "data_source" not in now:  # the data is not at hand: not compared
                now["data_source"] = record["asked"]["data_source"]
            why = next((f"{key}: recorded {value!r}, study file now {now.get(key)!r}"
                        for key, value in record["asked"].items() if now.get(key) != value), None)
            if why is not None and why.startswith("data_source:"):
                why = f"the real data {cfg.data} holds other images than the run was trained and measured on"
            if why is None and "teachers" in now and "teachers" not in record["asked"]:
                why = "teachers: the run was made without a teacher, the study file now gives it one"
        if why is not None:
            stale.append((run.run_id, why))
    return stale


def plan_units(cfg: StudyConfig) -> list[list[RunSpec]]:
    """The study's units of work, in order, as shards split them: with ``batched`` a cell's runs (one set, model and
    variant, every seed; they train together), else one run each."""
    if not cfg.batched:
        return [[r] for r in plan_runs(cfg)]
    cells: dict[tuple[str, str, str], list[RunSpec]] = {}
    for r in plan_runs(cfg):
        cells.setdefault((r.set, r.model, r.variant), []).append(r)
    return list(cells.values())


def _select(groups: list[list[RunSpec]], patterns: Sequence[str]) -> list[list[RunSpec]]:
    """The units with a run whose id matches one of ``patterns`` (shell-style, :mod:`fnmatch`)."""
    from fnmatch import fnmatchcase

    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = [g for g in groups if any(fnmatchcase(r.run_id, p) for r in g for p in patterns)]
    if not chosen:
        ids = [r.run_id for g in groups for r in g]
        shown = ", ".join(ids[:4]) + (f", ... ({len(ids)} in all)" if len(ids) > 4 else "")
        raise ELFError(f"--only {' '.join(patterns)}: no run of the study matches; its run ids are {shown} "
                       "(patterns are shell-style: * and ?, e.g. '*__VGG11__*__s2')")
    return chosen


def run_study(
    cfg: StudyConfig,
    *,
    shard: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_going: bool = False,
    only: Sequence[str] | None = None,
) -> list[Path]:
    """Run this process's share of the study; finished runs (their JSON exists) are skipped. Returns the run files.

    ``shard=(i, n)`` takes runs ``i, i + n, i + 2n, ...``; by default the torch.distributed rank and world size
    (torchrun) decide, and each rank uses ``cuda:LOCAL_RANK`` when CUDA is available. Rank 0 writes the summary once
    every rank has finished. ``keep_going``: a run that raises is logged and left unwritten (a restart retries it)
    instead of stopping this process. ``only``: shell-style patterns (:mod:`fnmatch`) on run ids, e.g.
    ``["*__VGG11__*__s2"]``: only the runs (with ``batched``, the cells) matching one of them are this study's work,
    before sharding; an error names the run ids when none matches.
    """
    distributed = shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    cfg.check(running=True)
    if (cfg.random_real or cfg.full_data) and _reference_variant(cfg) is None:
        log("note: no variant is a baseline (every one uses the ELF terms), so the random-real / full-data references, "
            "which train as baselines, are not planned; add a variant with lambda_front = lambda_rear = 0 for them")
    for name, t in cfg.teachers.items():  # now, not when the first ELF run starts (possibly after hours of baselines)
        if not Path(t["checkpoint"]).is_file():
            raise ELFError(f"teacher {name!r}: checkpoint {t['checkpoint']} does not exist (paths in a study file are "
                           "taken from the file's folder)")
    rank, world = shard if shard is not None else distributed_shard()
    if not 0 <= rank < world:
        raise ELFError(f"shard {rank}/{world} does not exist: use i/n with 0 <= i < n")
    if device is None and distributed and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dev = torch.device(device) if device is not None else None
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    stale = stale_runs(cfg)
    if stale:
        shown = "; ".join(f"{run_id} ({why})" for run_id, why in stale[:5])
        more = f" and {len(stale) - 5} more" if len(stale) > 5 else ""
        raise ELFError(f"{len(stale)} finished run(s) in {out / 'runs'} were made with other settings than the study "
                       f"file asks for now, and would be skipped and summarized as if they were not: {shown}{more}. "
                       "Set those values back, or move the files away (or change 'out') to run them again")
    for where, key, names in cfg.other_models():
        log(f"{where}: {key} has entries for {names}, not models of this study: ignored here")
    res = _Resources(cfg, dev, log)
    groups = plan_units(cfg)
    if only is not None:
        groups = _select(groups, only)
    groups = groups[rank::world]
    pending_runs = [r for group in groups for r in group if not (out / "runs" / f"{r.run_id}.json").exists()]
    if pending_runs:  # what runs are measured on, now: a test_per_class the data cannot give fails before training
        res.test(pending_runs[0].set)
        if cfg.also_test:
            res.test(pending_runs[0].set, final=True)
    files = [out / "runs" / f"{r.run_id}.json" for group in groups for r in group]
    for k, group in enumerate(groups, 1):
        pending = [r for r in group if not (out / "runs" / f"{r.run_id}.json").exists()]
        where = f"[{k}/{len(groups)}] {group[0].run_id}" + (f" (+{len(group) - 1} seeds)" if len(group) > 1 else "")
        if not pending:
            log(f"{where}: done, skipped")
            continue
        lock = RunLock(_partial_folder(cfg), [r.run_id for r in pending])
        held_by = lock.acquire()
        if held_by is not None:
            log(f"{where}: skipped, another process is running it ({held_by})")
            continue
        try:
            pending = [r for r in pending if not (out / "runs" / f"{r.run_id}.json").exists()]  # finished meanwhile
            if not pending:
                log(f"{where}: done, skipped")
                continue
            try:
                records = (_execute_cell(pending, cfg, res, progress) if cfg.batched
                           else [_execute(pending[0], cfg, res, progress)])
            except Exception as e:
                if not keep_going:
                    raise
                log(f"{where}: FAILED: {type(e).__name__}: {e}")
                continue
            by_id = {r.run_id: r for r in pending}
            for record in records:
                run = by_id[record["run_id"]]
                record["asked"] = _asked(cfg, run, record.get("teacher_label"), res.file_sha256, res.data_source())
                # (failed and not-applicable records too, so the stale check finds them as it finds finished ones)
                record.setdefault("set_sha256", res.set_sha256(run.set))
                record.setdefault("measured_on", _measured_on(cfg))
                path = out / "runs" / f"{record['run_id']}.json"
                atomic_write(path, lambda p, rec=record: Path(p).write_text(json.dumps(rec, indent=1, default=str)))
                _discard_partial(cfg, record["run_id"])
                tag = where if len(group) == 1 else f"{where}: {record['run_id']}"  # (a cell's seeds: each named)
                if record.get("failed"):
                    log(f"{tag} FAILED ({record['failed']})")
                elif record["accuracy"] is None:
                    log(f"{tag} not applicable ({record['not_applicable']})")
                else:
                    log(f"{tag} {record['accuracy']:.2f}% in {record['wall_time_s']:.0f} s")
        finally:
            lock.release()
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0 and (world == 1 or distributed):
        summarize(cfg)
    return files


def _in_study(cfg: StudyConfig, run: dict[str, Any], references: set[str] | None = None) -> bool:
    """Whether a record's run (``{"set", "model", "variant", ...}``) is of a set or reference, model and variant the
    study file has now (its seed is checked apart). A reference must be planned now: under the reference variant
    (:func:`_reference_variant`) and, given ``references`` (the planned reference names), one of them."""
    s = run["set"]
    if s in cfg.sets:
        return run["model"] in cfg.models and run["variant"] in cfg.variants
    planned = (cfg.random_real and s.startswith(RANDOM_REAL + ":")) or (cfg.full_data and s == FULL_DATA)
    return (planned and (references is None or s in references) and run["model"] in cfg.models
            and run["variant"] == _reference_variant(cfg))


def _mean_std(xs: Sequence[float]) -> str:
    return f"{np.mean(xs):.2f} ± {np.std(xs):.2f}" if xs else "-"


def _seeds_short(n_runs: int, n_seeds: int) -> str:
    """``" (2 of 3 seeds)"`` for a cell with some but not all of its runs finished, else ``""``."""
    return f" ({n_runs} of {n_seeds} seeds)" if 0 < n_runs < n_seeds else ""


def summarize(cfg: StudyConfig) -> Path:
    """Collect every run JSON of the study into ``summary.csv``, ``summary.md`` and (with matplotlib) ``summary.png``."""
    out = Path(cfg.out)
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    # the references planned now (their sizes read from the sets; any reference while a set file is not at hand)
    references = ({r.set for r in plan_runs(cfg) if r.set not in cfg.sets}
                  if all(Path(p).exists() for p in cfg.sets.values()) else None)
    leftovers = sorted(r["run_id"] for r in records if not _in_study(cfg, r["run"], references))
    records = [r for r in records if _in_study(cfg, r["run"], references)]  # (since removed from the study: not counted)
    other_seeds = sorted({r["run"]["seed"] for r in records} - set(cfg.seeds))
    records = [r for r in records if r["run"]["seed"] in cfg.seeds]  # the tables say which seeds they average
    not_applicable = {(r["run"]["set"], r["run"]["model"], r["run"]["variant"]) for r in records
                      if r.get("accuracy") is None and not r.get("failed")}
    unfinished = [r for r in records if r.get("accuracy") is None]  # failed or not applicable: csv rows all the same
    failed: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r.get("failed"):
            key = (r["run"]["set"], r["run"]["model"], r["run"]["variant"])
            failed[key] = failed.get(key, 0) + 1
    records = [r for r in records if r.get("accuracy") is not None]
    acc: dict[tuple[str, str, str], list[float]] = {}
    test_acc: dict[tuple[str, str, str], list[float]] = {}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["set", "model", "variant", "seed", "accuracy", "wall_time_s", "epochs", "lambda_front", "lambda_rear",
                     "distance", "test_accuracy", "status"])
    seeds: dict[tuple[str, str, str], list[int]] = {}
    for r in records + unfinished:
        run, p = r["run"], r.get("protocol") or {}
        test = r.get("test_accuracy")
        done = r.get("accuracy") is not None
        status = "ok" if done else (f"failed: {r['failed']}" if r.get("failed") else "not applicable")
        writer.writerow([run["set"], run["model"], run["variant"], run["seed"], f"{r['accuracy']:.4f}" if done else "",
                         f"{r['wall_time_s']:.1f}" if "wall_time_s" in r else "", p.get("epochs", ""),
                         p.get("lambda_front", ""), p.get("lambda_rear", ""), p.get("distance", ""),
                         "" if test is None else f"{test:.4f}", status])
        if not done:
            continue
        acc.setdefault((run["set"], run["model"], run["variant"]), []).append(r["accuracy"])
        seeds.setdefault((run["set"], run["model"], run["variant"]), []).append(run["seed"])
        if test is not None:
            test_acc.setdefault((run["set"], run["model"], run["variant"]), []).append(test)
    atomic_write(out / "summary.csv", lambda t: Path(t).write_text(buf.getvalue()))

    set_names = list(cfg.sets) + [s for s in dict.fromkeys(k[0] for k in acc) if s not in cfg.sets]
    measured = (f"Validation accuracy ({cfg.validation_per_class} images per class held out of the real training data)"
                if cfg.validation_per_class else "Test accuracy")
    lines = [f"# {cfg.name}", "", f"{measured} (%), mean ± std over seeds {cfg.seeds}; protocol {cfg.protocol!r}"
             + (f" with {cfg.overrides}" if cfg.overrides else "") + ".", ""]
    lines += _table(cfg, acc, set_names, not_applicable, failed, seeds)
    if other_seeds:
        lines += ["", f"(Runs of seeds {other_seeds} are in `runs/` but not in the study's seeds: not counted above.)"]
    if leftovers:
        shown = ", ".join(leftovers[:3]) + (f", ... ({len(leftovers)} in all)" if len(leftovers) > 3 else "")
        lines += ["", f"(Runs in `runs/` of sets, references, models or variants the study file no longer has: not "
                      f"counted above: {shown}.)"]
    try:
        stale = stale_runs(cfg)
    except ELFError as e:  # e.g. a set file that is not here: summarizing needs only the run files
        stale, unchecked = [], str(e)
    else:
        unchecked = ""
    if stale:
        lines += ["", f"**Warning:** {len(stale)} run(s) above were made with other settings than the study file now "
                  "asks for: " + "; ".join(f"{run_id} ({why})" for run_id, why in stale)]
    if unchecked:
        lines += ["", f"(Runs not compared with the study file: {unchecked}.)"]
    if test_acc:
        lines += ["", "Test accuracy (%) of the same runs (`also_test`) on the dataset's test split"
                  + (f" ({cfg.test_per_class} images per class)" if cfg.test_per_class else " (all of it)")
                  + ": for reporting; settings are chosen on the validation table above.", ""]
        lines += _table(cfg, test_acc, set_names, not_applicable, failed, seeds)
    atomic_write(out / "summary.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))
    _plot(cfg, acc, set_names, out / "summary.png")
    return out / "summary.md"


def _table(cfg: StudyConfig, acc: dict[tuple[str, str, str], list[float]], set_names: list[str],
           not_applicable: set[tuple[str, str, str]], failed: dict[tuple[str, str, str], int],
           seeds: dict[tuple[str, str, str], list[int]]) -> list[str]:
    """Markdown rows: one per set and model, mean ± std per variant, and the ELF gain (first ELF variant minus the
    first baseline variant). A cell with fewer finished runs than the study has seeds says how many it averages,
    and a gain over cells of other seeds says so (their numbers, or "other seeds" when only the seeds differ)."""
    variants = list(cfg.variants)
    baseline = next((v for v in variants if not _is_elf(cfg, v)), None)
    elf_variant = next((v for v in variants if _is_elf(cfg, v)), None)
    gain = baseline is not None and elf_variant is not None
    # the header names the two variants: with several ELF variants, the gain is the first one's, not the best's
    lines = ["| set | model | " + " | ".join(variants) + (f" | ELF gain ({elf_variant} − {baseline}) |" if gain else " |"),
             "|---|---|" + "---|" * (len(variants) + (1 if gain else 0))]
    for s in set_names:
        for m in cfg.models:
            cells = ["n/a" if (s, m, v) in not_applicable and (s, m, v) not in acc else _mean_std(acc.get((s, m, v), []))
                     + (f" ({failed[(s, m, v)]} failed)" if (s, m, v) in failed else "")
                     + _seeds_short(len(acc.get((s, m, v), [])) + failed.get((s, m, v), 0), len(cfg.seeds))
                     for v in variants]
            if not any(c not in ("-", "n/a") for c in cells):
                continue
            row = f"| {s} | {m} | " + " | ".join(cells)
            if gain:
                b, e = acc.get((s, m, baseline)), acc.get((s, m, elf_variant))
                row += f" | {printed_difference(e, b):+.2f}" if b and e else " | -"
                if b and e and len(b) != len(e):  # not the same seeds on both sides: the gain mixes seed effects
                    row += f" ({len(e)} vs {len(b)} runs)"
                elif b and e and sorted(seeds[(s, m, elf_variant)]) != sorted(seeds[(s, m, baseline)]):
                    row += " (other seeds)"
            lines.append(row + " |")
    return lines


def _plot(cfg: StudyConfig, acc: dict[tuple[str, str, str], list[float]], set_names: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(s, m) for s in set_names for m in cfg.models if any((s, m, v) in acc for v in cfg.variants)]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / max(1, len(cfg.variants))
    for j, v in enumerate(cfg.variants):
        means = [np.mean(acc[(s, m, v)]) if (s, m, v) in acc else np.nan for s, m in rows]
        stds = [np.std(acc[(s, m, v)]) if (s, m, v) in acc else 0 for s, m in rows]
        ax.bar(np.arange(len(rows)) + j * width, means, width, yerr=stds, label=v, capsize=2)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}\n{m}" for s, m in rows], fontsize=7)
    ax.set_ylabel("validation accuracy (%)" if cfg.validation_per_class else "test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)


def main_study(config: PathLike, shard: str | None, device: str | None, progress: bool, summarize_only: bool,
               only: Sequence[str] | None = None) -> int:
    """What ``elf study`` does (kept here so the CLI module stays small)."""
    cfg = load_config(config)
    if summarize_only:
        print(summarize(cfg).read_text())
        return 0
    parsed = None
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ELFError(f"--shard takes i/n (e.g. 0/4), got {shard!r}") from None
        parsed = (i, n)
    run_study(cfg, shard=parsed, device=device, progress=progress, log=lambda s: print(s, file=sys.stderr), only=only)
    summary = Path(cfg.out) / "summary.md"
    rank = int(os.environ.get("RANK", "0")) if parsed is None else 0
    if summary.exists() and (parsed is None or parsed[1] == 1) and rank == 0:  # (torchrun: rank 0 wrote it last)
        print(summary.read_text())
    elif parsed is not None:
        print(f"shard {parsed[0]}/{parsed[1]} done; run `elf study {config} --summarize` when every shard has finished")
    return 0
