// CUDA kernels of the row gathers. The per-row math lives in row_gather.h, shared with the CPU
// loops; these kernels only map rows and lanes onto the grid and guard the row indices.
#pragma once

#include <cstdint>

#include "row_gather.h"

namespace annloader::cuda {

// A row index outside [0, n_rows) is never dereferenced: the kernel records the smallest
// offending batch position in *bad_position (initialised to all ones by the caller) and leaves
// that output row zero. The host reads the slot only when it asks to (check_rows or
// an explicit error check), so the hot path never synchronises.
__device__ __forceinline__ bool row_in_range(int64_t r, int64_t n_rows, int64_t position,
                                             unsigned long long* bad_position) {
  if (r >= 0 && r < n_rows) return true;
  if (bad_position != nullptr) atomicMin(bad_position, static_cast<unsigned long long>(position));
  return false;
}

// One block per batch row: the block zeroes its output row, then scatters the row's non-zeros
// into it. Zeroing here instead of a cudaMemsetAsync saves a launch per batch, and the scattered
// writes land on lines the zeroing just brought into L2. A bad row is left zero.
template <typename Idx, typename Val, typename Out>
__global__ void csr_rows_to_dense_kernel(const void* __restrict__ indptr, bool indptr64,
                                         const Idx* __restrict__ indices,
                                         const Val* __restrict__ values, int64_t n_rows,
                                         int64_t n_cols, const void* __restrict__ rows, bool rows64,
                                         int64_t n_batch, Out* __restrict__ out,
                                         unsigned long long* bad_position) {
  const int64_t lane = static_cast<int64_t>(threadIdx.x);
  const int64_t stride = static_cast<int64_t>(blockDim.x);
  for (int64_t i = blockIdx.x; i < n_batch; i += gridDim.x) {
    Out* out_row = out + i * n_cols;
    for (int64_t c = lane; c < n_cols; c += stride) out_row[c] = Out{};
    const int64_t r = load_index(rows, rows64, i);
    // Every thread's zeros are written before any thread scatters into the row; the branch
    // below is uniform across the block (one row per block).
    __syncthreads();
    if (!row_in_range(r, n_rows, i, bad_position)) continue;
    scatter_csr_row(indices, values, load_index(indptr, indptr64, r),
                    load_index(indptr, indptr64, r + 1), n_cols, out_row, lane, stride);
  }
}

// Rows on grid.x, column chunks on grid.y.
template <typename Val, typename Out>
__global__ void gather_dense_rows_kernel(const Val* __restrict__ src, int64_t n_rows,
                                         int64_t n_cols, int64_t row_stride,
                                         const void* __restrict__ rows, bool rows64,
                                         int64_t n_batch, Out* __restrict__ out,
                                         unsigned long long* bad_position) {
  const int64_t cols_per_chunk = (n_cols + gridDim.y - 1) / gridDim.y;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * cols_per_chunk;
  const int64_t col_end = col_begin + cols_per_chunk < n_cols ? col_begin + cols_per_chunk : n_cols;
  for (int64_t i = blockIdx.x; i < n_batch; i += gridDim.x) {
    const int64_t r = load_index(rows, rows64, i);
    if (!row_in_range(r, n_rows, i, bad_position)) {
      for (int64_t c = col_begin + threadIdx.x; c < col_end; c += blockDim.x) out[i * n_cols + c] = Out{};
      continue;
    }
    cast_dense_row(src + r * row_stride, out + i * n_cols, col_begin, col_end,
                   static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x));
  }
}

// Narrow dense fields (obs columns, small obsm blocks) of one (source, output) dtype pair,
// gathered by one launch: grid.y picks the field, threads walk its batch elements. A model's
// batch/labels/covariates then cost one launch together instead of one each.
constexpr int kMaxFieldsPerLaunch = 8;

struct NarrowField {
  const void* src;
  int64_t n_cols;
  int64_t row_stride;
  void* out;
};

struct NarrowFieldPack {
  NarrowField fields[kMaxFieldsPerLaunch];
};

template <typename Val, typename Out>
__global__ void gather_narrow_fields_kernel(NarrowFieldPack pack, int64_t n_rows,
                                            const void* __restrict__ rows, bool rows64,
                                            int64_t n_batch, unsigned long long* bad_position) {
  const NarrowField field = pack.fields[blockIdx.y];
  const auto* src = static_cast<const Val*>(field.src);
  auto* out = static_cast<Out*>(field.out);
  const int64_t n_elements = n_batch * field.n_cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_elements;
       e += stride) {
    const int64_t i = e / field.n_cols;
    const int64_t c = e - i * field.n_cols;
    const int64_t r = load_index(rows, rows64, i);
    out[e] = row_in_range(r, n_rows, i, bad_position) ? cast<Out>(src[r * field.row_stride + c]) : Out{};
  }
}

// out_indptr[i + 1] = length of batch row i (0 for a bad row); out_indptr[0] = 0.
__global__ void batch_row_lengths_kernel(const void* __restrict__ indptr, bool indptr64,
                                         int64_t n_rows, const void* __restrict__ rows,
                                         bool rows64, int64_t n_batch,
                                         int64_t* __restrict__ out_indptr,
                                         unsigned long long* bad_position) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_batch;
       i += stride) {
    const int64_t r = load_index(rows, rows64, i);
    out_indptr[i + 1] = row_in_range(r, n_rows, i, bad_position)
                            ? load_index(indptr, indptr64, r + 1) - load_index(indptr, indptr64, r)
                            : 0;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) out_indptr[0] = 0;
}

// In-place inclusive scan of data[0, n) by a single block; batches are at most a few hundred
// thousand rows, so one block walking tile by tile beats a multi-kernel device scan's launches.
constexpr int kScanThreads = 1024;
__global__ void inclusive_scan_single_block_kernel(int64_t* data, int64_t n) {
  __shared__ int64_t tile[kScanThreads];
  __shared__ int64_t carry;
  const int lane = static_cast<int>(threadIdx.x);
  if (lane == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + lane;
    tile[lane] = i < n ? data[i] : 0;
    __syncthreads();
    for (int offset = 1; offset < kScanThreads; offset <<= 1) {
      const int64_t add = lane >= offset ? tile[lane - offset] : 0;
      __syncthreads();
      tile[lane] += add;
      __syncthreads();
    }
    if (i < n) data[i] = tile[lane] + carry;
    __syncthreads();
    if (lane == kScanThreads - 1) carry += tile[kScanThreads - 1];
    __syncthreads();
  }
}

// How many of a row's `length` entries fit the output arrays from out_begin: an out_indptr that
// disagrees with the rows (a caller's bug) must not turn into writes past the outputs.
__device__ __forceinline__ int64_t clamp_to_capacity(int64_t length, int64_t out_begin,
                                                     int64_t out_capacity) {
  if (out_begin < 0 || out_begin >= out_capacity) return 0;
  return length < out_capacity - out_begin ? length : out_capacity - out_begin;
}

// The column indices and the values of a CSR batch are copied by two kernels, so that the
// instantiations grow as (index types + value types), not their product.
template <typename Idx, typename OutIdx>
__global__ void copy_csr_indices_kernel(const void* __restrict__ indptr, bool indptr64,
                                        const Idx* __restrict__ indices, int64_t n_rows,
                                        const void* __restrict__ rows, bool rows64,
                                        int64_t n_batch, const int64_t* __restrict__ out_indptr,
                                        OutIdx* __restrict__ out_indices, int64_t out_capacity) {
  for (int64_t i = blockIdx.x; i < n_batch; i += gridDim.x) {
    const int64_t r = load_index(rows, rows64, i);
    if (r < 0 || r >= n_rows) continue;  // recorded by batch_row_lengths_kernel
    const int64_t begin = load_index(indptr, indptr64, r);
    const int64_t out_begin = out_indptr[i];
    const int64_t length = clamp_to_capacity(load_index(indptr, indptr64, r + 1) - begin, out_begin,
                                             out_capacity);
    for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
      out_indices[out_begin + k] = static_cast<OutIdx>(indices[begin + k]);
    }
  }
}

template <typename Val, typename OutVal>
__global__ void copy_csr_values_kernel(const void* __restrict__ indptr, bool indptr64,
                                       const Val* __restrict__ values, int64_t n_rows,
                                       const void* __restrict__ rows, bool rows64, int64_t n_batch,
                                       const int64_t* __restrict__ out_indptr,
                                       OutVal* __restrict__ out_values, int64_t out_capacity) {
  for (int64_t i = blockIdx.x; i < n_batch; i += gridDim.x) {
    const int64_t r = load_index(rows, rows64, i);
    if (r < 0 || r >= n_rows) continue;
    const int64_t begin = load_index(indptr, indptr64, r);
    const int64_t out_begin = out_indptr[i];
    const int64_t length = clamp_to_capacity(load_index(indptr, indptr64, r + 1) - begin, out_begin,
                                             out_capacity);
    for (int64_t k = threadIdx.x; k < length; k += blockDim.x) {
      out_values[out_begin + k] = cast<OutVal>(values[begin + k]);
    }
  }
}

__global__ void check_rows_kernel(const void* __restrict__ rows, bool rows64, int64_t n_batch,
                                  int64_t n_rows, unsigned long long* bad_position) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_batch;
       i += stride) {
    row_in_range(load_index(rows, rows64, i), n_rows, i, bad_position);
  }
}

}  // namespace annloader::cuda
