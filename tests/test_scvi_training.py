"""Training scvi-tools models with annloader_gpu loading the data (annloader_gpu.scvi_integration).

Each comparison trains the same model twice on the same data from the same
``scvi.settings.seed``: once with scvi-tools' own ``model.train()`` (its DataSplitter and
AnnDataLoader) and once through ``annloader_gpu.scvi_integration.train`` (our data module and
loader). Both runs see

* the same split: our data module *is* scvi-tools' DataSplitter (only the loader class differs);
* the same batch order: our loader draws from torch's global RNG exactly as torch's DataLoader
  does (base seed, then RandomSampler's seed), so the permutation is the same, and the model's own
  random draws (dropout, reparameterisation) then happen in the same RNG state;
* the same initial weights (module built after the same seed) and the same float32 batches
  (counts are integers, exactly representable).

So on the CPU the per-epoch losses are expected to be bit-identical, and they are. The asserted
tolerance, ``rtol=1e-6`` (about 8 float32 ulps), only leaves room for a future change that
reorders a floating-point sum (e.g. a different intra-op thread split); a loader that changed the
batch order, the split or a single value would move the epoch losses by far more (~1e-3 and up).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

scvi = pytest.importorskip("scvi")

from annloader_gpu import scvi_integration as si  # noqa: E402
from annloader_gpu.loader import AnnDataLoader  # noqa: E402
from annloader_gpu.synthetic import make_counts_adata  # noqa: E402

pytestmark = [
    pytest.mark.scvi,
    # Lightning's advice for DataLoaders with num_workers=0 (ours gathers in-process by design;
    # scvi-tools' loader triggers it too).
    pytest.mark.filterwarnings("ignore:The '(train|val|test)_dataloader' does not have many workers:UserWarning"),
    # Lightning, when the Trainer's default logger is the in-memory one scvi-tools installs.
    pytest.mark.filterwarnings("ignore:Starting from v1.9.0, `tensorboardX` has been removed:UserWarning"),
]

RTOL = 1e-6
N_OBS, N_VARS, EPOCHS = 600, 200, 2
TRAIN_KW = dict(
    max_epochs=EPOCHS,
    accelerator="cpu",
    devices=1,
    check_val_every_n_epoch=1,
    log_every_n_steps=1,  # fewer batches than the default 10 would warn
    num_sanity_val_steps=0,
    enable_progress_bar=False,
)
LOSS_KEYS = ("train_loss", "elbo_train", "validation_loss", "elbo_validation")


@pytest.fixture(scope="module")
def adata():
    a = make_counts_adata(N_OBS, N_VARS, genes_per_cell=60, n_batches=3, n_labels=4, seed=7)
    # SCANVI: about a third of the cells unlabelled.
    labels = a.obs["labels"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(N_OBS) < 0.35] = "Unknown"
    a.obs["labels_semi"] = labels
    return a


def _scvi_model(adata):
    scvi.settings.seed = 0
    ad = adata.copy()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    return scvi.model.SCVI(ad, n_latent=5, n_hidden=32)


def _scanvi_model(adata):
    scvi.settings.seed = 0
    ad = adata.copy()
    scvi.model.SCANVI.setup_anndata(ad, labels_key="labels_semi", unlabeled_category="Unknown", batch_key="batch")
    return scvi.model.SCANVI(ad, n_latent=5, n_hidden=32)


@pytest.fixture(scope="module")
def scvi_pair(adata):
    stock = _scvi_model(adata)
    stock.train(**TRAIN_KW)
    ours = _scvi_model(adata)
    si.train(ours, **TRAIN_KW)
    return stock, ours


def _losses(model, key):
    return model.history[key].to_numpy(dtype=np.float64).ravel()


def test_scvi_training_matches_stock(scvi_pair):
    stock, ours = scvi_pair
    assert isinstance(ours.trainer.train_dataloader, AnnDataLoader)
    np.testing.assert_array_equal(ours.train_indices, stock.train_indices)
    np.testing.assert_array_equal(ours.validation_indices, stock.validation_indices)
    np.testing.assert_array_equal(ours.test_indices, stock.test_indices)
    for key in LOSS_KEYS:
        got, want = _losses(ours, key), _losses(stock, key)
        assert len(got) == EPOCHS, (key, got)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=key)
    # Training did something: the loss goes down.
    assert _losses(ours, "train_loss")[-1] < _losses(ours, "train_loss")[0]


def test_inference_with_our_loader_matches_stock(scvi_pair):
    _stock, model = scvi_pair
    z_stock = model.get_latent_representation()
    z_ours = model.get_latent_representation(dataloader=si.inference_loader(model, batch_size=64))
    assert z_ours.shape == z_stock.shape == (N_OBS, 5)
    np.testing.assert_allclose(z_ours, z_stock, rtol=1e-5, atol=1e-6)

    idx = np.random.default_rng(1).permutation(N_OBS)[:150]
    np.testing.assert_allclose(
        model.get_latent_representation(dataloader=si.inference_loader(model, indices=idx)),
        model.get_latent_representation(indices=idx),
        rtol=1e-5,
        atol=1e-6,
    )

    # get_normalized_expression samples z: the same torch seed gives the same draws.
    scvi.settings.seed = 3
    e_stock = model.get_normalized_expression(indices=idx, return_numpy=True)
    scvi.settings.seed = 3
    e_ours = model.get_normalized_expression(dataloader=si.inference_loader(model, indices=idx))
    assert e_ours.shape == (150, N_VARS)
    np.testing.assert_allclose(e_ours, e_stock, rtol=1e-5, atol=1e-9)

    scvi.settings.seed = 4
    elbo_stock = model.get_elbo()
    scvi.settings.seed = 4
    elbo_ours = model.get_elbo(dataloader=si.inference_loader(model))
    np.testing.assert_allclose(elbo_ours, elbo_stock, rtol=1e-6)


@pytest.mark.parametrize(
    "split",
    [
        {},
        {"train_size": 0.8, "validation_size": 0.1},
        {"train_size": 0.7, "shuffle_set_split": False, "batch_size": 64},
        {"validation_size": 0.05},
    ],
    ids=["defaults", "with-test-set", "sequential", "val-only"],
)
def test_split_is_datasplitter_split(adata, split):
    model = _scvi_model(adata)
    ours = si.make_datamodule(model, **split)
    stock = scvi.dataloaders.DataSplitter(
        model.adata_manager,
        **{"batch_size": 128, **{k: v for k, v in split.items()}},
    )
    ours.setup()
    stock.setup()
    for name in ("train_idx", "val_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(stock, name), err_msg=name)
    assert (ours.n_train, ours.n_val) == (stock.n_train, stock.n_val)
    loader = ours.train_dataloader()
    assert isinstance(loader, AnnDataLoader)
    assert loader.device.type == "cpu"  # no trainer attached, no usable GPU here
    batch = next(iter(loader))
    assert set(batch) == {"X", "batch", "labels"}


def test_datamodule_passed_to_model_train(adata):
    """The plain extension point: model.train(datamodule=AnnLoaderDataModule(...))."""
    model = _scvi_model(adata)
    dm = si.AnnLoaderDataModule(model.adata_manager, train_size=0.9, batch_size=100)
    model.train(datamodule=dm, max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, log_every_n_steps=1)
    assert model.is_trained
    assert len(model.history["train_loss"]) == 1
    assert np.isfinite(_losses(model, "train_loss")).all()
    np.testing.assert_array_equal(model.train_indices, dm.train_idx)


def test_scanvi_training_matches_stock(adata):
    stock = _scanvi_model(adata)
    stock.train(**TRAIN_KW)
    ours = _scanvi_model(adata)
    si.train(ours, **TRAIN_KW)
    assert isinstance(ours.trainer.train_dataloader, si.SemiSupervisedAnnDataLoader)
    np.testing.assert_array_equal(ours.train_indices, stock.train_indices)
    np.testing.assert_array_equal(ours.validation_indices, stock.validation_indices)
    for key in LOSS_KEYS:
        got, want = _losses(ours, key), _losses(stock, key)
        assert len(got) == EPOCHS, (key, got)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=key)
    idx = np.arange(0, N_OBS, 3)
    np.testing.assert_array_equal(
        ours.predict(dataloader=si.inference_loader(ours, indices=idx)), stock.predict(indices=idx)
    )


def test_make_datamodule_rejects_mismatched_options(adata):
    model = _scvi_model(adata)
    with pytest.raises(ValueError, match="n_samples_per_label"):
        si.make_datamodule(model, n_samples_per_label=10)
    with pytest.raises(TypeError, match="datamodule"):
        si.train(model, datamodule=object())


def test_package_import_does_not_import_scvi():
    code = "import sys, annloader_gpu, annloader_gpu.loader; assert 'scvi' not in sys.modules, 'scvi imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clear_error_without_scvi():
    code = (
        "import sys; sys.modules['scvi'] = None\n"
        "try:\n    import annloader_gpu.scvi_integration\n"
        "except ImportError as e:\n    assert 'pip install' in str(e) and 'scvi-tools' in str(e), e\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
