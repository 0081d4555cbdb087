"""Distributed loading under torchrun (CPU, gloo): sampling semantics, data, sharding, Lightning.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node=N`` on
``tests/_ddp_worker.py`` (loopback rendezvous only), with a hard timeout so CI never hangs, and
compares the per-rank JSON results with scvi-tools' ``BatchDistributedSampler`` evaluated here
with explicit ``num_replicas``/``rank``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import annloader_gpu
from annloader_gpu.distributed import ShardedBatchSampler, partition_positions, world_info

WORKER = Path(__file__).with_name("_ddp_worker.py")
N_OBS, BATCH_SIZE, EPOCHS, SEED = 1001, 64, 2, 11  # 1001 = 2*500+1 = 3*333+2: uneven for 2 and 3
TIMEOUT_S = 120


def _launch(tmp_path: Path, nproc: int, mode: str) -> list[dict]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU fallback with gloo, even on a GPU machine
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--max-restarts=0", "--monitor-interval=0.2", str(WORKER),
        "--out", str(tmp_path), "--mode", mode, "--n-obs", str(N_OBS), "--batch-size", str(BATCH_SIZE),
        "--epochs", str(EPOCHS), "--seed", str(SEED),
    ]
    # A new session, so that on timeout the whole tree (torchrun and its workers) is killed.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun --nproc_per_node={nproc} timed out after {TIMEOUT_S} s\n"
                    f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}")
    results = []
    for rank in range(nproc):
        path = tmp_path / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no result (exit {proc.returncode})\n"
                        f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}")
        results.append(json.loads(path.read_text()))
    errors = [r.get("error") for r in results if not r.get("ok")]
    assert not errors and proc.returncode == 0, (
        f"exit {proc.returncode}\n" + "\n".join(e or "" for e in errors) + f"\n--- stderr ---\n{stderr[-6000:]}"
    )
    return results


def _scvi_batches(nproc: int, drop_last: bool, drop_tail: bool, epoch: int) -> list[list[list[int]]]:
    """Per rank, the batches scvi-tools' sampler yields (positions = rows: indices=None)."""
    BatchDistributedSampler = pytest.importorskip("scvi.dataloaders._samplers").BatchDistributedSampler

    out = []
    for rank in range(nproc):
        s = BatchDistributedSampler(range(N_OBS), batch_size=BATCH_SIZE, drop_last=drop_last,
                                    drop_dataset_tail=drop_tail, num_replicas=nproc, rank=rank, seed=SEED,
                                    shuffle=True)
        s.set_epoch(epoch)
        out.append([list(map(int, b)) for b in s])
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["nproc2", "nproc3"])
def loader_results(request, tmp_path_factory):
    nproc = request.param
    return nproc, _launch(tmp_path_factory.mktemp(f"ddp{nproc}"), nproc, "loader")


def _configs(results, layout):
    by_key = collections.defaultdict(list)
    for r in results:
        for c in r["configs"]:
            if c["layout"] == layout:
                by_key[(c["drop_last"], c["drop_dataset_tail"])].append(c)
    assert len(by_key) == 4
    return by_key


@pytest.mark.slow
@pytest.mark.scvi
def test_ranks_see_their_process_group(loader_results):
    nproc, results = loader_results
    assert [r["rank"] for r in results] == list(range(nproc))
    assert all(r["world"] == nproc and r["backend"] == "gloo" and r["local_device"] == "cpu" for r in results)
    assert sorted(r["local_rank"] for r in results) == list(range(nproc))


@pytest.mark.slow
@pytest.mark.scvi
def test_replicated_matches_scvi_sampler(loader_results):
    """Every rank yields exactly scvi-tools' batches (read from the process group), every epoch."""
    nproc, results = loader_results
    for (drop_last, drop_tail), per_rank in _configs(results, "replicated").items():
        lens = {c["len"] for c in per_rank}
        assert len(lens) == 1, f"batch counts differ across ranks: {lens}"
        for epoch in range(EPOCHS):
            expected = _scvi_batches(nproc, drop_last, drop_tail, epoch)
            got = [c["epochs"][epoch] for c in per_rank]
            assert got == expected, (drop_last, drop_tail, epoch)
            assert {len(b) for b in got} == {len(expected[0])}  # same number of batches per rank
            union = collections.Counter(i for rank in got for b in rank for i in b)
            exp_union = collections.Counter(i for rank in expected for b in rank for i in b)
            assert union == exp_union
            if not drop_last and not drop_tail:  # padding: every row, duplicates only for padding
                assert set(union) == set(range(N_OBS))
                assert sum(union.values()) - N_OBS == (-N_OBS) % nproc
            if not drop_last and drop_tail:  # dropped tail: no row twice
                assert max(union.values()) == 1 and len(union) == N_OBS - N_OBS % nproc
        e0 = [c["epochs"][0] for c in per_rank]
        e1 = [c["epochs"][1] for c in per_rank]
        assert e0 != e1, "set_epoch did not reshuffle"
        assert all(c["x_ok"] for c in per_rank), "X rows differ from the reference rows"


@pytest.mark.slow
@pytest.mark.scvi
def test_sharded_holds_only_its_partition(loader_results):
    nproc, results = loader_results
    for (drop_last, drop_tail), per_rank in _configs(results, "sharded").items():
        parts = [np.asarray(c["partition"]) for c in per_rank]
        for rank, (c, part) in enumerate(zip(per_rank, parts)):
            np.testing.assert_array_equal(part, partition_positions(N_OBS, nproc, rank, SEED))
            assert c["x_rows"] == len(part) and c["x_nnz"] == c["partition_nnz"]
            assert c["resident_bytes"] <= c["bytes_bound"]
            assert c["resident_bytes"] < c["full_bytes"] / nproc * 1.1
            assert c["x_ok"], "X rows differ from the reference rows"
        allrows = np.concatenate(parts)
        assert len(allrows) == N_OBS and set(allrows.tolist()) == set(range(N_OBS)), "partitions overlap or miss rows"
        # Same per-rank batch counts (and sizes) as the replicated sampler: DDP cannot hang on it.
        expected = _scvi_batches(nproc, drop_last, drop_tail, 0)
        for epoch in range(EPOCHS):
            got = [c["epochs"][epoch] for c in per_rank]
            assert [len(r) for r in got] == [len(r) for r in expected]
            assert [[len(b) for b in r] for r in got] == [[len(b) for b in r] for r in expected]
            for rows, part in zip(got, parts):
                assert set(i for b in rows for i in b) <= set(part.tolist()), "a rank left its partition"
            union = collections.Counter(i for r in got for b in r for i in b)
            if not drop_last and not drop_tail:
                assert set(union) == set(range(N_OBS))
                assert sum(union.values()) - N_OBS == (-N_OBS) % nproc
            if not drop_last and drop_tail:
                assert max(union.values()) == 1 and sum(union.values()) == N_OBS - N_OBS % nproc
        e0 = [c["epochs"][0] for c in per_rank]
        e1 = [c["epochs"][1] for c in per_rank]
        assert e0 != e1, "set_epoch did not reshuffle the partitions"


def test_sharded_sampler_exactly_once_when_divisible():
    """In-process: with world | n, every epoch covers each row exactly once across ranks."""
    n, world = 999, 3
    for epoch in range(3):
        seen = collections.Counter()
        lens = set()
        for rank in range(world):
            part = partition_positions(n, world, rank, seed=5)
            s = ShardedBatchSampler(len(part), n, 50, num_replicas=world, rank=rank, seed=5)
            s.set_epoch(epoch)
            batches = list(s)
            lens.add(len(batches))
            assert len(batches) == len(s)
            seen.update(part[np.concatenate(batches)].tolist())
        assert len(lens) == 1
        assert seen == collections.Counter(range(n))


def test_sharded_sampler_rejects_bad_partition():
    with pytest.raises(ValueError, match="partition_size"):
        ShardedBatchSampler(10, 100, 8, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="drop_dataset_tail"):
        ShardedBatchSampler(0, 1, 8, num_replicas=2, rank=1)


def test_world_info_explicit_and_default(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world_info() == (1, 0, 0)
    assert world_info(4, 2) == (4, 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_info() == (8, 5, 1)
    with pytest.raises(ValueError):
        world_info(2, 2)


@pytest.mark.slow
@pytest.mark.scvi
def test_lightning_ddp_keeps_our_sampler(tmp_path):
    """Trainer(strategy="ddp"), 2 processes: Lightning keeps our loader and sampler, with either flag."""
    pytest.importorskip("lightning")
    nproc = 2
    results = _launch(tmp_path, nproc, "lightning")
    runs = list(zip(*[r["runs"] for r in results]))
    assert len(runs) == 3
    for per_rank in runs:
        first = per_rank[0]
        for r in per_rank:
            assert r["same_loader"], "Lightning replaced the loader"
            assert r["sampler_type"] == "BatchDistributedSampler"
            assert r["sampler_epoch"] == EPOCHS - 1, "Lightning did not call set_epoch"
            assert [len(e) for e in r["epochs"]] == [r["len"]] * EPOCHS
            # Lightning's own noise only: third-party deprecations (pandas' Pandas4Warning is a
            # DeprecationWarning subclass), nothing from us.
            unexpected = [w["text"] for w in r["warnings"] if w["ours"] or not w["deprecation"]]
            assert not unexpected, unexpected
        for epoch in range(EPOCHS):
            got = [r["epochs"][epoch] for r in per_rank]
            if not first["sharded"]:
                assert got == _scvi_batches(nproc, False, False, epoch)
            else:
                union = collections.Counter(i for rank in got for b in rank for i in b)
                assert set(union) == set(range(N_OBS)) and sum(union.values()) == N_OBS + (-N_OBS) % nproc


def test_distributed_sampler_loader_defaults_to_this_ranks_device(monkeypatch):
    """device=None with distributed_sampler=True asks local_device() (cuda:LOCAL_RANK on GPUs)."""
    import annloader_gpu.distributed as distributed
    from annloader_gpu import AnnDataLoader
    from annloader_gpu.registry import setup_anndata
    from test_loader import make_adata

    calls = []

    def fake_local_device(device=None):
        calls.append(device)
        return torch.device("cpu")

    monkeypatch.setattr(distributed, "local_device", fake_local_device)
    registry = setup_anndata(make_adata("csr"))
    loader = AnnDataLoader(registry, distributed_sampler=True, num_replicas=2, rank=1, batch_size=8)
    assert calls == [None] and loader.device == torch.device("cpu")
    AnnDataLoader(registry, distributed_sampler=True, num_replicas=2, rank=1, batch_size=8, device="cpu")
    AnnDataLoader(registry, batch_size=8)
    assert calls == [None]  # an explicit device, or no distributed sampler: not asked


@pytest.mark.gpu
@pytest.mark.skipif(not annloader_gpu.gpu_usable() or torch.cuda.device_count() < 2, reason="needs two usable GPUs")
def test_distributed_sampler_loader_uses_local_rank_gpu(monkeypatch):
    from annloader_gpu import AnnDataLoader
    from annloader_gpu.registry import setup_anndata
    from test_loader import make_adata

    monkeypatch.setenv("LOCAL_RANK", "1")
    loader = AnnDataLoader(setup_anndata(make_adata("csr")), distributed_sampler=True, num_replicas=2, rank=1)
    assert loader.device == torch.device("cuda", 1)
    assert next(iter(loader))["X"].device == torch.device("cuda", 1)



# --- re-partitioning sharded residency ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_repartition_moves_rows_between_ranks(tmp_path, nproc):
    """Every 2 epochs the ranks exchange rows (all-to-all over gloo here, NCCL on GPUs): each
    round every rank holds exactly partition_positions(..., round) and yields only those rows,
    with the right data, and the rounds together cover each row exactly once per round."""
    results = _launch(tmp_path, nproc, "repartition")
    for c in range(2):
        configs = [r["configs"][c] for r in results]
        assert all(cfg["x_ok"] for cfg in configs)
        for e in range(5):
            rounds = [cfg["rounds"][e] for cfg in configs]
            assert all(rd["round"] == e // 2 for rd in rounds)
            held = [np.array(rd["held"]) for rd in rounds]
            for rank, h in enumerate(held):
                np.testing.assert_array_equal(h, partition_positions(N_OBS, nproc, rank, SEED, e // 2))
                assert set(rounds[rank]["yielded"]) <= set(h.tolist())
            assert sorted(np.concatenate(held).tolist()) == list(range(N_OBS))
        # Round 1 really differs from round 0, and storage stays about 1/world of the data.
        assert not np.array_equal(configs[0]["rounds"][0]["held"], configs[0]["rounds"][2]["held"])
        sizes = [cfg["rounds"][4]["resident_bytes"] for cfg in configs]
        assert max(sizes) < 1.5 * min(sizes)


def test_partition_rounds_and_owners_agree():
    from annloader_gpu.repartition import owners

    for world, seed in ((2, 0), (3, 11), (5, 4)):
        for round_ in (0, 1, 7):
            owner = owners(101, world, seed, round_)
            for rank in range(world):
                np.testing.assert_array_equal(np.flatnonzero(owner == rank),
                                              partition_positions(101, world, rank, seed, round_))
    assert not np.array_equal(partition_positions(101, 2, 0, 0, 0), partition_positions(101, 2, 0, 0, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.uint8, np.int64])
def test_csr_rows_gathers_ragged_rows_in_order(dtype):
    import scipy.sparse as sp

    from annloader_gpu.repartition import _csr_rows

    m = sp.random(40, 30, density=0.2, format="csr", random_state=2, dtype=np.float64)
    m.data = np.random.default_rng(2).integers(1, 200, m.nnz).astype(np.float64)
    m.data[m.indptr[5]:m.indptr[6]] = 0  # an empty row
    m.eliminate_zeros()
    rows = np.array([5, 3, 39, 3, 0])
    lengths, indices, values = _csr_rows(torch.from_numpy(m.indptr), torch.from_numpy(m.indices.astype(np.uint16)),
                                         torch.from_numpy(m.data.astype(dtype)), torch.from_numpy(rows))
    expected = m[rows]
    np.testing.assert_array_equal(lengths.numpy(), np.diff(expected.indptr))
    np.testing.assert_array_equal(indices.numpy(), expected.indices)
    np.testing.assert_array_equal(values.numpy(), expected.data.astype(dtype))


def test_repartition_arguments_are_checked():
    from annloader_gpu.distributed import distributed_loader
    from annloader_gpu.registry import setup_anndata
    from test_loader import make_adata

    registry = setup_anndata(make_adata("csr"))
    with pytest.raises(ValueError, match="repartition_every applies to residency='sharded'"):
        distributed_loader(registry, residency="auto", repartition_every=2, num_replicas=2, rank=0, device="cpu")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="repartition_every must be a positive"):
            distributed_loader(registry, residency="sharded", repartition_every=bad, num_replicas=2, rank=0,
                               device="cpu")
    loader = distributed_loader(registry, residency="sharded", repartition_every=1, num_replicas=2, rank=1,
                                device="cpu")
    loader.set_epoch(0)  # round 0: nothing to exchange, no process group needed
    with pytest.raises(RuntimeError, match="initialise the process group"):
        loader.set_epoch(1)


@pytest.mark.gpu
@pytest.mark.skipif(not annloader_gpu.gpu_usable(), reason="needs a usable CUDA GPU")
@pytest.mark.parametrize("load_sparse_tensor", [False, True])
def test_gpu_repartition_over_nccl_keeps_the_data(tmp_path, load_sparse_tensor):
    """World 1 over NCCL: the exchange runs end to end on CUDA tensors (uint16 views, ragged CSR
    rows, all-to-all) and the re-sorted storage yields exactly what it yielded before."""
    import torch.distributed as dist

    from annloader_gpu.distributed import distributed_loader
    from annloader_gpu.registry import setup_anndata
    from test_loader import make_adata

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        registry = setup_anndata(make_adata("csr"))
        loader = distributed_loader(registry, batch_size=16, residency="sharded", repartition_every=1,
                                    device="cuda:0", load_sparse_tensor=load_sparse_tensor, shuffle=False)

        def epoch_batches(epoch):
            loader.sampler.set_epoch(epoch)
            return [{k: (v.to_dense() if v.layout != torch.strided else v).cpu() for k, v in b.items()}
                    for b in loader]

        before = epoch_batches(0)
        storage = loader.dataset.data.fields["X"].storage
        after = epoch_batches(1)
        assert loader.partition_round == 1
        assert loader.dataset.data.fields["X"].storage is not storage  # rebuilt from the exchange
        assert loader.dataset.data.fields["X"].storage.device == torch.device("cuda", 0)
        for b0, b1 in zip(before, after, strict=True):
            for key in b0:
                assert torch.equal(b0[key], b1[key]), key
    finally:
        dist.destroy_process_group()


def _exchange_in_one_process(tmp_path, backend: str, device: torch.device):
    """exchange_partition within a world of 1, from a shuffled partition: the routing is an
    identity but the re-sort is not, so rows must come back in observation order with their data."""
    import torch.distributed as dist

    from annloader_gpu.dataset import PreparedData
    from annloader_gpu.distributed import RowSubsetRegistry
    from annloader_gpu.registry import setup_anndata
    from annloader_gpu.repartition import exchange_partition
    from annloader_gpu.synthetic import make_counts_adata

    adata = make_counts_adata(300, 70, genes_per_cell=20, seed=5, n_batches=3, n_labels=4)
    adata.X.data[::7] += 300  # counts above 255: values stored as uint16, not uint8
    adata.obsm["ids"] = np.arange(300, dtype=np.int64).reshape(-1, 1)
    registry = setup_anndata(adata, batch_key="batch", labels_key="labels", obsm_keys=["ids"])
    perm = np.random.default_rng(1).permutation(300)
    prepared = PreparedData(RowSubsetRegistry(registry, perm), load_sparse_tensor=False)
    if device.type == "cuda":
        prepared = prepared.to(device)
    assert str(prepared.fields["X"].storage.values.dtype).endswith("uint16")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            **kwargs)
    try:
        fields, held = exchange_partition(prepared, perm, np.zeros(300, dtype=np.int64), np.arange(300), device)
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(held, np.arange(300))
    exchanged = PreparedData(registry, _fields=fields, _n_obs=300)
    rows = np.arange(300, dtype=np.int64)
    got = exchanged.fetch(torch.from_numpy(rows).to(device) if device.type == "cuda" else rows)
    expected = PreparedData(registry).fetch(rows)
    for key in expected:
        assert torch.equal(got[key].cpu(), expected[key]), key


def test_exchange_resorts_rows_and_keeps_their_data(tmp_path):
    _exchange_in_one_process(tmp_path, "gloo", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not annloader_gpu.gpu_usable(), reason="needs a usable CUDA GPU")
def test_gpu_exchange_resorts_rows_and_keeps_their_data(tmp_path):
    _exchange_in_one_process(tmp_path, "nccl", torch.device("cuda", 0))


def test_csr_rows_in_small_chunks_equal_one_chunk():
    import scipy.sparse as sp

    from annloader_gpu.repartition import _csr_rows

    m = sp.random(200, 50, density=0.1, format="csr", random_state=8, dtype=np.float64)
    m.data = np.random.default_rng(8).integers(1, 60000, m.nnz).astype(np.float64)
    rows = torch.from_numpy(np.random.default_rng(9).integers(0, 200, 333))
    arrays = (torch.from_numpy(m.indptr), torch.from_numpy(m.indices.astype(np.uint16)),
              torch.from_numpy(m.data.astype(np.uint16)))
    whole = _csr_rows(*arrays, rows)
    for chunk in (1, 7, 100):
        parts = _csr_rows(*arrays, rows, chunk_entries=chunk)
        for a, b in zip(whole, parts, strict=True):
            assert torch.equal(a, b)
    expected = m[rows.numpy()]
    np.testing.assert_array_equal(whole[2].numpy(), expected.data.astype(np.uint16))


def test_sharded_batches_are_slices_of_one_epoch_mapping():
    """The sharded loader maps its epoch once (one upload per epoch on a GPU), and its batches
    are still the sharded sampler's."""
    from annloader_gpu.distributed import distributed_loader
    from annloader_gpu.registry import setup_anndata
    from test_loader import make_adata

    registry = setup_anndata(make_adata("csr"))
    loader = distributed_loader(registry, residency="sharded", num_replicas=3, rank=1, device="cpu", batch_size=9,
                                seed=3)
    loader.sampler.set_epoch(4)
    iterator = iter(loader)
    batches = list(iterator)
    assert iterator._source.rows_ready
    positions = list(loader.sharded_sampler)
    assert len(batches) == len(positions) == len(loader)
    x = loader.dataset.data.fields["X"].storage
    dense = np.zeros((x.n_rows, x.n_cols), dtype=np.float32)
    indptr = np.asarray(x.indptr, dtype=np.int64)
    for r in range(x.n_rows):
        dense[r, np.asarray(x.indices[indptr[r]:indptr[r + 1]], dtype=np.int64)] = x.values[indptr[r]:indptr[r + 1]]
    for batch, pos in zip(batches, positions):
        assert torch.equal(batch["X"], torch.from_numpy(dense[loader.dataset.rows(pos)]))
