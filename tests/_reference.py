"""Shared helpers for the loader tests: random AnnData, scvi-tools managers, batch comparison."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

FULL_SETUP = dict(
    batch_key="batch",
    labels_key="cell_type",
    size_factor_key="size_factor",
    categorical_covariate_keys=["donor", "is_treated"],
    continuous_covariate_keys=["percent_mito", "n_genes"],
)


def make_counts(n_obs: int, n_vars: int, seed: int) -> np.ndarray:
    """Integer counts (float32) with some empty rows; never all zero."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.6, size=(n_obs, n_vars)).astype(np.float32)
    counts[rng.random((n_obs, n_vars)) < 0.05] = rng.integers(5, 300, size=1)[0]  # a few larger counts
    counts[::7] = 0  # empty rows
    counts[1, 0] = 3.0
    return counts


def to_format(counts: np.ndarray, x_format: str, int64_indptr: bool = False):
    if x_format == "dense":
        return counts.copy()
    matrix = sp.csr_matrix(counts) if x_format == "csr" else sp.csc_matrix(counts)
    if int64_indptr:
        matrix.indptr = matrix.indptr.astype(np.int64)
        matrix.indices = matrix.indices.astype(np.int64)
    return matrix


def make_obs(rng: np.random.Generator, n_obs: int) -> pd.DataFrame:
    """obs with every kind of column scvi-tools registers: categorical, integer, bool, float."""
    return pd.DataFrame(
        {
            "batch": rng.choice(["b2", "b0", "b1"], n_obs),
            # Explicit category order plus an unused category: scvi keeps both.
            "cell_type": pd.Categorical(rng.choice(["t", "b", "nk"], n_obs), categories=["nk", "t", "b", "unused"]),
            "donor": rng.integers(10, 14, n_obs),
            "is_treated": rng.choice([True, False], n_obs),
            "size_factor": rng.uniform(0.5, 2.0, n_obs),
            "percent_mito": rng.uniform(0, 0.2, n_obs).astype(np.float32),
            "n_genes": rng.integers(100, 3000, n_obs),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )


def make_adata(x_format: str = "csr", n_obs: int = 97, n_vars: int = 31, seed: int = 0,
               int64_indptr: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed + 1)
    counts = make_counts(n_obs, n_vars, seed)
    obs = make_obs(rng, n_obs)
    adata = ad.AnnData(to_format(counts, x_format, int64_indptr), obs=obs,
                       var=pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]))
    adata.layers["counts"] = to_format(counts * 2, x_format, int64_indptr)
    adata.obsm["emb"] = rng.normal(size=(n_obs, 3))
    sparse_emb = sp.random(n_obs, 5, density=0.4, format="csr", random_state=seed, dtype=np.float64)
    sparse_emb.data = np.round(sparse_emb.data * 7)
    adata.obsm["sparse_emb"] = sparse_emb
    return adata


def scvi_manager(adata: ad.AnnData, **setup: Any):
    """scvi-tools' AnnDataManager for SCVI.setup_anndata(adata, **setup) (modifies adata, as scvi does).

    Skips the calling test where scvi-tools (the reference oracle) is not installed."""
    scvi = pytest.importorskip("scvi")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(adata, **setup)
    return scvi.model.SCVI._get_most_recent_anndata_manager(adata, required=True)


def scvi_obsm_manager(adata: ad.AnnData, obsm_keys=("emb", "sparse_emb")):
    """An AnnDataManager with X, batch and obsm fields (scvi-tools' ObsmField(key, key))."""
    from scvi.data import AnnDataManager
    from scvi.data.fields import CategoricalObsField, LayerField, ObsmField

    fields = [LayerField("X", None, is_count_data=True), CategoricalObsField("batch", "batch")]
    fields += [ObsmField(key, key) for key in obsm_keys]
    manager = AnnDataManager(fields=fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.register_fields(adata)
    return manager


def reference_batches(manager, **kwargs) -> list:
    from scvi.dataloaders import AnnDataLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(AnnDataLoader(manager, **kwargs))


def assert_value_equal(expected, actual, where: str) -> None:
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.layout == expected.layout, f"{where}: layout {actual.layout} != {expected.layout}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        if expected.layout in (torch.sparse_csr, torch.sparse_csc):
            if expected.layout == torch.sparse_csr:
                pairs = [(expected.crow_indices(), actual.crow_indices()), (expected.col_indices(), actual.col_indices())]
            else:
                pairs = [(expected.ccol_indices(), actual.ccol_indices()), (expected.row_indices(), actual.row_indices())]
            for e, a in pairs:
                assert a.dtype == e.dtype, f"{where}: index dtype {a.dtype} != {e.dtype}"
            expected, actual = expected.to_dense(), actual.to_dense()
        assert torch.equal(expected, actual), f"{where}: values differ"
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        raise AssertionError(f"{where}: unexpected type {type(expected)}")


def assert_batches_equal(expected: list, actual: list, *, key_order: bool = True) -> None:
    assert len(actual) == len(expected), f"{len(actual)} batches, expected {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        if isinstance(e, list):  # iter_ndarray with a user sampler: DataLoader yields lists of dicts
            assert isinstance(a, list) and len(a) == len(e)
            for j, (ee, aa) in enumerate(zip(e, a)):
                assert list(aa) == list(ee)
                for key in ee:
                    assert_value_equal(ee[key], aa[key], f"batch {i}[{j}] key {key!r}")
            continue
        if key_order:
            assert list(a) == list(e), f"batch {i}: keys {list(a)} != {list(e)}"
        assert sorted(a) == sorted(e), f"batch {i}: keys {sorted(a)} != {sorted(e)}"
        for key in e:
            assert_value_equal(e[key], a[key], f"batch {i} key {key!r}")


def any_nonzero(batches: list) -> bool:
    return any(
        bool((b["X"].to_dense() if b["X"].layout != torch.strided else b["X"]).any()) for b in batches
    )


class FakeManager:
    """A minimal duck-typed registry with arbitrary (possibly broken) data."""

    def __init__(self, adata, data: dict[str, Any]):
        self.adata = adata
        self._data = data
        self.data_registry = {key: SimpleNamespace(attr_name="obsm", attr_key=key) for key in data}

    def get_from_registry(self, key: str):
        return self._data[key]
