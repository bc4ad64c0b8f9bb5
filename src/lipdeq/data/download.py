"""Download, verify and safely extract the official CIFAR-10 python archive."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from lipdeq.data.cifar10 import BATCH_DIR_NAME, TEST_FILES, TRAIN_FILES
from lipdeq.data.errors import DataError
from lipdeq.data.safe_pickle import restricted_load

__all__ = ["CIFAR10_URL", "CIFAR10_MD5", "EXPECTED_FILES", "download_cifar10", "is_complete_copy"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
EXPECTED_FILES = ("batches.meta", *TRAIN_FILES, *TEST_FILES)
_MIN_BATCH_BYTES = 10000 * 3072  # the pixel payload alone; a smaller batch file is incomplete


def is_complete_copy(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds every batch file at a plausible size and a readable ``batches.meta``."""
    path = Path(folder)
    if not all((path / name).is_file() for name in EXPECTED_FILES):
        return False
    if any((path / name).stat().st_size < _MIN_BATCH_BYTES for name in (*TRAIN_FILES, *TEST_FILES)):
        return False
    try:
        with (path / "batches.meta").open("rb") as fh:
            meta = restricted_load(fh, what=str(path / "batches.meta"))
    except Exception:
        return False
    return isinstance(meta, dict) and ("label_names" in meta or b"label_names" in meta)


def _fetch(url: str, dest_dir: Path, timeout: float) -> tuple[Path, str]:
    """Stream ``url`` into a temporary file in ``dest_dir``; return its path and md5."""
    fd, name = tempfile.mkstemp(prefix=".cifar10-", suffix=".tar.gz.part", dir=dest_dir)
    tmp = Path(name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download CIFAR-10 from {url}: {reason}. Without network access, copy an extracted "
            f"{BATCH_DIR_NAME} folder (or the archive, extracted) onto this machine by hand and point "
            "--data-dir (or LIPDEQ_DATA_DIR) at it"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _safe_members(archive: tarfile.TarFile, url: str) -> list[tarfile.TarInfo]:
    """Members under ``cifar-10-batches-py/``; reject links, devices, absolute paths and '..'."""
    keep = []
    for member in archive.getmembers():
        parts = PurePosixPath(member.name).parts
        if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DataError(
                f"archive from {url} has an unsafe member path {member.name!r}; refusing to extract"
            )
        if not (member.isfile() or member.isdir()):
            raise DataError(
                f"archive from {url} has a link or special member {member.name!r}; refusing to extract"
            )
        if parts and parts[0] == BATCH_DIR_NAME:
            keep.append(member)
    return keep


def download_cifar10(
    dest: str | os.PathLike[str],
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    timeout: float = 30,
) -> Path:
    """Download CIFAR-10 into ``dest`` and return the path of ``dest/cifar-10-batches-py``.

    Returns at once if that folder already holds a complete copy. Otherwise the archive is streamed
    to a temporary file in ``dest``, its md5 checked, its members checked (no absolute paths, '..',
    links) and extracted to a temporary folder that is then renamed into place. Network failures,
    checksum mismatches and incomplete archives raise :class:`DataError`.
    """
    dest_dir = Path(dest).expanduser()
    target = dest_dir / BATCH_DIR_NAME
    if target.is_dir() and is_complete_copy(target):
        return target
    if target.exists():
        raise DataError(
            f"{target} exists but is not a complete CIFAR-10 copy; remove it or choose another --dest"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive_path, actual = _fetch(url, dest_dir, timeout)
    staging = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=dest_dir))
    try:
        if actual != md5.lower():
            raise DataError(
                f"checksum mismatch for {url}: md5 {actual}, expected {md5}; the download is corrupt"
            )
        try:
            with tarfile.open(archive_path, "r:*") as archive:
                members = _safe_members(archive, url)
                if hasattr(tarfile, "data_filter"):
                    archive.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters; members already checked
                    archive.extractall(staging, members=members)  # noqa: S202
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"cannot extract the archive from {url}: {exc}") from exc
        extracted = staging / BATCH_DIR_NAME
        missing = [name for name in EXPECTED_FILES if not (extracted / name).is_file()]
        if missing:
            raise DataError(f"archive from {url} lacks the expected file(s) {BATCH_DIR_NAME}/{missing}")
        os.replace(extracted, target)
    finally:
        archive_path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return target
