// Emulation stand-in for the CUDA runtime (see README.md in this folder): kernels become host
// functions run by emulation::run_grid, device memory is host memory, streams are ignored.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation/ is for host compilers only; nvcc must see the real CUDA headers"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>

#include "grid.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One variable per kernel instantiation, shared by the threads of the block being run; blocks
// run one after another, so that is exactly a block's shared memory. All of them live in one
// section, which run_block poisons before each block: on a GPU shared memory starts as garbage,
// so a kernel that reads it before writing it must fail here too.
#define __shared__ __attribute__((section("annloader_shared"))) static

#define CUDART_VERSION 13000

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorHostMemoryAlreadyRegistered = 712,
  cudaErrorHostMemoryNotRegistered = 713,
  cudaErrorNotSupported = 801,
};
using cudaError = cudaError_t;
using cudaStream_t = struct CUstream_emulated*;

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDriverEntryPointQueryResult : int {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
};
constexpr unsigned long long cudaEnableDefault = 0;

inline cudaError_t cudaGetLastError() { return annloader::emulation::take_last_error<cudaError_t>(); }

// Each error's name and text, in one table for both lookups.
struct EmulatedError {
  cudaError_t code;
  const char* name;
  const char* text;
};
inline constexpr EmulatedError kEmulatedErrors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration", "invalid configuration argument"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorHostMemoryAlreadyRegistered, "cudaErrorHostMemoryAlreadyRegistered",
     "part or all of the requested memory range is already mapped"},
    {cudaErrorHostMemoryNotRegistered, "cudaErrorHostMemoryNotRegistered",
     "pointer does not correspond to a registered memory region"},
    {cudaErrorNotSupported, "cudaErrorNotSupported", "operation not supported"},
};

inline const EmulatedError* find_emulated_error(cudaError_t e) {
  for (const EmulatedError& error : kEmulatedErrors) {
    if (error.code == e) return &error;
  }
  return nullptr;
}

inline const char* cudaGetErrorName(cudaError_t e) {
  const EmulatedError* error = find_emulated_error(e);
  return error != nullptr ? error->name : "cudaErrorUnknown";
}

inline const char* cudaGetErrorString(cudaError_t e) {
  const EmulatedError* error = find_emulated_error(e);
  return error != nullptr ? error->text : "unknown error";
}

// One emulated device, index 0.
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : annloader::emulation::set_last_error(cudaErrorInvalidDevice);
}

inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = 0;  // no driver
  return cudaSuccess;
}

inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = *total_bytes = size_t{1} << 30;
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  if (bytes != 0) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

enum cudaDeviceAttr : int { cudaDevAttrCanUseHostPointerForRegisteredMem = 91 };

// The emulated device reads host memory through host addresses, as an H100 on x86-64 does.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int device) {
  if (device != 0) return annloader::emulation::set_last_error(cudaErrorInvalidDevice);
  *value = 1;
  return cudaSuccess;
}

constexpr unsigned int cudaHostRegisterDefault = 0;
constexpr unsigned int cudaHostRegisterPortable = 1;
constexpr unsigned int cudaHostRegisterMapped = 2;

// Registration is bookkeeping only, with the runtime's two errors: a range that overlaps a
// registered one, and unregistering an address that does not start one.
inline std::map<uintptr_t, size_t>& registered_host_ranges() {
  static std::map<uintptr_t, size_t> ranges;
  return ranges;
}

inline std::mutex& registered_host_ranges_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline cudaError_t cudaHostRegister(void* ptr, size_t bytes, unsigned int) {
  const std::lock_guard<std::mutex> lock(registered_host_ranges_mutex());
  auto& ranges = registered_host_ranges();
  const auto start = reinterpret_cast<uintptr_t>(ptr);
  if (ptr == nullptr || bytes == 0) return annloader::emulation::set_last_error(cudaErrorInvalidValue);
  for (const auto& [begin, size] : ranges) {
    if (start < begin + size && begin < start + bytes) {
      return annloader::emulation::set_last_error(cudaErrorHostMemoryAlreadyRegistered);
    }
  }
  ranges[start] = bytes;
  return cudaSuccess;
}

inline cudaError_t cudaHostUnregister(void* ptr) {
  const std::lock_guard<std::mutex> lock(registered_host_ranges_mutex());
  if (registered_host_ranges().erase(reinterpret_cast<uintptr_t>(ptr)) == 0) {
    return annloader::emulation::set_last_error(cudaErrorHostMemoryNotRegistered);
  }
  return cudaSuccess;
}

// No driver to look entry points up in: DeviceGuard then only sets the device.
inline cudaError_t cudaGetDriverEntryPointByVersion(const char*, void** fn, unsigned int, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* found) {
  *fn = nullptr;
  *found = cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

template <typename T>
T atomicMin(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old &&
         !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// A macro, so that each barrier knows its call site: threads of a block must all reach the same one.
#define __syncthreads() ::annloader::emulation::sync_block(__FILE__, __LINE__)
