// The one way every kernel is launched: enqueued on the caller's stream, then checked with the
// kernel's name in the message. Written as a function rather than a bare <<<...>>> so that the
// same launchers also compile as host C++ against cuda_emulation/ (the CPU emulation of the
// kernels that runs in CI, where there is no GPU).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "cuda_check.h"

// Grid-stride kernels cap their grid: 2^20 blocks is far past what any GPU runs at once. The
// CPU emulation builds with a tiny cap, so that the tests run every kernel's grid-stride loop
// (on a GPU it runs only past 2^20 blocks, e.g. converting a CSC with 300 M non-zeros).
#ifndef ANNLOADER_MAX_GRID_BLOCKS
#define ANNLOADER_MAX_GRID_BLOCKS (int64_t{1} << 20)
#endif

namespace annloader::cuda {

// Blocks for `items` items, `per_block` each, within the cap.
inline unsigned int blocks_for(int64_t items, int64_t per_block = 1) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, ANNLOADER_MAX_GRID_BLOCKS));
}

template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), dim3 grid, dim3 block,
            cudaStream_t stream, Args&&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#else
  emulation::run_grid(grid, block, [&] { kernel(args...); });
#endif
  check_launch(kernel_name);
}

}  // namespace annloader::cuda
