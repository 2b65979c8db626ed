"""Baseline vs ELF for several evaluation models on one synthetic set: the paper's table, as a function.

:func:`compare_models` picks, for each model, the feature bank whose per-image shape equals the model's front
output at its split point (so a ConvNet student gets the width-128 teacher and ResNet-18 the width-512 one).
"""

from __future__ import annotations

import difflib
import functools
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ELFError
from .feature_bank import FeatureBank
from .losses import check_test_labels, prepare_targets
from .models import build_model, default_split_point, has_default_split_point
from .protocol import Protocol, get_protocol, seed_list
from .split import SplitOptions, list_split_points, split_model
from .synthetic import SyntheticSet
from .trainer import ELFTrainer, EvalResult, cannot_run, protocol_for_set

__all__ = ["ModelComparison", "compare_models", "front_shape", "pick_bank", "choose_bank", "format_table", "environment",
           "git_revision"]


@dataclass
class ModelComparison:
    """Results of one evaluation model: ``baseline`` and ``elf`` (either may be absent), and the split used."""

    model: str
    split_at: str | None
    baseline: EvalResult | None = None
    elf: EvalResult | None = None
    bank: dict[str, str] = field(default_factory=dict)

    @property
    def gain(self) -> float | None:
        """ELF mean minus baseline mean, in accuracy points, over the same seeds; None when either is absent or they
        hold other seeds (an interrupted comparison: the means of unpaired seeds can even flip the gain's sign)."""
        if self.baseline is None or self.elf is None or sorted(self.baseline.seeds) != sorted(self.elf.seeds):
            return None
        return self.elf.mean - self.baseline.mean

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelComparison:
        """The row :meth:`to_dict` wrote (e.g. read back from an ``elf eval --out`` file to resume it)."""
        def result(r: dict[str, Any] | None) -> EvalResult | None:
            if r is None:
                return None
            return EvalResult(r["model"], list(r["accuracies"]), list(r["seeds"]), dict(r["protocol"]),
                              list(r.get("wall_time_s", [])), list(r.get("histories", [])), dict(r.get("data", {})),
                              {k: list(v) for k, v in (r.get("also") or {}).items()})

        try:
            return cls(d["model"], d.get("split_at"), result(d.get("baseline")), result(d.get("elf")),
                       dict(d.get("feature_bank") or {}))
        except (KeyError, TypeError) as e:
            raise ELFError(f"not a result row written by compare_models (missing or bad {e})") from e

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "split_at": self.split_at,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "elf": self.elf.to_dict() if self.elf else None,
            "gain": self.gain,
            "feature_bank": self.bank,
        }


def front_shape(model_name: str | torch.nn.Module, image_shape: Sequence[int], num_classes: int,
                split_at: str | None = None, options: SplitOptions | None = None) -> tuple[int, ...]:
    """Per-image output shape of a model's front at ``split_at`` (default point) for ``(C, H, W)`` inputs; the model
    is a name for :func:`~elf.create_model` or an already built module (run in eval mode, then left so)."""
    c, h, w = image_shape
    model = build_model(model_name, (c, h, w), num_classes, fresh=False).eval()
    front = split_model(model, split_at or default_split_point(model), options=options).front
    with torch.no_grad():
        try:
            return tuple(front(torch.zeros(1, c, h, w)).shape[1:])
        except RuntimeError as e:  # (as the trainer says it)
            name = model_name if isinstance(model_name, str) else type(model).__name__
            raise cannot_run(name, (c, h, w), e) from e


def pick_bank(shape: tuple[int, ...], banks: Sequence[FeatureBank]) -> FeatureBank | None:
    """The first bank whose per-image feature shape equals ``shape``."""
    return next((b for b in banks if b.shape == shape), None)


def choose_bank(
    model_name: str,
    image_shape: Sequence[int],
    num_classes: int,
    banks: Sequence[FeatureBank],
    split_at: str | None = None,
    adapter: str | None = None,
    options: SplitOptions | None = None,
) -> FeatureBank:
    """The bank an ELF run of ``model_name`` uses: one whose shape the model's front gives at ``split_at`` (default
    point; for ``"auto"``, at any point); else, with ``adapter="auto"``, the first bank (adapters bridge the shapes).

    Raises :class:`ELFError` naming the model's shape, the banks' shapes and what to do.
    """
    if not banks:
        raise ELFError(f"ELF for {model_name} needs a teacher feature bank; none was given")
    model = build_model(model_name, tuple(image_shape), num_classes)  # type: ignore[arg-type]
    if split_at is None and not has_default_split_point(model):
        split_at = "auto"  # as ELFTrainer does for models without a default cut
    if split_at == "auto":  # a bank that some point gives exactly (auto_split_point's first rule)
        shapes = {p.shape for p in list_split_points(model, tuple(image_shape), options=options)}
        bank = next((b for b in banks if b.shape in shapes), None)
        if bank is not None:
            return bank
        shape: tuple[int, ...] | str = "no exact match at any point"
    else:
        shape = front_shape(model, image_shape, num_classes, split_at, options)
        bank = pick_bank(shape, banks)
        if bank is not None:
            return bank
    if adapter is not None:
        return banks[0]
    have = ", ".join(f"{b.metadata.get('teacher_model', '?')} {b.shape}" for b in banks)
    convnet_grid = tuple(int(s) // 8 for s in tuple(image_shape)[1:])  # a depth-3 ConvNet's last block
    example = (f" (e.g. ConvNetW{shape[0]})" if isinstance(shape, tuple) and len(shape) == 3 and shape[1:] == convnet_grid
               else "")
    raise ELFError(
        f"no teacher feature bank matches {model_name}'s front output {shape} (banks: {have}); pass adapter='auto' "
        f"(--adapter auto) to bridge the shapes with learned adapters, add a teacher of that feature shape{example}, "
        "or choose another split point"
    )


def compare_models(
    models: Sequence[str],
    images: Any,
    labels: torch.Tensor | None,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    banks: Sequence[FeatureBank] = (),
    protocol: Protocol | str = "elf",
    seeds: int | Sequence[int] = 5,
    baseline: bool = True,
    elf: bool = True,
    split_at: dict[str, str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    split_options: SplitOptions | None = None,
    previous: Sequence[ModelComparison] = (),
    on_update: Callable[[list[ModelComparison]], None] | None = None,
    batched: bool | int = False,
    compile: bool = False,
    channels_last: bool = False,
    **overrides: Any,
) -> list[ModelComparison]:
    """Evaluate each model with the plain baseline and with ELF under the same protocol and seeds.

    Args:
        models: model names for :func:`~elf.create_model`.
        images, labels: the synthetic set ``(N, C, H, W)`` and its labels, or a loaded
            :class:`~elf.synthetic.SyntheticSet` and ``None`` (its metadata and learned lr then flow into the results).
        test_images, test_labels: real test data ``(M, C, H, W)``, normalized like ``images``, and ``(M,)``.
        banks: teacher feature banks; each model uses the one matching its front shape.
        protocol, overrides: the evaluation protocol (default: official ELF) and single-field changes.
        seeds: number of runs or explicit seeds. baseline, elf: which of the two to run.
        split_at: per-model split point (default: each model's ``elf_split_point``; ``"auto"``: chosen for the bank).
            A model without a bank of its front shape uses the first bank when the protocol has ``adapter="auto"``.
        split_options: leaf modules and autowrap functions for every trace (see :class:`~elf.SplitOptions`).
        previous: rows of an earlier, interrupted call with the same settings: runs (model, method, seed) found there
            are kept as they are, not trained again (``elf eval --resume``).
        on_update: called with every row so far (the current one included, partly done) after each finished run;
            ``elf eval --out`` writes its JSON there so an interruption loses at most the run in progress.
        batched: train the seeds of each (model, method) at once as one vectorized model, or in groups of that
            many (``ELFTrainer.run(batched=...)``, :mod:`elf.batched`); they then finish, and are reported, together.
            ``compile``: with ``batched``, also wrap the vectorized step in ``torch.compile``.
        channels_last: train and test sequential runs in the channels-last memory format
            (``ELFTrainer(channels_last=)``; same numbers up to float rounding; batched seeds ignore it); recorded in
            each result's ``data``.

    Everything that can be checked without training is checked before the first run: the protocol's numbers, the
    seeds, the test labels against the set's classes and, for every model, that it builds and that a feature bank
    fits its cut (so a later model's mismatch does not surface after the earlier ones trained).
    """
    proto = get_protocol(protocol, **overrides)
    seeds = seed_list(seeds, "seeds")
    split_at = _split_points_by_model(split_at or {}, models)
    synthetic = images if isinstance(images, SyntheticSet) else None
    if synthetic is not None:
        images, labels = synthetic.images, synthetic.labels
    if labels is None:
        raise ELFError("labels are required unless images is a SyntheticSet")
    _, _, num_classes = prepare_targets(labels)
    if synthetic is not None:
        num_classes = synthetic.num_classes
    check_test_labels(test_labels, num_classes)
    if not baseline and not elf:
        raise ELFError("nothing to run: baseline and elf are both off")
    if compile and not batched:
        raise ELFError("compile=True compiles the batched step: pass batched=True as well")

    def trainer(name: str, p: Protocol, **kw: Any) -> ELFTrainer:
        if synthetic is not None:
            return ELFTrainer.from_synthetic(name, synthetic, protocol=p, device=device, progress=progress,
                                             split_options=split_options, channels_last=channels_last, **kw)
        return ELFTrainer(name, images, labels, protocol=p, device=device, progress=progress, split_options=split_options,
                          channels_last=channels_last, **kw)

    # pre-flight: every model builds and, for ELF, has a bank for its cut, before anything trains
    image_shape = tuple(images.shape[1:])
    elf_proto = proto.with_elf()
    chosen: dict[str, FeatureBank] = {}
    for name in models:
        if elf:
            chosen[name] = choose_bank(name, image_shape, num_classes, banks, split_at.get(name), elf_proto.adapter,
                                       split_options)
            alike = [b for b in banks if b.shape == chosen[name].shape]
            if len(alike) > 1:
                log(f"[{name}] {len(alike)} teachers give features {chosen[name].shape}: the first given is used "
                    f"({_teacher_name(chosen[name])})")
        else:
            build_model(name, image_shape, num_classes)  # type: ignore[arg-type]
    before = {r.model: r for r in previous}
    for row in previous:  # (before anything trains) a resume must not drop finished runs
        for method in ("baseline", "elf"):
            result = getattr(row, method)
            left_out = sorted(set(result.seeds) - set(seeds)) if result is not None else []
            if left_out and row.model in models:
                raise ELFError(f"the earlier {method} results of {row.model} hold seeds {left_out} that seeds "
                               f"{seeds} leave out, and would be dropped: include them (elf eval: a --runs that "
                               "covers them), or start over elsewhere")
    for name, bank in chosen.items():  # (before anything trains) earlier ELF seeds must come from the same bank
        earlier = before.get(name)
        now = _bank_info(bank)
        if earlier is not None and earlier.elf is not None and earlier.bank \
                and any(now.get(k, "") != v for k, v in earlier.bank.items() if k != "teacher_checkpoint"):
            # (keys a record predates are not compared, nor where the checkpoint file lies: its hash is)
            raise ELFError(f"the earlier ELF results of {name} were computed with another feature bank "
                           f"({earlier.bank} vs {_bank_info(bank)}); start over instead of resuming")

    out: list[ModelComparison] = []

    def evaluate(row: ModelComparison, method: str, p: Protocol, make: Callable[[], ELFTrainer]) -> EvalResult:
        """Run the seeds of one (model, method) not found in ``previous``, reporting after each one."""
        old = getattr(before.get(row.model), method, None)
        trained = protocol_for_set(p, synthetic.lr if synthetic is not None else None)  # the lr that trains, recorded
        # (results written before the learned lr was recorded carry the preset's: the same training)
        if old is not None and old.protocol not in (trained.to_dict(), p.to_dict()):
            raise ELFError(f"the earlier {method} results of {row.model} were computed with another protocol; "
                           "start over instead of resuming")
        done = {s: i for i, s in enumerate(old.seeds)} if old is not None else {}
        result = EvalResult(row.model, [], [], trained.to_dict(), data=dict(old.data) if old is not None else {})
        setattr(row, method, result)
        made: ELFTrainer | None = None
        todo = [s for s in seeds if s not in done]
        together = None
        if batched and todo:
            together = make().run(test_images, test_labels, todo, batched=batched, compile=compile)
        for seed in seeds:
            if seed in done and old is not None:
                one = _seed_result(old, done[seed])
            elif together is not None:
                one = _seed_result(together, todo.index(seed))
            else:
                if made is None:
                    made = make()
                one = made.run(test_images, test_labels, [seed])
            result.accuracies += one.accuracies
            result.seeds += one.seeds
            result.wall_time_s += one.wall_time_s
            result.histories += one.histories
            result.data.update(one.data)
            if on_update is not None and seed not in done:
                on_update([*out, row])
        return result

    for name in models:
        point = split_at.get(name)
        row = ModelComparison(name, point)
        if baseline:
            log(f"[{name}] baseline ({proto.total_epochs} epochs x {len(seeds)} runs)")
            evaluate(row, "baseline", proto.baseline(), lambda: trainer(name, proto.baseline()))
            log(f"[{name}] baseline: {row.baseline}")
        if elf:
            bank = chosen[name]
            row.bank = _bank_info(bank)
            log(f"[{name}] ELF with {_teacher_name(bank)} features {bank.shape}"
                + (" (adapters where shapes differ)" if elf_proto.adapter else ""))
            evaluate(row, "elf", elf_proto, lambda: trainer(name, elf_proto, feature_bank=bank, split_at=point))
            assert row.elf is not None
            row.split_at = row.elf.data.get("split_at")
            log(f"[{name}] ELF: {row.elf}")
        out.append(row)
    return out


def _split_points_by_model(split_at: dict[str, str], models: Sequence[str]) -> dict[str, str]:
    """``split_at`` keyed by the names in ``models``; a key naming no model (a typo, or another capitalization when
    it matches no model exactly) is refused, not left unused while the model runs at its default cut."""
    out: dict[str, str] = {}
    for key, point in split_at.items():
        if key in models:
            out[key] = point
            continue
        same = [m for m in models if m.lower() == key.lower()]
        if len(same) != 1:
            close = difflib.get_close_matches(key, list(models), n=3)
            raise ELFError(f"split_at names {key!r}, which is none of the models {list(models)}"
                           + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ""))
        if same[0] in split_at:
            raise ELFError(f"split_at gives {same[0]!r} two points ({split_at[same[0]]!r} and, as {key!r}, {point!r})")
        out[same[0]] = point
    return out


def _bank_info(bank: FeatureBank) -> dict[str, str]:
    """What a comparison row records of its feature bank: teacher, content hashes and cut point, and the teacher's
    checkpoint file and its SHA-256 when the bank was made from one."""
    info = {k: bank.metadata.get(k, "") for k in ("teacher_model", "teacher_sha256", "point", "images_sha256")}
    info.update({k: bank.metadata[k] for k in ("teacher_checkpoint", "teacher_checkpoint_sha256") if k in bank.metadata})
    return info


def _teacher_name(bank: FeatureBank) -> str:
    """A bank's teacher as a log line names it: model, and checkpoint file when known."""
    ckpt = bank.metadata.get("teacher_checkpoint")
    return bank.metadata.get("teacher_model", "?") + (f" ({ckpt})" if ckpt else "")


def _seed_result(result: EvalResult, i: int) -> EvalResult:
    """The ``i``-th seed of ``result`` as a result of its own."""
    return EvalResult(result.model, [result.accuracies[i]], [result.seeds[i]], result.protocol,
                      result.wall_time_s[i:i + 1], result.histories[i:i + 1], result.data,
                      {k: v[i:i + 1] for k, v in result.also.items()})


def format_table(rows: Sequence[ModelComparison]) -> str:
    """A Markdown table in the paper's layout: model | baseline | ELF | gain (mean ± std over runs)."""
    lines = ["| model | baseline | ELF | gain |", "|---|---|---|---|"]
    for r in rows:
        base = str(r.baseline) if r.baseline else "-"
        elf = str(r.elf) if r.elf else "-"
        gain = f"{r.gain:+.2f}" if r.gain is not None else "-"
        lines.append(f"| {r.model} | {base} | {elf} | {gain} |")
    return "\n".join(lines)


def git_revision() -> str | None:
    """The elf-dd source's git commit, ``"<sha>+dirty"`` when tracked files have uncommitted changes; None outside a
    git checkout (an installed wheel). Read it when work starts: that is the code that ran."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if rev.returncode != 0 or not rev.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10, cwd=here)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """Versions and machine facts recorded with every result."""
    from .version import __version__

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "elf_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(dev),
        "threads": str(torch.get_num_threads()),
        "cpu": _cpu_model(),
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what :mod:`platform` knows, possibly ``""``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
