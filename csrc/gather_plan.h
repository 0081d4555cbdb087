// A loader's dense-output fields, described once and gathered together: one call per batch
// instead of one per field, so the per-batch host cost is one Python-to-C++ crossing however
// many fields (X, batch, labels, covariates, ...) a model asks for.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "gather_args.h"

namespace annloader {

struct PlannedField {
  bool from_csr = false;  // CSR rows scattered into dense rows; else dense rows copied
  CsrMatrix csr{};
  DenseMatrix dense{};
  DType out_dtype = DType::kFloat32;

  int64_t n_rows() const { return from_csr ? csr.n_rows : dense.n_rows; }
};

class GatherPlan {
 public:
  // Checks everything that can be checked once, so a batch only checks its rows.
  void add_csr(const CsrMatrix& m, DType out_dtype) {
    is_int64_index(m.indptr_dtype, "indptr");
    dispatch_column_index(m.indices_dtype, [](auto) {});
    dispatch_value(m.values_dtype, [](auto) {});
    check_column_index_capacity(m.indices_dtype, m.n_cols);
    dispatch_output(out_dtype, [](auto) {});
    require_rows(m.n_rows);
    PlannedField field;
    field.from_csr = true;
    field.csr = m;
    field.out_dtype = out_dtype;
    fields_.push_back(field);
  }

  void add_dense(const DenseMatrix& m, DType out_dtype) {
    if (m.n_rows < 0 || m.n_cols < 0 || m.row_stride < 0) {
      throw std::invalid_argument("dense shape and row stride must be non-negative");
    }
    dispatch_value(m.dtype, [](auto) {});
    dispatch_output(out_dtype, [](auto) {});
    require_rows(m.n_rows);
    PlannedField field;
    field.dense = m;
    field.out_dtype = out_dtype;
    fields_.push_back(field);
  }

  const std::vector<PlannedField>& fields() const { return fields_; }
  int64_t n_rows() const { return fields_.empty() ? 0 : fields_.front().n_rows(); }

  // One output address per field, in the order the fields were added.
  void require_outputs(size_t n_outputs) const {
    if (n_outputs != fields_.size()) {
      throw std::invalid_argument("the plan has " + std::to_string(fields_.size()) +
                                  " fields but " + std::to_string(n_outputs) +
                                  " outputs were given");
    }
  }

 private:
  // Every field of a loader has one row per observation.
  void require_rows(int64_t n_rows) const {
    if (n_rows < 0) throw std::invalid_argument("row count must be non-negative");
    if (!fields_.empty() && n_rows != n_rows_of_first()) {
      throw std::invalid_argument("all fields of a plan must have the same number of rows (" +
                                  std::to_string(n_rows_of_first()) + "), got " +
                                  std::to_string(n_rows));
    }
  }
  int64_t n_rows_of_first() const { return fields_.front().n_rows(); }

  std::vector<PlannedField> fields_;
};

}  // namespace annloader
