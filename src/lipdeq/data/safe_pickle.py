"""A restricted unpickler for the CIFAR-10 python batches: numpy arrays and plain containers only."""

from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np

from lipdeq.data.errors import DataError

__all__ = ["restricted_load", "RestrictedUnpickler"]

try:  # numpy >= 2 keeps the implementation in numpy._core; the old path only warns on import.
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are limited to what numpy arrays in the CIFAR format need."""

    def __init__(self, file: IO[bytes], *, what: str) -> None:
        super().__init__(file, encoding="latin1")
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; anything else raises :class:`DataError` without importing it."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.what}: refusing to unpickle forbidden global {module}.{name} "
                "(only numpy arrays are allowed in a CIFAR-10 batch file)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Persistent ids never occur in CIFAR files; reject them."""
        raise DataError(f"{self.what}: refusing to unpickle a persistent id")


def restricted_load(fileobj: IO[bytes], *, what: str) -> Any:
    """Unpickle ``fileobj`` (latin1 strings) allowing only numpy arrays and builtin containers.

    ``what`` names the source in errors. Forbidden globals raise :class:`DataError`; other unpickling
    failures propagate so that the caller can name the corrupt file.
    """
    return RestrictedUnpickler(fileobj, what=what).load()
