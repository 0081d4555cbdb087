"""Property tests: random shapes (0 rows/cols included), sparsity, dtypes and batches vs the reference.

Each property runs on every device of the conftest matrix (CUDA marked ``gpu``, skipped where no
GPU is usable). Example counts are sized so this file and test_kernels.py stay under a minute on
two cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    COLUMN_INDEX_DTYPES,
    INDEX_DTYPES,
    OUTPUT_DTYPES,
    VALUE_DTYPES,
    assert_identical,
    empty_poisoned,
    np_dtype,
    on_every_device,
    random_csr,
    random_values,
    reference_dense,
    to_device,
    torch_dtype,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annloader_gpu import kernels as K

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def csr_cases(draw, max_rows: int = 40, max_cols: int = 90):
    """A random CSR matrix (any supported dtypes) and a batch of row indices into it."""
    n_rows = draw(st.integers(0, max_rows))
    n_cols = draw(st.integers(0, max_cols))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]) | st.floats(0, 1))
    dtypes = dict(
        value_dtype=draw(st.sampled_from(VALUE_DTYPES)),
        index_dtype=draw(st.sampled_from(COLUMN_INDEX_DTYPES)),
        indptr_dtype=draw(st.sampled_from(INDEX_DTYPES)),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    empty_rows = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    unsorted = draw(st.booleans())
    rng = np.random.default_rng(seed)
    matrix = random_csr(rng, n_rows, n_cols, density, **dtypes, empty_rows=empty_rows, unsorted=unsorted)
    rows_dtype = draw(st.sampled_from(INDEX_DTYPES))
    if n_rows:
        rows = draw(st.lists(st.integers(0, n_rows - 1), max_size=60))
    else:
        rows = []
    return matrix, n_cols, np.array(rows, dtype=np_dtype(rows_dtype))


@on_every_device
@given(case=csr_cases(), out_dtype=st.sampled_from(OUTPUT_DTYPES))
@SETTINGS
def test_csr_to_dense_matches_reference(device, case, out_dtype):
    (indptr, indices, values), n_cols, rows = case
    out = empty_poisoned((len(rows), n_cols), out_dtype, device)
    K.gather_csr_to_dense(*(to_device(a, device) for a in (indptr, indices, values)), n_cols,
                          to_device(rows, device), out)
    assert_identical(out, reference_dense(indptr, indices, values, n_cols, rows, out_dtype))


@on_every_device
@given(case=csr_cases(), out_value_dtype=st.sampled_from(OUTPUT_DTYPES),
       out_index_dtype=st.sampled_from(INDEX_DTYPES))
@SETTINGS
def test_csr_to_csr_matches_reference(device, case, out_value_dtype, out_index_dtype):
    (indptr, indices, values), n_cols, rows = case
    src = [to_device(a, device) for a in (indptr, indices, values)]
    rows_t = to_device(rows, device)
    out_indptr = empty_poisoned(len(rows) + 1, "int64", device)
    nnz = K.csr_batch_indptr(src[0], rows_t, out_indptr)
    nnz = int(out_indptr[-1]) if nnz is None else nnz
    out_indices = empty_poisoned(nnz, out_index_dtype, device)
    out_values = empty_poisoned(nnz, out_value_dtype, device)
    K.gather_csr_to_csr(*src, n_cols, rows_t, out_indptr, out_indices, out_values)

    starts, ends = indptr[rows.astype(np.int64)].astype(np.int64), indptr[rows.astype(np.int64) + 1].astype(np.int64)
    expected_indptr = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)] + [np.zeros(0, np.int64)])
    assert_identical(out_indptr, torch.from_numpy(expected_indptr))
    assert_identical(out_indices, torch.from_numpy(indices[take].astype(np.int64)).to(torch_dtype(out_index_dtype)))
    assert_identical(out_values, torch.from_numpy(values[take]).to(torch_dtype(out_value_dtype)))


@on_every_device
@given(
    n_rows=st.integers(0, 30),
    n_cols=st.integers(0, 40),
    pad=st.integers(0, 5),
    row_step=st.integers(1, 3),
    value_dtype=st.sampled_from(VALUE_DTYPES),
    out_dtype=st.sampled_from(OUTPUT_DTYPES),
    rows_dtype=st.sampled_from(INDEX_DTYPES),
    as_numpy=st.booleans(),
    data=st.data(),
)
@SETTINGS
def test_gather_dense_matches_reference(device, n_rows, n_cols, pad, row_step, value_dtype, out_dtype,
                                        rows_dtype, as_numpy, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    width = n_cols + pad
    big = random_values(rng, n_rows * row_step * width, np_dtype(value_dtype)).reshape(n_rows * row_step, width)
    offset = data.draw(st.integers(0, pad))
    src = big[::row_step, offset:offset + n_cols]  # a row stride, whenever pad or row_step allows
    rows = np.array(data.draw(st.lists(st.integers(0, n_rows - 1), max_size=50)) if n_rows else [],
                    dtype=np_dtype(rows_dtype))
    if as_numpy and device == "cpu":
        src_arg, rows_arg = src, rows
    else:
        src_arg = to_device(torch.from_numpy(big), device)[::row_step, offset:offset + n_cols]
        rows_arg = to_device(rows, device)
    out = empty_poisoned((len(rows), n_cols), out_dtype, device)
    K.gather_dense(src_arg, rows_arg, out)
    assert_identical(out, torch.from_numpy(np.ascontiguousarray(src[rows.astype(np.int64)])).to(torch_dtype(out_dtype)))


@given(
    n_rows=st.integers(0, 50),
    n_cols=st.integers(0, 50),
    density=st.floats(0, 1),
    index_dtype=st.sampled_from(COLUMN_INDEX_DTYPES),
    indptr_dtype=st.sampled_from(INDEX_DTYPES),
    out_indptr_dtype=st.sampled_from(INDEX_DTYPES),
    value_dtype=st.sampled_from(["uint8", "uint16", "float32", "int32", "float64", "int64"]),
    unsorted=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@SETTINGS
def test_csc_to_csr_matches_scipy(n_rows, n_cols, density, index_dtype, indptr_dtype, out_indptr_dtype,
                                  value_dtype, unsorted, seed):
    rng = np.random.default_rng(seed)
    indptr, indices, values = random_csr(rng, n_cols, n_rows, density, value_dtype, index_dtype, indptr_dtype,
                                         unsorted=unsorted)
    got = K.csc_to_csr(indptr, indices, values, (n_rows, n_cols), indptr_dtype=np_dtype(out_indptr_dtype))
    ref = sp.csc_matrix((values, indices.astype(np.int64), indptr.astype(np.int64)), shape=(n_rows, n_cols)).tocsr()
    ref.sort_indices()
    np.testing.assert_array_equal(got[0], ref.indptr)
    np.testing.assert_array_equal(got[1], ref.indices)
    np.testing.assert_array_equal(got[2], ref.data)
    assert got[0].dtype == np_dtype(out_indptr_dtype) and got[1].dtype == indices.dtype
    assert got[2].dtype == values.dtype


@on_every_device
@given(
    n_rows=st.integers(0, 20),
    good=st.lists(st.integers(0, 10**6), max_size=10),
    bad=st.one_of(st.integers(-(2**63), -1), st.integers(0, 2**63 - 1)),
    rows_dtype=st.sampled_from(INDEX_DTYPES),
    data=st.data(),
)
@SETTINGS
def test_bad_rows_raise_index_error_naming_first(device, n_rows, good, bad, rows_dtype, data):
    info = np.iinfo(np_dtype(rows_dtype))
    bad = min(max(bad if bad < 0 else n_rows + bad, int(info.min)), int(info.max))  # Python ints: no overflow
    good = [g % n_rows for g in good] if n_rows else []
    position = data.draw(st.integers(0, len(good)))
    rows = np.array(good[:position] + [bad] + good[position:] + [bad], dtype=np_dtype(rows_dtype))
    with pytest.raises(IndexError, match=rf"row index {bad} at position {position} "):
        K.check_rows(to_device(rows, device), n_rows)
    with pytest.raises(IndexError, match=rf"row index {bad} at position {position} "):
        K.gather_dense(to_device(np.ones((n_rows, 2), np.float32), device), to_device(rows, device),
                       empty_poisoned((len(rows), 2), "float32", device))
