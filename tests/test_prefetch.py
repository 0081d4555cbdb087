"""Side-stream prefetch and GPU shuffling of the loader.

The hand-over logic (which stream waits for which, when tensors are recorded on the consumer's
stream, in which order errors surface) is checked on the CPU with a fake stream; the real
streams, the caching allocator and CUDA generators are checked on a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import numpy as np
import pytest
import torch

import annloader_gpu
from annloader_gpu import AnnDataLoader
from annloader_gpu import batch_iterator as loader_module
from annloader_gpu.registry import setup_anndata
from test_loader import assert_batches_equal, make_adata

gpu = pytest.mark.skipif(not annloader_gpu.gpu_usable(), reason="needs a usable CUDA GPU")


class _FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append(("wait", self.name, other.name))


@pytest.fixture
def fake_streams(monkeypatch):
    """Routes the loader's stream calls to fakes that log what happens, in order."""
    log: list = []
    consumer, side = _FakeStream("consumer", log), _FakeStream("side", log)
    state = {"current": consumer}

    @contextlib.contextmanager
    def on_stream(stream):
        previous, state["current"] = state["current"], stream
        log.append(("enter", stream.name))
        try:
            yield
        finally:
            state["current"] = previous
            log.append(("exit", stream.name))

    def record(batch, stream):
        log.append(("record", stream.name, int(batch["X"].sum()) if isinstance(batch, dict) else None))

    monkeypatch.setattr(loader_module, "_current_stream", lambda device: state["current"])
    monkeypatch.setattr(loader_module, "_on_stream", on_stream)
    monkeypatch.setattr(loader_module, "_record_stream", record)
    return log, side


def _prefetching_iterator(loader: AnnDataLoader, side: _FakeStream):
    """A CPU loader's iterator driven through the prefetch path (as a GPU loader's would be)."""
    iterator = iter(loader)
    iterator._side_stream = side
    iterator._pending = loader_module._NOT_STARTED
    side.wait_stream(loader_module._current_stream(loader.device))
    return iterator


def test_prefetch_hands_over_each_batch_after_the_consumer_waits(fake_streams):
    log, side = fake_streams
    registry = setup_anndata(make_adata("csr"))
    loader = AnnDataLoader(registry, device="cpu", batch_size=32)
    expected = list(loader)
    actual = list(_prefetching_iterator(loader, side))
    assert_batches_equal(expected, actual)
    sums = [int(batch["X"].sum()) for batch in expected]
    # Per batch: the consumer waits for the side stream, the batch is recorded on the consumer's
    # stream, and only then is the next batch gathered on the side stream.
    handed = [entry for entry in log if entry[0] in ("wait", "record")]
    assert handed[0] == ("wait", "side", "consumer")  # gathers ordered after the placed data
    assert handed[1:] == [e for s in sums for e in (("wait", "consumer", "side"), ("record", "consumer", s))]
    # One gather ahead: len(batches) + 1 side-stream sections (the last one finds the end).
    assert log.count(("enter", "side")) == len(expected) + 1
    first_record = log.index(("record", "consumer", sums[0]))
    assert log[first_record + 1] == ("enter", "side")


def test_prefetch_raises_errors_at_the_batch_they_belong_to(fake_streams):
    _log, side = fake_streams
    registry = setup_anndata(make_adata("csr"))
    n_obs = registry.adata.n_obs
    sampler = [[0, 1], [2, 3], [n_obs + 5], [4]]  # the third item is out of range
    loader = AnnDataLoader(registry, device="cpu", sampler=sampler)
    iterator = _prefetching_iterator(loader, side)
    first, second = next(iterator), next(iterator)  # collated: a leading dimension of 1
    assert first["X"].shape[:2] == (1, 2) and second["X"].shape[:2] == (1, 2)
    with pytest.raises(IndexError):
        next(iterator)
    with pytest.raises(IndexError):  # the iterator stays failed, as a generator would
        next(iterator)


def test_prefetch_iterator_stays_exhausted(fake_streams):
    _log, side = fake_streams
    loader = AnnDataLoader(setup_anndata(make_adata("csr")), device="cpu", batch_size=1000)
    iterator = _prefetching_iterator(loader, side)
    next(iterator)
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(iterator)


@contextlib.contextmanager
def _no_garbage_collection():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("consumed", ["one_batch", "all"])
@pytest.mark.parametrize("prefetching", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_dropped_iterator_is_freed_at_once(fake_streams, consumed, prefetching, shuffle):
    """No reference cycle through the iterator: its prefetched batch and epoch rows go with it,
    not at the next garbage collection."""
    _log, side = fake_streams
    loader = AnnDataLoader(setup_anndata(make_adata("csr")), device="cpu", batch_size=16, shuffle=shuffle)
    with _no_garbage_collection():
        iterator = _prefetching_iterator(loader, side) if prefetching else iter(loader)
        if consumed == "all":
            assert list(iterator)
        else:
            next(iterator)
        batch_ref = weakref.ref(iterator._pending["X"]) if prefetching and consumed != "all" else None
        iterator_ref = weakref.ref(iterator)
        del iterator
        assert iterator_ref() is None
        if batch_ref is not None:
            assert batch_ref() is None


@pytest.mark.parametrize("prefetch", [1, "yes", None])
def test_prefetch_must_be_a_bool(prefetch):
    with pytest.raises(TypeError, match="prefetch must be True or False"):
        AnnDataLoader(setup_anndata(make_adata("csr")), device="cpu", prefetch=prefetch)


def test_prefetch_is_a_no_op_on_the_cpu():
    registry = setup_anndata(make_adata("csr"))
    on = list(AnnDataLoader(registry, device="cpu", batch_size=16, prefetch=True))
    off = list(AnnDataLoader(registry, device="cpu", batch_size=16, prefetch=False))
    assert_batches_equal(off, on)


def test_generator_must_be_a_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        AnnDataLoader(setup_anndata(make_adata("csr")), device="cpu", shuffle=True, generator=3)


# --- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("residency", ["device", "pinned"])
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_gpu_prefetch_batches_survive_a_slow_consumer(residency, load_sparse_tensor):
    """Batches the consumer still reads (or has dropped while its stream is behind) stay intact."""
    registry = setup_anndata(make_adata("csr"))
    kwargs = dict(batch_size=8, residency=residency, load_sparse_tensor=load_sparse_tensor)
    expected = [{k: v.cpu() for k, v in b.items()} for b in AnnDataLoader(registry, device="cuda",
                                                                             prefetch=False, **kwargs)]
    loader = AnnDataLoader(registry, device="cuda", prefetch=True, **kwargs)
    kept, sums = {}, []
    for i, batch in enumerate(loader):
        torch.cuda._sleep(2_000_000)  # the consumer's stream falls behind the side stream
        x = batch["X"].to_dense() if batch["X"].layout != torch.strided else batch["X"]
        sums.append(x.sum(dtype=torch.float64))
        if i % 2 == 0:
            kept[i] = batch  # kept batches must never be overwritten
        del batch, x  # the others are freed while the consumer's stream may still be reading them
    torch.cuda.synchronize()
    assert_batches_equal([expected[i] for i in kept], [{k: v.cpu() for k, v in b.items()} for b in kept.values()])
    expected_sums = [float((b["X"].to_dense() if b["X"].layout != torch.strided else b["X"]).double().sum())
                     for b in expected]
    assert [float(s) for s in sums] == pytest.approx(expected_sums, rel=1e-12)


@pytest.mark.gpu
@gpu
def test_gpu_prefetch_with_user_stream_and_dropped_batches():
    registry = setup_anndata(make_adata("csr"))
    expected = [b["X"].cpu() for b in AnnDataLoader(registry, device="cuda", batch_size=8, prefetch=False)]
    stream = torch.cuda.Stream()
    totals = torch.zeros((), dtype=torch.float64, device="cuda")
    loader = AnnDataLoader(registry, device="cuda", batch_size=8, prefetch=True)
    # torch hands out pooled streams round-robin: the side stream must not be the user's own,
    # or this test would pass without any overlap to get wrong.
    assert loader._prefetch_stream().cuda_stream != stream.cuda_stream
    with torch.cuda.stream(stream):
        for batch in loader:
            torch.cuda._sleep(1_000_000)
            totals += batch["X"].double().sum()
    torch.cuda.synchronize()
    assert float(totals) == pytest.approx(float(sum(x.double().sum() for x in expected)), rel=1e-12)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("indices", [None, np.arange(97)[::-3]])
def test_gpu_generator_shuffles_on_the_device(indices):
    registry = setup_anndata(make_adata("csr"))
    n = registry.adata.n_obs if indices is None else len(indices)
    chosen = np.arange(registry.adata.n_obs) if indices is None else indices

    def epoch(seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        loader = AnnDataLoader(registry, device="cuda", batch_size=16, shuffle=True, indices=indices,
                               generator=generator)
        return [{k: v.cpu() for k, v in b.items()} for b in loader]

    order = epoch(5)
    assert_batches_equal(order, epoch(5))
    assert not all(torch.equal(a["X"], b["X"]) for a, b in zip(order, epoch(6)))
    # The chosen rows in the order torch.randperm draws on the device with that seed.
    permutation = torch.randperm(n, generator=torch.Generator(device="cuda").manual_seed(5), device="cuda")
    expected = AnnDataLoader(registry, device="cpu", batch_size=16, indices=chosen[permutation.cpu().numpy()])
    assert_batches_equal(list(expected), order)


@pytest.mark.gpu
@gpu
def test_gpu_generator_on_another_device_or_with_cpu_batches_is_refused():
    registry = setup_anndata(make_adata("csr"))
    generator = torch.Generator(device="cuda")
    with pytest.raises(ValueError, match="generator lives on cuda"):
        AnnDataLoader(registry, device="cpu", shuffle=True, generator=generator)



@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("residency", ["device", "pinned"])
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gpu_epoch_has_no_host_synchronisation_after_its_first_batch(residency, load_sparse_tensor, prefetch):
    """Issue 4: no host synchronisation inside the iteration. The epoch's set-up (its rows, and
    for sparse outputs the batch sizes read back once) happens with the first batch; every later
    batch must be launch-only: torch's sync debug mode turns any synchronisation into an error."""
    registry = setup_anndata(make_adata("csr"))
    loader = AnnDataLoader(registry, device="cuda", batch_size=8, shuffle=True, residency=residency,
                           load_sparse_tensor=load_sparse_tensor, prefetch=prefetch)
    torch.manual_seed(0)
    iterator = iter(loader)
    batches = [next(iterator)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches.extend(iterator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Same rows as a CPU loader drawn with the same seed.
    torch.manual_seed(0)
    reference = list(AnnDataLoader(registry, device="cpu", batch_size=8, shuffle=True,
                                   load_sparse_tensor=load_sparse_tensor))
    assert_batches_equal(reference, [{k: v.cpu() for k, v in b.items()} for b in batches])


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_sparse_sizes_match_the_batches(drop_last):
    """The per-epoch sizes a GPU loader uses instead of reading each batch's nnz back, computed
    here from host rows over host storage (the pinned-residency case)."""
    registry = setup_anndata(make_adata("csr"))
    loader = AnnDataLoader(registry, device="cpu", batch_size=16, load_sparse_tensor=True, drop_last=drop_last)
    batches = list(loader)
    iterator = iter(loader)
    rows = np.arange(registry.adata.n_obs, dtype=np.int64)
    n = len(rows)
    stop = (n // 16) * 16 if drop_last else n
    sizes = iterator._source._epoch_sparse_sizes(torch.from_numpy(rows), rows, 16, stop)
    assert [s["X"] for s in sizes] == [int(b["X"].values().numel()) for b in batches]
    assert all(set(s) == {"X"} for s in sizes)
