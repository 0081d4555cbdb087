// Run-time dtype -> compile-time type dispatch, shared by the CPU and CUDA launchers so both
// accept exactly the same combinations and reject the rest with the same message.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtypes.h"

namespace annloader {

template <typename T>
struct Tag {
  using type = T;
};

[[noreturn]] inline void unsupported(const char* role, DType t, const char* allowed) {
  throw std::invalid_argument(std::string("unsupported ") + role + " dtype " + dtype_name(t) +
                              " (expected one of " + allowed + ")");
}

// Stored values: what registration may keep resident (compact integer counts included).
template <typename F>
void dispatch_value(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<half_bits>{});
    case DType::kInt64: return f(Tag<int64_t>{});
    case DType::kInt32: return f(Tag<int32_t>{});
    case DType::kUInt16: return f(Tag<uint16_t>{});
    case DType::kUInt8: return f(Tag<uint8_t>{});
    default: unsupported("value", t, "float32, float64, float16, int64, int32, uint16, uint8");
  }
}

// Outputs: what a training step consumes.
template <typename F>
void dispatch_output(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<half_bits>{});
    case DType::kBFloat16: return f(Tag<bfloat16_bits>{});
    case DType::kInt64: return f(Tag<int64_t>{});
    case DType::kInt32: return f(Tag<int32_t>{});
    default: unsupported("output", t, "float32, float64, float16, bfloat16, int64, int32");
  }
}

// Column indices of a sparse matrix; uint16 is the compact form for n_cols <= 65536.
template <typename F>
void dispatch_column_index(DType t, F&& f) {
  switch (t) {
    case DType::kInt32: return f(Tag<int32_t>{});
    case DType::kInt64: return f(Tag<int64_t>{});
    case DType::kUInt16: return f(Tag<uint16_t>{});
    default: unsupported("column index", t, "int32, int64, uint16");
  }
}

// Output sparse indices (what torch's sparse CSR accepts): int32 or int64.
template <typename F>
void dispatch_index(DType t, const char* role, F&& f) {
  switch (t) {
    case DType::kInt32: return f(Tag<int32_t>{});
    case DType::kInt64: return f(Tag<int64_t>{});
    default: unsupported(role, t, "int32, int64");
  }
}

// indptr and row indices: int32 or int64 only, read through load_index.
inline bool is_int64_index(DType t, const char* role) {
  if (t == DType::kInt64) return true;
  if (t == DType::kInt32) return false;
  unsupported(role, t, "int32, int64");
}

// Column-index dtypes must be able to name every column; uint16 tops out at 65536 columns.
inline void check_column_index_capacity(DType t, int64_t n_cols) {
  const int64_t limit = t == DType::kUInt16 ? (int64_t{1} << 16)
                        : t == DType::kInt32 ? (int64_t{1} << 31)
                                             : INT64_MAX;
  if (n_cols > limit) {
    throw std::invalid_argument(std::string(dtype_name(t)) + " column indices cannot address " +
                                std::to_string(n_cols) + " columns (at most " +
                                std::to_string(limit) + "); use a wider index dtype");
  }
}

}  // namespace annloader
