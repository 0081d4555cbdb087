"""One compiled call per batch for all dense-output fields (annloader_gpu.gather_plan)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import parametrize

from annloader_gpu import _core
from annloader_gpu.dataset import PreparedData
from annloader_gpu.gather_plan import FieldGatherPlan, plannable
from annloader_gpu.registry import setup_anndata
from test_loader import make_adata


def _per_field(data: PreparedData, rows, as_numpy=False):
    return {key: f.gather(rows, None, as_numpy) for key, f in data.fields.items()}


def _assert_same(expected: dict, actual: dict) -> None:
    assert list(actual) == list(expected)  # registry order kept
    for key in expected:
        e, a = expected[key], actual[key]
        if isinstance(e, torch.Tensor) and e.layout != torch.strided:
            e, a = e.to_dense(), a.to_dense()
        assert type(a) is type(e) and a.dtype == e.dtype and tuple(a.shape) == tuple(e.shape), key
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=key)


def _registry(x_format: str, seed: int = 0):
    adata = make_adata(x_format, seed=seed)
    rng = np.random.default_rng(seed)
    adata.obs["size"] = rng.random(adata.n_obs)
    adata.obs["age"] = rng.integers(0, 90, adata.n_obs)
    adata.obsm["pcs"] = rng.standard_normal((adata.n_obs, 5)).astype(np.float32)
    return setup_anndata(adata, batch_key="batch", labels_key="cell_type",
                         continuous_covariate_keys=["size", "age"], obsm_keys=["pcs"])


@parametrize("x_format", ["csr", "csc", "dense"], with_device=False)
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_planned_batch_equals_per_field_batch(x_format, load_sparse_tensor, as_numpy):
    registry = _registry(x_format)
    data = PreparedData(registry, load_sparse_tensor=load_sparse_tensor)
    rng = np.random.default_rng(1)
    for rows in (rng.integers(0, registry.adata.n_obs, 40), np.array([3, 3, 0]), np.array([], dtype=np.int64)):
        rows = rows.astype(np.int64)
        if as_numpy and load_sparse_tensor and x_format != "dense":
            continue  # sparse tensors are torch-only, as in scvi-tools
        _assert_same(_per_field(data, rows, as_numpy), data.fetch(rows, as_numpy=as_numpy))


def test_planned_fields_and_the_rest():
    registry = _registry("csr")
    dtypes = {"X": np.float16, "batch": np.int32, "labels": np.uint8, "extra_continuous_covs": np.float64}
    data = PreparedData(registry, dtypes)
    plan = FieldGatherPlan(data.fields, torch.device("cpu"))
    # uint8 is not a kernel output dtype: it takes the per-field path (gather exact, then cast).
    assert plan.keys == ["X", "batch", "extra_continuous_covs"] and not plannable(data.fields["labels"])
    rows = np.array([5, 1, 5, 80], dtype=np.int64)
    _assert_same(_per_field(data, rows), data.fetch(rows))
    sparse = PreparedData(registry, ["X", "batch"], load_sparse_tensor=True)
    assert FieldGatherPlan(sparse.fields, torch.device("cpu")).keys == ["batch"]


def test_planned_batches_come_from_the_pool_and_are_not_overwritten():
    from annloader_gpu.dataset import BufferPool

    data = PreparedData(_registry("csr"))
    pool = BufferPool()
    first = data.fetch(np.arange(8, dtype=np.int64), pool=pool)
    first_ptr = first["X"].data_ptr()
    kept = {k: v.clone() for k, v in first.items()}
    second = data.fetch(np.arange(8, 16, dtype=np.int64), pool=pool)
    _assert_same(kept, first)  # still referenced: its buffers were not handed out again
    assert second["X"].data_ptr() != first_ptr
    del first
    third = data.fetch(np.arange(16, 24, dtype=np.int64), pool=pool)
    assert third["X"].data_ptr() == first_ptr  # released, so reused


@pytest.mark.parametrize("rows", [np.array([0, 97]), np.array([-1]), torch.tensor([2, 200])])
def test_bad_rows_raise_before_any_write(rows):
    data = PreparedData(_registry("csr"))
    with pytest.raises(IndexError, match="out of range"):
        data.fetch(rows)


@pytest.mark.parametrize("row_dtype", [np.int32, np.int64])
def test_row_dtypes_and_non_contiguous_rows(row_dtype):
    data = PreparedData(_registry("dense"))
    rows = np.arange(60, dtype=row_dtype)[::-3]
    expected = _per_field(data, np.ascontiguousarray(rows).astype(np.int64))
    _assert_same(expected, data.fetch(rows))
    _assert_same(expected, data.fetch(torch.from_numpy(np.ascontiguousarray(rows))))


def test_compiled_plan_checks_its_inputs():
    plan = _core.GatherPlan()
    values = np.ones((4, 2), dtype=np.float32)
    plan.add_dense(values.ctypes.data, "float32", 4, 2, 2, "float32")
    with pytest.raises(ValueError, match="same number of rows"):
        plan.add_dense(values.ctypes.data, "float32", 3, 2, 2, "float32")
    with pytest.raises((ValueError, TypeError), match="uint8|output"):
        plan.add_dense(values.ctypes.data, "float32", 4, 2, 2, "uint8")
    m = sp.random(4, 70_000, density=0.0001, format="csr", dtype=np.float32)
    with pytest.raises(ValueError, match="uint16 column indices cannot address 70000"):
        plan.add_csr(m.indptr.ctypes.data, "int32", m.indices.ctypes.data, "uint16", m.data.ctypes.data,
                     "float32", 4, 70_000, "float32")
    assert len(plan) == 1 and plan.n_rows == 4
    rows = np.array([3, 0], dtype=np.int64)
    out = np.full((2, 2), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="1 fields but 2 outputs"):
        plan.gather(rows.ctypes.data, "int64", 2, [out.ctypes.data, out.ctypes.data])
    plan.gather(rows.ctypes.data, "int64", 2, [out.ctypes.data])
    np.testing.assert_array_equal(out, values[rows])
    with pytest.raises(IndexError, match="row index 4 at position 1"):
        plan.gather(np.array([0, 4]).ctypes.data, "int64", 2, [out.ctypes.data])


@pytest.mark.parametrize(("n", "size", "drop_last"), [(97, 16, False), (97, 16, True), (96, 32, False), (5, 8, False)])
@pytest.mark.parametrize("indptr_dtype", [np.int32, np.int64])
def test_epoch_batch_sizes_equal_the_batches_nnz(n, size, drop_last, indptr_dtype):
    """What the loader computes once per epoch so sparse GPU batches need no read-back."""
    from annloader_gpu.dataset import batch_nnz

    m = sp.random(120, 40, density=0.2, format="csr", random_state=4, dtype=np.float32)
    m.data[m.indptr[7]:m.indptr[8]] = 0  # an empty row
    m.eliminate_zeros()
    assert m.indptr[8] == m.indptr[7]
    rows = np.random.default_rng(5).integers(0, 120, n)
    stop = (n // size) * size if drop_last else n
    got = batch_nnz(torch.from_numpy(m.indptr.astype(indptr_dtype)), torch.from_numpy(rows), size, stop)
    expected = [m[rows[start:start + size]].nnz for start in range(0, stop, size)]
    assert got.dtype == torch.int64 and got.tolist() == expected
