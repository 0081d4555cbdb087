"""Page-locked host copies for ``residency="pinned"``, as large as the data (in whole pages).

torch's ``tensor.pin_memory()`` goes through its caching host allocator, which rounds every
request up to a power of two and keeps freed blocks for reuse: a 40 GB matrix would hold 64 GB
of page-locked memory, and keep holding it after the last loader is gone. Here each array is
copied into page-aligned whole pages of a numpy buffer, registered with ``cudaHostRegister``
(the CUDA kernels then read it in place), and unregistered just before that buffer is freed:
the finalizer sits on the numpy array that owns the memory, which every torch view keeps alive.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from types import ModuleType

import numpy as np
import torch

from ._cuda_module import require_cuda_module

__all__ = ["pinned_copy", "readable_by_cuda", "registered_bytes"]

_lock = threading.Lock()
_registered: dict[int, int] = {}  # address -> bytes of each live registered buffer


def pinned_copy(array: np.ndarray | torch.Tensor, device: torch.device, *,
                cuda_module: ModuleType | None = None) -> torch.Tensor:
    """A copy of ``array`` in page-locked host memory that CUDA kernels on ``device`` can read.

    An empty array needs no memory and is returned as an ordinary (empty) host tensor.
    ``cuda_module`` is for tests (the CPU emulation of the CUDA module).
    """
    source = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if source.device.type != "cpu":
        raise ValueError(f"only host data is pinned; this array is on {source.device}")
    nbytes = source.numel() * source.element_size()
    if nbytes == 0:
        return torch.empty(source.shape, dtype=source.dtype)
    if source.is_contiguous() and source.is_pinned():  # already page-locked: as pin_memory() did
        return source
    cuda = cuda_module if cuda_module is not None else require_cuda_module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Whole pages, page-aligned (older drivers insist on it; at most two pages more than the data).
    page = mmap.PAGESIZE
    span = -(-nbytes // page) * page
    owner = np.empty(span + page, dtype=np.uint8)
    start = -owner.ctypes.data % page
    region = owner[start:start + span]
    copy = torch.from_numpy(region[:nbytes]).view(source.dtype).view(source.shape)
    copy.copy_(source)
    address = region.ctypes.data
    try:
        cuda.host_register(index, address, span)
    except RuntimeError as refused:
        # Some systems refuse registration (virtualised GPUs, devices that cannot read registered
        # memory through its host address); torch's own pinned allocator may still work there.
        try:
            return source.contiguous().pin_memory()
        except RuntimeError as exc:
            raise RuntimeError(f"could not page-lock {nbytes} bytes: {refused}; and pin_memory(): {exc}") from exc
    with _lock:
        _registered[address] = span
    # On the array that owns the memory, which every view (numpy or torch) keeps alive. Not at
    # interpreter exit: the process's memory goes with it, and CUDA may be torn down.
    weakref.finalize(owner, _unregister, cuda, index, address).atexit = False
    return copy


def _unregister(cuda: ModuleType, index: int, address: int) -> None:
    with _lock:
        _registered.pop(address, None)
    cuda.host_unregister(index, address)


def readable_by_cuda(tensor: torch.Tensor) -> bool:
    """Whether CUDA kernels may read this host tensor in place: it lies in memory registered
    here or pinned by torch (an empty tensor has nothing to read)."""
    if tensor.numel() == 0:
        return True
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    with _lock:
        if any(a <= start and end <= a + n for a, n in _registered.items()):
            return True
    return tensor.is_pinned()


def registered_bytes() -> int:
    """Bytes of host memory registered by :func:`pinned_copy` and not yet released."""
    with _lock:
        return sum(_registered.values())
