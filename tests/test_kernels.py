"""The compiled row gathers against scipy/numpy/torch references, every dtype combination.

Each test runs on every device of the conftest matrix (CUDA tests are marked ``gpu`` and skipped
where no GPU is usable). Outputs are poisoned first, so an element a kernel forgot to write shows
as NaN or a sentinel; comparisons are exact (bit for bit for floats): the kernels promise torch's
cast rules, including float16/bfloat16 round-to-nearest-even and integer truncation toward zero.
"""

from __future__ import annotations

import multiprocessing
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    COLUMN_INDEX_DTYPES,
    GPU_USABLE,
    INDEX_DTYPES,
    OUTPUT_DTYPES,
    VALUE_DTYPES,
    assert_identical,
    empty_poisoned,
    np_dtype,
    parametrize,
    poison,
    random_csr,
    random_values,
    reference_dense,
    to_device,
    torch_dtype,
)

import annloader_gpu
from annloader_gpu import kernels as K


@pytest.fixture
def rng(request) -> np.random.Generator:
    # A seed per test id: reproducible, yet different matrices across the parametrisation.
    return np.random.default_rng(abs(hash(request.node.nodeid)) % 2**32)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = annloader_gpu.get_num_threads()
    yield
    annloader_gpu.set_num_threads(before)


def gather_dense_csr(device, indptr, indices, values, n_cols, rows, out_dtype, **kw) -> torch.Tensor:
    """Runs gather_csr_to_dense on ``device`` into a poisoned output; returns the output."""
    args = [to_device(a, device) for a in (indptr, indices, values)]
    rows_t = to_device(rows, device)
    out = empty_poisoned((len(rows), n_cols), out_dtype, device)
    result = K.gather_csr_to_dense(*args, n_cols, rows_t, out, **kw)
    assert result is out
    return out


def batch_rows(rng, n_rows: int, n_batch: int, dtype: str = "int64") -> np.ndarray:
    """A random batch with repeats, in random order."""
    if n_rows == 0:
        return np.zeros(0, dtype=np_dtype(dtype))
    return rng.integers(0, n_rows, size=n_batch).astype(np_dtype(dtype))


# --- CSR -> dense -------------------------------------------------------------------------


@parametrize("indptr_dtype,index_dtype,value_dtype,out_dtype", INDEX_DTYPES, COLUMN_INDEX_DTYPES,
             VALUE_DTYPES, OUTPUT_DTYPES)
def test_csr_to_dense_every_dtype(device, indptr_dtype, index_dtype, value_dtype, out_dtype, rng):
    n_rows, n_cols = 37, 300
    indptr, indices, values = random_csr(rng, n_rows, n_cols, 0.1, value_dtype, index_dtype, indptr_dtype,
                                         empty_rows=0.1, unsorted=True)
    rows = batch_rows(rng, n_rows, 50, "int64" if indptr_dtype == "int32" else "int32")
    rows[:3] = rows[0]  # repeated rows
    out = gather_dense_csr(device, indptr, indices, values, n_cols, rows, out_dtype)
    assert_identical(out, reference_dense(indptr, indices, values, n_cols, rows, out_dtype))


@parametrize("value_dtype,out_dtype", ["float32", "float64", "float16"], ["float16", "bfloat16"])
def test_half_rounding_matches_torch_bit_for_bit(device, value_dtype, out_dtype, rng):
    # Values spread over every binade, subnormals, ties and overflow: rounding must equal torch's.
    n = 4000
    base = np.float64(2.0) ** rng.integers(-30, 20, size=n) * (1 + rng.random(n))
    ties = 1 + (2 * np.arange(512, dtype=np.float64) + 1) * 2.0**-11  # half-way between float16s
    bf_ties = 1 + (2 * np.arange(128, dtype=np.float64) + 1) * 2.0**-8  # half-way between bfloat16s
    edges = [65504.0, 65519.0, 65520.0, 1e6, 6e-8, 3e-8, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25]
    values = np.concatenate([base * rng.choice([-1.0, 1.0], size=n), ties, -ties, bf_ties, edges])
    with np.errstate(over="ignore"):  # float16 sources turn the largest values into inf
        values = values.astype(np_dtype(value_dtype))
    values[values == 0] = 1
    indptr = np.array([0, len(values)], dtype=np.int64)
    indices = np.arange(len(values), dtype=np.int32)
    out = gather_dense_csr(device, indptr, indices, values, len(values), np.zeros(1, np.int64), out_dtype)
    assert_identical(out, reference_dense(indptr, indices, values, len(values), np.zeros(1), out_dtype))


@parametrize("value_dtype,out_dtype", ["float32", "float64", "float16", "int64"], ["int32", "int64"])
def test_integer_output_truncates_toward_zero(device, value_dtype, out_dtype):
    raw = [2.7, -2.7, 0.5, -0.5, 1e4 + 0.99, -1e4 - 0.99, 3, -3]
    if value_dtype == "int64":
        raw = [2**40 + 5, -(2**33) - 7, 7, -7, 2**31, -(2**31) - 1]  # int64 -> int32 wraps like torch
    values = np.array(raw, dtype=np_dtype(value_dtype))
    indptr = np.array([0, len(values)], dtype=np.int64)
    indices = np.arange(len(values), dtype=np.int64)
    rows = np.zeros(1, np.int64)
    out = gather_dense_csr(device, indptr, indices, values, len(values), rows, out_dtype)
    assert_identical(out, reference_dense(indptr, indices, values, len(values), rows, out_dtype))


@parametrize("case", ["empty_rows", "no_nonzeros", "one_row", "zero_batch", "repeated", "unsorted",
                      "zero_cols", "full_rows"])
def test_csr_to_dense_edge_cases(device, case, rng):
    n_rows, n_cols, density, kw = 20, 50, 0.2, {}
    rows = None
    if case == "empty_rows":
        kw = dict(empty_rows=0.6)
    elif case == "no_nonzeros":
        density = 0.0
    elif case == "one_row":
        n_rows = 1
    elif case == "zero_batch":
        rows = np.zeros(0, dtype=np.int64)
    elif case == "repeated":
        rows = np.array([3, 3, 3, 0, 3, 19, 19], dtype=np.int64)
    elif case == "unsorted":
        kw = dict(unsorted=True)
    elif case == "zero_cols":
        n_cols = 0
    elif case == "full_rows":
        density = 1.0
    indptr, indices, values = random_csr(rng, n_rows, n_cols, density, "float32", "int32", "int64", **kw)
    if case == "unsorted":
        assert any(np.any(np.diff(indices[indptr[r]:indptr[r + 1]]) < 0) for r in range(n_rows))
    if rows is None:
        rows = batch_rows(rng, n_rows, 16)
    out = gather_dense_csr(device, indptr, indices, values, n_cols, rows, "float32")
    assert_identical(out, reference_dense(indptr, indices, values, n_cols, rows, "float32"))


def test_csr_to_dense_accepts_numpy_and_reuses_touched_output(rng):
    indptr, indices, values = random_csr(rng, 30, 40, 0.3, "float32", "int32", "int32")
    rows = batch_rows(rng, 30, 12)
    out = np.full((12, 40), np.nan, dtype=np.float32)
    for _ in range(2):  # a reused buffer holding the previous batch is overwritten completely
        K.gather_csr_to_dense(indptr, indices, values, 40, rows, out)
        assert_identical(torch.from_numpy(out), reference_dense(indptr, indices, values, 40, rows, "float32"))
        rows = rows[::-1].copy()


def test_uint16_indices_at_the_limit(device, rng):
    # 65536 columns are addressable with uint16 (0..65535); the last column must be reachable.
    n_cols = 65536
    indptr = np.array([0, 3, 3], dtype=np.int64)
    indices = np.array([65535, 0, 40000], dtype=np.uint16)
    values = np.array([1.5, 2.5, 3.5], dtype=np.float32)
    rows = np.array([0, 1], dtype=np.int32)
    out = gather_dense_csr(device, indptr, indices, values, n_cols, rows, "float32")
    assert_identical(out, reference_dense(indptr, indices, values, n_cols, rows, "float32"))


@pytest.mark.parametrize("n_cols", [65537, 70000, 2**20])
def test_uint16_indices_refused_for_wide_matrices(device, n_cols):
    indptr = to_device(np.array([0, 1], dtype=np.int64), device)
    indices = to_device(np.array([5], dtype=np.uint16), device)
    values = to_device(np.array([1.0], dtype=np.float32), device)
    rows = to_device(np.array([0]), device)
    out = empty_poisoned((1, n_cols), "float32", device)
    with pytest.raises(ValueError, match=r"uint16 column indices cannot address .*columns"):
        K.gather_csr_to_dense(indptr, indices, values, n_cols, rows, out)
    assert torch.isnan(out).all()  # nothing ran
    with pytest.raises(ValueError, match="uint16"):
        K.gather_csr_to_csr(indptr, indices, values, n_cols, rows, to_device(np.array([0, 1]), device),
                            to_device(np.zeros(1, np.int64), device), empty_poisoned(1, "float32", device))


# --- CSR -> CSR ---------------------------------------------------------------------------


def reference_csr_rows(indptr, indices, values, rows):
    indptr = np.asarray(indptr, dtype=np.int64)
    pieces = [(indices[indptr[r]:indptr[r + 1]], values[indptr[r]:indptr[r + 1]]) for r in rows]
    lengths = [len(p[0]) for p in pieces]
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    cat = (lambda xs, like: np.concatenate(xs) if xs else like[:0])
    return out_indptr, cat([p[0] for p in pieces], indices), cat([p[1] for p in pieces], values)


def gather_csr(device, indptr, indices, values, n_cols, rows, out_index_dtype, out_value_dtype,
               out_indptr_dtype="int64"):
    args = [to_device(a, device) for a in (indptr, indices, values)]
    rows_t = to_device(rows, device)
    out_indptr = empty_poisoned(len(rows) + 1, out_indptr_dtype, device)
    nnz = K.csr_batch_indptr(args[0], rows_t, out_indptr)
    if device == "cpu":
        assert nnz == int(out_indptr[-1])
    else:
        assert nnz is None
        nnz = int(out_indptr[-1])
    out_indices = empty_poisoned(nnz, out_index_dtype, device)
    out_values = empty_poisoned(nnz, out_value_dtype, device)
    K.gather_csr_to_csr(*args, n_cols, rows_t, out_indptr, out_indices, out_values)
    return out_indptr, out_indices, out_values


@parametrize("index_dtype,value_dtype,out_index_dtype,out_value_dtype", COLUMN_INDEX_DTYPES, VALUE_DTYPES,
             INDEX_DTYPES, OUTPUT_DTYPES)
def test_csr_to_csr_every_dtype(device, index_dtype, value_dtype, out_index_dtype, out_value_dtype, rng):
    n_rows, n_cols = 25, 200
    indptr, indices, values = random_csr(rng, n_rows, n_cols, 0.1, value_dtype, index_dtype, "int64",
                                         empty_rows=0.2, unsorted=True)
    rows = batch_rows(rng, n_rows, 30)
    got_indptr, got_indices, got_values = gather_csr(device, indptr, indices, values, n_cols, rows,
                                                     out_index_dtype, out_value_dtype)
    ref_indptr, ref_indices, ref_values = reference_csr_rows(indptr, indices, values, rows)
    assert_identical(got_indptr, torch.from_numpy(ref_indptr))
    assert_identical(got_indices, torch.from_numpy(ref_indices.astype(np.int64)).to(torch_dtype(out_index_dtype)))
    assert_identical(got_values, torch.from_numpy(ref_values).to(torch_dtype(out_value_dtype)))
    # Round trip: the batch CSR densifies to the dense gather's reference.
    batch = sp.csr_matrix((got_values.cpu().to(torch.float64).numpy(), got_indices.cpu().numpy(),
                           got_indptr.cpu().numpy()), shape=(len(rows), n_cols))
    expected = reference_dense(indptr, indices, values, n_cols, rows, out_value_dtype).to(torch.float64)
    assert_identical(torch.from_numpy(batch.toarray()), expected)


@parametrize("indptr_dtype,out_indptr_dtype,case", INDEX_DTYPES, INDEX_DTYPES,
             ["random", "zero_batch", "no_nonzeros", "one_row"], with_device=False)
def test_csr_batch_indptr_dtypes_cpu(indptr_dtype, out_indptr_dtype, case, rng):
    # On the GPU out_indptr must be int64 (tested above); on the CPU both widths work.
    n_rows = 1 if case == "one_row" else 15
    indptr, indices, values = random_csr(rng, n_rows, 30, 0.0 if case == "no_nonzeros" else 0.3,
                                         "float32", "int32", indptr_dtype)
    rows = np.zeros(0, np.int64) if case == "zero_batch" else batch_rows(rng, n_rows, 9)
    got = gather_csr("cpu", indptr, indices, values, 30, rows, "int32", "float32", out_indptr_dtype)
    ref = reference_csr_rows(indptr, indices, values, rows)
    assert_identical(got[0], torch.from_numpy(ref[0]).to(torch_dtype(out_indptr_dtype)))
    assert_identical(got[1], torch.from_numpy(ref[1].astype(np.int32)))
    assert_identical(got[2], torch.from_numpy(ref[2]))


def test_csr_batch_indptr_int32_output_refused_on_gpu():
    if not GPU_USABLE:
        pytest.skip("no usable CUDA GPU")
    indptr = torch.tensor([0, 1], device="cuda")
    with pytest.raises(TypeError, match="int64"):
        K.csr_batch_indptr(indptr, torch.tensor([0], device="cuda"),
                           torch.zeros(2, dtype=torch.int32, device="cuda"))


def test_gather_csr_to_csr_refuses_mismatched_sizes():
    indptr, indices, values = np.array([0, 2]), np.array([0, 1], np.int32), np.ones(2, np.float32)
    rows = np.array([0])
    with pytest.raises(ValueError, match="out_indptr"):
        K.gather_csr_to_csr(indptr, indices, values, 2, rows, np.array([0, 2, 2]), np.zeros(2, np.int64),
                            np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="equal length"):
        K.gather_csr_to_csr(indptr, indices, values, 2, rows, np.array([0, 2]), np.zeros(2, np.int64),
                            np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="ends at"):
        K.gather_csr_to_csr(indptr, indices, values, 2, rows, np.array([0, 1]), np.zeros(2, np.int64),
                            np.zeros(2, np.float32))


# --- dense -> dense -----------------------------------------------------------------------


@parametrize("value_dtype,out_dtype", VALUE_DTYPES, OUTPUT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "row_step"])
@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_gather_dense_every_dtype(device, value_dtype, out_dtype, layout, source, rng):
    if source == "numpy" and device != "cpu":
        pytest.skip("numpy arrays live on the host")
    n_rows, n_cols = 23, 17
    big = random_values(rng, n_rows * 2 * (n_cols + 5), np_dtype(value_dtype)).reshape(n_rows * 2, n_cols + 5)
    src = {"contiguous": np.ascontiguousarray(big[:n_rows, :n_cols]),
           "column_slice": big[:n_rows, 3:3 + n_cols],  # row stride n_cols + 5
           "row_step": big[::2, :n_cols]}[layout]       # row stride 2 * (n_cols + 5)
    assert src.shape == (n_rows, n_cols)
    assert src.flags.c_contiguous == (layout == "contiguous")
    rows = batch_rows(rng, n_rows, 31, "int32")
    if source == "torch":
        src_arg = to_device(torch.from_numpy(big), device)
        src_arg = {"contiguous": src_arg[:n_rows, :n_cols].contiguous(), "column_slice": src_arg[:n_rows, 3:3 + n_cols],
                   "row_step": src_arg[::2, :n_cols]}[layout]
        rows_arg = to_device(rows, device)
    else:
        src_arg, rows_arg = src, rows
    out = empty_poisoned((len(rows), n_cols), out_dtype, device)
    assert K.gather_dense(src_arg, rows_arg, out) is out
    assert_identical(out, torch.from_numpy(src[rows.astype(np.int64)]).to(torch_dtype(out_dtype)))


@parametrize("case", ["zero_batch", "zero_cols", "one_row", "one_col"])
def test_gather_dense_edge_cases(device, case, rng):
    shape = {"zero_batch": (5, 4), "zero_cols": (5, 0), "one_row": (1, 6), "one_col": (7, 1)}[case]
    src = random_values(rng, shape[0] * shape[1], np.float32).reshape(shape)
    rows = np.zeros(0, np.int64) if case == "zero_batch" else batch_rows(rng, shape[0], 4)
    out = empty_poisoned((len(rows), shape[1]), "float64", device)
    K.gather_dense(to_device(src, device), to_device(rows, device), out)
    assert_identical(out, torch.from_numpy(src[rows]).to(torch.float64))


def test_gather_dense_numpy_output():
    src = np.arange(12, dtype=np.int32).reshape(4, 3)
    out = poison(np.empty((2, 3), dtype=np.float32))
    K.gather_dense(src, np.array([3, 0]), out)
    np.testing.assert_array_equal(out, src[[3, 0]].astype(np.float32))


# --- CSC -> CSR ---------------------------------------------------------------------------


def scipy_csc_to_csr(indptr, indices, values, shape):
    # scipy has no float16: a conversion only moves values, so move their bit patterns instead.
    as_bits = values.view(np.uint16) if values.dtype == np.float16 else values
    csr = sp.csc_matrix((as_bits, indices.astype(np.int64), indptr.astype(np.int64)), shape=shape).tocsr()
    csr.sort_indices()
    return csr.indptr, csr.indices, csr.data.view(values.dtype) if values.dtype == np.float16 else csr.data


@parametrize("indptr_dtype,out_indptr_dtype,index_dtype,value_dtype", INDEX_DTYPES, INDEX_DTYPES,
             COLUMN_INDEX_DTYPES, ["uint8", "uint16", "float16", "float32", "int32", "float64", "int64"],
             with_device=False)
@pytest.mark.parametrize("unsorted", [False, True])
def test_csc_to_csr(indptr_dtype, out_indptr_dtype, index_dtype, value_dtype, unsorted, rng):
    n_rows, n_cols = 60, 45
    # A CSC is the CSR of the transpose.
    indptr, indices, values = random_csr(rng, n_cols, n_rows, 0.15, value_dtype, index_dtype, indptr_dtype,
                                         empty_rows=0.1, unsorted=unsorted)
    got = K.csc_to_csr(indptr, indices, values, (n_rows, n_cols), indptr_dtype=np_dtype(out_indptr_dtype))
    ref = scipy_csc_to_csr(indptr, indices, values, (n_rows, n_cols))
    assert got[0].dtype == np_dtype(out_indptr_dtype)
    assert got[1].dtype == indices.dtype and got[2].dtype == values.dtype
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2].view(np.uint8), np.ascontiguousarray(ref[2]).view(np.uint8))


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0), (1, 1), (7, 3)])
def test_csc_to_csr_degenerate_shapes(shape):
    n_rows, n_cols = shape
    indptr = np.zeros(n_cols + 1, np.int64)
    got = K.csc_to_csr(indptr, np.zeros(0, np.int32), np.zeros(0, np.float32), shape)
    np.testing.assert_array_equal(got[0], np.zeros(n_rows + 1))
    assert len(got[1]) == len(got[2]) == 0


def test_csc_to_csr_default_indptr_is_int64_and_large_matrix_splits(threads, rng):
    # Over 2^21 non-zeros the conversion splits columns across threads; rows must stay sorted.
    annloader_gpu.set_num_threads(2)
    n_rows, n_cols = 3000, 1500
    indptr, indices, values = random_csr(rng, n_cols, n_rows, 0.5, "float32", "int32", "int64")
    assert len(indices) > 2**21
    got = K.csc_to_csr(indptr, indices, values, (n_rows, n_cols))
    assert got[0].dtype == np.int64
    ref = scipy_csc_to_csr(indptr, indices, values, (n_rows, n_cols))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_csc_to_csr_refuses_bad_arguments():
    indptr, indices, values = np.array([0, 1]), np.array([0], np.int32), np.ones(1, np.float32)
    with pytest.raises(TypeError, match="numpy"):
        K.csc_to_csr(torch.from_numpy(indptr), indices, values, (1, 1))
    with pytest.raises(ValueError, match="n_cols"):
        K.csc_to_csr(indptr, indices, values, (1, 2))
    with pytest.raises(IndexError, match="CSC row index 0 .* out of range for 0 rows"):
        K.csc_to_csr(indptr, indices, values, (0, 1))
    with pytest.raises(ValueError, match="uint16 indices cannot hold 70000"):
        K.csc_to_csr(np.zeros(70001, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.float32), (2, 70000))
    with pytest.raises(ValueError, match="int32|indptr"):
        K.csc_to_csr(np.array([0, 2]), indices, values, (1, 1))  # ends past nnz


# --- row validation -----------------------------------------------------------------------


@parametrize("rows_dtype,bad", INDEX_DTYPES, [-1, -(2**31), 10, 11, 2**31 - 1])
def test_bad_row_index_named(device, rows_dtype, bad, rng):
    n_rows, n_cols = 10, 8
    indptr, indices, values = random_csr(rng, n_rows, n_cols, 0.5, "float32", "int32", "int64")
    rows = np.array([0, 9, 3, bad, 2, bad], dtype=np_dtype(rows_dtype))
    pattern = rf"row index {bad} at position 3 .*out of range"
    rows_t = to_device(rows, device)
    with pytest.raises(IndexError, match=pattern):
        K.check_rows(rows_t, n_rows)
    with pytest.raises(IndexError, match=pattern):
        gather_dense_csr(device, indptr, indices, values, n_cols, rows, "float32")
    with pytest.raises(IndexError, match=pattern):
        K.csr_batch_indptr(to_device(indptr, device), rows_t, empty_poisoned(len(rows) + 1, "int64", device))
    with pytest.raises(IndexError, match=pattern):
        K.gather_dense(to_device(np.zeros((n_rows, 3), np.float32), device), rows_t,
                       empty_poisoned((len(rows), 3), "float32", device))
    if device == "cpu":
        # The CPU checks every index before any write: the output stays untouched.
        out = empty_poisoned((len(rows), n_cols), "float32")
        with pytest.raises(IndexError):
            K.gather_csr_to_dense(indptr, indices, values, n_cols, rows, out)
        assert torch.isnan(out).all()


def test_bad_int64_row_index_beyond_int32(device):
    rows = to_device(np.array([1, 2**40], dtype=np.int64), device)
    with pytest.raises(IndexError, match=rf"row index {2**40} at position 1"):
        K.check_rows(rows, 5)


def test_check_rows_accepts_valid(device):
    K.check_rows(to_device(np.array([0, 4, 4, 2], dtype=np.int32), device), 5)
    K.check_rows(to_device(np.zeros(0, dtype=np.int64), device), 0)
    with pytest.raises(IndexError, match="row index 0 at position 0"):
        K.check_rows(to_device(np.zeros(1, dtype=np.int64), device), 0)


# --- argument checking --------------------------------------------------------------------


def small_csr(device):
    return [to_device(a, device) for a in (np.array([0, 2, 3]), np.array([0, 2, 1], np.int32),
                                           np.array([1.0, 2.0, 3.0], np.float32))]


@pytest.mark.parametrize("role,bad", [("indptr", "float32"), ("indices", "uint8"), ("values", "int8"),
                                      ("values", "bfloat16"), ("rows", "uint16"), ("out", "uint8"),
                                      ("out", "uint16"), ("values", "bool"), ("indptr", "uint16")])
def test_unsupported_dtypes_refused_before_running(device, role, bad):
    indptr, indices, values = small_csr(device)
    args = dict(indptr=indptr, indices=indices, values=values, rows=to_device(np.array([1, 0]), device),
                out=empty_poisoned((2, 3), "float32", device))
    dtype = {"int8": torch.int8, "bool": torch.bool}.get(bad) or torch_dtype(bad)
    args[role] = args[role].to(dtype)
    if role == "out":
        poison(args["out"]) if dtype.is_floating_point else args["out"].fill_(7)
    before = args["out"].clone()
    with pytest.raises(TypeError, match=f"{role} has dtype"):
        K.gather_csr_to_dense(args["indptr"], args["indices"], args["values"], 3, args["rows"], args["out"])
    assert_identical(args["out"], before)


def test_unsupported_types_and_numpy_dtypes_refused():
    indptr, indices, values = small_csr("cpu")
    out = empty_poisoned((1, 3), "float32")
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        K.gather_csr_to_dense([0, 2, 3], indices, values, 3, np.array([0]), out)
    with pytest.raises(TypeError, match="values has dtype"):
        K.gather_csr_to_dense(indptr, indices, np.ones(3, np.complex64), 3, np.array([0]), out)
    with pytest.raises(TypeError, match="src has dtype"):
        K.gather_dense(np.ones((2, 3), np.int8), np.array([0]), out)
    with pytest.raises(TypeError, match="strided"):
        K.gather_dense(torch.eye(3).to_sparse(), np.array([0]), out)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("shape", [(2, 4), (3, 3), (1, 3), (2, 3, 1)])
def test_wrong_output_shape(device, shape):
    indptr, indices, values = small_csr(device)
    rows = to_device(np.array([1, 0]), device)
    out = empty_poisoned(shape, "float32", device)
    with pytest.raises(ValueError, match="out"):
        K.gather_csr_to_dense(indptr, indices, values, 3, rows, out)
    with pytest.raises(ValueError, match="out"):
        K.gather_dense(to_device(np.ones((2, 3), np.float32), device), rows, out)
    with pytest.raises(ValueError, match="out_indptr"):
        K.csr_batch_indptr(indptr, rows, empty_poisoned(4, "int64", device))
    assert torch.isnan(out).all()


@pytest.mark.parametrize("layout", ["column_step", "transposed", "row_padding"])
def test_non_contiguous_output_refused(device, layout):
    indptr, indices, values = small_csr(device)
    rows = to_device(np.array([1, 0, 1]), device)
    big = empty_poisoned((6, 6), "float32", device)
    out = {"column_step": big[:3, ::2], "transposed": big[:3, :3].t(), "row_padding": big[:3, :3]}[layout]
    assert out.shape == (3, 3)
    with pytest.raises(ValueError, match="contiguous"):
        K.gather_csr_to_dense(indptr, indices, values, 3, rows, out)
    with pytest.raises(ValueError, match="contiguous"):
        K.gather_dense(to_device(np.ones((2, 3), np.float32), device), rows, out)
    assert torch.isnan(big).all()


def test_mismatched_devices_refused():
    indptr, indices, values = small_csr("cpu")
    rows = np.array([1, 0])
    other = torch.empty((2, 3), dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="one device"):
        K.gather_csr_to_dense(indptr, indices, values, 3, rows, other)
    with pytest.raises(ValueError, match="one device"):
        K.gather_dense(torch.ones((2, 3), device="meta"), rows, empty_poisoned((2, 3), "float32"))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_USABLE, reason="no usable CUDA GPU")
def test_mismatched_cpu_and_cuda_refused():
    indptr, indices, values = small_csr("cpu")
    out = empty_poisoned((2, 3), "float32", "cuda")
    with pytest.raises(ValueError, match="one device"):
        K.gather_csr_to_dense(indptr, indices, values, 3, torch.tensor([1, 0]), out)
    with pytest.raises(ValueError, match="one device"):
        K.gather_csr_to_dense(indptr.cuda(), indices.cuda(), values.cuda(), 3, torch.tensor([1, 0]), out)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("case,pattern", [
    ("starts_at_1", "start at 0"), ("decreasing", "non-decreasing"), ("ends_past_nnz", "end at nnz"),
    ("ends_before_nnz", "end at nnz"), ("length_mismatch", "equal length"), ("empty_indptr", "n_rows"),
])
def test_invalid_csr_structure_refused(device, case, pattern):
    indptr = {"starts_at_1": [1, 2, 3], "decreasing": [0, 3, 1, 3], "ends_past_nnz": [0, 2, 5],
              "ends_before_nnz": [0, 1, 2], "length_mismatch": [0, 1, 3], "empty_indptr": []}[case]
    indices = np.array([0, 2, 1], np.int32)
    values = np.ones(2 if case == "length_mismatch" else 3, np.float32)
    n_rows = max(len(indptr) - 1, 0)
    args = [to_device(np.array(indptr, dtype=np.int64), device), to_device(indices, device), to_device(values, device)]
    out = empty_poisoned((1, 3), "float32", device)
    rows = to_device(np.zeros(1 if n_rows else 0, np.int64), device)
    if not n_rows:
        out = empty_poisoned((0, 3), "float32", device)
    with pytest.raises(ValueError, match=pattern):
        K.gather_csr_to_dense(*args, 3, rows, out, validate=True)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match=pattern):
        K.gather_csr_to_csr(*args, 3, rows, to_device(np.zeros(len(rows) + 1, np.int64), device),
                            to_device(np.zeros(0, np.int64), device), empty_poisoned(0, "float32", device))


def test_negative_n_cols_refused():
    indptr, indices, values = small_csr("cpu")
    with pytest.raises(ValueError):
        K.gather_csr_to_dense(indptr, indices, values, -1, np.array([0]), empty_poisoned((1, 0), "float32"))


# --- threads ------------------------------------------------------------------------------


def test_set_num_threads_round_trip(threads):
    annloader_gpu.set_num_threads(1)
    assert annloader_gpu.get_num_threads() == 1
    annloader_gpu.set_num_threads(3)
    assert annloader_gpu.get_num_threads() == 3
    with pytest.raises(ValueError, match=">= 1"):
        annloader_gpu.set_num_threads(0)
    assert annloader_gpu.get_num_threads() == 3


@pytest.mark.parametrize("kernel", ["csr_to_dense", "csr_to_csr", "dense", "csc_to_csr"])
def test_one_and_two_threads_identical(threads, kernel, rng):
    # Big enough that parallel_for splits the work into several chunks.
    n_rows, n_cols, n_batch = 800, 700, 600
    indptr, indices, values = random_csr(rng, n_rows, n_cols, 0.05, "float32", "int32", "int64", unsorted=True)
    rows = batch_rows(rng, n_rows, n_batch)
    dense_src = random_values(rng, n_rows * n_cols, np.float32).reshape(n_rows, n_cols)
    results = []
    for n in (1, 2, 1, 2):
        annloader_gpu.set_num_threads(n)
        if kernel == "csr_to_dense":
            results.append([gather_dense_csr("cpu", indptr, indices, values, n_cols, rows, "float16")])
        elif kernel == "csr_to_csr":
            results.append(list(gather_csr("cpu", indptr, indices, values, n_cols, rows, "int64", "bfloat16")))
        elif kernel == "dense":
            out = empty_poisoned((n_batch, n_cols), "bfloat16")
            results.append([K.gather_dense(dense_src, rows, out)])
        else:
            results.append([torch.from_numpy(a) for a in K.csc_to_csr(indptr, indices, values, (n_cols, n_rows))])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_identical(a, b)


def _gather_in_child(indptr, indices, values, n_cols, rows, expected, n_threads):
    import annloader_gpu as alg
    from annloader_gpu import kernels

    alg.set_num_threads(n_threads)
    out = np.full(expected.shape, np.nan, dtype=np.float32)
    for _ in range(3):
        kernels.gather_csr_to_dense(indptr, indices, values, n_cols, rows, out)
    raise SystemExit(0 if np.array_equal(out, expected) else 3)


def test_thread_pool_survives_fork(threads, rng):
    annloader_gpu.set_num_threads(2)
    n_rows, n_cols = 500, 800
    indptr, indices, values = random_csr(rng, n_rows, n_cols, 0.05, "float32", "int32", "int64")
    rows = batch_rows(rng, n_rows, 400)
    # Start the pool in the parent first, so the child inherits a process whose workers are gone.
    expected = gather_dense_csr("cpu", indptr, indices, values, n_cols, rows, "float32").numpy()
    np.testing.assert_array_equal(expected, reference_dense(indptr, indices, values, n_cols, rows, "float32"))
    ctx = multiprocessing.get_context("fork")
    for n_threads in (2, 1):
        child = ctx.Process(target=_gather_in_child, args=(indptr, indices, values, n_cols, rows, expected, n_threads))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail("a gather in a forked child hung (thread pool not rebuilt after fork)")
        assert child.exitcode == 0, f"child exit code {child.exitcode}"
    # And the parent's pool still works.
    again = gather_dense_csr("cpu", indptr, indices, values, n_cols, rows, "float32").numpy()
    np.testing.assert_array_equal(again, expected)


def test_thread_pool_survives_worker_exception(threads, rng):
    annloader_gpu.set_num_threads(2)
    # > 2^21 non-zeros: csc_to_csr counts rows in two parts, one per thread; both parts hold a
    # bad row index, so whichever thread runs a part throws.
    n_rows, n_cols, per_col = 1000, 4400, 1000
    indptr = np.arange(n_cols + 1, dtype=np.int64) * per_col
    indices = np.tile(np.arange(per_col, dtype=np.int32), n_cols)
    values = np.ones(len(indices), np.float32)
    for position in (5, len(indices) - 5):
        indices[position] = n_rows + 7
    for _ in range(3):
        with pytest.raises(IndexError, match=rf"CSC row index {n_rows + 7} at position \d+ is out of range"):
            K.csc_to_csr(indptr, indices, values, (n_rows, n_cols))
    indices[[5, len(indices) - 5]] = [5, per_col - 5]
    got = K.csc_to_csr(indptr, indices, values, (n_rows, n_cols))
    np.testing.assert_array_equal(got[0], np.arange(n_rows + 1) * n_cols)
    # The pool still gathers correctly after the failures.
    csr_indptr, csr_indices, csr_values = random_csr(rng, 300, 900, 0.1, "float32", "int32", "int64")
    rows = batch_rows(rng, 300, 500)
    out = gather_dense_csr("cpu", csr_indptr, csr_indices, csr_values, 900, rows, "float32")
    assert_identical(out, reference_dense(csr_indptr, csr_indices, csr_values, 900, rows, "float32"))


def test_message_names_index_exactly():
    # The message names the index and its position; no other number is mistaken for it.
    with pytest.raises(IndexError) as info:
        K.check_rows(np.array([0, 1, 2, 99], dtype=np.int64), 50)
    assert re.search(r"\b99\b", str(info.value)) and "position 3" in str(info.value)


@pytest.mark.parametrize("out_dtype", ["float32", "float16", "int64"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_large_cpu_outputs_stream_through_a_scratch_row(out_dtype, n_threads, rng, threads):
    # Outputs over 16 MiB (kStreamingOutputBytes) take the scratch-row + non-temporal-store path;
    # an odd column count leaves most output rows unaligned to 16 bytes, exercising the head and
    # tail copies.
    annloader_gpu.set_num_threads(n_threads)
    n_rows, n_cols = 400, 4099
    indptr, indices, values = random_csr(rng, n_rows, n_cols, 0.05, "float32", "int32", "int64",
                                         empty_rows=0.1, unsorted=True)
    n_batch = (17 << 20) // (n_cols * np.dtype(np_dtype(out_dtype)).itemsize) + 1
    rows = batch_rows(rng, n_rows, n_batch)
    out = gather_dense_csr("cpu", indptr, indices, values, n_cols, rows, out_dtype)
    assert_identical(out, reference_dense(indptr, indices, values, n_cols, rows, out_dtype))
