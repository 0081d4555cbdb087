"""The prepared data behind an :class:`~annloader_gpu.AnnDataLoader`.

A registry (scvi-tools' ``AnnDataManager`` or :func:`annloader_gpu.registry.setup_anndata`'s
``AnnDataRegistry``, duck-typed) names the arrays a batch is made of. This module turns each
registry key into a :class:`Field`, once, when the loader is built:

* X (or a layer) and sparse obsm entries become a :class:`CsrStorage` (CSC is converted once with
  :func:`annloader_gpu.kernels.csc_to_csr`); dense matrices, obs columns and covariate tables
  become a :class:`DenseStorage` (C-contiguous ``(n_obs, k)``).
* Storage is compact and lossless (:mod:`annloader_gpu.compact`): column indices as uint16 when
  there are at most 65,536 columns, integer counts as uint8/uint16, float16 only when exact. The
  compiled gathers decode while casting to the requested output dtype, so batches are identical
  to those gathered from the original arrays.
* Data already in tensors -- CuPy arrays and cupyx CSR/CSC matrices in GPU memory
  (rapids-singlecell), torch tensors on any device -- is validated where it lives, with torch
  ops, and used in place: a CSR matrix's values and a dense array are the storage themselves (no
  copy, no compaction); indptr and indices are always the storage's own compact copies.
* Everything is validated here (shape against ``n_obs``, numeric dtype, CSR structure, column
  range, canonical order), so the hot path calls the kernels with ``validate=False``. Row indices
  are still bounds-checked by the compiled code.

A field gathers a batch of row indices straight into an output array of the requested dtype.
Storage arrays are numpy arrays (host) or torch tensors (``DenseStorage.to(device)``,
``CsrStorage.to(device)``); :mod:`annloader_gpu.kernels` dispatches on the arrays' device, so the
same :class:`Field` code serves the CPU and the GPU. Host outputs come from a
:class:`BufferPool` that reuses a buffer only when nothing outside the pool references it.

Storage is cached per source array (identity, shape and nnz are checked), so train, validation
and test loaders over one AnnData share one prepared copy. In-place edits of a source array's
values after a loader was built are seen by loaders whose storage uses those values in place
(CSR values and dense arrays given as tensors or CuPy arrays; host arrays the compaction left
as they are) and not by loaders that use a converted copy.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from . import kernels
from ._device_arrays import cupy_to_torch, is_cupy_array, is_cupy_sparse

try:  # lossless compact storage (see annloader_gpu.compact)
    from .compact import compact_index_dtype, compact_indptr_dtype, compact_value_dtype
except ImportError:  # pragma: no cover - compact.py is part of the package
    compact_index_dtype = compact_indptr_dtype = compact_value_dtype = None

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
_KERNEL_VALUE_DTYPES = frozenset(np.dtype(n) for n in kernels.VALUE_DTYPES)
_NUMPY_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.bool_): torch.bool,
}
# Validation scans big index arrays in blocks so it never allocates a full-size temporary.
_SCAN_BLOCK = 1 << 22


def default_dtype(key: str) -> np.dtype:
    """scvi-tools' default loading dtype for a registry key."""
    return np.dtype(np.int64) if key in _INT64_KEYS else np.dtype(np.float32)


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    try:
        return _NUMPY_TO_TORCH[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no torch dtype for numpy dtype {dtype}") from None


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
# Storage: the arrays a field gathers from, on one device


def _to_device(array: np.ndarray | torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if pin:
        return tensor.pin_memory()
    return tensor.to(device)


def _placed_copy(storage: Any, device: torch.device, pin: bool, build) -> Any:
    """storage placed on device (or pinned), shared by every caller while someone holds it."""
    placed = storage.__dict__.setdefault("_placed", {})
    key = (str(device), bool(pin))
    ref = placed.get(key)
    copy_ = ref() if ref is not None else None
    if copy_ is None:
        copy_ = build()
        placed[key] = weakref.ref(copy_)
    return copy_


def _serves_as_is(storage: Any, device: torch.device, pin: bool) -> bool:
    """Whether storage can be used for device (pinned host memory if pin) without a copy.

    Host storage serves the CPU; storage in GPU memory (a CuPy or CUDA-tensor source used in
    place) serves its own GPU. GPU storage is never pinned: pinning is for host memory.
    """
    here = storage.device
    if here.type == "cuda":
        if pin:
            raise ValueError(
                f"the data is already in GPU memory ({here}) and cannot be placed in pinned host memory; "
                "use residency='device' (it is used in place)"
            )
        if device.type != "cuda":
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return index == here.index
    return device.type == "cpu" and not pin


def _bound_for(storage: Any, device: torch.device, build) -> Any:
    cache = storage.__dict__.setdefault("_bound", {})
    bound = cache.get(device)
    if bound is None:
        bound = cache[device] = build()
    return bound


def _nbytes(array: np.ndarray | torch.Tensor) -> int:
    if isinstance(array, np.ndarray):
        return int(array.nbytes)
    return int(array.numel() * array.element_size())


class DenseStorage:
    """A C-contiguous ``(n_rows, n_cols)`` array (numpy or torch, any device)."""

    kind = "dense"

    def __init__(self, values: np.ndarray | torch.Tensor, *, squeeze: bool = False):
        self.values = values
        self.n_rows, self.n_cols = (int(s) for s in values.shape)
        self.squeeze = squeeze  # the source was 1-D: batches are (B,), as scvi-tools yields

    @property
    def device(self) -> torch.device:
        return self.values.device if isinstance(self.values, torch.Tensor) else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)

    @property
    def value_dtype(self) -> str:
        return kernels.dtype_name(self.values)

    def bound(self, device: torch.device) -> kernels.BoundDense:
        """The storage bound for kernels running on device (checked once, then cached)."""
        return _bound_for(self, device, lambda: kernels.BoundDense(self.values, device=device))

    def to(self, device: torch.device | str, *, pin: bool = False) -> DenseStorage:
        """This storage on device: itself where it already is, else a (shared) copy."""
        device = torch.device(device)
        if _serves_as_is(self, device, pin):
            return self
        return _placed_copy(self, device, pin,
                            lambda: DenseStorage(_to_device(self.values, device, pin), squeeze=self.squeeze))


class CsrStorage:
    """CSR arrays (numpy or torch, any device) plus what sparse outputs need to mimic scipy."""

    kind = "csr"

    def __init__(self, indptr, indices, values, n_rows: int, n_cols: int, *, source_format: str = "csr",
                 batch_index_dtype: np.dtype | type = np.int32):
        self.indptr, self.indices, self.values = indptr, indices, values
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self.source_format = source_format  # "csr" or "csc": the layout of sparse outputs
        # Index dtype scipy gives a row slice of the source (sparse outputs use the same).
        self.batch_index_dtype = np.dtype(batch_index_dtype)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.values.device if isinstance(self.values, torch.Tensor) else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return _nbytes(self.indptr) + _nbytes(self.indices) + _nbytes(self.values)

    @property
    def bytes_per_nonzero(self) -> float:
        return self.nbytes / max(self.nnz, 1)

    @property
    def value_dtype(self) -> str:
        return kernels.dtype_name(self.values)

    def bound(self, device: torch.device) -> kernels.BoundCsr:
        """The matrix bound for kernels running on device (checked once, then cached)."""
        return _bound_for(self, device, lambda: kernels.BoundCsr(self.indptr, self.indices, self.values,
                                                                 self.n_cols, device=device, validate=False))

    def to(self, device: torch.device | str, *, pin: bool = False) -> CsrStorage:
        """This storage on device: itself where it already is, else a (shared) copy."""
        device = torch.device(device)
        if _serves_as_is(self, device, pin):
            return self
        return _placed_copy(self, device, pin, lambda: CsrStorage(
            _to_device(self.indptr, device, pin), _to_device(self.indices, device, pin),
            _to_device(self.values, device, pin), self.n_rows, self.n_cols,
            source_format=self.source_format, batch_index_dtype=self.batch_index_dtype,
        ))


class HostFallbackStorage:
    """A source the kernels cannot read (exotic dtypes): sliced with numpy/scipy as scvi-tools does."""

    kind = "fallback"

    def __init__(self, source: Any):
        self.source = source
        self.n_rows = int(source.shape[0])

    device = torch.device("cpu")

    @property
    def nbytes(self) -> int:
        if sp.issparse(self.source):
            return int(self.source.data.nbytes + self.source.indices.nbytes + self.source.indptr.nbytes)
        return int(np.asarray(self.source).nbytes)

    def to(self, device, *, pin: bool = False) -> HostFallbackStorage:
        return self  # gathered on the host, then copied


# --------------------------------------------------------------------------------------------
# Building storage from registry data, with validation


def _numeric_kind(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf"


def _require_numeric(dtype: np.dtype, where: str) -> None:
    if not _numeric_kind(np.dtype(dtype)):
        raise ValueError(f"{where} has dtype {dtype}; expected a real numeric (int, float or bool) dtype")


def _has_negative_zero(values: np.ndarray) -> bool:
    """Whether a float array holds -0.0 (scanned in blocks, no full-size temporaries)."""
    flat = values.reshape(-1)
    for start in range(0, len(flat), _SCAN_BLOCK):
        block = flat[start:start + _SCAN_BLOCK]
        if bool(np.any(np.signbit(block) & (block == 0))):
            return True
    return False


def _storable(values: np.ndarray, *, keep_negative_zero: bool = False) -> np.ndarray:
    """values in a lossless dtype the kernels read (compact when annloader_gpu.compact is there).

    keep_negative_zero: dense sources keep the sign of -0.0 (scvi-tools' batches are slices of
    them). Sparse ones need not: scipy's toarray() adds stored values onto zeros, so an explicit
    -0.0 comes out of scvi-tools' dense batches as +0.0, as it does from integer storage.
    """
    if compact_value_dtype is not None:
        try:
            target = compact_value_dtype(values)
        except TypeError:
            target = None
        if (keep_negative_zero and target is not None and target.kind in "ui" and values.dtype.kind == "f"
                and _has_negative_zero(values)):
            target = None  # an integer dtype would turn -0.0 into +0.0 (its sign shows in 1/x, copysign)
        if target is not None and target in _KERNEL_VALUE_DTYPES:
            return values.astype(target, copy=False)
    if values.dtype in _KERNEL_VALUE_DTYPES:
        return values
    widen = {"b": np.uint8, "i": np.int64}.get(values.dtype.kind)
    if values.dtype in (np.dtype(np.uint32),):
        widen = np.int64
    if widen is None:
        raise TypeError(f"no lossless kernel dtype for {values.dtype}")
    return values.astype(widen)


def _check_compressed(indptr: np.ndarray, indices: np.ndarray, n_major: int, n_minor: int, where: str,
                      fmt: str) -> None:
    """Structure, index range and canonical order of a CSR (or CSC) matrix, in O(nnz) blocks."""
    minor = "column" if fmt == "csr" else "row"
    if indptr.ndim != 1 or len(indptr) != n_major + 1:
        raise ValueError(f"{where} ({fmt.upper()}) has an indptr of length {len(indptr)}; expected {n_major + 1}")
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise ValueError(f"{where} ({fmt.upper()}) has non-integer index arrays ({indptr.dtype}, {indices.dtype})")
    nnz = int(indptr[-1]) if len(indptr) else 0
    if int(indptr[0]) != 0 or nnz > len(indices) or bool(np.any(indptr[1:] < indptr[:-1])):
        raise ValueError(
            f"{where} ({fmt.upper()}) has an indptr that is not non-decreasing from 0 to at most "
            f"nnz={len(indices)}; the matrix is corrupt"
        )
    if nnz == 0:
        return
    starts = np.zeros(nnz + 1, dtype=bool)
    starts[indptr[:-1][indptr[:-1] < nnz]] = True
    for begin in range(0, nnz, _SCAN_BLOCK):
        end = min(begin + _SCAN_BLOCK, nnz)
        block = indices[begin:end]
        lo, hi = int(block.min()), int(block.max())
        if lo < 0 or hi >= n_minor:
            raise ValueError(f"{where} ({fmt.upper()}) has {minor} indices outside [0, {n_minor}); the matrix is corrupt")
        # Within a row, each index must be strictly larger than the previous one.
        stop = min(end + 1, nnz)
        nxt = indices[begin + 1:stop].astype(np.int64)
        cur = block[: len(nxt)].astype(np.int64)
        bad = (nxt <= cur) & ~starts[begin + 1:stop]
        if bool(bad.any()):
            raise ValueError(
                f"{where} ({fmt.upper()}) is not in canonical format (unsorted or duplicate {minor} "
                "indices within a row); fix a copy with .sum_duplicates() (which also sorts) or "
                ".sort_indices(), and register that"
            )


def _scipy_slice_index_dtype(matrix: Any) -> np.dtype:
    """The index dtype scipy gives a row slice of matrix (what scvi-tools' sparse tensors carry)."""
    if matrix.shape[0] == 0:
        return np.dtype(np.int32)
    probe = matrix[np.array([0])]
    return np.dtype(probe.indptr.dtype)


def _sparse_storage(matrix: Any, where: str) -> CsrStorage | HostFallbackStorage:
    fmt = matrix.format
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric(matrix.dtype, where)
    n_rows, n_cols = (int(s) for s in matrix.shape)
    indptr, indices, data = np.asarray(matrix.indptr), np.asarray(matrix.indices), np.asarray(matrix.data)
    n_major, n_minor = (n_rows, n_cols) if fmt == "csr" else (n_cols, n_rows)
    _check_compressed(indptr, indices, n_major, n_minor, where, fmt)
    nnz = int(indptr[-1])
    if data.ndim != 1 or len(data) < nnz:
        raise ValueError(
            f"{where} ({fmt.upper()}) has {len(data)} stored values (shape {data.shape}) for nnz={nnz} "
            "indices; the matrix is corrupt"
        )
    indices, data = indices[:nnz], data[:nnz]
    index_dtype = _scipy_slice_index_dtype(matrix)
    try:
        data = _storable(data)
    except TypeError:
        return HostFallbackStorage(matrix)
    if indptr.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        indptr = indptr.astype(np.int64)
    if indices.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        indices = indices.astype(np.int64)
    if fmt == "csc":
        indptr, indices, data = kernels.csc_to_csr(indptr, indices, data, (n_rows, n_cols))
    if compact_index_dtype is not None:
        indices = indices.astype(compact_index_dtype(n_cols), copy=False)
        indptr = indptr.astype(compact_indptr_dtype(nnz), copy=False)
    # The structure is never shared with the user's matrix: an in-place edit of it (say
    # eliminate_zeros()) after set-up must not turn validated row bounds into wild reads. indptr
    # is small; indices are copied only where no compact conversion already made them ours.
    if np.shares_memory(indptr, matrix.indptr):
        indptr = indptr.copy()
    if np.shares_memory(indices, matrix.indices):
        indices = indices.copy()
    return CsrStorage(np.ascontiguousarray(indptr), np.ascontiguousarray(indices), np.ascontiguousarray(data),
                      n_rows, n_cols, source_format=fmt, batch_index_dtype=index_dtype)


def _dense_storage(array: np.ndarray, where: str) -> DenseStorage | HostFallbackStorage:
    if array.dtype == object:
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where} has non-numeric values (object dtype)") from None
    _require_numeric(array.dtype, where)
    if array.ndim not in (1, 2):
        raise ValueError(f"{where} must be 1- or 2-dimensional, got shape {array.shape}")
    squeeze = array.ndim == 1
    if squeeze:
        array = array.reshape(-1, 1)
    try:
        values = _storable(array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1),
                           keep_negative_zero=True)
    except TypeError:
        return HostFallbackStorage(array.reshape(-1) if squeeze else array)
    return DenseStorage(np.ascontiguousarray(values.reshape(array.shape)), squeeze=squeeze)


# --------------------------------------------------------------------------------------------
# Sources already in tensors: CuPy / cupyx data in GPU memory, torch tensors on any device
#
# One builder, written in torch ops, serves them all: it validates where the arrays live (no
# host round trip for GPU data) with the rules and messages of _check_compressed, and keeps the
# user's values where the kernels can read them as they are.

_TORCH_UINT16, _TORCH_UINT32, _TORCH_UINT64 = torch.uint16, torch.uint32, torch.uint64  # torch >= 2.3
_TORCH_INTEGER_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                   _TORCH_UINT16, _TORCH_UINT32, _TORCH_UINT64})
_TORCH_KERNEL_VALUE_DTYPES = frozenset(
    t for t, name in kernels._TORCH_DTYPE_NAMES.items() if name in kernels.VALUE_DTYPES
)


def _tensor_kind(dtype: torch.dtype) -> str | None:
    """numpy's dtype.kind for a torch dtype: "b", "i" (signed or not) or "f"; None for the rest."""
    if dtype == torch.bool:
        return "b"
    if dtype in _TORCH_INTEGER_DTYPES:
        return "i"
    if dtype.is_floating_point:
        return "f"
    return None  # complex, quantized


def _dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype named as numpy names it ("float32", not "torch.float32"), for messages."""
    return str(dtype).removeprefix("torch.")


def _require_numeric_tensor(tensor: torch.Tensor, where: str) -> None:
    if _tensor_kind(tensor.dtype) is None:
        raise ValueError(
            f"{where} has dtype {_dtype_name(tensor.dtype)}; expected a real numeric (int, float or bool) dtype"
        )


def _exact_int64(tensor: torch.Tensor) -> torch.Tensor:
    """A new int64 tensor holding tensor's integers exactly (uint64 above 2**63 - 1 become negative).

    The unsigned types torch supports only partly are reinterpreted as the signed type of their
    width and masked, so only operations every torch build has on every device are used.
    """
    if tensor.dtype == _TORCH_UINT64:
        return tensor.view(torch.int64).clone()
    if tensor.dtype == _TORCH_UINT32:
        return tensor.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if tensor.dtype == _TORCH_UINT16:
        return tensor.view(torch.int16).to(torch.int64) & 0xFFFF
    return tensor.to(torch.int64, copy=True)


def _index_sink(out: torch.Tensor) -> torch.Tensor:
    """What to copy int64 indices into to fill out: a uint16 tensor is filled through its int16 view.

    Indices below 65,536 narrowed to int16 keep their low 16 bits, which read back as uint16 are
    the indices themselves; this avoids casts to uint16, which not every torch build has on CUDA.
    """
    return out.view(torch.int16) if out.dtype == _TORCH_UINT16 else out


def _narrowed_indices(indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32/int64 indices, all in range for dtype, as dtype (the same tensor when it already is)."""
    if indices.dtype == dtype:
        return indices
    out = torch.empty(indices.shape, dtype=dtype, device=indices.device)
    _index_sink(out).copy_(indices)
    return out


def _storable_tensor(values: torch.Tensor, where: str) -> torch.Tensor:
    """values in a dtype the kernels read: the same tensor when they already can, else an exact copy."""
    dtype = values.dtype
    if dtype in _TORCH_KERNEL_VALUE_DTYPES:
        return values
    if dtype == torch.bool:
        return values.to(torch.uint8)
    if dtype in (torch.int8, torch.int16):
        return values.to(torch.int32)
    if dtype == _TORCH_UINT32:
        return _exact_int64(values)
    if dtype == _TORCH_UINT64:
        as_signed = values.view(torch.int64)
        if as_signed.numel() and bool((as_signed < 0).any()):
            raise ValueError(f"{where} has uint64 values above {2**63 - 1}; the kernels cannot read them exactly")
        return as_signed  # the same bits, read as int64: still the user's memory
    if dtype.is_floating_point:  # bfloat16, float8 variants: float32 holds every one exactly
        return values.to(torch.float32)
    raise ValueError(f"{where} has dtype {_dtype_name(dtype)}; expected a real numeric (int, float or bool) dtype")


def _require_kernel_device(device: torch.device, where: str) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} is in {device} memory; the kernels read CPU or CUDA memory (use .cpu())")


def _check_indptr_tensor(indptr: torch.Tensor, indices: torch.Tensor, n_major: int, where: str,
                         fmt: str) -> tuple[torch.Tensor, int]:
    """The indptr half of :func:`_check_compressed`, on torch tensors where they live.

    Returns (a new int64 copy of indptr, nnz). Callers keep that copy, not the user's array: what
    the kernels trust is what was checked, and an in-place edit of the user's indptr after set-up
    cannot reach it.
    """
    fmt_name = fmt.upper()
    length = int(indptr.shape[0]) if indptr.ndim else 0
    if indptr.ndim != 1 or length != n_major + 1:
        raise ValueError(f"{where} ({fmt_name}) has an indptr of length {length}; expected {n_major + 1}")
    if _tensor_kind(indptr.dtype) != "i" or _tensor_kind(indices.dtype) != "i":
        raise ValueError(f"{where} ({fmt_name}) has non-integer index arrays "
                         f"({_dtype_name(indptr.dtype)}, {_dtype_name(indices.dtype)})")
    if indices.ndim != 1:
        raise ValueError(f"{where} ({fmt_name}) has indices of shape {tuple(indices.shape)}; expected 1-D")
    n_indices = int(indices.shape[0])
    ptr = _exact_int64(indptr)
    first, nnz = torch.stack((ptr[0], ptr[-1])).tolist()
    decreasing = bool((ptr[1:] < ptr[:-1]).any()) if n_major else False
    if first != 0 or nnz > n_indices or decreasing:
        raise ValueError(
            f"{where} ({fmt_name}) has an indptr that is not non-decreasing from 0 to at most "
            f"nnz={n_indices}; the matrix is corrupt"
        )
    return ptr, int(nnz)


def _check_minor_indices_tensor(ptr: torch.Tensor, indices: torch.Tensor, nnz: int, n_minor: int, where: str,
                                fmt: str, *, out: torch.Tensor | None = None) -> None:
    """The index half of :func:`_check_compressed` (range, strictly increasing within each row).

    ptr is the validated int64 indptr. Scans indices[:nnz] in blocks (no full-size temporaries).
    With out (length nnz), each checked block is also copied there, converted to out's dtype: the
    stored indices are exactly the checked ones, with no second full-size copy.
    """
    minor = "column" if fmt == "csr" else "row"
    fmt_name = fmt.upper()
    sink = _index_sink(out) if out is not None else None
    for begin in range(0, nnz, _SCAN_BLOCK):
        end = min(begin + _SCAN_BLOCK, nnz)
        block = _exact_int64(indices[begin:end])
        lo, hi = torch.stack((block.min(), block.max())).tolist()
        if lo < 0 or hi >= n_minor:
            raise ValueError(f"{where} ({fmt_name}) has {minor} indices outside [0, {n_minor}); the matrix is corrupt")
        if sink is not None:
            sink[begin:end].copy_(block)
        # Within a row, each index must be strictly larger than the previous one; positions where
        # a row starts (indptr entries in (begin, stop)) are exempt.
        stop = min(end + 1, nnz)
        nxt = _exact_int64(indices[begin + 1:stop])
        bad = nxt <= block[: nxt.shape[0]]
        bounds = torch.tensor([begin + 1, stop], dtype=torch.int64, device=ptr.device)
        first_start, past_start = torch.searchsorted(ptr, bounds).tolist()
        bad[ptr[first_start:past_start] - (begin + 1)] = False
        if bool(bad.any()):
            raise ValueError(
                f"{where} ({fmt_name}) is not in canonical format (unsorted or duplicate {minor} "
                "indices within a row); fix a copy with .sum_duplicates() (which also sorts) or "
                ".sort_indices(), and register that"
            )


def _check_values_tensor(data: torch.Tensor, nnz: int, where: str, fmt: str) -> None:
    if data.ndim != 1 or int(data.shape[0]) < nnz:
        n_stored = int(data.shape[0]) if data.ndim else 0
        raise ValueError(
            f"{where} ({fmt.upper()}) has {n_stored} stored values (shape {tuple(data.shape)}) for nnz={nnz} "
            "indices; the matrix is corrupt"
        )


def check_sparse_tensors(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, shape: tuple[int, int],
                         fmt: str, where: str) -> None:
    """Validates CSR/CSC arrays given as torch tensors (any device) as :func:`_sparse_storage` does
    scipy matrices: format, numeric values, structure, index range and canonical order."""
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric_tensor(data, where)
    n_rows, n_cols = (int(s) for s in shape)
    n_major, n_minor = (n_rows, n_cols) if fmt == "csr" else (n_cols, n_rows)
    ptr, nnz = _check_indptr_tensor(indptr, indices, n_major, where, fmt)
    _check_minor_indices_tensor(ptr, indices, nnz, n_minor, where, fmt)
    _check_values_tensor(data, nnz, where, fmt)


def _tensor_sparse_storage(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor,
                           shape: tuple[int, int], fmt: str, where: str) -> CsrStorage:
    """Validated CSR storage from CSR/CSC arrays given as torch tensors on any one device.

    The arrays are checked where they live, with torch ops (for GPU data: no host round trip).

    * Values: a CSR source's values ARE the storage's values when the kernels read their dtype
      (float32/64/16, int32/64, uint16/uint8): no copy and no compaction. Compacting them would
      allocate a second copy next to the user's, which the user keeps alive: more memory, not
      less. In-place edits of those values are therefore seen by the loader. Other dtypes are
      converted exactly (bool -> uint8, int8/int16 -> int32, uint32 -> int64, bfloat16 -> float32).
    * Structure: indptr and indices are always the storage's own copies, written in their compact
      dtypes (int32 indptr when nnz fits, uint16 column indices for at most 65,536 columns), so
      the copy costs less than the user's arrays. An in-place edit of the user's structure (say
      an index changed or a row pointer moved) after set-up can then never turn validated row
      bounds into wild reads, nor column indices into invalid sparse batches.
    * CSC is converted once to CSR on the arrays' device (:func:`kernels.csc_to_csr`); the
      result is the storage's own, so later edits of a CSC source are not seen.
    """
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric_tensor(data, where)
    devices = {str(t.device) for t in (indptr, indices, data)}
    if len(devices) != 1:
        raise ValueError(f"{where} has its indptr, indices and values on different devices ({sorted(devices)})")
    device = data.device
    _require_kernel_device(device, where)
    n_rows, n_cols = (int(s) for s in shape)
    n_major, n_minor = (n_rows, n_cols) if fmt == "csr" else (n_cols, n_rows)
    # The index dtype of sparse batches: int64 when the source uses it, else int32 (scipy's default).
    batch_index_dtype = np.dtype(np.int64) if indptr.dtype == torch.int64 else np.dtype(np.int32)
    ptr, nnz = _check_indptr_tensor(indptr, indices, n_major, where, fmt)
    if compact_index_dtype is not None:
        index_dtype = torch_dtype(compact_index_dtype(n_cols))
        indptr_dtype = torch_dtype(compact_indptr_dtype(nnz))
    else:  # pragma: no cover - compact.py is part of the package
        index_dtype = torch.int32 if n_cols <= np.iinfo(np.int32).max else torch.int64
        indptr_dtype = torch.int64
    if fmt == "csr":
        own_indices = torch.empty(nnz, dtype=index_dtype, device=device)
        _check_minor_indices_tensor(ptr, indices, nnz, n_minor, where, fmt, out=own_indices)
        _check_values_tensor(data, nnz, where, fmt)
        values = _storable_tensor(data[:nnz].contiguous(), where)  # a view (no copy) when contiguous
        own_indptr = ptr
    else:
        _check_minor_indices_tensor(ptr, indices, nnz, n_minor, where, fmt)
        _check_values_tensor(data, nnz, where, fmt)
        values = _storable_tensor(data[:nnz].contiguous(), where)
        if nnz == 0:
            own_indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
            own_indices = torch.empty(0, dtype=index_dtype, device=device)
            values = values.clone()
        else:
            # The checked copy of indptr goes in; row indices as int32/int64, which can name
            # every output column (uint16 row indices could not if there are over 65,536 columns).
            rows_in = indices[:nnz]
            rows_in = rows_in.contiguous() if rows_in.dtype in (torch.int32, torch.int64) else _exact_int64(rows_in)
            if device.type == "cuda":
                own_indptr, col_indices, values = kernels.csc_to_csr(ptr, rows_in, values, (n_rows, n_cols))
            else:  # the host conversion takes numpy arrays (views of these tensors, no copies)
                converted = kernels.csc_to_csr(ptr.numpy(), rows_in.numpy(), values.numpy(), (n_rows, n_cols))
                own_indptr, col_indices, values = (torch.from_numpy(a) for a in converted)
            own_indices = _narrowed_indices(col_indices, index_dtype)
    if own_indptr.dtype != indptr_dtype:
        own_indptr = own_indptr.to(indptr_dtype)
    return CsrStorage(own_indptr, own_indices, values, n_rows, n_cols, source_format=fmt,
                      batch_index_dtype=batch_index_dtype)


def _tensor_dense_storage(tensor: torch.Tensor, where: str) -> DenseStorage:
    """A 1-D or 2-D tensor (any device) used in place when the kernels read its dtype and layout.

    A C-contiguous tensor of a kernel dtype is the storage itself: no copy, and in-place edits
    of it are seen by the loader. Other dtypes are converted exactly (see _storable_tensor),
    other layouts made C-contiguous (copies).
    """
    tensor = tensor.detach()
    _require_kernel_device(tensor.device, where)
    _require_numeric_tensor(tensor, where)
    if tensor.ndim not in (1, 2):
        raise ValueError(f"{where} must be 1- or 2-dimensional, got shape {tuple(tensor.shape)}")
    squeeze = tensor.ndim == 1
    values = _storable_tensor(tensor.reshape(-1, 1) if squeeze else tensor, where)
    if not values.is_contiguous():
        values = values.contiguous()
    return DenseStorage(values, squeeze=squeeze)


def cupy_sparse_parts(matrix: Any, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(indptr, indices, data, format) of a cupyx CSR/CSC matrix as torch tensors over its memory."""
    fmt = str(matrix.format)
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric(np.dtype(matrix.dtype), where)
    indptr, indices, data = (cupy_to_torch(a) for a in (matrix.indptr, matrix.indices, matrix.data))
    return indptr, indices, data, fmt


def _cupy_sparse_storage(matrix: Any, where: str) -> CsrStorage:
    indptr, indices, data, fmt = cupy_sparse_parts(matrix, where)
    return _tensor_sparse_storage(indptr, indices, data, tuple(matrix.shape), fmt, where)


def _cupy_dense_storage(array: Any, where: str) -> DenseStorage:
    _require_numeric(np.dtype(array.dtype), where)
    return _tensor_dense_storage(cupy_to_torch(array), where)


def _torch_sparse_parts(tensor: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    if tensor.layout == torch.sparse_csr:
        parts, fmt = (tensor.crow_indices(), tensor.col_indices(), tensor.values()), "csr"
    elif tensor.layout == torch.sparse_csc:
        parts, fmt = (tensor.ccol_indices(), tensor.row_indices(), tensor.values()), "csc"
    else:
        raise TypeError(
            f"{where} is a torch tensor with layout {tensor.layout}; only strided, sparse CSR and sparse CSC "
            "tensors are supported (use .to_sparse_csr())"
        )
    if tensor.ndim != 2 or parts[2].ndim != 1:
        raise ValueError(
            f"{where} is a batched or hybrid sparse tensor (shape {tuple(tensor.shape)}, values of shape "
            f"{tuple(parts[2].shape)}); expected a 2-D matrix with one value per stored element"
        )
    indptr, indices, data = (p.detach() for p in parts)
    return indptr, indices, data, fmt


def _torch_storage(tensor: torch.Tensor, where: str) -> DenseStorage | CsrStorage:
    if tensor.layout == torch.strided:
        return _tensor_dense_storage(tensor, where)
    indptr, indices, data, fmt = _torch_sparse_parts(tensor, where)
    return _tensor_sparse_storage(indptr, indices, data, tuple(tensor.shape), fmt, where)


def _data_pointer(array: Any) -> int:
    """The address of a CuPy array's or a tensor's first element (0 when it has none)."""
    if isinstance(array, torch.Tensor):
        return int(array.data_ptr())
    return int(array.data.ptr)


def _source_identity(source: Any) -> tuple:
    nnz, arrays = -1, ()
    if sp.issparse(source):
        nnz = int(source.nnz)
    elif is_cupy_sparse(source):
        # No synchronisation: cupyx's nnz is the values' length. The arrays' addresses tell a
        # matrix whose arrays were replaced (eliminate_zeros(), data = ...) from the one cached.
        nnz = int(source.data.size)
        arrays = tuple(_data_pointer(a) for a in (source.indptr, source.indices, source.data))
    elif isinstance(source, torch.Tensor):
        if source.layout in (torch.sparse_csr, torch.sparse_csc):
            nnz, address = int(source._nnz()), _data_pointer(source.values())
        else:
            address = _data_pointer(source) if source.layout == torch.strided else 0
        arrays = (str(source.layout), str(source.device), address)
    return (id(source), tuple(source.shape), nnz, getattr(source, "format", None), str(getattr(source, "dtype", "")),
            arrays)


_STORAGE_CACHE: dict[tuple, tuple] = {}  # key -> (weakref to the source, weakref to its storage)
_CACHE_LOCK = threading.Lock()


def _cached_storage(source: Any, build) -> Any:
    """Storage for source, shared while source is alive and unchanged (identity, shape, nnz) and
    some loader still holds the storage.

    The cache owns nothing: storage often holds the source itself (a dense array used in place
    is a view of it; a tensor over a CuPy array keeps the array alive), so a strong reference
    here would keep the source, and its GPU memory, alive for the life of the process.
    """
    key = _source_identity(source)
    try:
        ref = weakref.ref(source)
    except TypeError:
        return build()
    with _CACHE_LOCK:
        for stale in [k for k, (r, s) in _STORAGE_CACHE.items() if r() is None or s() is None]:
            del _STORAGE_CACHE[stale]
        hit = _STORAGE_CACHE.get(key)
        if hit is not None and hit[0]() is source:
            storage = hit[1]()
            if storage is not None:
                return storage
    storage = build()
    with _CACHE_LOCK:
        _STORAGE_CACHE[key] = (ref, weakref.ref(storage))
    return storage


def build_storage(data: Any, where: str, n_obs: int) -> DenseStorage | CsrStorage | HostFallbackStorage:
    """Validated, compact storage for one registry entry (cached per source object)."""
    if sp.issparse(data):
        storage = _cached_storage(data, lambda: _sparse_storage(data, where))
    elif isinstance(data, pd.DataFrame):
        non_numeric = [str(c) for c, dt in data.dtypes.items() if not _numeric_dtype_like(dt)]
        if non_numeric:
            raise ValueError(f"{where} has non-numeric columns {non_numeric}")
        storage = _dense_storage(data.to_numpy(), where)
    elif isinstance(data, pd.Series):
        storage = _dense_storage(data.to_numpy(), where)
    elif isinstance(data, np.ndarray):
        storage = _cached_storage(data, lambda: _dense_storage(data, where))
    elif is_cupy_sparse(data):  # in GPU memory (rapids-singlecell): used there, no host round trip
        storage = _cached_storage(data, lambda: _cupy_sparse_storage(data, where))
    elif is_cupy_array(data):
        storage = _cached_storage(data, lambda: _cupy_dense_storage(data, where))
    elif isinstance(data, torch.Tensor):  # strided, sparse CSR or sparse CSC; on any device
        storage = _cached_storage(data, lambda: _torch_storage(data, where))
    else:
        raise TypeError(
            f"{where} is a {type(data).__module__}.{type(data).__name__}; expected an in-memory numpy "
            "array, pandas DataFrame or scipy CSR/CSC matrix, or data in GPU memory: a cupy array, a cupyx "
            "CSR/CSC matrix or a torch tensor (for backed AnnData, use adata.to_memory())"
        )
    if storage.n_rows != n_obs:
        raise ValueError(f"{where} has {storage.n_rows} rows but the AnnData has n_obs={n_obs}")
    return storage


def _numeric_dtype_like(dtype: Any) -> bool:
    return pd.api.types.is_bool_dtype(dtype) or (
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
    )


# --------------------------------------------------------------------------------------------
# Fields


@contextlib.contextmanager
def _quiet_sparse_constructors():
    """torch warns that sparse CSR/CSC support is in beta on first use; scvi-tools users see it too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*support is in beta.*")
        yield


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
