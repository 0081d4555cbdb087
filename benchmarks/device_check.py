"""One-shot GPU check: correctness against the CPU reference, then timings against the roofs.

Prepared to run within a short device lease (see ../shared/device/README.md). It builds nothing;
install the package first. Run it on the CPU first (``--device cpu``) so that only GPU-specific
failures are left for the device run.

    python benchmarks/device_check.py --out OUT                 # full check + timings on cuda
    python benchmarks/device_check.py --device cpu --quick      # rehearsal on the CPU
    compute-sanitizer --tool memcheck python benchmarks/device_check.py --sanitize-case

Every kernel output is poisoned before the kernel runs, so rows a kernel forgot to write show.
Timings use CUDA events on the current stream; each ratio is against a roof measured in the same
run: a device-to-device copy for resident data, a pinned host-to-device copy for pinned data.

With ``--out``, device_check.json is rewritten after every section (kernels, loaders, gathers,
loop) with what is known so far, its ``completed_sections`` and ``section_seconds``; on SIGTERM
(the ``timeout`` of device_run.sh) it is written once more, with the partial section and
``interrupted``, so a run cut short still returns its results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import annloader_gpu
from annloader_gpu import kernels

OUTPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]
VALUE_DTYPES = [np.float32, np.float64, np.float16, np.int32, np.uint16, np.uint8]
INDEX_DTYPES = [np.int32, np.int64, np.uint16]


def log(*parts) -> None:
    print(*parts, flush=True)


# --- correctness ------------------------------------------------------------------------------


class RawCsr:
    """CSR arrays kept in exactly the dtypes asked for (scipy's constructor would cast the index
    arrays back to int32), plus the shape."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int]):
        self.indptr, self.indices, self.data, self.shape = indptr, indices, data, shape

    def scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.data.astype(np.float64), self.indices.astype(np.int64),
                              self.indptr.astype(np.int64)), shape=self.shape)


def random_csr(rng: np.random.Generator, n_rows: int, n_cols: int, density: float, value_dtype,
               index_dtype, indptr_dtype) -> RawCsr:
    m = sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng, dtype=np.float64)
    m.data = rng.integers(1, 200, m.nnz).astype(np.float64)  # exact in every value dtype
    if n_rows > 2:
        m.data[m.indptr[1]:m.indptr[2]] = 0  # an empty row
        m.eliminate_zeros()
    out = RawCsr(m.indptr.astype(indptr_dtype), m.indices.astype(index_dtype), m.data.astype(value_dtype), m.shape)
    # Unsorted columns within rows are part of the contract.
    for r in range(0, n_rows, 3):
        lo, hi = out.indptr[r], out.indptr[r + 1]
        out.indices[lo:hi] = out.indices[lo:hi][::-1].copy()
        out.data[lo:hi] = out.data[lo:hi][::-1].copy()
    assert out.indices.dtype == np.dtype(index_dtype) and out.indptr.dtype == np.dtype(indptr_dtype)
    return out


def reference_dense(m: RawCsr, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(m.scipy()[rows].toarray()).to(dtype)


def poison(shape, dtype, device) -> torch.Tensor:
    fill = -7 if not dtype.is_floating_point else float("nan")
    return torch.full(shape, fill, dtype=dtype, device=device)


def _check_csr_case(m: RawCsr, rows: np.ndarray, device: torch.device, label: str, failures: list[str]) -> None:
    """CSR -> dense into every output dtype and CSR -> CSR, for one matrix and row selection."""
    n_cols = m.shape[1]
    d = dict(indptr=torch.from_numpy(m.indptr).to(device),
             indices=torch.from_numpy(m.indices).to(device),
             values=torch.from_numpy(m.data).to(device))
    r = torch.from_numpy(rows).to(device)
    reference = reference_dense(m, rows, torch.float64)  # exact: computed once, cast per output dtype
    for out_dtype in OUTPUT_DTYPES:
        out = poison((len(rows), n_cols), out_dtype, device)
        kernels.gather_csr_to_dense(d["indptr"], d["indices"], d["values"], n_cols, r, out)
        if not torch.equal(out.cpu(), reference.to(out_dtype)):
            failures.append(f"csr->dense {label} -> {out_dtype}")
    # CSR -> CSR
    out_indptr = torch.full((len(rows) + 1,), -1, dtype=torch.int64, device=device)
    kernels.csr_batch_indptr(d["indptr"], r, out_indptr)
    nnz = int(out_indptr[-1].item())
    out_idx = torch.full((nnz,), -1, dtype=torch.int32, device=device)
    out_val = poison((nnz,), torch.float32, device)
    kernels.gather_csr_to_csr(d["indptr"], d["indices"], d["values"], n_cols, r, out_indptr, out_idx, out_val)
    got = sp.csr_matrix((out_val.cpu().numpy(), out_idx.cpu().numpy(), out_indptr.cpu().numpy()),
                        shape=(len(rows), n_cols)).toarray()
    if not np.array_equal(got, reference.to(torch.float32).numpy()):
        failures.append(f"csr->csr {label}")


def check_kernels(device: torch.device, rng: np.random.Generator, quick: bool,
                  failures: list[str] | None = None) -> list[str]:
    """Every kernel against scipy; failures are appended to ``failures`` as they are found."""
    failures = [] if failures is None else failures
    shapes = [(50, 300, 0.1), (1, 70, 0.5), (200, 1000, 0.02)] if not quick else [(50, 300, 0.1)]
    for n_rows, n_cols, density in shapes:
        for value_dtype in VALUE_DTYPES:
            for index_dtype in INDEX_DTYPES:
                for indptr_dtype in (np.int32, np.int64):
                    m = random_csr(rng, n_rows, n_cols, density, value_dtype, index_dtype, indptr_dtype)
                    rows = rng.integers(0, n_rows, 2 * n_rows).astype(np.int64)
                    rows[: min(3, len(rows))] = min(1, n_rows - 1)  # repeated rows, the empty one
                    label = f"{value_dtype.__name__}/{index_dtype.__name__}/{indptr_dtype.__name__} shape {m.shape}"
                    try:  # one case raising (an unsupported dtype, say) leaves the others checked
                        _check_csr_case(m, rows, device, label, failures)
                    except Exception as exc:  # noqa: BLE001 (recorded, and the rest still runs)
                        failures.append(f"csr {label} raised {type(exc).__name__}: {exc}")
    # Dense -> dense, with a row stride.
    src = torch.from_numpy(rng.standard_normal((100, 64)).astype(np.float32)).to(device)[:, 8:40]
    rows = torch.from_numpy(rng.integers(0, 100, 77)).to(device)
    for out_dtype in OUTPUT_DTYPES:
        out = poison((77, 32), out_dtype, device)
        kernels.gather_dense(src, rows, out)
        if not torch.equal(out.cpu(), src.cpu()[rows.cpu()].to(out_dtype)):
            failures.append(f"dense->dense float32 -> {out_dtype}")
    # CSC -> CSR (GPU: stable radix sort; CPU: the threaded conversion) against scipy.
    for index_dtype in INDEX_DTYPES:
        m = random_csr(rng, 120, 90, 0.1, np.float32, index_dtype, np.int64).scipy().astype(np.float32).tocsc()
        arrays = (m.indptr, m.indices.astype(index_dtype), m.data)
        if device.type == "cuda":
            arrays = tuple(torch.from_numpy(a).to(device) for a in arrays)
        indptr, indices, values = kernels.csc_to_csr(*arrays, m.shape)
        expected = m.tocsr()
        expected.sort_indices()
        got = [a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in (indptr, indices, values)]
        if not all(np.array_equal(g, e) for g, e in zip(got, (expected.indptr, expected.indices, expected.data))):
            failures.append(f"csc->csr {index_dtype.__name__}")
    # Bad rows raise and are never dereferenced.
    m = random_csr(rng, 10, 20, 0.3, np.float32, np.int32, np.int64)
    try:
        kernels.gather_csr_to_dense(torch.from_numpy(m.indptr).to(device), torch.from_numpy(m.indices).to(device),
                                    torch.from_numpy(m.data).to(device), 20,
                                    torch.tensor([0, 10**9], device=device), torch.empty(2, 20, device=device))
        failures.append("out-of-range row did not raise")
    except IndexError:
        pass
    return failures


def _dense(value):
    return value.to_dense() if isinstance(value, torch.Tensor) and value.layout != torch.strided else value


def loader_configs(x_format: str, device: torch.device) -> list[tuple[bool, object, list[tuple[str, bool]]]]:
    """The distinct whole-loader configurations for one X format: (sparse output, dtypes,
    [(residency, prefetch), ...]); the CPU loader's batches are computed once per (sparse output,
    dtypes) and compared with every residency's.

    Left out as duplicates of a configuration kept: ``load_sparse_tensor=True`` with a dense X
    (a field's sparse output is ``load_sparse_tensor and`` a sparse source, see ``Field``; the
    other fields here are dense too) and residency "host" without prefetch (prefetching applies
    only where the CUDA kernels gather: residency "device" or "pinned"; so also on the CPU).
    """
    sparse_outs = (False, True) if x_format != "dense" else (False,)
    dtype_sets = (None, {"X": np.float16, "batch": np.int32, "pcs": np.float64})
    if device.type == "cuda":
        placements = [("device", True), ("device", False), ("pinned", True), ("pinned", False), ("host", True)]
    else:
        placements = [("host", True)]
    return [(sparse_out, dtypes, placements) for sparse_out in sparse_outs for dtypes in dtype_sets]


def check_loaders(device: torch.device, quick: bool, failures: list[str] | None = None,
                  stats: dict | None = None) -> list[str]:
    """Whole loader batches on device against the CPU loader's, over every distinct configuration.

    Outputs are poisoned through torch itself: with deterministic algorithms on, torch.empty
    fills new memory with NaN (floats) or the largest integer, so a row or field the GPU path
    forgot to write cannot pass. Failures are appended to ``failures`` as they are found;
    ``stats`` (if given) gets the number of configurations compared.
    """
    failures = [] if failures is None else failures
    stats = {} if stats is None else stats
    try:
        import anndata as ad
        import pandas as pd

        from annloader_gpu.loader import AnnDataLoader
        from annloader_gpu.registry import setup_anndata
    except ImportError as exc:
        failures.append(f"loader check skipped: {exc}")
        return failures
    rng = np.random.default_rng(7)
    n_obs, n_vars = (300, 50) if quick else (3000, 700)
    counts = sp.random(n_obs, n_vars, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    counts.data = rng.integers(1, 300, counts.nnz).astype(np.float32)
    counts.data[counts.indptr[3]:counts.indptr[4]] = 0  # an empty row
    counts.eliminate_zeros()
    obs = pd.DataFrame({"batch": rng.choice(["a", "b", "c"], n_obs), "cell_type": rng.choice(["x", "y"], n_obs),
                        "age": rng.integers(0, 90, n_obs), "size": rng.random(n_obs)},
                       index=[f"c{i}" for i in range(n_obs)])
    poisoned = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    stats["configurations"] = stats["cpu_references"] = 0
    try:
        for x_format in ("csr", "csc", "dense"):
            x = counts if x_format == "csr" else (counts.tocsc() if x_format == "csc" else counts.toarray())
            adata = ad.AnnData(X=x, obs=obs.copy())
            adata.obsm["pcs"] = rng.standard_normal((n_obs, 6)).astype(np.float32)
            registry = setup_anndata(adata, batch_key="batch", labels_key="cell_type",
                                     continuous_covariate_keys=["age", "size"], obsm_keys=["pcs"])
            for sparse_out, dtypes, placements in loader_configs(x_format, device):
                kwargs = dict(batch_size=64, shuffle=True, load_sparse_tensor=sparse_out,
                              data_and_attributes=dtypes, drop_last=False)
                # The same seed before each loader is built and drained: the same shuffle.
                torch.manual_seed(3)
                try:
                    expected = list(AnnDataLoader(registry, device="cpu", **kwargs))
                except Exception as exc:  # noqa: BLE001 (recorded, and the rest still runs)
                    failures.append(f"loader {x_format} sparse={sparse_out} dtypes={dtypes}: the CPU loader "
                                    f"raised {type(exc).__name__}: {exc}")
                    continue
                stats["cpu_references"] += 1
                for residency, prefetch in placements:
                    name = (f"loader {x_format} residency={residency} sparse={sparse_out} "
                            f"prefetch={prefetch} dtypes={dtypes}")
                    stats["configurations"] += 1
                    torch.manual_seed(3)
                    try:  # one configuration raising leaves the others checked
                        loader = AnnDataLoader(registry, device=device, residency=residency, prefetch=prefetch,
                                               **kwargs)
                        got = list(loader)
                        if device.type == "cuda":  # while the loader (and its placed data) still lives
                            torch.cuda.synchronize(device)
                        del loader
                    except Exception as exc:  # noqa: BLE001 (recorded, and the rest still runs)
                        failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
                        continue
                    if len(got) != len(expected):
                        failures.append(f"{name}: {len(got)} batches, expected {len(expected)}")
                        continue
                    for i, (g, e) in enumerate(zip(got, expected)):
                        for key in e:
                            a, b = _dense(g[key]).cpu(), _dense(e[key])
                            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                                failures.append(f"{name}: batch {i} field {key} differs")
                                break
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = poisoned
        torch.use_deterministic_algorithms(False)
    return failures


# --- timings ----------------------------------------------------------------------------------


def synthetic_csr_on(device: torch.device, n_obs: int, n_vars: int, genes_per_cell: int, seed: int):
    """A realistic count matrix built with torch on the target device (seconds on a GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    # Zipf-like popularity: column = floor(n_vars * u^3) concentrates mass on low columns.
    per_cell = (torch.randn(n_obs, generator=g, device=device) * 0.4).exp() * genes_per_cell
    per_cell = per_cell.clamp(1, n_vars).long()
    nnz_draw = int(per_cell.sum())
    row = torch.repeat_interleave(torch.arange(n_obs, device=device), per_cell)
    col = (torch.rand(nnz_draw, generator=g, device=device) ** 3 * n_vars).long().clamp_(0, n_vars - 1)
    keys = torch.unique(row * n_vars + col)  # sorted, duplicates merged: canonical CSR
    row, col = keys // n_vars, keys % n_vars
    counts = torch.bincount(row, minlength=n_obs)
    indptr = torch.zeros(n_obs + 1, dtype=torch.int64, device=device)
    indptr[1:] = counts.cumsum(0)
    values = 1 + (torch.rand(len(col), generator=g, device=device).log() / np.log(0.6)).floor()
    return indptr, col.to(torch.int32), values.to(torch.float32)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, repeats: int) -> float:
        """Seconds per call (median of three runs of `repeats` calls)."""
        fn()
        samples = []
        for _ in range(3):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / repeats)
            else:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                samples.append((time.perf_counter() - t0) / repeats)
        return float(np.median(samples))


def copy_roof(device: torch.device, nbytes: int, timer: Timer) -> float:
    """Bytes moved per second (read + write) by a same-device copy of nbytes."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1)
    b = torch.empty_like(a).fill_(0)
    seconds = timer(lambda: b.copy_(a), 10)
    return 2 * nbytes / seconds


def pinned_h2d_roof(device: torch.device, nbytes: int, timer: Timer) -> float:
    host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory().fill_(1)
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / timer(lambda: dev.copy_(host, non_blocking=True), 10)


def time_gathers(device: torch.device, args, timer: Timer, results: dict | None = None) -> dict:
    """Kernel timings; ``results`` (if given) is filled in place as they come."""
    results = {} if results is None else results
    t0 = time.perf_counter()
    indptr, indices, values = synthetic_csr_on(device, args.n_obs, args.n_vars, 1500, 0)
    build_s = time.perf_counter() - t0
    nnz = len(indices)
    compact = (indptr.to(torch.int32 if nnz < 2**31 else torch.int64), indices.to(torch.uint16) if args.n_vars <= 65536 else indices,
               values.to(torch.uint16))
    results.update({"n_obs": args.n_obs, "n_vars": args.n_vars, "nnz": nnz,
                    "nnz_per_cell": nnz / args.n_obs, "build_s": build_s})
    roof = copy_roof(device, args.roof_bytes, timer)
    results["copy_roof_GBps"] = roof / 1e9
    log(f"matrix {args.n_obs} x {args.n_vars}, {nnz / args.n_obs:.0f} nnz/cell, built in {build_s:.1f} s; "
        f"copy roof {roof / 1e9:.0f} GB/s (read+write)")
    gen = torch.Generator(device=device).manual_seed(1)
    for storage_name, (ip, ix, vv) in {"float32+int32": (indptr, indices, values), "compact": compact}.items():
        for batch_size in args.batch_sizes:
            rows = torch.randint(0, args.n_obs, (batch_size,), generator=gen, device=device)
            out = torch.empty(batch_size, args.n_vars, dtype=torch.float32, device=device)
            row_nnz = int((indptr[rows + 1] - indptr[rows]).sum())
            moved = row_nnz * (ix.element_size() + vv.element_size()) + batch_size * 2 * ip.element_size() + out.numel() * 4
            s = timer(lambda: kernels.gather_csr_to_dense(ip, ix, vv, args.n_vars, rows, out, validate=False), 50)
            key = f"dense_{storage_name}_b{batch_size}"
            results[key] = {"s_per_batch": s, "cells_per_s": batch_size / s, "GBps": moved / s / 1e9,
                            "fraction_of_copy_roof": moved / s / roof}
            log(f"  {key}: {batch_size / s / 1e6:.2f} M cells/s, {moved / s / 1e9:.0f} GB/s = "
                f"{moved / s / roof:.0%} of copy roof")
            out_indptr = torch.empty(batch_size + 1, dtype=torch.int64, device=device)
            out_idx = torch.empty(row_nnz, dtype=torch.int32, device=device)
            out_val = torch.empty(row_nnz, dtype=torch.float32, device=device)

            def sparse_gather():
                kernels.csr_batch_indptr(ip, rows, out_indptr, validate=False)
                kernels.gather_csr_to_csr(ip, ix, vv, args.n_vars, rows, out_indptr, out_idx, out_val, validate=False)

            s_sparse = timer(sparse_gather, 50)
            results[f"sparse_{storage_name}_b{batch_size}"] = {"s_per_batch": s_sparse, "cells_per_s": batch_size / s_sparse}
            log(f"  sparse_{storage_name}_b{batch_size}: {batch_size / s_sparse / 1e6:.2f} M cells/s "
                f"({s / s_sparse:.1f}x dense)")
    if device.type == "cuda":
        pinned = tuple(t.cpu().pin_memory() for t in compact)
        h2d = pinned_h2d_roof(device, 1 << 28, timer)
        results["pinned_h2d_roof_GBps"] = h2d / 1e9
        for batch_size in args.batch_sizes:
            rows = torch.randint(0, args.n_obs, (batch_size,), generator=gen, device=device)
            out = torch.empty(batch_size, args.n_vars, dtype=torch.float32, device=device)
            row_nnz = int((indptr[rows + 1] - indptr[rows]).sum())
            gathered = row_nnz * (compact[1].element_size() + compact[2].element_size())
            try:
                s = timer(lambda: kernels.gather_csr_to_dense(*pinned, args.n_vars, rows, out, validate=False), 20)
            except (ValueError, RuntimeError) as exc:  # pinned inputs not supported by this build
                results[f"pinned_b{batch_size}"] = {"error": str(exc)}
                log(f"  pinned_b{batch_size}: not run: {exc}")
                continue
            results[f"pinned_b{batch_size}"] = {"cells_per_s": batch_size / s, "GBps": gathered / s / 1e9,
                                                "fraction_of_pinned_h2d": gathered / s / h2d}
            log(f"  pinned_b{batch_size}: {batch_size / s / 1e6:.2f} M cells/s, "
                f"{gathered / s / h2d:.0%} of pinned H2D ({h2d / 1e9:.0f} GB/s)")
    return results


def synthetic_counts_adata(device: torch.device, n_obs: int, n_vars: int, seed: int):
    """An AnnData with a CSR count matrix drawn on device (synthetic_csr_on: well under a second
    on a GPU for 50,000 x 20,000, against ~13 s for annloader_gpu.synthetic on a CPU), and
    categorical obs "batch" (4) and "labels" (8)."""
    import anndata as ad
    import pandas as pd

    indptr, indices, values = synthetic_csr_on(device, n_obs, n_vars, 1500, seed)
    x = sp.csr_matrix((values.cpu().numpy(), indices.cpu().numpy(), indptr.cpu().numpy()), shape=(n_obs, n_vars))
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"batch": pd.Categorical.from_codes(rng.integers(0, 4, n_obs), [f"b{i}" for i in range(4)]),
                        "labels": pd.Categorical.from_codes(rng.integers(0, 8, n_obs), [f"l{i}" for i in range(8)])},
                       index=pd.Index([f"c{i}" for i in range(n_obs)]))
    return ad.AnnData(X=x, obs=obs)


def time_loader_loop(device: torch.device, args, results: dict | None = None) -> dict:
    """End-to-end `for batch in loader` against scvi-tools' loader (or the scipy path) moving to
    device. ``results`` (if given) is filled in place as they come."""
    results = {} if results is None else results
    try:
        import anndata  # noqa: F401
        import pandas  # noqa: F401

        from annloader_gpu.loader import AnnDataLoader
        from annloader_gpu.registry import setup_anndata
    except ImportError as exc:
        results["skipped"] = f"loader not importable: {exc}"
        return results
    t0 = time.perf_counter()
    adata = synthetic_counts_adata(device, args.loop_n_obs, args.n_vars, seed=2)
    results.update({"n_obs": args.loop_n_obs, "n_vars": args.n_vars, "nnz_per_cell": adata.X.nnz / args.loop_n_obs,
                    "build_s": time.perf_counter() - t0})
    registry = setup_anndata(adata, batch_key="batch", labels_key="labels")
    # scvi-tools' side, set up once for all batch sizes (on a copy: setup_anndata adds obs columns).
    try:
        import scvi  # noqa: F401
        from scvi.dataloaders import AnnDataLoader as ScviLoader
        from scvi.model import SCVI

        ref = adata.copy()
        SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
        manager = SCVI._get_most_recent_anndata_manager(ref, required=True)
        name = "scvi"
    except ImportError:
        manager = None
        name = "scipy_path"

    def drain(loader) -> float:
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            x = batch["X"]
            if x.device != device:
                x = x.to(device, non_blocking=True)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n / (time.perf_counter() - t0)

    for batch_size in args.batch_sizes:
        ours = AnnDataLoader(registry, batch_size=batch_size, shuffle=True, device=device)
        drain(ours)
        results[f"ours_b{batch_size}"] = drain(ours)
        results[f"ours_b{batch_size}_residency"] = ours.residency
        if device.type == "cuda":
            pinned = AnnDataLoader(registry, batch_size=batch_size, shuffle=True, device=device, residency="pinned")
            drain(pinned)
            results[f"ours_pinned_b{batch_size}"] = drain(pinned)
            sparse = AnnDataLoader(registry, batch_size=batch_size, shuffle=True, device=device,
                                   load_sparse_tensor=True)
            drain(sparse)
            results[f"ours_sparse_b{batch_size}"] = drain(sparse)
            log(f"  loop b{batch_size}: pinned {results[f'ours_pinned_b{batch_size}'] / 1e6:.2f} M cells/s, "
                f"sparse output {results[f'ours_sparse_b{batch_size}'] / 1e6:.2f} M cells/s")
            variants = {
                "no_prefetch": dict(prefetch=False),
                "gpu_shuffle": dict(generator=torch.Generator(device=device).manual_seed(0)),
            }
            for label, extra in variants.items():
                variant = AnnDataLoader(registry, batch_size=batch_size, shuffle=True, device=device, **extra)
                drain(variant)
                results[f"ours_{label}_b{batch_size}"] = drain(variant)
            log(f"  loop b{batch_size}: without prefetch "
                f"{results[f'ours_no_prefetch_b{batch_size}'] / 1e6:.2f} M cells/s, shuffled on the GPU "
                f"{results[f'ours_gpu_shuffle_b{batch_size}'] / 1e6:.2f} M cells/s")
        if manager is not None:
            theirs = ScviLoader(manager, batch_size=batch_size, shuffle=True)
        else:
            theirs = _scipy_baseline(adata, batch_size)
        results[f"{name}_b{batch_size}"] = drain(theirs)
        ratio = results[f"ours_b{batch_size}"] / results[f"{name}_b{batch_size}"]
        log(f"  loop b{batch_size}: ours {results[f'ours_b{batch_size}'] / 1e6:.2f} M cells/s, "
            f"{name} {results[f'{name}_b{batch_size}'] / 1e6:.3f} M cells/s, ratio {ratio:.1f}x, "
            f"per-batch {batch_size / results[f'ours_b{batch_size}'] * 1e6:.0f} us")
    return results


def _scipy_baseline(adata, batch_size):
    x = adata.X
    order = np.random.default_rng(0).permutation(adata.n_obs)
    for start in range(0, adata.n_obs, batch_size):
        idx = np.sort(order[start:start + batch_size])
        yield {"X": torch.from_numpy(x[idx].toarray())}


class Report:
    """device_check.json, rewritten after every section with what is known so far (and once more
    on SIGTERM), so that a run stopped by its time cap still returns what it measured."""

    def __init__(self, path: Path | None, data: dict):
        self.path, self.data = path, data
        data.update({"completed_sections": [], "section_seconds": {}, "section_errors": {},
                     "correctness_failures": []})
        self.section: str | None = None
        self._t0 = 0.0

    def run(self, section: str, fn) -> None:
        """Runs one section and saves; an exception is recorded (section_errors) and the next
        section still runs (a one-shot lease should return all it can)."""
        self.section, self._t0 = section, time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 (recorded, and the next section still runs)
            self.data["section_errors"][section] = traceback.format_exc()
            log(f"section {section} raised:\n{traceback.format_exc()}")
        else:
            self.data["completed_sections"].append(section)
        self.data["section_seconds"][section] = round(time.perf_counter() - self._t0, 2)
        self.section = None
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written in place (a few kB in one write): a temporary file beside it could be left in
        # $OUT, whose files are counted, by a SIGKILL.
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def on_signal(self, signum, frame) -> None:
        if self.section is not None:
            self.data["interrupted"] = (f"signal {signum} during section {self.section!r} after "
                                        f"{time.perf_counter() - self._t0:.1f} s (its results are partial)")
        try:
            self.save()
        finally:
            log(f"device_check: stopped by signal {signum} in section {self.section!r}; "
                f"completed: {self.data['completed_sections']}")
            os._exit(128 + signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for device_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU rehearsal)")
    parser.add_argument("--sanitize-case", action="store_true", help="correctness on tiny data only")
    parser.add_argument("--n-obs", type=int, default=200_000)
    parser.add_argument("--loop-n-obs", type=int, default=50_000)
    parser.add_argument("--n-vars", type=int, default=20_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    args = parser.parse_args(argv)
    args.roof_bytes = 1 << 30
    if args.quick:
        args.n_obs, args.loop_n_obs = min(args.n_obs, 5_000), min(args.loop_n_obs, 3_000)
        args.roof_bytes = 1 << 26
    device = torch.device(args.device)
    data: dict = {"build_info": annloader_gpu.build_info(), "device": str(device), "args": dict(vars(args))}
    if device.type == "cuda":
        data["gpu"] = torch.cuda.get_device_name(device)
    log(json.dumps(data["build_info"]))
    report = Report(args.out / "device_check.json" if args.out is not None else None, data)
    signal.signal(signal.SIGTERM, report.on_signal)
    report.save()
    failures = data["correctness_failures"]  # appended to in place by the checks
    rng = np.random.default_rng(0)
    report.run("kernels", lambda: check_kernels(device, rng, quick=args.quick or args.sanitize_case,
                                                failures=failures))
    if not args.sanitize_case:
        data["loader_check"] = {}
        report.run("loaders", lambda: check_loaders(device, quick=args.quick, failures=failures,
                                                    stats=data["loader_check"]))
    log(f"correctness: {'OK' if not failures else f'{len(failures)} FAILURES'}")
    for f in failures:
        log("  FAIL", f)
    if not args.sanitize_case:
        timer = Timer(device)
        data["gathers"], data["loop"] = {}, {}
        report.run("gathers", lambda: time_gathers(device, args, timer, data["gathers"]))
        report.run("loop", lambda: time_loader_loop(device, args, data["loop"]))
    log(f"sections (s): {data['section_seconds']}")
    if data["section_errors"]:
        log(f"sections that raised: {', '.join(data['section_errors'])}")
    return 1 if failures or data["section_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
