"""Bad loader input gives a clear error naming the problem, before any batch is produced."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, SequentialSampler

import annloader_gpu
from _reference import FULL_SETUP, FakeManager, make_adata, make_counts
from annloader_gpu import CudaUnavailableError
from annloader_gpu.loader import AnnDataLoader
from annloader_gpu.registry import setup_anndata


@pytest.fixture(scope="module")
def registry():
    return setup_anndata(make_adata("csr"), **FULL_SETUP)


def fake(x, n_obs: int = 97, **extra):
    adata = make_adata("csr", n_obs=n_obs)
    return FakeManager(adata, {"X": x, **extra})


# --- loader arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, None, "8"])
def test_bad_batch_size(registry, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        AnnDataLoader(registry, batch_size=batch_size, device="cpu")


def test_sampler_and_distributed_sampler(registry):
    sampler = BatchSampler(SequentialSampler(range(97)), 8, False)
    with pytest.raises(ValueError, match="both `sampler` and `distributed_sampler`"):
        AnnDataLoader(registry, sampler=sampler, distributed_sampler=True, device="cpu")


def test_distributed_options_need_distributed_sampler(registry):
    with pytest.raises(TypeError, match="num_replicas.*distributed_sampler=True"):
        AnnDataLoader(registry, num_replicas=2, rank=0, device="cpu")


def test_distributed_sampler_without_process_group(registry):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised")
    with pytest.raises(ValueError, match="num_replicas and rank"):
        AnnDataLoader(registry, distributed_sampler=True, device="cpu")


@pytest.mark.parametrize("residency", ["gpu", "", None, "Device"])
def test_bad_residency(registry, residency):
    with pytest.raises(ValueError, match="residency must be one of 'auto', 'device', 'pinned', 'host'"):
        AnnDataLoader(registry, residency=residency, device="cpu")


@pytest.mark.parametrize("residency", ["device", "pinned"])
def test_gpu_residency_on_cpu(registry, residency):
    with pytest.raises(ValueError, match=f"residency='{residency}' needs a CUDA device"):
        AnnDataLoader(registry, residency=residency, device="cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3.5, "meta"])
def test_bad_device(registry, device):
    with pytest.raises(ValueError, match="device"):
        AnnDataLoader(registry, device=device)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_without_gpu(registry, device):
    if annloader_gpu.gpu_usable() and torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    with pytest.raises(CudaUnavailableError, match="device='cpu'"):
        AnnDataLoader(registry, device=device)


def test_iter_ndarray_needs_host(registry):
    if not (annloader_gpu.gpu_usable() and torch.cuda.is_available()):
        pytest.skip("needs a usable GPU to get past device resolution")
    with pytest.raises(ValueError, match="iter_ndarray"):
        AnnDataLoader(registry, iter_ndarray=True, device="cuda")


# --- keys and dtypes --------------------------------------------------------------------------


@pytest.mark.parametrize("data_and_attributes", [["X", "nope"], {"nope": np.float32}])
def test_unknown_key_names_registered_keys(registry, data_and_attributes):
    with pytest.raises(KeyError, match=r"'nope' not found in the data registry; registered keys: \['X'"):
        AnnDataLoader(registry, data_and_attributes=data_and_attributes, device="cpu")


def test_data_and_attributes_type(registry):
    with pytest.raises(ValueError, match="must be a `list`, `dict`, or `None`"):
        AnnDataLoader(registry, data_and_attributes=("X",), device="cpu")


def test_bad_dtype(registry):
    with pytest.raises(TypeError, match=r"data_and_attributes\['X'\]"):
        AnnDataLoader(registry, data_and_attributes={"X": "not-a-dtype"}, device="cpu")


# --- indices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("indices", [[0, 97], [-98], np.array([5, 1000])])
def test_indices_out_of_range(registry, indices):
    with pytest.raises(IndexError, match="out of range for an AnnData with n_obs=97"):
        AnnDataLoader(registry, indices=indices, device="cpu")


def test_mask_of_wrong_length(registry):
    with pytest.raises(IndexError, match="boolean indices have length 50; expected n_obs=97"):
        AnnDataLoader(registry, indices=np.ones(50, dtype=bool), device="cpu")


def test_float_and_2d_indices(registry):
    with pytest.raises(TypeError, match="integers or a boolean mask"):
        AnnDataLoader(registry, indices=[0.5, 1.0], device="cpu")
    with pytest.raises(ValueError, match="1-dimensional"):
        AnnDataLoader(registry, indices=np.zeros((2, 2), dtype=int), device="cpu")


def test_sampler_position_out_of_range(registry):
    loader = AnnDataLoader(registry, sampler=[[0, 1], [200]], device="cpu")
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(IndexError):
        next(iterator)


# --- registry objects -----------------------------------------------------------------------------


def test_anndata_instead_of_manager():
    with pytest.raises(TypeError, match="Expected a registry, got an AnnData"):
        AnnDataLoader(make_adata("csr"), device="cpu")


def test_manager_without_adata():
    manager = FakeManager(None, {})
    with pytest.raises(TypeError, match="adata is None"):
        AnnDataLoader(manager, device="cpu")


# --- the data behind each key ------------------------------------------------------------------------


def _csr(n_obs=97, n_vars=31):
    return sp.csr_matrix(make_counts(n_obs, n_vars, seed=2))


def test_matrix_rows_disagree_with_obs():
    with pytest.raises(ValueError, match=r"registry key 'X' \(adata.obsm\['X'\]\) has 90 rows but the AnnData has n_obs=97"):
        AnnDataLoader(fake(_csr(n_obs=90)), device="cpu")
    with pytest.raises(ValueError, match="'emb'.*has 96 rows"):
        AnnDataLoader(fake(_csr(), emb=np.zeros((96, 2))), device="cpu")


def test_unsorted_column_indices():
    x = _csr()
    row = 1
    begin, end = x.indptr[row], x.indptr[row + 1]
    assert end - begin >= 2
    x.indices[begin:end] = x.indices[begin:end][::-1].copy()
    with pytest.raises(ValueError, match="registry key 'X'.*not in canonical format.*sum_duplicates"):
        AnnDataLoader(fake(x), device="cpu")


def test_duplicate_column_indices():
    x = _csr()
    begin = x.indptr[1]
    x.indices[begin + 1] = x.indices[begin]
    with pytest.raises(ValueError, match="registry key 'X'.*not in canonical format"):
        AnnDataLoader(fake(x), device="cpu")


def test_unsorted_csc_row_indices():
    x = sp.csc_matrix(make_counts(97, 31, seed=2))
    begin, end = x.indptr[0], x.indptr[1]
    x.indices[begin:end] = x.indices[begin:end][::-1].copy()
    with pytest.raises(ValueError, match=r"\(CSC\) is not in canonical format \(unsorted or duplicate row"):
        AnnDataLoader(fake(x), device="cpu")


def test_non_monotonic_indptr():
    x = _csr()
    x.indptr[5] = x.indptr[6] + 1
    with pytest.raises(ValueError, match="registry key 'X'.*indptr that is not non-decreasing"):
        AnnDataLoader(fake(x), device="cpu")


def test_column_index_out_of_range():
    x = _csr()
    x.indices[x.indptr[2] - 1] = 31  # the last entry of row 1
    with pytest.raises(ValueError, match=r"column indices outside \[0, 31\)"):
        AnnDataLoader(fake(x), device="cpu")


def test_coo_matrix():
    with pytest.raises(TypeError, match="COO sparse matrix; only CSR and CSC"):
        AnnDataLoader(fake(_csr().tocoo()), device="cpu")


def test_non_numeric_fields():
    strings = np.array([f"s{i}" for i in range(97)], dtype=object).reshape(-1, 1)
    with pytest.raises(ValueError, match="'labels'.*non-numeric"):
        AnnDataLoader(fake(_csr(), labels=strings), device="cpu")
    with pytest.raises(ValueError, match="'labels'.*dtype <U"):
        AnnDataLoader(fake(_csr(), labels=strings.astype(str)), device="cpu")
    table = pd.DataFrame({"a": np.arange(97.0), "b": ["x"] * 97})
    with pytest.raises(ValueError, match=r"'cov'.*non-numeric columns \['b'\]"):
        AnnDataLoader(fake(_csr(), cov=table), device="cpu")
    with pytest.raises(ValueError, match="'X'.*complex"):
        AnnDataLoader(fake(np.zeros((97, 3), dtype=np.complex64)), device="cpu")


def test_unsupported_container():
    with pytest.raises(TypeError, match="'X'.*builtins.list; expected an in-memory numpy array"):
        AnnDataLoader(fake([[0.0]] * 97), device="cpu")


def test_errors_come_before_any_batch():
    """A broken field after a good one: the constructor fails, no iteration is needed."""
    x = _csr()
    bad = sp.csr_matrix(np.eye(97, 4))
    bad.indices[0] = 9
    manager = fake(x, extra=bad)
    with pytest.raises(ValueError, match="'extra'"):
        AnnDataLoader(manager, device="cpu")
    # Only the selected keys are prepared (and validated).
    assert len(list(AnnDataLoader(manager, data_and_attributes=["X"], device="cpu", batch_size=50))) == 2


class _PlacementProbe:
    """Stands in for PreparedData in place(): which placements were tried, and which fail."""

    resident_bytes = 12_345
    fields: dict = {}

    def __init__(self, failing: set[str]):
        self.failing, self.tried = failing, []

    def to(self, device, *, pin=False):
        kind = "pinned" if pin else "device"
        self.tried.append(kind)
        if kind in self.failing:
            raise torch.cuda.OutOfMemoryError(f"{kind} placement failed")
        return f"placed:{kind}"


@pytest.mark.parametrize(("failing", "expected"), [
    (set(), ("placed:device", "device")),
    ({"device"}, ("placed:pinned", "pinned")),
    ({"device", "pinned"}, (None, "host")),
])
def test_auto_placement_falls_back_device_pinned_host(failing, expected):
    from annloader_gpu.residency import place

    probe = _PlacementProbe(failing)
    placed, residency = place(probe, torch.device("cuda", 0), "device", "auto")
    assert residency == expected[1]
    assert placed == (probe if expected[0] is None else expected[0])
    assert probe.tried == ["device", "pinned"][: len(failing) + 1]


@pytest.mark.parametrize("residency", ["device", "pinned"])
def test_explicit_placement_failure_names_the_bytes_and_what_to_try(residency):
    from annloader_gpu.residency import place

    probe = _PlacementProbe({"device", "pinned"})
    with pytest.raises(RuntimeError, match=f"could not place 12345 bytes with residency='{residency}'") as info:
        place(probe, torch.device("cuda", 0), residency, residency)
    assert probe.tried == [residency]  # no fallback when the user chose
    suggestion = str(info.value).split("; try ")[1]
    assert ("'pinned'" in suggestion) == (residency == "device") and "'host'" in suggestion
