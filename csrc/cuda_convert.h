// The one-time CSC -> CSR conversion on the GPU (launchers in cuda_convert.cu).
#pragma once

#include <cstdint>

#include "gather_args.h"

namespace annloader::cuda {

// Bytes of device workspace csc_to_csr needs for a matrix with this many rows and non-zeros.
int64_t csc_to_csr_workspace_bytes(int device, int64_t n_rows, int64_t nnz);

// `csc` as in cpu::csc_to_csr. out_indptr is int64 (n_rows + 1); out_indices and out_values have
// the CSC's dtypes. A row index out of range is recorded in bad_position (the output is then
// unusable). Enqueued on stream; nothing synchronises.
void csc_to_csr(int device, uintptr_t stream, const CsrMatrix& csc, void* workspace,
                int64_t workspace_bytes, int64_t* out_indptr, void* out_indices, void* out_values,
                unsigned long long* bad_position);

}  // namespace annloader::cuda
