"""AnnDataLoader: batches equal to scvi-tools' loader, samplers, DataLoader attributes, buffer pool."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

import annloader_gpu
from _reference import (
    FULL_SETUP,
    any_nonzero,
    assert_batches_equal,
    make_adata,
    reference_batches,
    scvi_manager,
    scvi_obsm_manager,
)
from annloader_gpu.loader import AnnDataLoader

scvi_only = pytest.mark.scvi


@pytest.fixture(scope="module")
def scvi():
    return pytest.importorskip("scvi")


_MANAGERS: dict = {}


def full_manager(x_format: str, int64_indptr: bool = False, layer: str | None = None):
    """One scvi-tools manager per configuration, shared by the tests (setup modifies adata)."""
    key = (x_format, int64_indptr, layer)
    if key not in _MANAGERS:
        adata = make_adata(x_format, int64_indptr=int64_indptr)
        _MANAGERS[key] = scvi_manager(adata, layer=layer, **FULL_SETUP)
    return _MANAGERS[key]


def ours(manager, **kwargs) -> list:
    return list(AnnDataLoader(manager, device="cpu", **kwargs))


# --- equality with scvi-tools, sequential -------------------------------------------------


@scvi_only
@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_sequential_matches_scvi(scvi, x_format, load_sparse_tensor):
    manager = full_manager(x_format)
    kwargs = dict(batch_size=16, load_sparse_tensor=load_sparse_tensor)
    expected = reference_batches(manager, **kwargs)
    actual = ours(manager, **kwargs)
    assert_batches_equal(expected, actual)
    assert any_nonzero(actual)
    assert set(actual[0]) == {"X", "batch", "labels", "size_factor", "extra_categorical_covs",
                              "extra_continuous_covs"}
    assert actual[0]["X"].shape == (16, 31) and actual[0]["batch"].shape == (16, 1)


@scvi_only
@pytest.mark.parametrize("x_format", ["csr", "csc"])
def test_layer_and_int64_indptr_match_scvi(scvi, x_format):
    manager = full_manager(x_format, int64_indptr=True, layer="counts")
    assert manager.get_from_registry("X").indptr.dtype == np.int64
    for load_sparse_tensor in (False, True):
        kwargs = dict(batch_size=32, load_sparse_tensor=load_sparse_tensor)
        assert_batches_equal(reference_batches(manager, **kwargs), ours(manager, **kwargs))


@scvi_only
@pytest.mark.parametrize(
    "indices",
    [
        [5, 3, 3, 90, 0, 14, 7, 7, 96, 1, 2],  # unsorted, duplicates, empty rows (0, 7, 14)
        np.arange(10, 80, 3),
        (np.arange(97) % 3 == 0),
    ],
    ids=["ints", "array", "mask"],
)
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
def test_indices_and_drop_last_match_scvi(scvi, indices, drop_last, x_format):
    manager = full_manager(x_format)
    for load_sparse_tensor in (False, True):
        kwargs = dict(indices=indices, batch_size=4, drop_last=drop_last, load_sparse_tensor=load_sparse_tensor)
        expected = reference_batches(manager, **kwargs)
        actual = ours(manager, **kwargs)
        assert_batches_equal(expected, actual)
        assert len(AnnDataLoader(manager, device="cpu", **kwargs)) == len(expected)


@scvi_only
@pytest.mark.parametrize(
    "data_and_attributes",
    [
        ["X", "labels"],
        ["extra_continuous_covs", "X"],
        {"X": np.float64, "batch": np.float32, "labels": np.int32, "size_factor": np.float16},
        {"X": np.int64, "extra_categorical_covs": np.float32},
        {"X": np.uint8, "batch": np.int16},  # dtypes the kernels do not write: numpy casts
    ],
)
@pytest.mark.parametrize("x_format", ["csr", "dense"])
def test_data_and_attributes_match_scvi(scvi, data_and_attributes, x_format):
    manager = full_manager(x_format)
    kwargs = dict(batch_size=20, data_and_attributes=data_and_attributes)
    expected = reference_batches(manager, **kwargs)
    actual = ours(manager, **kwargs)
    assert_batches_equal(expected, actual)
    assert list(actual[0]) == list(data_and_attributes)


@scvi_only
@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
def test_iter_ndarray_matches_scvi(scvi, x_format):
    manager = full_manager(x_format)
    for load_sparse_tensor in (False, True):
        kwargs = dict(batch_size=25, iter_ndarray=True, load_sparse_tensor=load_sparse_tensor)
        expected = reference_batches(manager, **kwargs)
        actual = ours(manager, **kwargs)
        assert_batches_equal(expected, actual)
        assert isinstance(actual[0]["batch"], np.ndarray)


@scvi_only
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_obsm_dense_and_sparse_match_scvi(scvi, load_sparse_tensor):
    manager = scvi_obsm_manager(make_adata("csr", seed=3))
    kwargs = dict(batch_size=10, load_sparse_tensor=load_sparse_tensor, indices=np.arange(60)[::-1])
    expected = reference_batches(manager, **kwargs)
    actual = ours(manager, **kwargs)
    assert_batches_equal(expected, actual)
    assert set(actual[0]) == {"X", "batch", "emb", "sparse_emb"}


@scvi_only
def test_our_registry_matches_scvi_manager(scvi):
    from annloader_gpu.registry import setup_anndata

    adata = make_adata("csc", seed=5)
    registry = setup_anndata(adata.copy(), **FULL_SETUP)
    manager = scvi_manager(adata, **FULL_SETUP)
    for load_sparse_tensor in (False, True):
        kwargs = dict(batch_size=13, load_sparse_tensor=load_sparse_tensor)
        # scvi-tools orders its data registry by key; the batch dicts follow each registry's order.
        assert_batches_equal(reference_batches(manager, **kwargs), ours(registry, **kwargs), key_order=False)


# --- shuffling and samplers ------------------------------------------------------------------


@scvi_only
@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffle_matches_scvi_under_manual_seed(scvi, drop_last):
    manager = full_manager("csr")
    kwargs = dict(batch_size=16, shuffle=True, drop_last=drop_last, indices=np.arange(3, 90))
    torch.manual_seed(123)
    expected = reference_batches(manager, **kwargs)
    torch.manual_seed(123)
    actual = ours(manager, **kwargs)
    assert_batches_equal(expected, actual)
    # Not the sequential order, and (without drop_last) a permutation of all rows.
    sequential = torch.cat([b["size_factor"] for b in ours(manager, **{**kwargs, "shuffle": False})])
    shuffled = torch.cat([b["size_factor"] for b in actual])
    assert not torch.equal(shuffled, sequential[: len(shuffled)])
    if not drop_last:
        assert torch.equal(torch.sort(shuffled.ravel()).values, torch.sort(sequential.ravel()).values)


@scvi_only
def test_shuffle_with_generator(scvi):
    """The generator argument seeds our shuffling; scvi-tools' RandomSampler ignores it."""
    manager = full_manager("csr")

    def epoch(seed, global_seed):
        torch.manual_seed(global_seed)
        return torch.cat([b["size_factor"] for b in ours(manager, batch_size=8, shuffle=True,
                                                         generator=torch.Generator().manual_seed(seed))])

    first = epoch(7, 0)
    assert torch.equal(first, epoch(7, 1))  # independent of the global RNG
    assert not torch.equal(first, epoch(8, 0))
    loader = AnnDataLoader(manager, device="cpu", batch_size=8, shuffle=True,
                           generator=torch.Generator().manual_seed(7))
    one, two = list(loader), list(loader)
    assert not torch.equal(one[0]["size_factor"], two[0]["size_factor"])  # a new permutation per epoch
    assert torch.equal(torch.cat([b["size_factor"] for b in one]), first)


@scvi_only
@pytest.mark.parametrize("iter_ndarray", [False, True])
def test_custom_batch_sampler_matches_scvi(scvi, iter_ndarray):
    manager = full_manager("csr")
    indices = np.arange(5, 70)

    def sampler():
        return BatchSampler(SequentialSampler(range(len(indices))), batch_size=9, drop_last=False)

    kwargs = dict(indices=indices, iter_ndarray=iter_ndarray)
    expected = reference_batches(manager, sampler=sampler(), **kwargs)
    actual = ours(manager, sampler=sampler(), **kwargs)
    # As in scvi-tools, DataLoader collates each sampled batch (batch_size=1): shape (1, B, ...).
    assert_batches_equal(expected, actual)
    if not iter_ndarray:
        assert actual[0]["X"].shape == (1, 9, 31)
    assert len(AnnDataLoader(manager, device="cpu", sampler=sampler(), **kwargs)) == len(expected)


def test_custom_sampler_of_arrays_is_honoured():
    from annloader_gpu.registry import setup_anndata

    adata = make_adata("csr")
    registry = setup_anndata(adata, **FULL_SETUP)
    order = [np.array([4, 2, 9]), np.array([0]), np.array([96, 95])]
    batches = ours(registry, sampler=order)
    dense = adata.X.toarray()
    for rows, batch in zip(order, batches):
        assert torch.equal(batch["X"][0], torch.from_numpy(dense[rows]))


@scvi_only
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last,drop_dataset_tail", [(False, False), (True, True), (True, False)])
def test_distributed_sampler_ranks_match_scvi_sampler(scvi, shuffle, drop_last, drop_dataset_tail):
    """num_replicas/rank/seed keywords (our extension) reach BatchDistributedSampler."""
    from scvi.dataloaders import BatchDistributedSampler as ScviSampler

    manager = full_manager("csr")
    indices = np.arange(2, 95)
    dense = manager.get_from_registry("X").toarray()
    for num_replicas in (2, 3):
        for rank in range(num_replicas):
            options = dict(num_replicas=num_replicas, rank=rank, seed=11)
            loader = AnnDataLoader(manager, device="cpu", indices=indices, batch_size=7, shuffle=shuffle,
                                   drop_last=drop_last, drop_dataset_tail=drop_dataset_tail,
                                   distributed_sampler=True, **options)
            reference = ScviSampler(range(len(indices)), batch_size=7, drop_last=drop_last,
                                    drop_dataset_tail=drop_dataset_tail, shuffle=shuffle, **options)
            for epoch in (0, 3):
                loader.sampler.set_epoch(epoch)
                reference.set_epoch(epoch)
                expected = list(reference)
                actual = list(loader)
                assert len(actual) == len(expected) == len(loader)
                for positions, batch in zip(expected, actual):
                    assert torch.equal(batch["X"], torch.from_numpy(dense[indices[positions]]))


def test_distributed_batches_are_slices_of_one_epoch_mapping():
    """A distributed loader maps (and on a GPU uploads) its epoch's rows once, like the default
    sampler, instead of once per batch; the batches stay the sampler's."""
    manager = full_manager("csr")
    loader = AnnDataLoader(manager, device="cpu", batch_size=8, distributed_sampler=True, num_replicas=3, rank=2,
                           seed=5, shuffle=True)
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    first = next(iterator)
    assert iterator._source.rows_ready
    dense = manager.get_from_registry("X").toarray()
    expected = list(loader.sampler)
    assert torch.equal(first["X"], torch.from_numpy(dense[expected[0]]))
    assert len(list(iterator)) == len(expected) - 1


@scvi_only
def test_distributed_sampler_with_process_group_matches_scvi(scvi, tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        manager = full_manager("csc")
        kwargs = dict(batch_size=12, distributed_sampler=True, shuffle=True, drop_last=True)
        assert_batches_equal(reference_batches(manager, **kwargs), ours(manager, **kwargs))
    finally:
        dist.destroy_process_group()


# --- DataLoader surface ------------------------------------------------------------------------


@scvi_only
@pytest.mark.parametrize("kwargs", [dict(), dict(shuffle=True, drop_last=True, batch_size=10),
                                    dict(indices=[1, 2, 3], batch_size=2, pin_memory=False, timeout=5)])
def test_dataloader_attributes_match_scvi(scvi, kwargs):
    from scvi.dataloaders import AnnDataLoader as ScviLoader

    manager = full_manager("csr")
    reference = ScviLoader(manager, **kwargs)
    loader = AnnDataLoader(manager, device="cpu", **kwargs)
    assert isinstance(loader, torch.utils.data.DataLoader)
    for name in ("batch_size", "num_workers", "pin_memory", "drop_last", "timeout", "pin_memory_device",
                 "prefetch_factor", "multiprocessing_context", "persistent_workers"):
        assert getattr(loader, name) == getattr(reference, name), name
    assert type(loader.sampler) is type(reference.sampler)
    assert loader.sampler.batch_size == reference.sampler.batch_size
    assert loader.sampler.drop_last == reference.sampler.drop_last
    assert len(loader) == len(reference)
    assert len(loader.dataset) == len(reference.dataset)
    assert len(iter(loader)) == len(loader)
    assert loader.check_worker_number_rationality() is None
    np.testing.assert_array_equal(loader.indices, reference.indices)


def test_len_and_batch_shapes_without_scvi():
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata("csr"), **FULL_SETUP)
    for batch_size, drop_last, expected in [(10, False, 10), (10, True, 9), (97, False, 1), (200, True, 0)]:
        loader = AnnDataLoader(registry, batch_size=batch_size, drop_last=drop_last)
        assert loader.device == torch.device("cpu") or annloader_gpu.gpu_usable()
        batches = list(loader)
        assert len(loader) == len(batches) == expected
        assert all(b["X"].shape[0] in (batch_size, 97 % batch_size) for b in batches)
    empty = AnnDataLoader(registry, indices=[], device="cpu")
    assert len(empty) == 0 and list(empty) == []


def test_num_workers_warns_and_works():
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata("csr"), **FULL_SETUP)
    expected = ours(registry, batch_size=16)
    with pytest.warns(UserWarning, match="num_workers=2 ignored.*in-process"):
        loader = AnnDataLoader(registry, device="cpu", batch_size=16, num_workers=2, persistent_workers=True,
                               prefetch_factor=4)
    assert loader.num_workers == 0 and loader.prefetch_factor is None and not loader.persistent_workers
    assert_batches_equal(expected, list(loader))
    assert_batches_equal(expected, list(loader))


def test_user_collate_fn_receives_numpy_batch():
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata("dense"), **FULL_SETUP)
    seen = []

    def collate(batch):
        seen.append({k: type(v) for k, v in batch.items()})
        return len(batch["X"])

    assert list(AnnDataLoader(registry, device="cpu", batch_size=40, collate_fn=collate)) == [40, 40, 17]
    assert seen[0]["X"] is np.ndarray


# --- buffer pool ---------------------------------------------------------------------------------


@pytest.mark.parametrize("x_format", ["csr", "dense"])
def test_kept_batches_are_never_overwritten(x_format):
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata(x_format, n_obs=300), **FULL_SETUP)
    loader = AnnDataLoader(registry, device="cpu", batch_size=32, shuffle=True,
                           generator=torch.Generator().manual_seed(0))
    kept, snapshots = [], []
    pointers = set()
    for epoch in range(3):
        for i, batch in enumerate(loader):
            pointers.add(batch["X"].data_ptr())
            if i % 3 == 0:
                kept.append(batch)  # the whole batch
            elif i % 3 == 1:
                kept.append({"X": batch["X"][1:4], "labels": batch["labels"].numpy()})  # views only
            else:
                continue  # dropped: its buffers may be reused
            snapshots.append({k: v.clone() if isinstance(v, torch.Tensor) else v.copy() for k, v in kept[-1].items()})
            del batch
    for batch, snapshot in zip(kept, snapshots):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(snapshot[key]))
    # Dropped batches' buffers were reused: far fewer distinct buffers than batches.
    n_batches = 3 * len(loader)
    assert len(pointers) < n_batches


def test_pool_reuses_only_unreferenced_buffers():
    from annloader_gpu.dataset import BufferPool

    pool = BufferPool(max_per_key=2)
    first = pool.empty((4, 3), np.float32)
    first_ptr = first.ctypes.data
    tensor_view = torch.from_numpy(first)[1:]  # a torch view keeps the buffer referenced
    del first
    second = pool.empty((4, 3), np.float32)
    second_ptr = second.ctypes.data
    numpy_view = second[:, 1]  # so does a numpy view
    del second
    assert second_ptr != first_ptr
    third = pool.empty((4, 3), np.float32)  # pool full, both referenced: a fresh unpooled buffer
    assert third.ctypes.data not in (first_ptr, second_ptr)
    del third, tensor_view
    assert pool.empty((4, 3), np.float32).ctypes.data == first_ptr
    del numpy_view
    assert pool.empty((4, 3), np.float32).ctypes.data == first_ptr  # the first free one
    flat = pool.empty_flat(10, np.int32)
    base_ptr = flat.ctypes.data
    kept = torch.from_numpy(pool.empty_flat(10, np.int32))
    assert kept.data_ptr() != base_ptr
    del flat
    again = pool.empty_flat(12, np.int32)  # reuses the capacity of the first
    assert again.ctypes.data == base_ptr and len(again) == 12
    assert pool.nbytes > 0


def test_iter_ndarray_batches_are_never_overwritten():
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata("csr", n_obs=200), **FULL_SETUP)
    loader = AnnDataLoader(registry, device="cpu", batch_size=16, iter_ndarray=True)
    kept = [(b["X"][:2], b["X"][:2].copy()) for b in loader for _ in range(2)]  # views of the batches
    kept += [(b["X"], b["X"].copy()) for b in loader]
    for view, copy_ in kept:
        np.testing.assert_array_equal(view, copy_)


# --- prepared data -------------------------------------------------------------------------------


def test_resident_bytes_and_shared_storage():
    from annloader_gpu.registry import setup_anndata

    adata = make_adata("csc", n_obs=120, n_vars=40)
    registry = setup_anndata(adata, **FULL_SETUP)
    train = AnnDataLoader(registry, device="cpu", indices=np.arange(100))
    valid = AnnDataLoader(registry, device="cpu", indices=np.arange(100, 120))
    assert train.dataset.data.fields["X"].storage is valid.dataset.data.fields["X"].storage
    storage = train.dataset.data.fields["X"].storage
    assert storage.indices.dtype == np.uint16 and storage.values.dtype in (np.uint8, np.uint16)
    assert train.bytes_per_nonzero <= 4.1
    assert train.resident_bytes >= storage.nbytes > 0
    dense = AnnDataLoader(setup_anndata(make_adata("dense")), device="cpu")
    assert dense.bytes_per_nonzero is None and dense.resident_bytes > 0


def test_inputs_not_modified():
    from annloader_gpu.registry import setup_anndata

    adata = make_adata("csc")
    adata.obsm["emb"] = np.asfortranarray(adata.obsm["emb"])
    before = copy.deepcopy(adata)
    registry = setup_anndata(adata, **FULL_SETUP)
    indices = np.array([-1, 5, 3, -97])
    mask = np.zeros(97, dtype=bool)
    mask[::5] = True
    for idx in (indices, mask):
        saved = idx.copy()
        batches = ours(registry, indices=idx, batch_size=3, load_sparse_tensor=True)
        np.testing.assert_array_equal(idx, saved)
        assert batches
    assert ours(registry, indices=indices)[0]["X"].shape[0] == 4
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(adata.X, name), getattr(before.X, name))
    assert adata.X.format == "csc"
    np.testing.assert_array_equal(adata.obsm["emb"], before.obsm["emb"])
    assert adata.obsm["emb"].flags.f_contiguous


def test_negative_indices_count_from_the_end():
    from annloader_gpu.registry import setup_anndata

    adata = make_adata("dense")
    registry = setup_anndata(adata)
    batch = ours(registry, indices=[-1, 0, -97])[0]
    np.testing.assert_array_equal(batch["X"].numpy(), adata.X[[96, 0, 0]])


# --- GPU ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not annloader_gpu.gpu_usable() or not torch.cuda.is_available(),
                         reason="needs a usable CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
@pytest.mark.parametrize("residency", ["device", "pinned", "host"])
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_gpu_batches_equal_cpu_batches(x_format, residency, load_sparse_tensor):
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata(x_format), **FULL_SETUP)
    kwargs = dict(batch_size=16, indices=np.arange(90)[::-1], load_sparse_tensor=load_sparse_tensor)
    expected = ours(registry, **kwargs)
    loader = AnnDataLoader(registry, device="cuda", residency=residency, **kwargs)
    assert loader.residency == residency
    actual = list(loader)
    assert all(v.device.type == "cuda" for b in actual for v in b.values())
    assert_batches_equal(expected, [{k: v.cpu() for k, v in b.items()} for b in actual])
    if residency != "host":  # a second loader over the same data shares the placed copy
        other = AnnDataLoader(registry, device="cuda", residency=residency, batch_size=4)
        assert other.dataset.data.fields["X"].storage is loader.dataset.data.fields["X"].storage


@pytest.mark.gpu
@gpu
def test_gpu_is_the_default_device():
    from annloader_gpu.registry import setup_anndata

    loader = AnnDataLoader(setup_anndata(make_adata("csr")))
    assert loader.device.type == "cuda"
    assert next(iter(loader))["X"].is_cuda


def test_cpu_is_the_default_without_gpu():
    if annloader_gpu.gpu_usable():
        pytest.skip("a GPU is usable here")
    from annloader_gpu.registry import setup_anndata

    loader = AnnDataLoader(setup_anndata(make_adata("csr")))
    assert loader.device == torch.device("cpu") and loader.residency == "host"



@pytest.mark.parametrize("seeded_generator", [False, True])
def test_fast_shuffle_order_equals_random_sampler(seeded_generator):
    from torch.utils.data import RandomSampler

    from annloader_gpu.batch_iterator import _random_sampler_order

    def make():
        return RandomSampler(range(50), generator=torch.Generator().manual_seed(3) if seeded_generator else None)

    torch.manual_seed(9)
    expected = [list(make()) for _ in range(2)]
    torch.manual_seed(9)
    actual = [_random_sampler_order(make(), 50).tolist() for _ in range(2)]
    assert actual == expected


@scvi_only
def test_dataset_getitem_matches_scvi_subset(scvi):
    from scvi.dataloaders import AnnDataLoader as ScviLoader

    manager = full_manager("csc")
    kwargs = dict(indices=np.arange(40, 90))
    reference = ScviLoader(manager, **kwargs).dataset
    dataset = AnnDataLoader(manager, device="cpu", **kwargs).dataset
    for positions in ([3, 1, 1], np.array([0, 49]), slice(2, 9, 3)):
        expected = reference[list(range(50))[positions] if isinstance(positions, slice) else list(positions)]
        assert_batches_equal([expected], [dataset[positions]])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("residency", ["device", "pinned"])
def test_gpu_loader_dataset_indexing_returns_host_arrays(residency):
    """loader.dataset[i] as scvi-tools' dataset gives it (numpy on the host), whatever the residency."""
    from annloader_gpu.registry import setup_anndata

    registry = setup_anndata(make_adata("csr"), **FULL_SETUP)
    expected = AnnDataLoader(registry, device="cpu").dataset
    dataset = AnnDataLoader(registry, device="cuda", residency=residency).dataset
    for positions in ([3, 1, 1], 5, slice(2, 9, 3)):
        assert_batches_equal([expected[positions]], [dataset[positions]])
