"""Writing files so that a kill never leaves half of one, and checking, before any work, that a
folder can be made and written: the helpers the run directory, the data and the figures share."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from vae_cli.errors import PathError, RunDirError


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable(path: Path, what: str) -> None:
    """PathError naming `what` and the reason when the existing directory `path` cannot be written:
    a read-only file system (which root cannot write either) or missing permissions."""
    path = Path(path).expanduser().absolute()
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError as exc:
        raise PathError(f"cannot write {what} {path}: {_reason(exc)}") from None
    if read_only:
        raise PathError(f"cannot write {what} {path}: {os.strerror(errno.EROFS)}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PathError(f"cannot write {what} {path}: {os.strerror(errno.EACCES)}")


def check_creatable(path: Path, what: str) -> None:
    """PathError naming `what` and the reason when the directory `path` cannot be made or written.
    Its first missing folder is made and removed again: only the file system knows (/proc, a
    read-only mount, permissions)."""
    path = Path(path).expanduser().absolute()
    first_missing = None
    existing = path
    while not existing.exists():
        first_missing, existing = existing, existing.parent
    if not existing.is_dir():
        raise PathError(f"cannot create {what} {path}: {existing} is not a directory")
    if first_missing is None:
        check_writable(path, what)
        return
    try:
        first_missing.mkdir()
        first_missing.rmdir()
    except OSError as exc:
        raise PathError(f"cannot create {what} {path}: {_reason(exc)}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """The whole file or nothing: a kill leaves the old file (and at most a hidden temp file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise PathError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def remove_temp_files(folder: Path) -> None:
    """The temp files of atomic writes cut short by a kill."""
    for stale in Path(folder).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} does not hold a JSON object")
    return obj
