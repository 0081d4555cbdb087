"""Storage from data already in tensors: CuPy / cupyx data in GPU memory, torch tensors on any device.

One builder, written in torch ops, serves them all: it validates the arrays where they live (no
host round trip for GPU data), with the rules and messages of the host path
(:mod:`annloader_gpu.host_sources`), and keeps the user's values where the kernels can read them
as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import host_sources, kernels
from ._device_arrays import cupy_to_torch
from .host_sources import _require_numeric
from .storage import CsrStorage, DenseStorage, torch_dtype

from .compact import compact_index_dtype, compact_indptr_dtype


# --------------------------------------------------------------------------------------------
# Sources already in tensors: CuPy / cupyx data in GPU memory, torch tensors on any device
#
# One builder, written in torch ops, serves them all: it validates where the arrays live (no
# host round trip for GPU data) with the rules and messages of _check_compressed, and keeps the
# user's values where the kernels can read them as they are.

_TORCH_UINT16, _TORCH_UINT32, _TORCH_UINT64 = torch.uint16, torch.uint32, torch.uint64  # torch >= 2.3
_TORCH_INTEGER_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                   _TORCH_UINT16, _TORCH_UINT32, _TORCH_UINT64})
_TORCH_KERNEL_VALUE_DTYPES = frozenset(
    t for t, name in kernels._TORCH_DTYPE_NAMES.items() if name in kernels.VALUE_DTYPES
)


def _tensor_kind(dtype: torch.dtype) -> str | None:
    """numpy's dtype.kind for a torch dtype: "b", "i" (signed or not) or "f"; None for the rest."""
    if dtype == torch.bool:
        return "b"
    if dtype in _TORCH_INTEGER_DTYPES:
        return "i"
    if dtype.is_floating_point:
        return "f"
    return None  # complex, quantized


def _dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype named as numpy names it ("float32", not "torch.float32"), for messages."""
    return str(dtype).removeprefix("torch.")


def _require_numeric_tensor(tensor: torch.Tensor, where: str) -> None:
    if _tensor_kind(tensor.dtype) is None:
        raise ValueError(
            f"{where} has dtype {_dtype_name(tensor.dtype)}; expected a real numeric (int, float or bool) dtype"
        )


def _exact_int64(tensor: torch.Tensor) -> torch.Tensor:
    """A new int64 tensor holding tensor's integers exactly (uint64 above 2**63 - 1 become negative).

    The unsigned types torch supports only partly are reinterpreted as the signed type of their
    width and masked, so only operations every torch build has on every device are used.
    """
    if tensor.dtype == _TORCH_UINT64:
        return tensor.view(torch.int64).clone()
    if tensor.dtype == _TORCH_UINT32:
        return tensor.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if tensor.dtype == _TORCH_UINT16:
        return tensor.view(torch.int16).to(torch.int64) & 0xFFFF
    return tensor.to(torch.int64, copy=True)


def _index_sink(out: torch.Tensor) -> torch.Tensor:
    """What to copy int64 indices into to fill out: a uint16 tensor is filled through its int16 view.

    Indices below 65,536 narrowed to int16 keep their low 16 bits, which read back as uint16 are
    the indices themselves; this avoids casts to uint16, which not every torch build has on CUDA.
    """
    return out.view(torch.int16) if out.dtype == _TORCH_UINT16 else out


def _narrowed_indices(indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32/int64 indices, all in range for dtype, as dtype (the same tensor when it already is)."""
    if indices.dtype == dtype:
        return indices
    out = torch.empty(indices.shape, dtype=dtype, device=indices.device)
    _index_sink(out).copy_(indices)
    return out


def _storable_tensor(values: torch.Tensor, where: str) -> torch.Tensor:
    """values in a dtype the kernels read: the same tensor when they already can, else an exact copy."""
    dtype = values.dtype
    if dtype in _TORCH_KERNEL_VALUE_DTYPES:
        return values
    if dtype == torch.bool:
        return values.to(torch.uint8)
    if dtype in (torch.int8, torch.int16):
        return values.to(torch.int32)
    if dtype == _TORCH_UINT32:
        return _exact_int64(values)
    if dtype == _TORCH_UINT64:
        as_signed = values.view(torch.int64)
        if as_signed.numel() and bool((as_signed < 0).any()):
            raise ValueError(f"{where} has uint64 values above {2**63 - 1}; the kernels cannot read them exactly")
        return as_signed  # the same bits, read as int64: still the user's memory
    if dtype.is_floating_point:  # bfloat16, float8 variants: float32 holds every one exactly
        return values.to(torch.float32)
    raise ValueError(f"{where} has dtype {_dtype_name(dtype)}; expected a real numeric (int, float or bool) dtype")


def _require_kernel_device(device: torch.device, where: str) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} is in {device} memory; the kernels read CPU or CUDA memory (use .cpu())")


def _check_indptr_tensor(indptr: torch.Tensor, indices: torch.Tensor, n_major: int, where: str,
                         fmt: str) -> tuple[torch.Tensor, int]:
    """The indptr half of :func:`_check_compressed`, on torch tensors where they live.

    Returns (a new int64 copy of indptr, nnz). Callers keep that copy, not the user's array: what
    the kernels trust is what was checked, and an in-place edit of the user's indptr after set-up
    cannot reach it.
    """
    fmt_name = fmt.upper()
    length = int(indptr.shape[0]) if indptr.ndim else 0
    if indptr.ndim != 1 or length != n_major + 1:
        raise ValueError(f"{where} ({fmt_name}) has an indptr of length {length}; expected {n_major + 1}")
    if _tensor_kind(indptr.dtype) != "i" or _tensor_kind(indices.dtype) != "i":
        raise ValueError(f"{where} ({fmt_name}) has non-integer index arrays "
                         f"({_dtype_name(indptr.dtype)}, {_dtype_name(indices.dtype)})")
    if indices.ndim != 1:
        raise ValueError(f"{where} ({fmt_name}) has indices of shape {tuple(indices.shape)}; expected 1-D")
    n_indices = int(indices.shape[0])
    ptr = _exact_int64(indptr)
    first, nnz = torch.stack((ptr[0], ptr[-1])).tolist()
    decreasing = bool((ptr[1:] < ptr[:-1]).any()) if n_major else False
    if first != 0 or nnz > n_indices or decreasing:
        raise ValueError(
            f"{where} ({fmt_name}) has an indptr that is not non-decreasing from 0 to at most "
            f"nnz={n_indices}; the matrix is corrupt"
        )
    return ptr, int(nnz)


def _check_minor_indices_tensor(ptr: torch.Tensor, indices: torch.Tensor, nnz: int, n_minor: int, where: str,
                                fmt: str, *, out: torch.Tensor | None = None) -> None:
    """The index half of :func:`_check_compressed` (range, strictly increasing within each row).

    ptr is the validated int64 indptr. Scans indices[:nnz] in blocks (no full-size temporaries).
    With out (length nnz), each checked block is also copied there, converted to out's dtype: the
    stored indices are exactly the checked ones, with no second full-size copy.
    """
    minor = "column" if fmt == "csr" else "row"
    fmt_name = fmt.upper()
    sink = _index_sink(out) if out is not None else None
    block_size = host_sources._SCAN_BLOCK  # one setting for both validators (tests shrink it)
    for begin in range(0, nnz, block_size):
        end = min(begin + block_size, nnz)
        block = _exact_int64(indices[begin:end])
        lo, hi = torch.stack((block.min(), block.max())).tolist()
        if lo < 0 or hi >= n_minor:
            raise ValueError(f"{where} ({fmt_name}) has {minor} indices outside [0, {n_minor}); the matrix is corrupt")
        if sink is not None:
            sink[begin:end].copy_(block)
        # Within a row, each index must be strictly larger than the previous one; positions where
        # a row starts (indptr entries in (begin, stop)) are exempt.
        stop = min(end + 1, nnz)
        nxt = _exact_int64(indices[begin + 1:stop])
        bad = nxt <= block[: nxt.shape[0]]
        bounds = torch.tensor([begin + 1, stop], dtype=torch.int64, device=ptr.device)
        first_start, past_start = torch.searchsorted(ptr, bounds).tolist()
        bad[ptr[first_start:past_start] - (begin + 1)] = False
        if bool(bad.any()):
            raise ValueError(
                f"{where} ({fmt_name}) is not in canonical format (unsorted or duplicate {minor} "
                "indices within a row); fix a copy with .sum_duplicates() (which also sorts) or "
                ".sort_indices(), and register that"
            )


def _check_values_tensor(data: torch.Tensor, nnz: int, where: str, fmt: str) -> None:
    if data.ndim != 1 or int(data.shape[0]) < nnz:
        n_stored = int(data.shape[0]) if data.ndim else 0
        raise ValueError(
            f"{where} ({fmt.upper()}) has {n_stored} stored values (shape {tuple(data.shape)}) for nnz={nnz} "
            "indices; the matrix is corrupt"
        )


def check_sparse_tensors(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, shape: tuple[int, int],
                         fmt: str, where: str) -> None:
    """Validates CSR/CSC arrays given as torch tensors (any device) as :func:`_sparse_storage` does
    scipy matrices: format, numeric values, structure, index range and canonical order."""
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric_tensor(data, where)
    n_rows, n_cols = (int(s) for s in shape)
    n_major, n_minor = (n_rows, n_cols) if fmt == "csr" else (n_cols, n_rows)
    ptr, nnz = _check_indptr_tensor(indptr, indices, n_major, where, fmt)
    _check_minor_indices_tensor(ptr, indices, nnz, n_minor, where, fmt)
    _check_values_tensor(data, nnz, where, fmt)


def _tensor_sparse_storage(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor,
                           shape: tuple[int, int], fmt: str, where: str) -> CsrStorage:
    """Validated CSR storage from CSR/CSC arrays given as torch tensors on any one device.

    The arrays are checked where they live, with torch ops (for GPU data: no host round trip).

    * Values: a CSR source's values ARE the storage's values when the kernels read their dtype
      (float32/64/16, int32/64, uint16/uint8): no copy and no compaction. Compacting them would
      allocate a second copy next to the user's, which the user keeps alive: more memory, not
      less. In-place edits of those values are therefore seen by the loader. Other dtypes are
      converted exactly (bool -> uint8, int8/int16 -> int32, uint32 -> int64, bfloat16 -> float32).
    * Structure: indptr and indices are always the storage's own copies, written in their compact
      dtypes (int32 indptr when nnz fits, uint16 column indices for at most 65,536 columns), so
      the copy costs less than the user's arrays. An in-place edit of the user's structure (say
      an index changed or a row pointer moved) after set-up can then never turn validated row
      bounds into wild reads, nor column indices into invalid sparse batches.
    * CSC is converted once to CSR on the arrays' device (:func:`kernels.csc_to_csr`); the
      result is the storage's own, so later edits of a CSC source are not seen.
    """
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric_tensor(data, where)
    devices = {str(t.device) for t in (indptr, indices, data)}
    if len(devices) != 1:
        raise ValueError(f"{where} has its indptr, indices and values on different devices ({sorted(devices)})")
    device = data.device
    _require_kernel_device(device, where)
    n_rows, n_cols = (int(s) for s in shape)
    n_major, n_minor = (n_rows, n_cols) if fmt == "csr" else (n_cols, n_rows)
    # The index dtype of sparse batches: int64 when the source uses it, else int32 (scipy's default).
    batch_index_dtype = np.dtype(np.int64) if indptr.dtype == torch.int64 else np.dtype(np.int32)
    ptr, nnz = _check_indptr_tensor(indptr, indices, n_major, where, fmt)
    index_dtype = torch_dtype(compact_index_dtype(n_cols))
    indptr_dtype = torch_dtype(compact_indptr_dtype(nnz))
    if fmt == "csr":
        own_indices = torch.empty(nnz, dtype=index_dtype, device=device)
        _check_minor_indices_tensor(ptr, indices, nnz, n_minor, where, fmt, out=own_indices)
        _check_values_tensor(data, nnz, where, fmt)
        values = _storable_tensor(data[:nnz].contiguous(), where)  # a view (no copy) when contiguous
        own_indptr = ptr
    else:
        _check_minor_indices_tensor(ptr, indices, nnz, n_minor, where, fmt)
        _check_values_tensor(data, nnz, where, fmt)
        values = _storable_tensor(data[:nnz].contiguous(), where)
        if nnz == 0:
            own_indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
            own_indices = torch.empty(0, dtype=index_dtype, device=device)
            values = values.clone()
        else:
            # The checked copy of indptr goes in; row indices as int32/int64, which can name
            # every output column (uint16 row indices could not if there are over 65,536 columns).
            rows_in = indices[:nnz]
            rows_in = rows_in.contiguous() if rows_in.dtype in (torch.int32, torch.int64) else _exact_int64(rows_in)
            if device.type == "cuda":
                own_indptr, col_indices, values = kernels.csc_to_csr(ptr, rows_in, values, (n_rows, n_cols))
            else:  # the host conversion takes numpy arrays (views of these tensors, no copies)
                converted = kernels.csc_to_csr(ptr.numpy(), rows_in.numpy(), values.numpy(), (n_rows, n_cols))
                own_indptr, col_indices, values = (torch.from_numpy(a) for a in converted)
            own_indices = _narrowed_indices(col_indices, index_dtype)
    if own_indptr.dtype != indptr_dtype:
        own_indptr = own_indptr.to(indptr_dtype)
    return CsrStorage(own_indptr, own_indices, values, n_rows, n_cols, source_format=fmt,
                      batch_index_dtype=batch_index_dtype)


def _tensor_dense_storage(tensor: torch.Tensor, where: str) -> DenseStorage:
    """A 1-D or 2-D tensor (any device) used in place when the kernels read its dtype and layout.

    A C-contiguous tensor of a kernel dtype is the storage itself: no copy, and in-place edits
    of it are seen by the loader. Other dtypes are converted exactly (see _storable_tensor),
    other layouts made C-contiguous (copies).
    """
    tensor = tensor.detach()
    _require_kernel_device(tensor.device, where)
    _require_numeric_tensor(tensor, where)
    if tensor.ndim not in (1, 2):
        raise ValueError(f"{where} must be 1- or 2-dimensional, got shape {tuple(tensor.shape)}")
    squeeze = tensor.ndim == 1
    values = _storable_tensor(tensor.reshape(-1, 1) if squeeze else tensor, where)
    if not values.is_contiguous():
        values = values.contiguous()
    return DenseStorage(values, squeeze=squeeze)


def cupy_sparse_parts(matrix: Any, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(indptr, indices, data, format) of a cupyx CSR/CSC matrix as torch tensors over its memory."""
    fmt = str(matrix.format)
    if fmt not in ("csr", "csc"):
        raise TypeError(f"{where} is a {fmt.upper()} sparse matrix; only CSR and CSC are supported (use .tocsr())")
    _require_numeric(np.dtype(matrix.dtype), where)
    indptr, indices, data = (cupy_to_torch(a) for a in (matrix.indptr, matrix.indices, matrix.data))
    return indptr, indices, data, fmt


def _cupy_sparse_storage(matrix: Any, where: str) -> CsrStorage:
    indptr, indices, data, fmt = cupy_sparse_parts(matrix, where)
    return _tensor_sparse_storage(indptr, indices, data, tuple(matrix.shape), fmt, where)


def _cupy_dense_storage(array: Any, where: str) -> DenseStorage:
    _require_numeric(np.dtype(array.dtype), where)
    return _tensor_dense_storage(cupy_to_torch(array), where)


def _torch_sparse_parts(tensor: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    if tensor.layout == torch.sparse_csr:
        parts, fmt = (tensor.crow_indices(), tensor.col_indices(), tensor.values()), "csr"
    elif tensor.layout == torch.sparse_csc:
        parts, fmt = (tensor.ccol_indices(), tensor.row_indices(), tensor.values()), "csc"
    else:
        raise TypeError(
            f"{where} is a torch tensor with layout {tensor.layout}; only strided, sparse CSR and sparse CSC "
            "tensors are supported (use .to_sparse_csr())"
        )
    if tensor.ndim != 2 or parts[2].ndim != 1:
        raise ValueError(
            f"{where} is a batched or hybrid sparse tensor (shape {tuple(tensor.shape)}, values of shape "
            f"{tuple(parts[2].shape)}); expected a 2-D matrix with one value per stored element"
        )
    indptr, indices, data = (p.detach() for p in parts)
    return indptr, indices, data, fmt


def _torch_storage(tensor: torch.Tensor, where: str) -> DenseStorage | CsrStorage:
    if tensor.layout == torch.strided:
        return _tensor_dense_storage(tensor, where)
    indptr, indices, data, fmt = _torch_sparse_parts(tensor, where)
    return _tensor_sparse_storage(indptr, indices, data, tuple(tensor.shape), fmt, where)
