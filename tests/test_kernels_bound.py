"""Bound matrices: the loader's hot path gives the same rows as the checked free functions."""

import numpy as np
import pytest
import torch
from conftest import DEVICE_PARAMS, assert_identical, empty_poisoned, random_csr, reference_dense, to_device

from annloader_gpu import kernels as K


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("index_dtype", ["uint16", "int32", "int64"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "int64"])
def test_bound_csr_matches_reference(device, index_dtype, out_dtype):
    rng = np.random.default_rng(3)
    indptr, indices, values = random_csr(rng, 60, 250, 0.1, "uint16", index_dtype, "int64", empty_rows=0.1)
    bound = K.BoundCsr(*(to_device(a, device) for a in (indptr, indices, values)), 250)
    rows = rng.integers(0, 60, 90)
    out = empty_poisoned((90, 250), out_dtype, device)
    assert bound.to_dense(to_device(rows, device), out) is out
    assert_identical(out, reference_dense(indptr, indices, values, 250, rows, out_dtype))


def test_bound_csr_takes_numpy_through_the_checked_path():
    rng = np.random.default_rng(4)
    indptr, indices, values = random_csr(rng, 30, 40, 0.2)
    bound = K.BoundCsr(indptr, indices, values, 40)
    rows = rng.integers(0, 30, 10).astype(np.int32)
    out = np.full((10, 40), np.nan, dtype=np.float64)
    bound.to_dense(rows, out)
    np.testing.assert_array_equal(out, reference_dense(indptr, indices, values, 40, rows, torch.float64).numpy())


def test_bound_csr_refuses_bad_rows_and_outputs():
    rng = np.random.default_rng(5)
    indptr, indices, values = random_csr(rng, 30, 40, 0.2)
    bound = K.BoundCsr(indptr, indices, values, 40)
    with pytest.raises(IndexError, match="row index 30 at position 1"):
        bound.to_dense(torch.tensor([0, 30]), torch.empty(2, 40))
    with pytest.raises(ValueError, match="expected \\(2, 40\\)"):
        bound.to_dense(torch.tensor([0, 1]), torch.empty(2, 41))
    with pytest.raises(ValueError, match="contiguous"):
        bound.to_dense(torch.tensor([0, 1]), torch.empty(40, 2).t())
    with pytest.raises(TypeError, match="rows has dtype"):
        bound.to_dense(torch.tensor([0.0, 1.0]), torch.empty(2, 40))


def test_bound_csr_validates_structure_once():
    indptr = np.array([0, 5, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="indptr"):
        K.BoundCsr(indptr, np.zeros(2, np.int32), np.ones(2, np.float32), 10)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_bound_dense_matches_numpy_with_row_stride(device):
    rng = np.random.default_rng(6)
    src = rng.standard_normal((50, 12)).astype(np.float32)
    view = to_device(src, device)[:, 2:9]
    bound = K.BoundDense(view)
    rows = rng.integers(0, 50, 33)
    out = empty_poisoned((33, 7), "float64", device)
    bound.gather(to_device(rows, device), out)
    assert_identical(out, torch.from_numpy(src[rows, 2:9]).to(torch.float64))


def test_binding_pinned_arrays_needs_pinned_memory():
    rng = np.random.default_rng(7)
    indptr, indices, values = random_csr(rng, 5, 5, 0.5)
    with pytest.raises(ValueError, match="pinned"):
        K.BoundCsr(torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), 5, device="cuda:0")
