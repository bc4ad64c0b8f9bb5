"""The one validator convention: TypeError for a wrong type, ValueError for a value out of range."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from lipdeq.checks import check_int, check_real
from lipdeq.data import BatchIterator, make_synthetic, random_crop_flip
from lipdeq.lipschitz.activations import ScaledReLU
from lipdeq.lipschitz.dropout import VariationalDropout2d
from lipdeq.lipschitz.operator_norm import power_iteration_conv_norm
from lipdeq.solvers import solve


def test_check_int() -> None:
    assert check_int("n", 3) == 3
    assert check_int("n", 0, minimum=0, maximum=0) == 0
    for bad in (True, 2.0, "3", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match="n must be <= 4, got 5"):
        check_int("n", 5, minimum=1, maximum=4)


def test_check_real() -> None:
    value = check_real("x", 2)
    assert value == 2.0 and type(value) is float
    assert check_real("x", 0.0, above=0.0, inclusive=True) == 0.0
    assert check_real("x", 1.0, below=1.0, below_inclusive=True) == 1.0
    assert check_real("x", math.inf, above=1.0, finite=False) == math.inf
    for bad in (True, "1.0", None, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="x must be a real number"):
            check_real("x", bad)
    with pytest.raises(ValueError, match="got nan"):
        check_real("x", math.nan, finite=False)  # NaN is refused even where infinities are allowed
    with pytest.raises(ValueError, match="finite"):
        check_real("x", -math.inf)
    with pytest.raises(ValueError, match=r"x must be > 0.0, got 0.0"):
        check_real("x", 0.0, above=0.0)
    with pytest.raises(ValueError, match=r"x must be >= 0.0 and < 1.0, got 1.0"):
        check_real("x", 1.0, above=0.0, inclusive=True, below=1.0)
    with pytest.raises(ValueError, match=r"x must be >= 0.0"):
        check_real("x", -0.5, above=0.0, inclusive=True)


_IMAGES = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
_LABELS = torch.zeros(8, dtype=torch.int64)
_LOADER = {"shuffle": False, "augment": False, "seed": 0, "drop_last": False}

# (what, call with a wrong type, call with a value out of range): the same fault, the same error
# type in every module that validates an argument.
CASES: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
    ("solve tol", lambda: solve(lambda z: z, torch.zeros(1, 2), tol="1e-3"),
     lambda: solve(lambda z: z, torch.zeros(1, 2), tol=-1.0)),
    ("solve max_iter", lambda: solve(lambda z: z, torch.zeros(1, 2), max_iter=2.5),
     lambda: solve(lambda z: z, torch.zeros(1, 2), max_iter=0)),
    ("anderson m", lambda: solve(lambda z: z, torch.zeros(1, 2), m=2.0),
     lambda: solve(lambda z: z, torch.zeros(1, 2), m=0)),
    ("picard tau", lambda: solve(lambda z: z, torch.zeros(1, 2), method="picard", tau="1"),
     lambda: solve(lambda z: z, torch.zeros(1, 2), method="picard", tau=0.0)),
    ("relu slope", lambda: ScaledReLU("0.4"), lambda: ScaledReLU(math.inf)),
    ("dropout p", lambda: VariationalDropout2d(True, rescale=False), lambda: VariationalDropout2d(1.0, rescale=False)),
    ("power iteration n_iter", lambda: power_iteration_conv_norm(torch.ones(1, 1, 3, 3), (4, 4), n_iter=1.0),
     lambda: power_iteration_conv_norm(torch.ones(1, 1, 3, 3), (4, 4), n_iter=-1)),
    ("synthetic n", lambda: make_synthetic(2.0, "test"), lambda: make_synthetic(0, "test")),
    ("crop padding", lambda: random_crop_flip(torch.zeros(1, 3, 8, 8), padding=1.5),
     lambda: random_crop_flip(torch.zeros(1, 3, 8, 8), padding=-1)),
    ("loader batch_size", lambda: BatchIterator(_IMAGES, _LABELS, 2.0, **_LOADER),
     lambda: BatchIterator(_IMAGES, _LABELS, 0, **_LOADER)),
    ("loader rank", lambda: BatchIterator(_IMAGES, _LABELS, 2, rank=None, **_LOADER),
     lambda: BatchIterator(_IMAGES, _LABELS, 2, rank=2, world_size=2, **_LOADER)),
]


@pytest.mark.parametrize(("what", "wrong_type", "out_of_range"), CASES, ids=[c[0] for c in CASES])
def test_every_validator_follows_the_convention(what, wrong_type, out_of_range) -> None:
    name = what.split()[-1]
    with pytest.raises(TypeError, match=name):
        wrong_type()
    with pytest.raises(ValueError, match=name):
        out_of_range()
