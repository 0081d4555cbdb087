// Plain descriptions of the buffers a gather reads and writes. Memory crosses from Python as
// raw addresses plus dtype names (no libtorch ABI); the Python layer owns every allocation.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace annloader {

struct CsrMatrix {
  const void* indptr;   // n_rows + 1 entries, int32 or int64
  DType indptr_dtype;
  const void* indices;  // column indices, int32 / int64 / uint16
  DType indices_dtype;
  const void* values;
  DType values_dtype;
  int64_t n_rows;
  int64_t n_cols;
};

struct DenseMatrix {
  const void* values;
  DType dtype;
  int64_t n_rows;
  int64_t n_cols;
  int64_t row_stride;  // in elements; columns are contiguous
};

struct RowIndices {
  const void* rows;  // int32 or int64
  DType dtype;
  int64_t count;
};

struct DenseOutput {
  void* values;  // count x n_cols, C-contiguous
  DType dtype;
};

struct CsrOutput {
  void* indptr;  // count + 1 entries, already filled by csr_batch_indptr
  DType indptr_dtype;
  void* indices;
  DType indices_dtype;
  void* values;
  DType values_dtype;
};

}  // namespace annloader
