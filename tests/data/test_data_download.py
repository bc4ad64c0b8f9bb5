"""download_cifar10 offline: file:// archives, checksum and member checks, an unreachable URL."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import time
from pathlib import Path

import pytest

from lipdeq.data import DataError, download_cifar10, is_complete_copy

NAMES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch")


def _archive(tmp_path: Path, files: dict[str, bytes], name: str = "fake.tar.gz") -> tuple[str, str]:
    """Write a gzipped tar with the given members; return its file:// URL and md5."""
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        for member, payload in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def _fake_files() -> dict[str, bytes]:
    files = {f"cifar-10-batches-py/{n}": f"content of {n}".encode() for n in NAMES}
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": ["a"] * 10}, protocol=2)
    files["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return files


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != "cifar-10-batches-py")


def test_downloads_verifies_and_extracts(tmp_path: Path) -> None:
    files = _fake_files()
    url, md5 = _archive(tmp_path, files)
    dest = tmp_path / "dest"
    out = download_cifar10(dest, url=url, md5=md5, timeout=5)
    assert out == dest / "cifar-10-batches-py"
    for member, payload in files.items():
        assert (dest / member).read_bytes() == payload
    assert _leftovers(dest) == []  # no temporary archive or staging folder remains


def test_checksum_mismatch_names_both_sums(tmp_path: Path) -> None:
    url, md5 = _archive(tmp_path, _fake_files())
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        download_cifar10(dest, url=url, md5="0" * 32, timeout=5)
    assert md5 in str(info.value) and "0" * 32 in str(info.value) and "mismatch" in str(info.value)
    assert not (dest / "cifar-10-batches-py").exists() and _leftovers(dest) == []


def test_archive_missing_files(tmp_path: Path) -> None:
    files = _fake_files()
    del files["cifar-10-batches-py/test_batch"]
    url, md5 = _archive(tmp_path, files)
    with pytest.raises(DataError, match=r"lacks the expected file\(s\).*test_batch"):
        download_cifar10(tmp_path / "dest", url=url, md5=md5, timeout=5)
    assert not (tmp_path / "dest" / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs/escape.txt", "cifar-10-batches-py/../../escape.txt"])
def test_unsafe_member_rejected(tmp_path: Path, bad: str) -> None:
    files = _fake_files()
    files[bad] = b"should never be written"
    url, md5 = _archive(tmp_path, files)
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(DataError, match="unsafe member path"):
        download_cifar10(dest, url=url, md5=md5, timeout=5)
    assert not list(tmp_path.rglob("escape.txt"))


def test_unreachable_url_fails_fast(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        download_cifar10(tmp_path, url=url, timeout=5)
    assert time.monotonic() - start < 10
    text = str(info.value)
    assert url in text and "--data-dir" in text and "by hand" in text
    assert list(tmp_path.iterdir()) == []


def test_existing_complete_copy_is_returned_without_download(tmp_path: Path) -> None:
    target = tmp_path / "cifar-10-batches-py"
    target.mkdir()
    (target / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"] * 10}, protocol=2))
    for name in NAMES[1:]:
        with (target / name).open("wb") as fh:  # sparse files of a full batch's size
            fh.truncate(31_000_000)
    assert is_complete_copy(target)
    # The URL is unreachable: success proves nothing was fetched.
    assert download_cifar10(tmp_path, url="http://127.0.0.1:9/x.tar.gz", timeout=5) == target


def test_existing_incomplete_copy_is_not_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "cifar-10-batches-py"
    target.mkdir()
    (target / "data_batch_1").write_bytes(b"partial")
    assert not is_complete_copy(target)
    url, md5 = _archive(tmp_path, _fake_files())
    with pytest.raises(DataError, match="not a complete CIFAR-10 copy"):
        download_cifar10(tmp_path, url=url, md5=md5, timeout=5)
    assert (target / "data_batch_1").read_bytes() == b"partial"


def test_real_copy_is_complete(real_cifar_dir: Path) -> None:
    assert is_complete_copy(real_cifar_dir)
