"""Datasets: the CIFAR-10 python batches, the embedded synthetic texture set, augmentation, batching.

``load_dataset`` is the single entry point used by training: it returns uint8 images (N, 3, 32, 32)
and int64 labels (N,), validated by :func:`validate_arrays`; :class:`BatchIterator` turns them into
deterministic, resumable, rank-sharded float batches.
"""

from __future__ import annotations

import os
from typing import Literal

from torch import Tensor

from lipdeq.data.cifar10 import (
    CIFAR10_CLASSES,
    DATA_DIR_ENV,
    load_cifar10,
    locate_batches_dir,
    resolve_data_dir,
)
from lipdeq.data.download import CIFAR10_MD5, CIFAR10_URL, download_cifar10, is_complete_copy
from lipdeq.data.errors import DataError, validate_arrays
from lipdeq.data.loader import BatchIterator, derive_seed
from lipdeq.data.safe_pickle import restricted_load
from lipdeq.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from lipdeq.data.transforms import CIFAR10_MEAN, CIFAR10_STD, random_crop_flip, to_float_normalized

__all__ = [
    "BatchIterator",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "DATA_DIR_ENV",
    "DATASETS",
    "DataError",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DEFAULT_SIZES",
    "derive_seed",
    "download_cifar10",
    "is_complete_copy",
    "load_cifar10",
    "load_dataset",
    "locate_batches_dir",
    "make_synthetic",
    "random_crop_flip",
    "resolve_data_dir",
    "restricted_load",
    "to_float_normalized",
    "validate_arrays",
]

DATASETS = ("cifar10", "synthetic")
SYNTHETIC_DEFAULT_SIZES = {"train": 10000, "test": 2000}


def load_dataset(
    name: Literal["cifar10", "synthetic"],
    split: Literal["train", "test"],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Load a dataset split as (images uint8 (N, 3, 32, 32), labels int64 (N,)).

    ``synthetic``: :func:`make_synthetic` with ``subset`` images (default 10,000 train / 2,000 test)
    from ``seed``. ``cifar10``: the first ``subset`` images (all if None) from ``data_dir``, else
    ``$LIPDEQ_DATA_DIR``; with neither, :class:`DataError` says how to provide the data.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "synthetic":
        n = SYNTHETIC_DEFAULT_SIZES[split] if subset is None else subset
        images, labels = make_synthetic(n, split, seed=seed)
    elif name == "cifar10":
        images, labels = load_cifar10(resolve_data_dir(data_dir, required=True), split, subset)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    validate_arrays(images, labels, what=f"dataset {name!r} split {split!r}")
    return images, labels
