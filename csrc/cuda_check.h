// Error checks shared by the CUDA launchers: every failure names what was being done.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace annloader::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
  }
}

// Called right after every kernel launch, with the kernel's name.
inline void check_launch(const char* kernel_name) {
  check_cuda(cudaGetLastError(), (std::string("launch of ") + kernel_name).c_str());
}

}  // namespace annloader::cuda
