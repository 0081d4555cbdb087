"""Iteration over an :class:`~annloader_gpu.AnnDataLoader`: one gather per batch, no DataLoader fetcher.

The default sampler's epoch is mapped to rows (and, for data the CUDA kernels read, uploaded)
once; each batch is then a slice of it. With the CUDA kernels gathering, the next batch is
gathered on a side stream while the consumer uses the current one, and handed over with stream
ordering: the consumer's stream waits for the gathers, and the caching allocator is told where
each batch is used, so batches the consumer keeps are never overwritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_convert

from .dataset import is_scalar_position

if TYPE_CHECKING:
    from .loader import AnnDataLoader

__all__ = ["BatchIterator", "identity_collate", "new_stream"]


def identity_collate(batch):
    """collate_fn of iter_ndarray=True: batches stay the numpy arrays they were gathered into."""
    return batch


def _random_sampler_order(sampler: RandomSampler, n: int) -> np.ndarray | torch.Tensor:
    """The order ``iter(sampler)`` yields, drawing the same random numbers (no per-item Python).

    Mirrors ``RandomSampler.__iter__`` without replacement: with no generator it seeds a fresh
    one from the global RNG; then one ``torch.randperm``. Parity tests against scvi-tools' loader
    under ``torch.manual_seed`` check this stays true. A CUDA generator draws the permutation on
    its GPU (a CUDA tensor; no host work and no upload).
    """
    generator = sampler.generator
    if generator is not None and generator.device.type == "cuda":
        return torch.randperm(n, generator=generator, device=generator.device)
    if generator is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).numpy()


def _upload(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """rows on device in one asynchronous copy from page-locked memory (no host synchronisation).

    torch's caching host allocator keeps the pinned staging block until the copy has finished.
    """
    host = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    return host.pin_memory().to(device, non_blocking=True)


def _record_stream(value: Any, stream: torch.cuda.Stream) -> None:
    """Tells the caching allocator that value's tensors are used on stream (any nesting)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            return
        layout = value.layout
        if layout == torch.sparse_csr:
            parts = (value.crow_indices(), value.col_indices(), value.values())
        elif layout == torch.sparse_csc:
            parts = (value.ccol_indices(), value.row_indices(), value.values())
        elif layout == torch.sparse_coo:
            parts = (value._indices(), value._values())
        else:
            parts = (value,)
        for part in parts:
            part.record_stream(stream)
    elif isinstance(value, dict):
        for item in value.values():
            _record_stream(item, stream)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _record_stream(item, stream)


_NOT_STARTED = object()


# Stream access goes through these three so the hand-over logic can be checked without a GPU.
def _current_stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device)


def _on_stream(stream: Any) -> Any:
    return torch.cuda.stream(stream)


def new_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)


def _epoch_sliced_samplers() -> tuple[type, ...]:
    """Samplers whose batches are consecutive slices of ``epoch_positions()`` (exact types: a
    subclass may batch differently)."""
    from .distributed import ShardedBatchSampler
    from .sampler import BatchDistributedSampler

    return (BatchDistributedSampler, ShardedBatchSampler)


class _BatchSource:
    """The sampler's batches for one iteration, as the iterator consumes them.

    Kept apart from :class:`BatchIterator`, and not holding its own generator, so that no
    reference cycle runs through the iterator: one dropped half-way (``next(iter(loader))``, an
    exception, an early stop) is freed at once, with its prefetched GPU batch and epoch rows,
    not at the next garbage collection.
    """

    def __init__(self, loader: AnnDataLoader, gpu_rows: bool):
        self._loader = loader
        self._dataset = loader.dataset
        self._device = loader.device
        self._gpu_rows = gpu_rows
        self.rows_ready = False  # set when the default sampler's batches arrive as row arrays

    def batches(self):
        """Sampler items; for the default sampler, ready row arrays (see _epoch_row_batches)."""
        loader = self._loader
        sampler = loader._index_sampler
        if sampler is loader._default_sampler and sampler is not None:
            inner = sampler.sampler
            n = len(loader.dataset)
            if type(inner) is SequentialSampler:
                order = None
            elif type(inner) is RandomSampler and not inner.replacement and len(inner) == n and n > 0:
                order = _random_sampler_order(inner, n)
            else:
                order = False
            if order is not False:
                self.rows_ready = True
                yield from self._epoch_row_batches(order, n, sampler.batch_size, sampler.drop_last)
                return
        if type(sampler) in _epoch_sliced_samplers() and not loader._auto_collation:
            # Distributed and sharded samplers: consecutive slices of one epoch order.
            positions = sampler.epoch_positions()
            self.rows_ready = True
            yield from self._epoch_row_batches(positions, len(positions), sampler.batch_size,
                                               sampler.drop_last_batch)
            return
        yield from sampler

    def _epoch_row_batches(self, order: np.ndarray | None, n: int, size: int, drop_last: bool):
        """The epoch's rows mapped (and, for GPU residency, uploaded) once, then sliced per batch.

        One host-to-device copy per epoch instead of one per batch, and no host work per batch
        beyond slicing. ``order`` is the default sampler's permutation, drawn exactly as
        RandomSampler draws it (so the order equals scvi-tools' for the same seed), or a
        distributed or sharded sampler's epoch positions.
        """
        host_rows = None
        if isinstance(order, torch.Tensor):  # drawn on the GPU by a CUDA generator
            if self._gpu_rows:
                rows = self._dataset.device_rows(order, self._device)
            else:
                rows = self._dataset.rows(order.cpu().numpy())
        else:
            positions = np.arange(n, dtype=np.int64) if order is None else order.astype(np.int64, copy=False)
            rows = host_rows = self._dataset.rows(positions)
            if self._gpu_rows:
                rows = _upload(rows, self._device)
        stop = (n // size) * size if drop_last else n
        sizes = self._epoch_sparse_sizes(rows, host_rows, size, stop) if self._gpu_rows else None
        for b, start in enumerate(range(0, stop, size)):
            yield rows[start:min(start + size, n)], (sizes[b] if sizes is not None else None)

    def _epoch_sparse_sizes(self, rows: torch.Tensor, host_rows: np.ndarray | None, size: int,
                            stop: int) -> list[dict[str, int]] | None:
        """Every batch's sparse output sizes, from the rows where each field's storage lives
        (GPU memory: the device rows; pinned memory: the host rows), merged per batch."""
        data = self._dataset.data
        parts = [data.epoch_batch_nnz(rows, size, stop)]
        if host_rows is None and data.sparse_fields_on(torch.device("cpu")):  # pinned data, GPU-drawn rows
            host_rows = rows.cpu().numpy()  # one read-back per epoch instead of one per batch
        if host_rows is not None:
            parts.append(data.epoch_batch_nnz(torch.from_numpy(np.ascontiguousarray(host_rows)), size, stop))
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return [{k: v for p in parts for k, v in p[b].items()} for b in range(len(parts[0]))]


class BatchIterator:
    """Yields the loader's batches, bypassing DataLoader's fetcher (one gather per field)."""

    def __init__(self, loader: AnnDataLoader):
        self._loader = loader
        # DataLoader's single-process iterator draws a base seed from the loader's generator
        # (the global RNG by default) before sampling; doing the same keeps shuffling identical
        # to scvi-tools' loader under torch.manual_seed.
        # (A CUDA generator has no such draw to mirror: DataLoader itself cannot make it.)
        generator = loader.generator
        if generator is None or generator.device.type == "cpu":
            torch.empty((), dtype=torch.int64).random_(generator=generator)
        dataset = loader.dataset
        self._dataset = dataset
        self._device = loader.device
        # With the data in GPU memory or pinned host memory, the CUDA kernels gather on the device.
        self._gpu_rows = loader.residency in ("device", "pinned")
        self._source = _BatchSource(loader, self._gpu_rows)
        self._batches = self._source.batches()
        self._pool = dataset.pool if not self._gpu_rows else None
        collate = loader.collate_fn
        self._mode = "tensor" if collate is default_convert else ("ndarray" if collate is identity_collate else "custom")
        self._pin = bool(loader.pin_memory) and self._device.type == "cpu" and torch.cuda.is_available()
        # Prefetching: the next batch is gathered on a side stream while the consumer uses this one.
        self._side_stream = None
        self._pending: Any = _NOT_STARTED
        # Not with a user collate_fn: its batch may hold tensors in containers _record_stream
        # cannot see, and an unrecorded tensor could be overwritten while the consumer reads it.
        if self._gpu_rows and loader.prefetch and self._mode != "custom":
            self._side_stream = loader._prefetch_stream()
            # The resident data was placed on the consumer's stream: order the gathers after it.
            self._side_stream.wait_stream(_current_stream(self._device))

    def __iter__(self) -> BatchIterator:
        return self

    def __len__(self) -> int:
        # Asked only when needed: a user sampler without __len__ still iterates, as with DataLoader.
        return len(self._loader)

    def _rows(self, item) -> np.ndarray:
        """Observation rows (int64) for one sampler item: positions into the dataset."""
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, (int, np.integer)):
            item = [int(item)]
        positions = np.asarray(item)
        if positions.dtype != np.int64:
            if positions.size and positions.dtype.kind not in "iu":
                raise TypeError(f"sampler yielded {positions.dtype} positions; expected integers")
            positions = positions.astype(np.int64)
        return self._dataset.rows(positions.reshape(-1))

    def _fetch(self, item, as_numpy: bool) -> dict[str, Any]:
        if self._source.rows_ready:  # (rows, known sparse batch sizes or None) from _epoch_row_batches
            rows, nnz = item
            return self._dataset.data.fetch(rows, pool=self._pool, as_numpy=as_numpy, nnz=nnz)
        rows = self._rows(item)
        if self._gpu_rows:
            rows = _upload(rows, self._device)
        batch = self._dataset.data.fetch(rows, pool=self._pool, as_numpy=as_numpy)
        # A scalar position is one observation without a batch dimension, as scvi-tools' Subset
        # gives it: dense fields lose their leading dimension, sparse ones keep (1, n_cols).
        return self._dataset.data.single(batch) if is_scalar_position(item) else batch

    def _to_output_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self._device.type != "cpu" and not self._gpu_rows:  # residency="host" on a GPU
            return {key: value.to(self._device) for key, value in batch.items()}
        if self._pin:
            from torch.utils.data._utils.pin_memory import pin_memory

            return pin_memory(batch)
        return batch

    def __next__(self) -> Any:
        if self._side_stream is None:
            return self._next_batch()
        if self._pending is _NOT_STARTED:
            self._pending = self._prefetch()
        ready = self._pending
        if isinstance(ready, BaseException):  # exhausted (or failed) for good: it stays pending
            try:
                raise ready
            finally:
                # Raising attaches a traceback holding this frame, whose locals would tie the
                # iterator to its own pending exception (Python >= 3.12 attaches it even when the
                # caller, say list(), catches StopIteration): drop them, as concurrent.futures does.
                self = ready = None  # noqa: PLW0642
        consumer = _current_stream(self._device)
        consumer.wait_stream(self._side_stream)  # ordered after this batch's gathers
        _record_stream(ready, consumer)
        self._pending = _NOT_STARTED  # an interrupt while prefetching must not hand `ready` out twice
        self._pending = self._prefetch()  # the next batch's gathers overlap the consumer's work
        return ready

    def _prefetch(self) -> Any:
        """The next batch gathered on the side stream, or the exception its gathering raised.

        An exception (StopIteration at the end) is raised when the batch would have been
        returned, so errors surface in order.
        """
        with _on_stream(self._side_stream):
            try:
                return self._next_batch()
            except StopIteration as exc:  # its traceback would tie this iterator in a cycle
                return exc.with_traceback(None)
            except Exception as exc:  # noqa: BLE001 - re-raised in order by __next__
                return exc

    def _next_batch(self) -> Any:
        item = next(self._batches)
        loader = self._loader
        if loader._auto_collation:
            # A user sampler: DataLoader groups its items (batch_size=1 by default) and collates
            # the per-item batches, exactly as it does for scvi-tools' loader.
            batch = loader.collate_fn([self._fetch(sub, as_numpy=not self._gpu_rows) for sub in item])
            return self._to_output_device(batch) if isinstance(batch, dict) else batch
        if self._mode == "tensor":
            return self._to_output_device(self._fetch(item, as_numpy=False))
        batch = self._fetch(item, as_numpy=not self._gpu_rows)
        if self._mode == "ndarray":
            return batch
        return loader.collate_fn(batch)
