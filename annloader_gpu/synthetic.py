"""Deterministic synthetic single-cell count matrices for tests and benchmarks.

The model, per cell ``i`` and gene ``j``:

* genes have Zipf-like popularity ``w_j ~ 1 / rank_j**a`` (ranks randomly permuted over
  columns, as real gene order carries no expression information); each label (cell type)
  perturbs the popularity of a few "marker" genes;
* a cell's depth ``d_i`` is lognormal with mean 1; it expects ``k_i = genes_per_cell * d_i``
  expressed genes (clipped to ``[1, n_vars]``);
* genes are expressed independently with probability ``pi_ij = min(1, c_i * w_j)``, where
  ``c_i`` is solved so that ``sum_j pi_ij = k_i`` (Poisson sampling: a without-replacement
  design whose inclusion probabilities follow popularity; the realised number of genes
  fluctuates around ``k_i``);
* an expressed gene's UMI count is ``1 + NB(r=1, mean=mu_ij)`` (a geometric, i.e. a
  negative binomial with dispersion 1) with ``mu_ij`` proportional to depth, popularity and
  a per-batch gene factor.

Randomness is drawn from one PCG64 stream per fixed block of cells (``SeedSequence`` keyed
by the block index), so the matrix is bit-for-bit identical whatever ``chunk_size`` is.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["GENERATOR_VERSION", "make_counts_adata", "default_dataset", "default_cache_dir"]

#: Bump whenever the generated data changes, so stale on-disk caches are not reused.
GENERATOR_VERSION = 1

# Determinism unit: each block of this many cells owns an independent RNG stream. Small, so
# that rounding ``chunk_size`` up to whole blocks costs nothing noticeable.
_CELLS_PER_RNG_BLOCK = 64
_INT32_MAX = np.iinfo(np.int32).max  # module-level so tests can exercise the int64 indptr path

# SeedSequence spawn keys of the independent streams.
_STREAM_GENES = 0
_STREAM_CELLS = 1
_STREAM_BLOCKS = 2

# Inclusion is decided by comparing a 16-bit uniform with pi * 2**16: four decisions per
# 64-bit random word keeps the dominant cost (one decision per cell x gene) low. The
# resolution (pi is effectively rounded up to a multiple of 2**-16) is ample here.
_UNIFORM16_SCALE = 65536.0

_MARKER_GENE_FRACTION = 0.05
_MARKER_LOG_FOLD_SD = 1.5
_BATCH_LOG_FACTOR_SD = 0.2
# Mean extra UMIs (beyond the first) of an expressed gene is
# depth * batch factor * _EXTRA_COUNT_SCALE * (n_vars * w_j). At the defaults this gives
# ~3 UMIs per expressed gene and ~70% singletons, as in typical 10x data.
_EXTRA_COUNT_SCALE = 0.2


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _popularity_weights(n_vars: int, n_labels: int, zipf_exponent: float, rng: np.random.Generator):
    """Per-label gene weights (rows sum to 1) and each gene's global popularity rank (0 = top)."""
    rank_of_gene = rng.permutation(n_vars)
    base = (rank_of_gene + 1.0) ** -zipf_exponent
    log_fold = np.zeros((n_labels, n_vars))
    n_markers = max(1, int(round(_MARKER_GENE_FRACTION * n_vars)))
    for label in range(n_labels):  # loop over labels (a handful), not cells
        markers = rng.choice(n_vars, size=min(n_markers, n_vars), replace=False)
        log_fold[label, markers] = rng.normal(0.0, _MARKER_LOG_FOLD_SD, size=markers.size)
    weights = base[None, :] * np.exp(log_fold)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights, rank_of_gene


def _inclusion_scale(weights: np.ndarray, expected_genes: np.ndarray) -> np.ndarray:
    """Solve ``sum_j min(1, c * weights[j]) == k`` for ``c``, for each ``k`` in ``expected_genes``.

    With the weights sorted decreasingly and the top ``m`` genes saturated, the sum is
    ``m + c * tail[m]``; ``g[m]`` is its value where gene ``m`` saturates, increasing in ``m``.
    """
    w = np.sort(weights)[::-1]
    tail = np.cumsum(w[::-1])[::-1]  # tail[m] = sum(w[m:])
    g = np.arange(w.size) + tail / w
    m = np.minimum(np.searchsorted(g, expected_genes, side="left"), w.size - 1)
    return (expected_genes - m) / tail[m]


def _string_index(prefix: str, n: int) -> pd.Index:
    return pd.Index(np.char.add(prefix, np.arange(n).astype(str)).astype(object))


def make_counts_adata(
    n_obs: int = 20_000,
    n_vars: int = 20_000,
    *,
    genes_per_cell: float = 1_500,
    n_batches: int = 4,
    n_labels: int = 8,
    seed: int = 0,
    chunk_size: int = 2_048,
    zipf_exponent: float = 1.0,
    genes_per_cell_log_sd: float = 0.4,
) -> anndata.AnnData:
    """Generate a deterministic AnnData of integer UMI counts in canonical CSR form.

    ``X`` is a ``scipy.sparse.csr_matrix`` with float32 values, int32 column indices and an
    int32 indptr (int64 once nnz exceeds 2**31 - 1). ``obs`` has categorical ``batch`` and
    ``labels`` (string categories), ``n_counts``, ``n_genes`` and ``size_factor`` (library
    size over its mean); ``var`` has ``popularity_rank``. ``chunk_size`` (cells per vectorised
    step, rounded up to a multiple of 64) bounds scratch memory at about
    ``50 * chunk_size * genes_per_cell + 500 * n_vars`` bytes and never changes the result;
    beyond that, peak memory is the final matrix plus O(n_obs + n_labels * n_batches * n_vars).
    """
    if n_obs < 1 or n_vars < 1:
        raise ValueError(f"n_obs and n_vars must be positive, got {n_obs} x {n_vars}")
    if genes_per_cell <= 0 or n_batches < 1 or n_labels < 1 or chunk_size < 1:
        raise ValueError("genes_per_cell, n_batches, n_labels and chunk_size must be positive")

    weights, rank_of_gene = _popularity_weights(n_vars, n_labels, zipf_exponent, _stream(seed, _STREAM_GENES))
    gene_rng = _stream(seed, _STREAM_GENES, 1)
    batch_factor = np.exp(gene_rng.normal(0.0, _BATCH_LOG_FACTOR_SD, size=(n_batches, n_vars)))

    cell_rng = _stream(seed, _STREAM_CELLS)
    sd = genes_per_cell_log_sd
    depth = cell_rng.lognormal(-0.5 * sd * sd, sd, size=n_obs)
    batch = cell_rng.integers(0, n_batches, size=n_obs)
    label = cell_rng.integers(0, n_labels, size=n_obs)
    expected_genes = np.clip(genes_per_cell * depth, 1.0, n_vars)
    inclusion_scale = np.empty(n_obs)
    for lab in range(n_labels):
        of_label = label == lab
        inclusion_scale[of_label] = _inclusion_scale(weights[lab], expected_genes[of_label])

    threshold_per_label = (weights * _UNIFORM16_SCALE).astype(np.float32)
    # Rows indexed by label * n_batches + batch: the expected extra UMIs at unit depth.
    extra_mean_table = (
        (_EXTRA_COUNT_SCALE * n_vars * weights[:, None, :] * batch_factor[None, :, :])
        .astype(np.float32)
        .ravel()
    )
    table_offset = (label * n_batches + batch).astype(np.int64) * n_vars
    depth32 = depth.astype(np.float32)
    inclusion_scale32 = inclusion_scale.astype(np.float32)

    # Upper bound on nnz (mean + 10 sd, plus the 16-bit rounding of pi): the output is
    # allocated once, filled lazily page by page, and trimmed in place at the end, so peak
    # memory stays near the final matrix size without concatenating chunks.
    total_expected = float(expected_genes.sum())
    capacity = int(total_expected + n_obs * n_vars / _UNIFORM16_SCALE + 10 * math.sqrt(total_expected) + 1024)
    capacity = min(capacity, n_obs * n_vars)
    data = np.empty(capacity, dtype=np.float32)
    indices = np.empty(capacity, dtype=np.int32)
    row_nnz = np.empty(n_obs, dtype=np.int64)
    n_counts = np.empty(n_obs, dtype=np.float64)

    cells_per_step = -(-chunk_size // _CELLS_PER_RNG_BLOCK) * _CELLS_PER_RNG_BLOCK
    words_per_cell = -(-n_vars // 4)  # 64-bit words holding one 16-bit uniform per gene
    expressed = np.empty((min(_CELLS_PER_RNG_BLOCK, n_obs), n_vars), dtype=bool)

    nnz = 0
    for step_start in range(0, n_obs, cells_per_step):
        step_stop = min(step_start + cells_per_step, n_obs)
        flat_parts, exponential_parts = [], []
        # The cell x gene work runs one RNG block at a time: its scratch stays cache-sized.
        for start in range(step_start, step_stop, _CELLS_PER_RNG_BLOCK):
            stop = min(start + _CELLS_PER_RNG_BLOCK, n_obs)
            n_cells = stop - start
            block_seed = np.random.SeedSequence(seed, spawn_key=(_STREAM_BLOCKS, start // _CELLS_PER_RNG_BLOCK))
            block_rng = np.random.Generator(np.random.PCG64(block_seed))
            words = block_rng.bit_generator.random_raw(n_cells * words_per_cell)
            uniform16 = words.view(np.uint16).reshape(n_cells, 4 * words_per_cell)[:, :n_vars]
            threshold = threshold_per_label[label[start:stop]]
            threshold *= inclusion_scale32[start:stop, None]
            hit = expressed[:n_cells]
            np.less(uniform16, threshold, out=hit)
            flat = np.flatnonzero(hit)
            flat += start * n_vars
            flat_parts.append(flat)
            exponential_parts.append(block_rng.standard_exponential(flat.size, dtype=np.float32))

        flat = np.concatenate(flat_parts)
        rows = flat // n_vars
        cols = flat - rows * n_vars
        step_nnz = flat.size
        step_rows = step_stop - step_start
        rows_local = rows - step_start
        row_nnz[step_start:step_stop] = np.bincount(rows_local, minlength=step_rows)

        extra_mean = extra_mean_table[table_offset[rows] + cols]
        extra_mean *= depth32[rows]
        np.maximum(extra_mean, np.float32(1e-30), out=extra_mean)  # keep the log finite for extreme exponents
        # Geometric by inversion: floor(E / log(1 + 1/mu)) with E ~ Exp(1) has mean mu.
        rate = np.reciprocal(extra_mean, out=extra_mean)
        rate += np.float32(1.0)
        np.log(rate, out=rate)  # not log1p: that is ~4x slower in float32, and 1/mu >> 2**-24 here
        counts = np.concatenate(exponential_parts)
        counts /= rate
        np.floor(counts, out=counts)
        counts += np.float32(1.0)

        if nnz + step_nnz > capacity:  # astronomically unlikely; grow rather than fail
            capacity = max(int(capacity * 1.25), nnz + step_nnz)
            data.resize(capacity, refcheck=False)
            indices.resize(capacity, refcheck=False)
        data[nnz : nnz + step_nnz] = counts
        indices[nnz : nnz + step_nnz] = cols
        n_counts[step_start:step_stop] = np.bincount(rows_local, weights=counts, minlength=step_rows)
        nnz += step_nnz

    # Shrinking in place is a realloc (mremap), not a copy.
    data.resize(nnz, refcheck=False)
    indices.resize(nnz, refcheck=False)
    indptr = np.zeros(n_obs + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    if nnz <= _INT32_MAX:
        indptr = indptr.astype(np.int32)
    X = sp.csr_matrix((n_obs, n_vars), dtype=np.float32)
    # Assigned directly: the constructor would upcast int32 indices to match an int64 indptr.
    X.data, X.indices, X.indptr = data, indices, indptr
    X.has_sorted_indices = True
    X.has_canonical_format = True

    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, categories=[f"batch_{b}" for b in range(n_batches)]),
            "labels": pd.Categorical.from_codes(label, categories=[f"type_{t}" for t in range(n_labels)]),
            "n_counts": n_counts.astype(np.float32),
            "n_genes": row_nnz.astype(np.int32),
            "size_factor": (n_counts / n_counts.mean()).astype(np.float32),
        },
        index=_string_index("cell_", n_obs),
    )
    var = pd.DataFrame({"popularity_rank": rank_of_gene.astype(np.int32)}, index=_string_index("gene_", n_vars))
    uns = {
        "synthetic": {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "genes_per_cell": float(genes_per_cell),
            "zipf_exponent": float(zipf_exponent),
            "genes_per_cell_log_sd": float(genes_per_cell_log_sd),
        }
    }
    return anndata.AnnData(X=X, obs=obs, var=var, uns=uns)


def default_cache_dir() -> Path:
    """``$ANNLOADER_GPU_CACHE`` if set, else ``~/.cache/annloader_gpu``."""
    env = os.environ.get("ANNLOADER_GPU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "annloader_gpu"


def default_dataset(
    path: str | os.PathLike[str] | None = None,
    *,
    n_obs: int = 200_000,
    n_vars: int = 20_000,
    seed: int = 0,
) -> anndata.AnnData:
    """The embedded benchmark dataset, generated once and then reloaded from an .h5ad cache.

    ``path`` is either the .h5ad file to use or a cache directory (default:
    :func:`default_cache_dir`); in a directory the file name encodes the parameters and
    :data:`GENERATOR_VERSION`, so changing either regenerates.
    """
    file_name = f"synthetic_v{GENERATOR_VERSION}_obs{n_obs}_vars{n_vars}_seed{seed}.h5ad"
    if path is None:
        file = default_cache_dir() / file_name
    else:
        path = Path(path)
        file = path if path.suffix == ".h5ad" else path / file_name
    if file.exists():
        return anndata.read_h5ad(file)

    adata = make_counts_adata(n_obs, n_vars, seed=seed)
    file.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename in the same directory, so a crash or a concurrent reader never
    # sees a half-written cache.
    # Not mkstemp: its 0600 mode would make a shared cache unreadable to other users.
    tmp_name = file.parent / f".{file.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        adata.write_h5ad(tmp_name)
        os.replace(tmp_name, file)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return adata
