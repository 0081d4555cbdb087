// The per-row math of every gather, written once for the CPU loops and the CUDA kernels.
//
// Each function handles one output row and takes (lane, stride): the CPU calls it with (0, 1)
// from one thread per row; a CUDA block calls it with (threadIdx.x, blockDim.x). Nothing here
// allocates, and every read is bounded by the arguments the caller validated.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace annloader {

// Reads element i of an index array that is int32 or int64, chosen at run time: the branch is
// uniform across a launch, and it halves the number of template instantiations.
HOST_DEVICE int64_t load_index(const void* base, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(base)[i]
                  : static_cast<int64_t>(static_cast<const int32_t*>(base)[i]);
}

// Scatters the non-zeros [begin, end) of one CSR row into a dense output row that the caller
// has zeroed. Column indices need not be sorted; a column outside [0, n_cols) is skipped so a
// corrupt matrix can never write past the row (registration rejects such matrices up front).
// Duplicate columns within a row are not summed: the prepared matrix is canonical.
template <typename Idx, typename Val, typename Out>
HOST_DEVICE void scatter_csr_row(const Idx* __restrict__ indices, const Val* __restrict__ values,
                                 int64_t begin, int64_t end, int64_t n_cols, Out* __restrict__ out_row,
                                 int64_t lane, int64_t stride) {
  for (int64_t k = begin + lane; k < end; k += stride) {
    const int64_t col = static_cast<int64_t>(indices[k]);
    if (col >= 0 && col < n_cols) out_row[col] = cast<Out>(values[k]);
  }
}

// Copies one CSR row's indices and values into the batch CSR arrays at out_begin, with casts.
template <typename Idx, typename Val, typename OutIdx, typename OutVal>
HOST_DEVICE void copy_csr_row(const Idx* __restrict__ indices, const Val* __restrict__ values,
                              int64_t begin, int64_t end, OutIdx* __restrict__ out_indices,
                              OutVal* __restrict__ out_values, int64_t out_begin, int64_t lane,
                              int64_t stride) {
  for (int64_t k = lane; k < end - begin; k += stride) {
    out_indices[out_begin + k] = static_cast<OutIdx>(indices[begin + k]);
    out_values[out_begin + k] = cast<OutVal>(values[begin + k]);
  }
}

// Copies and casts columns [col_begin, col_end) of one dense row.
template <typename Val, typename Out>
HOST_DEVICE void cast_dense_row(const Val* __restrict__ src_row, Out* __restrict__ out_row,
                                int64_t col_begin, int64_t col_end, int64_t lane, int64_t stride) {
  for (int64_t c = col_begin + lane; c < col_end; c += stride) out_row[c] = cast<Out>(src_row[c]);
}

}  // namespace annloader
