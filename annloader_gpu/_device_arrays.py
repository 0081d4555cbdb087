"""Recognising data that already lives in GPU memory (CuPy / cupyx), and viewing it as torch tensors.

CuPy is optional and never imported here: an object can only be a CuPy array or a cupyx sparse
matrix if the user's program imported CuPy already, so the checks look the modules up in
``sys.modules``. Both checks are cheap and safe to call on anything.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["cupy_to_torch", "is_cupy_array", "is_cupy_sparse"]


def is_cupy_sparse(obj: Any) -> bool:
    """Whether obj is a cupyx.scipy.sparse matrix or array (any format)."""
    module = sys.modules.get("cupyx.scipy.sparse")
    if module is None:
        return False
    issparse = getattr(module, "issparse", None)
    return bool(issparse(obj)) if issparse is not None else False


def is_cupy_array(obj: Any) -> bool:
    """Whether obj is a cupy.ndarray."""
    module = sys.modules.get("cupy")
    ndarray = getattr(module, "ndarray", None) if module is not None else None
    return ndarray is not None and isinstance(obj, ndarray)


# Exact widenings for CuPy dtypes torch cannot wrap (none are expected with torch >= 2.3).
_WIDER = {"b": "uint8", "u": "int64", "i": "int64", "f": "float64"}


def cupy_to_torch(array: Any):
    """A torch tensor over a CuPy array's memory, on the array's GPU: no copy.

    ``torch.as_tensor`` reads ``__cuda_array_interface__`` and wraps the pointer (the tensor keeps
    the CuPy array alive). The device is synchronised first, once, so that work CuPy queued on
    another stream has finished before torch's stream reads the memory.
    """
    import numpy as np
    import torch

    device = torch.device("cuda", int(array.device.id))
    array.device.synchronize()
    if array.size == 0:  # a null pointer: make an empty tensor of the same dtype and shape instead
        try:
            dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        except TypeError:
            dtype = torch.from_numpy(np.empty(0, dtype=_WIDER.get(array.dtype.kind, "float64"))).dtype
        return torch.empty(tuple(array.shape), dtype=dtype, device=device)
    try:
        return torch.as_tensor(array, device=device)
    except (TypeError, RuntimeError, ValueError):
        pass
    # Layouts torch cannot wrap (negative strides, say): a C-contiguous copy, on the GPU.
    import cupy

    array = cupy.ascontiguousarray(array)
    try:
        return torch.as_tensor(array, device=device)
    except (TypeError, RuntimeError, ValueError):
        wider = _WIDER.get(array.dtype.kind)
        if wider is None or array.dtype == np.dtype(wider):
            raise TypeError(f"cannot view a CuPy array of dtype {array.dtype} as a torch tensor") from None
        return torch.as_tensor(array.astype(wider), device=device)
