"""Pinned residency: CUDA kernels reading a matrix that stays in page-locked host memory."""

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


def test_unpinned_host_arrays_beside_device_arrays_are_refused():
    m = _matrix()
    meta_rows = torch.empty(4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="one device"):
        kernels.gather_csr_to_dense(m.indptr, m.indices, m.data, 500, meta_rows, torch.empty(4, 500))
