"""Checkpoints inside a long run, so that a killed process loses at most a few minutes of training (``elf study``).

While a run trains, its folder (a study's ``<out>/partial/``) holds two kinds of file:

* ``<run id>.e<epoch>.state.safetensors``: :meth:`ELFTrainer.save_state` after that epoch (weights, momentum, lr and
  every random generator the fit draws from), written atomically;
* ``<run id>.json``: which state file is current, the history logged so far, the seconds spent, what the run is
  (model, seed, protocol, split point) and the state file's SHA-256; written after the state file, atomically.

A restart resumes from them when they agree with each other and with the run it is asked to do, and otherwise
starts the run over, saying why. The files are removed once the run's record is written.
"""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fileio import PathLike, atomic_write, file_sha256
from .trainer import Callback, ELFTrainer

__all__ = ["RunCheckpoint"]


class RunCheckpoint(Callback):
    """Save the fit every ``every_s`` seconds (at the start of an epoch, so the history is complete up to it).

    ``identity`` (JSON-able: model, seed, protocol, ...) must match for a saved run to be resumed. Use::

        ckpt = RunCheckpoint(folder, run_id, every_s=600, identity={...})
        history = ELFTrainer(..., callbacks=[ckpt]).fit(seed, resume_from=ckpt.load())
        history, seconds = ckpt.full_history(history), ckpt.total_seconds(seconds_of_this_fit)
        ...write the run's record...
        ckpt.discard()
    """

    def __init__(self, folder: PathLike, run_id: str, every_s: float, identity: dict[str, Any],
                 log: Callable[[str], None] = print) -> None:
        self.folder, self.run_id, self.every_s, self.log = Path(folder), run_id, float(every_s), log
        self.identity = json.loads(json.dumps(identity, default=str))  # as it reads back from the file
        self.meta_path = self.folder / f"{run_id}.json"
        self.prior_history: list[dict[str, float]] = []
        self.prior_s = 0.0
        self.resumed_at: list[int] = []  # epochs (0-based) the run was resumed at
        self._saved_epoch = -1
        self._t0 = self._last = 0.0

    # ---- reading ----------------------------------------------------------------------------------------------
    def load(self) -> Path | None:
        """The state file to pass as ``fit(resume_from=...)``, or None: nothing saved, or saved files that do not
        agree (then removed, and the reason logged)."""
        if not self.meta_path.exists():
            self.discard()  # a state file without its record is not trusted
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("identity") != self.identity:
                raise ValueError("it was saved for other settings "
                                 f"({_first_difference(meta.get('identity'), self.identity)})")
            state = self.folder / meta["state"]
            if not state.exists() or file_sha256(state) != meta["state_sha256"]:
                raise ValueError(f"{state.name} is missing or does not match its SHA-256")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"{self.run_id}: not resuming the saved partial run: {e}; starting it over")
            self.discard()
            return None
        self.prior_history, self.prior_s = list(meta["history"]), float(meta["elapsed_s"])
        self._saved_epoch = int(meta["epoch"])
        self.resumed_at = [*meta.get("resumed_at", []), self._saved_epoch + 1]
        self.log(f"{self.run_id}: resuming at epoch {self._saved_epoch + 2} "
                 f"({self.prior_s / 60:.1f} min done before)")
        return state

    def full_history(self, history: list[dict[str, float]]) -> list[dict[str, float]]:
        """The history of the whole run: what was logged before the resume, then ``history`` (this fit's, its
        ``time_s`` shifted by the seconds spent before)."""
        return [*self.prior_history, *({**r, "time_s": r["time_s"] + self.prior_s} if "time_s" in r else r
                                       for r in history)]

    def total_seconds(self, seconds: float) -> float:
        """Seconds of the whole run, given those of this fit."""
        return self.prior_s + seconds

    def discard(self) -> None:
        """Remove the run's partial files."""
        for path in glob.glob(str(self.folder / f"{glob.escape(self.run_id)}.e*.state.safetensors")):
            Path(path).unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)

    # ---- writing (callback) -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: ELFTrainer) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_epoch_start(self, trainer: ELFTrainer, epoch: int) -> None:
        finished = epoch - 1
        now = time.perf_counter()
        if finished <= self._saved_epoch or now - self._last < self.every_s:
            return
        self.save(trainer, finished, now)

    def save(self, trainer: ELFTrainer, finished: int, now: float | None = None) -> None:
        """Write the state after epoch ``finished`` (0-based) and the record that points at it."""
        now = time.perf_counter() if now is None else now
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.run_id}.e{finished}.state.safetensors"
        trainer.save_state(self.folder / name)
        meta = {"run_id": self.run_id, "identity": self.identity, "epoch": finished, "state": name,
                "state_sha256": file_sha256(self.folder / name), "history": self.full_history(trainer.history),
                "elapsed_s": self.prior_s + now - self._t0, "resumed_at": self.resumed_at,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(self.meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
        for path in glob.glob(str(self.folder / f"{glob.escape(self.run_id)}.e*.state.safetensors")):
            if Path(path).name != name:
                Path(path).unlink(missing_ok=True)
        self._saved_epoch, self._last = finished, now


def _first_difference(saved: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(saved, dict):
        return "no settings recorded"
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            return f"{key}: saved {saved.get(key)!r}, now {wanted.get(key)!r}"
    return "none"
