"""Resumable training state: one safetensors file of named tensor sections, optimizer momentum and RNG states.

Shared by :meth:`elf.ELFTrainer.save_state` and the distillation loop's checkpoints (:func:`elf.distill.distill`):
``write_state`` stores ``{section}.{name}`` tensors, ``momentum.{group}.{index}`` buffers of an SGD-style optimizer,
``rng.{name}`` generator states and string metadata with a ``format`` tag, atomically; ``read_state`` checks the
tag and hands the pieces back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ELFError
from .fileio import PathLike, load_tensors, save_tensors

__all__ = ["SavedState", "changed_settings", "read_state", "write_state"]


def changed_settings(saved: Mapping[str, object], now: Mapping[str, object], ignore: frozenset[str] | set[str] = frozenset(),
                     *, new_keys: bool = False, shown: int = 4) -> str:
    """What a resume would change: ``"key: old -> new, ..."`` for the keys of ``saved`` (except ``ignore``) whose
    value differs in ``now``, sorted, at most ``shown`` of them; ``""`` when none does. Keys ``saved`` predates (new
    settings absent from an older record) are not compared, unless ``new_keys``."""
    keys = set(saved) | set(now) if new_keys else set(saved)
    differ = sorted(k for k in keys if k not in ignore and saved.get(k) != now.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:shown])


def write_state(
    path: PathLike,
    fmt: str,
    *,
    sections: Mapping[str, Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator | None] | None = None,
    meta: Mapping[str, str] | None = None,
) -> Path:
    """Write one state file (atomic). ``sections`` maps a prefix ("model", "param", ...) to a state dict."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, state in sections.items():
        tensors.update({f"{prefix}.{k}": v for k, v in state.items()})
    if optimizer is not None:
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    tensors[f"momentum.{gi}.{pi}"] = buf
    for name, gen in (generators or {}).items():
        if gen is not None:
            tensors[f"rng.{name}"] = gen.get_state()
    return save_tensors(path, tensors, {"format": fmt, **dict(meta or {})})


@dataclass
class SavedState:
    """What :func:`read_state` found: the tensors and the metadata of one state file."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state dict stored under ``prefix`` (keys without it)."""
        start = f"{prefix}."
        return {k[len(start):]: v for k, v in self.tensors.items() if k.startswith(start)}

    def restore_momentum(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the stored momentum buffers into ``optimizer`` (its parameters in the saved order).

        Files written before this module (``momentum.{index}``, one group) are read too."""
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                buf = self.tensors.get(f"momentum.{gi}.{pi}")
                if buf is None and gi == 0 and len(optimizer.param_groups) == 1:
                    buf = self.tensors.get(f"momentum.{pi}")
                if buf is not None:
                    optimizer.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype)

    def restore_generator(self, name: str, generator: torch.Generator | None) -> None:
        """Set ``generator`` to the stored ``rng.{name}`` state, when both exist."""
        state = self.tensors.get(f"rng.{name}")
        if generator is not None and state is not None:
            generator.set_state(state.cpu())


def read_state(path: PathLike, fmt: str, *, what: str, device: torch.device | str | None = None) -> SavedState:
    """Read a file written by :func:`write_state` with format tag ``fmt``; ``what`` names it in errors."""
    tensors, meta = load_tensors(path, device=device) if device is not None else load_tensors(path)
    if meta.get("format") != fmt:
        raise ELFError(f"{path}: not {what} (format {meta.get('format')!r}, expected {fmt!r})")
    return SavedState(Path(path), tensors, meta)
