// annloader_gpu._core: the CPU module, built on every machine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings_common.h"
#include "cpu_gather.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace annloader;

PYBIND11_MODULE(_core, m) {
  m.doc() = "Multi-threaded CPU row gathers (annloader_gpu's always-built core).";

  m.def(
      "check_rows",
      [](uintptr_t rows, const std::string& rows_dtype, int64_t n_batch, int64_t n_rows) {
        py::gil_scoped_release release;
        cpu::check_rows(make_rows(rows, rows_dtype, n_batch), n_rows);
      },
      ANNLOADER_ROWS_ARGS, py::arg("n_rows"));

  m.def(
      "gather_csr_to_dense",
      [](uintptr_t indptr, const std::string& indptr_dtype, uintptr_t indices,
         const std::string& indices_dtype, uintptr_t values, const std::string& values_dtype,
         int64_t n_rows, int64_t n_cols, uintptr_t rows, const std::string& rows_dtype,
         int64_t n_batch, uintptr_t out, const std::string& out_dtype) {
        const auto matrix = make_csr(indptr, indptr_dtype, indices, indices_dtype, values,
                                     values_dtype, n_rows, n_cols);
        const auto batch = make_rows(rows, rows_dtype, n_batch);
        const DenseOutput output{as_ptr(out), parse_dtype(out_dtype)};
        py::gil_scoped_release release;
        cpu::gather_csr_to_dense(matrix, batch, output);
      },
      ANNLOADER_CSR_ARGS, ANNLOADER_ROWS_ARGS, py::arg("out"), py::arg("out_dtype"));

  m.def(
      "csr_batch_indptr",
      [](uintptr_t indptr, const std::string& indptr_dtype, int64_t n_rows, uintptr_t rows,
         const std::string& rows_dtype, int64_t n_batch, uintptr_t out_indptr,
         const std::string& out_indptr_dtype) {
        const CsrMatrix matrix{as_cptr(indptr), parse_dtype(indptr_dtype), nullptr,
                               DType::kInt32, nullptr, DType::kFloat32, n_rows, 0};
        const auto batch = make_rows(rows, rows_dtype, n_batch);
        const auto out_dtype = parse_dtype(out_indptr_dtype);
        py::gil_scoped_release release;
        return cpu::csr_batch_indptr(matrix, batch, as_ptr(out_indptr), out_dtype);
      },
      py::arg("indptr"), py::arg("indptr_dtype"), py::arg("n_rows"), ANNLOADER_ROWS_ARGS,
      py::arg("out_indptr"), py::arg("out_indptr_dtype"));

  m.def(
      "gather_csr_to_csr",
      [](uintptr_t indptr, const std::string& indptr_dtype, uintptr_t indices,
         const std::string& indices_dtype, uintptr_t values, const std::string& values_dtype,
         int64_t n_rows, int64_t n_cols, uintptr_t rows, const std::string& rows_dtype,
         int64_t n_batch, uintptr_t out_indptr, const std::string& out_indptr_dtype,
         uintptr_t out_indices, const std::string& out_indices_dtype, uintptr_t out_values,
         const std::string& out_values_dtype) {
        const auto matrix = make_csr(indptr, indptr_dtype, indices, indices_dtype, values,
                                     values_dtype, n_rows, n_cols);
        const auto batch = make_rows(rows, rows_dtype, n_batch);
        const CsrOutput output{as_ptr(out_indptr),  parse_dtype(out_indptr_dtype),
                               as_ptr(out_indices), parse_dtype(out_indices_dtype),
                               as_ptr(out_values),  parse_dtype(out_values_dtype)};
        py::gil_scoped_release release;
        cpu::gather_csr_to_csr(matrix, batch, output);
      },
      ANNLOADER_CSR_ARGS, ANNLOADER_ROWS_ARGS, py::arg("out_indptr"), py::arg("out_indptr_dtype"),
      py::arg("out_indices"), py::arg("out_indices_dtype"), py::arg("out_values"),
      py::arg("out_values_dtype"));

  m.def(
      "gather_dense",
      [](uintptr_t values, const std::string& values_dtype, int64_t n_rows, int64_t n_cols,
         int64_t row_stride, uintptr_t rows, const std::string& rows_dtype, int64_t n_batch,
         uintptr_t out, const std::string& out_dtype) {
        if (n_rows < 0 || n_cols < 0 || row_stride < 0) {
          throw std::invalid_argument("dense shape and row stride must be non-negative");
        }
        const DenseMatrix matrix{as_cptr(values), parse_dtype(values_dtype), n_rows, n_cols,
                                 row_stride};
        const auto batch = make_rows(rows, rows_dtype, n_batch);
        const DenseOutput output{as_ptr(out), parse_dtype(out_dtype)};
        py::gil_scoped_release release;
        cpu::gather_dense(matrix, batch, output);
      },
      py::arg("values"), py::arg("values_dtype"), py::arg("n_rows"), py::arg("n_cols"),
      py::arg("row_stride"), ANNLOADER_ROWS_ARGS, py::arg("out"), py::arg("out_dtype"));

  m.def(
      "csc_to_csr",
      [](uintptr_t indptr, const std::string& indptr_dtype, uintptr_t indices,
         const std::string& indices_dtype, uintptr_t values, const std::string& values_dtype,
         int64_t n_rows, int64_t n_cols, uintptr_t out_indptr, const std::string& out_indptr_dtype,
         uintptr_t out_indices, uintptr_t out_values) {
        const auto csc = make_csr(indptr, indptr_dtype, indices, indices_dtype, values,
                                  values_dtype, n_rows, n_cols);
        const auto out_dtype = parse_dtype(out_indptr_dtype);
        py::gil_scoped_release release;
        cpu::csc_to_csr(csc, as_ptr(out_indptr), out_dtype, as_ptr(out_indices),
                        as_ptr(out_values));
      },
      ANNLOADER_CSR_ARGS, py::arg("out_indptr"), py::arg("out_indptr_dtype"),
      py::arg("out_indices"), py::arg("out_values"));

  bind_gather_plan(m).def(
      "gather",
      [](const GatherPlan& plan, uintptr_t rows, const std::string& rows_dtype, int64_t n_batch,
         const std::vector<uintptr_t>& outputs) {
        const auto batch = make_rows(rows, rows_dtype, n_batch);
        py::gil_scoped_release release;
        cpu::gather_planned(plan, batch, outputs);
      },
      ANNLOADER_ROWS_ARGS, py::arg("outputs"),
      "Gathers every field for the rows (checked once) into outputs, one C-contiguous "
      "(n_batch, n_cols) array address per field in the order the fields were added.");

  m.def("get_num_threads", &get_num_threads, "Threads the CPU gathers use (caller included).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Sets the threads the CPU gathers use (caller included).");
  m.attr("compiler") = py::str(
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
  );
}
