// CUDA kernels of the one-time CSC -> CSR conversion.
//
// A stable radix sort of the non-zeros by row keeps, within each row, the CSC's column order,
// so every output row comes out sorted by column with no per-row sort: the same result as the
// CPU conversion (csc_to_csr in cpu_gather.cpp), computed deterministically.
#pragma once

#include <cstdint>

#include "row_gather.h"

namespace annloader::cuda {

// keys[k] = row of non-zero k, positions[k] = k. A row outside [0, n_rows) is recorded in
// *bad_position and keyed 0 so the sort stays in bounds; the caller raises before using output.
template <typename Idx, typename Int>
__global__ void csc_sort_keys_kernel(const Idx* __restrict__ row_of, int64_t nnz, int64_t n_rows,
                                     Int* __restrict__ keys, Int* __restrict__ positions,
                                     unsigned long long* bad_position) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz; k += stride) {
    const int64_t r = static_cast<int64_t>(row_of[k]);
    const bool ok = r >= 0 && r < n_rows;
    if (!ok && bad_position != nullptr) atomicMin(bad_position, static_cast<unsigned long long>(k));
    keys[k] = static_cast<Int>(ok ? r : 0);
    positions[k] = static_cast<Int>(k);
  }
}

// The column owning CSC position k: the last c with indptr[c] <= k (empty columns skipped).
__device__ __forceinline__ int64_t column_of_position(const void* indptr, bool indptr64, int64_t n_cols,
                                                      int64_t k) {
  int64_t lo = 0, hi = n_cols;  // invariant: indptr[lo] <= k < indptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (load_index(indptr, indptr64, mid) <= k) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// out_indices[j] = column of the j-th sorted non-zero; out_values[j] = its value (moved bytewise).
template <typename Idx, typename Elem, typename Int>
__global__ void csc_scatter_sorted_kernel(const void* __restrict__ indptr, bool indptr64, int64_t n_cols,
                                          const Elem* __restrict__ values,
                                          const Int* __restrict__ sorted_positions, int64_t nnz,
                                          Idx* __restrict__ out_indices, Elem* __restrict__ out_values) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nnz; j += stride) {
    const int64_t k = static_cast<int64_t>(sorted_positions[j]);
    out_indices[j] = static_cast<Idx>(column_of_position(indptr, indptr64, n_cols, k));
    out_values[j] = values[k];
  }
}

// out_indptr[r] = first sorted position whose row is >= r, for r in [0, n_rows]; a binary search
// per row replaces a histogram and a scan.
template <typename Int>
__global__ void csr_indptr_from_sorted_rows_kernel(const Int* __restrict__ sorted_rows, int64_t nnz,
                                                   int64_t n_rows, int64_t* __restrict__ out_indptr) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r <= n_rows; r += stride) {
    int64_t lo = 0, hi = nnz;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(sorted_rows[mid]) < r) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    out_indptr[r] = lo;
  }
}

}  // namespace annloader::cuda
