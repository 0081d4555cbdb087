"""Shared test helpers: the devices x dtypes matrix, random CSR matrices, poisoned outputs.

One helper builds every device/dtype parametrisation (pytorch_scatter style), so all test files
run the same matrix: ``cpu`` always, ``cuda`` only where :func:`annloader_gpu.gpu_usable` says a
GPU answers. GPU parameters carry the ``gpu`` marker and, where no GPU is usable, a skip with the
reason, so a CPU-only run reports them as skipped rather than silently dropping them.

Other test files import these helpers directly (``from conftest import ...``; pytest puts the
``tests`` directory on ``sys.path``) or use the fixtures below.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import annloader_gpu
from annloader_gpu._cuda_module import cuda_import_error, cuda_module_or_none


def _load_emulated_module_override() -> None:
    """ANNLOADER_CUDA_EMULATED_SO names another build of ``_cuda_emulated`` (sanitize_emulated.sh
    builds one under AddressSanitizer) that the tests use instead of the installed one."""
    import importlib.util
    import os
    import sys

    path = os.environ.get("ANNLOADER_CUDA_EMULATED_SO")
    if not path:
        return
    spec = importlib.util.spec_from_file_location("annloader_gpu._cuda_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["annloader_gpu._cuda_emulated"] = module
    annloader_gpu._cuda_emulated = module


_load_emulated_module_override()

# --- devices --------------------------------------------------------------------------------

GPU_USABLE: bool = annloader_gpu.gpu_usable()


def _gpu_skip_reason() -> str:
    if cuda_module_or_none() is None:
        return f"annloader_gpu was built without CUDA ({cuda_import_error() or 'no _cuda module'})"
    info = annloader_gpu.build_info()
    return f"no usable CUDA GPU ({info.get('gpu_unusable_reason') or 'no device'})"


GPU_MARKS = [pytest.mark.gpu] + ([] if GPU_USABLE else [pytest.mark.skip(reason=_gpu_skip_reason())])

#: Device names every test runs on; "cuda" is present only where a GPU is usable.
devices: list[str] = ["cpu"] + (["cuda"] if GPU_USABLE else [])


def device_param(device: str):
    """One pytest parameter for a device, with the gpu marker (and skip) for CUDA."""
    return pytest.param(device, marks=GPU_MARKS, id=device) if device == "cuda" else pytest.param(device, id=device)


#: All devices as pytest params: cuda is always listed (skipped with a reason on CPU machines).
DEVICE_PARAMS = [device_param("cpu"), device_param("cuda")]

# The dtype axes of the kernel tests: what the kernels read (values, column indices, indptr and
# row indices) and write.
VALUE_DTYPES = ["float32", "float64", "int32", "int64", "uint16", "uint8", "float16"]
OUTPUT_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32"]
COLUMN_INDEX_DTYPES = ["int32", "int64", "uint16"]
INDEX_DTYPES = ["int32", "int64"]


def matrix(names: str | Sequence[str], *axes: Iterable[Any], with_device: bool = True) -> tuple[str, list]:
    """The devices x dtypes matrix, as arguments for ``pytest.mark.parametrize``.

    ``matrix("value_dtype,out_dtype", VALUE_DTYPES, OUTPUT_DTYPES)`` returns
    ``("device,value_dtype,out_dtype", [pytest.param("cpu", "float32", "float32"), ...])`` with
    the CUDA rows marked ``gpu`` (and skipped, with the reason, where no GPU is usable).
    """
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if len(names) != len(axes):
        raise ValueError(f"{len(names)} names for {len(axes)} axes")
    combos = list(itertools.product(*axes))
    if not with_device:
        return ",".join(names), [pytest.param(*c, id="-".join(map(str, c))) for c in combos]
    params = []
    for device in ("cpu", "cuda"):
        marks = GPU_MARKS if device == "cuda" else []
        for c in combos:
            params.append(pytest.param(device, *c, marks=marks, id="-".join([device, *map(str, c)])))
    return ",".join(["device", *names]), params


def parametrize(names: str | Sequence[str], *axes: Iterable[Any], with_device: bool = True):
    """``pytest.mark.parametrize`` over :func:`matrix`."""
    argnames, params = matrix(names, *axes, with_device=with_device)
    return pytest.mark.parametrize(argnames, params)


#: ``@on_every_device``: parametrizes a test's ``device`` argument (works with hypothesis, which
#: refuses function-scoped fixtures such as :func:`device`).
on_every_device = pytest.mark.parametrize("device", DEVICE_PARAMS)


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    """Each device in turn: cpu always, cuda (marked gpu) skipped where no GPU is usable."""
    return request.param


# --- dtypes ----------------------------------------------------------------------------------

NUMPY_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "uint16": np.uint16,
    "uint8": np.uint8,
}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint16": torch.uint16,
    "uint8": torch.uint8,
}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(NUMPY_DTYPES[name])


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


# --- arrays ----------------------------------------------------------------------------------


def to_device(array, device: str | torch.device):
    """A numpy array or tensor as a torch tensor on ``device`` (numpy stays zero-copy on CPU)."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor.to(device)


def to_numpy(array) -> np.ndarray:
    """A tensor (any device, bfloat16 included as its bit pattern viewed back) or array, on the host."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            raise TypeError("numpy has no bfloat16; compare bfloat16 tensors with torch")
        return array.numpy()
    return np.asarray(array)


def random_values(rng: np.random.Generator, n: int, dtype: str | np.dtype) -> np.ndarray:
    """``n`` random non-zero values of ``dtype``: signed for signed types, fractional for floats.

    Integer values stay inside the int32 range (so every output cast is well defined), floats
    inside float16's finite range; none is zero, so a skipped write always shows.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        scale = 1000.0 if dtype.itemsize > 2 else 100.0
        v = rng.standard_normal(n) * rng.choice([0.01, 1.0, scale], size=n)
        v = v.astype(dtype)
        v[v == 0] = dtype.type(1.5)
        return v
    if dtype.kind == "u":
        hi = min(np.iinfo(dtype).max, 60000)
        return rng.integers(1, hi, size=n, endpoint=True).astype(dtype)
    lim = min(np.iinfo(dtype).max, 2**31 - 1)
    v = rng.integers(-lim, lim, size=n, endpoint=True).astype(dtype)
    # Mostly small counts, a few large values to exercise truncation and rounding.
    small = rng.random(n) < 0.7
    v[small] = rng.integers(-50, 50, size=int(small.sum())).astype(dtype)
    v[v == 0] = 1
    return v


def random_csr(
    rng: np.random.Generator,
    n_rows: int,
    n_cols: int,
    density: float,
    value_dtype: str | np.dtype = "float32",
    index_dtype: str | np.dtype = "int32",
    indptr_dtype: str | np.dtype = "int64",
    *,
    empty_rows: float = 0.0,
    unsorted: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random CSR matrix as (indptr, indices, values) numpy arrays.

    Each row draws distinct columns (the kernels' contract, csrc/row_gather.h, is a canonical
    matrix: no duplicate column within a row) with non-zero values. ``empty_rows`` is the fraction
    of rows forced empty; ``unsorted`` shuffles the column order within each row.
    """
    lengths = rng.binomial(n_cols, min(max(density, 0.0), 1.0), size=n_rows) if n_cols else np.zeros(n_rows, int)
    if empty_rows > 0 and n_rows:
        lengths[rng.random(n_rows) < empty_rows] = 0
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int64)
    for r, k in enumerate(lengths):
        if k:
            cols = rng.choice(n_cols, size=int(k), replace=False)
            indices[indptr[r] : indptr[r + 1]] = cols if unsorted else np.sort(cols)
    values = random_values(rng, len(indices), np_dtype(value_dtype) if isinstance(value_dtype, str) else value_dtype)
    return (
        indptr.astype(np.dtype(indptr_dtype) if not isinstance(indptr_dtype, str) else np_dtype(indptr_dtype)),
        indices.astype(np.dtype(index_dtype) if not isinstance(index_dtype, str) else np_dtype(index_dtype)),
        values,
    )


def dense_rows_reference(indptr, indices, values, n_cols: int, rows) -> np.ndarray:
    """The selected rows as a dense numpy array of the values' dtype (scipy where it can)."""
    indptr, indices, values, rows = (to_numpy(a) for a in (indptr, indices, values, rows))
    n_rows = len(indptr) - 1
    rows = rows.astype(np.int64)
    if values.dtype != np.float16:
        m = sp.csr_matrix((values, indices.astype(np.int64), indptr.astype(np.int64)), shape=(n_rows, n_cols))
        return m[rows].toarray() if len(rows) else np.zeros((0, n_cols), dtype=values.dtype)
    # scipy.sparse has no float16: scatter by hand (no duplicates, so assignment is exact).
    dense = np.zeros((n_rows, n_cols), dtype=values.dtype)
    row_of = np.repeat(np.arange(n_rows), np.diff(indptr.astype(np.int64)))
    dense[row_of, indices.astype(np.int64)] = values
    return dense[rows]


def reference_dense(indptr, indices, values, n_cols: int, rows, out_dtype: str | torch.dtype) -> torch.Tensor:
    """``torch.from_numpy(scipy_rows.toarray()).to(out_dtype)``: the cast rules are torch's."""
    dtype = out_dtype if isinstance(out_dtype, torch.dtype) else torch_dtype(out_dtype)
    return torch.from_numpy(dense_rows_reference(indptr, indices, values, n_cols, rows)).to(dtype)


# --- poison ----------------------------------------------------------------------------------

SENTINELS = {torch.int64: -(2**62) + 7, torch.int32: -(2**31) + 7, torch.uint16: 0xDEAD, torch.uint8: 0xAB}


def poison(array):
    """Fills ``array`` in place with NaN (floats) or an unlikely sentinel (integers); returns it.

    Outputs are poisoned before a kernel runs, so an element the kernel failed to write shows up
    as NaN/sentinel instead of passing as a zero that happened to be there.
    """
    if isinstance(array, torch.Tensor):
        array.fill_(float("nan") if array.dtype.is_floating_point else SENTINELS[array.dtype])
    else:
        kind = np.dtype(array.dtype).kind
        tensor = torch.from_numpy(array)
        array.fill(np.nan if kind == "f" else SENTINELS[tensor.dtype])
    return array


def empty_poisoned(shape, dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """A poisoned torch tensor of ``shape`` and ``dtype`` on ``device``."""
    dtype = dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    return poison(torch.empty(shape, dtype=dtype, device=device))


_SIGNED_OF_UNSIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def as_signed(tensor: torch.Tensor) -> torch.Tensor:
    """uint16/32/64 viewed as the signed type of their width (the same bits), for the ops that
    older torch lacks for them (indexing, equality: torch 2.6 has neither on the CPU); else tensor."""
    signed = _SIGNED_OF_UNSIGNED.get(tensor.dtype)
    return tensor.view(signed) if signed is not None else tensor


def take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor[rows] for every dtype, unsigned ones included on older torch."""
    return as_signed(tensor)[rows].view(tensor.dtype)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality, bit for bit for floats (NaN included), with dtype and shape checked."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        a, e = actual.contiguous().view(width), expected.contiguous().view(width)
    else:
        a, e = as_signed(actual), as_signed(expected)
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        first = tuple(diff[0].tolist())
        raise AssertionError(
            f"{len(diff)} of {a.numel()} elements differ; first at {first}: "
            f"got {actual[first].item()!r}, expected {expected[first].item()!r}"
        )
