"""Data that already lives in tensors: cupyx / cupy in GPU memory, torch tensors on any device.

One builder written in torch ops (``tensor_sources._tensor_sparse_storage`` / ``_tensor_dense_storage``)
serves every such source, so most of it is checked here on the CPU with torch tensors: batches
against scipy, zero copy where promised, the structure never shared, the same validation (rules
and messages) as the scipy path. The CuPy dispatch is checked on the CPU with a stand-in CuPy
(what the code reads of a CuPy array, over numpy memory). The tests marked ``gpu`` run the real
thing (cupyx matrices in an AnnData, through setup_anndata and the loader on a GPU); those that
need CuPy skip themselves where it is not installed.
"""

from __future__ import annotations

import sys
import types
import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from _reference import assert_batches_equal, make_counts, make_obs
from annloader_gpu import host_sources, tensor_sources
from annloader_gpu import storage as storage_module
from annloader_gpu.dataset import Field
from annloader_gpu.sources import build_storage
from annloader_gpu.loader import AnnDataLoader
from annloader_gpu.residency import resolve_residency
from annloader_gpu.registry import _validated_matrix, setup_anndata
from conftest import GPU_USABLE, dense_rows_reference, random_csr

# --- helpers ---------------------------------------------------------------------------------


def _csr(seed=0, n_rows=40, n_cols=30, density=0.25, value_dtype="float32", index_dtype="int32",
         indptr_dtype="int64", empty_rows=0.2) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    indptr, indices, values = random_csr(rng, n_rows, n_cols, density, value_dtype, index_dtype, indptr_dtype,
                                         empty_rows=empty_rows)
    m = sp.csr_matrix((values, indices, indptr), shape=(n_rows, n_cols))
    m.indptr, m.indices = indptr, indices  # scipy may have changed the index dtypes
    assert m.nnz and m.has_canonical_format
    return m


def _parts(m, fmt: str = "csr"):
    """(indptr, indices, data) of m in fmt as torch tensors over numpy memory (no copies)."""
    m = m.tocsr() if fmt == "csr" else m.tocsc()
    return torch.from_numpy(m.indptr), torch.from_numpy(m.indices), torch.from_numpy(m.data)


def _storage(m, fmt="csr", where="X"):
    indptr, indices, data = _parts(m, fmt)
    return tensor_sources._tensor_sparse_storage(indptr, indices, data, m.shape, fmt, where)


def _gather(storage, rows, dtype=np.float64, sparse=False):
    return Field("X", storage, np.dtype(dtype), sparse_output=sparse).gather(
        np.ascontiguousarray(rows, dtype=np.int64), None, False)


def _expected(m, rows, dtype=torch.float64):
    return torch.from_numpy(sp.csr_matrix(m)[np.asarray(rows)].toarray()).to(dtype)


def _all_rows(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(n), rng.integers(0, n, size=2 * n), np.arange(n)[::-1]]) if n else np.zeros(0, int)


def _sparse_tensor(m, fmt: str):
    indptr, indices, data = _parts(m, fmt)
    indptr, indices = indptr.to(torch.int32), indices.to(torch.int32)  # torch wants one index dtype
    maker = torch.sparse_csr_tensor if fmt == "csr" else torch.sparse_csc_tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*support is in beta.*")
        return maker(indptr, indices, data, size=m.shape, check_invariants=True)


@pytest.fixture(params=[None, 5], ids=["one-block", "5-element-blocks"])
def scan_block(request, monkeypatch):
    """Validation scans indices in blocks: also run with tiny blocks, so rows straddle them."""
    if request.param is not None:
        monkeypatch.setattr(host_sources, "_SCAN_BLOCK", request.param)  # both validators read it
    return request.param


# --- the builder: batches, zero copy, own structure --------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("value_dtype", ["float32", "float64", "int32", "int64", "uint16", "uint8", "float16"])
def test_batches_equal_scipy(fmt, value_dtype, scan_block):
    m = _csr(seed=3, value_dtype=value_dtype)
    storage = _storage(m, fmt)
    assert storage.source_format == fmt and (storage.n_rows, storage.n_cols) == m.shape
    rows = _all_rows(m.shape[0])
    out_dtype = np.float32 if value_dtype == "float16" else np.float64
    expected = torch.from_numpy(dense_rows_reference(m.indptr, m.indices, m.data, m.shape[1], rows).astype(out_dtype))
    assert torch.equal(_gather(storage, rows, out_dtype), expected)
    assert bool(expected.any())


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("indptr_dtype", ["int32", "int64"])
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("n_cols", [30, 70_000])
def test_index_dtypes_and_compact_structure(fmt, indptr_dtype, index_dtype, n_cols):
    m = _csr(seed=5, n_cols=n_cols, density=0.3 if n_cols < 100 else 0.0005, index_dtype=index_dtype,
             indptr_dtype=indptr_dtype)
    if fmt == "csc":  # keep the requested index dtypes on the CSC arrays too
        c = m.tocsc()
        c.indptr, c.indices = c.indptr.astype(indptr_dtype), c.indices.astype(index_dtype)
        indptr, indices, data = (torch.from_numpy(a) for a in (c.indptr, c.indices, c.data))
    else:
        indptr, indices, data = _parts(m)
    storage = tensor_sources._tensor_sparse_storage(indptr, indices, data, m.shape, fmt, "X")
    # The structure is the storage's own copy, in compact dtypes.
    assert storage.indices.dtype == (torch.uint16 if n_cols <= 65536 else torch.int32)
    assert storage.indptr.dtype == torch.int32
    assert storage.batch_index_dtype == np.dtype(indptr_dtype)
    rows = _all_rows(m.shape[0])
    assert torch.equal(_gather(storage, rows), _expected(m, rows))
    sparse = _gather(storage, rows, sparse=True)
    assert sparse.layout == (torch.sparse_csr if fmt == "csr" else torch.sparse_csc)
    assert torch.equal(sparse.to_dense(), _expected(m, rows))


def test_csr_values_are_used_in_place_and_structure_is_copied():
    m = _csr(seed=7)
    indptr, indices, data = _parts(m)
    storage = tensor_sources._tensor_sparse_storage(indptr, indices, data, m.shape, "csr", "X")
    assert storage.values.data_ptr() == data.data_ptr()  # zero copy
    assert storage.nbytes == data.nbytes + storage.indices.nbytes + storage.indptr.nbytes
    assert storage.indices.data_ptr() != indices.data_ptr() and storage.indptr.data_ptr() != indptr.data_ptr()
    rows = np.arange(m.shape[0])
    before = _gather(storage, rows)
    # Structure edits after set-up do not reach the storage (no wild reads) ...
    indptr[1:] = 0
    indices[:] = 10**6
    assert torch.equal(_gather(storage, rows), before)
    # ... value edits do: the values are the user's.
    data.mul_(2)
    assert torch.equal(_gather(storage, rows), before * 2)


def test_csc_is_converted_into_storage_of_its_own():
    m = _csr(seed=8)
    indptr, indices, data = _parts(m, "csc")
    storage = tensor_sources._tensor_sparse_storage(indptr, indices, data, m.shape, "csc", "X")
    for own in (storage.indptr, storage.indices, storage.values):
        assert own.data_ptr() not in (indptr.data_ptr(), indices.data_ptr(), data.data_ptr())
    rows = np.arange(m.shape[0])
    before = _gather(storage, rows)
    data.mul_(2)
    assert torch.equal(_gather(storage, rows), before)  # a converted copy: edits are not seen


def test_trailing_unused_entries_are_ignored():
    """indptr may end before the arrays do (scipy allows it): only [:nnz] is read, still in place."""
    m = _csr(seed=9)
    indptr, indices, data = _parts(m)
    padded_indices = torch.cat([indices, torch.tensor([999, -1], dtype=indices.dtype)])
    padded_data = torch.cat([data, torch.tensor([np.nan, np.nan], dtype=data.dtype)])
    storage = tensor_sources._tensor_sparse_storage(indptr, padded_indices, padded_data, m.shape, "csr", "X")
    assert storage.nnz == m.nnz and storage.values.data_ptr() == padded_data.data_ptr()
    rows = _all_rows(m.shape[0])
    assert torch.equal(_gather(storage, rows), _expected(m, rows))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("shape", [(10, 5), (0, 5), (6, 0), (0, 0)])
def test_empty_matrices(fmt, shape):
    m = sp.csr_matrix(shape, dtype=np.float32)
    storage = _storage(m, fmt)
    assert storage.nnz == 0 and (storage.n_rows, storage.n_cols) == shape
    assert storage.indptr.shape == (shape[0] + 1,) and not bool(storage.indptr.any())
    rows = np.arange(shape[0])[::-1]
    assert torch.equal(_gather(storage, rows), torch.zeros((len(rows), shape[1]), dtype=torch.float64))
    assert _gather(storage, rows, sparse=True).to_dense().shape == (len(rows), shape[1])


def test_all_rows_empty_but_one():
    dense = np.zeros((12, 7), dtype=np.float32)
    dense[11, 6] = 2.5
    m = sp.csr_matrix(dense)
    for fmt in ("csr", "csc"):
        storage = _storage(m, fmt)
        assert torch.equal(_gather(storage, [11, 0, 11]), _expected(m, [11, 0, 11]))


@pytest.mark.parametrize("dtype,stored", [
    (torch.bool, torch.uint8), (torch.int8, torch.int32), (torch.int16, torch.int32),
    (torch.uint32, torch.int64), (torch.uint64, torch.int64), (torch.bfloat16, torch.float32),
])
def test_other_value_dtypes_are_stored_exactly(dtype, stored):
    m = _csr(seed=11, value_dtype="uint8")
    m.data = m.data % 100 + 1  # small positive counts: exact in every dtype
    indptr, indices, data = _parts(m)
    values = data.to(torch.int64).to(dtype)
    storage = tensor_sources._tensor_sparse_storage(indptr, indices, values, m.shape, "csr", "X")
    assert storage.values.dtype == stored
    rows = _all_rows(m.shape[0])
    assert torch.equal(_gather(storage, rows), _expected(m.astype(bool) if dtype == torch.bool else m, rows))


def test_odd_index_dtypes_are_read_exactly():
    m = _csr(seed=12)
    indptr, indices, data = _parts(m)
    for index_dtype in (torch.int16, torch.uint16, torch.uint32, torch.uint8):
        if index_dtype == torch.uint8 and m.shape[1] > 255:
            continue
        storage = tensor_sources._tensor_sparse_storage(indptr.to(torch.int64).to(torch.uint32), indices.to(index_dtype),
                                            data, m.shape, "csr", "X")
        rows = _all_rows(m.shape[0])
        assert torch.equal(_gather(storage, rows), _expected(m, rows))
    # Row indices in an odd dtype (CSC): converted to int64 before the conversion to CSR.
    indptr, indices, data = _parts(m, "csc")
    storage = tensor_sources._tensor_sparse_storage(indptr, indices.to(torch.uint16), data, m.shape, "csc", "X")
    assert torch.equal(_gather(storage, np.arange(m.shape[0])), _expected(m, np.arange(m.shape[0])))


# --- validation: the rules and messages of the scipy path --------------------------------------


def _corrupt(case: str):
    """(indptr, indices, data, shape) numpy arrays of a small CSR with one defect."""
    indptr = np.array([0, 2, 2, 5, 6], dtype=np.int64)  # row 1 empty
    indices = np.array([1, 3, 0, 2, 4, 3], dtype=np.int32)
    data = np.arange(1, 7, dtype=np.float32)
    shape = (4, 5)
    if case == "indptr_length":
        indptr = indptr[:-1]
    elif case == "indptr_not_from_zero":
        indptr = indptr + 1
    elif case == "indptr_decreasing":
        indptr = np.array([0, 2, 1, 5, 6])
    elif case == "indptr_past_nnz":
        indptr = np.array([0, 2, 2, 5, 7])
    elif case == "index_too_large":
        indices = indices.copy()
        indices[4] = 5
    elif case == "index_negative":
        indices = indices.copy()
        indices[0] = -1
    elif case == "unsorted":
        indices = np.array([3, 1, 0, 2, 4, 3], dtype=np.int32)
    elif case == "unsorted_in_last_row_pair":
        indices = np.array([1, 3, 0, 4, 2, 3], dtype=np.int32)
    elif case == "duplicate":
        indices = np.array([1, 3, 0, 2, 2, 3], dtype=np.int32)
    elif case == "float_indices":
        indices = indices.astype(np.float32)
    elif case != "valid":
        raise AssertionError(case)
    return indptr, indices, data, shape


_CASES = {
    "indptr_length": "indptr of length 4; expected 5",
    "indptr_not_from_zero": "not non-decreasing from 0",
    "indptr_decreasing": "not non-decreasing from 0",
    "indptr_past_nnz": "not non-decreasing from 0 to at most nnz=6",
    "index_too_large": r"column indices outside \[0, 5\)",
    "index_negative": r"column indices outside \[0, 5\)",
    "unsorted": "not in canonical format",
    "unsorted_in_last_row_pair": "not in canonical format",
    "duplicate": "not in canonical format",
    "float_indices": "non-integer index arrays",
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_corrupt_structure_is_refused_as_the_scipy_path_refuses_it(case, scan_block):
    indptr, indices, data, shape = _corrupt(case)
    tensors = [torch.from_numpy(a) for a in (indptr, indices, data)]
    with pytest.raises(ValueError, match=_CASES[case]) as got:
        tensor_sources._tensor_sparse_storage(*tensors, shape, "csr", "registry key 'X'")
    with pytest.raises(ValueError) as reference:
        host_sources._check_compressed(indptr, indices, shape[0], shape[1], "registry key 'X'", "csr")
    assert str(got.value) == str(reference.value)
    with pytest.raises(ValueError, match=_CASES[case].replace("column", "row")):
        tensor_sources.check_sparse_tensors(*tensors, shape[::-1], "csc", "registry key 'X'")


def test_valid_reference_case_is_accepted(scan_block):
    indptr, indices, data, shape = _corrupt("valid")
    storage = tensor_sources._tensor_sparse_storage(*(torch.from_numpy(a) for a in (indptr, indices, data)), shape, "csr", "X")
    m = sp.csr_matrix((data, indices, indptr), shape=shape)
    assert torch.equal(_gather(storage, [3, 1, 0, 2]), _expected(m, [3, 1, 0, 2]))


def test_too_few_values_and_bad_dtypes_are_refused():
    indptr, indices, data, shape = _corrupt("valid")
    t_indptr, t_indices = torch.from_numpy(indptr), torch.from_numpy(indices)
    with pytest.raises(ValueError, match=r"has 5 stored values \(shape \(5,\)\) for nnz=6 indices; the matrix is corrupt"):
        tensor_sources._tensor_sparse_storage(t_indptr, t_indices, torch.from_numpy(data[:5]), shape, "csr", "X")
    with pytest.raises(ValueError, match="stored values"):
        tensor_sources._tensor_sparse_storage(t_indptr, t_indices, torch.from_numpy(data).reshape(2, 3), shape, "csr", "X")
    with pytest.raises(ValueError, match="X has dtype complex64; expected a real numeric"):
        tensor_sources._tensor_sparse_storage(t_indptr, t_indices, torch.from_numpy(data).to(torch.complex64), shape, "csr", "X")
    with pytest.raises(TypeError, match="COO sparse matrix; only CSR and CSC"):
        tensor_sources._tensor_sparse_storage(t_indptr, t_indices, torch.from_numpy(data), shape, "coo", "X")
    with pytest.raises(ValueError, match="uint64 values above"):
        tensor_sources._tensor_sparse_storage(t_indptr, t_indices, torch.full((6,), 2**63 + 5, dtype=torch.uint64), shape,
                                  "csr", "X")


# --- torch tensors through build_storage and the loader ----------------------------------------


def test_build_storage_takes_torch_tensors():
    m = _csr(seed=13)
    for fmt in ("csr", "csc"):
        tensor = _sparse_tensor(m, fmt)
        storage = build_storage(tensor, "X", m.shape[0])
        assert build_storage(tensor, "X", m.shape[0]) is storage  # cached per source
        assert storage.source_format == fmt
        assert torch.equal(_gather(storage, _all_rows(m.shape[0])), _expected(m, _all_rows(m.shape[0])))
        if fmt == "csr":
            assert storage.values.data_ptr() == tensor.values().data_ptr()
    dense = torch.from_numpy(m.toarray())
    storage = build_storage(dense, "X", m.shape[0])
    assert storage.kind == "dense" and storage.values.data_ptr() == dense.data_ptr()  # in place
    column = torch.arange(40, dtype=torch.float32)
    storage = build_storage(column, "size_factor", 40)
    assert storage.squeeze and storage.values.data_ptr() == column.data_ptr()
    fortran = torch.from_numpy(np.asfortranarray(m.toarray()))
    storage = build_storage(fortran, "X", m.shape[0])
    assert storage.values.is_contiguous() and torch.equal(storage.values, fortran)
    with pytest.raises(ValueError, match="X has 40 rows but the AnnData has n_obs=41"):
        build_storage(dense, "X", 41)
    with pytest.raises(TypeError, match="layout torch.sparse_coo"):
        build_storage(dense.to_sparse(), "X", m.shape[0])
    with pytest.raises(ValueError, match="1- or 2-dimensional"):
        build_storage(torch.zeros(40, 2, 2), "X", 40)
    with pytest.raises(ValueError, match="real numeric"):
        build_storage(torch.zeros(40, 2, dtype=torch.complex64), "X", 40)
    with pytest.raises(ValueError, match="X is in meta memory; the kernels read CPU or CUDA memory"):
        build_storage(torch.zeros(40, 2, device="meta"), "X", 40)
    with pytest.raises(ValueError, match="different devices"):
        indptr, indices, data = _parts(m)
        tensor_sources._tensor_sparse_storage(indptr, indices, data.to("meta"), m.shape, "csr", "X")


def test_a_replaced_cache_source_is_not_kept_alive():
    import gc
    import weakref

    m = _csr(seed=14)
    tensor = _sparse_tensor(m, "csr")
    storage = build_storage(tensor, "X", m.shape[0])
    alive = weakref.ref(storage)
    del storage, tensor
    gc.collect()
    assert alive() is None  # the cache let go of it with its source


@pytest.mark.parametrize("load_sparse_tensor", [False, True])
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_loader_over_torch_tensors_equals_loader_over_scipy(fmt, load_sparse_tensor):
    m = _csr(seed=15, n_rows=97, n_cols=31)
    labels = np.random.default_rng(0).integers(0, 3, size=(97, 1))
    emb = np.random.default_rng(1).normal(size=(97, 4)).astype(np.float32)
    adata = SimpleNamespace(shape=m.shape)
    host = _FakeRegistry(adata, {"X": m.tocsr() if fmt == "csr" else m.tocsc(), "labels": labels, "emb": emb})
    torched = _FakeRegistry(adata, {"X": _sparse_tensor(m, fmt), "labels": torch.from_numpy(labels),
                                    "emb": torch.from_numpy(emb)})
    kwargs = dict(batch_size=16, indices=np.arange(90)[::-1], load_sparse_tensor=load_sparse_tensor, device="cpu")
    expected = list(AnnDataLoader(host, **kwargs))
    actual = list(AnnDataLoader(torched, **kwargs))
    assert_batches_equal(expected, actual)
    first = actual[0]["X"].to_dense() if load_sparse_tensor else actual[0]["X"]
    assert torch.equal(first, _expected(m, np.arange(90)[::-1][:16], torch.float32))


class _FakeRegistry:
    def __init__(self, adata, data):
        self.adata = adata
        self._data = data
        self.data_registry = {key: SimpleNamespace(attr_name="obsm", attr_key=key) for key in data}

    def get_from_registry(self, key):
        return self._data[key]


# --- residency of data already on a GPU (no GPU needed to check the decisions) --------------------


def test_gpu_data_refuses_cpu_device_and_host_residencies():
    cuda0 = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device='cpu', but registered data is already in GPU memory \(cuda:0.*"
                                         r"device='cuda'.*\.get\(\)"):
        resolve_residency("auto", torch.device("cpu"), 0, data_devices=[cuda0])
    for residency in ("pinned", "host"):
        with pytest.raises(ValueError, match=rf"residency='{residency}' keeps the data in host memory.*"
                                             r"residency='device' or 'auto'"):
            resolve_residency(residency, cuda0, 0, data_devices=[cuda0])
    for residency in ("auto", "device"):  # nothing to copy: no need to ask the GPU for free memory
        assert resolve_residency(residency, cuda0, 0, data_devices=[cuda0]) == "device"
    with pytest.raises(ValueError, match="residency must be one of"):
        resolve_residency("gpu", cuda0, 0, data_devices=[cuda0])
    assert resolve_residency("auto", torch.device("cpu"), 10, data_devices=[]) == "host"


def test_gpu_storage_serves_its_own_gpu_and_is_never_pinned():
    on_gpu = SimpleNamespace(device=torch.device("cuda", 1))
    assert storage_module._serves_as_is(on_gpu, torch.device("cuda", 1), False)
    assert not storage_module._serves_as_is(on_gpu, torch.device("cuda", 0), False)  # another GPU: a copy
    assert not storage_module._serves_as_is(on_gpu, torch.device("cpu"), False)
    with pytest.raises(ValueError, match="already in GPU memory.*residency='device'"):
        storage_module._serves_as_is(on_gpu, torch.device("cuda", 1), True)
    on_host = SimpleNamespace(device=torch.device("cpu"))
    assert storage_module._serves_as_is(on_host, torch.device("cpu"), False)
    assert not storage_module._serves_as_is(on_host, torch.device("cpu"), True)
    assert not storage_module._serves_as_is(on_host, torch.device("cuda", 0), False)


# --- the CuPy dispatch, with a stand-in CuPy over host memory ---------------------------------------


class _StandInArray:
    """What annloader_gpu reads of a cupy.ndarray (over numpy memory)."""

    def __init__(self, host: np.ndarray):
        self.host = host
        self.dtype, self.shape, self.ndim, self.size = host.dtype, host.shape, host.ndim, host.size
        self.data = SimpleNamespace(ptr=host.ctypes.data)
        self.device = SimpleNamespace(id=0, synchronize=lambda: None)


class _StandInSparse:
    def __init__(self, m):
        self.format = m.format
        self.shape, self.dtype = m.shape, m.dtype
        self.indptr, self.indices, self.data = (_StandInArray(a) for a in (m.indptr, m.indices, m.data))


@pytest.fixture
def stand_in_cupy(monkeypatch):
    cupy = types.ModuleType("cupy")
    cupy.ndarray = _StandInArray
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.issparse = lambda obj: isinstance(obj, _StandInSparse)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.sparse", sparse)
    # On a GPU, torch.as_tensor wraps the CuPy memory; here torch.from_numpy wraps the host memory.
    monkeypatch.setattr(tensor_sources, "cupy_to_torch", lambda a: torch.from_numpy(a.host))


def test_cupy_dispatch(stand_in_cupy):
    m = _csr(seed=16, n_rows=30)
    for fmt in ("csr", "csc"):
        matrix = _StandInSparse(m.tocsr() if fmt == "csr" else m.tocsc())
        assert _validated_matrix(matrix, "adata.X", 30) is matrix
        storage = build_storage(matrix, "X", 30)
        assert build_storage(matrix, "X", 30) is storage
        assert storage.source_format == fmt
        assert torch.equal(_gather(storage, _all_rows(30)), _expected(m, _all_rows(30)))
        if fmt == "csr":
            assert storage.values.data_ptr() == matrix.data.data.ptr  # in place
            matrix.data = _StandInArray(matrix.data.host * 2)  # arrays replaced: rebuilt, not stale
            rebuilt = build_storage(matrix, "X", 30)
            assert rebuilt is not storage
            assert torch.equal(_gather(rebuilt, [1, 2]), 2 * _expected(m, [1, 2]))
    emb = _StandInArray(np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32))
    assert _validated_matrix(emb, "adata.obsm['emb']", 30) is emb
    storage = build_storage(emb, "emb", 30)
    assert storage.kind == "dense" and storage.values.data_ptr() == emb.data.ptr
    assert torch.equal(storage.values, torch.from_numpy(emb.host))


def test_cupy_input_errors(stand_in_cupy):
    m = _csr(seed=17, n_rows=30)
    coo = _StandInSparse(m)
    coo.format = "coo"
    with pytest.raises(TypeError, match="adata.X is a COO sparse matrix; only CSR and CSC"):
        _validated_matrix(coo, "adata.X", 30)
    with pytest.raises(TypeError, match="X is a COO sparse matrix; only CSR and CSC"):
        build_storage(coo, "X", 30)
    with pytest.raises(ValueError, match="adata.X has 30 rows but adata has n_obs=31"):
        _validated_matrix(_StandInSparse(m), "adata.X", 31)
    complex_m = _StandInSparse(m)
    complex_m.dtype = np.dtype(np.complex64)
    with pytest.raises(ValueError, match="complex64; expected a real numeric"):
        _validated_matrix(complex_m, "adata.X", 30)
    unsorted = m.copy()
    row = next(r for r in range(30) if unsorted.indptr[r + 1] - unsorted.indptr[r] >= 2)
    unsorted.indices[unsorted.indptr[row]:unsorted.indptr[row + 1]] = unsorted.indices[
        unsorted.indptr[row]:unsorted.indptr[row + 1]][::-1].copy()
    with pytest.raises(ValueError, match=r"adata.X \(CSR\) is not in canonical format"):
        _validated_matrix(_StandInSparse(unsorted), "adata.X", 30)
    with pytest.raises(ValueError, match="must be 2-dimensional"):
        _validated_matrix(_StandInArray(np.zeros(30)), "adata.obsm['v']", 30)
    with pytest.raises(ValueError, match="dtype <U1"):
        _validated_matrix(_StandInArray(np.array([["a"]] * 30)), "adata.obsm['v']", 30)


# --- on a GPU --------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not GPU_USABLE or not torch.cuda.is_available(), reason="needs a usable CUDA GPU")


def _host_and_gpu_adata(cupy, cpx_sparse, x_format: str, n_obs: int = 97, n_vars: int = 31):
    """The same data twice: scipy/numpy (the reference) and cupyx/cupy in GPU memory."""
    counts = make_counts(n_obs, n_vars, seed=4)
    rng = np.random.default_rng(5)
    obs = make_obs(rng, n_obs)
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    emb = rng.normal(size=(n_obs, 3)).astype(np.float32)
    host_x = sp.csr_matrix(counts) if x_format == "csr" else sp.csc_matrix(counts)
    gpu_x = (cpx_sparse.csr_matrix if x_format == "csr" else cpx_sparse.csc_matrix)(host_x)
    host = ad.AnnData(host_x, obs=obs.copy(), var=var.copy())
    host.obsm["emb"] = emb
    on_gpu = ad.AnnData(gpu_x, obs=obs.copy(), var=var.copy())
    on_gpu.obsm["emb"] = cupy.asarray(emb)
    return host, on_gpu


def _cupy():
    cupy = pytest.importorskip("cupy")
    cpx_sparse = pytest.importorskip("cupyx.scipy.sparse")
    return cupy, cpx_sparse


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("x_format", ["csr", "csc"])
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_cupyx_anndata_is_gathered_in_place_on_the_gpu(x_format, load_sparse_tensor):
    cupy, cpx_sparse = _cupy()
    host, on_gpu = _host_and_gpu_adata(cupy, cpx_sparse, x_format)
    assert cpx_sparse.issparse(on_gpu.X) and isinstance(on_gpu.obsm["emb"], cupy.ndarray)
    setup = dict(batch_key="batch", labels_key="cell_type", obsm_keys=["emb"])
    kwargs = dict(batch_size=16, indices=np.arange(90)[::-1], load_sparse_tensor=load_sparse_tensor)
    expected = list(AnnDataLoader(setup_anndata(host, **setup), device="cpu", **kwargs))
    loader = AnnDataLoader(setup_anndata(on_gpu, **setup), device="cuda", **kwargs)
    assert loader.residency == "device"
    actual = list(loader)
    assert all(v.device.type == "cuda" for b in actual for v in b.values())
    assert_batches_equal(expected, [{k: v.cpu() for k, v in b.items()} for b in actual])
    x_dense = actual[0]["X"].to_dense() if load_sparse_tensor else actual[0]["X"]
    assert torch.equal(x_dense.cpu(), torch.from_numpy(host.X[np.arange(90)[::-1][:16]].toarray()))

    fields = loader.dataset.data.fields
    x, emb = fields["X"].storage, fields["emb"].storage
    assert x.device == torch.device("cuda", on_gpu.X.data.device.id)
    if x_format == "csr":  # used in place: the storage's values are the cupyx matrix's
        assert x.values.data_ptr() == on_gpu.X.data.data.ptr
        assert x.indptr.data_ptr() != on_gpu.X.indptr.data.ptr
        assert x.indices.data_ptr() != on_gpu.X.indices.data.ptr
    assert emb.values.data_ptr() == on_gpu.obsm["emb"].data.ptr
    assert x.nbytes == x.values.nbytes + x.indices.nbytes + x.indptr.nbytes
    distinct = {id(f.storage): f.storage.nbytes for f in fields.values()}
    assert loader.resident_bytes == sum(distinct.values())
    assert loader.resident_bytes >= (on_gpu.X.data.nbytes if x_format == "csr" else 0) + on_gpu.obsm["emb"].nbytes
    # A second loader over the same data shares the storage.
    other = AnnDataLoader(setup_anndata(on_gpu, **setup), device="cuda", batch_size=8)
    assert other.dataset.data.fields["X"].storage is x


@pytest.mark.gpu
@gpu
def test_cupyx_value_edits_are_seen_and_structure_is_checked_on_the_gpu():
    cupy, cpx_sparse = _cupy()
    _host, on_gpu = _host_and_gpu_adata(cupy, cpx_sparse, "csr")
    loader = AnnDataLoader(setup_anndata(on_gpu), device="cuda", batch_size=97)
    before = next(iter(loader))["X"].clone()
    on_gpu.X.data *= 2  # in place: the loader reads the same memory
    cupy.cuda.Device(on_gpu.X.data.device.id).synchronize()  # whatever stream CuPy used
    assert torch.equal(next(iter(loader))["X"], before * 2)

    bad = on_gpu.X.copy()
    bad.indices[int(bad.indptr[1])] = 10_000  # a column index out of range
    with pytest.raises(ValueError, match=r"adata.X \(CSR\) has column indices outside \[0, 31\)"):
        setup_anndata(ad.AnnData(bad, obs=on_gpu.obs.copy(), var=on_gpu.var.copy()))


@pytest.mark.gpu
@gpu
def test_cupy_data_refuses_cpu_and_host_residencies():
    cupy, cpx_sparse = _cupy()
    _host, on_gpu = _host_and_gpu_adata(cupy, cpx_sparse, "csr")
    registry = setup_anndata(on_gpu)
    with pytest.raises(ValueError, match=r"already in GPU memory.*device='cuda'.*\.get\(\)"):
        AnnDataLoader(registry, device="cpu")
    for residency in ("pinned", "host"):
        with pytest.raises(ValueError, match=rf"residency='{residency}' keeps the data in host memory"):
            AnnDataLoader(registry, device="cuda", residency=residency)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_cuda_tensors_are_gathered_in_place(fmt):
    """Torch CUDA tensors (no CuPy needed) take the same path as CuPy data."""
    m = _csr(seed=21, n_rows=97, n_cols=31)
    if fmt == "dense":
        x = torch.from_numpy(m.toarray()).cuda()
        values = x
    else:
        x = _sparse_tensor(m, fmt).cuda()
        values = x.values()
    adata = SimpleNamespace(shape=m.shape)
    loader = AnnDataLoader(_FakeRegistry(adata, {"X": x}), device="cuda", batch_size=16)
    assert loader.residency == "device"
    batches = [b["X"].cpu() for b in loader]
    assert torch.equal(torch.cat(batches), torch.from_numpy(m.toarray()))
    storage = loader.dataset.data.fields["X"].storage
    if fmt != "csc":
        assert storage.values.data_ptr() == values.data_ptr()
    if torch.cuda.device_count() > 1:  # another GPU: one device-to-device copy
        other = AnnDataLoader(_FakeRegistry(adata, {"X": x}), device="cuda:1", batch_size=16)
        assert other.dataset.data.fields["X"].storage.device == torch.device("cuda", 1)
        assert torch.equal(torch.cat([b["X"].cpu() for b in other]), torch.from_numpy(m.toarray()))


@pytest.mark.parametrize("kind", ["numpy", "scipy"])
def test_the_storage_cache_never_keeps_a_source_alive(kind):
    """A dense source used in place is a base of its storage: a cache that owned the storage
    would keep the source (for CuPy data: its GPU memory) alive for the life of the process."""
    import gc
    import weakref

    from annloader_gpu.registry import setup_anndata
    from test_loader import make_adata

    adata = make_adata("dense" if kind == "numpy" else "csr")
    adata.obsm["emb"] = np.random.default_rng(0).random((adata.n_obs, 3)).astype(np.float32)
    source = weakref.ref(adata.obsm["emb"] if kind == "numpy" else adata.X)
    registry = setup_anndata(adata, obsm_keys=["emb"])
    first = AnnDataLoader(registry, device="cpu", batch_size=8)
    second = AnnDataLoader(registry, device="cpu", batch_size=4)
    key = "emb" if kind == "numpy" else "X"
    assert first.dataset.data.fields[key].storage is second.dataset.data.fields[key].storage  # shared
    next(iter(first))
    del first, second, registry, adata
    gc.collect()
    assert source() is None


class _UnsliceableCsr:
    """A CSR matrix that this scipy cannot row-slice (scipy 1.10 with int64 indptr + int32 indices)."""

    def __init__(self, n_rows: int, n_cols: int, nnz: int):
        self.shape, self.nnz = (n_rows, n_cols), nnz

    def __getitem__(self, rows):
        raise ValueError("Output dtype not compatible with inputs.")


@pytest.mark.parametrize("n_cols,nnz,expected", [(30, 100, np.int32), (2**31, 100, np.int64),
                                                 (30, 2**31, np.int64)])
def test_slice_index_dtype_where_scipy_cannot_slice(n_cols, nnz, expected):
    """The batch index dtype a newer scipy would give: int32 unless the sizes need int64."""
    assert host_sources._scipy_slice_index_dtype(_UnsliceableCsr(5, n_cols, nnz)) == np.dtype(expected)
