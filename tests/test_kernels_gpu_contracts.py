"""GPU-only contracts of the CUDA launchers that CPU tests cannot reach.

The caller's current device survives a launch on another GPU; outputs must live on the device
(CUDA writes them asynchronously); a CSR -> CSR copy never writes past its outputs; bad rows are
reported for zero-column outputs and left zero in dense ones; a record left by an unchecked call
is not reported by the next checked one; sizes past one scan tile / one column chunk.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import GPU_MARKS

from annloader_gpu import kernels

CUDA = [pytest.param(None, marks=GPU_MARKS, id="cuda")]


def _matrix(n_rows=300, n_cols=500, density=0.05, seed=0) -> sp.csr_matrix:
    m = sp.random(n_rows, n_cols, density=density, format="csr", random_state=seed, dtype=np.float32)
    m.data = np.random.default_rng(seed).integers(1, 50, m.nnz).astype(np.float32)
    return m


def _on_cuda(m: sp.csr_matrix):
    return [torch.from_numpy(a).cuda() for a in (m.indptr, m.indices, m.data)]


@pytest.mark.parametrize("_", CUDA)
def test_launch_on_another_gpu_keeps_the_callers_device(_):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    m = _matrix()
    torch.cuda.set_device(0)
    arrays = [a.to("cuda:1") for a in _on_cuda(m)]
    rows = torch.arange(10, device="cuda:1")
    out = torch.empty(10, 500, device="cuda:1")
    kernels.gather_csr_to_dense(*arrays, 500, rows, out)
    assert torch.cuda.current_device() == 0
    assert torch.empty(1, device="cuda").device == torch.device("cuda:0")
    assert torch.equal(out.cpu(), torch.from_numpy(m[:10].toarray()))


@pytest.mark.parametrize("_", CUDA)
def test_launch_keeps_the_callers_device_on_one_gpu(_):
    m = _matrix()
    arrays = _on_cuda(m)
    before = torch.cuda.current_device()
    kernels.gather_csr_to_dense(*arrays, 500, torch.arange(5, device="cuda"), torch.empty(5, 500, device="cuda"))
    assert torch.cuda.current_device() == before


@pytest.mark.parametrize("_", CUDA)
def test_pinned_outputs_are_refused(_):
    m = _matrix()
    arrays = _on_cuda(m)
    rows = torch.arange(4, device="cuda")
    with pytest.raises(ValueError, match="out must be on cuda"):
        kernels.gather_csr_to_dense(*arrays, 500, rows, torch.empty(4, 500).pin_memory())
    with pytest.raises(ValueError, match="out must be on cuda"):
        kernels.gather_dense(torch.ones(9, 3, device="cuda"), rows, torch.empty(4, 3).pin_memory())
    bound = kernels.BoundCsr(*arrays, 500)
    with pytest.raises(ValueError, match="out must be on cuda"):
        bound.to_dense(rows, torch.empty(4, 500).pin_memory())


@pytest.mark.parametrize("_", CUDA)
def test_csr_to_csr_never_writes_past_its_outputs(_):
    m = _matrix()
    arrays = _on_cuda(m)
    rows = torch.arange(20, device="cuda")
    indptr = torch.empty(21, dtype=torch.int64, device="cuda")
    kernels.csr_batch_indptr(arrays[0], rows, indptr)
    nnz = int(indptr[-1])
    # Outputs one entry short, inside a guarded buffer: the guard must stay untouched.
    guard = torch.full((nnz + 64,), -5, dtype=torch.int32, device="cuda")
    values_guard = torch.full((nnz + 64,), -5.0, device="cuda")
    short = nnz - 1
    with pytest.raises(ValueError, match="out_indptr ends at"):  # the checked call refuses it
        kernels.gather_csr_to_csr(*arrays, 500, rows, indptr, guard[:short], values_guard[:short])
    kernels.gather_csr_to_csr(*arrays, 500, rows, indptr, guard[:short], values_guard[:short], validate=False)
    torch.cuda.synchronize()
    assert bool((guard[short:] == -5).all()) and bool((values_guard[short:] == -5).all())
    expected = m[:20]
    np.testing.assert_array_equal(guard[:short].cpu().numpy(), expected.indices[:short])


@pytest.mark.parametrize("_", CUDA)
def test_bad_rows_with_zero_columns_are_reported(_):
    rows = torch.tensor([0, 7], device="cuda")
    with pytest.raises(IndexError, match="row index 7 at position 1"):
        kernels.gather_dense(torch.ones(3, 0, device="cuda"), rows, torch.empty(2, 0, device="cuda"))
    empty = sp.csr_matrix((3, 0), dtype=np.float32)
    with pytest.raises(IndexError, match="row index 7 at position 1"):
        kernels.gather_csr_to_dense(*_on_cuda(empty), 0, rows, torch.empty(2, 0, device="cuda"))


@pytest.mark.parametrize("_", CUDA)
def test_bad_dense_rows_are_left_zero(_):
    src = torch.arange(12, dtype=torch.float32, device="cuda").reshape(4, 3) + 1
    rows = torch.tensor([1, 9, 2], device="cuda")
    out = torch.full((3, 3), float("nan"), device="cuda")
    with pytest.raises(IndexError):
        kernels.gather_dense(src, rows, out)
    assert torch.equal(out[1].cpu(), torch.zeros(3))
    assert torch.equal(out[0].cpu(), src[1].cpu()) and torch.equal(out[2].cpu(), src[2].cpu())


@pytest.mark.parametrize("_", CUDA)
def test_a_stale_unchecked_bad_row_is_not_blamed_on_a_checked_call(_):
    m = _matrix()
    arrays = _on_cuda(m)
    bound = kernels.BoundCsr(*arrays, 500, validate=False)
    bound.to_dense(torch.tensor([0, 10_000], device="cuda"), torch.empty(2, 500, device="cuda"))  # unchecked
    good = torch.arange(3, device="cuda")
    out = kernels.gather_csr_to_dense(*arrays, 500, good, torch.empty(3, 500, device="cuda"))
    assert torch.equal(out.cpu(), torch.from_numpy(m[:3].toarray()))


@pytest.mark.parametrize("_", CUDA)
def test_large_batches_and_wide_dense_rows(_):
    """Past one scan tile (1,024 rows), past one column chunk (4,096 columns)."""
    rng = np.random.default_rng(3)
    m = _matrix(n_rows=6000, n_cols=300, density=0.03, seed=3)
    arrays = _on_cuda(m)
    rows_np = rng.integers(0, 6000, 5000)
    rows = torch.from_numpy(rows_np).cuda()
    indptr = torch.full((5001,), -1, dtype=torch.int64, device="cuda")
    kernels.csr_batch_indptr(arrays[0], rows, indptr)
    lengths = np.diff(m.indptr)[rows_np]
    np.testing.assert_array_equal(indptr.cpu().numpy(), np.concatenate([[0], np.cumsum(lengths)]))
    nnz = int(indptr[-1])
    out_indices = torch.full((nnz,), -1, dtype=torch.int32, device="cuda")
    out_values = torch.full((nnz,), float("nan"), device="cuda")
    kernels.gather_csr_to_csr(*arrays, 300, rows, indptr, out_indices, out_values)
    expected = m[rows_np]
    np.testing.assert_array_equal(out_indices.cpu().numpy(), expected.indices)
    np.testing.assert_array_equal(out_values.cpu().numpy(), expected.data)

    wide = torch.from_numpy(rng.random((50, 10_000), dtype=np.float32)).cuda()
    dense_rows = torch.from_numpy(rng.integers(0, 50, 70)).cuda()
    out = torch.full((70, 10_000), float("nan"), device="cuda")
    kernels.gather_dense(wide, dense_rows, out)
    assert torch.equal(out.cpu(), wide.cpu()[dense_rows.cpu()])

    many = torch.zeros(1_200_000, dtype=torch.int64, device="cuda")
    many[1_199_990] = 6000
    with pytest.raises(IndexError, match="at position 1199990"):
        kernels.check_rows(many, 6000)


@pytest.mark.parametrize("_", CUDA)
def test_launch_from_a_thread_without_a_context(_):
    """DeviceGuard restores "no current context" on a fresh thread without breaking torch there."""
    import threading

    m = _matrix()
    arrays = _on_cuda(m)
    rows, out = torch.arange(5, device="cuda"), torch.empty(5, 500, device="cuda")
    bound = kernels.BoundCsr(*arrays, 500, validate=False)
    torch.cuda.synchronize()
    errors = []

    def work():
        try:
            bound.to_dense(rows, out)
            torch.cuda.current_stream().synchronize()
            assert torch.cuda.current_device() == 0
            assert torch.ones(3, device="cuda").sum().item() == 3
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    assert torch.equal(out.cpu(), torch.from_numpy(m[:5].toarray()))


@pytest.mark.parametrize("_", CUDA)
def test_current_stream_handle_follows_torchs_current_stream(_):
    stream = torch.cuda.Stream()
    assert kernels.current_stream_handle(0) == torch.cuda.current_stream(0).cuda_stream
    with torch.cuda.stream(stream):
        assert kernels.current_stream_handle(0) == stream.cuda_stream


@pytest.mark.parametrize("_", CUDA)
def test_gather_plan_groups_narrow_fields_like_the_cpu_plan(_):
    """Narrow dense fields share launches by dtype pair (up to 8 each); wide ones and CSR fields
    get their own. Every output, poisoned first, must equal the CPU plan's."""
    from annloader_gpu import _core
    from annloader_gpu._cuda_module import require_cuda_module

    rng = np.random.default_rng(11)
    n_rows = 500
    m = _matrix(n_rows=n_rows, n_cols=300, seed=11)
    sources = [(np.float32, 1, "float32"), (np.int64, 1, "int64")] * 6  # 12 narrow: two groups of 6
    sources += [(np.float32, 1, "float32")] * 5  # 11 float32 -> float32 in all: a group of 8, then 3
    sources += [(np.uint8, 3, "float64"), (np.float64, 64, "float16"), (np.float32, 65, "float32"),
                (np.int32, 2000, "int64"), (np.float32, 0, "float32")]  # 64 is narrow, 65 and 2000 wide
    host = [np.ascontiguousarray((rng.random((n_rows, c)) * 100).astype(dt)) for dt, c, _ in sources]
    device_arrays = [torch.from_numpy(a).cuda() for a in host]
    csr_host = [m.indptr, m.indices, m.data]
    csr_device = _on_cuda(m)
    cpu_plan, gpu_plan = _core.GatherPlan(), require_cuda_module().GatherPlan()

    def add(plan, csr, arrays):
        plan.add_csr(*(x for a, name in zip(csr, ("int32", "int32", "float32"))
                       for x in ((a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()), name)),
                     n_rows, 300, "float32")
        for array, (_, n_cols, out) in zip(arrays, sources):
            address = array.ctypes.data if isinstance(array, np.ndarray) else array.data_ptr()
            plan.add_dense(address, kernels.dtype_name(array), n_rows, n_cols, n_cols, out)

    add(cpu_plan, csr_host, host)
    add(gpu_plan, csr_device, device_arrays)
    rows = rng.integers(0, n_rows, 333)
    out_dtypes = ["float32"] + [out for _, _, out in sources]
    widths = [300] + [c for _, c, _ in sources]
    torch_dtypes = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.int64}
    cpu_out = [torch.empty(len(rows), w, dtype=torch_dtypes[d]) for w, d in zip(widths, out_dtypes)]
    gpu_out = [torch.full((len(rows), w), -7, dtype=torch_dtypes[d], device="cuda") for w, d in zip(widths, out_dtypes)]
    rows_np = rows.astype(np.int64)
    cpu_plan.gather(rows_np.ctypes.data, "int64", len(rows), [t.data_ptr() for t in cpu_out])
    rows_cuda = torch.from_numpy(rows_np).cuda()
    gpu_plan.gather(0, torch.cuda.current_stream().cuda_stream, rows_cuda.data_ptr(), "int64", len(rows),
                    [t.data_ptr() for t in gpu_out], kernels.fresh_bad_row_slot(torch.device("cuda", 0)).data_ptr())
    torch.cuda.synchronize()
    for k, (c, g) in enumerate(zip(cpu_out, gpu_out)):
        assert torch.equal(c, g.cpu()), f"field {k}"
    # A bad row: recorded, and the narrow fields' row left zero.
    bad = torch.tensor([0, n_rows + 3, 1], device="cuda")
    slot = kernels.fresh_bad_row_slot(torch.device("cuda", 0))
    outs = [torch.full((3, w), -7, dtype=torch_dtypes[d], device="cuda") for w, d in zip(widths, out_dtypes)]
    gpu_plan.gather(0, torch.cuda.current_stream().cuda_stream, bad.data_ptr(), "int64", 3,
                    [t.data_ptr() for t in outs], slot.data_ptr())
    assert int(slot.item()) == 1
    slot.fill_(-1)
    assert all(bool((o[1] == 0).all()) for o in outs[1:] if o.shape[1])
