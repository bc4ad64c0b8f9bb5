"""The global random number generators as tensors: capture for a checkpoint, restore on resume."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

_KNOWN = frozenset({"torch", "python.state", "python.gauss", "numpy.keys", "numpy.pos", "numpy.gauss"})


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Snapshot the torch (CPU and every CUDA device), Python ``random`` and NumPy global RNGs as tensors."""
    state: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    state["python.state"] = torch.tensor([version, *internal], dtype=torch.int64)
    state["python.gauss"] = torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64)
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if kind != "MT19937":
        raise ValueError(f"unsupported NumPy bit generator {kind!r}")
    state["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    state["numpy.pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    state["numpy.gauss"] = torch.tensor([cached], dtype=torch.float64)
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Restore RNGs captured by :func:`capture_rng_state`; returns the keys restored.

    CUDA states are restored only where that device exists (a GPU checkpoint resumed on CPU skips
    them: compare the returned keys with ``state``). Unknown keys raise ValueError.
    """
    restored: list[str] = []
    for key in state:
        if key not in _KNOWN and not re.fullmatch(r"cuda\.\d+", key):
            raise ValueError(f"rng_state has unknown key {key!r}")
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
        restored.append("torch")
    for key, value in state.items():
        if key.startswith("cuda."):
            index = int(key.split(".")[1])
            if torch.cuda.is_available() and index < torch.cuda.device_count():
                torch.cuda.set_rng_state(value.to("cpu", torch.uint8), index)
                restored.append(key)
    if "python.state" in state:
        values = [int(v) for v in state["python.state"].tolist()]
        gauss_flag, gauss = state["python.gauss"].tolist() if "python.gauss" in state else (0.0, 0.0)
        random.setstate((values[0], tuple(values[1:]), gauss if gauss_flag else None))
        restored += [k for k in ("python.state", "python.gauss") if k in state]
    if "numpy.keys" in state:
        pos, has_gauss = (int(v) for v in state["numpy.pos"].tolist())
        cached = float(state["numpy.gauss"].item())
        keys = state["numpy.keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, has_gauss, cached))
        restored += [k for k in ("numpy.keys", "numpy.pos", "numpy.gauss") if k in state]
    return restored
