"""File helpers shared by every module that reads or writes: atomic writes, content hashes, safe loading.

Rules this module enforces for the whole library:

* writes are atomic (a temporary file in the same directory, then :func:`os.replace`);
* caches are keyed by content hashes (:func:`tensor_sha256`, :func:`state_dict_sha256`);
* untrusted files are never unpickled: :func:`safe_torch_load` uses ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from .errors import ELFError

__all__ = [
    "portable_path",
    "atomic_write",
    "check_writable",
    "file_sha256",
    "tensor_sha256",
    "state_dict_sha256",
    "save_tensors",
    "load_tensors",
    "safe_torch_load",
]

PathLike = str | os.PathLike[str]


def portable_path(path: PathLike, root: PathLike | None = None) -> str:
    """``path`` as recorded in results: relative to ``root`` (default: the current directory), never a machine's
    absolute path. Symlinks keep their names (no resolving)."""
    import os

    base = os.path.abspath(os.fspath(root)) if root is not None else os.getcwd()
    return os.path.relpath(os.path.abspath(os.fspath(path)), base).replace(os.sep, "/")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; returns ``path``.

    A crash while writing leaves at most a stray ``*.tmp`` file, never a half-written ``path``; the file's bytes are
    flushed to disk (fsync) before the rename, so a power loss right after it cannot leave an empty ``path`` either,
    and the folder is flushed after it (POSIX), so the rename itself survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the final file the usual permissions
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk where the OS allows it (POSIX; a no-op elsewhere)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder: the rename is still atomic
        pass
    finally:
        os.close(fd)


def check_writable(path: PathLike, what: str = "output") -> Path:
    """Fail fast, before any compute: raise :class:`ELFError` unless a file can be written at ``path``.

    Creates and removes a one-byte temporary file beside ``path`` (in its nearest existing folder, so no folder is
    created). A directory, a parent that is a file, a read-only folder or a full disk give a one-line error.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ELFError(f"{what} {path} is a directory; give a file name inside it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ELFError(f"cannot write {what} {path}: {folder} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise ELFError(f"cannot write {what} {path}: {e.strerror or e}; choose a writable place") from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once at import: setting and restoring the umask around every write is not thread-safe (another thread's file
#: created in between would get mode 0666)
_UMASK = _umask()


def file_sha256(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _update_with_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        # view as bytes so every dtype (bf16 included) hashes without a numpy round trip
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """Hex SHA-256 over dtype, shape and bytes of one or more tensors (device and grad state ignored)."""
    h = hashlib.sha256()
    for t in tensors:
        _update_with_tensor(h, t)
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """Hex SHA-256 of a module's (or a state dict's) names, dtypes, shapes and values, in sorted key order."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            _update_with_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a safetensors file atomically. Metadata values are stored as strings."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))


def load_tensors(path: PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``. A missing or unreadable file raises :class:`ELFError`."""
    path = Path(path)
    if not path.is_file():
        raise ELFError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
        # read the bytes once: tensors must not stay mapped to a file that may change or be truncated later
        tensors = {k: v.to(device) for k, v in load_bytes(path.read_bytes()).items()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ELFError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt, delete it and recreate it") from e
    return tensors, meta


#: exceptions torch.load (weights_only) raises for a truncated or corrupt file (empty, cut zip, cut legacy pickle,
#: damaged bytes), found by cutting and damaging files; pickle.UnpicklingError (the refusal) is handled apart
_DAMAGED = (RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError, struct.error, zipfile.BadZipFile)


def safe_torch_load(path: PathLike, allowlist: Iterable[Any] = (), map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` that never runs pickled code: ``weights_only=True`` plus the given allowlisted globals.

    A file that needs anything beyond plain tensors, containers and the allowlist is refused with an
    :class:`ELFError` that says why and how to convert it; a truncated or corrupt file is an :class:`ELFError`
    that says to fetch it again.
    """
    path = Path(path)
    if not path.is_file():
        raise ELFError(f"{path}: no such file")
    allow = list(allowlist)
    try:
        if allow:
            with torch.serialization.safe_globals(allow):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch wraps every refusal of its weights-only unpickler in this
        raise ELFError(
            f"{path}: refused to load: the file needs objects that are not plain tensors or containers ({e}). "
            "elf-dd never unpickles arbitrary code. If you trust the file, convert it once with "
            "torch.load(path, weights_only=False) in your own session and save the tensors with "
            "safetensors.torch.save_file or torch.save of a dict of tensors. (A damaged file can fail this way "
            "too: if it should hold only tensors, download or copy it again.)"
        ) from e
    except PermissionError as e:
        raise ELFError(f"{path}: cannot read it ({e}); check its permissions") from e
    except _DAMAGED as e:  # what torch's zip and legacy readers raise on a cut or damaged file
        raise ELFError(f"{path}: the file is truncated or corrupt ({type(e).__name__}: {e}); it is not a complete "
                       "torch.save file: download or copy it again") from e
