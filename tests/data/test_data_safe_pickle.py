"""The restricted unpickler admits numpy arrays and plain containers, and nothing that runs code."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from lipdeq.data import DataError, restricted_load


class _RunsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_rejects_os_system_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _RunsSystem(marker)}, protocol=2)
    with pytest.raises(DataError, match=r"evil_file.*forbidden global (posix|nt|os)\.system"):
        restricted_load(io.BytesIO(payload), what="evil_file")
    assert not marker.exists()
    # Sanity check of the oracle: the ordinary unpickler would have run the command.
    pickle.loads(payload)
    assert marker.exists()


def test_rejects_builtins_eval() -> None:
    payload = b"cbuiltins\neval\n(S'1+1'\ntR."
    assert pickle.loads(payload) == 2  # the crafted pickle is a valid call of eval
    with pytest.raises(DataError, match=r"some.pkl.*builtins\.eval"):
        restricted_load(io.BytesIO(payload), what="some.pkl")


@pytest.mark.parametrize("protocol", [3, 4])
def test_roundtrips_numpy_batch_dict(protocol: int) -> None:
    obj = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": [1, 2, 3], "name": "x"}
    out = restricted_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)), what="mem")
    assert set(out) == {"data", "labels", "name"}
    np.testing.assert_array_equal(out["data"], obj["data"])
    assert out["data"].dtype == np.uint8 and out["labels"] == [1, 2, 3]


def test_accepts_legacy_numpy_core_path_without_warning() -> None:
    """Files written by numpy 1.x name numpy.core.multiarray._reconstruct (as the real CIFAR files)."""
    raw = pickle.dumps({"data": np.arange(6, dtype=np.uint8)}, protocol=3)
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    legacy = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = restricted_load(io.BytesIO(legacy), what="legacy")
    np.testing.assert_array_equal(out["data"], np.arange(6, dtype=np.uint8))


def test_python2_str_keys_decode_as_latin1() -> None:
    payload = b"\x80\x02}q\x00U\x04dataq\x01U\x02\xe9zs."  # {str 'data': str '\xe9z'} as Python 2 writes
    assert restricted_load(io.BytesIO(payload), what="py2") == {"data": "\xe9z"}
