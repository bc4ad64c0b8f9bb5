"""Run directories: refuse to clobber another run by accident, and hold an exclusive lock while writing.

Layout of a run directory ``out``::

    out/.lock             {"pid", "hostname", "token", "started"} of the writer (exclusive, O_EXCL)
    out/checkpoints/      save_checkpoint(...) target: <tag>/ directories and the 'latest' pointer
    out/metrics.jsonl     metrics log
    out/config.yaml       the resolved run configuration

Only stdlib at import time, so the lock is cheap to take in any process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "RunDirError",
    "RunDirLock",
    "prepare_run_dir",
]

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
_RUN_ARTIFACTS = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE)


class RunDirError(ValueError):
    """The run directory cannot be used: it holds another run, or another process is writing it."""


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


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None if it is empty or garbled (retried briefly: a writer may be mid-write)."""
    for attempt in range(5):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            info = None
        if (
            isinstance(info, dict)
            and isinstance(info.get("pid"), int)
            and isinstance(info.get("hostname"), str)
        ):
            return info
        if attempt < 4:
            time.sleep(0.1)
    return None


class RunDirLock:
    """An exclusively locked run directory; a context manager that releases the lock on exit.

    Attributes: ``path`` (the run directory), ``checkpoint_dir``, ``metrics_path``, ``config_path``,
    ``lock_path``, and ``resuming`` (True when ``resume=True`` found an earlier run to continue).
    """

    def __init__(self, path: Path, token: str, resuming: bool) -> None:
        self.path = path
        self.checkpoint_dir = path / CHECKPOINT_DIR
        self.metrics_path = path / METRICS_FILE
        self.config_path = path / CONFIG_FILE
        self.lock_path = path / LOCK_FILE
        self.resuming = resuming
        self._token: str | None = token

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._token is not None

    @property
    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in ``checkpoint_dir`` (see ``find_latest``), or None."""
        from lipdeq.training.checkpoint import find_latest

        return find_latest(self.checkpoint_dir)

    def release(self) -> None:
        """Remove the lock file if it is still ours; idempotent."""
        if self._token is None:
            return
        token, self._token = self._token, None
        try:
            info = _read_lock(self.lock_path)
        except FileNotFoundError:
            return
        if info is not None and info.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.path)!r}, held={self.held}, resuming={self.resuming})"


def _take_over_stale(path: Path, stale: dict[str, Any]) -> None:
    """Remove a lock judged stale, without deleting a fresh lock that replaced it in the meantime."""
    aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    try:
        moved = _read_lock(aside)
    except FileNotFoundError:
        return
    if moved is None or moved.get("token") != stale.get("token") or moved.get("pid") != stale.get("pid"):
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.link(aside, path)  # not the stale lock after all: put it back
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()


def _acquire(out: Path) -> str:
    path = out / LOCK_FILE
    host = socket.gethostname()
    token = uuid.uuid4().hex
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = _read_lock(path)
            except FileNotFoundError:
                continue  # released in the meantime
            if holder is None:
                raise RunDirError(
                    f"{path} exists but is empty or garbled; if no run is writing {out}, delete it"
                ) from None
            pid = holder["pid"]
            if holder["hostname"] != host:
                raise RunDirError(
                    f"another run (pid {pid} on host {holder['hostname']}) is writing {out}; "
                    f"if that run is dead, delete {path}"
                ) from None
            if pid_alive(pid):
                which = "this process" if pid == os.getpid() else f"pid {pid}"
                raise RunDirError(f"another run ({which}) is writing {out} (lock {path})") from None
            _take_over_stale(path, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "hostname": host, "token": token, "started": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return token
    raise RunDirError(f"could not acquire {path}: it keeps changing (several runs starting at once?)")


def _existing_run(out: Path) -> list[str]:
    found = []
    ckpt = out / CHECKPOINT_DIR
    if ckpt.is_dir() and any(ckpt.iterdir()):
        found.append(f"{CHECKPOINT_DIR}/")
    if (out / METRICS_FILE).exists():
        found.append(METRICS_FILE)
    return found


def prepare_run_dir(out: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> RunDirLock:
    """Create or reuse run directory ``out`` and lock it exclusively; use as ``with prepare_run_dir(...)``.

    If ``out`` already holds a run (checkpoints or metrics): ``resume=True`` continues it,
    ``overwrite=True`` deletes that run's checkpoints, metrics and config (nothing else), and with
    neither flag :class:`RunDirError` is raised. The lock ``out/.lock`` is created with O_EXCL and
    records pid and hostname; a lock left by a dead process on this host is taken over, a live one
    (or one from another host) raises :class:`RunDirError`. The lock is released on exit.
    """
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True are mutually exclusive: choose one")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    token = _acquire(out)
    lock = RunDirLock(out, token, resuming=False)
    try:
        existing = _existing_run(out)
        if existing and not (resume or overwrite):
            raise RunDirError(
                f"{out} already holds a run ({', '.join(existing)}); pass resume=True (--resume) to continue "
                "it or overwrite=True (--overwrite) to replace it"
            )
        if overwrite:
            for name in _RUN_ARTIFACTS:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        lock.resuming = bool(existing) and resume
    except BaseException:
        lock.release()
        raise
    return lock
