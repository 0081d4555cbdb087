#include "cpu_gather.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "row_gather.h"
#include "thread_pool.h"

namespace annloader::cpu {
namespace {

// Rows per chunk so that one chunk moves at least ~256 KiB: waking a worker costs tens of
// microseconds (far more on a busy machine), so smaller batches are gathered inline.
int64_t rows_per_chunk(int64_t bytes_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, bytes_per_row));
}

int64_t element_size(DType t) {
  switch (t) {
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kUInt16: return 2;
    case DType::kUInt8: return 1;
  }
  return 0;
}

// Outputs larger than this go through a cached scratch row and non-temporal stores: such a
// batch does not stay in cache anyway, and writing each output line once without reading it
// first (no read-for-ownership, no second pass over the row) halves the memory traffic. Smaller
// outputs stay in the last-level cache, where ordinary stores are faster (measured with a 32 MiB
// L3: 10 MB batches 0.45 vs 0.57 ms; 82 MB batches 6.6 vs 4.2 ms). A fixed 16 MiB, because what
// sysconf reports as L3 on virtual machines can be the whole socket's (256 MiB here).
constexpr int64_t kStreamingOutputBytes = int64_t{16} << 20;

void stream_copy(void* dst, const void* src, size_t n) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const size_t head = std::min(n, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  d += head, s += head, n -= head;
  for (; n >= 64; n -= 64, d += 64, s += 64) {
    auto* out = reinterpret_cast<__m128i*>(d);
    const auto* in = reinterpret_cast<const __m128i*>(s);
    _mm_stream_si128(out + 0, _mm_loadu_si128(in + 0));
    _mm_stream_si128(out + 1, _mm_loadu_si128(in + 1));
    _mm_stream_si128(out + 2, _mm_loadu_si128(in + 2));
    _mm_stream_si128(out + 3, _mm_loadu_si128(in + 3));
  }
  for (; n >= 16; n -= 16, d += 16, s += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, n);
#else
  std::memcpy(dst, src, n);
#endif
}

// Non-temporal stores are weakly ordered: fence before the data is handed to anyone else.
void finish_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace

void check_rows(const RowIndices& rows, int64_t n_rows) {
  const bool is64 = is_int64_index(rows.dtype, "row index");
  for (int64_t i = 0; i < rows.count; ++i) {
    const int64_t r = load_index(rows.rows, is64, i);
    if (r < 0 || r >= n_rows) {
      throw std::out_of_range("row index " + std::to_string(r) + " at position " + std::to_string(i) +
                              " is out of range for " + std::to_string(n_rows) +
                              " rows (expected 0 <= index < " + std::to_string(n_rows) + ")");
    }
  }
}

namespace {

#if defined(__GNUC__) || defined(__clang__)
inline void prefetch(const void* address) { __builtin_prefetch(address, 0, 3); }
#else
inline void prefetch(const void*) {}
#endif

// Shuffled rows are random reads: each row costs a cache miss on indptr, then on its indices
// and values (a dense source: on its row). Asking for the rows kPrefetchFar ahead (their indptr
// entries) and kPrefetchNear ahead (their first index and value lines, whose indptr has arrived
// by then) overlaps those misses instead of paying them one after another. Hardware
// prefetchers take over within a long row.
constexpr int64_t kPrefetchFar = 16;
constexpr int64_t kPrefetchNear = 4;

// The gathers proper; callers have checked the rows.
void csr_rows_to_dense(const CsrMatrix& m, const RowIndices& rows, const DenseOutput& out) {
  const bool indptr64 = is_int64_index(m.indptr_dtype, "indptr");
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  dispatch_column_index(m.indices_dtype, [&](auto idx_tag) {
    using Idx = typename decltype(idx_tag)::type;
    dispatch_value(m.values_dtype, [&](auto val_tag) {
      using Val = typename decltype(val_tag)::type;
      dispatch_output(out.dtype, [&](auto out_tag) {
        using Out = typename decltype(out_tag)::type;
        const auto* indices = static_cast<const Idx*>(m.indices);
        const auto* values = static_cast<const Val*>(m.values);
        auto* dense = static_cast<Out*>(out.values);
        const int64_t n_cols = m.n_cols;
        const int64_t row_bytes = n_cols * int64_t(sizeof(Out));
        const bool streaming = rows.count * row_bytes > kStreamingOutputBytes;
        parallel_for(rows.count, rows_per_chunk(row_bytes), [&](int64_t first, int64_t last) {
          std::vector<Out> scratch(streaming ? n_cols : 0);
          for (int64_t i = first; i < last; ++i) {
            if (i + kPrefetchFar < last) {
              const int64_t far = load_index(rows.rows, rows64, i + kPrefetchFar);
              prefetch(static_cast<const char*>(m.indptr) + far * (indptr64 ? 8 : 4));
            }
            if (i + kPrefetchNear < last) {
              const int64_t near = load_index(rows.rows, rows64, i + kPrefetchNear);
              const int64_t begin = load_index(m.indptr, indptr64, near);
              prefetch(indices + begin);
              prefetch(values + begin);
            }
            const int64_t r = load_index(rows.rows, rows64, i);
            Out* out_row = streaming ? scratch.data() : dense + i * n_cols;
            // All-zero bits are zero in every output dtype.
            std::memset(out_row, 0, row_bytes);
            scatter_csr_row(indices, values, load_index(m.indptr, indptr64, r),
                            load_index(m.indptr, indptr64, r + 1), n_cols, out_row, 0, 1);
            if (streaming) stream_copy(dense + i * n_cols, out_row, row_bytes);
          }
          if (streaming) finish_streaming();
        });
      });
    });
  });
}

void dense_rows(const DenseMatrix& m, const RowIndices& rows, const DenseOutput& out) {
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  dispatch_value(m.dtype, [&](auto val_tag) {
    using Val = typename decltype(val_tag)::type;
    dispatch_output(out.dtype, [&](auto out_tag) {
      using Out = typename decltype(out_tag)::type;
      const auto* src = static_cast<const Val*>(m.values);
      auto* dst = static_cast<Out*>(out.values);
      parallel_for(rows.count, rows_per_chunk(m.n_cols * int64_t(sizeof(Out))),
                   [&](int64_t first, int64_t last) {
                     for (int64_t i = first; i < last; ++i) {
                       if (i + kPrefetchFar < last) {
                         prefetch(src + load_index(rows.rows, rows64, i + kPrefetchFar) * m.row_stride);
                       }
                       const int64_t r = load_index(rows.rows, rows64, i);
                       cast_dense_row(src + r * m.row_stride, dst + i * m.n_cols, 0, m.n_cols, 0, 1);
                     }
                   });
    });
  });
}

}  // namespace

void gather_csr_to_dense(const CsrMatrix& m, const RowIndices& rows, const DenseOutput& out) {
  check_column_index_capacity(m.indices_dtype, m.n_cols);
  check_rows(rows, m.n_rows);
  csr_rows_to_dense(m, rows, out);
}

void gather_dense(const DenseMatrix& m, const RowIndices& rows, const DenseOutput& out) {
  check_rows(rows, m.n_rows);
  dense_rows(m, rows, out);
}

void gather_planned(const GatherPlan& plan, const RowIndices& rows,
                    const std::vector<uintptr_t>& outputs) {
  plan.require_outputs(outputs.size());
  if (plan.fields().empty()) return;
  check_rows(rows, plan.n_rows());
  for (size_t f = 0; f < outputs.size(); ++f) {
    const PlannedField& field = plan.fields()[f];
    const DenseOutput out{reinterpret_cast<void*>(outputs[f]), field.out_dtype};
    if (field.from_csr) {
      csr_rows_to_dense(field.csr, rows, out);
    } else {
      dense_rows(field.dense, rows, out);
    }
  }
}

int64_t csr_batch_indptr(const CsrMatrix& m, const RowIndices& rows, void* out_indptr,
                         DType out_indptr_dtype) {
  const bool indptr64 = is_int64_index(m.indptr_dtype, "indptr");
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const bool out64 = is_int64_index(out_indptr_dtype, "output indptr");
  check_rows(rows, m.n_rows);
  int64_t total = 0;
  for (int64_t i = 0; i <= rows.count; ++i) {
    if (i > 0) {
      const int64_t r = load_index(rows.rows, rows64, i - 1);
      total += load_index(m.indptr, indptr64, r + 1) - load_index(m.indptr, indptr64, r);
    }
    if (out64) {
      static_cast<int64_t*>(out_indptr)[i] = total;
    } else {
      if (total > std::numeric_limits<int32_t>::max()) {
        throw std::overflow_error("batch has " + std::to_string(total) +
                                  " non-zeros, more than an int32 indptr can hold; use int64");
      }
      static_cast<int32_t*>(out_indptr)[i] = static_cast<int32_t>(total);
    }
  }
  return total;
}

void gather_csr_to_csr(const CsrMatrix& m, const RowIndices& rows, const CsrOutput& out) {
  const bool indptr64 = is_int64_index(m.indptr_dtype, "indptr");
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const bool out_indptr64 = is_int64_index(out.indptr_dtype, "output indptr");
  check_rows(rows, m.n_rows);
  dispatch_column_index(m.indices_dtype, [&](auto idx_tag) {
    using Idx = typename decltype(idx_tag)::type;
    dispatch_index(out.indices_dtype, "output column index", [&](auto out_idx_tag) {
      using OutIdx = typename decltype(out_idx_tag)::type;
      dispatch_value(m.values_dtype, [&](auto val_tag) {
        using Val = typename decltype(val_tag)::type;
        dispatch_output(out.values_dtype, [&](auto out_tag) {
          using OutVal = typename decltype(out_tag)::type;
          const int64_t avg_row_bytes =
              rows.count == 0 ? 1 : 1 + load_index(out.indptr, out_indptr64, rows.count) *
                                            int64_t(sizeof(OutVal) + sizeof(OutIdx)) / rows.count;
          parallel_for(rows.count, rows_per_chunk(avg_row_bytes), [&](int64_t first, int64_t last) {
            for (int64_t i = first; i < last; ++i) {
              const int64_t r = load_index(rows.rows, rows64, i);
              copy_csr_row(static_cast<const Idx*>(m.indices), static_cast<const Val*>(m.values),
                           load_index(m.indptr, indptr64, r), load_index(m.indptr, indptr64, r + 1),
                           static_cast<OutIdx*>(out.indices), static_cast<OutVal*>(out.values),
                           load_index(out.indptr, out_indptr64, i), 0, 1);
            }
          });
        });
      });
    });
  });
}

namespace {

template <typename Idx, typename Elem>
void csc_to_csr_typed(const CsrMatrix& csc, void* out_indptr, bool out_indptr64, void* out_indices_v,
                      void* out_values_v) {
  const bool indptr64 = is_int64_index(csc.indptr_dtype, "indptr");
  const auto* row_of = static_cast<const Idx*>(csc.indices);
  const auto* values = static_cast<const Elem*>(csc.values);
  auto* out_indices = static_cast<Idx*>(out_indices_v);
  auto* out_values = static_cast<Elem*>(out_values_v);
  const int64_t n_rows = csc.n_rows;
  const int64_t n_cols = csc.n_cols;
  const int64_t nnz = load_index(csc.indptr, indptr64, n_cols);

  // Each part owns a contiguous range of columns and its own row counts, so scattering in
  // column order leaves every output row sorted by column without any sort.
  const int64_t n_parts = std::clamp<int64_t>(
      std::min<int64_t>(get_num_threads(), nnz / (int64_t{1} << 20)), 1, 8);
  std::vector<int64_t> col_start(n_parts + 1, n_cols);
  for (int64_t p = 0, c = 0; p < n_parts; ++p) {
    const int64_t target = nnz * p / n_parts;
    while (c < n_cols && load_index(csc.indptr, indptr64, c) < target) ++c;
    col_start[p] = c;
  }
  std::vector<std::vector<int64_t>> cursor(n_parts, std::vector<int64_t>(n_rows, 0));

  parallel_for(n_parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      auto& count = cursor[p];
      for (int64_t k = load_index(csc.indptr, indptr64, col_start[p]);
           k < load_index(csc.indptr, indptr64, col_start[p + 1]); ++k) {
        const int64_t r = static_cast<int64_t>(row_of[k]);
        if (r < 0 || r >= n_rows) {
          throw std::out_of_range("CSC row index " + std::to_string(r) + " at position " +
                                  std::to_string(k) + " is out of range for " +
                                  std::to_string(n_rows) + " rows");
        }
        ++count[r];
      }
    }
  });

  int64_t running = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (out_indptr64) {
      static_cast<int64_t*>(out_indptr)[r] = running;
    } else {
      static_cast<int32_t*>(out_indptr)[r] = static_cast<int32_t>(running);
    }
    for (int64_t p = 0; p < n_parts; ++p) {
      const int64_t c = cursor[p][r];
      cursor[p][r] = running;
      running += c;
    }
  }
  if (out_indptr64) {
    static_cast<int64_t*>(out_indptr)[n_rows] = running;
  } else {
    static_cast<int32_t*>(out_indptr)[n_rows] = static_cast<int32_t>(running);
  }

  parallel_for(n_parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      auto& next = cursor[p];
      for (int64_t c = col_start[p]; c < col_start[p + 1]; ++c) {
        for (int64_t k = load_index(csc.indptr, indptr64, c);
             k < load_index(csc.indptr, indptr64, c + 1); ++k) {
          const int64_t pos = next[static_cast<int64_t>(row_of[k])]++;
          out_indices[pos] = static_cast<Idx>(c);
          out_values[pos] = values[k];
        }
      }
    }
  });
}

struct Bytes1 { uint8_t b[1]; };
struct Bytes2 { uint8_t b[2]; };
struct Bytes4 { uint8_t b[4]; };
struct Bytes8 { uint8_t b[8]; };

}  // namespace

void csc_to_csr(const CsrMatrix& csc, void* out_indptr, DType out_indptr_dtype, void* out_indices,
                void* out_values) {
  const bool out64 = is_int64_index(out_indptr_dtype, "output indptr");
  const bool in64 = is_int64_index(csc.indptr_dtype, "indptr");
  check_column_index_capacity(csc.indices_dtype, csc.n_cols);
  if (!out64 && load_index(csc.indptr, in64, csc.n_cols) > std::numeric_limits<int32_t>::max()) {
    throw std::overflow_error("matrix has more non-zeros than an int32 indptr can hold; use int64");
  }
  // Values are moved, never converted: dispatch on their width only.
  dispatch_column_index(csc.indices_dtype, [&](auto idx_tag) {
    using Idx = typename decltype(idx_tag)::type;
    switch (element_size(csc.values_dtype)) {
      case 1: return csc_to_csr_typed<Idx, Bytes1>(csc, out_indptr, out64, out_indices, out_values);
      case 2: return csc_to_csr_typed<Idx, Bytes2>(csc, out_indptr, out64, out_indices, out_values);
      case 4: return csc_to_csr_typed<Idx, Bytes4>(csc, out_indptr, out64, out_indices, out_values);
      case 8: return csc_to_csr_typed<Idx, Bytes8>(csc, out_indptr, out64, out_indices, out_values);
    }
  });
}

}  // namespace annloader::cpu
