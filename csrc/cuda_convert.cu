#include "cuda_convert.h"

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "cuda_launch.h"
#include "dispatch.h"
#include "kernels_convert.cuh"

namespace annloader::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kAlign = 256;

int64_t aligned(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// 32-bit keys and positions whenever they fit: half the sort traffic of 64-bit ones.
bool fits_32_bits(int64_t n_rows, int64_t nnz) {
  return n_rows <= std::numeric_limits<int32_t>::max() && nnz <= std::numeric_limits<int32_t>::max();
}

int end_bit_for(int64_t n_rows) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < n_rows) ++bits;
  return bits;
}

// The double-buffer sort ping-pongs between the two slots we already hold for keys and for
// positions, so cub's own temporary storage stays small (no extra 2 x nnz copies).
template <typename Int>
size_t sort_temp_bytes(int64_t nnz) {
  size_t bytes = 0;
  cub::DoubleBuffer<Int> keys(nullptr, nullptr), positions(nullptr, nullptr);
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, positions, nnz),
             "cub::DeviceRadixSort::SortPairs (workspace query)");
  return bytes;
}

template <typename Int>
int64_t workspace_bytes(int64_t nnz) {
  return 4 * aligned(nnz * int64_t(sizeof(Int))) + aligned(static_cast<int64_t>(sort_temp_bytes<Int>(nnz)));
}


// The CSC's nnz (its last indptr entry), read from the device: the one synchronisation.
int64_t read_nnz(const CsrMatrix& csc, cudaStream_t stream) {
  const bool indptr64 = is_int64_index(csc.indptr_dtype, "indptr");
  int64_t nnz64 = 0;
  int32_t nnz32 = 0;
  void* target = indptr64 ? static_cast<void*>(&nnz64) : static_cast<void*>(&nnz32);
  check_cuda(cudaMemcpyAsync(target, static_cast<const char*>(csc.indptr) + csc.n_cols * (indptr64 ? 8 : 4),
                             indptr64 ? 8 : 4, cudaMemcpyDeviceToHost, stream),
             "reading the CSC's nnz");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return indptr64 ? nnz64 : nnz32;
}

template <typename Int>
void convert(cudaStream_t stream, const CsrMatrix& csc, int64_t nnz, char* workspace, int64_t workspace_size,
             int64_t* out_indptr, void* out_indices, void* out_values, unsigned long long* bad_position) {
  const bool indptr64 = is_int64_index(csc.indptr_dtype, "indptr");
  if (workspace_size < workspace_bytes<Int>(nnz)) {
    throw std::invalid_argument("csc_to_csr workspace of " + std::to_string(workspace_size) +
                                " bytes is too small; need " + std::to_string(workspace_bytes<Int>(nnz)));
  }
  const int64_t slot = aligned(nnz * int64_t(sizeof(Int)));
  cub::DoubleBuffer<Int> keys(reinterpret_cast<Int*>(workspace), reinterpret_cast<Int*>(workspace + slot));
  cub::DoubleBuffer<Int> positions(reinterpret_cast<Int*>(workspace + 2 * slot),
                                   reinterpret_cast<Int*>(workspace + 3 * slot));
  void* sort_temp = workspace + 4 * slot;
  size_t sort_bytes = sort_temp_bytes<Int>(nnz);

  dispatch_column_index(csc.indices_dtype, [&](auto idx_tag) {
    using Idx = typename decltype(idx_tag)::type;
    if (nnz > 0) {
      launch("csc_sort_keys_kernel", csc_sort_keys_kernel<Idx, Int>, blocks_for(nnz, kThreads),
             kThreads, stream, static_cast<const Idx*>(csc.indices), nnz, csc.n_rows,
             keys.Current(), positions.Current(), bad_position);
      // LSD radix sort is stable: equal rows keep their CSC (column) order. The sorted data ends
      // up in whichever slot Current() names afterwards.
      check_cuda(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, keys, positions, nnz, 0,
                                                 end_bit_for(csc.n_rows), stream),
                 "cub::DeviceRadixSort::SortPairs");
      auto scatter = [&](auto elem_tag) {
        using Elem = typename decltype(elem_tag)::type;
        launch("csc_scatter_sorted_kernel", csc_scatter_sorted_kernel<Idx, Elem, Int>,
               blocks_for(nnz, kThreads), kThreads, stream, csc.indptr, indptr64, csc.n_cols,
               static_cast<const Elem*>(csc.values), positions.Current(), nnz,
               static_cast<Idx*>(out_indices), static_cast<Elem*>(out_values));
      };
      int64_t elem = 0;
      dispatch_value(csc.values_dtype, [&](auto tag) { elem = sizeof(typename decltype(tag)::type); });
      switch (elem) {
        // Values are moved, not decoded: an unsigned integer of the same width moves each one in
        // a single aligned access (torch aligns allocations to the element size).
        case 1: scatter(Tag<uint8_t>{}); break;
        case 2: scatter(Tag<uint16_t>{}); break;
        case 4: scatter(Tag<uint32_t>{}); break;
        default: scatter(Tag<uint64_t>{}); break;
      }
    }
  });
  launch("csr_indptr_from_sorted_rows_kernel", csr_indptr_from_sorted_rows_kernel<Int>,
         blocks_for(csc.n_rows + 1, kThreads), kThreads, stream, keys.Current(), nnz, csc.n_rows,
         out_indptr);
}

}  // namespace

int64_t csc_to_csr_workspace_bytes(int device, int64_t n_rows, int64_t nnz) {
  const DeviceGuard guard(device);  // cub sizes its workspace for this device
  return fits_32_bits(n_rows, nnz) ? workspace_bytes<int32_t>(nnz) : workspace_bytes<int64_t>(nnz);
}

void csc_to_csr(int device, uintptr_t stream, const CsrMatrix& csc, void* workspace, int64_t workspace_size,
                int64_t* out_indptr, void* out_indices, void* out_values, unsigned long long* bad_position) {
  check_column_index_capacity(csc.indices_dtype, csc.n_cols);
  const DeviceGuard guard(device);
  auto* s = reinterpret_cast<cudaStream_t>(stream);
  auto* ws = static_cast<char*>(workspace);
  const int64_t nnz = read_nnz(csc, s);
  if (fits_32_bits(csc.n_rows, nnz)) {
    convert<int32_t>(s, csc, nnz, ws, workspace_size, out_indptr, out_indices, out_values, bad_position);
  } else {
    convert<int64_t>(s, csc, nnz, ws, workspace_size, out_indptr, out_indices, out_values, bad_position);
  }
}

}  // namespace annloader::cuda
