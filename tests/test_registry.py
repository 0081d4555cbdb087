"""AnnDataRegistry / setup_anndata: parity with scvi-tools' AnnDataManager, no mutation, errors."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _reference import FULL_SETUP, make_obs

from annloader_gpu.registry import (
    REGISTRY_KEYS,
    AnnDataRegistry,
    as_registry,
    setup_anndata,
)



def make_adata(
    x_format: str = "csr", n_obs: int = 60, n_vars: int = 25, seed: int = 0
) -> ad.AnnData:
    """Random counts with every kind of field scvi-tools can register."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.7, size=(n_obs, n_vars)).astype(np.float32)
    x = {"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts)}[x_format]
    obs = make_obs(rng, n_obs)
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]))
    adata.layers["counts_int"] = sp.csr_matrix(counts.astype(np.int64))
    adata.layers["fortran"] = np.asfortranarray(counts * 2)
    adata.obsm["emb"] = np.asfortranarray(rng.normal(size=(n_obs, 3)))
    adata.obsm["sparse_emb"] = sp.random(n_obs, 4, density=0.5, format="csr", random_state=seed)
    adata.obsm["table"] = pd.DataFrame(
        rng.normal(size=(n_obs, 2)), index=adata.obs_names, columns=["u", "v"]
    )
    return adata


def scvi_manager(adata: ad.AnnData, obsm_keys: list[str] = (), **setup_kwargs: Any):
    """scvi-tools' AnnDataManager after SCVI.setup_anndata (registers into, and mutates, adata)."""
    scvi = pytest.importorskip("scvi")
    from scvi.data.fields import ObsmField

    with warnings.catch_warnings():
        # Count-data, CSC-format and small-category warnings are scvi's advice, not failures.
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(adata, **setup_kwargs)
        manager = scvi.model.SCVI._get_most_recent_anndata_manager(adata, required=True)
        if obsm_keys:
            manager.register_new_fields([ObsmField(key, key) for key in obsm_keys])
    return manager


def assert_same_data(got: Any, expected: Any, key: str) -> None:
    assert type(got) is type(expected), key
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected, obj=key)
    elif sp.issparse(expected):
        assert got.format == expected.format, key
        assert got.dtype == expected.dtype, key
        assert (got != expected).nnz == 0, key
    else:
        assert got.dtype == expected.dtype, key
        assert got.shape == expected.shape, key
        assert got.flags["C_CONTIGUOUS"] == expected.flags["C_CONTIGUOUS"], key
        np.testing.assert_array_equal(got, expected, err_msg=key)


def assert_same_state(got: Any, expected: Any, where: str) -> None:
    if hasattr(expected, "keys"):
        assert set(got.keys()) == set(expected.keys()), where
        for name in expected.keys():
            assert_same_state(got[name], expected[name], f"{where}.{name}")
    elif isinstance(expected, (tuple, list, np.ndarray)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=where)
    else:
        assert got == expected, where


def snapshot(adata: ad.AnnData) -> dict[str, Any]:
    return {
        "obs": adata.obs.copy(deep=True),
        "obs_object": adata.obs,
        "var": adata.var.copy(deep=True),
        "X_object": adata.X,
        "X": copy.deepcopy(adata.X),
        "layers": {key: (value, copy.deepcopy(value)) for key, value in adata.layers.items()},
        "obsm": {key: (value, copy.deepcopy(value)) for key, value in adata.obsm.items()},
        "uns_keys": list(adata.uns.keys()),
    }


def assert_unchanged(adata: ad.AnnData, before: dict[str, Any]) -> None:
    assert adata.obs is before["obs_object"]
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    assert adata.X is before["X_object"]
    _assert_identical_matrix(adata.X, before["X"])
    assert list(adata.layers.keys()) == list(before["layers"])
    for key, (obj, saved) in before["layers"].items():
        assert adata.layers[key] is obj
        _assert_identical_matrix(adata.layers[key], saved)
    assert list(adata.obsm.keys()) == list(before["obsm"])
    for key, (obj, saved) in before["obsm"].items():
        if isinstance(saved, pd.DataFrame):
            pd.testing.assert_frame_equal(adata.obsm[key], saved)
        else:
            assert adata.obsm[key] is obj
            _assert_identical_matrix(adata.obsm[key], saved)
    assert list(adata.uns.keys()) == before["uns_keys"]


def _assert_identical_matrix(current: Any, saved: Any) -> None:
    if sp.issparse(saved):
        assert current.format == saved.format
        for part in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(current, part), getattr(saved, part))
    else:
        assert current.flags["F_CONTIGUOUS"] == saved.flags["F_CONTIGUOUS"]
        np.testing.assert_array_equal(current, saved)


# --- parity with scvi-tools ------------------------------------------------------------------


@pytest.mark.scvi
@pytest.mark.parametrize("x_format", ["dense", "csr", "csc"])
@pytest.mark.parametrize("layer", [None, "counts_int", "fortran"])
@pytest.mark.parametrize(
    ("setup_kwargs", "obsm_keys"),
    [({}, []), (FULL_SETUP, ["emb", "sparse_emb", "table"])],
    ids=["defaults", "all_fields"],
)
def test_matches_scvi_manager(x_format, layer, setup_kwargs, obsm_keys):
    adata = make_adata(x_format)
    reference = scvi_manager(adata.copy(), obsm_keys=obsm_keys, layer=layer, **setup_kwargs)
    registry = setup_anndata(adata, layer=layer, obsm_keys=obsm_keys, **setup_kwargs)

    assert set(registry.data_registry) == set(reference.data_registry.keys())
    for key in reference.data_registry.keys():
        expected_location = reference.data_registry[key]
        location = registry.data_registry[key]
        assert (location.attr_name, location.attr_key) == (
            expected_location.attr_name,
            expected_location.attr_key,
        ), key
        assert location["attr_name"] == expected_location["attr_name"]
        assert_same_data(registry.get_from_registry(key), reference.get_from_registry(key), key)

    assert dict(registry.summary_stats) == dict(reference.summary_stats.items())
    field_registries = reference.registry["field_registries"]
    for key in field_registries:
        assert_same_state(registry.get_state_registry(key), reference.get_state_registry(key), key)


@pytest.mark.scvi
@pytest.mark.parametrize("x_format", ["dense", "csr"])
def test_scvi_torch_dataset_accepts_registry(x_format):
    """scvi's own AnnTorchDataset reads our registry exactly as it reads its manager."""
    scvi_data = pytest.importorskip("scvi.data")
    adata = make_adata(x_format)
    reference = scvi_manager(adata.copy(), obsm_keys=["emb"], **FULL_SETUP)
    registry = setup_anndata(adata, obsm_keys=["emb"], **FULL_SETUP)
    rows = [5, 0, 17, 3, 59]
    got = scvi_data.AnnTorchDataset(registry)[rows]
    expected = scvi_data.AnnTorchDataset(reference)[rows]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.scvi
def test_default_batch_and_labels_match_scvi_zero_column():
    adata = make_adata("dense")
    reference = scvi_manager(adata.copy())
    registry = setup_anndata(adata)
    for key in (REGISTRY_KEYS.BATCH_KEY, REGISTRY_KEYS.LABELS_KEY):
        codes = registry.get_from_registry(key)
        assert_same_data(codes, reference.get_from_registry(key), key)
        assert codes.shape == (adata.n_obs, 1) and not codes.any()
        assert registry.get_state_registry(key)["original_key"] == f"_scvi_{key}"
    assert registry.summary_stats["n_batch"] == registry.summary_stats["n_labels"] == 1


# --- behaviour that needs no oracle ----------------------------------------------------------


@pytest.mark.parametrize("x_format", ["dense", "csr", "csc"])
def test_does_not_modify_adata(x_format):
    adata = make_adata(x_format)
    if x_format == "dense":
        adata.X = np.asfortranarray(adata.X)
    before = snapshot(adata)
    registry = setup_anndata(adata, obsm_keys=["emb", "sparse_emb", "table"], **FULL_SETUP)
    registry_fortran = setup_anndata(adata, layer="fortran")
    assert_unchanged(adata, before)
    assert registry.adata is adata
    assert not any(column.startswith("_scvi") for column in adata.obs.columns)
    # The row-major copies scvi would write into adata live in the registry instead.
    assert registry_fortran.get_from_registry("X").flags["C_CONTIGUOUS"]
    if x_format == "dense":
        assert adata.X.flags["F_CONTIGUOUS"]
        assert registry.get_from_registry("X").flags["C_CONTIGUOUS"]
    assert adata.layers["fortran"].flags["F_CONTIGUOUS"]
    assert registry.get_from_registry("emb").flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(registry.get_from_registry("emb"), adata.obsm["emb"])


def test_registry_is_a_snapshot_of_encoded_columns():
    adata = make_adata()
    registry = setup_anndata(adata, batch_key="batch")
    expected = registry.get_from_registry("batch").copy()
    adata.obs["batch"] = "changed"
    np.testing.assert_array_equal(registry.get_from_registry("batch"), expected)


def test_categorical_encoding_follows_pandas_categories():
    adata = make_adata()
    registry = setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    batch_mapping = registry.get_state_registry("batch")["categorical_mapping"]
    np.testing.assert_array_equal(batch_mapping, ["b0", "b1", "b2"])
    label_mapping = registry.get_state_registry("labels").categorical_mapping
    np.testing.assert_array_equal(label_mapping, ["nk", "t", "b", "unused"])
    codes = registry.get_from_registry("labels").ravel()
    np.testing.assert_array_equal(label_mapping[codes], adata.obs["cell_type"].to_numpy())
    assert registry.summary_stats["n_labels"] == 4  # unused categories count, as in scvi


def test_optional_fields_are_absent_when_not_requested():
    registry = setup_anndata(make_adata())
    assert set(registry.data_registry) == {"X", "batch", "labels"}
    assert registry.data_registry.X.attr_key is None
    with pytest.raises(KeyError, match="size_factor"):
        registry.get_from_registry("size_factor")
    assert registry.summary_stats["n_extra_categorical_covs"] == 0


def test_view_is_registered_like_its_copy():
    adata = make_adata("csr")
    view = adata[10:30]
    registry = setup_anndata(view, batch_key="batch")
    reference = setup_anndata(view.copy(), batch_key="batch")
    assert view.is_view
    for key in reference.data_registry:
        got, expected = registry.get_from_registry(key), reference.get_from_registry(key)
        if sp.issparse(expected):
            got, expected = got.toarray(), expected.toarray()
        np.testing.assert_array_equal(got, expected)


# --- as_registry -----------------------------------------------------------------------------


def test_as_registry_returns_valid_registries():
    registry = setup_anndata(make_adata())
    assert as_registry(registry) is registry


@pytest.mark.scvi
def test_as_registry_accepts_scvi_manager_and_rejects_unregistered_one():
    scvi_data = pytest.importorskip("scvi.data")
    manager = scvi_manager(make_adata())
    assert as_registry(manager) is manager
    with pytest.raises(TypeError, match="no AnnData registered"):
        as_registry(scvi_data.AnnDataManager(fields=[]))


def test_as_registry_rejects_non_registries():
    adata = make_adata()
    with pytest.raises(TypeError, match="setup_anndata"):
        as_registry(adata)
    with pytest.raises(TypeError, match="lacks adata, data_registry, get_from_registry"):
        as_registry(object())

    class NoLocations:
        def __init__(self) -> None:
            self.adata = adata
            self.data_registry = {"X": "not a location"}

        def get_from_registry(self, key: str) -> Any:
            return adata.X

    with pytest.raises(TypeError, match=r"data_registry\['X'\] must have attr_name and attr_key"):
        as_registry(NoLocations())


# --- validation errors -----------------------------------------------------------------------


def test_rejects_non_anndata():
    with pytest.raises(TypeError, match="anndata.AnnData"):
        setup_anndata(np.zeros((3, 3)))


def test_x_missing():
    adata = make_adata()
    adata.X = None
    with pytest.raises(ValueError, match=r"adata\.X is None.*counts_int"):
        setup_anndata(adata)
    assert setup_anndata(adata, layer="counts_int").data_registry["X"].attr_key == "counts_int"


def test_layer_missing_names_available_layers():
    # Exactly the named layers: anndata >= 0.13 also lists X itself among them, as None.
    with pytest.raises(ValueError, match=r"layer 'raw' not found.*layers: \['counts_int', 'fortran'\]\.$"):
        setup_anndata(make_adata(), layer="raw")


@pytest.mark.parametrize(
    "argument",
    [
        "batch_key",
        "labels_key",
        "size_factor_key",
        "categorical_covariate_keys",
        "continuous_covariate_keys",
    ],
)
def test_obs_key_missing_names_available_columns(argument):
    value = ["missing"] if argument.endswith("_keys") else "missing"
    with pytest.raises(ValueError, match=r"obs key 'missing' not found.*'batch', 'cell_type'"):
        setup_anndata(make_adata(), **{argument: value})


@pytest.mark.parametrize("argument", ["batch_key", "labels_key", "categorical_covariate_keys"])
def test_nan_in_categorical_column(argument):
    adata = make_adata()
    adata.obs["with_nan"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[[3, 7], adata.obs.columns.get_loc("with_nan")] = np.nan
    before = snapshot(adata)
    value = ["with_nan"] if argument.endswith("_keys") else "with_nan"
    with pytest.raises(ValueError, match=r"adata\.obs\['with_nan'\] has 2 missing"):
        setup_anndata(adata, **{argument: value})
    assert_unchanged(adata, before)


@pytest.mark.parametrize("argument", ["size_factor_key", "continuous_covariate_keys"])
def test_non_numeric_numerical_obs_column(argument):
    value = ["batch"] if argument.endswith("_keys") else "batch"
    # object with pandas < 3; str, pandas' default string dtype, from pandas 3 on.
    with pytest.raises(ValueError, match=r"adata\.obs\['batch'\] has dtype (object|str); expected a numeric"):
        setup_anndata(make_adata(), **{argument: value})


def test_x_rows_disagree_with_n_obs():
    adata = make_adata("dense", n_obs=10)
    # AnnData refuses such an X through its public setter, so plant it where it keeps X:
    # _X before anndata 0.13, the layer None from 0.13 on.
    planted = np.zeros((7, adata.n_vars), dtype=np.float32)
    if None in adata.layers.keys():
        adata.layers._data[None] = planted
    else:
        adata._X = planted
    assert adata.X is planted
    with pytest.raises(ValueError, match=r"adata\.X has 7 rows but adata has n_obs=10"):
        setup_anndata(adata)


@pytest.mark.parametrize(
    "bad_x", [np.full((4, 3), "a"), np.zeros((4, 3), dtype=object), np.zeros((4, 3), complex)]
)
def test_non_numeric_x(bad_x):
    adata = ad.AnnData(np.zeros((4, 3), dtype=np.float32))
    adata.layers["bad"] = bad_x
    with pytest.raises(ValueError, match=r"adata\.layers\['bad'\] has dtype"):
        setup_anndata(adata, layer="bad")


def _csr_with(indices: list[int], indptr: list[int], n_cols: int = 4) -> sp.csr_matrix:
    data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_cols))


def _summed(x: sp.csr_matrix) -> sp.csr_matrix:
    x = x.copy()
    x.sum_duplicates()
    return x


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (_csr_with([2, 0, 1, 3], [0, 2, 4]), "not in canonical format"),
        (_csr_with([1, 1, 3, 0], [0, 2, 4]), "not in canonical format"),
        (_summed(_csr_with([2, 0, 1, 3], [0, 2, 4])), None),
        (_summed(_csr_with([1, 1, 3, 0], [0, 2, 4])), None),
        (sp.csc_matrix(_csr_with([2, 0, 1, 3], [0, 2, 4]).T), "CSC"),
    ],
)
def test_non_canonical_sparse_x(x, message):
    adata = ad.AnnData(x)
    before = snapshot(adata)
    if message is None:
        setup_anndata(adata)
        return
    with pytest.raises(ValueError, match=rf"adata\.X.*{message}.*sum_duplicates\(\)"):
        setup_anndata(adata)
    assert_unchanged(adata, before)


def test_non_canonical_error_points_at_layer_and_fix():
    adata = ad.AnnData(np.zeros((2, 4), dtype=np.float32))
    adata.layers["raw"] = _csr_with([3, 0, 1, 2], [0, 2, 4])
    with pytest.raises(ValueError, match=r"adata\.layers\['raw'\].*sort_indices\(\)"):
        setup_anndata(adata, layer="raw")
    adata.layers["raw"].sum_duplicates()
    assert setup_anndata(adata, layer="raw").get_from_registry("X").has_canonical_format


def test_non_monotonic_indptr():
    x = _csr_with([0, 1, 2, 3], [0, 2, 4])
    adata = ad.AnnData(x)
    x.indptr[1] = 5  # 0, 5, 4: decreasing
    with pytest.raises(ValueError, match=r"adata\.X \(CSR\) has an indptr that is not non-decr"):
        setup_anndata(adata)


def test_sparse_indices_out_of_range():
    x = _csr_with([0, 1, 2, 3], [0, 2, 4])
    adata = ad.AnnData(x)
    x.indices[3] = 9
    with pytest.raises(ValueError, match=r"adata\.X \(CSR\) has column/row indices outside"):
        setup_anndata(adata)


def test_obsm_key_missing():
    with pytest.raises(ValueError, match=r"obsm key 'pca' not found.*'emb', 'sparse_emb', 'table'"):
        setup_anndata(make_adata(), obsm_keys=["pca"])


def test_obsm_rows_disagree_with_n_obs(monkeypatch):
    adata = make_adata(n_obs=10)
    # AnnData validates obsm on every access, so such an AnnData can only be forged.
    forged_obsm = {"emb": np.zeros((9, 2))}
    monkeypatch.setattr(ad.AnnData, "obsm", property(lambda self: forged_obsm))
    with pytest.raises(ValueError, match=r"adata\.obsm\['emb'\] has 9 rows but adata has n_obs=10"):
        setup_anndata(adata, obsm_keys=["emb"])


def test_obsm_keys_may_not_shadow_registry_keys():
    adata = make_adata()
    adata.obsm["batch"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(ValueError, match=r"obsm_keys \['batch'\] clash"):
        setup_anndata(adata, obsm_keys=["batch"])


def test_key_lists_must_be_lists_without_duplicates():
    with pytest.raises(TypeError, match="categorical_covariate_keys must be a list"):
        setup_anndata(make_adata(), categorical_covariate_keys="donor")
    with pytest.raises(ValueError, match=r"continuous_covariate_keys lists \['n_genes'\]"):
        setup_anndata(make_adata(), continuous_covariate_keys=["n_genes", "n_genes"])


def test_validation_precedes_encoding():
    """A bad field late in the argument list fails the call before any field is encoded."""
    adata = make_adata()
    before = snapshot(adata)
    with pytest.raises(ValueError, match="obsm key 'pca'"):
        setup_anndata(adata, obsm_keys=["pca"], **FULL_SETUP)
    assert_unchanged(adata, before)
    assert isinstance(setup_anndata(adata, **FULL_SETUP), AnnDataRegistry)
