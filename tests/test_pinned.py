"""Pinned residency's host copies: exact size, registered with CUDA while any view lives.

The registration calls go to ``_cuda_emulated`` (the CUDA module's bindings compiled for the
CPU), whose cudaHostRegister keeps the runtime's bookkeeping and errors: registering an
overlapping range, or unregistering an address that is not registered, fails as on a GPU.
"""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from annloader_gpu import pinned
from annloader_gpu.storage import CsrStorage, DenseStorage

try:
    from annloader_gpu import _cuda_emulated as emulated
except ImportError as exc:  # only where the build was configured with ANNLOADER_CUDA_EMULATION=OFF
    pytest.skip(f"annloader_gpu was built without the CUDA emulation ({exc})", allow_module_level=True)

CUDA0 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _emulated_cuda(monkeypatch):
    monkeypatch.setattr(pinned, "require_cuda_module", lambda: emulated)
    gc.collect()
    before = pinned.registered_bytes()
    yield
    gc.collect()
    assert pinned.registered_bytes() == before, "a test left host memory registered"


@pytest.mark.parametrize("array", [
    np.arange(7 * 5, dtype=np.float32).reshape(7, 5) - 3.5,
    np.arange(1, 1001, dtype=np.uint16),
    np.array([-(2**40), 3, 2**50], dtype=np.int64),
    torch.arange(12, dtype=torch.float64).reshape(3, 4)[:, 1:],  # a non-contiguous tensor
], ids=["float32-2d", "uint16", "int64", "strided-tensor"])
def test_copy_is_equal_exactly_sized_and_readable(array):
    before = pinned.registered_bytes()
    copy = pinned.pinned_copy(array, CUDA0)
    expected = torch.as_tensor(array)
    assert copy.dtype == expected.dtype and copy.shape == expected.shape and copy.is_contiguous()
    assert torch.equal(copy, expected)
    nbytes = expected.numel() * expected.element_size()
    # Whole pages, page-aligned: not a power of two.
    assert pinned.registered_bytes() - before == -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    assert copy.data_ptr() % mmap.PAGESIZE == 0
    assert pinned.readable_by_cuda(copy) and pinned.readable_by_cuda(copy[1:])


def test_registration_lasts_while_any_view_lives():
    copy = pinned.pinned_copy(np.arange(100, dtype=np.float32), CUDA0)
    address = copy.data_ptr()
    view = copy[10:20].view(torch.int32)
    del copy
    gc.collect()
    assert pinned.registered_bytes() == mmap.PAGESIZE and pinned.readable_by_cuda(view)
    del view
    gc.collect()
    assert pinned.registered_bytes() == 0
    # The finalizer really unregistered it with the runtime: a second unregister is refused.
    with pytest.raises(RuntimeError, match="cudaErrorHostMemoryNotRegistered"):
        emulated.host_unregister(0, address)


def test_empty_arrays_need_no_registration_and_are_readable():
    copy = pinned.pinned_copy(np.zeros((0, 3), np.float32), CUDA0)
    assert copy.shape == (0, 3) and pinned.registered_bytes() == 0
    assert pinned.readable_by_cuda(copy)


def test_ordinary_host_memory_is_not_readable():
    assert not pinned.readable_by_cuda(torch.ones(4))


class _RefusingRegistration:
    """A CUDA module whose cudaHostRegister fails, as on systems that cannot register memory."""

    @staticmethod
    def host_register(device, address, nbytes):
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: cudaErrorNotSupported")


def test_a_refused_registration_leaves_nothing_registered(monkeypatch):
    monkeypatch.setattr(pinned, "require_cuda_module", lambda: _RefusingRegistration)
    # torch's pin_memory() is the fallback; on this CPU-only torch it fails too, and both say why.
    with pytest.raises(RuntimeError, match=r"could not page-lock 40 bytes: cudaHostRegister of \d+ bytes failed.*pin_memory"):
        pinned.pinned_copy(np.ones(10, np.float32), CUDA0)
    assert pinned.registered_bytes() == 0


def test_a_refused_registration_falls_back_to_torch_pinned_memory(monkeypatch):
    monkeypatch.setattr(pinned, "require_cuda_module", lambda: _RefusingRegistration)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone().add_(1))  # stand-in, marked
    source = np.arange(6, dtype=np.float32)
    copy = pinned.pinned_copy(source, CUDA0)
    assert torch.equal(copy, torch.from_numpy(source) + 1)
    assert pinned.registered_bytes() == 0


def test_already_pinned_tensors_are_used_as_they_are(monkeypatch):
    tensor = torch.arange(5.0)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.data_ptr() == tensor.data_ptr())
    assert pinned.pinned_copy(tensor, CUDA0) is tensor
    assert pinned.registered_bytes() == 0


def test_device_data_is_not_pinned():
    with pytest.raises(ValueError, match="only host data"):
        pinned.pinned_copy(torch.ones(3, device="meta"), CUDA0)


def test_storage_placed_in_pinned_memory_is_released_with_its_last_user():
    m = sp.random(50, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    storage = CsrStorage(m.indptr, m.indices.astype(np.uint16), m.data, 50, 30)
    dense = DenseStorage(np.arange(50 * 3, dtype=np.int64).reshape(50, 3))
    placed, placed_dense = storage.to(CUDA0, pin=True), dense.to(CUDA0, pin=True)
    assert storage.to(CUDA0, pin=True) is placed  # shared while held
    assert placed.nbytes + placed_dense.nbytes == storage.nbytes + dense.nbytes
    arrays = (placed.indptr, placed.indices, placed.values, placed_dense.values)
    pages = sum(-(-a.numel() * a.element_size() // mmap.PAGESIZE) for a in arrays)
    del arrays
    assert pinned.registered_bytes() == pages * mmap.PAGESIZE
    assert torch.equal(placed.values, torch.from_numpy(m.data))
    assert placed.indices.dtype == torch.uint16 and all(
        pinned.readable_by_cuda(a) for a in (placed.indptr, placed.indices, placed.values, placed_dense.values))
    del placed, placed_dense
    gc.collect()
    assert pinned.registered_bytes() == 0
