"""Baseline vs ELF for several evaluation models on one synthetic set: the paper's table, as a function.

:func:`compare_models` picks, for each model, the feature bank whose per-image shape equals the model's front
output at its split point (so a ConvNet student gets the width-128 teacher and ResNet-18 the width-512 one).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ELFError
from .feature_bank import FeatureBank
from .losses import prepare_targets
from .models import build_model, default_split_point, has_default_split_point
from .protocol import Protocol, get_protocol
from .split import SplitOptions, list_split_points, split_model
from .synthetic import SyntheticSet
from .trainer import ELFTrainer, EvalResult

__all__ = ["ModelComparison", "compare_models", "front_shape", "pick_bank", "choose_bank", "format_table", "environment"]


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
        """ELF mean minus baseline mean, in accuracy points."""
        if self.baseline is None or self.elf is None:
            return None
        return self.elf.mean - self.baseline.mean

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
        return tuple(front(torch.zeros(1, c, h, w)).shape[1:])


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
    wide = f"ConvNetW{shape[0]}" if isinstance(shape, tuple) and len(shape) == 3 else "another"
    raise ELFError(
        f"no teacher feature bank matches {model_name}'s front output {shape} (banks: {have}); pass adapter='auto' "
        f"(--adapter auto) to bridge the shapes with learned adapters, add a teacher of that feature shape (e.g. {wide}), "
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
    """
    proto = get_protocol(protocol, **overrides)
    split_at = dict(split_at or {})
    synthetic = images if isinstance(images, SyntheticSet) else None
    if synthetic is not None:
        images, labels = synthetic.images, synthetic.labels
    if labels is None:
        raise ELFError("labels are required unless images is a SyntheticSet")
    _, _, num_classes = prepare_targets(labels)

    def trainer(name: str, p: Protocol, **kw: Any) -> ELFTrainer:
        if synthetic is not None:
            return ELFTrainer.from_synthetic(name, synthetic, protocol=p, device=device, progress=progress,
                                             split_options=split_options, **kw)
        return ELFTrainer(name, images, labels, protocol=p, device=device, progress=progress, split_options=split_options,
                          **kw)

    out = []
    for name in models:
        point = split_at.get(name)
        row = ModelComparison(name, point)
        if baseline:
            log(f"[{name}] baseline ({proto.total_epochs} epochs x {seeds if isinstance(seeds, int) else len(seeds)} runs)")
            row.baseline = trainer(name, proto.baseline()).run(test_images, test_labels, seeds)
            log(f"[{name}] baseline: {row.baseline}")
        if elf:
            elf_proto = proto.with_elf()
            bank = choose_bank(name, tuple(images.shape[1:]), num_classes, banks, point, elf_proto.adapter, split_options)
            row.bank = {k: bank.metadata.get(k, "") for k in ("teacher_model", "teacher_sha256", "point", "images_sha256")}
            log(f"[{name}] ELF with {row.bank['teacher_model']} features {bank.shape}"
                + (" (adapters where shapes differ)" if elf_proto.adapter else ""))
            row.elf = trainer(name, elf_proto, feature_bank=bank, split_at=point).run(test_images, test_labels, seeds)
            row.split_at = row.elf.data.get("split_at")
            log(f"[{name}] ELF: {row.elf}")
        out.append(row)
    return out


def format_table(rows: Sequence[ModelComparison]) -> str:
    """A Markdown table in the paper's layout: model | baseline | ELF | gain (mean ± std over runs)."""
    lines = ["| model | baseline | ELF | gain |", "|---|---|---|---|"]
    for r in rows:
        base = str(r.baseline) if r.baseline else "-"
        elf = str(r.elf) if r.elf else "-"
        gain = f"{r.gain:+.2f}" if r.gain is not None else "-"
        lines.append(f"| {r.model} | {base} | {elf} | {gain} |")
    return "\n".join(lines)


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
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info
