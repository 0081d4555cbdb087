"""Python entry points of the compiled row gathers.

Every function takes numpy arrays or torch tensors (CPU or CUDA, all on one device), checks
shapes, dtypes and layouts before anything runs, and hands raw addresses to the compiled module:
``_core`` (multi-threaded C++) for host memory, ``_cuda`` for device memory, enqueued on torch's
current stream. Outputs are allocated by the caller, so torch's allocators own them.

The compiled kernels assume a structurally valid matrix (monotonic ``indptr`` that starts at 0
and ends at ``len(indices)``). ``validate=True`` (the default) checks that here, in O(n_rows);
callers that validated once at set-up (the loader) pass ``validate=False`` on the hot path.
Row indices are always checked: on the CPU before the gather, on the GPU by the kernel itself,
which never dereferences a bad row and records it for :func:`raise_if_bad_rows`.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from . import _core
from ._cuda_module import require_cuda_module
from .pinned import readable_by_cuda

ArrayLike = Union[np.ndarray, torch.Tensor]

_TORCH_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint16: "uint16",
    torch.uint8: "uint8",
}
_NUMPY_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.float16): "float16",
    np.dtype(np.int64): "int64",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint8): "uint8",
}

VALUE_DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint16", "uint8")
OUTPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")
COLUMN_INDEX_DTYPES = ("int32", "int64", "uint16")
INDEX_DTYPES = ("int32", "int64")


def dtype_name(array: ArrayLike) -> str:
    """The dtype name the compiled module understands, or TypeError."""
    table = _TORCH_DTYPE_NAMES if isinstance(array, torch.Tensor) else _NUMPY_DTYPE_NAMES
    try:
        return table[array.dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {array.dtype}") from None


class _Buffer:
    """Address, dtype name, shape, row stride and device of one argument, checked on the way in."""

    __slots__ = ("address", "dtype", "shape", "row_stride", "device", "array")

    def __init__(self, array: ArrayLike, role: str, *, ndim: int, allowed: tuple[str, ...]):
        if isinstance(array, torch.Tensor):
            if array.is_sparse or array.layout != torch.strided:
                raise TypeError(f"{role} must be a strided tensor, got layout {array.layout}")
            self.device = array.device
            self.array = array
            self.address = array.data_ptr()
            strides = array.stride()
        elif isinstance(array, np.ndarray):
            self.device = torch.device("cpu")
            self.array = array
            self.address = array.ctypes.data
            strides = tuple(s // array.itemsize for s in array.strides)
        else:
            raise TypeError(f"{role} must be a numpy array or a torch tensor, got {type(array).__name__}")
        if array.ndim != ndim:
            raise ValueError(f"{role} must be {ndim}-D, got shape {tuple(array.shape)}")
        try:
            self.dtype = dtype_name(array)
        except TypeError:
            raise TypeError(f"{role} has dtype {array.dtype}; expected one of {', '.join(allowed)}") from None
        if self.dtype not in allowed:
            raise TypeError(f"{role} has dtype {array.dtype}; expected one of {', '.join(allowed)}")
        self.shape = tuple(int(s) for s in array.shape)
        # Columns (or the single dimension) must be contiguous; dense sources may skip rows.
        # An array with no elements has no layout to check (torch reports strides (0, 0) for a
        # (0, n) tensor made by torch.from_numpy).
        if self.shape[-1] > 1 and strides[-1] != 1 and 0 not in self.shape:
            raise ValueError(f"{role} must be contiguous along its last dimension (strides {strides})")
        self.row_stride = int(strides[0]) if ndim == 2 else 1
        if ndim == 2 and self.shape[0] > 1 and self.row_stride < self.shape[1]:
            raise ValueError(f"{role} has overlapping rows (row stride {self.row_stride} < {self.shape[1]} columns)")


def _device_readable(buffer: _Buffer) -> bool:
    """Pinned host tensors are addressable by CUDA kernels through unified virtual addressing."""
    return isinstance(buffer.array, torch.Tensor) and readable_by_cuda(buffer.array)


def _same_device(*buffers: _Buffer) -> torch.device:
    """The one device all buffers live on; pinned host buffers count as the CUDA device's."""
    cuda_devices = {b.device for b in buffers if b.device.type == "cuda"}
    if len(cuda_devices) > 1:
        raise ValueError(f"all arrays must be on one device, got {sorted(map(str, cuda_devices))}")
    if cuda_devices:
        device = cuda_devices.pop()
        for b in buffers:
            if b.device != device and not _device_readable(b):
                raise ValueError(
                    f"all arrays must be on one device, got {device} and {b.device} "
                    "(host memory must be pinned for CUDA kernels to read it)"
                )
        return device
    device = buffers[0].device
    for b in buffers[1:]:
        if b.device != device:
            raise ValueError(f"all arrays must be on one device, got {device} and {b.device}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; expected cpu or cuda")
    return device


def _require_written_on(device: torch.device, *outputs: tuple[_Buffer, str]) -> None:
    """CUDA kernels write their outputs asynchronously: outputs must be on the device itself.

    (Inputs may be pinned host memory, which kernels read in place; an output there would be
    filled after the call returned, behind the caller's back.)
    """
    if device.type != "cuda":
        return
    for buffer, role in outputs:
        if buffer.device != device:
            raise ValueError(
                f"{role} must be on {device} (CUDA kernels write it asynchronously), got {buffer.device}"
            )


def _require_contiguous_output(out: _Buffer, role: str) -> None:
    # A (B, 0) tensor has no bytes; torch gives it row stride 1, which is still contiguous.
    if len(out.shape) == 2 and out.shape[0] > 1 and out.shape[1] > 0 and out.row_stride != out.shape[1]:
        raise ValueError(f"{role} must be C-contiguous")


def _first(array: ArrayLike, position: int) -> int:
    return int(array[position].item() if isinstance(array, torch.Tensor) else array[position])


def validate_csr_structure(indptr: ArrayLike, indices: ArrayLike, values: ArrayLike, n_cols: int) -> None:
    """O(n_rows) checks that make every row's [begin, end) a valid slice of indices/values."""
    if len(indices) != len(values):
        raise ValueError(f"indices ({len(indices)}) and values ({len(values)}) must have equal length")
    if len(indptr) < 1:
        raise ValueError("indptr must have n_rows + 1 >= 1 entries")
    if n_cols < 0:
        raise ValueError(f"n_cols must be non-negative, got {n_cols}")
    first, last = _first(indptr, 0), _first(indptr, -1)
    if first != 0 or last != len(indices):
        raise ValueError(f"indptr must start at 0 and end at nnz={len(indices)}, got {first} and {last}")
    steps = indptr[1:] - indptr[:-1]
    if bool((steps < 0).any()):
        raise ValueError("indptr must be non-decreasing")


class _Csr:
    def __init__(self, indptr, indices, values, n_cols: int, validate: bool):
        self.indptr = _Buffer(indptr, "indptr", ndim=1, allowed=INDEX_DTYPES)
        self.indices = _Buffer(indices, "indices", ndim=1, allowed=COLUMN_INDEX_DTYPES)
        self.values = _Buffer(values, "values", ndim=1, allowed=VALUE_DTYPES)
        self.n_rows = self.indptr.shape[0] - 1
        self.n_cols = int(n_cols)
        if self.indices.dtype == "uint16" and self.n_cols > 65536:
            raise ValueError(
                f"uint16 column indices cannot address {self.n_cols} columns (at most 65536); "
                "use int32 indices"
            )
        if validate:
            validate_csr_structure(indptr, indices, values, self.n_cols)

    def args(self) -> dict:
        return dict(
            indptr=self.indptr.address,
            indptr_dtype=self.indptr.dtype,
            indices=self.indices.address,
            indices_dtype=self.indices.dtype,
            values=self.values.address,
            values_dtype=self.values.dtype,
            n_rows=self.n_rows,
            n_cols=self.n_cols,
        )


def _rows_args(rows: _Buffer) -> dict:
    return dict(rows=rows.address, rows_dtype=rows.dtype, n_batch=rows.shape[0])


# --- CUDA bookkeeping ---------------------------------------------------------------------

_bad_row_slots: dict[int, torch.Tensor] = {}
_NO_BAD_ROW = -1  # all ones: atomicMin of any position replaces it


try:  # torch's own raw accessor (what Triton uses): no Stream object built on the hot path
    from torch._C import _cuda_getCurrentRawStream as _raw_current_stream
except ImportError:  # CPU builds of torch
    _raw_current_stream = None


def current_stream_handle(index: int) -> int:
    """The cudaStream_t (as an int) of torch's current stream on CUDA device index."""
    if _raw_current_stream is not None:
        return int(_raw_current_stream(index))
    return torch.cuda.current_stream(index).cuda_stream


def _cuda_call_args(device: torch.device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(device=index, stream=current_stream_handle(index))


def bad_row_slot(device: torch.device) -> torch.Tensor:
    """The device's int64 slot in which GPU kernels record the smallest bad batch position."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    slot = _bad_row_slots.get(index)
    if slot is None:
        slot = torch.full((1,), _NO_BAD_ROW, dtype=torch.int64, device=f"cuda:{index}")
        _bad_row_slots[index] = slot
    return slot


def fresh_bad_row_slot(device: torch.device) -> torch.Tensor:
    """The bad-row slot, reset on the current stream (no synchronisation) before a checked call,
    so that a record left by an unchecked call elsewhere is not reported as this call's."""
    slot = bad_row_slot(device)
    slot.fill_(_NO_BAD_ROW)
    return slot


def raise_if_bad_rows(device: torch.device, rows: ArrayLike | None = None, n_rows: int | None = None) -> None:
    """Synchronises with the device and raises IndexError if a kernel met a bad row index."""
    slot = bad_row_slot(device)
    position = int(slot.item())
    if position == _NO_BAD_ROW:
        return
    slot.fill_(_NO_BAD_ROW)
    detail = ""
    if rows is not None:
        detail = f"row index {int(rows[position])} at position {position} "
    raise IndexError(
        f"{detail}is out of range"
        + (f" for {n_rows} rows (expected 0 <= index < {n_rows})" if n_rows is not None else "")
        + "; the output rows for bad indices were left zero"
    )


# --- public gathers -----------------------------------------------------------------------


def check_rows(rows: ArrayLike, n_rows: int) -> None:
    """Raises IndexError naming the first row index outside [0, n_rows)."""
    buf = _Buffer(rows, "rows", ndim=1, allowed=INDEX_DTYPES)
    device = _same_device(buf)
    if device.type == "cpu":
        _core.check_rows(**_rows_args(buf), n_rows=n_rows)
        return
    cuda = require_cuda_module()
    cuda.check_rows(**_cuda_call_args(device), **_rows_args(buf), n_rows=n_rows,
                    bad_position=fresh_bad_row_slot(device).data_ptr())
    raise_if_bad_rows(device, rows, n_rows)


def gather_csr_to_dense(indptr: ArrayLike, indices: ArrayLike, values: ArrayLike, n_cols: int,
                        rows: ArrayLike, out: ArrayLike, *, validate: bool = True) -> ArrayLike:
    """out[i, :] = dense(matrix[rows[i]]), cast to out's dtype. Returns out."""
    matrix = _Csr(indptr, indices, values, n_cols, validate)
    batch = _Buffer(rows, "rows", ndim=1, allowed=INDEX_DTYPES)
    target = _Buffer(out, "out", ndim=2, allowed=OUTPUT_DTYPES)
    _require_contiguous_output(target, "out")
    if target.shape != (batch.shape[0], matrix.n_cols):
        raise ValueError(f"out has shape {target.shape}; expected {(batch.shape[0], matrix.n_cols)}")
    device = _same_device(matrix.indptr, matrix.indices, matrix.values, batch, target)
    _require_written_on(device, (target, "out"))
    if device.type == "cpu":
        _core.gather_csr_to_dense(**matrix.args(), **_rows_args(batch), out=target.address,
                                  out_dtype=target.dtype)
        return out
    cuda = require_cuda_module()
    slot = fresh_bad_row_slot(device) if validate else bad_row_slot(device)
    cuda.gather_csr_to_dense(**_cuda_call_args(device), **matrix.args(), **_rows_args(batch),
                             out=target.address, out_dtype=target.dtype, bad_position=slot.data_ptr())
    if validate:
        raise_if_bad_rows(device, rows, matrix.n_rows)
    return out


def csr_batch_indptr(indptr: ArrayLike, rows: ArrayLike, out_indptr: ArrayLike, *,
                     validate: bool = True) -> int | None:
    """Fills out_indptr (len(rows) + 1) with the batch's row offsets.

    On the CPU returns the batch nnz. On the GPU out_indptr must be int64 and nothing is
    synchronised: returns None, and the caller reads ``out_indptr[-1]`` when it needs the size.
    """
    src = _Buffer(indptr, "indptr", ndim=1, allowed=INDEX_DTYPES)
    batch = _Buffer(rows, "rows", ndim=1, allowed=INDEX_DTYPES)
    target = _Buffer(out_indptr, "out_indptr", ndim=1, allowed=INDEX_DTYPES)
    if target.shape[0] != batch.shape[0] + 1:
        raise ValueError(f"out_indptr has {target.shape[0]} entries; expected {batch.shape[0] + 1}")
    device = _same_device(src, batch, target)
    _require_written_on(device, (target, "out_indptr"))
    n_rows = src.shape[0] - 1
    if device.type == "cpu":
        return _core.csr_batch_indptr(indptr=src.address, indptr_dtype=src.dtype, n_rows=n_rows,
                                      **_rows_args(batch), out_indptr=target.address,
                                      out_indptr_dtype=target.dtype)
    if target.dtype != "int64":
        raise TypeError("on the GPU out_indptr must be int64 (cast the finished indptr if needed)")
    cuda = require_cuda_module()
    slot = fresh_bad_row_slot(device) if validate else bad_row_slot(device)
    cuda.csr_batch_indptr(**_cuda_call_args(device), indptr=src.address, indptr_dtype=src.dtype,
                          n_rows=n_rows, **_rows_args(batch), out_indptr=target.address,
                          bad_position=slot.data_ptr())
    if validate:
        raise_if_bad_rows(device, rows, n_rows)
    return None


def gather_csr_to_csr(indptr: ArrayLike, indices: ArrayLike, values: ArrayLike, n_cols: int,
                      rows: ArrayLike, out_indptr: ArrayLike, out_indices: ArrayLike,
                      out_values: ArrayLike, *, validate: bool = True) -> None:
    """Copies the rows into a batch CSR whose out_indptr csr_batch_indptr filled."""
    matrix = _Csr(indptr, indices, values, n_cols, validate)
    batch = _Buffer(rows, "rows", ndim=1, allowed=INDEX_DTYPES)
    ptr = _Buffer(out_indptr, "out_indptr", ndim=1, allowed=INDEX_DTYPES)
    idx = _Buffer(out_indices, "out_indices", ndim=1, allowed=INDEX_DTYPES)
    val = _Buffer(out_values, "out_values", ndim=1, allowed=OUTPUT_DTYPES)
    if ptr.shape[0] != batch.shape[0] + 1:
        raise ValueError(f"out_indptr has {ptr.shape[0]} entries; expected {batch.shape[0] + 1}")
    if idx.shape != val.shape:
        raise ValueError(f"out_indices {idx.shape} and out_values {val.shape} must have equal length")
    device = _same_device(matrix.indptr, matrix.indices, matrix.values, batch, ptr, idx, val)
    _require_written_on(device, (idx, "out_indices"), (val, "out_values"))
    if device.type == "cpu":
        _require_batch_indptr(matrix.indptr, matrix.n_rows, batch, ptr, idx.shape[0])
        _core.gather_csr_to_csr(**matrix.args(), **_rows_args(batch), out_indptr=ptr.address,
                                out_indptr_dtype=ptr.dtype, out_indices=idx.address,
                                out_indices_dtype=idx.dtype, out_values=val.address,
                                out_values_dtype=val.dtype)
        return
    if ptr.dtype != "int64":
        raise TypeError("on the GPU out_indptr must be the int64 indptr csr_batch_indptr filled")
    if ptr.device != device:
        raise ValueError(f"out_indptr must be on {device}, got {ptr.device}")
    if validate:  # one read of out_indptr[-1]; the kernels never write past out_indices either way
        _require_indptr_end(ptr.array, idx.shape[0])
    cuda = require_cuda_module()
    cuda.gather_csr_to_csr(**_cuda_call_args(device), **matrix.args(), **_rows_args(batch),
                           out_indptr=ptr.address, out_indices=idx.address,
                           out_indices_dtype=idx.dtype, out_values=val.address,
                           out_values_dtype=val.dtype, out_nnz=idx.shape[0])


def _require_indptr_end(out_indptr: ArrayLike, nnz: int) -> None:
    # A host tensor is read through numpy: indexing the tensor costs ~10 us on the hot path.
    host = out_indptr.numpy() if isinstance(out_indptr, torch.Tensor) and out_indptr.device.type == "cpu" else out_indptr
    end = int(host[-1])
    if end != nnz:
        raise ValueError(f"out_indptr ends at {end} but out_indices has {nnz} entries")


def _require_batch_indptr(src_indptr: _Buffer, n_rows: int, batch: _Buffer, ptr: _Buffer, nnz: int) -> None:
    """On the CPU: out_indptr must be exactly what csr_batch_indptr gives for these rows.

    The compiled copy writes each row at out_indptr[i] and trusts it: offsets that disagree with
    the rows' lengths would write past out_indices/out_values. O(batch) to check.
    """
    actual = ptr.array.detach().numpy() if isinstance(ptr.array, torch.Tensor) else ptr.array
    _require_indptr_end(actual, nnz)
    expected = np.empty(ptr.shape[0], dtype=np.int32 if ptr.dtype == "int32" else np.int64)
    _core.csr_batch_indptr(src_indptr.address, src_indptr.dtype, n_rows, batch.address, batch.dtype,
                           batch.shape[0], expected.ctypes.data, ptr.dtype)
    if not np.array_equal(actual, expected):
        raise ValueError("out_indptr does not match the rows' lengths; fill it with csr_batch_indptr for the same rows")


def gather_dense(src: ArrayLike, rows: ArrayLike, out: ArrayLike, *, validate: bool = True) -> ArrayLike:
    """out[i, :] = src[rows[i], :], cast to out's dtype. src may have a row stride. Returns out."""
    source = _Buffer(src, "src", ndim=2, allowed=VALUE_DTYPES)
    batch = _Buffer(rows, "rows", ndim=1, allowed=INDEX_DTYPES)
    target = _Buffer(out, "out", ndim=2, allowed=OUTPUT_DTYPES)
    _require_contiguous_output(target, "out")
    if target.shape != (batch.shape[0], source.shape[1]):
        raise ValueError(f"out has shape {target.shape}; expected {(batch.shape[0], source.shape[1])}")
    device = _same_device(source, batch, target)
    _require_written_on(device, (target, "out"))
    args = dict(values=source.address, values_dtype=source.dtype, n_rows=source.shape[0],
                n_cols=source.shape[1], row_stride=source.row_stride, **_rows_args(batch),
                out=target.address, out_dtype=target.dtype)
    if device.type == "cpu":
        _core.gather_dense(**args)
        return out
    cuda = require_cuda_module()
    slot = fresh_bad_row_slot(device) if validate else bad_row_slot(device)
    cuda.gather_dense(**_cuda_call_args(device), **args, bad_position=slot.data_ptr())
    if validate:
        raise_if_bad_rows(device, rows, source.shape[0])
    return out


def csc_to_csr(indptr: ArrayLike, indices: ArrayLike, values: ArrayLike, shape: tuple[int, int],
               *, indptr_dtype=None) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Converts CSC arrays to CSR arrays (column indices sorted within rows).

    Done once when data is prepared. Host numpy arrays give numpy arrays (multi-threaded C++);
    CUDA tensors give CUDA tensors (a stable radix sort by row on torch's current stream, one
    synchronisation to read the nnz; workspace from torch's allocator). The output keeps the
    index and value dtypes; its indptr is int64 unless ``indptr_dtype`` says otherwise (int32 is
    refused when nnz does not fit).
    """
    n_rows, n_cols = (int(s) for s in shape)
    if all(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in (indptr, indices, values)):
        return _csc_to_csr_cuda(indptr, indices, values, n_rows, n_cols, indptr_dtype)
    for name, a in (("indptr", indptr), ("indices", indices), ("values", values)):
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"csc_to_csr takes host numpy arrays or CUDA tensors (all three alike); {name} is {type(a).__name__}"
            )
    csc = _Csr(indptr, indices, values, n_rows, validate=True)  # a CSC is the CSR of the transpose
    if csc.n_rows != n_cols:
        raise ValueError(f"CSC indptr has {csc.n_rows + 1} entries; expected n_cols + 1 = {n_cols + 1}")
    out_indptr_dtype = np.dtype(indptr_dtype or np.int64)
    out_indptr = np.empty(n_rows + 1, dtype=out_indptr_dtype)
    out_indices = np.empty(len(indices), dtype=indices.dtype)
    out_values = np.empty(len(values), dtype=values.dtype)
    if n_cols > np.iinfo(indices.dtype).max + 1:
        raise ValueError(f"{indices.dtype} indices cannot hold {n_cols} column numbers")
    _core.csc_to_csr(**{**csc.args(), "n_rows": n_rows, "n_cols": n_cols},
                     out_indptr=out_indptr.ctypes.data,
                     out_indptr_dtype=_Buffer(out_indptr, "indptr_dtype", ndim=1, allowed=INDEX_DTYPES).dtype,
                     out_indices=out_indices.ctypes.data, out_values=out_values.ctypes.data)
    return out_indptr, out_indices, out_values


def _csc_to_csr_cuda(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_rows: int,
                     n_cols: int, indptr_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    csc = _Csr(indptr, indices, values, n_rows, validate=True)
    device = _same_device(csc.indptr, csc.indices, csc.values)
    if csc.n_rows != n_cols:
        raise ValueError(f"CSC indptr has {csc.n_rows + 1} entries; expected n_cols + 1 = {n_cols + 1}")
    if n_cols > torch.iinfo(indices.dtype).max + 1:
        raise ValueError(f"{indices.dtype} indices cannot hold {n_cols} column numbers")
    out_dtype = torch.int64 if indptr_dtype is None else torch.from_numpy(np.empty(0, np.dtype(indptr_dtype))).dtype
    if out_dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indptr_dtype must be int32 or int64, got {indptr_dtype}")
    nnz = indices.shape[0]
    if out_dtype == torch.int32 and nnz > np.iinfo(np.int32).max:
        raise OverflowError(f"{nnz} non-zeros do not fit an int32 indptr; use int64")
    cuda = require_cuda_module()
    out_indptr = torch.empty(n_rows + 1, dtype=torch.int64, device=device)
    out_indices = torch.empty_like(indices)
    out_values = torch.empty_like(values)
    workspace_bytes = cuda.csc_to_csr_workspace_bytes(_cuda_call_args(device)["device"], n_rows, nnz)
    workspace = torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=device)
    cuda.csc_to_csr(**_cuda_call_args(device), **{**csc.args(), "n_rows": n_rows, "n_cols": n_cols},
                    workspace=workspace.data_ptr(), workspace_bytes=workspace_bytes,
                    out_indptr=out_indptr.data_ptr(), out_indices=out_indices.data_ptr(),
                    out_values=out_values.data_ptr(), bad_position=fresh_bad_row_slot(device).data_ptr())
    slot = bad_row_slot(device)
    position = int(slot.item())
    if position != _NO_BAD_ROW:
        slot.fill_(_NO_BAD_ROW)
        raise IndexError(
            f"CSC row index {int(indices[position])} at position {position} is out of range for {n_rows} rows"
        )
    return out_indptr.to(out_dtype), out_indices, out_values


def get_num_threads() -> int:
    """Threads the CPU gathers use (the calling thread included)."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the threads the CPU gathers use (the calling thread included)."""
    _core.set_num_threads(int(n))


# --- bound matrices: checked once, gathered many times ----------------------------------------

_FAST_INDEX_NAMES = {torch.int32: "int32", torch.int64: "int64"}
_FAST_OUTPUT_NAMES = {t: n for t, n in _TORCH_DTYPE_NAMES.items() if n in OUTPUT_DTYPES}


def _execution_device(buffers: tuple[_Buffer, ...], device: torch.device | str | None) -> torch.device:
    """Where kernels over these buffers run: their device, or a CUDA device reading pinned memory."""
    own = _same_device(*buffers)
    if device is None:
        return own
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if own.type == "cpu" and device.type == "cuda":
        if not all(_device_readable(b) for b in buffers):
            raise ValueError(f"host arrays must be pinned for CUDA kernels on {device} to read them")
        return device
    if own != device:
        raise ValueError(f"arrays live on {own}, not on {device}")
    return device


class _Bound:
    """Per-call state shared by the bound matrices: the compiled module and its fixed arguments."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self._cuda = require_cuda_module()
            self._device_index = device.index if device.index is not None else torch.cuda.current_device()
            self._bad_slot = bad_row_slot(device).data_ptr()
        else:
            self._cuda = None

    def _stream(self) -> int:
        return current_stream_handle(self._device_index)

    def _fast_rows(self, rows) -> tuple[int, str, int] | None:
        """(address, dtype, count) for a contiguous 1-D torch index tensor on this device, else None."""
        if type(rows) is torch.Tensor and rows.device == self.device and rows.dim() == 1 and rows.is_contiguous():
            name = _FAST_INDEX_NAMES.get(rows.dtype)
            if name is not None:
                return rows.data_ptr(), name, rows.shape[0]
        return None

    def _fast_out(self, out, n_rows: int, n_cols: int) -> tuple[int, str] | None:
        if (type(out) is torch.Tensor and out.device == self.device and out.dim() == 2 and out.is_contiguous()
                and out.shape[0] == n_rows and out.shape[1] == n_cols):
            name = _FAST_OUTPUT_NAMES.get(out.dtype)
            if name is not None:
                return out.data_ptr(), name
        return None


class BoundCsr(_Bound):
    """A CSR matrix checked once and bound to the device its kernels run on.

    The loader's hot path: each call does a few attribute checks on contiguous torch tensors and
    one call into the compiled module. Anything else (numpy inputs, other layouts or dtypes) takes
    the checked free functions, which say what is wrong. ``device`` may name a CUDA device for
    pinned host arrays, which the CUDA kernels read in place.
    """

    def __init__(self, indptr: ArrayLike, indices: ArrayLike, values: ArrayLike, n_cols: int, *,
                 device: torch.device | str | None = None, validate: bool = True):
        matrix = _Csr(indptr, indices, values, n_cols, validate)
        super().__init__(_execution_device((matrix.indptr, matrix.indices, matrix.values), device))
        self._arrays = (indptr, indices, values)  # keeps the memory alive while bound
        self._indptr = matrix.indptr
        self.n_rows, self.n_cols = matrix.n_rows, matrix.n_cols
        self._args = (matrix.indptr.address, matrix.indptr.dtype, matrix.indices.address, matrix.indices.dtype,
                      matrix.values.address, matrix.values.dtype, matrix.n_rows, matrix.n_cols)

    def to_dense(self, rows: ArrayLike, out: ArrayLike) -> ArrayLike:
        """out[i, :] = dense(matrix[rows[i]]); see :func:`gather_csr_to_dense`."""
        r = self._fast_rows(rows)
        o = self._fast_out(out, r[2], self.n_cols) if r is not None else None
        if o is None:
            return gather_csr_to_dense(*self._arrays, self.n_cols, rows, out, validate=False)
        if self._cuda is None:
            _core.gather_csr_to_dense(*self._args, *r, *o)
        else:
            self._cuda.gather_csr_to_dense(self._device_index, self._stream(), *self._args, *r, *o, self._bad_slot)
        return out

    def batch_indptr(self, rows: ArrayLike, out_indptr: ArrayLike) -> int | None:
        """See :func:`csr_batch_indptr` (the batch nnz on the CPU, None on the GPU)."""
        r = self._fast_rows(rows)
        p = self._fast_vector(out_indptr, r[2] + 1, _FAST_INDEX_NAMES) if r is not None else None
        if p is None or (self._cuda is not None and p[1] != "int64"):
            return csr_batch_indptr(self._arrays[0], rows, out_indptr, validate=False)
        if self._cuda is None:
            return _core.csr_batch_indptr(self._args[0], self._args[1], self.n_rows, *r, *p)
        self._cuda.csr_batch_indptr(self._device_index, self._stream(), self._args[0], self._args[1], self.n_rows,
                                    *r, p[0], self._bad_slot)
        return None

    def to_csr(self, rows: ArrayLike, out_indptr: ArrayLike, out_indices: ArrayLike, out_values: ArrayLike, *,
               trusted_indptr: bool = False) -> None:
        """See :func:`gather_csr_to_csr`; out_indptr is what :meth:`batch_indptr` filled.

        On the CPU out_indptr is checked against the rows (O(batch)) unless ``trusted_indptr``
        says the caller itself just filled it with :meth:`batch_indptr` for these rows.
        """
        r = self._fast_rows(rows)
        fast = None
        if r is not None:
            p = self._fast_vector(out_indptr, r[2] + 1, _FAST_INDEX_NAMES)
            nnz = out_indices.shape[0] if type(out_indices) is torch.Tensor else -1
            i = self._fast_vector(out_indices, nnz, _FAST_INDEX_NAMES)
            v = self._fast_vector(out_values, nnz, _FAST_OUTPUT_NAMES)
            if p is not None and i is not None and v is not None:
                fast = p, i, v
        if fast is None or (self._cuda is not None and fast[0][1] != "int64"):
            gather_csr_to_csr(*self._arrays, self.n_cols, rows, out_indptr, out_indices, out_values, validate=False)
            return
        p, i, v = fast
        if self._cuda is None:
            # The kernel trusts out_indptr: it must be what batch_indptr gives for these rows.
            if not trusted_indptr:
                _require_batch_indptr(self._indptr, self.n_rows, _Buffer(rows, "rows", ndim=1, allowed=INDEX_DTYPES),
                                      _Buffer(out_indptr, "out_indptr", ndim=1, allowed=INDEX_DTYPES), nnz)
            else:
                _require_indptr_end(out_indptr, nnz)
            _core.gather_csr_to_csr(*self._args, *r, *p, *i, *v)
        else:
            self._cuda.gather_csr_to_csr(self._device_index, self._stream(), *self._args, *r, p[0], *i, *v, nnz)

    def _fast_vector(self, array, length: int, names: dict) -> tuple[int, str] | None:
        if (type(array) is torch.Tensor and array.device == self.device and array.dim() == 1
                and array.is_contiguous() and array.shape[0] == length):
            name = names.get(array.dtype)
            if name is not None:
                return array.data_ptr(), name
        return None


class BoundDense(_Bound):
    """A dense (n_rows, n_cols) source checked once; see :class:`BoundCsr`."""

    def __init__(self, src: ArrayLike, *, device: torch.device | str | None = None):
        source = _Buffer(src, "src", ndim=2, allowed=VALUE_DTYPES)
        super().__init__(_execution_device((source,), device))
        self._src = src
        self.n_rows, self.n_cols = source.shape
        self._args = (source.address, source.dtype, source.shape[0], source.shape[1], source.row_stride)

    def gather(self, rows: ArrayLike, out: ArrayLike) -> ArrayLike:
        """out[i, :] = src[rows[i], :]; see :func:`gather_dense`."""
        r = self._fast_rows(rows)
        o = self._fast_out(out, r[2], self.n_cols) if r is not None else None
        if o is None or self.n_cols == 0:
            return gather_dense(self._src, rows, out, validate=False)
        if self._cuda is None:
            _core.gather_dense(*self._args, *r, *o)
        else:
            self._cuda.gather_dense(self._device_index, self._stream(), *self._args, *r, *o, self._bad_slot)
        return out
