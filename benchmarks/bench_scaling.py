"""Multi-process scaling of annloader_gpu under torchrun: cells/s per rank and in total.

    python benchmarks/bench_scaling.py --procs 1 2 [--layout replicated sharded] [--json out.json]

For each process count N this launches ``torchrun --standalone --nproc_per_node=N`` on this
file (``--worker``). Every rank builds :func:`annloader_gpu.distributed.distributed_loader`
(``distributed_sampler=True``) on its own device — ``cuda:LOCAL_RANK`` when GPUs are usable,
else the CPU with ``annloader_gpu.set_num_threads(cores // N)`` — then, after a warm-up epoch
and a barrier, times ``--epochs`` epochs of pure loading (each batch's X is consumed by a
reduction so GPU work is waited for). Per-rank cells/s = cells it yielded / its time; total =
all cells / the slowest rank's time; efficiency = total(N) / (N * total(1)).

On the CPU, ranks share the machine's cores and memory bandwidth, so total throughput is
bounded by the cores, not by the number of processes: do not expect linear scaling there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import annloader_gpu
    from annloader_gpu.distributed import distributed_loader, init_distributed, world_info
    from annloader_gpu.registry import setup_anndata
    from annloader_gpu.synthetic import make_counts_adata

    device = init_distributed()
    world, rank, _ = world_info()
    if device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // world)
        annloader_gpu.set_num_threads(threads)
        torch.set_num_threads(threads)
    adata = make_counts_adata(args.n_obs, args.n_vars, genes_per_cell=args.genes_per_cell, seed=0)
    registry = setup_anndata(adata, batch_key="batch", labels_key="labels")
    results = {}
    for layout in args.layout:
        loader = distributed_loader(
            registry, batch_size=args.batch_size, shuffle=True, drop_last=True, device=device,
            residency="sharded" if layout == "sharded" else "auto", seed=0,
        )

        def epoch(e: int) -> int:
            loader.sampler.set_epoch(e)
            cells, acc = 0, torch.zeros((), device=device)
            for batch in loader:
                acc += batch["X"][:, 0].sum()
                cells += batch["X"].shape[0]
            acc.item()  # waits for the device
            return cells

        epoch(0)  # warm-up
        dist.barrier()
        start = time.perf_counter()
        cells = sum(epoch(1 + e) for e in range(args.epochs))
        elapsed = time.perf_counter() - start
        mine = torch.tensor([cells, elapsed], dtype=torch.float64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        per_rank = [(int(t[0].item()), float(t[1].item())) for t in everyone]
        results[layout] = {
            "residency": "sharded" if layout == "sharded" else loader.residency,
            "resident_bytes_rank0": int(loader.resident_bytes),
            "per_rank_cells_per_s": [c / s for c, s in per_rank],
            "total_cells_per_s": sum(c for c, _ in per_rank) / max(s for _, s in per_rank),
        }
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "device": str(device), "results": results}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layout", nargs="+", choices=("replicated", "sharded"), default=["replicated", "sharded"])
    parser.add_argument("--n-obs", type=int, default=40_000)
    parser.add_argument("--n-vars", type=int, default=10_000)
    parser.add_argument("--genes-per-cell", type=float, default=1_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    common = ["--n-obs", str(args.n_obs), "--n-vars", str(args.n_vars), "--genes-per-cell", str(args.genes_per_cell),
              "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--layout", *args.layout]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.procs:
            out = Path(tmp) / f"n{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--worker", "--out", str(out), *common]
            subprocess.run(cmd, check=True, timeout=1800)
            runs.append(json.loads(out.read_text()))
    base = {layout: runs[0]["results"][layout]["total_cells_per_s"] for layout in args.layout} if runs else {}
    print(f"{'procs':>5} {'layout':>10} {'device':>7} {'residency':>9} {'per-rank cells/s':>28} {'total cells/s':>14} "
          f"{'efficiency':>10}")
    for run in runs:
        for layout, r in run["results"].items():
            eff = r["total_cells_per_s"] / (run["world"] * base[layout]) if args.procs[0] == 1 else float("nan")
            r["efficiency_vs_1"] = eff
            per = ", ".join(f"{v:,.0f}" for v in r["per_rank_cells_per_s"])
            print(f"{run['world']:>5} {layout:>10} {run['device']:>7} {r['residency']:>9} {per:>28} "
                  f"{r['total_cells_per_s']:>14,.0f} {eff:>10.0%}")
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
                "argv": sys.argv, "runs": runs}
        Path(args.json).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
