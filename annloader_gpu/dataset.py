"""The prepared data behind an :class:`~annloader_gpu.AnnDataLoader`.

A registry (scvi-tools' ``AnnDataManager`` or :func:`annloader_gpu.registry.setup_anndata`'s
``AnnDataRegistry``, duck-typed) names the arrays a batch is made of. :class:`PreparedData` turns
each registry key into a :class:`Field`, once, when the loader is built: its storage comes from
:func:`annloader_gpu.sources.build_storage` (validated, compact, cached per source; see
:mod:`annloader_gpu.storage`), its output dtype and form from ``data_and_attributes`` and
``load_sparse_tensor``. Everything is validated there, so the hot path calls the kernels with
``validate=False``; row indices are still bounds-checked by the compiled code.

A field gathers a batch of row indices straight into an output array of the requested dtype;
:mod:`annloader_gpu.kernels` dispatches on the arrays' device, so the same :class:`Field` code
serves the CPU and the GPU, and :meth:`PreparedData.fetch` gathers all dense-output fields with
one compiled call (:mod:`annloader_gpu.gather_plan`). Host outputs come from a
:class:`BufferPool` that reuses a buffer only when nothing outside the pool references it.
:class:`AnnDataset` is what ``loader.dataset`` is (scvi-tools' ``Subset`` of its dataset).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from . import kernels
from .sources import build_storage
from .storage import _NUMPY_TO_TORCH, CsrStorage, DenseStorage, torch_dtype

__all__ = [
    "AnnDataset",
    "BufferPool",
    "CsrStorage",
    "DenseStorage",
    "Field",
    "PreparedData",
    "default_dtype",
]

# scvi-tools' registry_key_to_default_dtype: these keys are int64, everything else float32.
_INT64_KEYS = frozenset({"batch", "labels", "extra_categorical_covs", "ind_x"})
_MINIFY_TYPE_KEY = "minify_type"
_KERNEL_OUTPUT_DTYPES = frozenset(np.dtype(n) for n in ("float32", "float64", "float16", "int64", "int32"))

def default_dtype(key: str) -> np.dtype:
    """scvi-tools' default loading dtype for a registry key."""
    return np.dtype(np.int64) if key in _INT64_KEYS else np.dtype(np.float32)


def _as_numpy_dtype(dtype: Any, key: str) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        for np_dtype, t in _NUMPY_TO_TORCH.items():
            if t == dtype:
                return np_dtype
        raise TypeError(f"data_and_attributes[{key!r}]: torch dtype {dtype} has no numpy equivalent")
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"data_and_attributes[{key!r}]: {dtype!r} is not a dtype ({exc})") from None


# --------------------------------------------------------------------------------------------
# Output buffers


def _refcount_at(items: list, i: int) -> int:
    return sys.getrefcount(items[i])


def _calibrate_refcount() -> int:
    probe = [np.empty(1)]
    return _refcount_at(probe, 0)


class BufferPool:
    """Reusable host output buffers.

    Writing into freshly allocated memory is dominated by page faults (~3 GB/s against ~30 GB/s
    into memory already touched), so host batches are gathered into buffers kept here. A buffer is
    handed out again only when the pool holds the sole reference to it: a yielded
    ``torch.from_numpy(buf)`` tensor, any view of it, and any numpy view of ``buf`` keep a
    reference, so a consumer that keeps batches never sees them overwritten. At most
    ``max_per_key`` buffers are kept per (shape, dtype); beyond that buffers are not pooled.
    """

    def __init__(self, max_per_key: int = 4):
        self.max_per_key = int(max_per_key)
        self._dense: dict[tuple, list[np.ndarray]] = {}
        self._flat: dict[np.dtype, list[np.ndarray]] = {}
        self._unreferenced = _calibrate_refcount()
        self._lock = threading.Lock()

    def _free_index(self, bucket: list[np.ndarray], capacity: int = -1) -> int:
        for i in range(len(bucket)):
            if _refcount_at(bucket, i) <= self._unreferenced and bucket[i].shape[0] >= capacity:
                return i
        return -1

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-contiguous array that nobody else references."""
        key = (tuple(shape), np.dtype(dtype))
        with self._lock:
            bucket = self._dense.setdefault(key, [])
            i = self._free_index(bucket)
            if i >= 0:
                return bucket[i]
            buf = np.empty(shape, dtype)
            if len(bucket) < self.max_per_key:
                bucket.append(buf)
            return buf

    def empty_flat(self, n: int, dtype: np.dtype) -> np.ndarray:
        """A 1-D array of length n: a view of a pooled buffer of at least that capacity."""
        dtype = np.dtype(dtype)
        with self._lock:
            bucket = self._flat.setdefault(dtype, [])
            i = self._free_index(bucket, n)
            if i >= 0:
                return bucket[i][:n]
            buf = np.empty(max(n + n // 4, 1024), dtype)
            if len(bucket) < self.max_per_key:
                bucket.append(buf)
            else:
                small = self._free_index(bucket)  # an unreferenced buffer that is too small
                if small >= 0:
                    bucket[small] = buf
            return buf[:n]

    @property
    def nbytes(self) -> int:
        """Bytes held by pooled buffers."""
        buckets = list(self._dense.values()) + list(self._flat.values())
        return sum(b.nbytes for bucket in buckets for b in bucket)

    def clear(self) -> None:
        with self._lock:
            self._dense.clear()
            self._flat.clear()


# --------------------------------------------------------------------------------------------
# Fields


_sparse_beta_warning_passed = False


@contextlib.contextmanager
def _quiet_sparse_constructors():
    """torch warns on its first sparse CSR/CSC construction that the support is in beta and
    (torch >= 2.11) that invariant checks are "implicitly disabled"; the loader passes
    ``check_invariants=False`` explicitly, its kernels having built the structure.

    Each warning is issued once per process (TORCH_WARN_ONCE), so only the first construction
    needs catching; later ones skip catch_warnings' ~10 us per batch.
    """
    global _sparse_beta_warning_passed
    if _sparse_beta_warning_passed:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*support is in beta.*")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield
    _sparse_beta_warning_passed = True


class Field:
    """One registry key: storage plus the output dtype and form (dense, or sparse tensor)."""

    def __init__(self, key: str, storage, dtype: np.dtype, *, sparse_output: bool = False):
        self.key = key
        self.storage = storage
        self.dtype = np.dtype(dtype)
        sparse_source = storage.kind == "csr" or (storage.kind == "fallback" and sp.issparse(storage.source))
        self.sparse_source = bool(sparse_source)
        self.sparse_output = bool(sparse_output) and sparse_source
        # The kernels write float32/64/16 and int32/64. Other requested dtypes (bool, uint8, int16,
        # ...) are gathered exactly into float64/int64 (the storage is lossless) and then cast
        # with numpy, which is what scvi-tools' astype does from the source.
        if storage.kind != "fallback" and self.dtype == np.float16 and storage.value_dtype == "float64":
            # The compiled cast to float16 goes through float32: rounding twice can land one
            # float16 step away from numpy's (scvi-tools') single rounding. Gather float64 exactly.
            self.kernel_dtype = np.dtype(np.float64)
        elif self.dtype in _KERNEL_OUTPUT_DTYPES or storage.kind == "fallback":
            self.kernel_dtype = self.dtype
        else:
            stored_float = storage.value_dtype.startswith(("float", "bfloat"))
            self.kernel_dtype = np.dtype(np.float64 if stored_float else np.int64)

    @property
    def shape_tail(self) -> tuple[int, ...]:
        s = self.storage
        if s.kind == "dense" and s.squeeze:
            return ()
        return (int(s.n_cols if s.kind != "fallback" else s.source.shape[1]),)

    def to(self, device, *, pin: bool = False) -> Field:
        return Field(self.key, self.storage.to(device, pin=pin), self.dtype, sparse_output=self.sparse_output)

    # -- gathering -----------------------------------------------------------------------

    def gather(self, rows: np.ndarray | torch.Tensor, pool: BufferPool | None, as_numpy: bool,
               nnz: int | None = None):
        """The batch for rows: numpy (as_numpy, host only), a torch tensor, or a sparse tensor.

        rows are int64, on the storage's device (a numpy array or CPU tensor for host storage).
        """
        if self.storage.kind == "fallback":
            return self._gather_fallback(rows, as_numpy)
        if self.sparse_output:
            return self._gather_sparse(rows, pool, nnz)
        s = self.storage
        n = int(rows.shape[0])
        exact = self.kernel_dtype == self.dtype
        out = self._empty((n, s.n_cols), self.kernel_dtype, pool if exact else None, rows)
        rows_t = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)
        out_t = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
        bound = s.bound(rows_t.device)
        if s.kind == "csr":
            bound.to_dense(rows_t, out_t)
        else:
            bound.gather(rows_t, out_t)
        if not exact:
            out = out.to(torch_dtype(self.dtype)) if isinstance(out, torch.Tensor) else out.astype(self.dtype)
        if s.kind == "dense" and s.squeeze:
            out = out.reshape(n)
        if as_numpy or isinstance(out, torch.Tensor):
            return out
        return torch.from_numpy(out)

    @staticmethod
    def _empty(shape, dtype: np.dtype, pool: BufferPool | None, rows):
        if isinstance(rows, torch.Tensor) and rows.device.type != "cpu":
            return torch.empty(shape, dtype=torch_dtype(dtype), device=rows.device)
        if pool is None:
            return np.empty(shape, dtype)
        return pool.empty(shape, dtype)

    def _gather_sparse(self, rows, pool: BufferPool | None, known_nnz: int | None = None) -> torch.Tensor:
        """The rows as a torch sparse tensor. On the GPU the output size is either known_nnz
        (from :meth:`PreparedData.epoch_batch_nnz`, computed once per epoch) or read back from
        the device, which synchronises."""
        s = self.storage
        n = int(rows.shape[0])
        size = (n, s.n_cols)
        index_dtype = s.batch_index_dtype
        if isinstance(rows, torch.Tensor) and rows.device.type != "cpu":
            device = rows.device
            bound = s.bound(device)
            indptr = torch.empty(n + 1, dtype=torch.int64, device=device)
            bound.batch_indptr(rows, indptr)
            # The output size: known for the loader's own epochs, else the one synchronisation.
            nnz = known_nnz if known_nnz is not None else int(indptr[-1].item())
            indices = torch.empty(nnz, dtype=torch_dtype(index_dtype), device=device)
            values = torch.empty(nnz, dtype=torch_dtype(self.kernel_dtype), device=device)
            bound.to_csr(rows, indptr, indices, values)
            indptr = indptr.to(torch_dtype(index_dtype))
            values = values.to(torch_dtype(self.dtype))
            with _quiet_sparse_constructors():
                batch = torch.sparse_csr_tensor(indptr, indices, values, size=size, check_invariants=False)
                return batch.to_sparse_csc() if s.source_format == "csc" else batch
        exact = self.kernel_dtype == self.dtype
        if pool is not None:
            indptr = pool.empty_flat(n + 1, index_dtype)
        else:
            indptr = np.empty(n + 1, index_dtype)
        bound = s.bound(torch.device("cpu"))
        rows_t = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)
        nnz = bound.batch_indptr(rows_t, torch.from_numpy(indptr))
        indices = pool.empty_flat(nnz, index_dtype) if pool is not None else np.empty(nnz, index_dtype)
        values = pool.empty_flat(nnz, self.dtype) if pool is not None and exact else np.empty(nnz, self.kernel_dtype)
        bound.to_csr(rows_t, torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values),
                     trusted_indptr=True)  # batch_indptr just filled it for these rows
        if not exact:
            values = values.astype(self.dtype)
        with _quiet_sparse_constructors():
            if s.source_format == "csc":
                # A batch CSR is the CSC of its transpose: converting that gives the batch's CSC.
                indptr, indices, values = kernels.csc_to_csr(indptr, indices, values, (s.n_cols, n),
                                                             indptr_dtype=index_dtype)
                maker = torch.sparse_csc_tensor
            else:
                maker = torch.sparse_csr_tensor
            return maker(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), size=size, check_invariants=False)

    def _gather_fallback(self, rows, as_numpy: bool):
        """scvi-tools' own slicing on the host, for sources the kernels cannot read."""
        device = rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu")
        host_rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        n_rows = self.storage.n_rows
        if host_rows.size and (host_rows.min() < 0 or host_rows.max() >= n_rows):
            bad = host_rows[(host_rows < 0) | (host_rows >= n_rows)][0]
            raise IndexError(f"row index {bad} is out of range for {n_rows} rows")
        sliced = self.storage.source[host_rows]
        if sp.issparse(sliced):
            sliced = sliced.astype(self.dtype, copy=False)
            if self.sparse_output:
                with _quiet_sparse_constructors():
                    maker = torch.sparse_csc_tensor if sliced.format == "csc" else torch.sparse_csr_tensor
                    out = maker(torch.from_numpy(sliced.indptr), torch.from_numpy(sliced.indices),
                                torch.from_numpy(sliced.data), size=sliced.shape, check_invariants=False)
                return out.to(device) if device.type != "cpu" else out
            sliced = sliced.toarray()
        else:
            sliced = np.asarray(sliced).astype(self.dtype, copy=False)
        if as_numpy:
            return sliced
        tensor = torch.as_tensor(sliced)
        return tensor.to(device) if device.type != "cpu" else tensor


# --------------------------------------------------------------------------------------------
# PreparedData: all fields of one registry, on one device


def _resolve_keys(registered: Sequence[str], data_and_attributes) -> dict[str, np.dtype]:
    if isinstance(data_and_attributes, list):
        keys = {key: default_dtype(key) for key in data_and_attributes}
    elif isinstance(data_and_attributes, dict):
        keys = {key: _as_numpy_dtype(dtype, key) for key, dtype in data_and_attributes.items()}
    elif data_and_attributes is None:
        keys = {key: default_dtype(key) for key in registered}
    else:
        raise ValueError("`data_and_attributes` must be a `list`, `dict`, or `None`")
    unknown = [key for key in keys if key not in registered]
    if unknown:
        raise KeyError(
            f"{', '.join(map(repr, unknown))} not found in the data registry; registered keys: {list(registered)}"
        )
    return keys


def _where(manager: Any, key: str) -> str:
    try:
        loc = manager.data_registry[key]
        name, attr_key = loc.attr_name, loc.attr_key
    except Exception:  # noqa: BLE001 - only for the message
        return f"registry key {key!r}"
    return f"registry key {key!r} (adata.{name}" + (f"[{attr_key!r}]" if attr_key else "") + ")"


_CPU = torch.device("cpu")


def batch_nnz(indptr: torch.Tensor | np.ndarray, rows: torch.Tensor, batch_size: int, stop: int) -> torch.Tensor:
    """int64 non-zeros of each batch rows[start:start + batch_size], start in range(0, stop,
    batch_size), of the CSR matrix with this indptr; torch ops on the tensors' device."""
    indptr = torch.as_tensor(indptr).to(torch.int64)  # numpy host storage: a view, then one cast
    lengths = indptr[rows + 1] - indptr[rows]
    before = torch.cat((torch.zeros(1, dtype=torch.int64, device=rows.device), torch.cumsum(lengths, 0)))
    starts = torch.arange(0, stop, batch_size, device=rows.device)
    ends = torch.clamp(starts + batch_size, max=rows.shape[0])
    return before[ends] - before[starts]


class PreparedData:
    """The fields of one registry, validated and stored compactly, on one device.

    Parameters
    ----------
    adata_manager
        scvi-tools' ``AnnDataManager`` or an :class:`~annloader_gpu.registry.AnnDataRegistry`.
    data_and_attributes
        As in scvi-tools: ``None`` (all registered keys, default dtypes), a list of keys, or a dict
        mapping keys to dtypes.
    load_sparse_tensor
        Sparse fields yield torch sparse tensors with the source's layout instead of dense arrays.
    """

    def __init__(self, adata_manager: Any, data_and_attributes=None, load_sparse_tensor: bool = False, *,
                 _fields: dict[str, Field] | None = None, _n_obs: int | None = None):
        self.adata_manager = adata_manager
        self.load_sparse_tensor = bool(load_sparse_tensor)
        if _fields is not None:
            self.fields, self.n_obs = _fields, int(_n_obs)
            return
        if getattr(adata_manager, "adata", None) is None:
            raise ValueError("Please run ``register_fields`` on ``adata_manager`` first (its adata is None).")
        registered = list(adata_manager.data_registry.keys())
        keys = _resolve_keys(registered, data_and_attributes)
        self.n_obs = int(adata_manager.adata.shape[0])
        self.fields = {}
        for key, dtype in keys.items():
            data = adata_manager.get_from_registry(key)
            if isinstance(data, str) and key == _MINIFY_TYPE_KEY:
                continue  # scvi-tools' minified-data marker, not a tensor
            storage = build_storage(data, _where(adata_manager, key), self.n_obs)
            self.fields[key] = Field(key, storage, dtype, sparse_output=self.load_sparse_tensor)

    @property
    def keys_and_dtypes(self) -> dict[str, np.dtype]:
        return {key: f.dtype for key, f in self.fields.items()}

    @property
    def device(self) -> torch.device:
        devices = {f.storage.device for f in self.fields.values() if f.storage.kind != "fallback"}
        return devices.pop() if len(devices) == 1 else torch.device("cpu")

    def to(self, device: torch.device | str, *, pin: bool = False) -> PreparedData:
        """The same fields with their storage on device (or pinned host memory with pin=True)."""
        fields = {key: f.to(device, pin=pin) for key, f in self.fields.items()}
        return PreparedData(self.adata_manager, load_sparse_tensor=self.load_sparse_tensor, _fields=fields,
                            _n_obs=self.n_obs)

    @property
    def resident_bytes(self) -> int:
        """Bytes of all storage the fields use (shared storage counted once)."""
        seen = {id(f.storage): f.storage.nbytes for f in self.fields.values()}
        return int(sum(seen.values()))

    @property
    def x_bytes_per_nonzero(self) -> float | None:
        """Resident bytes per stored non-zero of X (None when X is dense or not loaded)."""
        f = self.fields.get("X")
        if f is None or f.storage.kind != "csr":
            return None
        return f.storage.bytes_per_nonzero

    def fetch(self, rows: np.ndarray | torch.Tensor, *, pool: BufferPool | None = None,
              as_numpy: bool = False, nnz: dict[str, int] | None = None) -> dict[str, Any]:
        """One batch: {key: gathered rows}. rows: int64 (host numpy, or a tensor on the fields' device).

        The dense-output fields go through one compiled call (:mod:`~annloader_gpu.gather_plan`);
        the others (sparse outputs, host-fallback sources) are gathered one by one. ``nnz``: the
        sparse-output fields' batch sizes where already known (see :meth:`epoch_batch_nnz`).
        """
        nnz = nnz or {}
        plan = self._gather_plan(rows.device if isinstance(rows, torch.Tensor) else _CPU)
        if plan is None:
            return {key: f.gather(rows, pool, as_numpy, nnz.get(key)) for key, f in self.fields.items()}
        planned = plan.gather(rows, pool, as_numpy)
        if len(planned) == len(self.fields):
            return planned
        return {key: planned[key] if key in planned else f.gather(rows, pool, as_numpy, nnz.get(key))
                for key, f in self.fields.items()}

    def sparse_fields_on(self, device: torch.device) -> list[str]:
        """Keys of the sparse-output fields whose CSR storage is on device (pinned: the CPU)."""
        return [key for key, f in self.fields.items()
                if f.sparse_output and f.storage.kind == "csr" and f.storage.device == device]

    def epoch_batch_nnz(self, rows: torch.Tensor, batch_size: int, stop: int) -> list[dict[str, int]] | None:
        """Non-zeros of every sparse-output field in each batch rows[start:start + batch_size]
        (start < stop), for the fields whose storage is where the rows are: computed there once
        for the whole epoch (on a GPU with one read-back), so the batches need no synchronisation
        to size their outputs. The loader asks with the epoch's device rows (data in GPU memory)
        and with its host rows (pinned data). None where no field qualifies."""
        keys = self.sparse_fields_on(rows.device)
        if not keys or stop <= 0:
            return None
        sizes = [batch_nnz(self.fields[key].storage.indptr, rows, batch_size, stop) for key in keys]
        table = torch.stack(sizes).cpu().tolist()  # on a GPU: the epoch's one synchronisation
        return [{key: int(column[b]) for key, column in zip(keys, table)} for b in range(len(table[0]))]

    def _gather_plan(self, device: torch.device):
        """The fields' gather plan for kernels on device (built once), or None if none fits."""
        plans = self.__dict__.setdefault("_plans", {})
        if device not in plans:
            from .gather_plan import FieldGatherPlan, plannable

            fits = any(plannable(f) for f in self.fields.values())
            plans[device] = FieldGatherPlan(self.fields, device) if fits else None
        return plans[device]

    def single(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A one-row batch as scvi-tools gives one observation indexed by a scalar.

        ``array[i]`` drops the leading dimension of dense arrays and data frames (a 1-D source
        gives a scalar), while a scipy sparse matrix indexed by ``i`` stays ``(1, n_cols)``.
        """
        return {key: value if self.fields[key].sparse_source else value[0] for key, value in batch.items()}


# --------------------------------------------------------------------------------------------
# AnnDataset: what loader.dataset is (scvi-tools' Subset(AnnTorchDataset, indices))


def is_scalar_position(item: Any) -> bool:
    """Whether a sampler item or dataset key names one position (an int, or a 0-d array or tensor)."""
    if isinstance(item, (bool, np.bool_)):
        return False
    if isinstance(item, (int, np.integer)):
        return True
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 0


def normalize_indices(indices: Any, n_obs: int) -> np.ndarray:
    """Observation indices as a new int64 array: ints, an int array, or a boolean mask."""
    if indices is None:
        return np.arange(n_obs, dtype=np.int64)
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    array = np.asarray(indices)
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-dimensional, got shape {array.shape}")
    if array.dtype == np.bool_:
        if len(array) != n_obs:
            raise IndexError(f"boolean indices have length {len(array)}; expected n_obs={n_obs}")
        return np.flatnonzero(array).astype(np.int64)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers or a boolean mask, got dtype {array.dtype}")
    array = array.astype(np.int64)  # always a copy: the caller's array is never touched
    bad = (array < -n_obs) | (array >= n_obs)
    if bool(bad.any()):
        raise IndexError(
            f"index {int(array[bad][0])} is out of range for an AnnData with n_obs={n_obs} "
            f"(expected -{n_obs} <= index < {n_obs})"
        )
    array[array < 0] += n_obs
    return array


class AnnDataset(Dataset):
    """Observations ``indices`` of prepared data, indexed by position like scvi's ``Subset``.

    ``dataset[positions]`` returns the batch of observations ``indices[positions]`` as numpy arrays
    (torch sparse tensors for sparse fields with ``load_sparse_tensor``), as scvi-tools'
    ``AnnTorchDataset`` does.
    """

    def __init__(self, data: PreparedData, indices: np.ndarray | None = None):
        self.data = data
        self.indices = normalize_indices(indices, data.n_obs) if indices is None or not (
            isinstance(indices, np.ndarray) and indices.dtype == np.int64) else indices
        self.is_identity = bool(len(self.indices) == data.n_obs and np.array_equal(
            self.indices, np.arange(data.n_obs)))
        self.pool = BufferPool()

    @property
    def adata_manager(self):
        return self.data.adata_manager

    @property
    def keys_and_dtypes(self):
        return self.data.keys_and_dtypes

    def __len__(self) -> int:
        return len(self.indices)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Observation rows for dataset positions (int64)."""
        if self.is_identity:
            if positions.size and (positions.min() < 0 or positions.max() >= len(self.indices)):
                positions = self.indices[positions]  # numpy's IndexError / wrap-around semantics
            return positions
        return self.indices[positions]

    def device_rows(self, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Observation rows for positions already on a CUDA device (int64, no host round trip).

        The positions come from a permutation of ``range(len(self))`` drawn on the device, so
        they are in range by construction.
        """
        positions = positions.to(device=device, dtype=torch.int64)
        if self.is_identity:
            return positions
        cache = self.__dict__.setdefault("_device_indices", {})
        indices = cache.get(device)
        if indices is None:
            indices = cache[device] = torch.from_numpy(self.indices).to(device)
        return indices[positions]

    def __getitem__(self, positions) -> Mapping[str, Any]:
        scalar = is_scalar_position(positions)
        if isinstance(positions, torch.Tensor):
            positions = positions.detach().cpu().numpy()
        if isinstance(positions, slice):
            positions = np.arange(len(self.indices))[positions]
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        rows = self.rows(positions)
        if self.data.device.type == "cuda":  # GPU storage: gathered there, handed back on the host
            batch = self.data.fetch(torch.from_numpy(rows).to(self.data.device), as_numpy=False)
            batch = {key: value.cpu() if value.layout != torch.strided else value.cpu().numpy()
                     for key, value in batch.items()}
        else:
            batch = self.data.fetch(rows, pool=None, as_numpy=True)
        # scvi's Subset maps a scalar to one observation: dense fields lose the batch dimension.
        return self.data.single(batch) if scalar else batch
