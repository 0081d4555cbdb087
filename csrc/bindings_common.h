// Argument unpacking shared by the CPU and CUDA Python modules: both take the same flat
// (address, dtype-name, sizes) arguments so the Python layer has one calling convention.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "gather_args.h"
#include "gather_plan.h"

namespace annloader {

inline const void* as_cptr(uintptr_t address) { return reinterpret_cast<const void*>(address); }
inline void* as_ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

inline CsrMatrix make_csr(uintptr_t indptr, const std::string& indptr_dtype, uintptr_t indices,
                          const std::string& indices_dtype, uintptr_t values,
                          const std::string& values_dtype, int64_t n_rows, int64_t n_cols) {
  if (n_rows < 0 || n_cols < 0) {
    throw std::invalid_argument("matrix shape must be non-negative, got (" + std::to_string(n_rows) +
                                ", " + std::to_string(n_cols) + ")");
  }
  return CsrMatrix{as_cptr(indptr), parse_dtype(indptr_dtype), as_cptr(indices),
                   parse_dtype(indices_dtype), as_cptr(values), parse_dtype(values_dtype),
                   n_rows, n_cols};
}

inline RowIndices make_rows(uintptr_t rows, const std::string& rows_dtype, int64_t count) {
  if (count < 0) throw std::invalid_argument("row count must be non-negative");
  return RowIndices{as_cptr(rows), parse_dtype(rows_dtype), count};
}

// Keyword names, identical in both modules.
#define ANNLOADER_CSR_ARGS                                                                     \
  pybind11::arg("indptr"), pybind11::arg("indptr_dtype"), pybind11::arg("indices"),           \
      pybind11::arg("indices_dtype"), pybind11::arg("values"), pybind11::arg("values_dtype"), \
      pybind11::arg("n_rows"), pybind11::arg("n_cols")
#define ANNLOADER_ROWS_ARGS \
  pybind11::arg("rows"), pybind11::arg("rows_dtype"), pybind11::arg("n_batch")

// GatherPlan's builder methods, identical in both modules. Each module registers its own
// module-local GatherPlan type: a plan runs on the module (CPU or CUDA) that made it.
inline pybind11::class_<GatherPlan> bind_gather_plan(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<GatherPlan> cls(m, "GatherPlan", py::module_local(),
                             "Dense-output fields gathered together, one call per batch.");
  cls.def(py::init<>())
      .def(
          "add_csr",
          [](GatherPlan& plan, uintptr_t indptr, const std::string& indptr_dtype, uintptr_t indices,
             const std::string& indices_dtype, uintptr_t values, const std::string& values_dtype,
             int64_t n_rows, int64_t n_cols, const std::string& out_dtype) {
            plan.add_csr(make_csr(indptr, indptr_dtype, indices, indices_dtype, values, values_dtype,
                                  n_rows, n_cols),
                         parse_dtype(out_dtype));
          },
          ANNLOADER_CSR_ARGS, py::arg("out_dtype"))
      .def(
          "add_dense",
          [](GatherPlan& plan, uintptr_t values, const std::string& values_dtype, int64_t n_rows,
             int64_t n_cols, int64_t row_stride, const std::string& out_dtype) {
            plan.add_dense(DenseMatrix{as_cptr(values), parse_dtype(values_dtype), n_rows, n_cols,
                                       row_stride},
                           parse_dtype(out_dtype));
          },
          py::arg("values"), py::arg("values_dtype"), py::arg("n_rows"), py::arg("n_cols"),
          py::arg("row_stride"), py::arg("out_dtype"))
      .def("__len__", [](const GatherPlan& plan) { return plan.fields().size(); })
      .def_property_readonly("n_rows", &GatherPlan::n_rows);
  return cls;
}

}  // namespace annloader
