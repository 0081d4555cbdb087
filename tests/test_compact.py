import numpy as np
import pytest

from annloader_gpu.compact import (
    compact_csr_arrays,
    compact_index_dtype,
    compact_indptr_dtype,
    compact_value_dtype,
    csr_resident_bytes,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 1, 255], dtype=np.float32), np.uint8),
        (np.array([0, 256, 65535], dtype=np.float32), np.uint16),
        (np.array([0, 65536], dtype=np.float32), np.float32),  # past uint16, and float16 tops out at 65504
        (np.array([3, 70000], dtype=np.int64), np.int32),
        (np.array([-1, 2], dtype=np.int32), np.int32),
        (np.array([0.5, 1.25], dtype=np.float32), np.float16),
        (np.array([0.1], dtype=np.float32), np.float32),
        (np.array([0.1], dtype=np.float64), np.float64),
        (np.array([0.1], dtype=np.float32).astype(np.float64), np.float32),
        (np.array([np.nan, 1.0], dtype=np.float32), np.float16),
        (np.array([np.inf, 1.0], dtype=np.float32), np.float16),
        (np.array([2**40], dtype=np.int64), np.int64),
        (np.array([True, False]), np.uint8),
        (np.array([], dtype=np.float32), np.uint8),
    ],
)
def test_compact_value_dtype_is_smallest_lossless(values, expected):
    chosen = compact_value_dtype(values)
    assert chosen == np.dtype(expected)
    with np.errstate(over="ignore", invalid="ignore"):
        roundtrip = values.astype(chosen).astype(values.dtype)
    np.testing.assert_array_equal(roundtrip, values)


def test_compact_value_dtype_scans_in_blocks(monkeypatch):
    import annloader_gpu.compact as compact

    monkeypatch.setattr(compact, "_SCAN_BLOCK", 4)
    values = np.array([1, 2, 3, 4, 5, 6, 7, 300], dtype=np.float32)
    assert compact_value_dtype(values) == np.uint16
    values[-1] = 0.5
    assert compact_value_dtype(values) == np.float16


def test_compact_value_dtype_refuses_non_numeric():
    with pytest.raises(TypeError, match="numeric"):
        compact_value_dtype(np.array(["a"]))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        compact_value_dtype(np.array([1.0], dtype=np.longdouble))


def test_index_dtypes_follow_capacity():
    assert compact_index_dtype(65536) == np.uint16
    assert compact_index_dtype(65537) == np.int32
    assert compact_index_dtype(2**31 + 1) == np.int64
    assert compact_indptr_dtype(2**31 - 1) == np.int32
    assert compact_indptr_dtype(2**31) == np.int64


def test_raw_counts_reach_four_bytes_per_nonzero():
    rng = np.random.default_rng(0)
    n_rows, n_cols, nnz = 1000, 20000, 1500 * 1000
    values = rng.negative_binomial(2, 0.3, nnz).astype(np.float32) + 1
    indices = rng.integers(0, n_cols, nnz).astype(np.int32)
    indptr = np.linspace(0, nnz, n_rows + 1).astype(np.int64)
    c_indptr, c_indices, c_values = compact_csr_arrays(indptr, indices, values, n_cols)
    np.testing.assert_array_equal(c_values.astype(np.float32), values)
    np.testing.assert_array_equal(c_indices.astype(np.int32), indices)
    per_nnz = csr_resident_bytes(n_rows, nnz, c_values.dtype, c_indices.dtype, c_indptr.dtype) / nnz
    assert per_nnz <= 4.1
    assert csr_resident_bytes(n_rows, nnz, np.float32, np.int64, np.int64) / nnz > 12
