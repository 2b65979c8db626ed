"""Lock files that keep two processes from training the same study run at once.

Processes may share a study folder (shards, torchrun ranks, a second ``elf study`` started by hand).

``<folder>/<run id>.lock`` is held with an exclusive ``flock`` for as long as its owner trains the run, and holds the
owner's host, pid and start time for people to read. The operating system drops the lock when its owner exits, however
it exits (killed, crashed, its machine restarted), so a lock is never left stale, a recycled pid cannot keep it, and
two processes cannot both take it. Where ``fcntl`` is missing (Windows) the file is created exclusively instead
(``O_CREAT | O_EXCL``), and a lock left by a killed process must be removed by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock"]


class RunLock:
    """Exclusive ownership of some runs (by id) in ``folder``: :meth:`acquire` takes all or none."""

    def __init__(self, folder: Path, run_ids: list[str]) -> None:
        self.folder, self.run_ids = Path(folder), list(run_ids)
        self._held: list[tuple[Path, int]] = []

    def _path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.lock"

    def _take(self, path: Path) -> int | None:
        """The open, locked file descriptor of ``path``, or None when another process holds it."""
        if fcntl is None:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                return None
        else:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                os.close(fd)
                return None
            try:  # a holder releasing just now unlinks the file before unlocking it: ours may be that old one
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                return None
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.write(fd, owner.encode())
        return fd

    def holder(self, run_id: str) -> str:
        """Who holds ``run_id``'s lock, as its file says (``"pid 123 on host since ..."``)."""
        try:
            owner = json.loads(self._path(run_id).read_text())
            return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):  # being written this instant, or just released
            return "another process"

    def acquire(self) -> str | None:
        """Take every run's lock: ``None`` on success, else who holds one (nothing is kept then)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for run_id in self.run_ids:
            path = self._path(run_id)
            fd = self._take(path)
            if fd is None and fcntl is not None:
                fd = self._take(path)  # once more: the file may have been replaced by a release between open and stat
            if fd is None:
                self.release()
                return self.holder(run_id)
            self._held.append((path, fd))
        return None

    def release(self) -> None:
        """Remove the lock files taken, then unlock them (in that order, see :meth:`_take`)."""
        for path, fd in self._held:
            path.unlink(missing_ok=True)
            os.close(fd)
        self._held = []
