"""CIFAR-10 reader: layout, order, subsets and every malformed-input error, on fake and real files."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lipdeq.data import DataError, load_cifar10, resolve_data_dir

# The first ten labels of the original CIFAR-10 test_batch (cat, ship, ship, airplane, frog, frog,
# automobile, frog, cat, automobile), as quoted widely, independent of the local copy.
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
PUBLISHED_TEST_MEAN = (0.4942, 0.4851, 0.4504)
# sha256 of the lossy JPEG-derived copy under ../shared/data (see CIFAR10_SOURCE.md there): a fact
# about this workspace's copy, so it lives in the tests, not in the library.
SHARED_COPY_SHA256 = {
    "batches.meta": "b8ed9534b4f8a6fa6f9b80e62eeb4cb1e6855f9375651f9599e50d984e694c08",
    "data_batch_1": "7d18ac28e9e9e0608262a2e2384a476df264c3330b6276fdf542cb1a6ecdeee0",
    "data_batch_2": "2391c00abe6c0b62d6af10d5511708d74fc8e479817a2786e4027fe98dc87c36",
    "data_batch_3": "8345110ece42a5920f9b760c34b79d110395a73ed27883800c55a4a2c41592c9",
    "data_batch_4": "923942b4470eb496b079aa1c54868df51ae48316234d395889d2086eef98a312",
    "data_batch_5": "1cc34303442eec9c0555ac28ec166e0574215d15d5535e01cb3b980ff02cc53a",
    "test_batch": "383f6718f0b254ab79c82c2e6c494ab0e2d06b7904ed26702b8971d34ab5447c",
}


def _layout(tmp_path: Path, name: str, batch: object, writer) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    writer(folder / name, batch)
    return folder


def test_fake_layout_pixel_order_and_labels(fake_cifar_root: Path) -> None:
    images, labels = load_cifar10(fake_cifar_root, "test")
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    # data[i, c*1024 + h*32 + w] = (5 + 7 i + c*1024 + h*32 + w) % 256 (red, green, blue planes, row-major)
    for i, c, h, w in [(0, 0, 0, 0), (3, 1, 2, 5), (9999, 2, 31, 31), (123, 2, 17, 4)]:
        assert int(images[i, c, h, w]) == (5 + 7 * i + c * 1024 + h * 32 + w) % 256
    assert labels.tolist()[:12] == [(5 + i) % 10 for i in range(12)]


def test_accepts_parent_or_batches_folder(fake_cifar_root: Path) -> None:
    a = load_cifar10(fake_cifar_root, "test", subset=50)
    b = load_cifar10(fake_cifar_root / "cifar-10-batches-py", "test", subset=50)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_train_subset_reads_files_in_order(fake_cifar_root: Path) -> None:
    images, labels = load_cifar10(str(fake_cifar_root), "train", subset=10005)
    assert images.shape[0] == labels.shape[0] == 10005
    assert int(images[9999, 0, 0, 0]) == (7 * 9999) % 256  # last row of data_batch_1 (offset 0)
    assert int(images[10000, 0, 0, 1]) == (1 + 1) % 256  # first row of data_batch_2 (offset 1)
    assert labels[10000:10005].tolist() == [1, 2, 3, 4, 5]


def test_subset_needs_only_its_files(tmp_path: Path, batch_writer, make_fake_batch) -> None:
    folder = _layout(tmp_path, "data_batch_1", make_fake_batch(), batch_writer)
    assert load_cifar10(tmp_path, "train", subset=10000)[0].shape[0] == 10000
    with pytest.raises(DataError, match=r"data_batch_2.*missing"):
        load_cifar10(folder, "train", subset=10001)
    with pytest.raises(DataError, match=r"data_batch_2"):
        load_cifar10(folder, "train")


def test_missing_directory_names_path_and_remedy(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_cifar10(missing, "train", subset=10)
    text = str(info.value)
    assert str(missing) in text and "does not exist" in text
    for hint in ("lipdeq data download cifar10 --dest", "LIPDEQ_DATA_DIR", "--data-dir"):
        assert hint in text


def test_directory_without_batches(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither a cifar-10-batches-py folder"):
        load_cifar10(tmp_path, "test")


def test_truncated_fake_file_named(tmp_path: Path, batch_writer, make_fake_batch) -> None:
    folder = _layout(tmp_path, "test_batch", make_fake_batch(), batch_writer)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"test_batch.*truncated or corrupt"):
        load_cifar10(folder, "test", subset=1)


def test_garbage_file_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match=r"test_batch.*cannot unpickle"):
        load_cifar10(folder, "test")


def test_forbidden_global_in_batch_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match=r"test_batch.*builtins\.eval"):
        load_cifar10(folder, "test")


def test_not_a_dict_and_wrong_keys(tmp_path: Path, batch_writer) -> None:
    folder = _layout(tmp_path, "test_batch", [1, 2, 3], batch_writer)
    with pytest.raises(DataError, match=r"test_batch.*expected a pickled dict, got list"):
        load_cifar10(folder, "test")
    batch_writer(folder / "test_batch", {"pixels": np.zeros((10000, 3072), np.uint8), "labels": [0] * 10000})
    with pytest.raises(DataError, match=r"test_batch.*lacks key\(s\) \['data'\]"):
        load_cifar10(folder, "test")


def test_bytes_keys_are_accepted(tmp_path: Path, batch_writer, make_fake_batch) -> None:
    batch = {k.encode(): v for k, v in make_fake_batch(offset=5).items()}
    folder = _layout(tmp_path, "test_batch", batch, batch_writer)
    images, labels = load_cifar10(folder, "test", subset=3)
    assert labels.tolist() == [5, 6, 7] and int(images[1, 0, 0, 0]) == 12


@pytest.mark.parametrize(
    ("data", "shape_text"),
    [
        (np.zeros((5, 3072), np.uint8), r"uint8 of shape \(5, 3072\)"),
        (np.zeros((10000, 32, 32, 3), np.uint8), r"uint8 of shape \(10000, 32, 32, 3\)"),
        (np.zeros((10, 3072), np.float32), r"float32 of shape \(10, 3072\)"),
    ],
)
def test_wrong_image_shape_or_dtype(tmp_path: Path, batch_writer, data: np.ndarray, shape_text: str) -> None:
    folder = _layout(tmp_path, "test_batch", {"data": data, "labels": [0] * len(data)}, batch_writer)
    expected = r"test_batch.*must be uint8 of shape \(10000, 3072\), got " + shape_text
    with pytest.raises(DataError, match=expected):
        load_cifar10(folder, "test")


def test_labels_out_of_range(tmp_path: Path, batch_writer, make_fake_batch) -> None:
    labels = np.arange(10000) % 10
    labels[77] = 10
    folder = _layout(tmp_path, "test_batch", make_fake_batch(labels=labels), batch_writer)
    with pytest.raises(DataError, match=r"test_batch.*labels must lie in 0\.\.9, found values in 0\.\.10"):
        load_cifar10(folder, "test")
    labels[77] = -1
    batch_writer(folder / "test_batch", make_fake_batch(labels=labels))
    with pytest.raises(DataError, match=r"found values in -1\.\.9"):
        load_cifar10(folder, "test")


def test_labels_length_mismatch(tmp_path: Path, batch_writer, make_fake_batch) -> None:
    batch = make_fake_batch()
    batch["labels"] = batch["labels"][:9999]
    folder = _layout(tmp_path, "test_batch", batch, batch_writer)
    with pytest.raises(DataError, match=r"test_batch.*10000 images but 9999 labels"):
        load_cifar10(folder, "test")


def test_bad_split_and_subset(fake_cifar_root: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_cifar10(fake_cifar_root, "val")  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="subset"):
            load_cifar10(fake_cifar_root, "test", subset=bad)
    # more than the split holds: a DataError (a ValueError), so the CLI reports it as one line
    with pytest.raises(DataError, match=r"subset must be <= 10000 .*test split.*10001"):
        load_cifar10(fake_cifar_root, "test", subset=10001)
    for bad in (True, 2.5):  # the wrong type: TypeError, as everywhere (lipdeq.checks)
        with pytest.raises(TypeError, match="subset"):
            load_cifar10(fake_cifar_root, "test", subset=bad)  # type: ignore[arg-type]


def test_sha256_checked_only_on_request(fake_cifar_root: Path) -> None:
    path = fake_cifar_root / "cifar-10-batches-py" / "test_batch"
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_cifar10(fake_cifar_root, "test", subset=2, sha256={"test_batch": good})[0].shape[0] == 2
    with pytest.raises(DataError, match=r"test_batch: sha256 .* does not match"):
        load_cifar10(fake_cifar_root, "test", subset=2, sha256={"test_batch": "0" * 64})


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LIPDEQ_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("LIPDEQ_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    monkeypatch.setenv("LIPDEQ_DATA_DIR", "")
    assert resolve_data_dir(None) is None
    with pytest.raises(DataError, match="--data-dir DIR .* LIPDEQ_DATA_DIR=DIR"):
        resolve_data_dir(None, required=True)
    assert resolve_data_dir(tmp_path / "p", required=True) == tmp_path / "p"


# --- real data -------------------------------------------------------------------------------------


def test_real_test_subset(real_cifar_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = load_cifar10(real_cifar_dir.parent, "test", subset=100)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (100,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == FIRST_TEST_LABELS
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 100 and counts.numel() == 10 and int(counts.min()) >= 3
    means = images.float().div(255).mean(dim=(0, 2, 3))
    # 100 images: the standard error of a channel mean is about 0.012.
    torch.testing.assert_close(means, torch.tensor(PUBLISHED_TEST_MEAN), atol=0.04, rtol=0)


def test_real_train_subset_matches_plain_unpickling(real_cifar_dir: Path) -> None:
    images, labels = load_cifar10(real_cifar_dir, "train", subset=10003)
    with (real_cifar_dir / "data_batch_2").open("rb") as fh:
        plain = pickle.load(fh, encoding="latin1")  # trusted local file: an independent oracle
    expected = torch.from_numpy(plain["data"][:3].reshape(3, 3, 32, 32))
    assert torch.equal(images[10000:], expected)
    assert labels[10000:].tolist() == plain["labels"][:3]


def test_real_truncated_copy_named(real_cifar_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with (real_cifar_dir / "test_batch").open("rb") as fh:
        (folder / "test_batch").write_bytes(fh.read(1000))
    with pytest.raises(DataError, match=rf"{folder / 'test_batch'}.*truncated or corrupt"):
        load_cifar10(folder, "test", subset=10)


def test_real_sha256_matches_documented(real_cifar_dir: Path) -> None:
    meta = real_cifar_dir / "batches.meta"
    assert hashlib.sha256(meta.read_bytes()).hexdigest() == SHARED_COPY_SHA256["batches.meta"]
    # and load_cifar10's own check accepts the copy with the documented digests
    images, _ = load_cifar10(real_cifar_dir, "test", subset=5, sha256=SHARED_COPY_SHA256)
    assert images.shape == (5, 3, 32, 32)

