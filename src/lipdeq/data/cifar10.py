"""Reader for the CIFAR-10 python batches (``cifar-10-batches-py``) with strict validation."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from lipdeq.checks import check_int
from lipdeq.data.errors import DataError, validate_arrays
from lipdeq.data.safe_pickle import restricted_load

__all__ = [
    "BATCH_DIR_NAME",
    "CIFAR10_CLASSES",
    "DATA_DIR_ENV",
    "ROWS_PER_BATCH",
    "TEST_FILES",
    "TRAIN_FILES",
    "DataError",
    "load_cifar10",
    "locate_batches_dir",
    "resolve_data_dir",
]

BATCH_DIR_NAME = "cifar-10-batches-py"
DATA_DIR_ENV = "LIPDEQ_DATA_DIR"
ROWS_PER_BATCH = 10000
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILES = ("test_batch",)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_HOW_TO_GET = (
    "get the data with `lipdeq data download cifar10 --dest DIR` (or copy an extracted "
    f"{BATCH_DIR_NAME} folder there by hand), then pass --data-dir DIR or set {DATA_DIR_ENV}=DIR"
)


@overload
def resolve_data_dir(explicit: str | os.PathLike[str] | None, *, required: Literal[True]) -> Path: ...
@overload
def resolve_data_dir(explicit: str | os.PathLike[str] | None, *, required: bool = False) -> Path | None: ...
def resolve_data_dir(explicit: str | os.PathLike[str] | None, *, required: bool = False) -> Path | None:
    """The data directory: ``explicit`` (``--data-dir``) if given, else ``$LIPDEQ_DATA_DIR`` if set.

    These two are the only places the library looks. With neither, return None, or with
    ``required=True`` raise :class:`DataError` saying how to provide the data.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    if required:
        raise DataError(
            "dataset 'cifar10' needs its data directory: pass --data-dir DIR (data_dir=...) or set "
            f"{DATA_DIR_ENV}=DIR, where DIR holds {BATCH_DIR_NAME}; to fetch it run "
            "`lipdeq data download cifar10 --dest DIR`, or use the embedded dataset 'synthetic'"
        )
    return None


def locate_batches_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Return the ``cifar-10-batches-py`` folder given that folder itself or its parent.

    Raises :class:`DataError` (naming the path and how to get the data) when neither holds batches.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"CIFAR-10 data directory {str(root)!r} does not exist; {_HOW_TO_GET}")
    if not root.is_dir():
        raise DataError(f"CIFAR-10 data directory {str(root)!r} is not a directory; {_HOW_TO_GET}")
    nested = root / BATCH_DIR_NAME
    if nested.is_dir():
        return nested
    known = ("batches.meta", *TRAIN_FILES, *TEST_FILES)
    if root.name == BATCH_DIR_NAME or any((root / name).exists() for name in known):
        return root
    raise DataError(
        f"{str(root)!r} holds neither a {BATCH_DIR_NAME} folder nor CIFAR-10 batch files; {_HOW_TO_GET}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_batch(path: Path, expected_sha256: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one batch file; returns (data uint8 (10000, 3072), labels int64 (10000,))."""
    what = str(path)
    if path.exists() and not path.is_file():  # a directory or a device: "missing" would send the user astray
        raise DataError(f"CIFAR-10 batch file {what!r} is not a regular file (a directory, device or "
                        f"socket); replace it with the batch file; {_HOW_TO_GET}")
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file {what!r} is missing; {_HOW_TO_GET}")
    if expected_sha256 is not None:
        actual = _sha256(path)
        if actual != expected_sha256.lower():
            raise DataError(f"{what}: sha256 {actual} does not match the expected {expected_sha256}")
    try:
        with path.open("rb") as fh:
            obj = restricted_load(fh, what=what)
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{what}: cannot unpickle CIFAR-10 batch (truncated or corrupt file?): "
            f"{type(exc).__name__}: {exc}; re-download it"
        ) from exc
    except OSError as exc:
        raise DataError(f"{what}: cannot read file: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{what}: expected a pickled dict, got {type(obj).__name__}")
    keys = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in keys]
    if missing:
        raise DataError(f"{what}: batch dict lacks key(s) {missing}; found keys {sorted(map(str, keys))}")
    data, labels_raw = keys["data"], keys["labels"]
    if not isinstance(data, np.ndarray):
        raise DataError(f"{what}: 'data' must be a numpy array, got {type(data).__name__}")
    if data.dtype != np.uint8 or data.shape != (ROWS_PER_BATCH, 3 * 32 * 32):
        raise DataError(
            f"{what}: 'data' must be uint8 of shape ({ROWS_PER_BATCH}, 3072), "
            f"got {data.dtype} of shape {data.shape}"
        )
    if not isinstance(labels_raw, (list, tuple, np.ndarray)):
        raise DataError(f"{what}: 'labels' must be a list of ints, got {type(labels_raw).__name__}")
    labels = np.asarray(labels_raw)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{what}: 'labels' must be a flat list of ints, got dtype {labels.dtype}, "
                        f"shape {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{what}: {data.shape[0]} images but {labels.shape[0]} labels (lengths must match)")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{what}: labels must lie in 0..9, found values in {labels.min()}..{labels.max()}")
    return data, labels


def load_cifar10(
    data_dir: str | os.PathLike[str],
    split: Literal["train", "test"],
    subset: int | None = None,
    *,
    sha256: Mapping[str, str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Load CIFAR-10 as (images uint8 (N, 3, 32, 32), labels int64 (N,)) in the original order.

    ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent. ``subset`` keeps the first
    ``subset`` images and reads only the batch files needed. ``sha256`` (file name -> hex digest)
    verifies the files read. Problems with the files, and a ``subset`` larger than the split,
    raise :class:`DataError`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = TRAIN_FILES if split == "train" else TEST_FILES
    total = ROWS_PER_BATCH * len(files)
    if subset is not None:
        check_int("subset", subset, minimum=1)
        if subset > total:  # usually a configuration (data.*_subset) asking for more than exists
            raise DataError(f"subset must be <= {total} (the CIFAR-10 {split} split), got {subset}")
    n = total if subset is None else subset
    folder = locate_batches_dir(data_dir)
    datas: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for name in files[: math.ceil(n / ROWS_PER_BATCH)]:
        expected = None if sha256 is None else sha256.get(name)
        data, lab = _read_batch(folder / name, expected)
        keep = min(ROWS_PER_BATCH, n - ROWS_PER_BATCH * len(datas))
        datas.append(data[:keep])
        labels.append(lab[:keep])
    images = torch.from_numpy(np.concatenate(datas).reshape(n, 3, 32, 32))
    targets = torch.from_numpy(np.concatenate(labels))
    validate_arrays(images, targets, what=f"CIFAR-10 {split} split in {folder}")
    return images, targets
