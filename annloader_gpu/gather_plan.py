"""All dense-output fields of prepared data gathered by one compiled call per batch.

Per field, the Python path costs ~20 us of checks, lookups and a call into the compiled module;
a model that asks for X, batch and labels would pay that three times per batch. A plan checks
and binds the fields once (``GatherPlan`` in ``_core`` or ``_cuda``); each batch then costs one
output allocation per field and one call, which checks the rows once and gathers every field
(on the GPU: one launch per field on the current stream, no synchronisation).

Fields a plan cannot take (sparse outputs, host-fallback sources, dtypes the kernels do not
write) keep the per-field path in :class:`~annloader_gpu.dataset.Field`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _core
from ._cuda_module import require_cuda_module
from .kernels import bad_row_slot, current_stream_handle

if TYPE_CHECKING:
    from .dataset import BufferPool, Field

__all__ = ["FieldGatherPlan", "plannable"]

_ROW_DTYPES = {np.dtype(np.int64): "int64", np.dtype(np.int32): "int32",
               torch.int64: "int64", torch.int32: "int32"}


def plannable(field: Field) -> bool:
    """Dense rows out of CSR or dense storage, in the dtype the kernels write."""
    return (field.storage.kind in ("csr", "dense") and not field.sparse_output
            and field.kernel_dtype == field.dtype)


class FieldGatherPlan:
    """The plannable fields among ``fields``, bound once for kernels running on ``device``.

    ``keys`` names them in their registry order; :meth:`gather` returns them as a dict.
    """

    def __init__(self, fields: dict[str, Field], device: torch.device):
        from .storage import torch_dtype

        self.device = device
        cuda = device.type == "cuda"
        module = require_cuda_module() if cuda else _core
        self._plan = module.GatherPlan()
        self._bound = []  # keeps every source array alive while the plan points at it
        self._outputs: list[tuple[int, np.dtype, torch.dtype, bool]] = []
        self.keys: list[str] = []
        for key, field in fields.items():
            if not plannable(field):
                continue
            storage = field.storage
            bound = storage.bound(device)
            out_dtype = field.dtype.name
            if storage.kind == "csr":
                self._plan.add_csr(*bound._args, out_dtype)
            else:
                self._plan.add_dense(*bound._args, out_dtype)
            self._bound.append(bound)
            squeeze = storage.kind == "dense" and storage.squeeze
            self._outputs.append((storage.n_cols, field.dtype, torch_dtype(field.dtype), squeeze))
            self.keys.append(key)
        if cuda:
            self._device_index = device.index if device.index is not None else torch.cuda.current_device()
            self._bad_slot = bad_row_slot(device).data_ptr()

    def __len__(self) -> int:
        return len(self.keys)

    def gather(self, rows: np.ndarray | torch.Tensor, pool: BufferPool | None, as_numpy: bool) -> dict[str, Any]:
        """{key: (len(rows), n_cols) output} for int64/int32 rows on the plan's device.

        Host outputs come from ``pool`` when given (see BufferPool); ``as_numpy`` returns numpy
        arrays (host only), else torch tensors.
        """
        if self.device.type == "cuda":
            return self._gather_cuda(rows)
        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        if rows.dtype not in _ROW_DTYPES or rows.ndim != 1 or not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        n = rows.shape[0]
        arrays = [pool.empty((n, n_cols), dtype) if pool is not None else np.empty((n, n_cols), dtype)
                  for n_cols, dtype, _, _ in self._outputs]
        tensors = [torch.from_numpy(a) for a in arrays]
        self._plan.gather(rows.ctypes.data, _ROW_DTYPES[rows.dtype], n, [t.data_ptr() for t in tensors])
        results = arrays if as_numpy else tensors
        return {key: (out.reshape(n) if spec[3] else out)
                for key, out, spec in zip(self.keys, results, self._outputs)}

    def _gather_cuda(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if rows.dtype not in _ROW_DTYPES or rows.dim() != 1 or not rows.is_contiguous() or rows.device != self.device:
            rows = rows.to(device=self.device, dtype=torch.int64).contiguous().reshape(-1)
        n = rows.shape[0]
        device = self.device
        outputs = [torch.empty((n, n_cols), dtype=dtype, device=device) for n_cols, _, dtype, _ in self._outputs]
        self._plan.gather(self._device_index, current_stream_handle(self._device_index),
                          rows.data_ptr(), _ROW_DTYPES[rows.dtype], n, [o.data_ptr() for o in outputs],
                          self._bad_slot)
        return {key: (out.reshape(n) if spec[3] else out)
                for key, out, spec in zip(self.keys, outputs, self._outputs)}
