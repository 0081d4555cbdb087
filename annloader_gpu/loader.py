"""``AnnDataLoader``: a drop-in replacement for ``scvi.dataloaders.AnnDataLoader``.

Same signature, defaults and batches as scvi-tools' loader (a ``torch.utils.data.DataLoader``
subclass whose batches are dicts keyed by data-registry keys), but the registered fields are
prepared once (:class:`~annloader_gpu.dataset.PreparedData`) and each batch is gathered by the
compiled kernels straight into its output arrays: the multi-threaded C++ core on the CPU, the
CUDA kernels when the data is resident on a GPU.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from .batch_iterator import BatchIterator, identity_collate, new_stream
from .dataset import AnnDataset, PreparedData, normalize_indices
from .registry import as_registry
from .residency import (
    DEVICE_MEMORY_BUDGET,
    RESIDENCIES,
    bytes_to_place,
    gpu_data_devices,
    place,
    resolve_device,
    resolve_residency,
)
from .sampler import check_batch_size

__all__ = ["AnnDataLoader", "RESIDENCIES", "DEVICE_MEMORY_BUDGET"]

# DataLoader options that only mean something with worker processes.
_WORKER_ONLY_OPTIONS = ("persistent_workers", "prefetch_factor", "multiprocessing_context")
# Extras for distributed_sampler=True, passed to BatchDistributedSampler (scvi-tools takes them
# from the initialised process group only).
_DISTRIBUTED_OPTIONS = ("num_replicas", "rank", "seed")


class AnnDataLoader(DataLoader):
    """DataLoader for batches of registered AnnData fields, gathered by compiled kernels.

    Parameters are those of ``scvi.dataloaders.AnnDataLoader``:

    adata_manager
        scvi-tools' ``AnnDataManager`` or an :class:`~annloader_gpu.registry.AnnDataRegistry`.
    indices
        Observations to load: ints (negative ones count from the end), an int array, or a boolean
        mask of length ``n_obs``. Out of range raises IndexError. Default: all.
    batch_size
        Minibatch size (per replica with ``distributed_sampler``). Must be positive.
    shuffle
        Shuffle the observations every epoch; seed it with DataLoader's ``generator`` argument.
    sampler
        A sampler whose items are batches of dataset positions (lists or arrays of ints). As in
        scvi-tools, DataLoader then collates each item with ``batch_size=1``, so batches carry a
        leading dimension of 1.
    drop_last
        Drop the last incomplete batch.
    drop_dataset_tail
        With ``distributed_sampler``: drop the dataset tail instead of padding it so that it divides
        evenly between replicas.
    data_and_attributes
        ``None`` (all registered keys), a list of keys (default dtypes: int64 for batch, labels,
        extra_categorical_covs and ind_x, float32 otherwise) or a dict {key: dtype}.
    iter_ndarray
        Yield numpy arrays instead of torch tensors (host only).
    distributed_sampler
        Use :class:`~annloader_gpu.sampler.BatchDistributedSampler`. World size and rank come from
        the initialised process group, or (an extension) from ``num_replicas=``, ``rank=`` and
        ``seed=`` keyword arguments.
    load_sparse_tensor
        Yield sparse fields as torch sparse tensors with the source's layout (CSR or CSC).
    **kwargs
        Passed to ``torch.utils.data.DataLoader``. ``num_workers > 0`` is accepted with a warning:
        batches are gathered in-process by the multi-threaded compiled core.

    Keyword-only extras:

    device
        Where batches are yielded: "cpu", "cuda", "cuda:1" or a torch.device. Default: "cuda"
        when annloader_gpu's GPU path is usable, else "cpu"; with ``distributed_sampler=True``,
        this rank's GPU (:func:`~annloader_gpu.distributed.local_device`: the one chosen with
        ``torch.cuda.set_device``, else ``cuda:LOCAL_RANK``).
    residency
        Where the prepared data lives when device is a GPU: "device" (GPU memory), "pinned",
        "host" (gathered on the CPU, then copied), or "auto". On the CPU only "auto" and "host".
    prefetch
        With the CUDA kernels gathering (residency "device" or "pinned"), gather the next batch on
        a side stream while the current one is consumed. Batches are handed over with stream
        ordering (the consumer's stream waits for the gather; the caching allocator is told the
        tensors are used there), so batches the consumer keeps are never overwritten. No effect
        on the CPU.

    Shuffling on the GPU: pass ``generator=torch.Generator(device="cuda")`` (seeded as you like)
    to draw each epoch's permutation on the GPU; the default (a CPU generator, or none) draws it
    on the host exactly as scvi-tools' ``RandomSampler`` does and uploads it once per epoch.
    """

    def __init__(
        self,
        adata_manager: Any,
        indices: Any = None,
        batch_size: int = 128,
        shuffle: bool = False,
        sampler: Sampler | None = None,
        drop_last: bool = False,
        drop_dataset_tail: bool = False,
        data_and_attributes: list[str] | dict[str, Any] | None = None,
        iter_ndarray: bool = False,
        distributed_sampler: bool = False,
        load_sparse_tensor: bool = False,
        *,
        device: Any = None,
        residency: str = "auto",
        prefetch: bool = True,
        **kwargs,
    ):
        # --- everything that can be checked before touching the data -----------------------
        # As in scvi-tools, batch_size only sizes the default (or distributed) sampler's batches: with
        # a user sampler it is ignored (DataLoader groups the sampler's items one at a time).
        if sampler is None:
            batch_size = check_batch_size(batch_size)
        if sampler is not None and distributed_sampler:
            raise ValueError("Cannot specify both `sampler` and `distributed_sampler`.")
        if residency not in RESIDENCIES:
            raise ValueError(f"residency must be one of {', '.join(map(repr, RESIDENCIES))}, got {residency!r}")
        if device is None and distributed_sampler and not iter_ndarray:
            # Under torchrun each rank loads onto its own GPU: the one set with
            # torch.cuda.set_device, else cuda:LOCAL_RANK (cpu without a usable GPU).
            from .distributed import local_device

            device = local_device()
        self.device = resolve_device(device, iter_ndarray=iter_ndarray)
        if iter_ndarray and self.device.type != "cpu":
            raise ValueError("iter_ndarray=True yields host numpy arrays; use device='cpu' (or leave device unset)")
        if not isinstance(prefetch, (bool, np.bool_)):
            raise TypeError(f"prefetch must be True or False, got {prefetch!r}")
        self.prefetch = bool(prefetch)
        _check_generator(kwargs.get("generator"), self.device)
        adata_manager = as_registry(adata_manager)
        n_obs = int(adata_manager.adata.shape[0])
        self.indices = normalize_indices(indices, n_obs)

        # --- the data, prepared once -------------------------------------------------------
        prepared = PreparedData(adata_manager, data_and_attributes, load_sparse_tensor)
        self.residency = resolve_residency(residency, self.device, bytes_to_place(prepared, self.device),
                                           data_devices=gpu_data_devices(prepared))
        prepared, self.residency = place(prepared, self.device, self.residency, residency)
        if self.device.type == "cuda":
            # Set-up work (conversions of GPU-resident sources, device-to-device copies) sits on the
            # stream current now, which need not be the one batches are gathered on: finish it once.
            torch.cuda.current_stream(self.device).synchronize()
        self.dataset = AnnDataset(prepared, self.indices)
        self._iter_ndarray = bool(iter_ndarray)

        # --- DataLoader options, as scvi-tools passes them ----------------------------------
        kwargs.setdefault("num_workers", 0)
        kwargs.setdefault("persistent_workers", False)
        self._requested_num_workers = kwargs["num_workers"]
        if isinstance(kwargs["num_workers"], int) and kwargs["num_workers"] > 0:
            ignored = [name for name in _WORKER_ONLY_OPTIONS if kwargs.get(name) not in (None, False)]
            warnings.warn(
                f"num_workers={kwargs['num_workers']} ignored: annloader_gpu gathers each batch in-process "
                "with its multi-threaded compiled core (set the thread count with "
                "annloader_gpu.set_num_threads), so the loader uses num_workers=0"
                + (f"; also ignored: {', '.join(ignored)}" if ignored else ""),
                UserWarning,
                stacklevel=2,
            )
            kwargs["num_workers"] = 0
            for name in _WORKER_ONLY_OPTIONS:
                kwargs.pop(name, None)
            kwargs["persistent_workers"] = False
        distributed_options = {name: kwargs.pop(name) for name in _DISTRIBUTED_OPTIONS if name in kwargs}
        if distributed_options and not distributed_sampler:
            raise TypeError(
                f"{', '.join(distributed_options)} only apply with distributed_sampler=True"
            )
        self.kwargs = copy.deepcopy(kwargs)

        self._default_sampler: BatchSampler | None = None
        if sampler is None:
            if not distributed_sampler:
                if shuffle:
                    inner = RandomSampler(self.dataset, generator=kwargs.get("generator"))
                else:
                    inner = SequentialSampler(self.dataset)
                sampler = BatchSampler(sampler=inner, batch_size=batch_size, drop_last=drop_last)
                self._default_sampler = sampler
            else:
                from .sampler import BatchDistributedSampler

                sampler = BatchDistributedSampler(
                    self.dataset,
                    batch_size=batch_size,
                    drop_last=drop_last,
                    drop_dataset_tail=drop_dataset_tail,
                    shuffle=shuffle,
                    **distributed_options,
                )
            # The sampler yields whole batches: no automatic batching.
            self.kwargs.update({"batch_size": None, "shuffle": False})
        self.kwargs.update({"sampler": sampler})
        if iter_ndarray:
            self.kwargs.update({"collate_fn": identity_collate})
        super().__init__(self.dataset, **self.kwargs)

    # --- what the data costs -------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of prepared data this loader gathers from (shared with loaders over the same data)."""
        return self.dataset.data.resident_bytes

    @property
    def bytes_per_nonzero(self) -> float | None:
        """Resident bytes per non-zero of a sparse X (None when X is dense or not loaded)."""
        return self.dataset.data.x_bytes_per_nonzero

    # --- iteration -----------------------------------------------------------------------

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def _prefetch_stream(self) -> torch.cuda.Stream:
        stream = self.__dict__.get("_side_stream")
        if stream is None:
            stream = self.__dict__["_side_stream"] = new_stream(self.device)
        return stream


def _check_generator(generator: Any, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    where = generator.device
    if where.type == "cpu":
        return
    if where.type != "cuda" or device.type != "cuda":
        raise ValueError(
            f"generator lives on {where} but batches are gathered on {device}; use a CPU generator "
            f"(torch.Generator()) or a generator on the loader's device"
        )
    index = where.index if where.index is not None else torch.cuda.current_device()
    if index != device.index:
        raise ValueError(f"generator lives on cuda:{index} but the loader's device is {device}")
