"""Storage from host data (numpy arrays, pandas columns, scipy CSR/CSC), validated once.

Everything a batch relies on is checked here, before any kernel runs: numeric dtype, shape,
CSR structure, column range, canonical order (sorted, no duplicates). Storage is compact and
lossless (:mod:`annloader_gpu.compact`), and its structure is never shared with the user's
matrix, so an in-place edit after set-up can never turn validated row bounds into wild reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernels
from .storage import CsrStorage, DenseStorage, HostFallbackStorage

from .compact import compact_index_dtype, compact_indptr_dtype, compact_value_dtype

_KERNEL_VALUE_DTYPES = frozenset(np.dtype(n) for n in kernels.VALUE_DTYPES)
# Validation scans big index arrays in blocks so it never allocates a full-size temporary.
_SCAN_BLOCK = 1 << 22


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
    """values in a lossless dtype the kernels read, as compact as is exact (annloader_gpu.compact).

    keep_negative_zero: dense sources keep the sign of -0.0 (scvi-tools' batches are slices of
    them). Sparse ones need not: scipy's toarray() adds stored values onto zeros, so an explicit
    -0.0 comes out of scvi-tools' dense batches as +0.0, as it does from integer storage.
    """
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
    """The index dtype scipy gives a row slice of matrix (what scvi-tools' sparse tensors carry).

    Where this scipy cannot slice the matrix at all (scipy 1.10 refuses an int64 indptr next to
    int32 indices), the dtype a newer scipy gives such a slice: int32 unless the sizes need int64.
    """
    if matrix.shape[0] == 0:
        return np.dtype(np.int32)
    try:
        probe = matrix[np.array([0])]
    except ValueError:
        wide = max(int(matrix.nnz), int(matrix.shape[1])) > np.iinfo(np.int32).max
        return np.dtype(np.int64 if wide else np.int32)
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
