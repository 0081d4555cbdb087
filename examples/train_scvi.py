"""Train scvi-tools' SCVI with annloader_gpu loading the minibatches.

Runs on a CPU in seconds (small synthetic data); on a machine with a GPU and annloader_gpu's
CUDA kernels, the same script keeps the data on the GPU and trains there.

    python examples/train_scvi.py                 # ours
    python examples/train_scvi.py --compare       # ours, then scvi-tools' own loader, same seed
    python examples/train_scvi.py --n-obs 20000 --n-vars 2000 --epochs 5

Needs scvi-tools (pip install 'annloader_gpu[scvi]').
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import scvi
from lightning.pytorch.callbacks import Callback

from annloader_gpu import scvi_integration
from annloader_gpu.synthetic import make_counts_adata


class EpochTimer(Callback):
    """Wall-clock seconds of each training epoch."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t0)


def train_once(adata, *, ours: bool, epochs: int, batch_size: int, accelerator: str):
    scvi.settings.seed = 0
    ad = adata.copy()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi.model.SCVI(ad, n_latent=10)
    timer = EpochTimer()
    kwargs = dict(
        max_epochs=epochs,
        batch_size=batch_size,
        accelerator=accelerator,
        devices=1,
        check_val_every_n_epoch=1,  # log a validation loss each epoch
        enable_progress_bar=False,
        log_every_n_steps=1,
        callbacks=[timer],
    )
    if ours:
        # Same split arguments and defaults as model.train(); the split itself is scvi-tools'.
        scvi_integration.train(model, **kwargs)
        # Equivalent, with the data module spelled out:
        #   dm = scvi_integration.AnnLoaderDataModule(model.adata_manager, batch_size=batch_size)
        #   model.train(datamodule=dm, max_epochs=epochs, ...)
    else:
        model.train(**kwargs)
    return model, timer.seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=1000)
    parser.add_argument("--n-vars", type=int, default=300)
    parser.add_argument("--genes-per-cell", type=float, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--compare", action="store_true", help="also train with scvi-tools' own loader")
    args = parser.parse_args(argv)

    # Lightning's advice about DataLoader workers does not apply (ours gathers in-process).
    warnings.filterwarnings("ignore", message="The '(train|val|test)_dataloader' does not have many workers")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    adata = make_counts_adata(args.n_obs, args.n_vars, genes_per_cell=args.genes_per_cell, seed=0)
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes, {adata.X.nnz:,} non-zeros")

    runs = [("annloader_gpu", True)] + ([("scvi-tools", False)] if args.compare else [])
    models = {}
    for name, ours in runs:
        model, seconds = train_once(
            adata, ours=ours, epochs=args.epochs, batch_size=args.batch_size, accelerator=args.accelerator
        )
        models[name] = model
        train_loss = model.history["train_loss"].to_numpy().ravel()
        val_loss = model.history["validation_loss"].to_numpy().ravel()
        print(f"\n{name} loader (training on {model.device}):")
        print("  epoch  train_loss  validation_loss  seconds")
        for epoch, (tl, vl, s) in enumerate(zip(train_loss, val_loss, seconds)):
            print(f"  {epoch:5d}  {tl:10.4f}  {vl:15.4f}  {s:7.3f}")

    model = models["annloader_gpu"]
    z = model.get_latent_representation(dataloader=scvi_integration.inference_loader(model))
    print(f"\nlatent representation (our loader): {z.shape}")
    if args.compare:
        a = models["annloader_gpu"].history["train_loss"].to_numpy().ravel()
        b = models["scvi-tools"].history["train_loss"].to_numpy().ravel()
        print(f"max |train_loss difference| between the loaders: {np.max(np.abs(a - b)):.3g}")


if __name__ == "__main__":
    main()
