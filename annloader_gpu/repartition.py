"""Re-partitioning sharded residency between epochs, device to device (no host round trip).

Every rank holds a seeded random partition of the rows (:func:`~annloader_gpu.distributed.
partition_positions`). :func:`exchange_partition` moves each held row to the rank that owns it
under the partition of another round: every rank computes the new owners itself (index
arithmetic on the host, O(n) integers, no data), then each prepared field is exchanged with
``torch.distributed.all_to_all_single`` on the device where it lives (NCCL between GPUs, gloo on
the CPU), ragged CSR rows included, and re-sorted by observation id. The matrix never leaves the
devices: what crosses the host is the row ids and per-rank counts.

Memory: while a field is exchanged a rank holds its old storage, the rows it sends, the rows it
receives and their re-sorted copy (the send copy is freed before the re-sort): up to about four
copies of that field's partition, one field at a time, plus bounded temporaries (the entry
index of a chunk of rows, ~16 bytes x 2^24). Cached GPU blocks are released afterwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .compact import compact_indptr_dtype
from .dataset import Field, PreparedData
from .storage import CsrStorage, DenseStorage

__all__ = ["exchange_partition", "owners"]


def owners(n: int, num_replicas: int, seed: int, round_: int) -> np.ndarray:
    """owner[p]: the rank holding position p in the given round (see partition_positions)."""
    from .distributed import partition_seed_sequence

    rng = np.random.Generator(np.random.PCG64(partition_seed_sequence(seed, round_)))
    perm = rng.permutation(n)
    owner = np.empty(n, dtype=np.int64)
    owner[perm] = np.arange(n, dtype=np.int64) % num_replicas
    return owner


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, 1-D: collectives move bytes, and neither NCCL nor every torch op has
    every dtype the storage uses (uint16, int16)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _alltoall(tensor: torch.Tensor, send_rows: list[int], recv_rows: list[int], row_elements: int = 1) -> torch.Tensor:
    """all_to_all_single of a tensor whose leading-dimension splits are send_rows/recv_rows."""
    item = tensor.element_size() * row_elements
    out = torch.empty(sum(recv_rows) * item, dtype=torch.uint8, device=tensor.device)
    dist.all_to_all_single(out, _byte_view(tensor), output_split_sizes=[r * item for r in recv_rows],
                           input_split_sizes=[r * item for r in send_rows])
    shape = (sum(recv_rows),) + tuple(tensor.shape[1:])
    return out.view(tensor.dtype).reshape(shape)


def _exchange_counts(counts: list[int], device: torch.device) -> list[int]:
    send = torch.tensor(counts, dtype=torch.int64, device=device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return [int(v) for v in recv.tolist()]


def _same_bits(tensor: torch.Tensor) -> torch.Tensor:
    """uint16 as its int16 view (same bits): indexing is not built for uint16 everywhere."""
    return tensor.view(torch.int16) if tensor.dtype == torch.uint16 else tensor


def _take_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values[rows] along dim 0, for any dtype."""
    return _same_bits(values)[rows].view(values.dtype)


def _csr_rows(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
              chunk_entries: int = 1 << 24):
    """(lengths, indices, values) of CSR rows ``rows``, in that order (torch ops, any device).

    The entries are gathered in chunks of about ``chunk_entries``: the int64 entry index a chunk
    needs (8 bytes per non-zero) stays bounded instead of growing with the partition, which on a
    GPU nearly full of compact storage (3-8 bytes per non-zero) would not fit.
    """
    ptr = indptr.to(torch.int64)
    starts = ptr[rows]
    lengths = ptr[rows + 1] - starts
    del ptr
    ends = torch.cumsum(lengths, 0)
    total = int(ends[-1]) if len(rows) else 0
    out_indices = torch.empty(total, dtype=indices.dtype, device=indices.device)
    out_values = torch.empty(total, dtype=values.dtype, device=values.device)
    if total == 0:
        return lengths, out_indices, out_values
    ends_host = ends.cpu().numpy()
    shift = starts - (ends - lengths)  # per row: source entry minus destination entry

    first = 0
    while first < len(rows):
        begin = int(ends_host[first - 1]) if first else 0
        last = max(int(np.searchsorted(ends_host, begin + chunk_entries, side="right")), first + 1)
        end = int(ends_host[last - 1])
        if end > begin:
            entry = torch.repeat_interleave(shift[first:last], lengths[first:last], output_size=end - begin)
            entry += torch.arange(begin, end, device=rows.device)
            _same_bits(out_indices)[begin:end] = _same_bits(indices)[entry]
            _same_bits(out_values)[begin:end] = _same_bits(values)[entry]
        first = last
    return lengths, out_indices, out_values


def _as_tensor(array: Any, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    return tensor.to(device)


def _back_on_host(tensor: torch.Tensor, like: Any) -> Any:
    return tensor.numpy() if isinstance(like, np.ndarray) else tensor


def exchange_partition(prepared: PreparedData, held: np.ndarray, new_owner: np.ndarray, order_key: np.ndarray,
                       device: torch.device) -> tuple[dict[str, Field], np.ndarray]:
    """Sends every held row to its new owner; returns this rank's new fields and held positions.

    ``held``: the positions (into the sharded index space) of the rows this rank holds, in
    storage order. ``new_owner``: owner of every position in the new round (:func:`owners`).
    ``order_key``: per position, what the new storage is sorted by (the observation ids, as at
    set-up). Collective: every rank of the default process group calls it, in the same order.
    """
    world = dist.get_world_size()
    destination = new_owner[held]
    send_order = np.argsort(destination, kind="stable")  # grouped by destination, sorted within
    send_rows = np.bincount(destination, minlength=world).astype(np.int64).tolist()
    recv_rows = _exchange_counts(send_rows, device)
    order = torch.from_numpy(send_order).to(device)
    received_ids = _alltoall(torch.from_numpy(held[send_order]).to(device), send_rows, recv_rows)
    arrived = received_ids.cpu().numpy()  # ids only: the data stays on the device
    sort_np = np.argsort(order_key[arrived], kind="stable")
    sort = torch.from_numpy(sort_np).to(device)
    new_held = arrived[sort_np]
    fields: dict[str, Field] = {}
    for key, field in prepared.fields.items():
        storage = field.storage
        if storage.kind == "dense":
            values = _as_tensor(storage.values, device)
            got = _alltoall(_take_rows(values, order), send_rows, recv_rows, row_elements=values.shape[1])
            new = DenseStorage(_back_on_host(_take_rows(got, sort).contiguous(), storage.values),
                               squeeze=storage.squeeze)
        elif storage.kind == "csr":
            indptr, indices, values = (_as_tensor(a, device) for a in (storage.indptr, storage.indices, storage.values))
            lengths, send_indices, send_values = _csr_rows(indptr, indices, values, order)
            send_nnz = [int(v) for v in torch.stack([c.sum() for c in torch.split(lengths, send_rows)]).tolist()] \
                if len(lengths) else [0] * world
            recv_nnz = _exchange_counts(send_nnz, device)
            got_lengths = _alltoall(lengths, send_rows, recv_rows)
            got_indices = _alltoall(send_indices, send_nnz, recv_nnz)
            got_values = _alltoall(send_values, send_nnz, recv_nnz)
            del lengths, send_indices, send_values  # sent: free them before the receive side's gather
            got_indptr = torch.cat((torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(got_lengths, 0)))
            new_lengths, new_indices, new_values = _csr_rows(got_indptr, got_indices, got_values, sort)
            new_indptr = torch.cat((torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(new_lengths, 0)))
            indptr_dtype = torch.from_numpy(np.empty(0, compact_indptr_dtype(int(new_indptr[-1])))).dtype
            new = CsrStorage(_back_on_host(new_indptr.to(indptr_dtype), storage.indptr),
                             _back_on_host(new_indices.contiguous(), storage.indices),
                             _back_on_host(new_values.contiguous(), storage.values),
                             len(new_held), storage.n_cols, source_format=storage.source_format,
                             batch_index_dtype=storage.batch_index_dtype)
        else:
            raise TypeError(
                f"registry key {key!r} is sliced on the host (dtype {getattr(storage.source, 'dtype', '?')}): "
                "it cannot be re-partitioned on the device; register it with a numeric dtype"
            )
        fields[key] = Field(key, new, field.dtype, sparse_output=field.sparse_output)
    return fields, new_held
