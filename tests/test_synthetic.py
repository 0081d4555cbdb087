"""Tests for the synthetic count-matrix generator (small sizes only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from annloader_gpu import synthetic
from annloader_gpu.synthetic import default_dataset, make_counts_adata

SMALL = dict(n_obs=1_500, n_vars=2_000, genes_per_cell=200, n_batches=3, n_labels=5, seed=7)


@pytest.fixture(scope="module")
def small_adata():
    return make_counts_adata(**SMALL)


def _assert_same_matrix(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    for attr in ("data", "indices", "indptr"):
        left, right = getattr(a, attr), getattr(b, attr)
        assert left.dtype == right.dtype, attr
        np.testing.assert_array_equal(left, right, err_msg=attr)


def test_shape_dtypes_and_names(small_adata):
    X = small_adata.X
    assert isinstance(X, sp.csr_matrix)
    assert X.shape == small_adata.shape == (SMALL["n_obs"], SMALL["n_vars"])
    assert X.dtype == np.float32
    assert X.indices.dtype == np.int32
    assert X.indptr.dtype == np.int32
    assert small_adata.obs_names.is_unique and small_adata.var_names.is_unique
    assert all(isinstance(name, str) for name in small_adata.obs_names[:5])
    assert all(isinstance(name, str) for name in small_adata.var_names[:5])


def test_canonical_csr(small_adata):
    X = small_adata.X
    assert X.indptr[0] == 0 and X.indptr[-1] == X.nnz == X.data.size == X.indices.size
    assert np.all(np.diff(X.indptr) >= 0)
    assert X.indices.min() >= 0 and X.indices.max() < X.shape[1]
    # Strictly increasing columns within each row (sorted, no duplicates).
    step = np.diff(X.indices.astype(np.int64))
    row_starts = X.indptr[1:-1]
    within_row = np.ones(step.size, dtype=bool)
    within_row[row_starts[(row_starts > 0) & (row_starts < X.nnz)] - 1] = False
    assert np.all(step[within_row] > 0)
    recomputed = X.copy()
    recomputed.has_canonical_format = False
    recomputed.sum_duplicates()
    _assert_same_matrix(X, recomputed)


def test_values_are_positive_integer_counts(small_adata):
    data = small_adata.X.data
    assert np.all(np.isfinite(data))
    assert data.min() >= 1
    np.testing.assert_array_equal(data, np.floor(data))
    # Overdispersed UMI-like counts: mostly ones, but a real tail.
    assert 0.3 < np.mean(data == 1) < 0.95
    assert data.max() >= 10


def test_genes_per_cell_distribution(small_adata):
    nnz_per_cell = np.diff(small_adata.X.indptr)
    target = SMALL["genes_per_cell"]
    assert abs(nnz_per_cell.mean() - target) < 0.1 * target
    assert 0.2 < nnz_per_cell.std() / nnz_per_cell.mean() < 0.8  # lognormal spread, not constant


def test_obs_summaries_match_matrix(small_adata):
    obs = small_adata.obs
    X = small_adata.X
    np.testing.assert_array_equal(obs["n_genes"].to_numpy(), np.diff(X.indptr))
    np.testing.assert_allclose(obs["n_counts"].to_numpy(), np.asarray(X.sum(axis=1)).ravel(), rtol=1e-6)
    np.testing.assert_allclose(obs["size_factor"].mean(), 1.0, rtol=1e-5)
    assert np.corrcoef(obs["n_genes"], obs["n_counts"])[0, 1] > 0.8


def test_gene_popularity_decreases_with_rank(small_adata):
    rank = small_adata.var["popularity_rank"].to_numpy()
    assert np.array_equal(np.sort(rank), np.arange(SMALL["n_vars"]))
    cells_per_gene = np.bincount(small_adata.X.indices, minlength=SMALL["n_vars"])[np.argsort(rank)]
    decile_means = cells_per_gene.reshape(10, -1).mean(axis=1)
    assert decile_means[0] > 10 * decile_means[-1]
    assert np.all(np.diff(decile_means) < 0)
    # Popular genes are not simply the first columns.
    first_columns = np.bincount(small_adata.X.indices, minlength=SMALL["n_vars"])[: SMALL["n_vars"] // 10]
    assert first_columns.mean() < decile_means[0] / 2


def test_categorical_columns(small_adata):
    for column, expected in (("batch", SMALL["n_batches"]), ("labels", SMALL["n_labels"])):
        values = small_adata.obs[column]
        assert isinstance(values.dtype, pd.CategoricalDtype)
        assert len(values.cat.categories) == expected
        assert all(isinstance(c, str) for c in values.cat.categories)
        assert values.nunique() == expected  # 1,500 cells cover every category


def test_deterministic_for_seed(small_adata):
    again = make_counts_adata(**SMALL)
    _assert_same_matrix(small_adata.X, again.X)
    pd.testing.assert_frame_equal(small_adata.obs, again.obs)
    pd.testing.assert_frame_equal(small_adata.var, again.var)


@pytest.mark.parametrize("chunk_size", [1, 100, 640, 10_000])
def test_chunk_size_does_not_change_result(small_adata, chunk_size):
    chunked = make_counts_adata(**SMALL, chunk_size=chunk_size)
    _assert_same_matrix(small_adata.X, chunked.X)
    pd.testing.assert_frame_equal(small_adata.obs, chunked.obs)


def test_different_seed_differs(small_adata):
    other = make_counts_adata(**{**SMALL, "seed": SMALL["seed"] + 1})
    assert other.X.nnz != small_adata.X.nnz or not np.array_equal(other.X.indices, small_adata.X.indices)
    assert not small_adata.obs["labels"].equals(other.obs["labels"])


def test_int64_indptr_when_nnz_exceeds_int32(monkeypatch, small_adata):
    monkeypatch.setattr(synthetic, "_INT32_MAX", 1_000)
    wide = make_counts_adata(**SMALL)
    assert wide.X.indptr.dtype == np.int64
    assert wide.X.indices.dtype == np.int32
    np.testing.assert_array_equal(wide.X.indptr, small_adata.X.indptr)
    np.testing.assert_array_equal(wide.X.indices, small_adata.X.indices)


def test_genes_per_cell_is_clipped_to_n_vars():
    adata = make_counts_adata(n_obs=70, n_vars=30, genes_per_cell=10_000, seed=1)
    np.testing.assert_array_equal(np.diff(adata.X.indptr), 30)


@pytest.mark.parametrize("bad", [dict(n_obs=0), dict(n_vars=0), dict(genes_per_cell=0), dict(chunk_size=0)])
def test_invalid_arguments(bad):
    with pytest.raises(ValueError):
        make_counts_adata(**{"n_obs": 10, "n_vars": 10, **bad})


def test_default_dataset_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNLOADER_GPU_CACHE", str(tmp_path))
    params = dict(n_obs=300, n_vars=500, seed=3)
    first = default_dataset(**params)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1  # no temp file left behind
    assert cached[0].suffix == ".h5ad"
    assert f"v{synthetic.GENERATOR_VERSION}" in cached[0].name

    def must_not_regenerate(*args, **kwargs):
        raise AssertionError("default_dataset regenerated instead of loading the cache")

    monkeypatch.setattr(synthetic, "make_counts_adata", must_not_regenerate)
    second = default_dataset(**params)
    _assert_same_matrix(first.X, second.X)
    pd.testing.assert_frame_equal(first.obs, second.obs)
    pd.testing.assert_frame_equal(first.var, second.var)
    np.testing.assert_array_equal(first.obs_names, second.obs_names)


def test_default_dataset_version_bump_invalidates_cache(tmp_path, monkeypatch):
    params = dict(n_obs=100, n_vars=200, seed=0)
    default_dataset(tmp_path, **params)
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    default_dataset(tmp_path, **params)
    assert len(list(tmp_path.glob("*.h5ad"))) == 2


def test_default_dataset_explicit_file(tmp_path):
    file = tmp_path / "nested" / "data.h5ad"
    made = default_dataset(file, n_obs=120, n_vars=150, seed=2)
    assert file.is_file()
    _assert_same_matrix(made.X, default_dataset(file, n_obs=120, n_vars=150, seed=2).X)
