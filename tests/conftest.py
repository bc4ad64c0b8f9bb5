"""Shared fixtures: the real CIFAR-10 copy beside the checkout (../shared/data), one thread per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _single_thread():
    """Run every test single-threaded (restored afterwards): the tensors are small, and on a shared
    2-core machine intra-op threads mostly wait on each other (a 1x4x7x7 conv2d took ~20 ms instead
    of ~0.01 ms). Tests that launch processes set their own thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
