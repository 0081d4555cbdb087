"""The CUDA kernels and launchers, run on the CPU through ``annloader_gpu._cuda_emulated``.

``_cuda_emulated`` is ``csrc/cuda_gather.cu`` and ``csrc/cuda_convert.cu`` (kernels, launch
configurations, dtype dispatch and bindings, unchanged) compiled as host C++ against
``csrc/cuda_emulation/``: each CUDA thread is a fiber, ``__syncthreads()`` a barrier, device
memory is host memory. So the GPU code's logic is checked here against scipy on every CI run,
although no GPU is present; the hardware itself (timing, unified addressing, streams) is checked
only by ``benchmarks/device_run.sh`` on a GPU.

Calls pass host addresses of poisoned torch tensors, device 0 and stream 0, exactly as the loader
passes device addresses to ``_cuda``.
"""

from __future__ import annotations

import zlib

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
    random_csr,
    random_values,
    reference_dense,
    take_rows,
    torch_dtype,
)
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from annloader_gpu import _cuda_emulated as emulated
except ImportError as exc:  # only where the build was configured with ANNLOADER_CUDA_EMULATION=OFF
    pytest.skip(f"annloader_gpu was built without the CUDA emulation ({exc})", allow_module_level=True)

NO_BAD_ROW = -1  # the slot's "all ones", which atomicMin replaces with any position


def test_runs_the_build_it_was_asked_to():
    """sanitize_emulated.sh points ANNLOADER_CUDA_EMULATED_SO at an instrumented build."""
    import os

    override = os.environ.get("ANNLOADER_CUDA_EMULATED_SO")
    assert emulated.architectures == "emulated"
    if override:
        assert os.path.samefile(emulated.__file__, override)
ON_DEVICE = dict(device=0, stream=0)


def tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


class Csr:
    """A CSR (or CSC) matrix as torch tensors, with the flat arguments the modules take."""

    def __init__(self, indptr, indices, values, n_rows: int, n_cols: int):
        self.indptr, self.indices, self.values = tensor(indptr), tensor(indices), tensor(values)
        self.n_rows, self.n_cols = n_rows, n_cols

    @classmethod
    def random(cls, rng, n_rows, n_cols, density=0.3, value_dtype="float32", index_dtype="int32",
               indptr_dtype="int64", **kw) -> "Csr":
        arrays = random_csr(rng, n_rows, n_cols, density, value_dtype, index_dtype, indptr_dtype, **kw)
        return cls(*arrays, n_rows, n_cols)

    def args(self) -> dict:
        return dict(indptr=self.indptr.data_ptr(), indptr_dtype=name(self.indptr),
                    indices=self.indices.data_ptr(), indices_dtype=name(self.indices),
                    values=self.values.data_ptr(), values_dtype=name(self.values),
                    n_rows=self.n_rows, n_cols=self.n_cols)

    def scipy(self) -> sp.csr_matrix:
        values = self.values.numpy()
        if values.dtype == np.float16:  # scipy.sparse has no float16; float32 holds it exactly
            values = values.astype(np.float32)
        return sp.csr_matrix((values, self.indices.numpy().astype(np.int64), self.indptr.numpy().astype(np.int64)),
                             shape=(self.n_rows, self.n_cols))


def name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def rows_args(rows: torch.Tensor) -> dict:
    return dict(rows=rows.data_ptr(), rows_dtype=name(rows), n_batch=rows.shape[0])


def fresh_slot() -> torch.Tensor:
    return torch.full((1,), NO_BAD_ROW, dtype=torch.int64)


def random_rows(rng, n_rows: int, n_batch: int, dtype: str = "int64") -> torch.Tensor:
    """Row indices with repeats (as a sampler with replacement gives them)."""
    return tensor(rng.integers(0, n_rows, size=n_batch).astype(np_dtype(dtype)))


class Guarded:
    """A poisoned output with a poisoned guard row (or element) on each side: the kernel gets
    the inside; a write past either end changes a guard, which :meth:`inside` checks."""

    def __init__(self, shape, dtype: str):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self._full = empty_poisoned((shape[0] + 2, *shape[1:]), dtype)
        self._guard = empty_poisoned((2, *shape[1:]), dtype)
        self.address = self._full[1:-1].data_ptr()

    def inside(self) -> torch.Tensor:
        assert_identical(take_rows(self._full, torch.tensor([0, -1])), self._guard)
        return self._full[1:-1]


def to_dense(m: Csr, rows: torch.Tensor, out_dtype: str) -> tuple[torch.Tensor, int]:
    out = Guarded((rows.shape[0], m.n_cols), out_dtype)
    slot = fresh_slot()
    emulated.gather_csr_to_dense(**ON_DEVICE, **m.args(), **rows_args(rows), out=out.address,
                                 out_dtype=out_dtype, bad_position=slot.data_ptr())
    return out.inside(), int(slot)


def batch_indptr(m: Csr, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    out = Guarded(rows.shape[0] + 1, "int64")
    slot = fresh_slot()
    emulated.csr_batch_indptr(**ON_DEVICE, indptr=m.indptr.data_ptr(), indptr_dtype=name(m.indptr),
                              n_rows=m.n_rows, **rows_args(rows), out_indptr=out.address,
                              bad_position=slot.data_ptr())
    return out.inside(), int(slot)


def to_csr(m: Csr, rows: torch.Tensor, out_index: str, out_value: str, out_nnz: int | None = None, spare: int = 0):
    """The batch CSR; out_nnz below the batch's nnz exercises the capacity clamp, and `spare`
    poisoned entries past out_nnz show any write beyond it."""
    indptr, slot = batch_indptr(m, rows)
    nnz = int(indptr[-1]) if out_nnz is None else out_nnz
    indices = Guarded(nnz + spare, out_index)
    values = Guarded(nnz + spare, out_value)
    emulated.gather_csr_to_csr(**ON_DEVICE, **m.args(), **rows_args(rows), out_indptr=indptr.data_ptr(),
                               out_indices=indices.address, out_indices_dtype=out_index,
                               out_values=values.address, out_values_dtype=out_value, out_nnz=nnz)
    return indptr, indices.inside(), values.inside(), slot


def dense_reference(m: Csr, rows: torch.Tensor, out_dtype: str) -> torch.Tensor:
    return reference_dense(m.indptr, m.indices, m.values, m.n_cols, rows, out_dtype)


# --- CSR -> dense ---------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", COLUMN_INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("out_dtype", OUTPUT_DTYPES)
def test_csr_to_dense_every_dtype(index_dtype, value_dtype, out_dtype):
    rng = np.random.default_rng(zlib.crc32(f"{index_dtype}-{value_dtype}-{out_dtype}".encode()))
    # indptr and row index widths alternate so both load_index paths run for every value type.
    wide = VALUE_DTYPES.index(value_dtype) % 2 == 0
    m = Csr.random(rng, 60, 37, 0.3, value_dtype, index_dtype, "int64" if wide else "int32",
                   empty_rows=0.2, unsorted=True)
    rows = random_rows(rng, m.n_rows, 25, "int32" if wide else "int64")
    out, bad = to_dense(m, rows, out_dtype)
    assert bad == NO_BAD_ROW
    assert_identical(out, dense_reference(m, rows, out_dtype))


@pytest.mark.parametrize("n_cols", [1, 255, 257, 700])  # around the 256-thread block's stride
def test_csr_to_dense_rows_wider_and_narrower_than_a_block(n_cols):
    rng = np.random.default_rng(n_cols)
    m = Csr.random(rng, 40, n_cols, 0.5, unsorted=True)
    rows = random_rows(rng, 40, 30)
    out, bad = to_dense(m, rows, "float32")
    assert bad == NO_BAD_ROW
    assert_identical(out, dense_reference(m, rows, "float32"))


def test_csr_to_dense_leaves_bad_rows_zero_and_records_the_first():
    rng = np.random.default_rng(1)
    m = Csr.random(rng, 20, 16, 0.6)
    rows = torch.tensor([3, 19, -1, 5, 20, 2**40, 0])
    out, bad = to_dense(m, rows, "float32")
    assert bad == 2
    good = torch.tensor([0, 1, 3, 6])
    assert_identical(out[good], dense_reference(m, rows[good], "float32"))
    assert not out[[2, 4, 5]].any()


@pytest.mark.parametrize("case", ["no_rows", "no_nonzeros", "no_columns"])
def test_csr_to_dense_degenerate_shapes(case):
    rng = np.random.default_rng(2)
    if case == "no_nonzeros":
        m = Csr.random(rng, 10, 8, 0.0)
    elif case == "no_columns":
        m = Csr.random(rng, 10, 0, 0.0)
    else:
        m = Csr.random(rng, 10, 8, 0.4)
    rows = random_rows(rng, 10, 0 if case == "no_rows" else 6)
    out, bad = to_dense(m, rows, "float64")
    assert bad == NO_BAD_ROW
    assert_identical(out, dense_reference(m, rows, "float64"))


def test_csr_to_dense_reports_bad_rows_even_with_nothing_to_write():
    m = Csr.random(np.random.default_rng(3), 10, 0, 0.0)
    _, bad = to_dense(m, torch.tensor([1, 2, 10, -3]), "float32")
    assert bad == 2


def test_a_device_other_than_the_emulated_one_is_refused_by_name():
    m = Csr.random(np.random.default_rng(4), 4, 4, 0.5)
    rows, out = torch.tensor([0, 1]), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="cudaSetDevice failed: cudaErrorInvalidDevice"):
        emulated.gather_csr_to_dense(1, 0, **m.args(), **rows_args(rows), out=out.data_ptr(), out_dtype="float32",
                                     bad_position=fresh_slot().data_ptr())


# --- CSR -> CSR -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_batch", [0, 1, 1023, 1024, 1025, 2500])  # around the scan's 1024-row tiles
@pytest.mark.parametrize("indptr_dtype", INDEX_DTYPES)
def test_batch_indptr_is_the_running_sum_of_row_lengths(n_batch, indptr_dtype):
    rng = np.random.default_rng(n_batch)
    m = Csr.random(rng, 300, 50, 0.2, indptr_dtype=indptr_dtype, empty_rows=0.3)
    rows = random_rows(rng, m.n_rows, n_batch, "int32")
    indptr, bad = batch_indptr(m, rows)
    assert bad == NO_BAD_ROW
    lengths = np.diff(m.indptr.numpy().astype(np.int64))[rows.numpy()]
    np.testing.assert_array_equal(indptr.numpy(), np.concatenate([[0], np.cumsum(lengths)]))


def test_batch_indptr_counts_bad_rows_as_empty():
    m = Csr.random(np.random.default_rng(5), 10, 10, 0.5)
    rows = torch.tensor([1, 10, 2, -1])
    indptr, bad = batch_indptr(m, rows)
    assert bad == 1
    lengths = np.diff(m.indptr.numpy())
    np.testing.assert_array_equal(indptr.numpy(), np.cumsum([0, lengths[1], 0, lengths[2], 0]))


def assert_csr_rows_equal(m: Csr, rows, indptr, indices, values, out_value: str):
    expected = m.scipy()[rows.numpy().astype(np.int64)]
    np.testing.assert_array_equal(indptr.numpy(), expected.indptr)
    np.testing.assert_array_equal(indices.numpy(), expected.indices)
    assert_identical(values, torch.from_numpy(m.values.numpy()[_positions(m, rows)]).to(torch_dtype(out_value)))


def _positions(m: Csr, rows) -> np.ndarray:
    """Where each batch non-zero sits in the source arrays, in batch order."""
    indptr = m.indptr.numpy().astype(np.int64)
    return np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows.numpy()] + [np.zeros(0, np.int64)])


@pytest.mark.parametrize("index_dtype", COLUMN_INDEX_DTYPES)
@pytest.mark.parametrize("out_index", INDEX_DTYPES)
def test_csr_to_csr_every_index_dtype(index_dtype, out_index):
    rng = np.random.default_rng(6)
    m = Csr.random(rng, 50, 40, 0.3, "float32", index_dtype, empty_rows=0.2)
    rows = random_rows(rng, m.n_rows, 30)
    indptr, indices, values, bad = to_csr(m, rows, out_index, "float32")
    assert bad == NO_BAD_ROW
    assert_csr_rows_equal(m, rows, indptr, indices, values, "float32")


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("out_value", OUTPUT_DTYPES)
def test_csr_to_csr_every_value_dtype(value_dtype, out_value):
    rng = np.random.default_rng(7)
    m = Csr.random(rng, 50, 300, 0.3, value_dtype, "uint16", unsorted=True)  # rows longer than a block
    rows = random_rows(rng, m.n_rows, 20, "int32")
    indptr, indices, values, bad = to_csr(m, rows, "int64", out_value)
    assert bad == NO_BAD_ROW
    assert_csr_rows_equal(m, rows, indptr, indices, values, out_value)


def test_csr_to_csr_never_writes_past_out_nnz():
    rng = np.random.default_rng(8)
    m = Csr.random(rng, 40, 30, 0.5)
    rows = random_rows(rng, m.n_rows, 25)
    full_indptr, full_indices, full_values, _ = to_csr(m, rows, "int64", "float32")
    nnz = int(full_indptr[-1])
    capacity = nnz - 17
    _, indices, values, _ = to_csr(m, rows, "int64", "float32", out_nnz=capacity, spare=40)
    torch.testing.assert_close(indices[:capacity], full_indices[:capacity], rtol=0, atol=0)
    assert_identical(values[:capacity], full_values[:capacity])
    assert (indices[capacity:] == empty_poisoned(1, "int64")).all()
    assert values[capacity:].isnan().all()


def test_csr_to_csr_skips_bad_rows():
    m = Csr.random(np.random.default_rng(9), 12, 9, 0.6)
    rows = torch.tensor([4, 12, 0, -2, 11])
    indptr, indices, values, bad = to_csr(m, rows, "int32", "float64")
    assert bad == 1
    good = torch.tensor([4, 0, 11])
    expected = m.scipy()[good.numpy()]
    np.testing.assert_array_equal(indices.numpy(), expected.indices)
    np.testing.assert_array_equal(values.numpy(), expected.data.astype(np.float64))


# --- dense rows and the gather plan -----------------------------------------------------------


def dense_gather(src: torch.Tensor, rows: torch.Tensor, out_dtype: str) -> tuple[torch.Tensor, int]:
    out = Guarded((rows.shape[0], src.shape[1]), out_dtype)
    slot = fresh_slot()
    emulated.gather_dense(**ON_DEVICE, values=src.data_ptr(), values_dtype=name(src), n_rows=src.shape[0],
                          n_cols=src.shape[1], row_stride=src.stride(0), **rows_args(rows), out=out.address,
                          out_dtype=out_dtype, bad_position=slot.data_ptr())
    return out.inside(), int(slot)


def random_dense(rng, n_rows: int, n_cols: int, dtype: str, row_padding: int = 0) -> torch.Tensor:
    """Random values; with row_padding, a view whose rows are further apart than they are wide."""
    full = tensor(random_values(rng, n_rows * (n_cols + row_padding), np_dtype(dtype)).reshape(n_rows, -1))
    return full[:, :n_cols]


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("out_dtype", OUTPUT_DTYPES)
def test_dense_rows_every_dtype_with_a_row_stride(value_dtype, out_dtype):
    rng = np.random.default_rng(10)
    src = random_dense(rng, 30, 45, value_dtype, row_padding=7)
    rows = random_rows(rng, 30, 22, "int32")
    out, bad = dense_gather(src, rows, out_dtype)
    assert bad == NO_BAD_ROW
    assert_identical(out, take_rows(src, rows.long()).to(torch_dtype(out_dtype)))


@pytest.mark.parametrize("n_cols", [1, 3, 31, 33, 4096, 9000])  # warp-sized blocks; several column chunks
def test_dense_rows_narrow_and_wide(n_cols):
    rng = np.random.default_rng(n_cols)
    src = random_dense(rng, 12, n_cols, "float32")
    rows = torch.tensor([11, 0, 5, 5, 2])
    out, bad = dense_gather(src, rows, "float32")
    assert bad == NO_BAD_ROW
    assert_identical(out, src[rows])


def test_dense_rows_bad_rows_zero_and_recorded():
    src = random_dense(np.random.default_rng(11), 8, 5000, "float64")  # two column chunks zero it
    rows = torch.tensor([7, 8, 1, -1])
    out, bad = dense_gather(src, rows, "float64")
    assert bad == 1
    assert_identical(out[[0, 2]], src[[7, 1]])
    assert not out[[1, 3]].any()


def test_dense_rows_with_no_columns_still_report_bad_rows():
    src = torch.zeros(5, 0)
    _, bad = dense_gather(src, torch.tensor([0, 4, 5]), "float32")
    assert bad == 2


def test_plan_groups_narrow_fields_and_gathers_every_field():
    """Eleven narrow fields (nine of one dtype pair: a full group of eight and one more), a wide
    dense field and a CSR field, all in one call; one bad row zeroes every field's row."""
    rng = np.random.default_rng(12)
    n_rows = 40
    m = Csr.random(rng, n_rows, 70, 0.3, "uint16", "uint16")
    fields = [(random_dense(rng, n_rows, c, "int64"), "int64") for c in (1, 1, 2, 3, 1, 5, 64, 1, 2)]
    fields += [(random_dense(rng, n_rows, 4, "float32", row_padding=3), "float32"),
               (random_dense(rng, n_rows, 2, "int32"), "float64"),
               (random_dense(rng, n_rows, 65, "float16"), "float32")]  # wider than a narrow field
    plan = emulated.GatherPlan()
    plan.add_csr(**m.args(), out_dtype="float32")
    for src, out_dtype in fields:
        plan.add_dense(src.data_ptr(), name(src), n_rows, src.shape[1], src.stride(0), out_dtype)
    assert len(plan) == 1 + len(fields) and plan.n_rows == n_rows

    rows = tensor(np.r_[rng.integers(0, n_rows, 30), n_rows + 3, rng.integers(0, n_rows, 5)])
    guarded = [Guarded((len(rows), m.n_cols), "float32")]
    guarded += [Guarded((len(rows), src.shape[1]), out_dtype) for src, out_dtype in fields]
    slot = fresh_slot()
    plan.gather(0, 0, **rows_args(rows), outputs=[g.address for g in guarded], bad_position=slot.data_ptr())
    outputs = [g.inside() for g in guarded]

    assert int(slot) == 30
    good = torch.cat([torch.arange(30), torch.arange(31, 36)])
    assert_identical(outputs[0][good], dense_reference(m, rows[good], "float32"))
    for (src, out_dtype), out in zip(fields, outputs[1:]):
        assert_identical(out[good], src[rows[good]].to(torch_dtype(out_dtype)))
    for out in outputs:
        assert not out[30].any()


# --- CSC -> CSR -----------------------------------------------------------------------------


def csc_to_csr(csc: Csr, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """csc holds the CSC arrays with n_rows = number of columns (a CSC is the transpose's CSR)."""
    nnz = csc.indices.shape[0]
    workspace_bytes = emulated.csc_to_csr_workspace_bytes(0, n_rows, nnz)
    workspace = torch.full((max(workspace_bytes, 1),), 0xAB, dtype=torch.uint8)
    out_indptr = Guarded(n_rows + 1, "int64")
    out_indices = Guarded(nnz, name(csc.indices))
    out_values = Guarded(nnz, name(csc.values))
    slot = fresh_slot()
    args = {**csc.args(), "n_rows": n_rows, "n_cols": csc.n_rows}
    emulated.csc_to_csr(**ON_DEVICE, **args, workspace=workspace.data_ptr(), workspace_bytes=workspace_bytes,
                        out_indptr=out_indptr.address, out_indices=out_indices.address,
                        out_values=out_values.address, bad_position=slot.data_ptr())
    return out_indptr.inside(), out_indices.inside(), out_values.inside(), int(slot)


def random_csc(rng, n_rows, n_cols, density, value_dtype, index_dtype, indptr_dtype, *, unsorted=False) -> Csr:
    arrays = random_csr(rng, n_cols, n_rows, density, value_dtype, index_dtype, indptr_dtype, empty_rows=0.2,
                        unsorted=unsorted)
    return Csr(*arrays, n_cols, n_rows)


# Value widths 1, 2, 4 and 8 bytes: the scatter moves values as same-width unsigned integers.
@pytest.mark.parametrize("value_dtype", ["uint8", "float16", "uint16", "float32", "int32", "float64", "int64"])
@pytest.mark.parametrize("index_dtype,indptr_dtype", [("int32", "int64"), ("int64", "int32"), ("uint16", "int32")])
@pytest.mark.parametrize("n_rows", [70, 300])  # row keys of 7 and 9 bits: the sort ends in either buffer
def test_csc_to_csr_matches_scipy(value_dtype, index_dtype, indptr_dtype, n_rows):
    rng = np.random.default_rng(13)
    n_cols = 45
    csc = random_csc(rng, n_rows, n_cols, 0.25, value_dtype, index_dtype, indptr_dtype, unsorted=True)
    indptr, indices, values, bad = csc_to_csr(csc, n_rows)
    assert bad == NO_BAD_ROW
    dense = reference_dense(csc.indptr, csc.indices, csc.values, n_rows, torch.arange(n_cols),
                            torch.float64).T.contiguous()
    expected = sp.csr_matrix(dense.numpy())
    expected.sort_indices()
    np.testing.assert_array_equal(indptr.numpy(), expected.indptr)
    np.testing.assert_array_equal(indices.numpy(), expected.indices)
    assert indices.dtype == csc.indices.dtype and values.dtype == csc.values.dtype
    np.testing.assert_array_equal(values.numpy().astype(np.float64), expected.data)


def test_csc_to_csr_with_no_nonzeros():
    csc = random_csc(np.random.default_rng(14), 9, 6, 0.0, "float32", "int32", "int64")
    indptr, indices, values, bad = csc_to_csr(csc, 9)
    assert bad == NO_BAD_ROW and indices.numel() == 0
    np.testing.assert_array_equal(indptr.numpy(), np.zeros(10))


def test_csc_to_csr_records_an_out_of_range_row():
    csc = random_csc(np.random.default_rng(15), 20, 10, 0.5, "float32", "int32", "int64")
    position = csc.indices.shape[0] // 2
    csc.indices[position] = 20
    assert csc_to_csr(csc, 20)[3] == position


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_rows=st.integers(1, 40),
    n_cols=st.integers(0, 70),
    density=st.floats(0.0, 1.0),
    n_batch=st.integers(0, 50),
    bad_at=st.none() | st.integers(0, 49),
)
def test_gathers_match_scipy_for_any_shape(seed, n_rows, n_cols, density, n_batch, bad_at):
    rng = np.random.default_rng(seed)
    m = Csr.random(rng, n_rows, n_cols, density, "int32", "uint16" if n_cols else "int32", unsorted=True)
    rows = random_rows(rng, n_rows, n_batch)
    expected_bad = NO_BAD_ROW
    if bad_at is not None and bad_at < n_batch:
        rows[bad_at] = n_rows + bad_at
        expected_bad = bad_at
    good = torch.tensor([i for i in range(n_batch) if i != expected_bad], dtype=torch.long)

    out, bad = to_dense(m, rows, "float32")
    assert bad == expected_bad
    assert_identical(out[good], dense_reference(m, rows[good], "float32"))
    if expected_bad != NO_BAD_ROW:
        assert not out[expected_bad].any()

    indptr, indices, values, bad = to_csr(m, rows, "int64", "float32", spare=3)
    assert bad == expected_bad
    expected = m.scipy()[rows[good].numpy()]
    nnz = int(indptr[-1])
    np.testing.assert_array_equal(indices[:nnz].numpy(), expected.indices)
    np.testing.assert_array_equal(values[:nnz].numpy(), expected.data.astype(np.float32))
    assert values[nnz:].isnan().all()
