"""Lock files that keep two processes from training the same study run at once.

Processes may share a study folder (shards, torchrun ranks, a second ``elf study`` started by hand).

``<folder>/<run id>.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds the owner's host, pid and start
time. A lock left by a process of this host that no longer exists (killed) is taken over; a lock held by another
host cannot be checked from here, so that run is skipped until the lock file is removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["RunLock"]


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """Exclusive ownership of some runs (by id) in ``folder``: :meth:`acquire` takes all or none."""

    def __init__(self, folder: Path, run_ids: list[str]) -> None:
        self.folder, self.run_ids = Path(folder), list(run_ids)
        self._held: list[Path] = []

    def _path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.lock"

    def _take(self, path: Path) -> bool:
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        return True

    def holder(self, run_id: str) -> str | None:
        """Who holds ``run_id``'s lock (``"pid 123 on host"``), or ``None`` when it is free or its owner (a process of
        this host) no longer exists; such a stale lock is removed."""
        path = self._path(run_id)
        try:
            owner = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written this instant by its owner
            return "another process"
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
            path.unlink(missing_ok=True)
            return None
        return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"

    def acquire(self) -> str | None:
        """Take every run's lock: ``None`` on success, else who holds one (nothing is kept then)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for run_id in self.run_ids:
            path = self._path(run_id)
            if not self._take(path):
                held_by = self.holder(run_id)
                if held_by is not None or not self._take(path):
                    self.release()
                    return held_by or "another process"
            self._held.append(path)
        return None

    def release(self) -> None:
        for path in self._held:
            path.unlink(missing_ok=True)
        self._held = []
