"""One rank of the distributed tests; run by tests/test_distributed.py under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/_ddp_worker.py \
        --out DIR --mode loader|lightning [--n-obs 1001 --batch-size 64 --epochs 2]

Writes ``DIR/rank{R}.json`` with what this rank saw; the test compares it with scvi-tools'
``BatchDistributedSampler`` computed in the test process.

``--mode loader``: for every (layout, drop_last, drop_dataset_tail), the global row ids of
every batch of every epoch, with X checked against the reference rows (scipy slicing of the
original matrix) and, for the sharded layout, what the rank holds.

``--mode lightning``: a tiny LightningModule fitted with ``Trainer(strategy="ddp")`` on our
distributed loader, under ``use_distributed_sampler`` True and False; records the loader and
sampler Lightning used, the ids of every batch and the warnings raised.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import annloader_gpu
from annloader_gpu.distributed import distributed_loader, init_distributed, local_device, world_info
from annloader_gpu.registry import setup_anndata
from annloader_gpu.synthetic import make_counts_adata


def make_data(n_obs: int):
    adata = make_counts_adata(n_obs, 257, genes_per_cell=40, seed=7, n_batches=3, n_labels=4)
    adata.obsm["ids"] = np.arange(n_obs, dtype=np.int64).reshape(-1, 1)
    registry = setup_anndata(adata, batch_key="batch", labels_key="labels", obsm_keys=["ids"])
    keys = {"X": np.float32, "batch": np.int64, "labels": np.int64, "ids": np.int64}
    return adata, registry, keys


def storage_bytes_bound(full_loader, m: int, x_nnz: int) -> int:
    """Bytes m rows (x_nnz non-zeros of X) take with the full loader's storage dtypes."""
    total = 0
    for field in full_loader.dataset.data.fields.values():
        s = field.storage
        if s.kind == "csr":
            total += (m + 1) * s.indptr.itemsize + x_nnz * (s.indices.itemsize + s.values.itemsize)
        else:
            total += m * s.n_cols * s.values.itemsize
    return total


def run_loader(args, world: int, rank: int) -> dict:
    adata, registry, keys = make_data(args.n_obs)
    X = adata.X.tocsr()
    out = {"configs": []}
    full = None
    for layout, drop_last, drop_tail in itertools.product(("replicated", "sharded"), (False, True), (False, True)):
        residency = "sharded" if layout == "sharded" else "auto"
        loader = distributed_loader(
            registry, batch_size=args.batch_size, shuffle=True, drop_last=drop_last,
            drop_dataset_tail=drop_tail, residency=residency, seed=args.seed, data_and_attributes=keys,
        )
        if full is None:
            full = loader
        rec = {
            "layout": layout, "drop_last": drop_last, "drop_dataset_tail": drop_tail,
            "len": len(loader), "device": str(loader.device), "epochs": [], "x_ok": True,
        }
        for epoch in range(args.epochs):
            loader.sampler.set_epoch(epoch)
            batches = []
            for batch in loader:
                ids = batch["ids"].reshape(-1).numpy()
                ref = torch.from_numpy(X[ids].toarray())
                if not torch.equal(batch["X"].cpu(), ref):
                    rec["x_ok"] = False
                batches.append(ids.tolist())
            rec["epochs"].append(batches)
        if layout == "sharded":
            storage = loader.dataset.data.fields["X"].storage
            part = loader.partition
            part_nnz = int(X[part].nnz)
            rec.update(
                partition=part.tolist(),
                x_rows=int(storage.n_rows),
                x_nnz=int(storage.nnz),
                partition_nnz=part_nnz,
                resident_bytes=int(loader.resident_bytes),
                bytes_bound=storage_bytes_bound(full, len(part), part_nnz),
                full_bytes=int(full.resident_bytes),
            )
        out["configs"].append(rec)
    return out


def run_lightning(args, world: int, rank: int) -> dict:
    import lightning.pytorch as pl

    adata, registry, keys = make_data(args.n_obs)
    out = {"runs": []}

    class Tiny(pl.LightningModule):
        def __init__(self, sharded: bool):
            super().__init__()
            self.lin = torch.nn.Linear(adata.n_vars, 1)
            self.sharded = sharded
            self.seen: list[list[list[int]]] = []
            self.loader = None

        def train_dataloader(self):
            # Built here, after Lightning initialised the process group: rank/world come from it.
            self.loader = distributed_loader(
                registry, batch_size=args.batch_size, shuffle=True,
                residency="sharded" if self.sharded else "auto", seed=args.seed, data_and_attributes=keys,
            )
            return self.loader

        def on_train_epoch_start(self):
            self.seen.append([])

        def training_step(self, batch, batch_idx):
            self.seen[-1].append(batch["ids"].reshape(-1).tolist())
            return self.lin(torch.log1p(batch["X"])).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for use_ds, sharded in ((False, False), (True, False), (False, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = Tiny(sharded)
            trainer = pl.Trainer(
                strategy="ddp", accelerator="cpu", devices=world, num_nodes=1, max_epochs=args.epochs,
                use_distributed_sampler=use_ds, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            )
            trainer.fit(model)
        used = trainer.train_dataloader
        sampler = used.sampler
        out["runs"].append({
            "use_distributed_sampler": use_ds,
            "sharded": sharded,
            "same_loader": used is model.loader,
            "loader_type": type(used).__name__,
            "sampler_type": type(sampler).__name__,
            "sampler_epoch": int(getattr(sampler, "epoch", -1)),
            "len": len(model.loader),
            "epochs": model.seen,
            "warnings": [{"text": f"{w.category.__name__}: {w.message}",
                          "deprecation": issubclass(w.category, (DeprecationWarning, FutureWarning)),
                          "ours": "annloader_gpu" in os.path.normpath(w.filename).split(os.sep)}
                         for w in caught],
        })
    return out


def run_repartition(args, world: int, rank: int) -> dict:
    """Sharded loaders re-partitioned every 2 epochs (dense and sparse X): per round, the ids this
    rank holds and yields, with X and batch checked against the original rows, and the bytes held."""
    adata, registry, keys = make_data(args.n_obs)
    batch_codes = np.asarray(registry.get_from_registry("batch")).reshape(-1)
    out = {"configs": []}
    for sparse in (False, True):
        loader = distributed_loader(registry, batch_size=args.batch_size, residency="sharded", seed=args.seed,
                                    repartition_every=2, data_and_attributes=keys, load_sparse_tensor=sparse)
        rec = {"sparse": sparse, "rounds": [], "x_ok": True}
        for epoch in range(5):
            # Dense X: the loader's set_epoch; sparse X: the sampler's, as Lightning calls it.
            (loader.sampler if sparse else loader).set_epoch(epoch)
            seen = []
            for batch in loader:
                ids = batch["ids"].reshape(-1).numpy()
                x = batch["X"].to_dense() if sparse else batch["X"]
                if not torch.equal(x, torch.from_numpy(adata.X[ids].toarray())) or not np.array_equal(
                        batch["batch"].reshape(-1).numpy(), batch_codes[ids]):
                    rec["x_ok"] = False
                seen.append(ids)
            rec["rounds"].append({"epoch": epoch, "round": loader.partition_round,
                                  "held": loader.partition.tolist(),
                                  "yielded": np.concatenate(seen).tolist(),
                                  "resident_bytes": loader.resident_bytes})
        out["configs"].append(rec)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("loader", "lightning", "repartition"), default="loader")
    parser.add_argument("--n-obs", type=int, default=1001)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    annloader_gpu.set_num_threads(1)
    torch.set_num_threads(1)
    out_dir = Path(args.out)
    env_world, env_rank, _ = world_info()
    result: dict = {"rank": env_rank, "local_device": str(local_device())}
    try:
        if args.mode in ("loader", "repartition"):
            init_distributed()  # gloo on the CPU, nccl on GPUs
            world, rank, local = world_info()
            result.update(world=world, rank=rank, local_rank=local, backend=dist.get_backend())
            result.update((run_loader if args.mode == "loader" else run_repartition)(args, world, rank))
            dist.barrier()
            dist.destroy_process_group()
        else:
            result.update(world=env_world, rank=env_rank)
            result.update(run_lightning(args, env_world, env_rank))
        result["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test, which prints it
        result["ok"] = False
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr, flush=True)
    (out_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
