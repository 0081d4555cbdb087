// Error checks shared by the CUDA launchers: every failure names what was being done.
#pragma once

#include <cuda.h>  // driver API types only: the entry points are looked up at run time
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace annloader::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    // The runtime also keeps a failed call's error as its "last error"; left there, the next
    // launch check would blame an innocent kernel for it (a failed cudaSetDevice did).
    cudaGetLastError();
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
  }
}

// Called right after every kernel launch, with the kernel's name.
inline void check_launch(const char* kernel_name) {
  check_cuda(cudaGetLastError(), (std::string("launch of ") + kernel_name).c_str());
}

// Makes `device` current for a launcher's scope and then restores the caller's context exactly
// (including "no context"). torch reads its current device from the current context, so a
// launcher that left cuda:1 current would send the caller's next torch.empty("cuda") there;
// and restoring with cudaSetDevice(previous) could create a context (hundreds of MB) on a GPU
// the process never used, which is what a torchrun rank that names cuda:N without set_device
// would pay. The driver's cuCtxGetCurrent/cuCtxSetCurrent are looked up through the runtime, so
// nothing links against libcuda.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : fns_(entry_points()) {
    if (fns_.get != nullptr && fns_.get(&previous_) != CUDA_SUCCESS) fns_ = {};
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (fns_.set != nullptr) fns_.set(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  struct Fns {
    CUresult (*get)(CUcontext*) = nullptr;
    CUresult (*set)(CUcontext) = nullptr;
  };

  static void* entry_point(const char* name) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t status = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky; clear it so a later launch check does not report it
      return nullptr;
    }
    return fn;
  }

  static Fns entry_points() {
    static const Fns fns = [] {
      Fns f;
      f.get = reinterpret_cast<CUresult (*)(CUcontext*)>(entry_point("cuCtxGetCurrent"));
      f.set = reinterpret_cast<CUresult (*)(CUcontext)>(entry_point("cuCtxSetCurrent"));
      if (f.get == nullptr || f.set == nullptr) f = {};
      return f;
    }();
    return fns;
  }

  Fns fns_;
  CUcontext previous_ = nullptr;
};

}  // namespace annloader::cuda
