"""Access to the optional CUDA module, with a clear error where it is missing or unusable."""

from __future__ import annotations

import importlib
from types import ModuleType

_IMPORT_ERROR: str | None = None
try:
    _cuda: ModuleType | None = importlib.import_module("annloader_gpu._cuda")
except ImportError as exc:  # built without CUDA (ANNLOADER_CUDA=OFF or no nvcc at build time)
    _cuda = None
    _IMPORT_ERROR = str(exc)


class CudaUnavailableError(RuntimeError):
    """The GPU path was asked for where it cannot run."""


def cuda_module_or_none() -> ModuleType | None:
    return _cuda


def cuda_import_error() -> str | None:
    return _IMPORT_ERROR


def gpu_usable() -> bool:
    """True when the CUDA module is compiled in, a CUDA device answers, and torch can use it.

    torch allocates every GPU tensor the kernels read and write, so a CPU-only torch build makes
    the GPU path unusable even where the kernels and a device are present.
    """
    import torch

    return _cuda is not None and _cuda.device_count() > 0 and torch.cuda.is_available()


def require_cuda_module() -> ModuleType:
    """The CUDA module, or CudaUnavailableError saying why the GPU path cannot run."""
    if _cuda is None:
        raise CudaUnavailableError(
            "annloader_gpu was not compiled with CUDA (no CUDA compiler at build time, or "
            "ANNLOADER_CUDA=OFF); rebuild with nvcc on PATH, or use device='cpu'"
            + (f" [import error: {_IMPORT_ERROR}]" if _IMPORT_ERROR else "")
        )
    if _cuda.device_count() == 0:
        reason = _cuda.device_count_error() or "no CUDA device found"
        raise CudaUnavailableError(f"annloader_gpu has CUDA kernels but no usable GPU: {reason}; use device='cpu'")
    import torch

    if not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"torch {torch.__version__} was built without CUDA, so it cannot allocate GPU tensors; "
            "install a CUDA build of torch, or use device='cpu'"
        )
    return _cuda
