"""What was compiled, and whether a GPU is usable now."""

from __future__ import annotations

import platform

import numpy as np
import torch

from . import _core
from ._cuda_module import cuda_import_error, cuda_module_or_none


def _version_string(encoded: int) -> str:
    return f"{encoded // 1000}.{(encoded % 1000) // 10}" if encoded else "none"


def build_info() -> dict:
    """A dict describing the build and the GPU situation; safe on machines without a driver."""
    from . import __version__

    cuda = cuda_module_or_none()
    info: dict = {
        "version": __version__,
        "cpu_module": True,
        "cpu_compiler": _core.compiler,
        "cpu_threads": _core.get_num_threads(),
        "cuda_compiled": cuda is not None,
        "cuda_architectures": cuda.architectures.split(",") if cuda is not None else [],
        "cuda_runtime": _version_string(cuda.runtime_version()) if cuda is not None else None,
        "cuda_driver": _version_string(cuda.driver_version()) if cuda is not None else None,
        "gpu_count": cuda.device_count() if cuda is not None else 0,
        "gpu_usable": False,
        "gpu_unusable_reason": None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if cuda is None:
        info["gpu_unusable_reason"] = "not compiled with CUDA" + (f" ({cuda_import_error()})" if cuda_import_error() else "")
    elif info["gpu_count"] == 0:
        info["gpu_unusable_reason"] = cuda.device_count_error() or "no CUDA device found"
    elif not torch.cuda.is_available():
        info["gpu_unusable_reason"] = "torch was built without CUDA, so it cannot allocate GPU tensors"
    else:
        info["gpu_usable"] = True
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]
    return info
