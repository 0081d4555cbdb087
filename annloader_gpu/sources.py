"""Registry data to storage: one entry point, :func:`build_storage`, for every kind of source.

Host data goes to :mod:`annloader_gpu.host_sources`, tensors and CuPy data to
:mod:`annloader_gpu.tensor_sources`. Storage is cached per source object (identity, shape, nnz
and, for tensors, the arrays' addresses are checked), so train, validation and test loaders over
one AnnData share one prepared copy while any of them holds it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._device_arrays import is_cupy_array, is_cupy_sparse
from .host_sources import _dense_storage, _sparse_storage
from .storage import CsrStorage, DenseStorage, HostFallbackStorage
from .tensor_sources import _cupy_dense_storage, _cupy_sparse_storage, _torch_storage

__all__ = ["build_storage"]


def _data_pointer(array: Any) -> int:
    """The address of a CuPy array's or a tensor's first element (0 when it has none)."""
    if isinstance(array, torch.Tensor):
        return int(array.data_ptr())
    return int(array.data.ptr)


def _source_identity(source: Any) -> tuple:
    nnz, arrays = -1, ()
    if sp.issparse(source):
        nnz = int(source.nnz)
    elif is_cupy_sparse(source):
        # No synchronisation: cupyx's nnz is the values' length. The arrays' addresses tell a
        # matrix whose arrays were replaced (eliminate_zeros(), data = ...) from the one cached.
        nnz = int(source.data.size)
        arrays = tuple(_data_pointer(a) for a in (source.indptr, source.indices, source.data))
    elif isinstance(source, torch.Tensor):
        if source.layout in (torch.sparse_csr, torch.sparse_csc):
            nnz, address = int(source._nnz()), _data_pointer(source.values())
        else:
            address = _data_pointer(source) if source.layout == torch.strided else 0
        arrays = (str(source.layout), str(source.device), address)
    return (id(source), tuple(source.shape), nnz, getattr(source, "format", None), str(getattr(source, "dtype", "")),
            arrays)


_STORAGE_CACHE: dict[tuple, tuple] = {}  # key -> (weakref to the source, weakref to its storage)
_CACHE_LOCK = threading.Lock()


def _cached_storage(source: Any, build) -> Any:
    """Storage for source, shared while source is alive and unchanged (identity, shape, nnz) and
    some loader still holds the storage.

    The cache owns nothing: storage often holds the source itself (a dense array used in place
    is a view of it; a tensor over a CuPy array keeps the array alive), so a strong reference
    here would keep the source, and its GPU memory, alive for the life of the process.
    """
    key = _source_identity(source)
    try:
        ref = weakref.ref(source)
    except TypeError:
        return build()
    with _CACHE_LOCK:
        for stale in [k for k, (r, s) in _STORAGE_CACHE.items() if r() is None or s() is None]:
            del _STORAGE_CACHE[stale]
        hit = _STORAGE_CACHE.get(key)
        if hit is not None and hit[0]() is source:
            storage = hit[1]()
            if storage is not None:
                return storage
    storage = build()
    with _CACHE_LOCK:
        _STORAGE_CACHE[key] = (ref, weakref.ref(storage))
    return storage


def build_storage(data: Any, where: str, n_obs: int) -> DenseStorage | CsrStorage | HostFallbackStorage:
    """Validated, compact storage for one registry entry (cached per source object)."""
    if sp.issparse(data):
        storage = _cached_storage(data, lambda: _sparse_storage(data, where))
    elif isinstance(data, pd.DataFrame):
        non_numeric = [str(c) for c, dt in data.dtypes.items() if not _numeric_dtype_like(dt)]
        if non_numeric:
            raise ValueError(f"{where} has non-numeric columns {non_numeric}")
        storage = _dense_storage(data.to_numpy(), where)
    elif isinstance(data, pd.Series):
        storage = _dense_storage(data.to_numpy(), where)
    elif isinstance(data, np.ndarray):
        storage = _cached_storage(data, lambda: _dense_storage(data, where))
    elif is_cupy_sparse(data):  # in GPU memory (rapids-singlecell): used there, no host round trip
        storage = _cached_storage(data, lambda: _cupy_sparse_storage(data, where))
    elif is_cupy_array(data):
        storage = _cached_storage(data, lambda: _cupy_dense_storage(data, where))
    elif isinstance(data, torch.Tensor):  # strided, sparse CSR or sparse CSC; on any device
        storage = _cached_storage(data, lambda: _torch_storage(data, where))
    else:
        raise TypeError(
            f"{where} is a {type(data).__module__}.{type(data).__name__}; expected an in-memory numpy "
            "array, pandas DataFrame or scipy CSR/CSC matrix, or data in GPU memory: a cupy array, a cupyx "
            "CSR/CSC matrix or a torch tensor (for backed AnnData, use adata.to_memory())"
        )
    if storage.n_rows != n_obs:
        raise ValueError(f"{where} has {storage.n_rows} rows but the AnnData has n_obs={n_obs}")
    return storage


def _numeric_dtype_like(dtype: Any) -> bool:
    return pd.api.types.is_bool_dtype(dtype) or (
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
    )
