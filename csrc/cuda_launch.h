// The one way every kernel is launched: enqueued on the caller's stream, then checked with the
// kernel's name in the message. Written as a function rather than a bare <<<...>>> so that the
// same launchers also compile as host C++ against cuda_emulation/ (the CPU emulation of the
// kernels that runs in CI, where there is no GPU).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda_check.h"

namespace annloader::cuda {

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
