// annloader_gpu._cuda: launchers for the CUDA gathers, built when CMake finds a CUDA compiler.
//
// Every launcher sets the device, enqueues on the caller's stream (torch's current stream, passed
// as an address) and checks the launch with the kernel's name in the message. Nothing here
// synchronises: the caller decides when to read results or the bad-row slot.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <vector>
#include <stdexcept>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "cuda_check.h"
#include "cuda_launch.h"
#include "cuda_convert.h"
#include "dispatch.h"
#include "kernels_gather.cuh"

namespace py = pybind11;

namespace annloader::cuda {
namespace {

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

unsigned long long* as_slot(uintptr_t slot) { return reinterpret_cast<unsigned long long*>(slot); }

int64_t output_element_size(DType t) {
  int64_t size = 0;
  dispatch_output(t, [&](auto tag) { size = sizeof(typename decltype(tag)::type); });
  return size;
}

constexpr int kRowThreads = 256;

void launch_check_rows(uintptr_t stream, const RowIndices& rows, bool rows64, int64_t n_rows,
                       uintptr_t bad_position) {
  if (rows.count == 0 || bad_position == 0) return;
  launch("check_rows_kernel", check_rows_kernel, blocks_for(rows.count, kRowThreads), kRowThreads,
         as_stream(stream), rows.rows, rows64, rows.count, n_rows, as_slot(bad_position));
}

void gather_csr_to_dense(int device, uintptr_t stream, const CsrMatrix& m, const RowIndices& rows,
                         uintptr_t out, DType out_dtype, uintptr_t bad_position) {
  const bool indptr64 = is_int64_index(m.indptr_dtype, "indptr");
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  check_column_index_capacity(m.indices_dtype, m.n_cols);
  const DeviceGuard guard(device);
  const int64_t bytes = rows.count * m.n_cols * output_element_size(out_dtype);
  if (bytes == 0) {  // nothing to write, but bad rows are still reported, as on the CPU
    launch_check_rows(stream, rows, rows64, m.n_rows, bad_position);
    return;
  }
  dispatch_column_index(m.indices_dtype, [&](auto idx_tag) {
    using Idx = typename decltype(idx_tag)::type;
    dispatch_value(m.values_dtype, [&](auto val_tag) {
      using Val = typename decltype(val_tag)::type;
      dispatch_output(out_dtype, [&](auto out_tag) {
        using Out = typename decltype(out_tag)::type;
        launch("csr_rows_to_dense_kernel", csr_rows_to_dense_kernel<Idx, Val, Out>,
               blocks_for(rows.count), kRowThreads, as_stream(stream), m.indptr, indptr64,
               static_cast<const Idx*>(m.indices), static_cast<const Val*>(m.values), m.n_rows,
               m.n_cols, rows.rows, rows64, rows.count, static_cast<Out*>(as_ptr(out)),
               as_slot(bad_position));
      });
    });
  });
}

void csr_batch_indptr(int device, uintptr_t stream, const CsrMatrix& m, const RowIndices& rows,
                      uintptr_t out_indptr, uintptr_t bad_position) {
  const bool indptr64 = is_int64_index(m.indptr_dtype, "indptr");
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const DeviceGuard guard(device);
  auto* out = static_cast<int64_t*>(as_ptr(out_indptr));
  launch("batch_row_lengths_kernel", batch_row_lengths_kernel, blocks_for(rows.count, kRowThreads),
         kRowThreads, as_stream(stream), m.indptr, indptr64, m.n_rows, rows.rows, rows64,
         rows.count, out, as_slot(bad_position));
  launch("inclusive_scan_single_block_kernel", inclusive_scan_single_block_kernel, 1, kScanThreads,
         as_stream(stream), out + 1, rows.count);
}

void gather_csr_to_csr(int device, uintptr_t stream, const CsrMatrix& m, const RowIndices& rows,
                       uintptr_t out_indptr, uintptr_t out_indices, DType out_indices_dtype,
                       uintptr_t out_values, DType out_values_dtype, int64_t out_nnz) {
  if (out_nnz < 0) throw std::invalid_argument("out_nnz must be non-negative");
  const bool indptr64 = is_int64_index(m.indptr_dtype, "indptr");
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const DeviceGuard guard(device);
  if (rows.count == 0) return;
  const auto* batch_indptr = static_cast<const int64_t*>(as_cptr(out_indptr));
  dispatch_column_index(m.indices_dtype, [&](auto idx_tag) {
    using Idx = typename decltype(idx_tag)::type;
    dispatch_index(out_indices_dtype, "output column index", [&](auto out_idx_tag) {
      using OutIdx = typename decltype(out_idx_tag)::type;
      launch("copy_csr_indices_kernel", copy_csr_indices_kernel<Idx, OutIdx>,
             blocks_for(rows.count), kRowThreads, as_stream(stream), m.indptr, indptr64,
             static_cast<const Idx*>(m.indices), m.n_rows, rows.rows, rows64, rows.count,
             batch_indptr, static_cast<OutIdx*>(as_ptr(out_indices)), out_nnz);
    });
  });
  dispatch_value(m.values_dtype, [&](auto val_tag) {
    using Val = typename decltype(val_tag)::type;
    dispatch_output(out_values_dtype, [&](auto out_tag) {
      using OutVal = typename decltype(out_tag)::type;
      launch("copy_csr_values_kernel", copy_csr_values_kernel<Val, OutVal>, blocks_for(rows.count),
             kRowThreads, as_stream(stream), m.indptr, indptr64, static_cast<const Val*>(m.values),
             m.n_rows, rows.rows, rows64, rows.count, batch_indptr,
             static_cast<OutVal*>(as_ptr(out_values)), out_nnz);
    });
  });
}

void gather_dense(int device, uintptr_t stream, const DenseMatrix& m, const RowIndices& rows,
                  uintptr_t out, DType out_dtype, uintptr_t bad_position) {
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const DeviceGuard guard(device);
  if (rows.count == 0) return;
  if (m.n_cols == 0) {  // nothing to write, but bad rows are still reported, as on the CPU
    launch_check_rows(stream, rows, rows64, m.n_rows, bad_position);
    return;
  }
  // Narrow rows (obs columns) get a warp each instead of an idle 256-thread block.
  const int threads = static_cast<int>(std::min<int64_t>(kRowThreads, (m.n_cols + 31) / 32 * 32));
  const unsigned int col_chunks =
      static_cast<unsigned int>(std::clamp<int64_t>((m.n_cols + 4095) / 4096, 1, 65535));
  const dim3 grid(blocks_for(rows.count), col_chunks);
  dispatch_value(m.dtype, [&](auto val_tag) {
    using Val = typename decltype(val_tag)::type;
    dispatch_output(out_dtype, [&](auto out_tag) {
      using Out = typename decltype(out_tag)::type;
      launch("gather_dense_rows_kernel", gather_dense_rows_kernel<Val, Out>, grid, threads,
             as_stream(stream), static_cast<const Val*>(m.values), m.n_rows, m.n_cols,
             m.row_stride, rows.rows, rows64, rows.count, static_cast<Out*>(as_ptr(out)),
             as_slot(bad_position));
    });
  });
}

void check_rows(int device, uintptr_t stream, const RowIndices& rows, int64_t n_rows,
                uintptr_t bad_position) {
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const DeviceGuard guard(device);
  launch_check_rows(stream, rows, rows64, n_rows, bad_position);
}

// Every field of the plan for the same rows: one host call, one launch per field.
// Dense fields at most this wide go through the grouped narrow-field kernel; wider ones (a dense
// X) get a launch of their own with a block per row.
constexpr int64_t kNarrowFieldCols = 64;

bool is_narrow(const PlannedField& field) {
  return !field.from_csr && field.dense.n_cols > 0 && field.dense.n_cols <= kNarrowFieldCols;
}

// One launch for up to kMaxFieldsPerLaunch narrow fields sharing a (source, output) dtype pair.
void launch_narrow_fields(uintptr_t stream, const std::vector<const PlannedField*>& fields,
                          const std::vector<uintptr_t>& outs, const RowIndices& rows, bool rows64,
                          int64_t n_rows, uintptr_t bad_position) {
  NarrowFieldPack pack{};
  int64_t widest = 0;
  for (size_t k = 0; k < fields.size(); ++k) {
    const DenseMatrix& m = fields[k]->dense;
    pack.fields[k] = NarrowField{m.values, m.n_cols, m.row_stride, as_ptr(outs[k])};
    widest = std::max(widest, m.n_cols);
  }
  const dim3 grid(blocks_for(rows.count * widest, kRowThreads), static_cast<unsigned int>(fields.size()));
  dispatch_value(fields.front()->dense.dtype, [&](auto val_tag) {
    using Val = typename decltype(val_tag)::type;
    dispatch_output(fields.front()->out_dtype, [&](auto out_tag) {
      using Out = typename decltype(out_tag)::type;
      launch("gather_narrow_fields_kernel", gather_narrow_fields_kernel<Val, Out>, grid,
             kRowThreads, as_stream(stream), pack, n_rows, rows.rows, rows64, rows.count,
             as_slot(bad_position));
    });
  });
}

void gather_planned(int device, uintptr_t stream, const GatherPlan& plan, const RowIndices& rows,
                    const std::vector<uintptr_t>& outputs, uintptr_t bad_position) {
  plan.require_outputs(outputs.size());
  const bool rows64 = is_int64_index(rows.dtype, "row index");
  const DeviceGuard guard(device);
  const auto& fields = plan.fields();
  std::vector<bool> done(fields.size(), false);
  for (size_t f = 0; f < fields.size(); ++f) {
    if (done[f]) continue;
    const PlannedField& field = fields[f];
    if (is_narrow(field) && rows.count > 0) {
      // This field and the later narrow ones with the same dtype pair, in one launch.
      std::vector<const PlannedField*> group;
      std::vector<uintptr_t> outs;
      for (size_t g = f; g < fields.size() && group.size() < kMaxFieldsPerLaunch; ++g) {
        if (!done[g] && is_narrow(fields[g]) && fields[g].dense.dtype == field.dense.dtype &&
            fields[g].out_dtype == field.out_dtype) {
          group.push_back(&fields[g]);
          outs.push_back(outputs[g]);
          done[g] = true;
        }
      }
      launch_narrow_fields(stream, group, outs, rows, rows64, plan.n_rows(), bad_position);
      continue;
    }
    done[f] = true;
    if (field.from_csr) {
      gather_csr_to_dense(device, stream, field.csr, rows, outputs[f], field.out_dtype, bad_position);
    } else {
      gather_dense(device, stream, field.dense, rows, outputs[f], field.out_dtype, bad_position);
    }
  }
}

}  // namespace
}  // namespace annloader::cuda

using namespace annloader;

// ANNLOADER_CUDA_MODULE is _cuda, or _cuda_emulated for the CPU emulation (cuda_emulation/).
#ifndef ANNLOADER_CUDA_MODULE
#define ANNLOADER_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(ANNLOADER_CUDA_MODULE, m) {
  m.doc() = "CUDA row gathers (annloader_gpu's optional GPU module).";

  m.def("device_count", [] {
    int count = 0;
    // No driver or no device is an answer here, not an error.
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return count;
  });
  m.def("device_count_error", [] {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    cudaGetLastError();
    return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
  });
  m.def("runtime_version", [] {
    int version = 0;
    cuda::check_cuda(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
    return version;
  });
  m.def("driver_version", [] {
    int version = 0;
    if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
    return version;
  });
  m.def(
      "mem_get_info",
      [](int device) {
        const cuda::DeviceGuard guard(device);
        size_t free_bytes = 0, total_bytes = 0;
        cuda::check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
        return std::make_tuple(free_bytes, total_bytes);
      },
      py::arg("device"));
  m.attr("architectures") = py::str(ANNLOADER_CUDA_ARCHITECTURES);

  // Page-locks host memory that the caller owns, for kernels to read in place (pinned
  // residency); torch's pinned allocator would round each request up to a power of two.
  m.def(
      "host_register",
      [](int device, uintptr_t address, int64_t bytes) {
        if (address == 0 || bytes <= 0) {
          throw std::invalid_argument("host_register needs a non-null address and a positive size, got " +
                                      std::to_string(bytes) + " bytes");
        }
        const cuda::DeviceGuard guard(device);
        // The kernels read registered memory through its host address, which needs this.
        int host_pointer_ok = 0;
        cuda::check_cuda(cudaDeviceGetAttribute(&host_pointer_ok, cudaDevAttrCanUseHostPointerForRegisteredMem,
                                                device),
                         "cudaDeviceGetAttribute(CanUseHostPointerForRegisteredMem)");
        if (!host_pointer_ok) {
          throw std::runtime_error("cudaHostRegister: device " + std::to_string(device) +
                                   " cannot read registered host memory through its host address");
        }
        cuda::check_cuda(cudaHostRegister(as_ptr(address), static_cast<size_t>(bytes),
                                          cudaHostRegisterPortable | cudaHostRegisterMapped),
                         ("cudaHostRegister of " + std::to_string(bytes) + " bytes").c_str());
      },
      py::arg("device"), py::arg("address"), py::arg("bytes"));
  m.def(
      "host_unregister",
      [](int device, uintptr_t address) {
        const cuda::DeviceGuard guard(device);
        // Gathers from this memory may still be queued (the prefetch stream, or a loader dropped
        // mid-epoch); the memory is freed right after, so they must finish first. Only at teardown.
        cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before cudaHostUnregister");
        cuda::check_cuda(cudaHostUnregister(as_ptr(address)), "cudaHostUnregister");
      },
      py::arg("device"), py::arg("address"));

  m.def(
      "check_rows",
      [](int device, uintptr_t stream, uintptr_t rows, const std::string& rows_dtype,
         int64_t n_batch, int64_t n_rows, uintptr_t bad_position) {
        cuda::check_rows(device, stream, make_rows(rows, rows_dtype, n_batch), n_rows,
                         bad_position);
      },
      py::arg("device"), py::arg("stream"), ANNLOADER_ROWS_ARGS, py::arg("n_rows"),
      py::arg("bad_position"));

  m.def(
      "gather_csr_to_dense",
      [](int device, uintptr_t stream, uintptr_t indptr, const std::string& indptr_dtype,
         uintptr_t indices, const std::string& indices_dtype, uintptr_t values,
         const std::string& values_dtype, int64_t n_rows, int64_t n_cols, uintptr_t rows,
         const std::string& rows_dtype, int64_t n_batch, uintptr_t out,
         const std::string& out_dtype, uintptr_t bad_position) {
        cuda::gather_csr_to_dense(device, stream,
                                  make_csr(indptr, indptr_dtype, indices, indices_dtype, values,
                                           values_dtype, n_rows, n_cols),
                                  make_rows(rows, rows_dtype, n_batch), out,
                                  parse_dtype(out_dtype), bad_position);
      },
      py::arg("device"), py::arg("stream"), ANNLOADER_CSR_ARGS, ANNLOADER_ROWS_ARGS,
      py::arg("out"), py::arg("out_dtype"), py::arg("bad_position"));

  m.def(
      "csr_batch_indptr",
      [](int device, uintptr_t stream, uintptr_t indptr, const std::string& indptr_dtype,
         int64_t n_rows, uintptr_t rows, const std::string& rows_dtype, int64_t n_batch,
         uintptr_t out_indptr, uintptr_t bad_position) {
        const CsrMatrix matrix{as_cptr(indptr), parse_dtype(indptr_dtype), nullptr,
                               DType::kInt32, nullptr, DType::kFloat32, n_rows, 0};
        cuda::csr_batch_indptr(device, stream, matrix, make_rows(rows, rows_dtype, n_batch),
                               out_indptr, bad_position);
      },
      py::arg("device"), py::arg("stream"), py::arg("indptr"), py::arg("indptr_dtype"),
      py::arg("n_rows"), ANNLOADER_ROWS_ARGS, py::arg("out_indptr"), py::arg("bad_position"),
      "Fills an int64 out_indptr (n_batch + 1 entries) on the device; no synchronisation.");

  m.def(
      "gather_csr_to_csr",
      [](int device, uintptr_t stream, uintptr_t indptr, const std::string& indptr_dtype,
         uintptr_t indices, const std::string& indices_dtype, uintptr_t values,
         const std::string& values_dtype, int64_t n_rows, int64_t n_cols, uintptr_t rows,
         const std::string& rows_dtype, int64_t n_batch, uintptr_t out_indptr,
         uintptr_t out_indices, const std::string& out_indices_dtype, uintptr_t out_values,
         const std::string& out_values_dtype, int64_t out_nnz) {
        cuda::gather_csr_to_csr(device, stream,
                                make_csr(indptr, indptr_dtype, indices, indices_dtype, values,
                                         values_dtype, n_rows, n_cols),
                                make_rows(rows, rows_dtype, n_batch), out_indptr, out_indices,
                                parse_dtype(out_indices_dtype), out_values,
                                parse_dtype(out_values_dtype), out_nnz);
      },
      py::arg("device"), py::arg("stream"), ANNLOADER_CSR_ARGS, ANNLOADER_ROWS_ARGS,
      py::arg("out_indptr"), py::arg("out_indices"), py::arg("out_indices_dtype"),
      py::arg("out_values"), py::arg("out_values_dtype"), py::arg("out_nnz"),
      "out_indptr is the int64 batch indptr that csr_batch_indptr filled; out_nnz is the length "
      "of out_indices and out_values (writes never go past it).");

  m.def("csc_to_csr_workspace_bytes", &cuda::csc_to_csr_workspace_bytes, py::arg("device"), py::arg("n_rows"),
        py::arg("nnz"));
  m.def(
      "csc_to_csr",
      [](int device, uintptr_t stream, uintptr_t indptr, const std::string& indptr_dtype, uintptr_t indices,
         const std::string& indices_dtype, uintptr_t values, const std::string& values_dtype, int64_t n_rows,
         int64_t n_cols, uintptr_t workspace, int64_t workspace_bytes, uintptr_t out_indptr,
         uintptr_t out_indices, uintptr_t out_values, uintptr_t bad_position) {
        cuda::csc_to_csr(device, stream,
                         make_csr(indptr, indptr_dtype, indices, indices_dtype, values, values_dtype, n_rows,
                                  n_cols),
                         as_ptr(workspace), workspace_bytes, static_cast<int64_t*>(as_ptr(out_indptr)),
                         as_ptr(out_indices), as_ptr(out_values),
                         reinterpret_cast<unsigned long long*>(bad_position));
      },
      py::arg("device"), py::arg("stream"), ANNLOADER_CSR_ARGS, py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("out_indptr"), py::arg("out_indices"), py::arg("out_values"),
      py::arg("bad_position"),
      "CSC -> CSR on the device (stable radix sort by row; rows come out sorted by column). "
      "Synchronises once to read the nnz.");

  bind_gather_plan(m).def(
      "gather",
      [](const GatherPlan& plan, int device, uintptr_t stream, uintptr_t rows,
         const std::string& rows_dtype, int64_t n_batch, const std::vector<uintptr_t>& outputs,
         uintptr_t bad_position) {
        cuda::gather_planned(device, stream, plan, make_rows(rows, rows_dtype, n_batch), outputs,
                             bad_position);
      },
      py::arg("device"), py::arg("stream"), ANNLOADER_ROWS_ARGS, py::arg("outputs"),
      py::arg("bad_position"),
      "Launches every field's gather for the rows on the stream (no synchronisation); one "
      "C-contiguous (n_batch, n_cols) device address per field, in the order they were added.");

  m.def(
      "gather_dense",
      [](int device, uintptr_t stream, uintptr_t values, const std::string& values_dtype,
         int64_t n_rows, int64_t n_cols, int64_t row_stride, uintptr_t rows,
         const std::string& rows_dtype, int64_t n_batch, uintptr_t out,
         const std::string& out_dtype, uintptr_t bad_position) {
        if (n_rows < 0 || n_cols < 0 || row_stride < 0) {
          throw std::invalid_argument("dense shape and row stride must be non-negative");
        }
        cuda::gather_dense(device, stream,
                           DenseMatrix{as_cptr(values), parse_dtype(values_dtype), n_rows, n_cols,
                                       row_stride},
                           make_rows(rows, rows_dtype, n_batch), out, parse_dtype(out_dtype),
                           bad_position);
      },
      py::arg("device"), py::arg("stream"), py::arg("values"), py::arg("values_dtype"),
      py::arg("n_rows"), py::arg("n_cols"), py::arg("row_stride"), ANNLOADER_ROWS_ARGS,
      py::arg("out"), py::arg("out_dtype"), py::arg("bad_position"));
}
