"""Multi-process (torchrun / DDP) helpers: per-rank devices, world discovery, sharded residency.

Under ``torchrun`` every process (rank) builds its own loader. Two layouts are offered by
:func:`distributed_loader`:

``residency="auto" | "device" | "host"`` (replicated, the default)
    Every rank prepares the whole registered data on its own device and draws its batches with
    :class:`~annloader_gpu.sampler.BatchDistributedSampler` (scvi-tools' semantics): each epoch
    one global permutation of all rows, seeded by ``seed + epoch`` and therefore identical on
    every rank, is padded (or its tail dropped, ``drop_dataset_tail=True``) to a multiple of the
    world size and dealt round-robin to the ranks. Statistically this is global shuffling.

``residency="sharded"``
    Each rank prepares (and uploads) only a fixed, seeded random partition of the rows — about
    ``1 / world_size`` of them — so the data set may be ``world_size`` times larger than one
    device holds. Each epoch every rank shuffles *its own* partition (seeded by
    ``(seed, epoch, rank)``) and yields batches from it (:class:`ShardedBatchSampler`).

    Statistical difference from global shuffling: across ranks an epoch still visits every row
    exactly once (up to the same padding/dropping of at most ``world_size - 1`` rows that the
    replicated sampler does), and each rank's batches are uniform samples of its partition.
    But the partition is fixed for the whole run: the rows that share a rank's batch — and hence
    a DDP step's per-rank gradient — are always drawn from the same ``1 / world_size`` of the
    data, while with global shuffling any two rows can meet in a batch. Because the partition is
    uniformly random (not by sample, batch or file order), each rank's partition is an unbiased
    sample of the data and the all-reduced gradient of a step is an unbiased estimate of the full
    gradient, like with global shuffling; what changes is the joint distribution of batches (a
    stratified rather than a simple random sample, which if anything lowers the variance of the
    averaged gradient), and any per-rank state computed from batches (e.g. un-synchronised batch
    norm statistics) sees only its partition. In practice this is the layout of most sharded
    large-scale loaders (WebDataset, Mosaic streaming without global shuffle); for small data
    sets, or models with per-rank batch statistics, prefer the replicated layout.

    Re-partitioning (``repartition_every=k``): every ``k`` epochs the ranks move to the partition
    of round ``epoch // k`` (seeded by ``(seed, round)``), exchanging the rows that change hands
    device to device with one all-to-all per array (NCCL between GPUs, gloo on the CPU;
    :mod:`annloader_gpu.repartition`). No host copy of the data is made: only row ids and counts
    cross the host. Over a run, rows then meet rows of every other partition, which removes the
    fixed-partition caveat above at the cost of one exchange of about the whole data set every
    ``k`` epochs (and, during it, room for about three partitions per rank).

Batches per epoch are equal on every rank in both layouts (a mismatch would hang DDP's
all-reduce); :func:`distributed_loader` checks this across the process group when one is
initialised.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .loader import AnnDataLoader
from .sampler import check_batch_size, check_world

__all__ = [
    "SHARDED",
    "ShardedAnnDataLoader",
    "ShardedBatchSampler",
    "RowSubsetRegistry",
    "distributed_loader",
    "init_distributed",
    "local_device",
    "partition_positions",
    "world_info",
]

#: Residency values accepted by :func:`distributed_loader` besides the loader's own.
SHARDED = "sharded"


# --------------------------------------------------------------------------------------------
# World and device discovery


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world_info(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)``.

    Explicit ``num_replicas``/``rank`` win; then the initialised process group; then torchrun's
    ``WORLD_SIZE``/``RANK`` environment variables; else a single process ``(1, 0, 0)``.
    ``local_rank`` comes from ``LOCAL_RANK`` (default: ``rank`` on one node, else 0).
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size() if num_replicas is None else num_replicas
        this = dist.get_rank() if rank is None else rank
    else:
        world = _env_int("WORLD_SIZE") if num_replicas is None else num_replicas
        this = _env_int("RANK") if rank is None else rank
        world = 1 if world is None else world
        this = 0 if this is None else this
    world, this = check_world(world, this)
    local = _env_int("LOCAL_RANK")
    if local is None:
        local_world = _env_int("LOCAL_WORLD_SIZE")
        local = this if local_world in (None, world) else 0
    return int(world), int(this), int(local)


def local_device(device: Any = None) -> torch.device:
    """The device this rank should load onto.

    ``device`` given: returned as a ``torch.device``. Otherwise, when annloader_gpu's GPU path is
    usable: the device chosen with ``torch.cuda.set_device`` if one other than 0 was chosen, else
    ``cuda:LOCAL_RANK`` (modulo the visible device count, so one visible GPU per rank — e.g.
    ``CUDA_VISIBLE_DEVICES`` set per rank — gives ``cuda:0``). Without a usable GPU: ``cpu``.
    """
    if device is not None:
        return torch.device(device)
    from ._cuda_module import gpu_usable

    if not (torch.cuda.is_available() and gpu_usable()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if torch.cuda.is_initialized() and torch.cuda.current_device() != 0:
        return torch.device("cuda", torch.cuda.current_device())
    _world, _rank, local = world_info()
    return torch.device("cuda", local % count)


def init_distributed(backend: str | None = None, device: Any = None, **kwargs) -> torch.device:
    """Initialise the default process group for this rank (if needed) and return its device.

    The backend follows the device: ``nccl`` for CUDA, ``gloo`` for the CPU. For CUDA the device
    is made current (``torch.cuda.set_device``) before the group is created, so NCCL binds each
    rank to its own GPU. ``kwargs`` go to ``torch.distributed.init_process_group`` (its default
    ``init_method="env://"`` reads torchrun's environment).
    """
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda" and backend == "nccl":
            kwargs.setdefault("device_id", dev)
        dist.init_process_group(backend=backend, **kwargs)
    return dev


# --------------------------------------------------------------------------------------------
# Sharded sampling


def partition_positions(n: int, num_replicas: int, rank: int, seed: int = 0, round_: int = 0) -> np.ndarray:
    """Positions (sorted int64) of rank ``rank``'s share of ``n`` rows in partition round ``round_``.

    One permutation of ``range(n)``, seeded by ``seed`` and the round only (so every rank computes
    the same one without communicating), dealt round-robin: ranks below ``n % num_replicas`` get
    ``ceil(n / num_replicas)`` rows, the others ``floor``. The partitions are disjoint and
    cover all rows.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.Generator(np.random.PCG64(partition_seed_sequence(seed, round_)))
    perm = rng.permutation(n).astype(np.int64)
    return np.sort(perm[rank::num_replicas])


def partition_seed_sequence(seed: int, round_: int = 0) -> np.random.SeedSequence:
    """The seed of the partition permutation: ``seed`` alone for round 0 (the set-up partition),
    ``(seed, round)`` for a re-partition round."""
    words = [int(seed), 0x5A4D] if int(round_) == 0 else [int(seed), 0x5A4D, int(round_)]
    return np.random.SeedSequence(words)


class ShardedBatchSampler(Sampler[np.ndarray]):
    """Batches of positions within this rank's partition, reshuffled every epoch.

    Parameters
    ----------
    partition_size
        Rows this rank holds (positions ``0 .. partition_size - 1`` of its sharded dataset).
    n_total
        Rows over all ranks (the sum of the partition sizes).
    batch_size, drop_last, drop_dataset_tail, shuffle, seed
        As :class:`~annloader_gpu.sampler.BatchDistributedSampler`: each rank yields
        ``num_samples`` positions per epoch, ``n_total // world`` with ``drop_dataset_tail``
        (a rank holding one more row leaves out a different random one each epoch), else
        ``ceil(n_total / world)`` (a rank holding one row fewer repeats the first position of
        its epoch order), cut into batches of ``batch_size`` (the last one dropped when
        incomplete with ``drop_last``). So every rank yields ``len(self)`` batches, and across
        ranks an epoch visits each row exactly once when ``world`` divides ``n_total``.
    num_replicas, rank
        World size and rank (from the process group when omitted).
    """

    def __init__(
        self,
        partition_size: int,
        n_total: int,
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
        world, this, _local = world_info(num_replicas, rank)
        lo, hi = n_total // world, -(-n_total // world)
        if partition_size not in (lo, hi):
            raise ValueError(
                f"partition_size={partition_size} does not fit n_total={n_total} over {world} ranks "
                f"(expected {lo} or {hi})"
            )
        if not drop_dataset_tail and partition_size == 0 and n_total > 0:
            raise ValueError(
                f"{n_total} rows cannot be sharded over {world} ranks without drop_dataset_tail=True: "
                f"rank {this} holds no row to pad with"
            )
        self.partition_size = int(partition_size)
        self.n_total = int(n_total)
        self.batch_size = int(batch_size)
        self.drop_last_batch = bool(drop_last)
        self.drop_dataset_tail = bool(drop_dataset_tail)
        self.num_replicas, self.rank = world, this
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = lo if drop_dataset_tail else hi

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_positions(self) -> np.ndarray:
        """This epoch's positions, before batching (length ``num_samples``)."""
        m = self.partition_size
        if self.shuffle:
            rng = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, self.rank, 0x5348]))
            )
            order = rng.permutation(m).astype(np.int64)
        else:
            order = np.arange(m, dtype=np.int64)
        if m >= self.num_samples:
            return order[: self.num_samples]
        return np.concatenate([order, order[: self.num_samples - m]])

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.epoch_positions()
        bs = self.batch_size
        stop = (len(order) // bs) * bs if self.drop_last_batch else len(order)
        for start in range(0, stop, bs):
            yield order[start : start + bs]

    def __len__(self) -> int:
        if self.drop_last_batch:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


# --------------------------------------------------------------------------------------------
# A registry restricted to some rows


def _take_rows(data: Any, rows: np.ndarray) -> Any:
    if isinstance(data, str):  # scvi-tools' minify marker
        return data
    if hasattr(data, "iloc"):  # pandas DataFrame / Series
        return data.iloc[rows]
    return data[rows]  # scipy sparse, numpy, anndata backed datasets (rows are sorted)


class RowSubsetRegistry:
    """A registry (scvi-tools ``AnnDataManager`` or ours) restricted to ``rows``, duck-typed.

    ``get_from_registry`` returns the registered array's ``rows`` (a host copy of just those
    rows: a CSR row slice, a numpy take, ``DataFrame.iloc``); everything else (``data_registry``,
    ``summary_stats``, ``get_state_registry``, ...) is the base registry's, so categorical
    encodings and summary statistics are those of the whole data. ``adata`` is an AnnData view
    of the rows. An ``ind_x`` field (scvi-tools' ``_indices``) keeps the global observation ids.
    """

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self._base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.adata = base.adata[self.rows]

    @property
    def data_registry(self):
        return self._base.data_registry

    def get_from_registry(self, registry_key: str) -> Any:
        return _take_rows(self._base.get_from_registry(registry_key), self.rows)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)

    def __repr__(self) -> str:
        return f"RowSubsetRegistry({len(self.rows)} of {self._base.adata.shape[0]} rows of {self._base!r})"


# --------------------------------------------------------------------------------------------
# The loaders


class ShardedAnnDataLoader(AnnDataLoader):
    """An :class:`~annloader_gpu.AnnDataLoader` over one rank's partition of the rows.

    Built by :func:`distributed_loader` with ``residency="sharded"``: ``adata_manager`` is a
    :class:`RowSubsetRegistry` of the partition (so only those rows are prepared and uploaded)
    and batches come from ``sharded_sampler``. The base loader is built with
    ``distributed_sampler=True, num_replicas=1, rank=0``; its ``sampler`` (a
    ``DistributedSampler``, so Lightning leaves the loader alone) carries the epoch:
    ``loader.sampler.set_epoch(e)`` or ``loader.set_epoch(e)`` reshuffle the partition.
    ``partition`` holds the partition's global observation indices (sorted).
    """

    def __init__(self, adata_manager: Any, sharded_sampler: ShardedBatchSampler, *,
                 partition: np.ndarray | None = None, held_positions: np.ndarray | None = None,
                 all_rows: np.ndarray | None = None, repartition_every: int | None = None, **kwargs) -> None:
        if repartition_every is not None and (not isinstance(repartition_every, (int, np.integer))
                                              or isinstance(repartition_every, bool) or repartition_every < 1):
            raise ValueError(f"repartition_every must be a positive number of epochs or None, got {repartition_every!r}")
        if repartition_every is not None and (held_positions is None or all_rows is None):
            raise ValueError("repartition_every needs held_positions and all_rows (use distributed_loader)")
        if len(adata_manager.adata) != sharded_sampler.partition_size:
            raise ValueError(
                f"the registry has {len(adata_manager.adata)} rows but the sampler's partition "
                f"{sharded_sampler.partition_size}"
            )
        self._sharded_sampler = sharded_sampler
        self.partition = partition
        self.partition_round = 0
        self.repartition_every = None if repartition_every is None else int(repartition_every)
        self._held_positions = held_positions  # positions into all_rows, in storage order
        self._all_rows = all_rows  # the sharded index space: normalised indices of the whole data
        self._base_registry = getattr(adata_manager, "_base", None)
        kwargs.update(distributed_sampler=True, num_replicas=1, rank=0)
        kwargs.setdefault("seed", sharded_sampler.seed)
        kwargs.setdefault("shuffle", sharded_sampler.shuffle)
        super().__init__(adata_manager, None, batch_size=sharded_sampler.batch_size, **kwargs)
        if self.repartition_every is not None:
            host_only = [k for k, f in self.dataset.data.fields.items() if f.storage.kind == "fallback"]
            if host_only:
                raise TypeError(
                    f"repartition_every: registry keys {host_only} are sliced on the host (dtypes the kernels "
                    "cannot read) and cannot be exchanged between devices; register them with a numeric dtype"
                )
            _repartition_on_sampler_epoch(self)

    @property
    def _index_sampler(self):  # DataLoader's hook: what iteration and len() draw from
        sharded = self.__dict__.get("_sharded_sampler")
        if sharded is None or getattr(self, "batch_sampler", None) is not None:
            return super()._index_sampler
        # The base sampler carries the epoch: Lightning and scvi-style code call
        # loader.sampler.set_epoch(e).
        base = getattr(self, "sampler", None)
        sharded.set_epoch(getattr(base, "epoch", sharded.epoch))
        return sharded

    @property
    def sharded_sampler(self) -> ShardedBatchSampler:
        return self._sharded_sampler

    def set_epoch(self, epoch: int) -> None:
        """Reshuffles for ``epoch``; with ``repartition_every=k``, first moves to partition round
        ``epoch // k`` (a collective: every rank calls set_epoch with the same epoch).
        ``loader.sampler.set_epoch(epoch)``, which Lightning calls, does the same."""
        self.sampler.set_epoch(epoch)
        self._sharded_sampler.set_epoch(epoch)

    def _follow_epoch(self, epoch: int) -> None:
        round_ = int(epoch) // self.repartition_every
        if round_ != self.partition_round:
            self.repartition(round_)

    def repartition(self, round_: int) -> None:
        """Moves this rank to partition round ``round_`` (:func:`partition_positions` with it),
        exchanging rows with the other ranks device to device (:mod:`annloader_gpu.repartition`:
        all-to-all over NCCL on GPUs, gloo on the CPU; no host copy of the data). Collective:
        every rank of the default process group calls it with the same round, between epochs."""
        from .dataset import PreparedData
        from .repartition import exchange_partition, owners

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("repartition() exchanges rows between ranks: initialise the process group first")
        if self._held_positions is None or self._all_rows is None or self._base_registry is None:
            raise RuntimeError("this loader was not built by distributed_loader(residency='sharded')")
        sampler = self._sharded_sampler
        if dist.get_world_size() != sampler.num_replicas or dist.get_rank() != sampler.rank:
            raise RuntimeError(
                f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not the one the loader "
                f"was built for (rank {sampler.rank} of {sampler.num_replicas})"
            )
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        backend = _backend_for(device)
        if backend != ("nccl" if device.type == "cuda" else "gloo"):
            raise RuntimeError(
                f"the process group's backend for {device.type} tensors is {backend} but the data lives on {device}: "
                "use nccl for GPU data, gloo for host data"
            )
        _require_same_round(int(round_), self.repartition_every or 0, device)
        new_owner = owners(len(self._all_rows), sampler.num_replicas, sampler.seed, int(round_))
        fields, held = exchange_partition(self.dataset.data, self._held_positions, new_owner, self._all_rows, device)
        partition = self._all_rows[held]
        old = self.dataset.data
        registry = RowSubsetRegistry(self._base_registry, partition)
        self.dataset.data = PreparedData(registry, load_sparse_tensor=old.load_sparse_tensor, _fields=fields,
                                         _n_obs=len(partition))
        self.partition, self._held_positions, self.partition_round = partition, held, int(round_)
        if device.type == "cuda":
            # An iterator made before this call gathers on its side stream, ordered only after what
            # the current stream held when it was made: finish the exchange's writes now.
            torch.cuda.current_stream(device).synchronize()
            del old
            torch.cuda.empty_cache()  # the exchange's peak need not stay reserved for the run


def _backend_for(device: torch.device) -> str:
    """The process group's backend for tensors of device's type ("nccl", "gloo", ...)."""
    config = getattr(dist, "get_backend_config", None)
    if config is not None:
        pairs = dict(part.split(":", 1) for part in config().split(",") if ":" in part)
        if device.type in pairs:
            return pairs[device.type]
    return dist.get_backend()


def _require_same_round(round_: int, every: int, device: torch.device) -> None:
    """Every rank moves to the same round with the same setting, or all of them raise here
    (instead of exchanging into mismatched partitions, or hanging in the exchange)."""
    mine = torch.tensor([round_, every], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    seen = [tuple(int(v) for v in t.tolist()) for t in everyone]
    if len(set(seen)) != 1:
        raise RuntimeError(
            "ranks disagree on the partition round (round, repartition_every): "
            + ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
            + "; call set_epoch with the same epoch on every rank"
        )


def _repartition_on_sampler_epoch(loader: ShardedAnnDataLoader) -> None:
    """Makes ``loader.sampler.set_epoch`` re-partition first, so Lightning (which calls the
    sampler's set_epoch, not the loader's) re-partitions too. The sampler refers to the loader
    weakly: a sampler kept alive does not keep the loader's data alive."""
    sampler = loader.sampler
    set_sampler_epoch = sampler.set_epoch
    loader_ref = weakref.ref(loader)

    def set_epoch(epoch: int) -> None:
        owner = loader_ref()
        if owner is not None:
            owner._follow_epoch(epoch)
        set_sampler_epoch(epoch)

    sampler.set_epoch = set_epoch


def _check_batches_agree(n_batches: int, n_total: int, batch_size: int, seed: int, device: torch.device,
                         repartition_every: int = 0) -> None:
    """All ranks agree on batch count, data size, batch size, seed and re-partition period (else
    raise now rather than hang later)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    use_cuda = dist.get_backend() == "nccl"
    dev = device if (use_cuda and device.type == "cuda") else (
        torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))
    mine = torch.tensor([n_batches, n_total, batch_size, seed, repartition_every], dtype=torch.int64, device=dev)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    rows = [tuple(t.tolist()) for t in everyone]
    if len(set(rows)) != 1:
        raise RuntimeError(
            "ranks disagree on (batches per epoch, n_obs, batch_size, seed, repartition_every): "
            + ", ".join(f"rank {r}: {v}" for r, v in enumerate(rows))
            + "; every rank must build its loader with the same data, batch_size, seed and repartition_every"
        )


def distributed_loader(
    adata_manager: Any,
    indices: Any = None,
    batch_size: int = 128,
    shuffle: bool = True,
    drop_last: bool = False,
    drop_dataset_tail: bool = False,
    *,
    residency: str = "auto",
    device: Any = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    check: bool = True,
    repartition_every: int | None = None,
    **kwargs,
):
    """This rank's :class:`~annloader_gpu.AnnDataLoader` for DDP.

    ``device`` defaults to :func:`local_device` (``cuda:LOCAL_RANK`` or the
    ``torch.cuda.set_device`` choice; the CPU without a GPU). World size and rank come from the
    process group (or ``num_replicas``/``rank``). ``seed`` must be the same on every rank.

    ``residency``: the loader's values (``"auto"``, ``"device"``, ``"host"``): every rank holds
    all rows, sampled with ``distributed_sampler=True``; or ``"sharded"``: this rank holds only
    its partition (:func:`partition_positions` of ``indices``), placed in device memory on a GPU
    (host memory on the CPU). See the module docstring for what sharding changes statistically.

    ``repartition_every=k`` (sharded only): ``loader.set_epoch(e)`` moves the ranks to partition
    round ``e // k``, exchanging rows device to device (see :meth:`ShardedAnnDataLoader.repartition`),
    so over a run every row meets every other in some rank's partition. ``loader.sampler.set_epoch``
    (what Lightning calls) re-partitions too.

    With ``check=True`` and an initialised process group the ranks compare their batch counts
    (one small all_gather) and raise instead of hanging later. ``kwargs`` go to the loader
    (``data_and_attributes``, ``load_sparse_tensor``, DataLoader options).
    """
    from .dataset import normalize_indices

    dev = local_device(device)
    world, this, _local = world_info(num_replicas, rank)
    n_obs = int(adata_manager.adata.shape[0])
    if repartition_every is not None and residency != SHARDED:
        raise ValueError("repartition_every applies to residency='sharded' only (replicated ranks hold every row)")
    if residency != SHARDED:
        loader = AnnDataLoader(
            adata_manager, indices, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            drop_dataset_tail=drop_dataset_tail, distributed_sampler=True, device=dev, residency=residency,
            num_replicas=world, rank=this, seed=seed, **kwargs,
        )
        n_total = len(loader.dataset)
    else:
        rows = normalize_indices(indices, n_obs)
        n_total = len(rows)
        positions = partition_positions(n_total, world, this, seed)
        partition = rows[positions]
        order = np.argsort(partition, kind="stable")  # sorted rows: sequential host reads
        partition, positions = partition[order], positions[order]
        sharded = ShardedBatchSampler(
            len(partition), n_total, batch_size, drop_last, drop_dataset_tail,
            num_replicas=world, rank=this, shuffle=shuffle, seed=seed,
        )
        inner_residency = "device" if dev.type == "cuda" else "auto"
        loader = ShardedAnnDataLoader(
            RowSubsetRegistry(adata_manager, partition), sharded, partition=partition, held_positions=positions,
            all_rows=rows, repartition_every=repartition_every, device=dev, residency=inner_residency, **kwargs,
        )
    if check:
        _check_batches_agree(len(loader), n_total, batch_size, seed, dev, repartition_every or 0)
    return loader
