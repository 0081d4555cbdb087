// Emulation stand-in for cub::DeviceRadixSort::SortPairs over DoubleBuffers (see README.md in
// this folder): a stable sort by the key bits [begin_bit, end_bit), left in the buffers an
// 8-bits-per-pass sort would leave it in (the alternate ones after an odd number of passes).
// Callers must therefore read Current() afterwards, which is the contract cub documents.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace cub {

template <typename T>
struct DoubleBuffer {
  T* d_buffers[2];
  int selector = 0;

  DoubleBuffer(T* current, T* alternate) : d_buffers{current, alternate} {}
  T* Current() const { return d_buffers[selector]; }
  T* Alternate() const { return d_buffers[selector ^ 1]; }
};

struct DeviceRadixSort {
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* temp_storage, size_t& temp_storage_bytes, DoubleBuffer<Key>& keys,
                               DoubleBuffer<Value>& values, NumItems num_items, int begin_bit = 0,
                               int end_bit = sizeof(Key) * 8, cudaStream_t = nullptr) {
    static_assert(std::is_integral_v<Key>, "the emulation sorts integer keys");
    if (temp_storage == nullptr) {
      temp_storage_bytes = 256;  // what a workspace query reports; nothing else happens
      return cudaSuccess;
    }
    if (begin_bit < 0 || end_bit > int(sizeof(Key) * 8) || begin_bit >= end_bit) return cudaErrorInvalidValue;
    using Bits = std::make_unsigned_t<Key>;
    const int width = end_bit - begin_bit;
    const Bits mask = width == int(sizeof(Key) * 8) ? Bits(~Bits{0}) : Bits((Bits{1} << width) - 1);
    const auto digit = [&](Key k) { return Bits(Bits(k) >> begin_bit) & mask; };
    const auto n = static_cast<size_t>(num_items);
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), size_t{0});
    const Key* in_keys = keys.Current();
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return digit(in_keys[a]) < digit(in_keys[b]); });
    for (size_t j = 0; j < n; ++j) {
      keys.Alternate()[j] = keys.Current()[order[j]];
      values.Alternate()[j] = values.Current()[order[j]];
    }
    // One pass per 8 key bits, each ping-ponging the buffers: where the result ends up depends
    // on the key width, so a caller that does not read Current() is wrong for some widths.
    const int passes = (width + 7) / 8;
    if (passes % 2 == 1) {
      keys.selector ^= 1;
      values.selector ^= 1;
    } else {
      std::copy(keys.Alternate(), keys.Alternate() + n, keys.Current());
      std::copy(values.Alternate(), values.Alternate() + n, values.Current());
    }
    return cudaSuccess;
  }
};

}  // namespace cub
