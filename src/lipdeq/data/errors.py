"""The data error type and the array validation shared by every dataset path."""

from __future__ import annotations

import torch
from torch import Tensor

from lipdeq.errors import LipdeqError

__all__ = ["NUM_CLASSES", "IMAGE_SHAPE", "DataError", "validate_arrays"]

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)


class DataError(LipdeqError, ValueError):
    """A dataset is missing, unreadable, corrupt or malformed; the message names the file or array."""


def validate_arrays(images: Tensor, labels: Tensor, *, what: str) -> None:
    """Check a dataset pair: images uint8 (N, 3, 32, 32), labels int64 (N,) with values in 0..9.

    ``what`` names the data (a file, a split) in the error message. Raises :class:`DataError`.
    """
    if not isinstance(images, Tensor):
        raise DataError(f"{what}: images must be a torch.Tensor, got {type(images).__name__}")
    if not isinstance(labels, Tensor):
        raise DataError(f"{what}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if images.dtype != torch.uint8:
        raise DataError(f"{what}: images must have dtype torch.uint8, got {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise DataError(f"{what}: images must have shape (N, 3, 32, 32), got {tuple(images.shape)}")
    if labels.dtype != torch.int64:
        raise DataError(f"{what}: labels must have dtype torch.int64, got {labels.dtype}")
    if labels.dim() != 1:
        raise DataError(f"{what}: labels must be one-dimensional (N,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{what}: {images.shape[0]} images but {labels.shape[0]} labels (lengths must match)"
        )
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= NUM_CLASSES:
            raise DataError(f"{what}: labels must lie in 0..{NUM_CLASSES - 1}, found values in {lo}..{hi}")
