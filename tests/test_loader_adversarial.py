"""Regression tests for odd inputs found by adversarial testing against scvi-tools' loader."""

from __future__ import annotations

import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import Sampler

from _reference import FULL_SETUP, FakeManager, assert_batches_equal, make_adata, reference_batches, scvi_obsm_manager
from annloader_gpu import kernels
from annloader_gpu.loader import AnnDataLoader
from annloader_gpu.registry import setup_anndata

scvi_only = pytest.mark.scvi


@pytest.fixture(scope="module")
def scvi():
    return pytest.importorskip("scvi")


def ours(manager, **kwargs) -> list:
    return list(AnnDataLoader(manager, device="cpu", **kwargs))


def _fake(data: dict, n_obs: int) -> FakeManager:
    return FakeManager(ad.AnnData(np.zeros((n_obs, 1), np.float32)), data)


class _NoLenSampler(Sampler):
    """A sampler without __len__ (DataLoader iterates it; only len(loader) fails)."""

    def __init__(self):
        pass

    def __iter__(self):
        yield [0, 1, 2]
        yield np.array([5, 3])


class _ScalarSampler(Sampler):
    """Items that are single positions: scvi's Subset gives one observation without a batch dim."""

    def __len__(self):
        return 4

    def __iter__(self):
        yield 3
        yield np.int64(4)
        yield torch.tensor(5)
        yield np.array(0)


# --- user samplers --------------------------------------------------------------------------


@scvi_only
@pytest.mark.parametrize("iter_ndarray", [False, True])
def test_sampler_without_len_iterates_like_scvi(scvi, iter_ndarray):
    manager = scvi_obsm_manager(make_adata("csr", n_obs=20, n_vars=6))
    kwargs = dict(iter_ndarray=iter_ndarray)
    expected = reference_batches(manager, sampler=_NoLenSampler(), **kwargs)
    assert_batches_equal(expected, ours(manager, sampler=_NoLenSampler(), **kwargs))
    with pytest.raises(TypeError):
        len(AnnDataLoader(manager, device="cpu", sampler=_NoLenSampler()))


@scvi_only
@pytest.mark.parametrize("x_format", ["dense", "csr", "csc"])
@pytest.mark.parametrize("iter_ndarray", [False, True])
def test_scalar_sampler_items_match_scvi(scvi, x_format, iter_ndarray):
    manager = scvi_obsm_manager(make_adata(x_format, n_obs=20, n_vars=6))
    kwargs = dict(indices=np.arange(19, -1, -1), iter_ndarray=iter_ndarray)
    expected = reference_batches(manager, sampler=_ScalarSampler(), **kwargs)
    actual = ours(manager, sampler=_ScalarSampler(), **kwargs)
    assert_batches_equal(expected, actual)
    if not iter_ndarray:  # dense fields lose the per-item batch dimension, sparse ones keep it
        assert actual[0]["emb"].shape == (1, 3) and actual[0]["sparse_emb"].shape == (1, 1, 5)


@scvi_only
@pytest.mark.parametrize("x_format", ["dense", "csc"])
def test_dataset_scalar_getitem_matches_scvi_subset(scvi, x_format):
    from scvi.dataloaders import AnnDataLoader as ScviLoader

    manager = scvi_obsm_manager(make_adata(x_format, n_obs=20, n_vars=6))
    kwargs = dict(indices=np.arange(19, -1, -1))
    reference = ScviLoader(manager, **kwargs).dataset
    dataset = AnnDataLoader(manager, device="cpu", **kwargs).dataset
    for position in (3, np.int64(2), torch.tensor(1), np.array(0), [4]):
        assert_batches_equal([reference[position]], [dataset[position]])


@scvi_only
def test_batch_size_is_ignored_with_a_user_sampler(scvi):
    manager = scvi_obsm_manager(make_adata("csr", n_obs=20, n_vars=6))
    sampler = [np.array([1, 2]), np.array([7])]
    expected = reference_batches(manager, sampler=sampler, batch_size=None)
    assert_batches_equal(expected, ours(manager, sampler=sampler, batch_size=None))
    with pytest.raises(ValueError, match="batch_size"):
        AnnDataLoader(manager, device="cpu", batch_size=None)


# --- lossless storage ---------------------------------------------------------------------


def test_negative_zero_keeps_its_sign_in_dense_sources():
    dense = np.array([[-0.0, 1.0], [2.0, -0.0], [3.0, 0.0]], np.float32)
    frame = pd.DataFrame({"a": [-0.0, 1.0, 2.0], "b": [0.0, -0.0, 5.0]})
    batch = ours(_fake({"X": dense, "covs": frame}, 3))[0]
    assert torch.equal(torch.signbit(batch["X"]), torch.from_numpy(np.signbit(dense)))
    assert torch.equal(torch.signbit(batch["covs"]), torch.from_numpy(np.signbit(frame.to_numpy(np.float32))))


def test_explicit_negative_zero_in_csr_densifies_like_scipy():
    # scipy's toarray() adds stored values onto zeros: an explicit -0.0 comes out as +0.0.
    matrix = sp.csr_matrix((np.array([-0.0, 3.0], np.float32), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 2))
    batch = ours(_fake({"X": matrix}, 2))[0]["X"]
    assert torch.equal(torch.signbit(batch), torch.from_numpy(np.signbit(matrix.toarray())))


@pytest.mark.parametrize("container", ["dense", "frame"])
def test_float64_to_float16_rounds_once_like_numpy(container):
    step = 2.0**-10  # float16 spacing at 1: these sit just off the halfway points
    values = np.array([[1 + step / 2 + 2.0**-40, 1 + step / 2 - 2.0**-40, 1 + 3 * step / 2 + 2.0**-35,
                        2.0**-25 + 2.0**-70, 65519.99, 0.1]] * 3)
    data = values if container == "dense" else pd.DataFrame(values)
    batch = ours(_fake({"X": data}, 3), data_and_attributes={"X": np.float16}, iter_ndarray=True)[0]
    np.testing.assert_array_equal(batch["X"], values.astype(np.float16))


# --- corrupt sparse matrices --------------------------------------------------------------


def _short_data_matrix():
    matrix = sp.random(30, 7, density=0.5, format="csr", random_state=0, dtype=np.float32)
    matrix.data = matrix.data[:3].copy()  # fewer values than indices: reads past the end
    return matrix


def test_sparse_values_shorter_than_nnz_are_refused():
    with pytest.raises(ValueError, match="stored values"):
        AnnDataLoader(_fake({"X": _short_data_matrix()}, 30), device="cpu")


def test_registry_refuses_sparse_values_shorter_than_nnz():
    adata = ad.AnnData(sp.random(30, 7, density=0.5, format="csr", random_state=0, dtype=np.float32))
    adata.X.data = adata.X.data[:3].copy()
    with pytest.raises(ValueError, match="stored values"):
        setup_anndata(adata)


# --- kernels: the CSR copy trusts out_indptr ----------------------------------------------


def _bound_and_rows():
    matrix = sp.random(6, 5, density=0.5, format="csr", random_state=0, dtype=np.float32)
    arrays = (torch.from_numpy(matrix.indptr.astype(np.int64)), torch.from_numpy(matrix.indices),
              torch.from_numpy(matrix.data))
    rows = torch.tensor([0, 1, 2])
    lengths = np.diff(matrix.indptr)[:3]
    assert len(set(lengths.tolist())) > 1  # offsets that disagree with the lengths are possible
    return arrays, rows, int(lengths.sum())


@pytest.mark.parametrize("bound", [True, False])
def test_csr_copy_refuses_out_indptr_that_disagrees_with_the_rows(bound):
    arrays, rows, nnz = _bound_and_rows()
    indices, values = torch.zeros(nnz, dtype=torch.int32), torch.zeros(nnz)
    for bad in ([0, nnz, nnz, nnz], [0, 0, 0, nnz], [0, -100, 0, nnz]):
        out_indptr = torch.tensor(bad, dtype=torch.int64)
        with pytest.raises(ValueError, match="out_indptr"):
            if bound:
                kernels.BoundCsr(*arrays, 5).to_csr(rows, out_indptr, indices, values)
            else:
                kernels.gather_csr_to_csr(*arrays, 5, rows, out_indptr, indices, values)
    good = torch.empty(4, dtype=torch.int64)
    csr = kernels.BoundCsr(*arrays, 5)
    assert csr.batch_indptr(rows, good) == nnz
    csr.to_csr(rows, good, indices, values)  # what batch_indptr filled is accepted


# --- iteration: interleaved iterators and threads -----------------------------------------


def _snapshot(batches: list) -> list:
    return [{k: (v.to_dense() if v.layout != torch.strided else v).clone() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_interleaved_iterators_and_threads_see_correct_batches(load_sparse_tensor):
    registry = setup_anndata(make_adata("csr", n_obs=60, n_vars=9), **FULL_SETUP, obsm_keys=["sparse_emb"])
    loader = AnnDataLoader(registry, device="cpu", batch_size=7, load_sparse_tensor=load_sparse_tensor)
    expected = _snapshot(list(loader))
    one, two = iter(loader), iter(loader)
    kept = [(a, b) for a, b in zip(one, two)]  # both epochs' batches kept while the other runs
    assert_batches_equal(expected, _snapshot([a for a, _ in kept]))
    assert_batches_equal(expected, _snapshot([b for _, b in kept]))

    failures: list = []

    def epochs():
        try:
            for _ in range(3):
                assert_batches_equal(expected, _snapshot(list(loader)))
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=epochs) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]


def test_prepared_structure_is_not_shared_with_the_users_matrix():
    import scipy.sparse as sp

    from annloader_gpu.sources import build_storage

    for n_cols in (30, 70_000):  # compact uint16 indices, and int32 indices kept as they are
        m = sp.random(20, n_cols, density=0.01, format="csr", random_state=0, dtype=np.float32)
        m.data[:] = 1.5
        storage = build_storage(m, "X", 20)
        assert not np.shares_memory(storage.indptr, m.indptr)
        assert not np.shares_memory(storage.indices, m.indices)
        before = storage.indptr.copy()
        m.indptr[1:] = 0  # an in-place edit after set-up does not reach the prepared copy
        np.testing.assert_array_equal(storage.indptr, before)
