"""``_core``'s calling convention on top of the CUDA kernels (``_cuda_emulated``).

Patched in for ``_core`` (see ``test_loader_on_cuda_kernels.py``), it sends every gather the CPU
loader makes through the CUDA launchers and kernels instead of the C++ CPU loops, so the loader's
scvi-tools parity tests also check the CUDA kernels in the ways the loader really uses them
(compact dtypes, grouped obs fields, batch CSR sizes, every output dtype). Row checks stay the CPU
module's (the CPU path raises before gathering); the kernels' own bad-row slot must then stay
untouched. Host addresses serve as device addresses: in the emulation they are the same memory.
"""

from __future__ import annotations

import ctypes

import numpy as np

from annloader_gpu import _core
from annloader_gpu import _cuda_emulated as cuda

_NO_BAD_ROW = -1
_CTYPES = {"int32": ctypes.c_int32, "int64": ctypes.c_int64}
_ON_DEVICE = (0, 0)  # device 0, stream 0


class _Slot:
    def __init__(self):
        self.array = np.full(1, _NO_BAD_ROW, dtype=np.int64)
        self.address = self.array.ctypes.data

    def require_untouched(self, kernel: str) -> None:
        assert self.array[0] == _NO_BAD_ROW, f"{kernel} recorded bad row position {self.array[0]} after check_rows passed"


def _view(address: int, dtype: str, n: int) -> np.ndarray:
    """The n elements at address as a writable numpy array (no copy)."""
    return np.ctypeslib.as_array((_CTYPES[dtype] * n).from_address(address)) if n else np.empty(0, dtype)


check_rows = _core.check_rows
get_num_threads = _core.get_num_threads
set_num_threads = _core.set_num_threads
compiler = "CUDA kernels, emulated on the CPU"


def gather_csr_to_dense(indptr, indptr_dtype, indices, indices_dtype, values, values_dtype, n_rows, n_cols, rows,
                        rows_dtype, n_batch, out, out_dtype):
    _core.check_rows(rows, rows_dtype, n_batch, n_rows)
    slot = _Slot()
    cuda.gather_csr_to_dense(*_ON_DEVICE, indptr, indptr_dtype, indices, indices_dtype, values, values_dtype,
                             n_rows, n_cols, rows, rows_dtype, n_batch, out, out_dtype, slot.address)
    slot.require_untouched("csr_rows_to_dense_kernel")


def csr_batch_indptr(indptr, indptr_dtype, n_rows, rows, rows_dtype, n_batch, out_indptr, out_indptr_dtype):
    """Fills out_indptr (int32 or int64) and returns the batch nnz, as the CPU module does; the
    kernels write int64 only, so an int32 indptr is narrowed from an int64 one."""
    _core.check_rows(rows, rows_dtype, n_batch, n_rows)
    wide = np.empty(n_batch + 1, dtype=np.int64)
    slot = _Slot()
    cuda.csr_batch_indptr(*_ON_DEVICE, indptr, indptr_dtype, n_rows, rows, rows_dtype, n_batch, wide.ctypes.data,
                          slot.address)
    slot.require_untouched("batch_row_lengths_kernel")
    if out_indptr_dtype == "int32" and wide[-1] > np.iinfo(np.int32).max:
        raise OverflowError("batch nnz does not fit an int32 indptr")
    _view(out_indptr, out_indptr_dtype, n_batch + 1)[:] = wide
    return int(wide[-1])


def gather_csr_to_csr(indptr, indptr_dtype, indices, indices_dtype, values, values_dtype, n_rows, n_cols, rows,
                      rows_dtype, n_batch, out_indptr, out_indptr_dtype, out_indices, out_indices_dtype, out_values,
                      out_values_dtype):
    _core.check_rows(rows, rows_dtype, n_batch, n_rows)
    wide = _view(out_indptr, out_indptr_dtype, n_batch + 1).astype(np.int64)
    cuda.gather_csr_to_csr(*_ON_DEVICE, indptr, indptr_dtype, indices, indices_dtype, values, values_dtype, n_rows,
                           n_cols, rows, rows_dtype, n_batch, wide.ctypes.data, out_indices, out_indices_dtype,
                           out_values, out_values_dtype, int(wide[-1]) if n_batch else 0)


def gather_dense(values, values_dtype, n_rows, n_cols, row_stride, rows, rows_dtype, n_batch, out, out_dtype):
    _core.check_rows(rows, rows_dtype, n_batch, n_rows)
    slot = _Slot()
    cuda.gather_dense(*_ON_DEVICE, values, values_dtype, n_rows, n_cols, row_stride, rows, rows_dtype, n_batch, out,
                      out_dtype, slot.address)
    slot.require_untouched("gather_dense_rows_kernel")


def csc_to_csr(indptr, indptr_dtype, indices, indices_dtype, values, values_dtype, n_rows, n_cols, out_indptr,
               out_indptr_dtype, out_indices, out_values):
    nnz = int(_view(indptr, indptr_dtype, n_cols + 1)[-1])
    workspace = np.empty(max(cuda.csc_to_csr_workspace_bytes(0, n_rows, nnz), 1), dtype=np.uint8)
    wide = np.empty(n_rows + 1, dtype=np.int64)
    slot = _Slot()
    cuda.csc_to_csr(*_ON_DEVICE, indptr, indptr_dtype, indices, indices_dtype, values, values_dtype, n_rows, n_cols,
                    workspace.ctypes.data, workspace.nbytes, wide.ctypes.data, out_indices, out_values, slot.address)
    if slot.array[0] != _NO_BAD_ROW:
        raise IndexError(f"CSC row index at position {slot.array[0]} is out of range for {n_rows} rows")
    _view(out_indptr, out_indptr_dtype, n_rows + 1)[:] = wide


class GatherPlan:
    """The CUDA module's plan behind the CPU module's gather signature."""

    def __init__(self):
        self._plan = cuda.GatherPlan()

    def add_csr(self, *args, **kwargs):
        self._plan.add_csr(*args, **kwargs)

    def add_dense(self, *args, **kwargs):
        self._plan.add_dense(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def n_rows(self) -> int:
        return self._plan.n_rows

    def gather(self, rows, rows_dtype, n_batch, outputs):
        if len(self._plan):
            _core.check_rows(rows, rows_dtype, n_batch, self._plan.n_rows)
        slot = _Slot()
        self._plan.gather(*_ON_DEVICE, rows, rows_dtype, n_batch, outputs, slot.address)
        slot.require_untouched("the gather plan's kernels")
