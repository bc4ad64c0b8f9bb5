"""Run directories: their layout, refusing to clobber another run by accident, an exclusive lock
while writing, and the resolved configuration written into each.

Layout of a run directory ``out`` (the names below are this module's constants; use them, not
literals)::

    out/.lock             LOCK_FILE: {"pid", "hostname", "token", "started"} of the writer (O_EXCL)
    out/checkpoints/      CHECKPOINT_DIR: save_checkpoint(...) target, <tag>/ directories and 'latest'
    out/metrics.jsonl     METRICS_FILE: one JSON record per line, each with "kind" and "step"
    out/config.yaml       CONFIG_FILE: the resolved run configuration (``lipdeq train --config`` reads it)
    out/tensorboard/      TENSORBOARD_DIR: TensorBoard events, when TensorBoard is installed

lipdeq never removes or replaces a file it did not write: ``config.yaml`` carries the sha256 of its
own YAML in its header (a file edited since, or written by someone else, does not match), and a
``metrics.jsonl`` counts as lipdeq's when it is empty or its first line is a lipdeq record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from lipdeq import atomic
from lipdeq.atomic import pid_alive
from lipdeq.errors import LipdeqError
from lipdeq.presets.strict_yaml import dump_yaml

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "TENSORBOARD_DIR",
    "RunDirError",
    "RunDirLock",
    "config_written_by_lipdeq",
    "metrics_written_by_lipdeq",
    "prepare_run_dir",
    "write_config",
]

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"
_SHA_LINE = "# lipdeq-sha256: "  # last header line of config.yaml; the digest covers what follows it


class RunDirError(LipdeqError, ValueError):
    """The run directory cannot be used: it holds another run, or another process is writing it."""


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
    ``tensorboard_dir``, ``lock_path``, and ``resuming`` (True when ``resume=True`` found an earlier
    run to continue).
    """

    def __init__(self, path: Path, token: str, resuming: bool) -> None:
        self.path = path
        self.checkpoint_dir = path / CHECKPOINT_DIR
        self.metrics_path = path / METRICS_FILE
        self.config_path = path / CONFIG_FILE
        self.tensorboard_dir = path / TENSORBOARD_DIR
        self.lock_path = path / LOCK_FILE
        self.resuming = resuming
        self._token: str | None = token

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._token is not None

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


# ------------------------------------------------------------------------------------ config.yaml


def _config_text(config: Mapping[str, Any]) -> str:
    body = dump_yaml(dict(config))
    preset = config.get("preset")
    origin = f"it started from preset {preset!r}" if preset else "it did not start from a preset"
    return (
        "# The resolved configuration of this lipdeq run, written when training started; "
        "`lipdeq train --config THIS_FILE` accepts it.\n"
        f"# 'preset' records where it came from ({origin}); to derive a new configuration from a "
        "preset, write 'base: NAME' instead.\n"
        f"{_SHA_LINE}{hashlib.sha256(body.encode('utf-8')).hexdigest()}\n"
        f"{body}"
    )


def config_written_by_lipdeq(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a config.yaml exactly as lipdeq wrote it (its header digest matches)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    header, sep, body = text.partition("\n" + _SHA_LINE)
    if not sep or not header.startswith("#") or any(not line.startswith("#") for line in header.splitlines()):
        return False
    digest, newline, body = body.partition("\n")
    return bool(newline) and digest == hashlib.sha256(body.encode("utf-8")).hexdigest()


def metrics_written_by_lipdeq(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is empty or its first line is a lipdeq metrics record (a JSON object with a
    str ``kind`` and an int ``step``); a torn last line after a crash does not matter."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return (
        isinstance(record, dict)
        and isinstance(record.get("kind"), str)
        and isinstance(record.get("step"), int)
        and not isinstance(record.get("step"), bool)
    )


def write_config(out: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write ``config`` (a JSON-safe mapping such as ``RunConfig.to_dict()``) to ``out/config.yaml``
    atomically, with the header that marks it as lipdeq's. Returns the file's path."""
    path = Path(out) / CONFIG_FILE
    atomic.atomic_write(path, _config_text(config).encode("utf-8"))
    return path


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


# ---------------------------------------------------------------------------------------- prepare


def prepare_run_dir(
    out: str | os.PathLike[str], *, resume: bool, overwrite: bool, config: Mapping[str, Any] | None = None
) -> RunDirLock:
    """Create or reuse run directory ``out`` and lock it exclusively; use as ``with prepare_run_dir(...)``.

    If ``out`` already holds a run (checkpoints or metrics): ``resume=True`` continues it,
    ``overwrite=True`` deletes that run's checkpoints, metrics and config.yaml (nothing else, and
    only what lipdeq wrote), and with neither flag :class:`RunDirError` is raised. ``config`` (the
    resolved configuration, e.g. ``RunConfig.to_dict()``) is then written to ``out/config.yaml``;
    a config.yaml there that lipdeq did not write (or that was edited) is never replaced: it raises
    :class:`RunDirError` before anything is changed, as does ``overwrite`` of a metrics.jsonl that is
    not lipdeq's. The lock ``out/.lock`` is created with O_EXCL and records pid and hostname; a lock
    left by a dead process on this host is taken over, a live one (or one from another host) raises
    :class:`RunDirError`. The lock is released on exit.
    """
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True are mutually exclusive: choose one")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} exists and is not a directory")
    ckpt = out / CHECKPOINT_DIR
    if (ckpt.exists() or ckpt.is_symlink()) and not ckpt.is_dir():
        # Checked before anything runs: otherwise a resume finds no checkpoint in it, trains from step 0
        # and loses that work at the first save; and --overwrite would delete a file lipdeq did not write.
        raise RunDirError(f"{ckpt} exists and is not a directory: lipdeq keeps the run's checkpoints there; "
                          "move it away and start again")
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
        own_config = config_written_by_lipdeq(lock.config_path)
        if config is not None and lock.config_path.exists() and not own_config:
            raise RunDirError(
                f"{lock.config_path} was not written by lipdeq (or was edited since): lipdeq writes the run's "
                f"resolved configuration there and never replaces a file of yours; move it out of {out} "
                "(pass its new path to --config) and start again"
            )
        if overwrite:
            if lock.metrics_path.exists() and not metrics_written_by_lipdeq(lock.metrics_path):
                raise RunDirError(
                    f"{lock.metrics_path} was not written by lipdeq; --overwrite removes only lipdeq's own "
                    "files: move it away and start again"
                )
            _remove(lock.checkpoint_dir)
            _remove(lock.metrics_path)
            if own_config:
                _remove(lock.config_path)
        atomic.remove_dead_temporaries(out)
        if config is not None:
            write_config(out, config)
        lock.resuming = bool(existing) and resume
    except BaseException:
        lock.release()
        raise
    return lock
