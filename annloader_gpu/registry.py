"""A light data registry, duck-type compatible with scvi-tools' ``AnnDataManager``.

:func:`setup_anndata` mirrors ``scvi.model.SCVI.setup_anndata``: same registry keys, same
``attr_name``/``attr_key`` locations and the same categorical encoding, so a loader written
against an ``AnnDataManager`` works with either. Unlike scvi-tools it never writes into the
user's AnnData: encoded columns (``_scvi_batch`` and friends) live in the registry itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._device_arrays import is_cupy_array, is_cupy_sparse

__all__ = [
    "REGISTRY_KEYS",
    "AnnDataRegistry",
    "DataLocation",
    "RegistryLike",
    "as_registry",
    "setup_anndata",
]


class _RegistryKeys:
    """The registry key names scvi-tools uses (``scvi.REGISTRY_KEYS``)."""

    X_KEY = "X"
    BATCH_KEY = "batch"
    LABELS_KEY = "labels"
    SIZE_FACTOR_KEY = "size_factor"
    CAT_COVS_KEY = "extra_categorical_covs"
    CONT_COVS_KEY = "extra_continuous_covs"


REGISTRY_KEYS = _RegistryKeys()
_RESERVED_KEYS = frozenset(
    value for name, value in vars(_RegistryKeys).items() if name.endswith("_KEY")
)


class _FrozenAttrMapping(Mapping[str, Any]):
    """Read-only mapping that also allows ``mapping.key`` access, like scvi's ``attrdict``."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_items"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


@dataclass(frozen=True)
class DataLocation:
    """Where scvi-tools would find a registered field: ``getattr(adata, attr_name)[attr_key]``."""

    attr_name: str
    attr_key: str | None

    def __getitem__(self, item: str) -> str | None:
        # scvi-tools indexes data-registry entries like dicts: data_loc["attr_name"].
        if item not in ("attr_name", "attr_key"):
            raise KeyError(item)
        return getattr(self, item)


@runtime_checkable
class RegistryLike(Protocol):
    """What the loader needs from a registry: ours or scvi-tools' ``AnnDataManager``."""

    adata: Any

    @property
    def data_registry(self) -> Mapping[str, Any]: ...

    def get_from_registry(self, registry_key: str) -> Any: ...


class AnnDataRegistry:
    """Registered fields of one AnnData, with the encoded data held here rather than in ``adata``.

    Build it with :func:`setup_anndata`. ``get_from_registry`` returns what scvi-tools'
    ``AnnDataManager.get_from_registry`` would return after the same setup: the matrix for
    ``X``/layers/obsm, an ``(n_obs, 1)`` array for obs fields, and a ``DataFrame`` for the
    joint covariate fields.
    """

    def __init__(
        self,
        adata: AnnData,
        locations: Mapping[str, DataLocation],
        data: Mapping[str, Any],
        state_registries: Mapping[str, Mapping[str, Any]],
        summary_stats: Mapping[str, int],
    ) -> None:
        self.adata = adata
        self._data_registry = _FrozenAttrMapping(locations)
        self._data = dict(data)
        self._state_registries = {
            key: _FrozenAttrMapping(state) for key, state in state_registries.items()
        }
        self._summary_stats = _FrozenAttrMapping(summary_stats)

    @property
    def data_registry(self) -> Mapping[str, DataLocation]:
        return self._data_registry

    @property
    def summary_stats(self) -> Mapping[str, int]:
        """Counts such as ``n_cells``, ``n_vars``, ``n_batch``, named as in scvi-tools."""
        return self._summary_stats

    def get_from_registry(self, registry_key: str) -> Any:
        if registry_key not in self._data:
            raise KeyError(
                f"{registry_key!r} is not registered; registered keys: {sorted(self._data)}."
            )
        return self._data[registry_key]

    def get_state_registry(self, registry_key: str) -> Mapping[str, Any]:
        """Per-field state (e.g. ``categorical_mapping``), with scvi-tools' key names."""
        if registry_key not in self._state_registries:
            raise KeyError(
                f"{registry_key!r} has no state registry; known keys: "
                f"{sorted(self._state_registries)}."
            )
        return self._state_registries[registry_key]

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{key}=adata.{loc.attr_name}" + (f"[{loc.attr_key!r}]" if loc.attr_key else "")
            for key, loc in self._data_registry.items()
        )
        return f"AnnDataRegistry(n_obs={self.adata.n_obs}, {fields})"


def as_registry(adata_manager_or_registry: Any) -> RegistryLike:
    """Return the argument if it can serve as a registry (ours or an ``AnnDataManager``)."""
    candidate = adata_manager_or_registry
    if isinstance(candidate, AnnDataRegistry):
        return candidate
    if isinstance(candidate, AnnData):
        raise TypeError(
            "Expected a registry, got an AnnData. Register it first with "
            "annloader_gpu.registry.setup_anndata(adata, ...) or scvi-tools' setup_anndata."
        )
    if _has_attr(candidate, "adata") and candidate.adata is None:
        raise TypeError(
            f"{type(candidate).__name__} has no AnnData registered (adata is None); "
            "call its register_fields/setup_anndata first."
        )
    required = ("adata", "data_registry", "get_from_registry")
    missing = [name for name in required if not _has_attr(candidate, name)]
    if missing:
        raise TypeError(
            f"{type(candidate).__name__} is not a registry: it lacks {', '.join(missing)}. "
            "Pass an AnnDataRegistry from annloader_gpu.registry.setup_anndata or a registered "
            "scvi-tools AnnDataManager."
        )
    if not callable(candidate.get_from_registry):
        raise TypeError(f"{type(candidate).__name__}.get_from_registry is not callable.")
    data_registry = candidate.data_registry
    # scvi's data_registry is an ml_collections FrozenConfigDict, which is not a Mapping.
    is_mapping_like = callable(getattr(data_registry, "items", None)) and hasattr(
        data_registry, "__getitem__"
    )
    if not is_mapping_like:
        raise TypeError(
            f"{type(candidate).__name__}.data_registry must map registry keys to locations, "
            f"got {type(data_registry).__name__}."
        )
    for key, location in data_registry.items():
        if not (_has_attr(location, "attr_name") and _has_attr(location, "attr_key")):
            raise TypeError(
                f"data_registry[{key!r}] must have attr_name and attr_key, "
                f"got {type(location).__name__}."
            )
    return candidate


def _has_attr(obj: Any, name: str) -> bool:
    # scvi's AnnDataManager raises AssertionError (not AttributeError) from data_registry
    # while nothing is registered, which plain hasattr() would let escape.
    try:
        getattr(obj, name)
    except (AttributeError, AssertionError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# setup_anndata


def setup_anndata(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    obsm_keys: Sequence[str] | None = None,
) -> AnnDataRegistry:
    """Register ``adata`` with the fields of ``scvi.model.SCVI.setup_anndata``; never modifies it.

    ``obsm_keys`` additionally registers ``adata.obsm[key]`` under registry key ``key``
    (scvi-tools' ``ObsmField(key, key)``). Everything is validated before anything is encoded.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"adata must be an anndata.AnnData, got {type(adata).__name__}.")
    cat_cov_keys = _as_key_list(categorical_covariate_keys, "categorical_covariate_keys")
    cont_cov_keys = _as_key_list(continuous_covariate_keys, "continuous_covariate_keys")
    obsm_keys = _as_key_list(obsm_keys, "obsm_keys")

    x_matrix = _validated_x(adata, layer)
    categorical_obs_keys = [key for key in (batch_key, labels_key) if key is not None]
    numerical_obs_keys = [size_factor_key] if size_factor_key is not None else []
    for key in (*categorical_obs_keys, *cat_cov_keys, *numerical_obs_keys, *cont_cov_keys):
        _require_obs_column(adata, key)
    for key in (*categorical_obs_keys, *cat_cov_keys):
        _require_no_missing_categories(adata.obs[key], key)
    for key in (*numerical_obs_keys, *cont_cov_keys):
        _require_numeric_column(adata.obs[key], key)
    obsm_matrices = {key: _validated_obsm(adata, key) for key in obsm_keys}

    fields = {
        REGISTRY_KEYS.X_KEY: _layer_field(adata, layer, x_matrix),
        REGISTRY_KEYS.BATCH_KEY: _categorical_obs_field(adata, REGISTRY_KEYS.BATCH_KEY, batch_key),
        REGISTRY_KEYS.LABELS_KEY: _categorical_obs_field(
            adata, REGISTRY_KEYS.LABELS_KEY, labels_key
        ),
        REGISTRY_KEYS.SIZE_FACTOR_KEY: _numerical_obs_field(adata, size_factor_key),
        REGISTRY_KEYS.CAT_COVS_KEY: _categorical_joint_field(adata, cat_cov_keys),
        REGISTRY_KEYS.CONT_COVS_KEY: _numerical_joint_field(adata, cont_cov_keys),
    }
    fields.update({key: _obsm_field(key, matrix) for key, matrix in obsm_matrices.items()})

    # Like scvi-tools, an empty optional field keeps its (empty) state and summary stats but
    # has no data-registry entry.
    registered = {key: field for key, field in fields.items() if field.location is not None}
    summary_stats: dict[str, int] = {}
    for field in fields.values():
        summary_stats.update(field.summary_stats)
    return AnnDataRegistry(
        adata,
        locations={key: field.location for key, field in registered.items()},
        data={key: field.data for key, field in registered.items()},
        state_registries={key: field.state for key, field in fields.items()},
        summary_stats=summary_stats,
    )


@dataclass(frozen=True)
class _Field:
    location: DataLocation | None
    data: Any
    state: dict[str, Any]
    summary_stats: dict[str, int]



def _layer_field(adata: AnnData, layer: str | None, matrix: Any) -> _Field:
    location = DataLocation("X", None) if layer is None else DataLocation("layers", layer)
    state = {
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "column_names": np.asarray(adata.var_names),
    }
    return _Field(
        location, _row_major(matrix), state, {"n_vars": adata.n_vars, "n_cells": adata.n_obs}
    )


def _categorical_obs_field(adata: AnnData, registry_key: str, obs_key: str | None) -> _Field:
    encoded_key = f"_scvi_{registry_key}"
    if obs_key is None:
        # scvi-tools registers an all-zero int64 column and encodes it like any other.
        column = pd.Series(np.zeros(adata.n_obs, dtype=np.int64), index=adata.obs_names)
    else:
        column = adata.obs[obs_key]
    codes, mapping = _encode_categorical(column)
    state = {"categorical_mapping": mapping, "original_key": obs_key or encoded_key}
    return _Field(
        DataLocation("obs", encoded_key),
        codes.reshape(-1, 1),
        state,
        {f"n_{registry_key}": len(np.unique(mapping))},
    )


def _numerical_obs_field(adata: AnnData, obs_key: str | None) -> _Field:
    if obs_key is None:
        return _Field(None, None, {}, {})
    values = adata.obs[obs_key].to_numpy(copy=True).reshape(-1, 1)
    return _Field(DataLocation("obs", obs_key), values, {}, {})


def _categorical_joint_field(adata: AnnData, obs_keys: list[str]) -> _Field:
    summary_stats = {f"n_{REGISTRY_KEYS.CAT_COVS_KEY}": len(obs_keys)}
    if not obs_keys:
        return _Field(None, None, {}, summary_stats)
    encoded, mappings = {}, {}
    for key in obs_keys:
        encoded[key], mappings[key] = _encode_categorical(adata.obs[key])
    state = {
        "mappings": mappings,
        "field_keys": tuple(obs_keys),
        "n_cats_per_key": tuple(len(mappings[key]) for key in obs_keys),
    }
    return _Field(
        DataLocation("obsm", f"_scvi_{REGISTRY_KEYS.CAT_COVS_KEY}"),
        pd.DataFrame(encoded, index=adata.obs_names.copy()),
        state,
        summary_stats,
    )


def _numerical_joint_field(adata: AnnData, obs_keys: list[str]) -> _Field:
    summary_stats = {f"n_{REGISTRY_KEYS.CONT_COVS_KEY}": len(obs_keys)}
    if not obs_keys:
        return _Field(None, None, {}, summary_stats)
    return _Field(
        DataLocation("obsm", f"_scvi_{REGISTRY_KEYS.CONT_COVS_KEY}"),
        adata.obs[obs_keys].copy(),
        {"columns": np.asarray(obs_keys, dtype=object)},
        summary_stats,
    )


def _obsm_field(key: str, matrix: Any) -> _Field:
    if isinstance(matrix, pd.DataFrame):
        column_names: tuple | np.ndarray = tuple(matrix.columns)
    else:
        column_names = np.arange(matrix.shape[1])
    return _Field(
        DataLocation("obsm", key),
        _row_major(matrix),
        {"column_names": column_names},
        {f"n_{key}": len(column_names)},
    )


def _as_key_list(keys: Sequence[str] | None, argument: str) -> list[str]:
    if keys is None:
        return []
    if isinstance(keys, str):
        raise TypeError(
            f"{argument} must be a list of keys, got the string {keys!r}; use [{keys!r}]."
        )
    keys = list(keys)
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"{argument} lists {duplicates} more than once.")
    if argument == "obsm_keys":
        reserved = sorted(set(keys) & _RESERVED_KEYS)
        if reserved:
            raise ValueError(
                f"obsm_keys {reserved} clash with scvi-tools registry keys "
                f"{sorted(_RESERVED_KEYS)}; rename those obsm entries."
            )
    return keys


def named_layers(adata: AnnData) -> list[str]:
    """adata's layer names (anndata >= 0.13 also lists X itself, as the layer None)."""
    return [key for key in adata.layers.keys() if key is not None]


def _validated_x(adata: AnnData, layer: str | None) -> Any:
    if layer is None:
        if adata.X is None:
            raise ValueError(
                "adata.X is None: X has no data to register. Pass layer=... naming one of "
                f"adata.layers {named_layers(adata)}, or set adata.X."
            )
        return _validated_matrix(adata.X, "adata.X", adata.n_obs)
    layers = named_layers(adata)
    if layer not in layers:
        raise ValueError(f"layer {layer!r} not found in adata.layers; available layers: {layers}.")
    return _validated_matrix(adata.layers[layer], f"adata.layers[{layer!r}]", adata.n_obs)


def _validated_obsm(adata: AnnData, key: str) -> Any:
    if key not in adata.obsm:
        raise ValueError(
            f"obsm key {key!r} not found in adata.obsm; available keys: {list(adata.obsm.keys())}."
        )
    return _validated_matrix(adata.obsm[key], f"adata.obsm[{key!r}]", adata.n_obs)


def _validated_matrix(matrix: Any, where: str, n_obs: int) -> Any:
    """Check shape, dtype and (for sparse) index structure; return the matrix unchanged."""
    if isinstance(matrix, pd.DataFrame):
        non_numeric = [str(c) for c, dtype in matrix.dtypes.items() if not _is_real_dtype(dtype)]
        if non_numeric:
            raise ValueError(f"{where} has non-numeric columns {non_numeric}.")
    elif sp.issparse(matrix):
        if matrix.format not in ("csr", "csc"):
            raise TypeError(
                f"{where} is a {matrix.format.upper()} sparse matrix; only CSR and CSC are "
                "supported. Convert it with .tocsr()."
            )
        _require_real_dtype(matrix.dtype, where)
    elif isinstance(matrix, np.ndarray) or is_cupy_array(matrix):
        _require_real_dtype(matrix.dtype, where)
        if matrix.ndim != 2:
            raise ValueError(f"{where} must be 2-dimensional, got shape {matrix.shape}.")
    elif is_cupy_sparse(matrix):  # in GPU memory (rapids-singlecell): checked there
        if matrix.format not in ("csr", "csc"):
            raise TypeError(
                f"{where} is a {matrix.format.upper()} sparse matrix; only CSR and CSC are "
                "supported. Convert it with .tocsr()."
            )
        _require_real_dtype(matrix.dtype, where)
    else:
        raise TypeError(
            f"{where} is a {type(matrix).__module__}.{type(matrix).__name__}; expected an "
            "in-memory numpy array or scipy CSR/CSC matrix, or a cupy array or cupyx CSR/CSC "
            "matrix in GPU memory (for backed AnnData, use adata.to_memory())."
        )
    if matrix.shape[0] != n_obs:
        raise ValueError(f"{where} has {matrix.shape[0]} rows but adata has n_obs={n_obs}.")
    if sp.issparse(matrix):
        _require_canonical_compressed(matrix, where)
    elif is_cupy_sparse(matrix):
        _require_canonical_device_compressed(matrix, where)
    return matrix


def _row_major(matrix: Any) -> Any:
    if isinstance(matrix, np.ndarray) and not matrix.flags["C_CONTIGUOUS"]:
        # scvi-tools overwrites the user's array with a C-contiguous copy; we keep the copy here.
        return np.ascontiguousarray(matrix)
    return matrix


def _is_real_dtype(dtype: Any) -> bool:
    return pd.api.types.is_bool_dtype(dtype) or (
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
    )


def _require_real_dtype(dtype: np.dtype, where: str) -> None:
    if not _is_real_dtype(dtype):
        raise ValueError(
            f"{where} has dtype {dtype}; expected a real numeric (int, float or bool) dtype."
        )


def _require_canonical_compressed(matrix: Any, where: str) -> None:
    """Kernels index rows through indptr and gather by indices, so these must be well formed."""
    fmt = matrix.format.upper()
    n_major, n_minor = matrix.shape if matrix.format == "csr" else matrix.shape[::-1]
    indptr, indices = np.asarray(matrix.indptr), np.asarray(matrix.indices)
    if len(indptr) != n_major + 1:
        raise ValueError(
            f"{where} ({fmt}) has an indptr of length {len(indptr)}, expected {n_major + 1}; "
            "the matrix is corrupt, rebuild it from its source data."
        )
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] > len(indices):
        raise ValueError(
            f"{where} ({fmt}) has an indptr that is not non-decreasing from 0 to at most "
            f"nnz={len(indices)}; the matrix is corrupt, rebuild it from its source data."
        )
    data = np.asarray(matrix.data)
    if data.ndim != 1 or len(data) < indptr[-1]:
        raise ValueError(
            f"{where} ({fmt}) has {len(data)} stored values for nnz={int(indptr[-1])} indices; "
            "the matrix is corrupt, rebuild it from its source data."
        )
    stored = indices[: indptr[-1]]
    if len(stored) and (stored.min() < 0 or stored.max() >= n_minor):
        raise ValueError(
            f"{where} ({fmt}) has column/row indices outside [0, {n_minor}); the matrix is "
            "corrupt, rebuild it from its source data."
        )
    if not matrix.has_canonical_format:
        raise ValueError(
            f"{where} ({matrix.format.upper()}) is not in canonical format (unsorted or duplicate "
            "indices). Fix it with X.sum_duplicates() (which also sorts indices), or "
            "X.sort_indices() if there are no duplicates, on a copy if you need the original."
        )


def _require_canonical_device_compressed(matrix: Any, where: str) -> None:
    """The checks of _require_canonical_compressed for a cupyx matrix, run on its GPU with torch."""
    from .tensor_sources import check_sparse_tensors, cupy_sparse_parts

    indptr, indices, data, fmt = cupy_sparse_parts(matrix, where)
    check_sparse_tensors(indptr, indices, data, tuple(matrix.shape), fmt, where)


def _require_obs_column(adata: AnnData, key: str) -> None:
    if key not in adata.obs.columns:
        raise ValueError(
            f"obs key {key!r} not found in adata.obs; available columns: {list(adata.obs.columns)}."
        )


def _require_no_missing_categories(column: pd.Series, key: str) -> None:
    n_missing = int(column.isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{key!r}] has {n_missing} missing (NaN) values; a categorical field must be "
            "fully observed. Fill them, e.g. with an explicit 'unknown' category."
        )


def _require_numeric_column(column: pd.Series, key: str) -> None:
    if not _is_real_dtype(column.dtype):
        raise ValueError(f"adata.obs[{key!r}] has dtype {column.dtype}; expected a numeric column.")


def _encode_categorical(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes and category mapping exactly as scvi-tools' ``_make_column_categorical`` makes them."""
    categorical = column.astype("category")
    codes = categorical.cat.codes.to_numpy(copy=True)
    mapping = categorical.cat.categories.to_numpy(copy=True)
    return codes, mapping
