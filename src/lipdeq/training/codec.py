"""Nested Python data as strict JSON plus a side table of tensors (the checkpoint's metadata codec).

JSON alone loses tuples, non-string keys and non-finite floats, and cannot hold tensors; each is
written as a one-key marker object (``{"__tuple__": [...]}``, ``{"__dict__": [[k, v], ...]}``,
``{"__float__": "inf"}``, ``{"__tensor__": name}``), so :func:`decode` returns what was encoded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["decode", "dedup_tensors", "encode"]

_MARKERS = frozenset({"__tensor__", "__tuple__", "__dict__", "__float__"})


def encode(obj: Any, path: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """Encode nested Python data as JSON; tensors go (as CPU copies) to ``tensors`` under a name
    derived from ``path``, and are refused with TypeError when ``tensors`` is None."""
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise TypeError(f"{path}: tensors are not allowed here; store plain JSON-safe values")
        name, n = path, 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not _MARKERS.intersection(obj):
            return {k: encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {
            "__dict__": [
                [encode(k, f"{path}.<key>", None), encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"{path}: cannot store a {type(obj).__name__} in a checkpoint (JSON-safe values and tensors only)"
    )


def decode(obj: Any, tensors: Mapping[str, torch.Tensor] | None, path: str) -> Any:
    """Invert :func:`encode`; a tensor marker whose name is not in ``tensors`` raises KeyError
    naming ``path`` (the file the tensors came from)."""
    if isinstance(obj, list):
        return [decode(v, tensors, path) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((key, value),) = obj.items()
            if key == "__tensor__":
                if tensors is None or value not in tensors:
                    raise KeyError(f"{path}: tensor {value!r} is missing from the checkpoint")
                return tensors[value]
            if key == "__tuple__":
                return tuple(decode(v, tensors, path) for v in value)
            if key == "__float__":
                return float(value)
            if key == "__dict__":
                return {decode(k, tensors, path): decode(v, tensors, path) for k, v in value}
        return {k: decode(v, tensors, path) for k, v in obj.items()}
    return obj


def dedup_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU copies of ``state`` with each shared tensor (tied weights) stored once, and the map from
    every dropped key to the key that holds its data (safetensors refuses shared storage)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in state.items():
        ident = None
        if value.numel() > 0 and value.layout == torch.strided:
            ident = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                tuple(value.stride()),
                value.dtype,
                str(value.device),
            )
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases
