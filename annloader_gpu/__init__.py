"""annloader_gpu: a GPU-resident drop-in replacement for scvi-tools' AnnDataLoader."""

__version__ = "0.1.0"

from ._build_info import build_info
from ._cuda_module import CudaUnavailableError, gpu_usable
from .distributed import distributed_loader, init_distributed
from .kernels import get_num_threads, set_num_threads
from .loader import AnnDataLoader
from .registry import AnnDataRegistry, setup_anndata
from .sampler import BatchDistributedSampler
from .synthetic import default_dataset, make_counts_adata

__all__ = [
    "AnnDataLoader",
    "AnnDataRegistry",
    "BatchDistributedSampler",
    "CudaUnavailableError",
    "__version__",
    "build_info",
    "default_dataset",
    "distributed_loader",
    "get_num_threads",
    "gpu_usable",
    "init_distributed",
    "make_counts_adata",
    "set_num_threads",
    "setup_anndata",
]
