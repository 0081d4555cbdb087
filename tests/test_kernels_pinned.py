"""Pinned residency and GPU-only kernels: CUDA kernels reading page-locked host memory, CSC -> CSR on the GPU."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import GPU_MARKS

from annloader_gpu import kernels


def _matrix(seed: int = 0) -> sp.csr_matrix:
    m = sp.random(300, 500, density=0.05, format="csr", random_state=seed, dtype=np.float32)
    m.data = np.random.default_rng(seed).integers(1, 50, m.nnz).astype(np.float32)
    return m


@pytest.mark.parametrize("_", [pytest.param(None, marks=GPU_MARKS, id="cuda")])
def test_pinned_host_matrix_gathers_on_gpu(_):
    m = _matrix()
    pinned = [torch.from_numpy(a).pin_memory() for a in (m.indptr, m.indices.astype(np.uint16), m.data.astype(np.uint16))]
    rows = torch.randint(0, 300, (77,), device="cuda")
    out = torch.full((77, 500), float("nan"), device="cuda")
    kernels.gather_csr_to_dense(*pinned, 500, rows, out)
    expected = torch.from_numpy(m[rows.cpu().numpy()].toarray())
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("_", [pytest.param(None, marks=GPU_MARKS, id="cuda")])
def test_registered_host_copies_gather_on_gpu_and_are_released(_):
    """pinned.pinned_copy (cudaHostRegister, whole pages) is what residency="pinned" uses: the
    kernels read it in place, and dropping it unregisters it after queued work has finished."""
    import gc

    from annloader_gpu import pinned as pinned_memory

    m = _matrix(2)
    device = torch.device("cuda", torch.cuda.current_device())
    before = pinned_memory.registered_bytes()
    arrays = [pinned_memory.pinned_copy(a, device) for a in (m.indptr, m.indices.astype(np.uint16), m.data)]
    assert all(a.is_pinned() for a in arrays)  # torch sees registered memory as pinned too
    assert pinned_memory.registered_bytes() > before
    rows = torch.randint(0, 300, (129,), device="cuda")
    out = torch.full((129, 500), float("nan"), device="cuda")
    kernels.gather_csr_to_dense(*arrays, 500, rows, out)
    del arrays  # released while the gather may still be queued: host_unregister waits for it
    gc.collect()
    assert pinned_memory.registered_bytes() == before
    assert torch.equal(out.cpu(), torch.from_numpy(m[rows.cpu().numpy()].toarray()))


def test_unpinned_host_arrays_beside_device_arrays_are_refused():
    m = _matrix()
    meta_rows = torch.empty(4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="one device"):
        kernels.gather_csr_to_dense(m.indptr, m.indices, m.data, 500, meta_rows, torch.empty(4, 500))


@pytest.mark.parametrize("_", [pytest.param(None, marks=GPU_MARKS, id="cuda")])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64, np.uint16])
@pytest.mark.parametrize("value_dtype", [np.float32, np.float64, np.uint16, np.uint8])
def test_csc_to_csr_on_gpu_matches_scipy(_, index_dtype, value_dtype):
    m = _matrix(1)
    m.data[m.indptr[7]:m.indptr[8]] = 0  # an empty row
    m.eliminate_zeros()
    csc = m.tocsc()
    csc.data = csc.data.astype(value_dtype)
    arrays = [torch.from_numpy(a).cuda() for a in (csc.indptr, csc.indices.astype(index_dtype), csc.data)]
    indptr, indices, values = kernels.csc_to_csr(*arrays, m.shape)
    expected = csc.tocsr()
    expected.sort_indices()
    np.testing.assert_array_equal(indptr.cpu().numpy(), expected.indptr)
    np.testing.assert_array_equal(indices.cpu().numpy(), expected.indices)
    np.testing.assert_array_equal(values.cpu().numpy(), expected.data)
    assert indices.dtype == arrays[1].dtype and values.dtype == arrays[2].dtype


@pytest.mark.parametrize("_", [pytest.param(None, marks=GPU_MARKS, id="cuda")])
def test_csc_to_csr_on_gpu_refuses_bad_row_indices(_):
    indptr = torch.tensor([0, 2, 3], device="cuda")
    indices = torch.tensor([0, 9, 1], dtype=torch.int32, device="cuda")
    values = torch.ones(3, device="cuda")
    with pytest.raises(IndexError, match="row index 9 at position 1"):
        kernels.csc_to_csr(indptr, indices, values, (4, 2))


def test_csc_to_csr_refuses_mixed_inputs():
    m = _matrix(2).tocsc()
    with pytest.raises(TypeError, match="numpy arrays or CUDA tensors"):
        kernels.csc_to_csr(torch.from_numpy(m.indptr), m.indices, m.data, m.shape)
