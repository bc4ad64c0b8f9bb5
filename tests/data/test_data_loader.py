"""BatchIterator: exact mid-epoch resume, DistributedSampler-style sharding, determinism."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from lipdeq.data import BatchIterator, DataError, random_crop_flip, to_float_normalized


def _data(n: int = 53) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images; the labels are the sample ids, so batches reveal which samples they hold."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(n)


def _make(**overrides) -> BatchIterator:
    images, labels = _data(overrides.pop("n", 53))
    kwargs = {"shuffle": True, "augment": True, "seed": 7, "drop_last": False}
    kwargs.update(overrides)
    batch_size = kwargs.pop("batch_size", 8)
    return BatchIterator(images, labels, batch_size, **kwargs)


def _collect(it: BatchIterator, epochs: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(epochs):
        epoch = it.epoch
        out.extend((epoch, x, y) for x, y in it)
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        ea == eb and torch.equal(xa, xb) and torch.equal(ya, yb) for (ea, xa, ya), (eb, xb, yb) in zip(a, b)
    )


def test_len_and_batch_shapes() -> None:
    it = _make(batch_size=8)
    assert len(it) == 7  # ceil(53 / 8)
    batches = list(it)
    assert len(batches) == 7 and batches[-1][0].shape == (5, 3, 8, 8)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    assert len(_make(batch_size=8, drop_last=True)) == 6


def test_without_augment_yields_normalised_images_of_the_labelled_samples() -> None:
    images, _ = _data()
    for x, y in _make(augment=False):
        assert torch.equal(x, to_float_normalized(images[y]))


def test_epoch_is_a_permutation_and_epochs_differ() -> None:
    it = _make()
    first = torch.cat([y for _, y in it])
    second = torch.cat([y for _, y in it])
    assert sorted(first.tolist()) == list(range(53)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    assert it.epoch == 2 and it.state_dict() == {"epoch": 2, "batch_in_epoch": 0}


def test_two_instances_agree() -> None:
    assert _same(_collect(_make(), 2), _collect(_make(), 2))
    assert not _same(_collect(_make(), 1), _collect(_make(seed=8), 1))


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_resume_mid_epoch_is_exact(k: int) -> None:
    full = _collect(_make(), 2)  # epochs 0 and 1, 7 batches each
    it = _make()
    it.set_epoch(1)
    for i, _ in enumerate(it):
        if i == k:
            break
    state = it.state_dict()
    assert state == {"epoch": 1, "batch_in_epoch": k + 1}
    resumed = _make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual call at the top of a training loop must keep the position
    rest = [(resumed.epoch, x, y) for x, y in resumed]
    assert _same(rest, full[7 + k + 1 :])


def test_resume_at_end_of_epoch_in_a_training_loop() -> None:
    """Saved after the last batch of epoch 0: the loop's epoch 0 is empty, epoch 1 is unchanged."""
    full = _collect(_make(), 2)
    it = _make()
    it.load_state_dict({"epoch": 0, "batch_in_epoch": 7})
    seen = []
    for epoch in range(0, 2):
        it.set_epoch(epoch)
        seen.extend((epoch, x, y) for x, y in it)
    assert _same(seen, full[7:])
    assert it.state_dict() == {"epoch": 2, "batch_in_epoch": 0}


def test_augmentation_uses_documented_generator() -> None:
    """Batch k of epoch e equals random_crop_flip with a generator seeded from (seed, epoch, k, rank)."""
    from lipdeq.data import derive_seed

    images, _ = _data()
    it = _make()
    it.set_epoch(3)
    for k, (x, y) in enumerate(it):
        gen = torch.Generator().manual_seed(derive_seed("augment", 7, 3, k, 0))
        assert torch.equal(x, to_float_normalized(random_crop_flip(images[y], 4, gen)))


@pytest.mark.parametrize(("n", "world_size"), [(53, 3), (48, 4), (5, 4)])
def test_ranks_match_distributed_sampler(n: int, world_size: int) -> None:
    """Unshuffled shards equal torch's DistributedSampler(shuffle=False), padded by wrapping."""
    images, labels = _data(n)
    ids = []
    for rank in range(world_size):
        it = BatchIterator(images, labels, 4, shuffle=False, augment=False, seed=0, drop_last=False,
                           rank=rank, world_size=world_size)
        got = torch.cat([y for _, y in it]).tolist()
        ref = list(DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False))
        assert got == ref
        ids.append(got)
    assert len({len(v) for v in ids}) == 1


def test_shuffled_ranks_partition_the_data() -> None:
    images, labels = _data(50)
    shards = []
    for rank in range(2):
        it = BatchIterator(images, labels, 6, shuffle=True, augment=True, seed=3, drop_last=False,
                           rank=rank, world_size=2)
        assert len(it) == 5
        it.set_epoch(2)
        shards.append(torch.cat([y for _, y in it]).tolist())
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(50))


def test_bad_arguments() -> None:
    images, labels = _data()
    base = {"shuffle": False, "augment": False, "seed": 0, "drop_last": False}
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(images, labels, 0, **base)
    with pytest.raises(ValueError, match="rank"):
        BatchIterator(images, labels, 4, rank=2, world_size=2, **base)
    with pytest.raises(ValueError, match="labels"):
        BatchIterator(images, labels[:-1], 4, **base)
    with pytest.raises(TypeError, match="uint8"):
        BatchIterator(images.float(), labels, 4, **base)
    with pytest.raises(DataError, match="leaves no batch"):  # a ValueError too; one line in the CLI
        BatchIterator(images, labels, 64, **{**base, "drop_last": True})
    it = BatchIterator(images, labels, 4, **base)
    with pytest.raises(ValueError, match="keys"):
        it.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="exceeds"):
        it.load_state_dict({"epoch": 0, "batch_in_epoch": 99})
