"""load_dataset and validate_arrays: the entry points shared by training and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lipdeq.data as data
from lipdeq.data import DataError, load_dataset, make_synthetic, validate_arrays


def test_synthetic_defaults_and_subset() -> None:
    x, y = load_dataset("synthetic", "test")
    assert x.shape == (2000, 3, 32, 32) and y.shape == (2000,)
    xs, ys = load_dataset("synthetic", "train", subset=30, seed=4)
    ref = make_synthetic(30, "train", seed=4)
    assert torch.equal(xs, ref[0]) and torch.equal(ys, ref[1])
    assert data.SYNTHETIC_DEFAULT_SIZES == {"train": 10000, "test": 2000}


def test_cifar10_without_data_dir_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIPDEQ_DATA_DIR", raising=False)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", subset=10)
    for hint in ("--data-dir", "LIPDEQ_DATA_DIR", "lipdeq data download cifar10", "synthetic"):
        assert hint in str(info.value)


def test_cifar10_from_env_and_argument(fake_cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPDEQ_DATA_DIR", str(fake_cifar_root))
    x, y = load_dataset("cifar10", "test", subset=12)
    assert x.shape == (12, 3, 32, 32) and y.tolist() == [(5 + i) % 10 for i in range(12)]
    monkeypatch.setenv("LIPDEQ_DATA_DIR", "/nonexistent/elsewhere")
    x2, _ = load_dataset("cifar10", "test", subset=12, data_dir=fake_cifar_root)  # argument wins
    assert torch.equal(x, x2)


def test_unknown_name_or_split() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic", "validation")  # type: ignore[arg-type]


def _ok() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 9, 2])


@pytest.mark.parametrize(
    ("images", "labels", "pattern"),
    [
        (_ok()[0].float(), _ok()[1], r"X: images must have dtype torch.uint8, got torch.float32"),
        (torch.zeros(4, 32, 32, 3, dtype=torch.uint8), _ok()[1], r"X: images .*\(4, 32, 32, 3\)"),
        (_ok()[0], _ok()[1].int(), r"X: labels must have dtype torch.int64"),
        (_ok()[0], _ok()[1][:3], r"X: 4 images but 3 labels"),
        (_ok()[0], torch.tensor([0, 1, 10, 2]), r"X: labels must lie in 0\.\.9, found values in 0\.\.10"),
        (_ok()[0], torch.tensor([[0, 1, 2, 3]]), r"X: labels must be one-dimensional"),
        (_ok()[0].numpy(), _ok()[1], r"X: images must be a torch.Tensor"),
    ],
)
def test_validate_arrays_names_the_problem(images, labels, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        validate_arrays(images, labels, what="X")


def test_validate_arrays_accepts_good_pair() -> None:
    validate_arrays(*_ok(), what="ok")


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
