// Element types that cross the Python boundary, and the conversions between them.
//
// One definition serves the CPU loops and the CUDA kernels (HOST_DEVICE), so a value decodes and
// casts bit-identically on both paths. float16/bfloat16 are carried as raw 16-bit patterns with
// portable bit-level conversions: no dependency on cuda_fp16.h on the host side, and the same
// rounding (round-to-nearest-even) everywhere.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace annloader {

// The order is part of nothing persistent; names are what Python passes.
enum class DType : int {
  kFloat32,
  kFloat64,
  kFloat16,
  kBFloat16,
  kInt64,
  kInt32,
  kUInt16,
  kUInt8,
};

inline DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "int64") return DType::kInt64;
  if (name == "int32") return DType::kInt32;
  if (name == "uint16") return DType::kUInt16;
  if (name == "uint8") return DType::kUInt8;
  throw std::invalid_argument("unknown dtype '" + name +
                              "' (expected one of float32, float64, float16, bfloat16, int64, "
                              "int32, uint16, uint8)");
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt64: return "int64";
    case DType::kInt32: return "int32";
    case DType::kUInt16: return "uint16";
    case DType::kUInt8: return "uint8";
  }
  return "?";
}

struct half_bits {
  uint16_t bits;
};
struct bfloat16_bits {
  uint16_t bits;
};

HOST_DEVICE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

HOST_DEVICE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal half: normalise into a float exponent.
    exp = 127 - 15 + 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3ffu;
    return bits_to_float(sign | (exp << 23) | (mant << 13));
  }
  return bits_to_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

HOST_DEVICE uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan (keep nan quiet)
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): shift the full mantissa and round to nearest even.
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24
    uint32_t result = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  uint32_t result = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (result & 1u))) ++result;
  return static_cast<uint16_t>(sign | result);
}

HOST_DEVICE float bfloat16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

HOST_DEVICE uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // nan
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// Widening load of one stored element; double keeps int64 and float64 exact enough for casts.
template <typename T>
struct Load {
  HOST_DEVICE static double as_double(T v) { return static_cast<double>(v); }
  HOST_DEVICE static float as_float(T v) { return static_cast<float>(v); }
};
template <>
struct Load<half_bits> {
  HOST_DEVICE static double as_double(half_bits v) { return half_to_float(v.bits); }
  HOST_DEVICE static float as_float(half_bits v) { return half_to_float(v.bits); }
};
template <>
struct Load<bfloat16_bits> {
  HOST_DEVICE static double as_double(bfloat16_bits v) { return bfloat16_to_float(v.bits); }
  HOST_DEVICE static float as_float(bfloat16_bits v) { return bfloat16_to_float(v.bits); }
};

// cast<Out>(in): the single conversion rule used by every kernel. Integer outputs truncate
// toward zero as torch's .to(int64) does; 16-bit float outputs round to nearest even.
template <typename Out, typename In>
struct Cast {
  HOST_DEVICE static Out apply(In v) { return static_cast<Out>(v); }
};
template <typename In>
struct Cast<float, In> {
  HOST_DEVICE static float apply(In v) { return Load<In>::as_float(v); }
};
template <typename In>
struct Cast<double, In> {
  HOST_DEVICE static double apply(In v) { return Load<In>::as_double(v); }
};
template <typename In>
struct Cast<int64_t, In> {
  HOST_DEVICE static int64_t apply(In v) { return static_cast<int64_t>(Load<In>::as_double(v)); }
};
template <>
struct Cast<int64_t, int64_t> {
  HOST_DEVICE static int64_t apply(int64_t v) { return v; }
};
template <typename In>
struct Cast<int32_t, In> {
  HOST_DEVICE static int32_t apply(In v) { return static_cast<int32_t>(Load<In>::as_double(v)); }
};
template <>
struct Cast<int32_t, int64_t> {
  // Integer narrowing wraps modulo 2^32 as torch's .to(int32) does; going through double would
  // be undefined (and saturate on the GPU) for values outside the int32 range.
  HOST_DEVICE static int32_t apply(int64_t v) { return static_cast<int32_t>(v); }
};
template <typename In>
struct Cast<half_bits, In> {
  HOST_DEVICE static half_bits apply(In v) { return half_bits{float_to_half(Load<In>::as_float(v))}; }
};
template <>
struct Cast<half_bits, double> {
  // Rounds through float32, exactly as torch's double -> half conversion does (c10::Half is
  // constructed from float), so outputs match torch bit for bit.
  HOST_DEVICE static half_bits apply(double v) { return half_bits{float_to_half(static_cast<float>(v))}; }
};
template <>
struct Cast<half_bits, half_bits> {
  HOST_DEVICE static half_bits apply(half_bits v) { return v; }
};
template <typename In>
struct Cast<bfloat16_bits, In> {
  HOST_DEVICE static bfloat16_bits apply(In v) {
    return bfloat16_bits{float_to_bfloat16(Load<In>::as_float(v))};
  }
};
template <>
struct Cast<bfloat16_bits, bfloat16_bits> {
  HOST_DEVICE static bfloat16_bits apply(bfloat16_bits v) { return v; }
};

template <typename Out, typename In>
HOST_DEVICE Out cast(In v) {
  return Cast<Out, In>::apply(v);
}

}  // namespace annloader
