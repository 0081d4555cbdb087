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
from torch.utils.data._utils.collate import default_convert

from ._cuda_module import CudaUnavailableError, gpu_usable, require_cuda_module
from .dataset import AnnDataset, PreparedData, is_scalar_position, normalize_indices
from .sampler import check_batch_size

__all__ = ["AnnDataLoader", "RESIDENCIES", "DEVICE_MEMORY_BUDGET"]

RESIDENCIES = ("auto", "device", "pinned", "host")
#: residency="auto" keeps data in GPU memory when it needs at most this fraction of the free memory.
DEVICE_MEMORY_BUDGET = 0.5

# DataLoader options that only mean something with worker processes.
_WORKER_ONLY_OPTIONS = ("persistent_workers", "prefetch_factor", "multiprocessing_context")
# Extras for distributed_sampler=True, passed to BatchDistributedSampler (scvi-tools takes them
# from the initialised process group only).
_DISTRIBUTED_OPTIONS = ("num_replicas", "rank", "seed")


def _identity(batch):
    return batch


def resolve_device(device: Any, *, iter_ndarray: bool = False) -> torch.device:
    """The device batches are yielded on: "cuda" by default when the GPU path is usable."""
    if device is None:
        device = "cuda" if gpu_usable() and torch.cuda.is_available() and not iter_ndarray else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r} ({exc})") from None
    if resolved.type == "cuda":
        require_cuda_module()  # CudaUnavailableError saying why
        if not torch.cuda.is_available():
            raise CudaUnavailableError(
                f"device={device!r}: annloader_gpu has CUDA kernels but this torch build "
                f"({torch.__version__}) cannot use CUDA; install a CUDA build of torch or use device='cpu'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CudaUnavailableError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) found")
        if resolved.index is None:  # one name per GPU, so loaders share placed data
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device, got {resolved}")
    return resolved


def gpu_data_devices(prepared: PreparedData) -> list[torch.device]:
    """The GPUs on which prepared data already lives (CuPy / CUDA-tensor sources used in place)."""
    devices = {f.storage.device for f in prepared.fields.values()}
    return sorted((d for d in devices if d.type == "cuda"), key=str)


def bytes_to_place(prepared: PreparedData, device: torch.device) -> int:
    """Bytes of prepared storage not already on device (what residency='device' must copy there)."""
    sizes = {id(f.storage): f.storage.nbytes for f in prepared.fields.values() if f.storage.device != device}
    return int(sum(sizes.values()))


def _residency_of_gpu_data(residency: str, device: torch.device, bytes_needed: int,
                           data_devices: list[torch.device]) -> str:
    """Data already in GPU memory is gathered where it is: residency "device", never a host copy."""
    where = ", ".join(sorted({str(d) for d in data_devices}))
    if device.type == "cpu":
        raise ValueError(
            f"device={str(device)!r}, but registered data is already in GPU memory ({where}; e.g. a cupy array or "
            "cupyx sparse matrix): use device='cuda' to gather batches there, in place, or copy the data to the "
            "host first to load on the CPU (for cupy/cupyx data: adata.X = adata.X.get())"
        )
    if residency in ("pinned", "host"):
        raise ValueError(
            f"residency={residency!r} keeps the data in host memory, but registered data is already in GPU "
            f"memory ({where}): use residency='device' or 'auto' (GPU data is used in place, without a copy), "
            "or copy the data to the host first (for cupy/cupyx data: .get())"
        )
    if bytes_needed:
        free, _total = torch.cuda.mem_get_info(device)
        if bytes_needed > free:
            raise RuntimeError(
                f"residency={residency!r}: the data already in GPU memory ({where}) is used in place, but the rest "
                f"needs {bytes_needed} bytes on {device} and {free} bytes are free there; free GPU memory, or "
                "copy the GPU data to the host (.get()) and use residency='pinned' or 'host'"
            )
    return "device"


def resolve_residency(residency: Any, device: torch.device, bytes_needed: int, *,
                      data_devices: list[torch.device] | tuple = ()) -> str:
    """Where the prepared data lives: "host" on the CPU; on a GPU "device", "pinned" or "host".

    "auto" picks "device" when the data needs at most DEVICE_MEMORY_BUDGET of the free GPU
    memory, else "pinned" (page-locked host memory the kernels read through unified addressing).
    ``data_devices``: GPUs on which some of the data already lives (:func:`gpu_data_devices`).
    Such data is used in place: the residency is "device" ("auto" or "device" requested), and
    bytes_needed counts only what is not on ``device`` yet. A CPU device, or "pinned"/"host",
    is a ValueError saying what to use instead.
    """
    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {', '.join(map(repr, RESIDENCIES))}, got {residency!r}")
    if any(torch.device(d).type == "cuda" for d in data_devices):
        return _residency_of_gpu_data(residency, device, bytes_needed, [torch.device(d) for d in data_devices])
    if device.type == "cpu":
        if residency not in ("auto", "host"):
            raise ValueError(
                f"residency={residency!r} needs a CUDA device; with device='cpu' the data stays in host "
                "memory (use residency='auto' or 'host')"
            )
        return "host"
    if residency in ("host", "pinned"):
        return residency
    free, _total = torch.cuda.mem_get_info(device)
    if residency == "device":
        if bytes_needed > free:
            raise RuntimeError(
                f"residency='device' needs {bytes_needed} bytes of GPU memory but {free} bytes are free on "
                f"{device}; use residency='pinned' (kernels read page-locked host memory) or 'host'"
            )
        return "device"
    return "device" if bytes_needed <= DEVICE_MEMORY_BUDGET * free else "pinned"


_FALLBACKS = {"device": ("device", "pinned", "host"), "pinned": ("pinned", "host"), "host": ("host",)}


def _free_gpu_bytes(device: torch.device) -> int | None:
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):  # no usable CUDA (the message then says less)
        return None


def place(prepared: PreparedData, device: torch.device, residency: str, requested: str) -> tuple[PreparedData, str]:
    """prepared moved where residency says.

    A placement that fails half-way (out of GPU memory, pinning refused) leaves nothing behind:
    what it took is released, torch's cached blocks included. With residency="auto" the loader
    then falls back, device -> pinned -> host (not for data already in GPU memory, which is used
    where it is); an explicit residency raises an error naming the bytes.
    """
    attempts = _FALLBACKS[residency] if requested == "auto" and not gpu_data_devices(prepared) else (residency,)
    failure: BaseException | None = None
    for attempt in attempts:
        if attempt == "host":
            return prepared, attempt
        try:
            return prepared.to(device, pin=attempt == "pinned"), attempt
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            failure = exc
            torch.cuda.empty_cache()  # the half-built copy is garbage now: give its blocks back
    free = _free_gpu_bytes(device) if residency == "device" else None
    raise RuntimeError(
        f"could not place {prepared.resident_bytes} bytes with residency={residency!r} on {device}"
        + (f" ({free} bytes of GPU memory free)" if free is not None else "")
        + f": {failure}; try "
        + ("residency='pinned' (page-locked host memory the kernels read) or 'host'" if residency == "device"
           else "residency='host' (gathered on the CPU, then copied)")
    ) from failure


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
        try:
            from .registry import as_registry
        except ImportError:  # pragma: no cover - registry.py is part of the package
            as_registry = None
        if as_registry is not None:
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
            self.kwargs.update({"collate_fn": _identity})
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

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self)

    def _prefetch_stream(self) -> torch.cuda.Stream:
        stream = self.__dict__.get("_side_stream")
        if stream is None:
            stream = self.__dict__["_side_stream"] = _new_stream(self.device)
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


def _new_stream(device: torch.device) -> Any:
    return torch.cuda.Stream(device)


class _BatchIterator:
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
        self._rows_ready = False  # set when the default sampler's batches arrive as row arrays
        self._batches = self._position_batches()
        self._pool = dataset.pool if not self._gpu_rows else None
        collate = loader.collate_fn
        self._mode = "tensor" if collate is default_convert else ("ndarray" if collate is _identity else "custom")
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

    def __iter__(self) -> _BatchIterator:
        return self

    def __len__(self) -> int:
        # Asked only when needed: a user sampler without __len__ still iterates, as with DataLoader.
        return len(self._loader)

    def _position_batches(self):
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
                self._rows_ready = True
                yield from self._epoch_row_batches(order, n, sampler.batch_size, sampler.drop_last)
                return
        yield from sampler

    def _epoch_row_batches(self, order: np.ndarray | None, n: int, size: int, drop_last: bool):
        """The epoch's rows mapped (and, for GPU residency, uploaded) once, then sliced per batch.

        One host-to-device copy per epoch instead of one per batch, and no host work per batch
        beyond slicing; the permutation itself is drawn on the host exactly as RandomSampler
        draws it, so the order equals scvi-tools' for the same seed.
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
        if self._rows_ready:  # (rows, known sparse batch sizes or None) from _epoch_row_batches
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
        if isinstance(ready, BaseException):
            raise ready  # exhausted (or failed) for good: it stays pending
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
