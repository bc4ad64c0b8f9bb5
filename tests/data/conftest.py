"""Fixtures for the data tests: the shared real CIFAR-10 copy and fake batch files in tmp_path."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def fake_batch(labels: np.ndarray | None = None, offset: int = 0) -> dict[str, Any]:
    """A well-formed batch dict: data[i, j] = (offset + 7 * i + j) % 256, labels default i % 10."""
    rows = ((offset + 7 * np.arange(10000)) % 256).astype(np.uint8)
    cols = (np.arange(3072) % 256).astype(np.uint8)
    data = np.add.outer(rows, cols, dtype=np.uint8)  # uint8 arithmetic wraps: exactly mod 256
    if labels is None:
        labels = (np.arange(10000) + offset) % 10
    return {"batch_label": "fake batch", "data": data, "labels": [int(v) for v in labels]}


def write_pickle(path: Path, obj: Any, protocol: int = 4) -> Path:
    """Pickle ``obj`` to ``path`` (protocol 3/4 keep numpy arrays within the restricted allow-list)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path


@pytest.fixture
def batch_writer() -> Callable[..., Path]:
    """Return ``write_pickle`` for tests that build their own batch files."""
    return write_pickle


@pytest.fixture(scope="session")
def fake_cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parent folder holding cifar-10-batches-py with data_batch_1, data_batch_2 and test_batch."""
    root = tmp_path_factory.mktemp("fake_cifar")
    folder = root / "cifar-10-batches-py"
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    write_pickle(folder / "data_batch_1", fake_batch(offset=0))
    write_pickle(folder / "data_batch_2", fake_batch(offset=1))
    write_pickle(folder / "test_batch", fake_batch(offset=5))
    return root


@pytest.fixture
def make_fake_batch() -> Callable[..., dict[str, Any]]:
    """Return ``fake_batch`` (a well-formed 10000-row batch dict) for tests that alter it."""
    return fake_batch
