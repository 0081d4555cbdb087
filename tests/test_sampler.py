"""BatchDistributedSampler: parity with scvi-tools' sampler, invariants, and argument errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from annloader_gpu.sampler import BatchDistributedSampler

DATASET_SIZES = [0, 1, 5, 7, 16, 33, 100]
BATCH_SIZES = [1, 3, 8, 128]
SEEDS = [0, 17]
EPOCHS = [0, 1, 4]


def _batches(sampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.scvi
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("drop_dataset_tail", [False, True])
def test_matches_scvi_on_grid(num_replicas, shuffle, drop_last, drop_dataset_tail):
    scvi_samplers = pytest.importorskip("scvi.dataloaders._samplers")
    seeds = SEEDS if shuffle else SEEDS[:1]
    for n, batch_size, seed, rank in itertools.product(
        DATASET_SIZES, BATCH_SIZES, seeds, range(num_replicas)
    ):
        kwargs = dict(num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        ours = BatchDistributedSampler(
            range(n), batch_size, drop_last=drop_last, drop_dataset_tail=drop_dataset_tail, **kwargs
        )
        reference = scvi_samplers.BatchDistributedSampler(
            range(n), batch_size, drop_last=drop_last, drop_dataset_tail=drop_dataset_tail, **kwargs
        )
        for epoch in EPOCHS:
            expected = _batches(reference, epoch)
            got = _batches(ours, epoch)
            context = f"n={n} batch_size={batch_size} seed={seed} rank={rank} epoch={epoch}"
            assert got == expected, context
            assert len(ours) == len(reference) == len(got), context


@pytest.mark.scvi
@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 300),
    num_replicas=st.integers(1, 8),
    rank_fraction=st.floats(0, 1, exclude_max=True),
    batch_size=st.integers(1, 70),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    drop_last=st.booleans(),
    drop_dataset_tail=st.booleans(),
)
def test_matches_scvi_random(
    n, num_replicas, rank_fraction, batch_size, shuffle, seed, epoch, drop_last, drop_dataset_tail
):
    scvi_samplers = pytest.importorskip("scvi.dataloaders._samplers")
    rank = int(rank_fraction * num_replicas)
    kwargs = dict(
        batch_size=batch_size,
        drop_last=drop_last,
        drop_dataset_tail=drop_dataset_tail,
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
    )
    ours = BatchDistributedSampler(range(n), **kwargs)
    reference = scvi_samplers.BatchDistributedSampler(range(n), **kwargs)
    assert _batches(ours, epoch) == _batches(reference, epoch)
    assert len(ours) == len(reference)


@pytest.mark.parametrize("n", [1, 10, 37])
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 5])
@pytest.mark.parametrize("drop_dataset_tail", [False, True])
def test_replicas_partition_the_dataset(n, num_replicas, drop_dataset_tail):
    per_rank = [
        [
            index
            for batch in BatchDistributedSampler(
                range(n),
                batch_size=4,
                drop_dataset_tail=drop_dataset_tail,
                num_replicas=num_replicas,
                rank=rank,
                seed=3,
            )
            for index in batch
        ]
        for rank in range(num_replicas)
    ]
    assert len({len(indices) for indices in per_rank}) == 1, "ranks got unequal shares"
    everything = [index for indices in per_rank for index in indices]
    if drop_dataset_tail:
        assert len(everything) == n - n % num_replicas
        assert len(set(everything)) == len(everything)
    else:
        assert set(everything) == set(range(n))
        assert len(everything) == math.ceil(n / num_replicas) * num_replicas


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_sizes_and_len(drop_last):
    sampler = BatchDistributedSampler(
        range(23), batch_size=5, drop_last=drop_last, num_replicas=2, rank=1, shuffle=False
    )
    sizes = [len(batch) for batch in sampler]
    # Rank 1 of 2 gets 12 samples (23 padded to 24): 5 + 5 + 2.
    assert sizes == ([5, 5] if drop_last else [5, 5, 2])
    assert len(sampler) == len(sizes)
    assert sampler.drop_last_batch is drop_last
    assert sampler.drop_dataset_tail is False


def test_unshuffled_order_is_strided_by_rank():
    sampler = BatchDistributedSampler(
        range(10), batch_size=3, num_replicas=2, rank=1, shuffle=False
    )
    assert list(sampler) == [[1, 3, 5], [7, 9]]


def test_set_epoch_reshuffles_reproducibly():
    def sampler(seed: int = 0) -> BatchDistributedSampler:
        return BatchDistributedSampler(
            range(200), batch_size=200, num_replicas=1, rank=0, seed=seed
        )

    epoch0, epoch1 = _batches(sampler(), 0), _batches(sampler(), 1)
    assert epoch0 != epoch1
    assert sorted(epoch0[0]) == sorted(epoch1[0]) == list(range(200))
    assert _batches(sampler(), 1) == epoch1
    assert _batches(sampler(seed=1), 0) != epoch0


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        BatchDistributedSampler(range(10), batch_size=batch_size, num_replicas=1, rank=0)


@pytest.mark.parametrize(("num_replicas", "rank"), [(2, 2), (2, -1), (1, 5)])
def test_rejects_rank_outside_world(num_replicas, rank):
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, "):
        BatchDistributedSampler(range(10), num_replicas=num_replicas, rank=rank)


@pytest.mark.parametrize("num_replicas", [0, -1])
def test_rejects_bad_num_replicas(num_replicas):
    with pytest.raises(ValueError, match="num_replicas must be a positive integer"):
        BatchDistributedSampler(range(10), num_replicas=num_replicas, rank=0)


def test_needs_world_without_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="num_replicas and rank must be passed explicitly"):
        BatchDistributedSampler(range(10), batch_size=2)


def test_takes_world_from_process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0
    )
    try:
        sampler = BatchDistributedSampler(range(7), batch_size=3, shuffle=False)
        assert (sampler.num_replicas, sampler.rank) == (1, 0)
        assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6]]
        with pytest.raises(ValueError, match="rank must be"):
            BatchDistributedSampler(range(7), num_replicas=1, rank=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 7])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_dataset_tail", [False, True])
def test_epoch_positions_are_what_iteration_yields(num_replicas, shuffle, drop_dataset_tail):
    """The loader slices epoch_positions() instead of iterating: both must give the same batches."""
    from torch.utils.data import DistributedSampler

    for n, batch_size, seed, epoch, rank in itertools.product(
        [0, 1, 2, 5, 16, 33], [1, 4, 128], SEEDS, EPOCHS, range(num_replicas)
    ):
        sampler = BatchDistributedSampler(range(n), batch_size, drop_dataset_tail=drop_dataset_tail,
                                          num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        positions = sampler.epoch_positions()
        assert positions.tolist() == list(DistributedSampler.__iter__(sampler))
        assert positions.tolist() == [i for batch in sampler for i in batch]
