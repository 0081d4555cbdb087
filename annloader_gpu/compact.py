"""Lossless compact storage for resident matrices.

Raw UMI counts are small non-negative integers stored as float32, and gene counts rarely
exceed 65,536: storing values as uint16 (or uint8) and column indices as uint16 halves the bytes
per non-zero (8 -> 4 against float32 + int32, 12 against float32 + int64), and the kernels decode
them while casting to the output dtype. Every choice here is lossless: a batch gathered from
compact storage equals one gathered from the original arrays.
"""

from __future__ import annotations

import numpy as np

# Checked in blocks so that scanning a 300M-entry array never allocates a second copy of it.
_SCAN_BLOCK = 1 << 24

_STORABLE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _blocks(values: np.ndarray):
    for start in range(0, len(values), _SCAN_BLOCK):
        yield values[start : start + _SCAN_BLOCK]


def _integer_range(values: np.ndarray) -> tuple[int, int] | None:
    """(min, max) if every value is a finite integer, else None."""
    lo, hi = None, None
    for block in _blocks(values):
        if values.dtype.kind == "f" and not (np.isfinite(block).all() and np.array_equal(block, np.trunc(block))):
            return None
        block_lo, block_hi = int(block.min()), int(block.max())
        lo = block_lo if lo is None else min(lo, block_lo)
        hi = block_hi if hi is None else max(hi, block_hi)
    return (0, 0) if lo is None else (lo, hi)


def _float16_lossless(values: np.ndarray) -> bool:
    for block in _blocks(values):
        with np.errstate(over="ignore"):
            if not np.array_equal(block.astype(np.float16).astype(values.dtype), block, equal_nan=True):
                return False
    return True


def compact_value_dtype(values: np.ndarray) -> np.dtype:
    """The smallest dtype that stores every value exactly.

    Non-negative integers that fit become uint8 or uint16 (counts), other integers int32 when
    they fit; floats become float16 only when that round-trips exactly, and float64 becomes
    float32 only when that round-trips exactly. Anything else keeps its dtype (int64 stays int64;
    bool and other integer kinds are widened exactly).
    """
    values = np.asarray(values)
    dtype = values.dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind not in "uif":
        raise TypeError(f"cannot store values of dtype {dtype}; expected a numeric dtype")
    if dtype.kind == "f" and dtype not in _STORABLE_FLOATS:
        raise TypeError(f"cannot store values of dtype {dtype}; expected float16, float32 or float64")
    bounds = _integer_range(values)
    if bounds is not None:
        lo, hi = bounds
        if lo >= 0 and hi <= np.iinfo(np.uint8).max:
            return np.dtype(np.uint8)
        if lo >= 0 and hi <= np.iinfo(np.uint16).max:
            return np.dtype(np.uint16)
        if dtype.kind in "ui":
            if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
                return np.dtype(np.int32)
            if hi <= np.iinfo(np.int64).max:
                return np.dtype(np.int64)
            raise TypeError(f"values up to {hi} do not fit int64")
    if dtype.kind != "f":
        return np.dtype(np.int64)
    if dtype != np.float16 and _float16_lossless(values):
        return np.dtype(np.float16)
    if dtype == np.float64:
        for block in _blocks(values):
            if not np.array_equal(block.astype(np.float32).astype(np.float64), block, equal_nan=True):
                return np.dtype(np.float64)
        return np.dtype(np.float32)
    return dtype


def compact_index_dtype(n_cols: int) -> np.dtype:
    """Smallest column-index dtype that names every one of n_cols columns."""
    if n_cols <= 1 << 16:
        return np.dtype(np.uint16)
    if n_cols <= 1 << 31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def compact_indptr_dtype(nnz: int) -> np.dtype:
    return np.dtype(np.int32) if nnz <= np.iinfo(np.int32).max else np.dtype(np.int64)


def csr_resident_bytes(n_rows: int, nnz: int, value_dtype, index_dtype, indptr_dtype) -> int:
    """Bytes a CSR matrix occupies with the given storage dtypes."""
    return (
        int(nnz) * (np.dtype(value_dtype).itemsize + np.dtype(index_dtype).itemsize)
        + (int(n_rows) + 1) * np.dtype(indptr_dtype).itemsize
    )


def compact_csr_arrays(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_cols: int):
    """(indptr, indices, values) converted to their compact dtypes (copies only what changes)."""
    nnz = len(indices)
    value_dtype = compact_value_dtype(values)
    return (
        indptr.astype(compact_indptr_dtype(nnz), copy=False),
        indices.astype(compact_index_dtype(n_cols), copy=False),
        values.astype(value_dtype, copy=False),
    )
