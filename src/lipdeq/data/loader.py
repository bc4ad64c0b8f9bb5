"""Deterministic, resumable, rank-sharded batch iteration over in-memory uint8 image tensors."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from lipdeq.checks import check_int
from lipdeq.data.errors import DataError
from lipdeq.data.transforms import random_crop_flip, to_float_normalized

__all__ = ["BatchIterator", "derive_seed"]


def derive_seed(*parts: int | str) -> int:
    """Hash a tuple of ints/strings to a 63-bit seed (independent streams for distinct tuples)."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class BatchIterator:
    """Iterate (x float32 normalised, y int64) batches on CPU, deterministically and resumably.

    Epoch ``e`` visits ``randperm(N)`` drawn from a generator seeded by ``(seed, e)`` (or ``0..N-1``
    without ``shuffle``). Like ``DistributedSampler``, the order is padded by wrapping to a multiple
    of ``world_size`` and rank ``r`` takes positions ``r, r + world_size, ...``, so every rank has
    the same number of batches. With ``augment``, batch ``k`` is cropped/flipped by
    :func:`random_crop_flip` (on uint8, zero = black padding, before normalisation) using a generator
    seeded by ``(seed, epoch, k, rank)``, so resuming at any batch reproduces the uninterrupted run.

    Position: ``state_dict()`` gives ``{"epoch", "batch_in_epoch"}`` (the next batch to yield);
    iterating yields the rest of the current epoch and then moves to the next epoch. So the loop
    ``for e in range(start, n): it.set_epoch(e); for x, y in it: ...`` resumes exactly after
    ``it.load_state_dict(saved)``, even when the saved position is the end of an epoch.
    """

    def __init__(
        self,
        images_uint8: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        is_tensor = isinstance(images_uint8, Tensor)
        if not is_tensor or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise TypeError(
                "images_uint8 must be a uint8 tensor (N, C, H, W), got "
                f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                f"{tuple(getattr(images_uint8, 'shape', ()))}"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
            raise TypeError(
                f"labels must be an int64 tensor (N,), got {getattr(labels, 'dtype', type(labels).__name__)} "
                f"{tuple(getattr(labels, 'shape', ()))}"
            )
        if labels.shape[0] != images_uint8.shape[0]:
            raise ValueError(f"{images_uint8.shape[0]} images but {labels.shape[0]} labels")
        if images_uint8.shape[0] == 0:
            raise ValueError("images_uint8 is empty")
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank, minimum=0, maximum=self.world_size - 1)
        check_int("seed", seed)
        self.images = images_uint8.cpu()
        self.labels = labels.cpu()
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.num_samples = math.ceil(self.images.shape[0] / self.world_size)
        if self.drop_last and self.num_samples < self.batch_size:
            # Reached from a configuration (a batch larger than the data subset): the user's to fix.
            raise DataError(
                f"drop_last with batch_size={batch_size} leaves no batch: each of the {world_size} rank(s) "
                f"gets only {self.num_samples} samples"
            )
        self._epoch = 0
        self._batch = 0

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` at batch 0; a call with the current epoch keeps the position (resume-safe)."""
        check_int("epoch", epoch, minimum=0)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch = 0

    def state_dict(self) -> dict[str, int]:
        """The position: the current epoch and the index of the next batch within it."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        if set(state) != {"epoch", "batch_in_epoch"}:
            raise ValueError(
                f"state must have exactly the keys epoch and batch_in_epoch, got {sorted(state)}"
            )
        epoch = check_int("state['epoch']", state["epoch"], minimum=0)
        batch = check_int("state['batch_in_epoch']", state["batch_in_epoch"], minimum=0)
        if batch > len(self):
            raise ValueError(f"state['batch_in_epoch']={batch} exceeds the {len(self)} batches per epoch")
        self._epoch, self._batch = epoch, batch

    def epoch_indices(self, epoch: int) -> Tensor:
        """The sample indices this rank visits in ``epoch`` (before batching), int64."""
        n = self.images.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[self.rank : total : self.world_size]

    def _make_batch(self, epoch: int, k: int, indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = indices[k * self.batch_size : (k + 1) * self.batch_size]
        images = self.images[idx]
        if self.augment:
            gen = torch.Generator().manual_seed(derive_seed("augment", self.seed, epoch, k, self.rank))
            images = random_crop_flip(images, padding=4, generator=gen)
        return to_float_normalized(images), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the remaining batches of the current epoch (none if it is complete), then advance.

        After the last batch the position becomes ``(epoch + 1, 0)`` once the loop asks for more.
        """
        epoch = self._epoch
        indices = self.epoch_indices(epoch)
        while self._batch < len(self):
            k = self._batch
            batch = self._make_batch(epoch, k, indices)
            self._batch = k + 1
            yield batch
        self._epoch, self._batch = epoch + 1, 0
