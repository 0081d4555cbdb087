"""Measurement library behind ``annloader-gpu bench`` and ``annloader-gpu info``.

Everything that times something lives here: the hardware roof measured in the same run, the
epoch loop shared by every loader, and the loaders compared against ours:

* ``annloader_gpu``: our :class:`~annloader_gpu.loader.AnnDataLoader`;
* ``scvi-tools``: ``scvi.dataloaders.AnnDataLoader`` over an ``AnnDataManager`` (when scvi-tools
  is importable);
* ``anndata AnnLoader``: ``anndata.experimental.AnnLoader`` (when importable);
* ``in-process baseline``: always; what scvi-tools does per batch, without the DataLoader
  machinery: a scipy row slice of the batch, ``.toarray()`` (or a torch sparse CSR tensor),
  ``torch.from_numpy`` and the obs fields.

Every loader is shuffled, warmed up for one pass before timing, and consumed the same minimal but
real way: its ``X`` (and obs fields) are fetched from the batch (AnnLoader converts lazily, on
access), their sizes are read, and on the CPU one element of ``X`` is read. On a GPU the baselines
move their batches to the same device (``.to(device)``) and every timed epoch ends with
``torch.cuda.synchronize``, so no queued work escapes the timer.

Roofs: on the CPU the memory write bandwidth into an already-touched buffer of one batch's
output size (best of N of numpy ``fill``, torch ``fill_`` (torch's threads) and libc ``memset``); the
fraction reported is output bytes per second over it. On a GPU the device-to-device copy
bandwidth (read + write bytes of a torch ``copy_``); the fraction counts the output bytes written
plus the source bytes read (batch non-zeros times the loader's resident bytes per non-zero,
estimated from the mean non-zeros per row).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

OURS = "annloader_gpu"
SCVI = "scvi-tools AnnDataLoader"
ANNLOADER = "anndata AnnLoader"
INPROCESS = "in-process scvi-style"

#: Short names accepted by ``--loaders``.
LOADER_CHOICES = {"ours": OURS, "scvi": SCVI, "annloader": ANNLOADER, "inprocess": INPROCESS}

JSON_SCHEMA_VERSION = 1


class BenchError(Exception):
    """A user-facing problem (bad path, bad option): reported without a traceback."""


# ---------------------------------------------------------------------------------------------
# Machine description


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_description() -> list[dict]:
    """Every GPU torch can see, with its free and total memory (empty without CUDA torch)."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "free_bytes": int(free),
                         "total_bytes": int(total)})
    return gpus


def machine_info() -> dict:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_bytes": _total_memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpu_description(),
    }


def safe_build_info() -> dict:
    try:
        from ._build_info import build_info

        return build_info()
    except Exception as exc:  # the CLI must still describe a broken build, not crash
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class DataSpec:
    source: str  # "synthetic" or "file"
    path: str | None
    n_obs: int
    n_vars: int
    nnz: int | None
    layer: str | None
    x_format: str  # "csr", "csc", "dense", ...
    x_dtype: str
    batch_key: str | None
    labels_key: str | None


def load_data(path: str | None, *, n_obs: int = 200_000, n_vars: int = 20_000, seed: int = 0,
              cache_dir: str | None = None, backed: bool = False):
    """The user's .h5ad (``path``) or the cached synthetic default dataset. Returns (adata, source)."""
    import anndata

    if path is not None:
        p = Path(path)
        if not p.exists():
            raise BenchError(f"--data {path}: no such file")
        if p.is_dir():
            raise BenchError(f"--data {path}: is a directory, expected an .h5ad file")
        try:
            return anndata.read_h5ad(p, backed="r" if backed else None), "file"
        except Exception as exc:
            raise BenchError(f"--data {path}: cannot read it as an .h5ad file ({type(exc).__name__}: {exc})") from None
    from . import synthetic

    if n_obs < 1 or n_vars < 1:
        raise BenchError(f"--n-obs and --n-vars must be positive, got {n_obs} x {n_vars}")
    return synthetic.default_dataset(cache_dir, n_obs=n_obs, n_vars=n_vars, seed=seed), "synthetic"


def x_matrix(adata, layer: str | None):
    if layer is None:
        return adata.X
    from .registry import named_layers

    layers = named_layers(adata)
    if layer not in layers:
        raise BenchError(f"--layer {layer!r}: not in the data's layers ({', '.join(layers) or 'none'})")
    return adata.layers[layer]


def matrix_format(matrix) -> str:
    if sp.issparse(matrix):
        return matrix.format
    if isinstance(matrix, np.ndarray):
        return "dense"
    return type(matrix).__name__


def matrix_nnz(matrix) -> int | None:
    if sp.issparse(matrix):
        return int(matrix.nnz)
    if isinstance(matrix, np.ndarray):
        return int(np.count_nonzero(matrix))
    return getattr(matrix, "nnz", None)


def host_matrix_bytes(matrix) -> int | None:
    """Bytes the matrix occupies in host memory as stored (what the baselines slice from)."""
    if sp.issparse(matrix):
        if matrix.format in ("csr", "csc"):
            return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
        return None
    if isinstance(matrix, np.ndarray):
        return int(matrix.nbytes)
    return None


def describe_data(adata, source: str, path: str | None, layer: str | None, batch_key, labels_key) -> DataSpec:
    X = x_matrix(adata, layer)
    return DataSpec(source=source, path=None if path is None else str(path), n_obs=int(adata.n_obs),
                    n_vars=int(adata.n_vars), nnz=matrix_nnz(X), layer=layer, x_format=matrix_format(X),
                    x_dtype=str(X.dtype), batch_key=batch_key, labels_key=labels_key)


def default_obs_keys(adata, batch_key: str | None, labels_key: str | None) -> tuple[str | None, str | None]:
    """Explicit keys win; otherwise use ``batch`` / ``labels`` when the data has them."""
    cols = set(adata.obs.columns)
    if batch_key is None and "batch" in cols:
        batch_key = "batch"
    if labels_key is None and "labels" in cols:
        labels_key = "labels"
    for name, key in (("--batch-key", batch_key), ("--labels-key", labels_key)):
        if key is not None and key not in cols:
            raise BenchError(f"{name} {key!r}: not a column of obs ({', '.join(map(str, cols)) or 'none'})")
    return batch_key, labels_key


# ---------------------------------------------------------------------------------------------
# Resident sizes (``info``)


def storage_formats(matrix) -> list[dict]:
    """Resident size of X in each storage format, with bytes per non-zero."""
    from . import compact

    rows = []
    n_rows, n_cols = (int(s) for s in matrix.shape)
    if sp.issparse(matrix) and matrix.format in ("csr", "csc"):
        nnz = int(matrix.nnz)
        values = matrix.data
        int32_ptr = compact.compact_indptr_dtype(nnz)  # int32 when nnz fits, as scipy stores it
        candidates = [
            ("float32 + int32", np.float32, np.int32, int32_ptr),
            ("float32 + int64", np.float32, np.int64, np.int64),
        ]
        try:
            value_dtype = compact.compact_value_dtype(values)
            candidates.append((f"compact ({np.dtype(value_dtype).name} + "
                               f"{compact.compact_index_dtype(n_cols).name})", value_dtype,
                               compact.compact_index_dtype(n_cols), int32_ptr))
        except TypeError as exc:
            rows.append({"format": "compact", "error": str(exc)})
        for name, vdt, idt, pdt in candidates:
            nbytes = compact.csr_resident_bytes(n_rows, nnz, vdt, idt, pdt)
            rows.append({"format": name, "value_dtype": np.dtype(vdt).name, "index_dtype": np.dtype(idt).name,
                         "indptr_dtype": np.dtype(pdt).name, "bytes": int(nbytes),
                         "bytes_per_nonzero": nbytes / nnz if nnz else None})
        if matrix.format == "csc":
            for row in rows:
                row["note"] = "CSC is converted to CSR once when made resident"
    elif isinstance(matrix, np.ndarray):
        nnz = int(np.count_nonzero(matrix))
        for name, dt in (("dense " + matrix.dtype.name, matrix.dtype), ("dense float32", np.float32)):
            nbytes = n_rows * n_cols * np.dtype(dt).itemsize
            rows.append({"format": name, "value_dtype": np.dtype(dt).name, "bytes": int(nbytes),
                         "bytes_per_nonzero": nbytes / nnz if nnz else None})
    else:
        rows.append({"format": matrix_format(matrix), "error": "not a scipy CSR/CSC matrix or numpy array"})
    return rows


def auto_residency(resident_bytes: int | None, device: str) -> dict:
    """Which residency ``auto`` chooses on ``device``, decided by the loader's own function
    (``annloader_gpu.residency.resolve_residency``)."""
    from .residency import DEVICE_MEMORY_BUDGET, resolve_residency

    dev = torch.device(device)
    how = "annloader_gpu.residency.resolve_residency"
    if dev.type == "cuda":
        how += f" (device when it fits {DEVICE_MEMORY_BUDGET:.0%} of free GPU memory)"
    try:
        return {"choice": str(resolve_residency("auto", dev, int(resident_bytes or 0))), "how": how}
    except Exception as exc:  # noqa: BLE001 - report, don't crash
        return {"choice": None, "how": f"{how} failed: {type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------
# Roofs


def _best_time(fn: Callable[[], Any], *, min_repeats: int = 5, min_seconds: float = 0.2,
               max_repeats: int = 200, sync: Callable[[], Any] | None = None) -> float:
    best = float("inf")
    start = time.perf_counter()
    repeats = 0
    while repeats < min_repeats or (time.perf_counter() - start < min_seconds and repeats < max_repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - t0)
        repeats += 1
    return best


def _libc_memset():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.memset
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        fn.restype = ctypes.c_void_p
        return fn
    except (OSError, AttributeError):
        return None


def cpu_write_roof(nbytes: int) -> dict:
    """Write bandwidth into an already-touched buffer of ``nbytes``: best of numpy ``fill``
    (one thread), torch ``fill_`` (torch's threads) and libc ``memset``, best-of-N each."""
    n = max(1, nbytes // 4)
    buf = np.zeros(n, dtype=np.float32)  # zeros touches every page
    buf.fill(1.0)
    tbuf = torch.from_numpy(buf)
    results = {
        "numpy fill": nbytes / _best_time(lambda: buf.fill(2.0)),
        "torch fill_": nbytes / _best_time(lambda: tbuf.fill_(3.0)),
    }
    memset = _libc_memset()
    if memset is not None:  # glibc switches to non-temporal stores for large sizes
        address, size = buf.ctypes.data, buf.nbytes
        results["libc memset"] = nbytes / _best_time(lambda: memset(address, 0, size))
    method = max(results, key=results.get)
    return {"kind": "cpu write", "buffer_bytes": int(n * 4), "gb_per_s": results[method] / 1e9,
            "method": method, "candidates_gb_per_s": {k: v / 1e9 for k, v in results.items()}}


def gpu_copy_roof(device: torch.device, nbytes: int = 1 << 28) -> dict:
    """Device-to-device copy bandwidth (read + write bytes) of a torch ``copy_``, best of N."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(20):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    del src, dst
    return {"kind": "gpu device-to-device copy", "buffer_bytes": int(n * 4),
            "gb_per_s": 2 * n * 4 / best / 1e9, "method": "torch copy_, read + write bytes"}


def measure_roof(device: torch.device, batch_output_bytes: int) -> dict:
    if device.type == "cuda":
        return gpu_copy_roof(device)
    return cpu_write_roof(batch_output_bytes)


# ---------------------------------------------------------------------------------------------
# Consuming batches


@dataclass
class Consumed:
    cells: int
    out_bytes: int


def tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        if x.layout == torch.sparse_csr:
            return int(sum(t.numel() * t.element_size() for t in (x.crow_indices(), x.col_indices(), x.values())))
        if x.layout == torch.sparse_coo:
            return int(x._indices().numel() * 8 + x._values().numel() * x.element_size())
        return int(x.numel() * x.element_size())
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if sp.issparse(x):
        return host_matrix_bytes(x) or 0
    return 0


def _touch(x, on_cpu: bool) -> None:
    """Read one element of X (CPU only: on a GPU that would synchronise every batch)."""
    if not on_cpu or not isinstance(x, torch.Tensor):
        return
    if x.layout == torch.sparse_csr:
        values = x.values()
        if values.numel():
            values[-1].item()
    elif x.numel():
        x.view(-1)[-1].item()


class Consumer:
    """Fetches X and the obs fields of a batch, whatever the loader's batch type."""

    def __init__(self, device: torch.device, x_key: str = "X", obs_keys: Sequence[str] = (),
                 layer: str | None = None, move: bool = False):
        self.device = device
        self.on_cpu = device.type == "cpu"
        self.x_key = x_key
        self.obs_keys = tuple(obs_keys)
        self.layer = layer
        self.move = move  # baselines: move the batch to the device like a training loop would
        self.wrong_device: str | None = None

    def _place(self, t):
        if self.move and isinstance(t, torch.Tensor) and t.device != self.device:
            return t.to(self.device)
        return t

    def __call__(self, batch) -> Consumed:
        if isinstance(batch, dict):
            x = self._place(batch[self.x_key])
            extras = [self._place(batch[k]) for k in self.obs_keys if k in batch]
        else:  # an AnnCollectionView from AnnLoader: attributes are converted on access
            x = batch.layers[self.layer] if self.layer is not None else batch.X
            x = self._place(x)
            obs = batch.obs
            extras = [obs[k] for k in self.obs_keys]
        del extras
        if isinstance(x, torch.Tensor) and self.wrong_device is None and x.device.type != self.device.type:
            self.wrong_device = f"yielded X on {x.device}, expected {self.device}"
        _touch(x, self.on_cpu)
        return Consumed(cells=int(x.shape[0]), out_bytes=tensor_bytes(x))


# ---------------------------------------------------------------------------------------------
# The epoch loop


@dataclass
class EpochStats:
    seconds: float
    cells: int
    batches: int
    out_bytes: int


def run_epoch(loader: Iterable, consume: Consumer, *, max_batches: int | None, sync: Callable[[], Any],
              progress=None) -> EpochStats:
    cells = batches = out_bytes = 0
    t0 = time.perf_counter()
    for batch in loader:
        got = consume(batch)
        del batch
        cells += got.cells
        out_bytes += got.out_bytes
        batches += 1
        if progress is not None:
            progress.update(1)
        if max_batches is not None and batches >= max_batches:
            break
    sync()
    return EpochStats(time.perf_counter() - t0, cells, batches, out_bytes)


@dataclass
class LoaderResult:
    loader: str
    batch_size: int
    available: bool
    reason: str | None = None
    setup_seconds: float | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    cells: int = 0
    batches: int = 0
    out_bytes: int = 0
    cells_per_s: float | None = None
    batches_per_s: float | None = None
    output_gb_per_s: float | None = None
    roof_gb_per_s: float | None = None
    roof_fraction: float | None = None
    resident_bytes: int | None = None
    resident_where: str | None = None
    setup_host_bytes: int | None = None  # growth of the process's resident set during set-up
    bytes_per_nonzero: float | None = None
    output: str = "dense"
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchConfig:
    batch_sizes: Sequence[int] = (128, 1024)
    epochs: int = 2
    device: str = "cpu"
    residency: str = "auto"
    sparse: bool = False
    max_batches: int | None = None
    layer: str | None = None
    batch_key: str | None = None
    labels_key: str | None = None
    loaders: Sequence[str] = (OURS, SCVI, ANNLOADER, INPROCESS)
    seed: int = 0
    progress: bool = True


def resolve_device(device: str | None) -> torch.device:
    if device is None or device == "auto":
        from ._cuda_module import gpu_usable

        return torch.device("cuda") if gpu_usable() and torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BenchError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: torch cannot use CUDA here (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --- loader factories: each returns (iterable, resident_bytes, resident_where, notes) ----------


def _obs_registry_keys(cfg: BenchConfig) -> list[str]:
    keys = []
    if cfg.batch_key is not None:
        keys.append("batch")
    if cfg.labels_key is not None:
        keys.append("labels")
    return keys


def _make_ours(adata, cfg: BenchConfig, batch_size: int, device: torch.device, cache: dict):
    from .loader import AnnDataLoader
    from .registry import setup_anndata

    registry = cache.get("registry")
    if registry is None:
        registry = setup_anndata(adata, layer=cfg.layer, batch_key=cfg.batch_key, labels_key=cfg.labels_key)
        cache["registry"] = registry
    loader = AnnDataLoader(registry, batch_size=batch_size, shuffle=True, load_sparse_tensor=cfg.sparse,
                           device=device, residency=cfg.residency)
    resident = getattr(loader, "resident_bytes", None)
    notes = []
    where = getattr(loader, "residency", None)
    if resident is None:
        notes.append("loader exposes no resident_bytes")
    cache["ours_bytes_per_nonzero"] = getattr(loader, "bytes_per_nonzero", None)
    return loader, (int(resident) if resident is not None else None), (str(where) if where else None), notes


def _scvi_manager(adata, cfg: BenchConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from scvi.model import SCVI

        SCVI.setup_anndata(adata, layer=cfg.layer, batch_key=cfg.batch_key, labels_key=cfg.labels_key)
        return SCVI._get_most_recent_anndata_manager(adata, required=True)


def _make_scvi(adata, cfg: BenchConfig, batch_size: int, device: torch.device, cache: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from scvi.dataloaders import AnnDataLoader as ScviLoader

    manager = cache.get("scvi_manager")
    if manager is None:
        manager = _scvi_manager(adata, cfg)
        cache["scvi_manager"] = manager
    loader = ScviLoader(manager, batch_size=batch_size, shuffle=True, load_sparse_tensor=cfg.sparse)
    X = x_matrix(adata, cfg.layer)
    return loader, host_matrix_bytes(X), "host (AnnData as stored)", []


def _make_annloader(adata, cfg: BenchConfig, batch_size: int, device: torch.device, cache: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from anndata.experimental import AnnLoader

        loader = AnnLoader(adata, batch_size=batch_size, shuffle=True, use_cuda=device.type == "cuda")
    notes = []
    if cfg.sparse:
        notes.append("AnnLoader has no sparse output: its default converter densifies X")
    X = x_matrix(adata, cfg.layer)
    return loader, host_matrix_bytes(X), "host (AnnData as stored)", notes


class InProcessLoader:
    """What scvi-tools' AnnTorchDataset does per batch, minus the DataLoader machinery.

    A shuffled permutation per epoch; per batch: scipy row slice, ``.toarray()`` (or a torch
    sparse CSR tensor), ``torch.from_numpy`` and the obs fields as tensors.
    """

    def __init__(self, X, obs_fields: dict[str, np.ndarray], batch_size: int, *, sparse: bool, seed: int = 0):
        if not (sp.issparse(X) or isinstance(X, np.ndarray)):
            raise TypeError(f"in-process baseline needs a scipy sparse matrix or numpy array, got {type(X).__name__}")
        self.X = X.tocsr() if sp.issparse(X) and X.format != "csr" else X
        self.obs_fields = obs_fields
        self.batch_size = batch_size
        self.sparse = sparse
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return -(-self.X.shape[0] // self.batch_size)

    def _x(self, idx: np.ndarray) -> torch.Tensor:
        sliced = self.X[idx]
        if sp.issparse(sliced):
            sliced = sliced.astype(np.float32, copy=False)
            if self.sparse:
                return torch.sparse_csr_tensor(torch.from_numpy(sliced.indptr), torch.from_numpy(sliced.indices),
                                               torch.from_numpy(sliced.data), size=sliced.shape,
                                               check_invariants=False)  # scvi: unchecked too
            return torch.from_numpy(sliced.toarray())
        return torch.from_numpy(np.ascontiguousarray(sliced, dtype=np.float32))

    def __iter__(self):
        perm = self.rng.permutation(self.X.shape[0])
        for start in range(0, len(perm), self.batch_size):
            idx = perm[start : start + self.batch_size]
            batch = {"X": self._x(idx)}
            for key, values in self.obs_fields.items():
                batch[key] = torch.from_numpy(values[idx])
            yield batch


def _make_inprocess(adata, cfg: BenchConfig, batch_size: int, device: torch.device, cache: dict):
    X = x_matrix(adata, cfg.layer)
    obs_fields = {}
    for reg_key, obs_key in (("batch", cfg.batch_key), ("labels", cfg.labels_key)):
        if obs_key is not None:
            col = adata.obs[obs_key]
            codes = col.cat.codes.to_numpy() if hasattr(col, "cat") else np.asarray(col)
            obs_fields[reg_key] = np.ascontiguousarray(codes.astype(np.int64)[:, None])
    loader = InProcessLoader(X, obs_fields, batch_size, sparse=cfg.sparse, seed=cfg.seed)
    return loader, host_matrix_bytes(X), "host (AnnData as stored)", []


_FACTORIES = {OURS: _make_ours, SCVI: _make_scvi, ANNLOADER: _make_annloader, INPROCESS: _make_inprocess}


def loader_availability(name: str) -> str | None:
    """None when the loader can be imported, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == OURS:
                from .loader import AnnDataLoader  # noqa: F401
            elif name == SCVI:
                from scvi.dataloaders import AnnDataLoader  # noqa: F401
            elif name == ANNLOADER:
                from anndata.experimental import AnnLoader  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - report why it is not measured
        what = {OURS: "annloader_gpu.loader", SCVI: "scvi-tools", ANNLOADER: "anndata.experimental.AnnLoader"}[name]
        return f"{what} is not importable ({type(exc).__name__}: {exc})"
    return None


def batch_output_bytes(batch_size: int, n_vars: int) -> int:
    return batch_size * n_vars * 4


class _Running:
    """One loader being measured at one batch size."""

    def __init__(self, name: str, result: LoaderResult, loader, consume: Consumer, resident, where):
        self.name, self.result, self.loader, self.consume = name, result, loader, consume
        self.resident, self.where = resident, where
        self.epochs: list[EpochStats] = []


def _set_up(name: str, adata, cfg: BenchConfig, batch_size: int, device: torch.device, cache: dict):
    result = LoaderResult(loader=name, batch_size=batch_size, available=True,
                          output="sparse" if cfg.sparse else "dense")
    reason = loader_availability(name)
    if reason is not None:
        result.available, result.reason = False, reason
        return result, None
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.perf_counter()
    rss_before = current_rss_bytes()
    try:
        loader, resident, where, notes = _FACTORIES[name](adata, cfg, batch_size, device, cache)
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        if name == OURS:
            raise
        result.available, result.reason = False, f"could not be set up ({type(exc).__name__}: {exc})"
        return result, None
    result.setup_seconds = time.perf_counter() - t0
    rss_after = current_rss_bytes()
    if rss_before is not None and rss_after is not None:
        result.setup_host_bytes = rss_after - rss_before
    result.notes.extend(notes)
    if name == ANNLOADER:
        obs_keys = [k for k in (cfg.batch_key, cfg.labels_key) if k is not None]
    else:
        obs_keys = _obs_registry_keys(cfg)
    consume = Consumer(device, obs_keys=obs_keys, layer=cfg.layer if name == ANNLOADER else None,
                       move=name != OURS)
    return result, _Running(name, result, loader, consume, resident, where)


def _finish(run: _Running, adata, cfg: BenchConfig, device: torch.device, roof: dict, cache: dict) -> None:
    result, epochs = run.result, run.epochs
    if run.consume.wrong_device:
        result.notes.append(run.consume.wrong_device)
    resident, where = run.resident, run.where
    if run.name == OURS:  # resident bytes may only be known after the first pass (lazy upload)
        late = getattr(run.loader, "resident_bytes", None)
        resident = int(late) if late is not None else resident
        where = str(getattr(run.loader, "residency", where) or where or "")
    seconds = sum(e.seconds for e in epochs)
    result.epoch_seconds = [e.seconds for e in epochs]
    result.cells = sum(e.cells for e in epochs)
    result.batches = sum(e.batches for e in epochs)
    result.out_bytes = sum(e.out_bytes for e in epochs)
    result.cells_per_s = result.cells / seconds
    result.batches_per_s = result.batches / seconds
    result.output_gb_per_s = result.out_bytes / seconds / 1e9
    result.resident_bytes = resident
    result.resident_where = where
    nnz = matrix_nnz(x_matrix(adata, cfg.layer))
    if run.name == OURS and cache.get("ours_bytes_per_nonzero") is not None:
        result.bytes_per_nonzero = float(cache["ours_bytes_per_nonzero"])  # X alone, as stored
    elif resident is not None and nnz:
        result.bytes_per_nonzero = resident / nnz
    result.roof_gb_per_s = roof["gb_per_s"]
    traffic = result.out_bytes
    if device.type == "cuda" and nnz and result.bytes_per_nonzero:
        traffic += result.cells * (nnz / adata.n_obs) * result.bytes_per_nonzero
    result.roof_fraction = traffic / seconds / 1e9 / roof["gb_per_s"]


def measure_batch_size(adata, cfg: BenchConfig, batch_size: int, device: torch.device, roof: dict,
                       cache: dict, progress_factory=None) -> list[LoaderResult]:
    """Every loader at one batch size. Each loader is set up and warmed up (one pass); then the
    timed epochs are interleaved (epoch 1 of every loader, then epoch 2, ...), so that a change in
    machine load during the run affects all loaders alike rather than whichever ran then."""
    results, runs = [], []
    for name in cfg.loaders:
        result, run = _set_up(name, adata, cfg, batch_size, device, cache)
        results.append(result)
        if run is not None:
            runs.append(run)
    sync = _sync_fn(device)
    total = 0
    for run in runs:
        n = len(run.loader)
        total += (min(n, cfg.max_batches) if cfg.max_batches is not None else n) * (cfg.epochs + 1)
    bar = progress_factory(total=total, desc=f"batch {batch_size}") if progress_factory is not None else None
    try:
        for run in runs:  # warm-up pass: includes lazy set-up (uploads, thread pools, caches)
            if bar is not None:
                bar.set_postfix_str(f"{run.name} (warm-up)", refresh=False)
            t0 = time.perf_counter()
            run_epoch(run.loader, run.consume, max_batches=cfg.max_batches, sync=sync, progress=bar)
            run.result.setup_seconds = (run.result.setup_seconds or 0.0) + (time.perf_counter() - t0)
        for epoch in range(cfg.epochs):
            for run in runs:
                if bar is not None:
                    bar.set_postfix_str(f"{run.name} (epoch {epoch + 1}/{cfg.epochs})", refresh=False)
                run.epochs.append(run_epoch(run.loader, run.consume, max_batches=cfg.max_batches, sync=sync,
                                            progress=bar))
    finally:
        if bar is not None:
            bar.close()
    for run in runs:
        _finish(run, adata, cfg, device, roof, cache)
    del runs
    gc.collect()
    return results


def run_benchmark(adata, cfg: BenchConfig, *, progress: bool | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Measures every loader in ``cfg.loaders`` at every batch size; returns a JSON-ready dict."""
    device = resolve_device(cfg.device)
    log = log or (lambda _msg: None)
    progress = cfg.progress if progress is None else progress
    progress_factory = None
    if progress:
        from tqdm.auto import tqdm

        def progress_factory(**kw):
            return tqdm(unit="batch", leave=True, dynamic_ncols=True, mininterval=0.5, **kw)

    cache: dict = {}
    roofs: dict[str, dict] = {}
    results: list[LoaderResult] = []
    load_before = load_average()
    for batch_size in cfg.batch_sizes:
        roof = measure_roof(device, batch_output_bytes(batch_size, adata.n_vars))
        roofs[str(batch_size)] = roof
        log(f"batch {batch_size}: roof {roof['kind']} {roof['gb_per_s']:.1f} GB/s ({roof['method']})")
        for res in measure_batch_size(adata, cfg, batch_size, device, roof, cache, progress_factory):
            results.append(res)
            if res.available:
                log(f"  {res.loader}: {res.cells_per_s:,.0f} cells/s")
            else:
                log(f"  {res.loader}: not measured: {res.reason}")
    rs = [asdict(r) for r in results]
    return {"device": str(device), "load_average": {"before": load_before, "after": load_average()},
            "roofs": roofs, "results": rs, "ratios": ratios(rs), "host_peak_bytes": peak_rss_bytes()}


def current_rss_bytes() -> int | None:
    """The process's resident set now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """The process's peak resident set so far (the whole run: data, loaders, baselines)."""
    try:
        import resource
    except ImportError:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def ratios(results: list[dict]) -> list[dict]:
    """ours / theirs cells per second, per batch size and baseline."""
    out = []
    by_bs: dict[int, dict[str, dict]] = {}
    for r in results:
        by_bs.setdefault(r["batch_size"], {})[r["loader"]] = r
    for bs, group in by_bs.items():
        ours = group.get(OURS)
        for name, r in group.items():
            if name == OURS:
                continue
            ok = ours and ours["available"] and r["available"] and r["cells_per_s"]
            out.append({"batch_size": bs, "theirs": name,
                        "ours_over_theirs": ours["cells_per_s"] / r["cells_per_s"] if ok else None})
    return out


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def quiet_third_party_warnings():
    """Third-party warnings (deprecations in scvi-tools / anndata) would drown the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # torch warns once when scvi-tools builds an unchecked sparse tensor (load_sparse_tensor).
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield
