// Multi-threaded CPU gathers. Every function validates its row indices before touching memory
// and throws std::out_of_range (IndexError in Python) naming the first bad one.
#pragma once

#include <cstdint>

#include "gather_args.h"
#include "gather_plan.h"

namespace annloader::cpu {

void check_rows(const RowIndices& rows, int64_t n_rows);

void gather_csr_to_dense(const CsrMatrix& m, const RowIndices& rows, const DenseOutput& out);

// Fills out_indptr (rows.count + 1 entries) with the batch's row offsets; returns its nnz.
int64_t csr_batch_indptr(const CsrMatrix& m, const RowIndices& rows, void* out_indptr,
                         DType out_indptr_dtype);

// Copies the rows into a batch CSR whose indptr csr_batch_indptr filled.
void gather_csr_to_csr(const CsrMatrix& m, const RowIndices& rows, const CsrOutput& out);

void gather_dense(const DenseMatrix& m, const RowIndices& rows, const DenseOutput& out);

// Every field of the plan for the same rows (checked once), into outputs[f] (one per field).
void gather_planned(const GatherPlan& plan, const RowIndices& rows,
                    const std::vector<uintptr_t>& outputs);

// CSC -> CSR with column indices sorted within rows. `csc` holds the CSC arrays in the CsrMatrix
// fields (indptr over the n_cols columns, indices are row numbers) with the matrix's own shape.
// out_indices and out_values have the CSC's dtypes; out_indptr has out_indptr_dtype.
void csc_to_csr(const CsrMatrix& csc, void* out_indptr, DType out_indptr_dtype, void* out_indices,
                void* out_values);

}  // namespace annloader::cpu
