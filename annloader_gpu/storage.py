"""Storage: the arrays a field gathers from, on one device, and how it is placed.

A :class:`DenseStorage` is a C-contiguous ``(n_rows, n_cols)`` array; a :class:`CsrStorage` holds
CSR arrays (compact dtypes, see :mod:`annloader_gpu.compact`); a :class:`HostFallbackStorage`
keeps a source the kernels cannot read, sliced on the host as scvi-tools does. Arrays are numpy
(host) or torch tensors (pinned host memory or a GPU). ``storage.to(device)`` gives the storage
placed there -- itself where it already is, else one copy shared by every loader that asks while
any of them holds it -- and ``storage.bound(device)`` the kernels' checked binding of its arrays.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from . import kernels
from .pinned import pinned_copy

__all__ = ["CsrStorage", "DenseStorage", "HostFallbackStorage", "torch_dtype"]

_NUMPY_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.bool_): torch.bool,
}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    try:
        return _NUMPY_TO_TORCH[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no torch dtype for numpy dtype {dtype}") from None


# --------------------------------------------------------------------------------------------
# Storage: the arrays a field gathers from, on one device


def _to_device(array: np.ndarray | torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    if pin:  # page-locked host memory that kernels on device read in place
        return pinned_copy(array, device)
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    return tensor.to(device)


def _placed_copy(storage: Any, device: torch.device, pin: bool, build) -> Any:
    """storage placed on device (or pinned), shared by every caller while someone holds it."""
    placed = storage.__dict__.setdefault("_placed", {})
    key = (str(device), bool(pin))
    ref = placed.get(key)
    copy_ = ref() if ref is not None else None
    if copy_ is None:
        copy_ = build()
        placed[key] = weakref.ref(copy_)
    return copy_


def _serves_as_is(storage: Any, device: torch.device, pin: bool) -> bool:
    """Whether storage can be used for device (pinned host memory if pin) without a copy.

    Host storage serves the CPU; storage in GPU memory (a CuPy or CUDA-tensor source used in
    place) serves its own GPU. GPU storage is never pinned: pinning is for host memory.
    """
    here = storage.device
    if here.type == "cuda":
        if pin:
            raise ValueError(
                f"the data is already in GPU memory ({here}) and cannot be placed in pinned host memory; "
                "use residency='device' (it is used in place)"
            )
        if device.type != "cuda":
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return index == here.index
    return device.type == "cpu" and not pin


def _bound_for(storage: Any, device: torch.device, build) -> Any:
    cache = storage.__dict__.setdefault("_bound", {})
    bound = cache.get(device)
    if bound is None:
        bound = cache[device] = build()
    return bound


def _nbytes(array: np.ndarray | torch.Tensor) -> int:
    if isinstance(array, np.ndarray):
        return int(array.nbytes)
    return int(array.numel() * array.element_size())


class DenseStorage:
    """A C-contiguous ``(n_rows, n_cols)`` array (numpy or torch, any device)."""

    kind = "dense"

    def __init__(self, values: np.ndarray | torch.Tensor, *, squeeze: bool = False):
        self.values = values
        self.n_rows, self.n_cols = (int(s) for s in values.shape)
        self.squeeze = squeeze  # the source was 1-D: batches are (B,), as scvi-tools yields

    @property
    def device(self) -> torch.device:
        return self.values.device if isinstance(self.values, torch.Tensor) else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)

    @property
    def value_dtype(self) -> str:
        return kernels.dtype_name(self.values)

    def bound(self, device: torch.device) -> kernels.BoundDense:
        """The storage bound for kernels running on device (checked once, then cached)."""
        return _bound_for(self, device, lambda: kernels.BoundDense(self.values, device=device))

    def to(self, device: torch.device | str, *, pin: bool = False) -> DenseStorage:
        """This storage on device: itself where it already is, else a (shared) copy."""
        device = torch.device(device)
        if _serves_as_is(self, device, pin):
            return self
        return _placed_copy(self, device, pin,
                            lambda: DenseStorage(_to_device(self.values, device, pin), squeeze=self.squeeze))


class CsrStorage:
    """CSR arrays (numpy or torch, any device) plus what sparse outputs need to mimic scipy."""

    kind = "csr"

    def __init__(self, indptr, indices, values, n_rows: int, n_cols: int, *, source_format: str = "csr",
                 batch_index_dtype: np.dtype | type = np.int32):
        self.indptr, self.indices, self.values = indptr, indices, values
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self.source_format = source_format  # "csr" or "csc": the layout of sparse outputs
        # Index dtype scipy gives a row slice of the source (sparse outputs use the same).
        self.batch_index_dtype = np.dtype(batch_index_dtype)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.values.device if isinstance(self.values, torch.Tensor) else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return _nbytes(self.indptr) + _nbytes(self.indices) + _nbytes(self.values)

    @property
    def bytes_per_nonzero(self) -> float:
        return self.nbytes / max(self.nnz, 1)

    @property
    def value_dtype(self) -> str:
        return kernels.dtype_name(self.values)

    def bound(self, device: torch.device) -> kernels.BoundCsr:
        """The matrix bound for kernels running on device (checked once, then cached)."""
        return _bound_for(self, device, lambda: kernels.BoundCsr(self.indptr, self.indices, self.values,
                                                                 self.n_cols, device=device, validate=False))

    def to(self, device: torch.device | str, *, pin: bool = False) -> CsrStorage:
        """This storage on device: itself where it already is, else a (shared) copy."""
        device = torch.device(device)
        if _serves_as_is(self, device, pin):
            return self
        return _placed_copy(self, device, pin, lambda: CsrStorage(
            _to_device(self.indptr, device, pin), _to_device(self.indices, device, pin),
            _to_device(self.values, device, pin), self.n_rows, self.n_cols,
            source_format=self.source_format, batch_index_dtype=self.batch_index_dtype,
        ))


class HostFallbackStorage:
    """A source the kernels cannot read (exotic dtypes): sliced with numpy/scipy as scvi-tools does."""

    kind = "fallback"

    def __init__(self, source: Any):
        self.source = source
        self.n_rows = int(source.shape[0])

    device = torch.device("cpu")

    @property
    def nbytes(self) -> int:
        if sp.issparse(self.source):
            return int(self.source.data.nbytes + self.source.indices.nbytes + self.source.indptr.nbytes)
        return int(np.asarray(self.source).nbytes)

    def to(self, device, *, pin: bool = False) -> HostFallbackStorage:
        return self  # gathered on the host, then copied
