"""SCVI epoch time with scvi-tools' own loader vs annloader_gpu's, on the same data and seed.

For each loader: train a fresh SCVI (same seed, so same split, batch order and losses) for
``--epochs`` epochs and time every training epoch (no validation pass: scvi-tools' default);
then time one pure pass of the same training loader (the batches only, no model): the loader's
share of an epoch is ``loader pass / epoch``. Runs alternate between the loaders (``--repeats``)
and the minimum over repeats is reported, which damps noise from other work on the machine.

    python benchmarks/bench_scvi_epoch.py                              # 20,000 x 2,000, CPU
    python benchmarks/bench_scvi_epoch.py --accelerator gpu --json out.json

On a GPU (annloader_gpu built with CUDA), our loader keeps the data in GPU memory and yields
batches there; the goal is that loading vanishes from the epoch (GPU busy >= 95% of it).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import annloader_gpu
from annloader_gpu import scvi_integration
from annloader_gpu.synthetic import make_counts_adata


class EpochTimer(Callback):
    """Wall-clock seconds of each training epoch (synchronising the GPU at both ends)."""

    def __init__(self):
        self.seconds: list[float] = []

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)


def _model(adata, n_latent: int):
    scvi.settings.seed = 0
    ad = adata.copy()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    return scvi.model.SCVI(ad, n_latent=n_latent)


def train_epochs(adata, loader: str, args) -> tuple[list[float], np.ndarray, str]:
    model = _model(adata, args.n_latent)
    timer = EpochTimer()
    kwargs = dict(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        devices=1,
        enable_progress_bar=False,
        callbacks=[timer],
        log_every_n_steps=10,
    )
    if loader == "annloader_gpu":
        scvi_integration.train(model, **kwargs)
    else:
        model.train(**kwargs)
    losses = model.history["train_loss"].to_numpy(dtype=np.float64).ravel()
    return timer.seconds, losses, str(model.device)


def loader_pass(adata, loader: str, args, device: str) -> float:
    """Seconds for one pass over the training batches, as the trainer would see them."""
    model = _model(adata, args.n_latent)
    if loader == "annloader_gpu":
        dm = scvi_integration.make_datamodule(model, batch_size=args.batch_size, device=device)
    else:
        dm = scvi.dataloaders.DataSplitter(model.adata_manager, batch_size=args.batch_size)
    dm.setup()
    dl = dm.train_dataloader()
    target = torch.device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(2):  # first pass warms caches (and, for ours, prepares the data)
        sync()
        t0 = time.perf_counter()
        for batch in dl:
            # The trainer moves every batch to the training device; a no-op when it is already there.
            for v in batch.values():
                v.to(target, non_blocking=True)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=20_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--genes-per-cell", type=float, default=500)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", message="The '(train|val|test)_dataloader' does not have many workers")
    for name in ("lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)

    t0 = time.perf_counter()
    adata = make_counts_adata(args.n_obs, args.n_vars, genes_per_cell=args.genes_per_cell, seed=0)
    print(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes, {adata.X.nnz:,} non-zeros "
        f"({time.perf_counter() - t0:.1f} s to generate); torch threads {torch.get_num_threads()}, "
        f"annloader_gpu threads {annloader_gpu.get_num_threads()}",
        flush=True,
    )

    loaders = ["scvi-tools", "annloader_gpu"]
    epochs = {name: [] for name in loaders}
    losses, devices = {}, {}
    for r in range(args.repeats):
        for name in loaders if r % 2 == 0 else loaders[::-1]:
            seconds, loss, device = train_epochs(adata, name, args)
            epochs[name].extend(seconds)
            losses[name], devices[name] = loss, device
            print(f"  repeat {r}: {name:14s} epochs {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
    passes = {name: loader_pass(adata, name, args, devices[name]) for name in loaders}

    rows = []
    for name in loaders:
        epoch = min(epochs[name])
        rows.append(
            {
                "loader": name,
                "epoch_s_min": epoch,
                "epoch_s_median": float(np.median(epochs[name])),
                "loader_pass_s": passes[name],
                "loading_share": passes[name] / epoch,
                "final_train_loss": float(losses[name][-1]),
            }
        )
    stock, ours = rows
    speedup = stock["epoch_s_min"] / ours["epoch_s_min"]
    loss_diff = float(np.max(np.abs(losses["scvi-tools"] - losses["annloader_gpu"])))

    print(f"\n{'loader':14s} {'epoch (min)':>12s} {'epoch (med)':>12s} {'loader pass':>12s} {'loading share':>14s}")
    for row in rows:
        print(
            f"{row['loader']:14s} {row['epoch_s_min']:11.2f}s {row['epoch_s_median']:11.2f}s "
            f"{row['loader_pass_s']:11.2f}s {100 * row['loading_share']:13.1f}%"
        )
    print(f"epoch speed-up (stock / ours): {speedup:.2f}x; max |train_loss difference|: {loss_diff:.3g}")

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "scvi": scvi.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "args": vars(args),
        "nnz": int(adata.X.nnz),
        "devices": devices,
        "results": rows,
        "speedup": speedup,
        "max_train_loss_difference": loss_diff,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
