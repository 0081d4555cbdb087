"""Distributed batch sampler with the exact semantics of scvi-tools' ``BatchDistributedSampler``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from itertools import islice

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["BatchDistributedSampler"]


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_batch_size(batch_size) -> int:
    """batch_size as an int, or ValueError: it must be a positive integer."""
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)


def check_world(num_replicas, rank) -> tuple[int, int]:
    """(num_replicas, rank) as ints, or ValueError naming the one that is out of range."""
    if not _is_int(num_replicas) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}.")
    if not _is_int(rank) or not 0 <= rank < num_replicas:
        raise ValueError(
            f"rank must be an integer in [0, {num_replicas - 1}] for num_replicas={num_replicas}, "
            f"got {rank!r}."
        )
    return int(num_replicas), int(rank)


def _resolve_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill in ``num_replicas``/``rank`` from the process group when not given, and check them."""
    if num_replicas is None or rank is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "num_replicas and rank must be passed explicitly when no torch.distributed "
                "process group is initialised (call torch.distributed.init_process_group first, "
                "or pass e.g. num_replicas=1, rank=0)."
            )
        if num_replicas is None:
            num_replicas = dist.get_world_size()
        if rank is None:
            rank = dist.get_rank()
    return check_world(num_replicas, rank)


class BatchDistributedSampler(DistributedSampler):
    """Yields this replica's share of the dataset as lists of indices, one list per minibatch.

    Parameters
    ----------
    dataset
        Anything with ``len()``; only its length is used.
    batch_size
        Minibatch size per replica; the effective global batch is ``batch_size * num_replicas``.
    drop_last
        Drop this replica's last batch when it is smaller than ``batch_size``.
    drop_dataset_tail
        Drop the dataset tail so it divides evenly by ``num_replicas``; if ``False`` the
        (possibly shuffled) index list is padded by repeating its start instead.
    num_replicas, rank
        World size and this process's rank; taken from the initialised process group if omitted.
    shuffle, seed
        Shuffle with a generator seeded by ``seed + epoch`` (see :meth:`set_epoch`).
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int = 128,
        drop_last: bool = False,
        drop_dataset_tail: bool = False,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        batch_size = check_batch_size(batch_size)
        num_replicas, rank = _resolve_world(num_replicas, rank)
        # The parent's ``drop_last`` is the dataset-tail switch; scvi-tools names the batch-level
        # switch ``drop_last_batch``, and code written against scvi reads both attributes.
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_dataset_tail,
        )
        self.batch_size = batch_size
        self.drop_last_batch = drop_last

    @property
    def drop_dataset_tail(self) -> bool:
        return self.drop_last

    def epoch_positions(self) -> np.ndarray:
        """This replica's positions for the epoch, before batching: exactly what
        ``DistributedSampler.__iter__`` yields, computed with numpy (the loader maps and uploads
        them once per epoch instead of once per batch)."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).numpy()
        else:
            indices = np.arange(n, dtype=np.int64)
        if not self.drop_last:  # pad by repeating the start, as often as needed
            indices = np.concatenate([indices, np.resize(indices, self.total_size - n)])
        else:
            indices = indices[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        replica_indices = super().__iter__()
        while batch := list(islice(replica_indices, self.batch_size)):
            if len(batch) < self.batch_size and self.drop_last_batch:
                return
            yield batch

    def __len__(self) -> int:
        """Number of batches this replica yields per epoch."""
        if self.drop_last_batch:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)
