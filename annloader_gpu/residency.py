"""Where a loader's prepared data lives: the device batches are yielded on, and the residency.

``resolve_device`` turns the ``device`` argument into a torch device (a clear error where CUDA is
not usable); ``resolve_residency`` picks "device" (GPU memory), "pinned" (page-locked host memory
the CUDA kernels read in place), or "host" (the CPU gathers, then one copy per batch), and
``place`` moves the prepared data there, falling back for residency="auto" when a placement
fails and leaving nothing behind.
"""

from __future__ import annotations

from typing import Any

import torch

from ._cuda_module import CudaUnavailableError, gpu_usable, require_cuda_module
from .dataset import PreparedData

__all__ = ["DEVICE_MEMORY_BUDGET", "RESIDENCIES", "place", "resolve_device", "resolve_residency"]

RESIDENCIES = ("auto", "device", "pinned", "host")
#: residency="auto" keeps data in GPU memory when it needs at most this fraction of the free memory.
DEVICE_MEMORY_BUDGET = 0.5


def resolve_device(device: Any, *, iter_ndarray: bool = False) -> torch.device:
    """The device batches are yielded on: "cuda" by default when the GPU path is usable."""
    if device is None:
        device = "cuda" if gpu_usable() and torch.cuda.is_available() and not iter_ndarray else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r} ({exc})") from None
    if resolved.type == "cuda":
        require_cuda_module()  # CudaUnavailableError saying why
        if not torch.cuda.is_available():
            raise CudaUnavailableError(
                f"device={device!r}: annloader_gpu has CUDA kernels but this torch build "
                f"({torch.__version__}) cannot use CUDA; install a CUDA build of torch or use device='cpu'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise CudaUnavailableError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) found")
        if resolved.index is None:  # one name per GPU, so loaders share placed data
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device, got {resolved}")
    return resolved


def gpu_data_devices(prepared: PreparedData) -> list[torch.device]:
    """The GPUs on which prepared data already lives (CuPy / CUDA-tensor sources used in place)."""
    devices = {f.storage.device for f in prepared.fields.values()}
    return sorted((d for d in devices if d.type == "cuda"), key=str)


def bytes_to_place(prepared: PreparedData, device: torch.device) -> int:
    """Bytes of prepared storage not already on device (what residency='device' must copy there)."""
    sizes = {id(f.storage): f.storage.nbytes for f in prepared.fields.values() if f.storage.device != device}
    return int(sum(sizes.values()))


def _residency_of_gpu_data(residency: str, device: torch.device, bytes_needed: int,
                           data_devices: list[torch.device]) -> str:
    """Data already in GPU memory is gathered where it is: residency "device", never a host copy."""
    where = ", ".join(sorted({str(d) for d in data_devices}))
    if device.type == "cpu":
        raise ValueError(
            f"device={str(device)!r}, but registered data is already in GPU memory ({where}; e.g. a cupy array or "
            "cupyx sparse matrix): use device='cuda' to gather batches there, in place, or copy the data to the "
            "host first to load on the CPU (for cupy/cupyx data: adata.X = adata.X.get())"
        )
    if residency in ("pinned", "host"):
        raise ValueError(
            f"residency={residency!r} keeps the data in host memory, but registered data is already in GPU "
            f"memory ({where}): use residency='device' or 'auto' (GPU data is used in place, without a copy), "
            "or copy the data to the host first (for cupy/cupyx data: .get())"
        )
    if bytes_needed:
        free, _total = torch.cuda.mem_get_info(device)
        if bytes_needed > free:
            raise RuntimeError(
                f"residency={residency!r}: the data already in GPU memory ({where}) is used in place, but the rest "
                f"needs {bytes_needed} bytes on {device} and {free} bytes are free there; free GPU memory, or "
                "copy the GPU data to the host (.get()) and use residency='pinned' or 'host'"
            )
    return "device"


def resolve_residency(residency: Any, device: torch.device, bytes_needed: int, *,
                      data_devices: list[torch.device] | tuple = ()) -> str:
    """Where the prepared data lives: "host" on the CPU; on a GPU "device", "pinned" or "host".

    "auto" picks "device" when the data needs at most DEVICE_MEMORY_BUDGET of the free GPU
    memory, else "pinned" (page-locked host memory the kernels read through unified addressing).
    ``data_devices``: GPUs on which some of the data already lives (:func:`gpu_data_devices`).
    Such data is used in place: the residency is "device" ("auto" or "device" requested), and
    bytes_needed counts only what is not on ``device`` yet. A CPU device, or "pinned"/"host",
    is a ValueError saying what to use instead.
    """
    if residency not in RESIDENCIES:
        raise ValueError(f"residency must be one of {', '.join(map(repr, RESIDENCIES))}, got {residency!r}")
    if any(torch.device(d).type == "cuda" for d in data_devices):
        return _residency_of_gpu_data(residency, device, bytes_needed, [torch.device(d) for d in data_devices])
    if device.type == "cpu":
        if residency not in ("auto", "host"):
            raise ValueError(
                f"residency={residency!r} needs a CUDA device; with device='cpu' the data stays in host "
                "memory (use residency='auto' or 'host')"
            )
        return "host"
    if residency in ("host", "pinned"):
        return residency
    free, _total = torch.cuda.mem_get_info(device)
    if residency == "device":
        if bytes_needed > free:
            raise RuntimeError(
                f"residency='device' needs {bytes_needed} bytes of GPU memory but {free} bytes are free on "
                f"{device}; use residency='pinned' (kernels read page-locked host memory) or 'host'"
            )
        return "device"
    return "device" if bytes_needed <= DEVICE_MEMORY_BUDGET * free else "pinned"


_FALLBACKS = {"device": ("device", "pinned", "host"), "pinned": ("pinned", "host"), "host": ("host",)}


def _free_gpu_bytes(device: torch.device) -> int | None:
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):  # no usable CUDA (the message then says less)
        return None


def place(prepared: PreparedData, device: torch.device, residency: str, requested: str) -> tuple[PreparedData, str]:
    """prepared moved where residency says.

    A placement that fails half-way (out of GPU memory, pinning refused) leaves nothing behind:
    what it took is released, torch's cached blocks included. With residency="auto" the loader
    then falls back, device -> pinned -> host (not for data already in GPU memory, which is used
    where it is); an explicit residency raises an error naming the bytes.
    """
    attempts = _FALLBACKS[residency] if requested == "auto" and not gpu_data_devices(prepared) else (residency,)
    failure: BaseException | None = None
    for attempt in attempts:
        if attempt == "host":
            return prepared, attempt
        try:
            return prepared.to(device, pin=attempt == "pinned"), attempt
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            failure = exc
            torch.cuda.empty_cache()  # the half-built copy is garbage now: give its blocks back
    free = _free_gpu_bytes(device) if residency == "device" else None
    raise RuntimeError(
        f"could not place {prepared.resident_bytes} bytes with residency={residency!r} on {device}"
        + (f" ({free} bytes of GPU memory free)" if free is not None else "")
        + f": {failure}; try "
        + ("residency='pinned' (page-locked host memory the kernels read) or 'host'" if residency == "device"
           else "residency='host' (gathered on the CPU, then copied)")
    ) from failure
