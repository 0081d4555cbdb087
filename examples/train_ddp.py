"""Train a small linear VAE on counts with DistributedDataParallel and annloader_gpu.

One process per device, launched by torchrun; the backend follows the device (NCCL on GPUs,
gloo on the CPU):

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --epochs 2          # CPU or GPUs
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py --sharded --h5ad big.h5ad

Each rank builds its loader with ``distributed_sampler=True`` (through
:func:`annloader_gpu.distributed.distributed_loader`, which also picks ``cuda:LOCAL_RANK``);
``--sharded`` makes each rank hold only its 1/world partition of the rows, and
``--repartition-every N`` moves the ranks to a new partition every N epochs (rows exchanged
device to device). Rank 0 prints the
per-epoch loss (averaged over all ranks' batches) and throughput.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import annloader_gpu
from annloader_gpu.distributed import distributed_loader, init_distributed, world_info
from annloader_gpu.registry import setup_anndata


class LinearVAE(nn.Module):
    """Linear encoder on log1p counts; linear decoder to gene frequencies; Poisson likelihood."""

    def __init__(self, n_vars: int, n_latent: int = 10):
        super().__init__()
        self.encoder = nn.Linear(n_vars, 2 * n_latent)
        self.decoder = nn.Linear(n_latent, n_vars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per cell, averaged over the batch."""
        mean, log_var = self.encoder(torch.log1p(x)).chunk(2, dim=-1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        library = x.sum(-1, keepdim=True)
        rate = torch.softmax(self.decoder(z), dim=-1) * library
        recon = -torch.distributions.Poisson(rate + 1e-8).log_prob(x).sum(-1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        return (recon + kl).mean()


def load_data(args):
    if args.h5ad:
        import anndata

        adata = anndata.read_h5ad(args.h5ad)
    else:
        from annloader_gpu.synthetic import make_counts_adata

        adata = make_counts_adata(args.n_obs, args.n_vars, genes_per_cell=args.genes_per_cell, seed=0)
    return adata, setup_anndata(adata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--latent", type=int, default=10)
    parser.add_argument("--n-obs", type=int, default=20_000)
    parser.add_argument("--n-vars", type=int, default=2_000)
    parser.add_argument("--genes-per-cell", type=float, default=300)
    parser.add_argument("--h5ad", default=None, help="train on this file instead of synthetic counts")
    parser.add_argument("--sharded", action="store_true", help="each rank holds only its partition of the rows")
    parser.add_argument("--repartition-every", type=int, default=None,
                        help="with --sharded: move to a new partition every N epochs (rows exchanged device to device)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = init_distributed()  # cuda:LOCAL_RANK + NCCL, or CPU + gloo
    world, rank, _local = world_info()
    if device.type == "cpu":  # share the cores between the ranks on one machine
        import os

        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        annloader_gpu.set_num_threads(threads)
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed + rank)

    adata, registry = load_data(args)
    loader = distributed_loader(
        registry, batch_size=args.batch_size, shuffle=True, drop_last=True,
        residency="sharded" if args.sharded else "auto", device=device, seed=args.seed,
        data_and_attributes=["X"], **({"repartition_every": args.repartition_every} if args.sharded else {}),
    )
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = LinearVAE(adata.n_vars, args.latent).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    if rank == 0:
        print(f"world={world} backend={dist.get_backend()} device={device} cells={adata.n_obs} genes={adata.n_vars} "
              f"batches/rank/epoch={len(loader)} residency={'sharded' if args.sharded else loader.residency}",
              flush=True)

    for epoch in range(args.epochs):
        # Reshuffles; with --repartition-every, a sharded loader also re-partitions here (every
        # rank calls it, as DDP training loops and Lightning do).
        loader.sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, batches
        cells = 0
        start = time.perf_counter()
        for batch in loader:
            x = batch["X"]
            loss = ddp(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
            cells += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: loss {total[0].item() / total[1].item():.3f}  "
                  f"({cells * world / elapsed:,.0f} cells/s total incl. training)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
