"""annloader_gpu: a GPU-resident drop-in replacement for scvi-tools' AnnDataLoader."""

__version__ = "0.1.0"

from ._build_info import build_info
from ._cuda_module import CudaUnavailableError, gpu_usable
from .kernels import get_num_threads, set_num_threads

__all__ = [
    "CudaUnavailableError",
    "__version__",
    "build_info",
    "get_num_threads",
    "gpu_usable",
    "set_num_threads",
]
