"""CPU gather to dense: annloader_gpu's C++ kernel vs scipy's ``X[idx].toarray()``.

The matrix is a random CSR of integer counts stored as float32 with int32 indices (the default
20,000 x 20,000 with ~1,500 non-zeros per row, ~30 M non-zeros). Every timed batch draws fresh
random row indices (the same sequence for every method). Reported per method and batch size:

* cells/s: B * n_cols output cells per second, from the best batch time (the machine may be
  shared: the best is the contention-robust figure; the median is printed beside it);
* x scipy: the ratio to ``torch.from_numpy(X[idx].toarray())``;
* GB/s: the gather's memory traffic per second, reads (indptr, indices and values of the rows) plus
  the dense output written once;
* % write roof: output bytes per second over the machine's write bandwidth measured in the same
  run (the best of numpy ``fill``/``copyto``, torch ``fill_`` with the same threads and libc
  ``memset``, into an already-touched buffer of the output's size).

Methods: ``reused`` writes into one already-touched output buffer (what the loader does),
``fresh`` allocates a new torch tensor each batch (page faults on first touch: why buffer reuse
matters), ``compact`` stores uint16 indices + uint16 values (counts < 65536, n_cols <= 65536).

    python benchmarks/bench_cpu_gather.py            # the issue's sizes
    python benchmarks/bench_cpu_gather.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time

import numpy as np
import scipy.sparse as sp
import torch

import annloader_gpu
from annloader_gpu import kernels as K


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--cols", type=int, default=20_000)
    p.add_argument("--nnz-per-row", type=float, default=1_500)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=0,
                   help="timed batches per method and batch size (0: ~0.25e6 rows in total, clamped to 12..400)")
    p.add_argument("--roof-repeats", type=int, default=15, help="repeats of the write-roof measurement (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small matrix and few batches: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.rows, args.batches, args.roof_repeats = 3_000, 5, 5
    return args


def random_counts_csr(rng: np.random.Generator, n_rows: int, n_cols: int, nnz_per_row: float) -> sp.csr_matrix:
    """Distinct sorted columns per row (Bernoulli per cell), values are integer counts >= 1."""
    p = min(nnz_per_row / n_cols, 1.0)
    indptr = [np.zeros(1, np.int64)]
    indices = []
    chunk = max(1, (1 << 24) // max(n_cols, 1))
    for start in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - start)
        r, c = np.nonzero(rng.random((rows, n_cols), dtype=np.float32) < p)
        indices.append(c.astype(np.int32))
        indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(r, minlength=rows)))
    indices = np.concatenate(indices)
    values = (rng.geometric(0.3, size=len(indices))).astype(np.float32)  # counts 1, 2, ... (< 100)
    return sp.csr_matrix((values, indices, np.concatenate(indptr)), shape=(n_rows, n_cols))


def batch_seconds(fn, batches) -> tuple[float, float]:
    """(best, median) seconds per batch; the best is the contention-robust figure."""
    fn(batches[0])  # warm-up: page in the matrix, start the thread pool
    times = []
    for idx in batches:
        t0 = time.perf_counter()
        fn(idx)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def write_roof(n_bytes: int, repeats: int) -> tuple[float, str]:
    """Best bytes/s of filling an already-touched buffer of n_bytes (numpy, torch, libc memset)."""
    n = max(1, n_bytes // 4)
    arr = np.zeros(n, np.float32)
    ten = torch.zeros(n, dtype=torch.float32)
    best = (0.0, "")
    libc_memset = lambda: ctypes.memset(arr.ctypes.data, 0, arr.nbytes)  # noqa: E731
    for name, fill in (("np.ndarray.fill", lambda: arr.fill(1.0)), ("torch.fill_", lambda: ten.fill_(1.0)),
                       ("np.copyto", lambda: np.copyto(arr, 2.0)), ("libc memset", libc_memset)):
        fill()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fill()
            rate = 4 * n / (time.perf_counter() - t0)
            if rate > best[0]:
                best = (rate, name)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    args = parse_args()
    annloader_gpu.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    X = random_counts_csr(rng, args.rows, args.cols, args.nnz_per_row)
    build_s = time.perf_counter() - t0
    indptr, indices, values = X.indptr, X.indices, X.data
    assert indices.dtype == np.int32 and values.dtype == np.float32
    compact = None
    if args.cols <= 65536 and values.max() < 65536:
        compact = (indptr, indices.astype(np.uint16), values.astype(np.uint16))
    # The caller validates once at set-up; the hot path skips the O(n_rows) structure check.
    K.validate_csr_structure(indptr, indices, values, args.cols)
    n_cols = args.cols
    mean_nnz = X.nnz / max(X.shape[0], 1)

    print(f"# machine: {cpu_model()}, {os.cpu_count()} CPUs; threads={args.threads}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"# matrix: {X.shape[0]} x {X.shape[1]} CSR, nnz={X.nnz} ({mean_nnz:.0f}/row), float32 counts, "
          f"int32 indices, int64 indptr (built in {build_s:.1f} s)")
    print(f"# annloader_gpu {annloader_gpu.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"scipy {sp.__name__ and __import__('scipy').__version__}, compiler {annloader_gpu.build_info()['cpu_compiler']}")
    print()
    header = ("| B | method | ms/batch best (median) | cells/s | x scipy | GB/s (read+write) | % write roof |")
    rule = "|---:|---|---:|---:|---:|---:|---:|"
    lines = [header, rule]
    roofs = []

    for B in args.batch_sizes:
        n_batches = args.batches or int(np.clip(250_000 // B, 12, 400))
        batches = [rng.integers(0, X.shape[0], size=B) for _ in range(n_batches + 1)]
        out_bytes = B * n_cols * 4
        roof, roof_how = write_roof(out_bytes, args.roof_repeats)
        roofs.append((B, out_bytes, roof, roof_how))

        # Correctness once, so a fast wrong answer cannot pass as a result.
        check = torch.empty((B, n_cols), dtype=torch.float32)
        K.gather_csr_to_dense(indptr, indices, values, n_cols, batches[0], check, validate=False)
        assert torch.equal(check, torch.from_numpy(X[batches[0]].toarray()))

        def scipy_gather(idx):
            return torch.from_numpy(X[idx].toarray())

        reused = torch.zeros((B, n_cols), dtype=torch.float32)  # touched once, then reused

        def ours_reused(idx, arrays=(indptr, indices, values)):
            K.gather_csr_to_dense(*arrays, n_cols, idx, reused, validate=False)

        def ours_reused_validated(idx):
            K.gather_csr_to_dense(indptr, indices, values, n_cols, idx, reused)

        def ours_fresh(idx):
            out = torch.empty((B, n_cols), dtype=torch.float32)
            K.gather_csr_to_dense(indptr, indices, values, n_cols, idx, out, validate=False)
            return out

        methods = [("scipy X[idx].toarray()", scipy_gather, 8),
                   ("ours, reused buffer", ours_reused, 8),
                   ("ours, reused, validate=True", ours_reused_validated, 8),
                   ("ours, fresh torch.empty each batch", ours_fresh, 8)]
        if compact is not None:
            methods.append(("ours, compact uint16 idx+val, reused", lambda idx: ours_reused(idx, compact), 4))

        scipy_s = None
        for name, fn, in_bytes_per_nnz in methods:
            s, med = batch_seconds(fn, batches)
            scipy_s = scipy_s or s
            cells = B * n_cols / s
            read_bytes = B * (mean_nnz * in_bytes_per_nnz + 16)  # row's indices+values, 2 indptr, row index
            traffic = (read_bytes + out_bytes) / s
            lines.append(f"| {B} | {name} | {s * 1e3:.2f} ({med * 1e3:.2f}) | {cells / 1e9:.2f} G | {scipy_s / s:.2f} | "
                         f"{traffic / 1e9:.1f} | {100 * out_bytes / s / roof:.0f}% |")
        lines.append(f"| {B} | write roof ({roof_how}, {out_bytes / 1e6:.0f} MB touched buffer) | "
                     f"{out_bytes / roof * 1e3:.2f} | {B * n_cols / (out_bytes / roof) / 1e9:.2f} G | | "
                     f"{roof / 1e9:.1f} | 100% |")
    print("\n".join(lines))
    print(f"# load average at end {os.getloadavg()[0]:.2f} (other processes share these cores when > 0)")
    print()
    for B, n, roof, how in roofs:
        print(f"# write roof for B={B}: {roof / 1e9:.1f} GB/s ({how} into a touched {n / 1e6:.0f} MB buffer, best of "
              f"{args.roof_repeats})")


if __name__ == "__main__":
    main()
