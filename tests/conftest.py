"""Shared fixtures: the real CIFAR-10 copy beside the checkout (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_cifar_dir() -> Path:
    """The real CIFAR-10 batches beside the checkout; skip when absent, but fail when CI == 'true'."""
    folder = SHARED_DATA / "cifar-10-batches-py"
    if not (folder / "test_batch").is_file():
        message = f"real CIFAR-10 data not found at {folder} (expected ../shared/data beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return folder
