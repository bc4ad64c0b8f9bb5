"""Crash-safe file-system helpers: write then rename, fsync of directories, and the leftovers of
writers that died.

A temporary is a hidden sibling of its destination named ``.tmp@<name>@<pid>@<hex>``: the pid lets a
later writer tell a dead writer's debris (removable) from a live one's (left alone), and ``@``
never occurs in the names lipdeq writes. Only stdlib, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "SEP",
    "TMP_PREFIX",
    "aside_name",
    "atomic_write",
    "fsync_dir",
    "pid_alive",
    "remove_dead_temporaries",
    "temp_sibling",
    "write_file",
]

SEP = "@"
TMP_PREFIX = ".tmp"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (possibly owned by another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and fsync it (not atomic by itself); returns its sha256 and size."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def fsync_dir(path: Path) -> None:
    """Make renames and creations in directory ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(final: Path) -> Path:
    """A fresh hidden temporary path next to ``final``, owned by this process."""
    return final.parent / SEP.join((TMP_PREFIX, final.name, str(os.getpid()), uuid.uuid4().hex[:12]))


def aside_name(final: Path) -> Path:
    """A fresh hidden path to move an existing ``final`` aside to (``.old@<name>@<hex>``)."""
    return final.parent / SEP.join((".old", final.name, uuid.uuid4().hex[:12]))


def atomic_write(path: str | os.PathLike[str], data: bytes) -> dict[str, Any]:
    """Replace file ``path`` by ``data`` atomically: readers see the old or the new content, never a
    torn file, and after a crash the new content is either complete or absent. Returns
    :func:`write_file`'s record."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        record = write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return record


def remove_dead_temporaries(directory: Path) -> None:
    """Delete the temporaries (files or directories) that writers which have since died left in
    ``directory``; those of live processes are left alone."""
    for entry in directory.iterdir():
        parts = entry.name.split(SEP)
        if len(parts) != 4 or parts[0] != TMP_PREFIX or not parts[2].isdigit() or pid_alive(int(parts[2])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
