"""Train and run scvi-tools models with annloader_gpu doing the loading.

scvi-tools is optional for annloader_gpu: ``import annloader_gpu`` never imports it, and this
module is the only place that does (importing it without scvi-tools raises an ImportError
saying what to install).

Extension points used — all public in scvi-tools 1.4, nothing is patched:

* ``model.train(datamodule=...)``. :class:`AnnLoaderDataModule` is a
  ``scvi.dataloaders.DataSplitter`` whose ``data_loader_cls`` (a public class attribute) is
  :class:`annloader_gpu.loader.AnnDataLoader`. The train/validation/test split is therefore
  computed by scvi-tools' own code (``DataSplitter.__init__``/``setup``: ``train_size``,
  ``validation_size``, ``shuffle_set_split``, ``scvi.settings.seed``, the "move a tiny last
  batch to validation" rule) and is identical, index for index, to what ``model.train()`` uses.
  For semi-supervised models (SCANVI) :class:`SemiSupervisedAnnLoaderDataModule` does the same on
  top of ``scvi.dataloaders.SemiSupervisedDataSplitter``, with :class:`SemiSupervisedAnnDataLoader`
  (the labelled/full pairing of scvi's ``SemiSupervisedDataLoader``) built from our loader.
* ``dataloader=`` of the inference methods (``get_latent_representation``,
  ``get_normalized_expression``, ``get_elbo``, ``get_reconstruction_error``,
  ``get_marginal_ll``, SCANVI's ``predict``): :func:`inference_loader` builds our loader over the
  model's registered data, in the order scvi-tools would use.

:func:`train` wraps both: it reads the model's own ``train()`` defaults (SCVI splits with
``train_size=None``, SCANVI with ``train_size=0.9``), builds the matching data module and calls
``model.train(datamodule=...)``.

What scvi-tools does differently when a ``datamodule`` is passed (scvi-tools 1.4.2):

* ``train_size``, ``validation_size``, ``shuffle_set_split``, ``batch_size``,
  ``load_sparse_tensor`` and ``datasplitter_kwargs`` of ``model.train`` are ignored: they are
  arguments of the data module (:func:`train` forwards them there).
* SCANVI does not add its ``SubSampleLabels`` callback; :class:`SemiSupervisedAnnDataLoader`
  re-draws the labelled subsample itself at the start of every training epoch when
  ``n_samples_per_label`` is set, as the callback would.
* ``TrainRunner``'s early-stopping sanity checks (validation monitor without a validation set)
  only run for a data splitter whose class is named exactly ``DataSplitter``; they are skipped.
"""

from __future__ import annotations

import inspect
from itertools import cycle
from typing import Any

import numpy as np

try:  # scvi-tools is an optional dependency of annloader_gpu
    from scvi import REGISTRY_KEYS
    from scvi import settings as scvi_settings
    from scvi.data._utils import get_anndata_attribute
    from scvi.dataloaders import DataSplitter, SemiSupervisedDataSplitter
except ImportError as exc:  # pragma: no cover - exercised only without scvi-tools
    raise ImportError(
        "annloader_gpu.scvi_integration needs scvi-tools (>= 1.2): "
        "pip install 'annloader_gpu[scvi]' or pip install scvi-tools"
        f" (import failed: {exc})"
    ) from exc

import torch
from torch.utils.data import DataLoader

from ._cuda_module import gpu_usable
from .loader import AnnDataLoader

__all__ = [
    "AnnLoaderDataModule",
    "SemiSupervisedAnnDataLoader",
    "SemiSupervisedAnnLoaderDataModule",
    "inference_loader",
    "make_datamodule",
    "train",
]

# model.train() arguments that configure the data split: with a datamodule scvi-tools ignores
# them, so train() moves them to the data module.
_SPLIT_ARGS = ("train_size", "validation_size", "shuffle_set_split", "batch_size")


def _loader_device(trainer: Any, requested: Any) -> Any:
    """The device our loader should yield on: the one asked for, else the trainer's root device.

    Batches already on the training device make Lightning's transfer a no-op. Without a usable
    annloader_gpu GPU path (no CUDA kernels built) a CUDA trainer gets CPU batches, which Lightning
    then copies, as it does for scvi-tools' own loader. Outside a trainer: the loader's default.
    """
    if requested is not None:
        return requested
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    root = getattr(strategy, "root_device", None)
    if not isinstance(root, torch.device):
        return None
    if root.type == "cuda":
        return root if gpu_usable() else "cpu"
    return "cpu"


def _attached_trainer(datamodule: Any) -> Any:
    # LightningDataModule.trainer is None until Trainer.fit() attaches the module.
    return getattr(datamodule, "trainer", None)


class _OurLoaderPlacement:
    """What both data modules add to scvi-tools' splitters: where batches go, and n_obs."""

    def _place_loaders(self, device: Any, residency: str) -> None:
        self.device = device
        self.residency = residency

    # model.train(datamodule=...) reads n_obs for its max_epochs heuristic.
    @property
    def n_obs(self) -> int:
        return int(self.adata_manager.adata.n_obs)

    # Same loaders, arguments and conditions as scvi-tools' splitters, through each module's
    # _make_loader (which adds device and residency).
    def train_dataloader(self):
        return self._make_loader(self.train_idx, shuffle=True, drop_last=self.drop_last, train=True)

    def val_dataloader(self):
        if len(self.val_idx) > 0:
            return self._make_loader(self.val_idx, shuffle=False, drop_last=False, train=False)
        return None

    def test_dataloader(self):
        if len(self.test_idx) > 0:
            return self._make_loader(self.test_idx, shuffle=False, drop_last=False, train=False)
        return None


class AnnLoaderDataModule(_OurLoaderPlacement, DataSplitter):
    """scvi-tools' ``DataSplitter`` with annloader_gpu's :class:`~annloader_gpu.loader.AnnDataLoader`.

    Use it with any unsupervised scvi-tools model (SCVI, LinearSCVI, ...)::

        dm = AnnLoaderDataModule(model.adata_manager, batch_size=128)
        model.train(max_epochs=..., datamodule=dm)

    Parameters are those of ``scvi.dataloaders.DataSplitter`` (and of the matching arguments of
    ``model.train``): the split — ``train_idx``, ``val_idx``, ``test_idx`` after ``setup()`` —
    is computed by scvi-tools' own code and equals ``model.train()``'s for the same
    ``scvi.settings.seed``.

    adata_manager
        The model's ``AnnDataManager`` (``model.adata_manager``).
    train_size, validation_size, shuffle_set_split
        As in ``model.train``: ``train_size=None`` means 0.9 plus scvi-tools' rule that moves a
        last training batch of 1-2 cells to the validation set.
    batch_size
        Minibatch size.
    load_sparse_tensor, pin_memory, external_indexing
        As in ``DataSplitter``.
    device
        Where batches are yielded. Default: the Lightning trainer's device (so the transfer to the
        training device is a no-op), or the loader's default outside a trainer.
    residency
        Where the prepared data lives for a GPU device (see ``AnnDataLoader``).
    **loader_kwargs
        Passed to every ``AnnDataLoader`` (for example ``drop_last``, ``distributed_sampler``,
        ``data_and_attributes``).
    """

    data_loader_cls = AnnDataLoader

    def __init__(
        self,
        adata_manager: Any,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        load_sparse_tensor: bool = False,
        pin_memory: bool = False,
        external_indexing: list | None = None,
        *,
        device: Any = None,
        residency: str = "auto",
        **loader_kwargs,
    ):
        super().__init__(
            adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            load_sparse_tensor=load_sparse_tensor,
            pin_memory=pin_memory,
            external_indexing=external_indexing,
            batch_size=batch_size,
            **loader_kwargs,
        )
        self._place_loaders(device, residency)

    def _make_loader(self, indices: np.ndarray, *, shuffle: bool, drop_last: bool, train: bool) -> AnnDataLoader:
        del train  # one loader kind for every split here
        return self.data_loader_cls(
            self.adata_manager,
            indices=indices,
            shuffle=shuffle,
            drop_last=drop_last,
            load_sparse_tensor=self.load_sparse_tensor,
            pin_memory=self.pin_memory,
            device=_loader_device(_attached_trainer(self), self.device),
            residency=self.residency,
            **self.data_loader_kwargs,
        )


class SemiSupervisedAnnDataLoader(DataLoader):
    """scvi-tools' ``SemiSupervisedDataLoader`` built from annloader_gpu loaders.

    Yields ``[full_batch, labelled_batch]`` pairs like scvi-tools' loader: it walks the larger of
    the two index sets once and cycles the other (``ConcatDataLoader`` semantics, same order of
    random draws, so shuffling matches scvi-tools' under the same torch seed). With
    ``n_samples_per_label`` the labelled cells are a per-label subsample drawn with numpy's global
    RNG, as in scvi-tools; ``resample_labels_each_epoch`` re-draws it at the start of every pass
    (what scvi-tools' ``SubSampleLabels`` callback does for the training loader, which
    ``model.train(datamodule=...)`` does not install).

    Like scvi-tools' ``ConcatDataLoader`` it is a ``torch.utils.data.DataLoader`` (over the larger
    loader) whose ``__iter__`` is overridden. That matters beyond ``isinstance`` checks: Lightning
    probes a non-DataLoader iterable by calling ``iter()`` on it once before training, which would
    draw two extra seeds from torch's RNG and shift every later random draw.
    """

    def __init__(
        self,
        adata_manager: Any,
        n_samples_per_label: int | None = None,
        indices: Any = None,
        shuffle: bool = False,
        batch_size: int = 128,
        data_and_attributes: Any = None,
        drop_last: bool = False,
        *,
        resample_labels_each_epoch: bool = False,
        **loader_kwargs,
    ):
        adata = adata_manager.adata
        self.adata_manager = adata_manager
        self.indices = np.asarray(np.arange(adata.n_obs) if indices is None else indices)
        self.n_samples_per_label = n_samples_per_label
        self._shuffle = shuffle
        self._batch_size = batch_size
        self.data_and_attributes = data_and_attributes
        self._drop_last = drop_last
        self._loader_kwargs = loader_kwargs
        self._resample = bool(resample_labels_each_epoch) and n_samples_per_label is not None
        self._started = False

        labels_state_registry = adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        labels = get_anndata_attribute(
            adata,
            adata_manager.data_registry.labels.attr_name,
            labels_state_registry.original_key,
            mod_key=getattr(adata_manager.data_registry.labels, "mod_key", None),
        ).ravel()
        self.labeled_locs = []
        for label in np.unique(labels):
            if label != labels_state_registry.unlabeled_category:
                self.labeled_locs.append(self.indices[np.where(labels[self.indices] == label)[0]])
        self.dataloaders = [self._loader(self.indices), self._loader(self.subsample_labels())]
        self._pick_largest()
        # Batches come from self.dataloaders (see __iter__); the DataLoader base only carries
        # the options Lightning inspects.
        super().__init__(self.largest_dl, num_workers=0, pin_memory=bool(loader_kwargs.get("pin_memory", False)))

    def _loader(self, indices: np.ndarray) -> AnnDataLoader:
        return AnnDataLoader(
            self.adata_manager,
            indices=indices,
            shuffle=self._shuffle,
            batch_size=self._batch_size,
            data_and_attributes=self.data_and_attributes,
            drop_last=self._drop_last,
            **self._loader_kwargs,
        )

    def _pick_largest(self) -> None:
        lens = [len(dl) for dl in self.dataloaders]
        self.largest_dl = self.dataloaders[int(np.argmax(lens))]

    def subsample_labels(self) -> np.ndarray:
        """Up to ``n_samples_per_label`` cells of each label (all labelled cells by default)."""
        if self.n_samples_per_label is None:
            return np.concatenate(self.labeled_locs)
        sample_idx = []
        for loc in self.labeled_locs:
            if len(loc) < self.n_samples_per_label:
                sample_idx.append(loc)
            else:
                sample_idx.append(np.random.choice(loc, self.n_samples_per_label, replace=False))
        return np.concatenate(sample_idx)

    def resample_labels(self) -> None:
        """Re-draws the labelled subsample (the hook scvi-tools' ``SubSampleLabels`` calls)."""
        self.dataloaders[1] = self._loader(self.subsample_labels())
        self._pick_largest()

    @property
    def device(self) -> torch.device:
        return self.dataloaders[0].device

    def __len__(self) -> int:
        return len(self.largest_dl)

    def __iter__(self):
        if self._resample and self._started:
            self.resample_labels()
        self._started = True
        # scvi's ConcatDataLoader.__iter__: cycle(...) calls iter() on the smaller loaders first.
        iter_list = [cycle(dl) if dl is not self.largest_dl else dl for dl in self.dataloaders]
        return zip(*iter_list, strict=True)


class SemiSupervisedAnnLoaderDataModule(_OurLoaderPlacement, SemiSupervisedDataSplitter):
    """scvi-tools' ``SemiSupervisedDataSplitter`` (SCANVI) with annloader_gpu loaders.

    The split of labelled and unlabelled cells is scvi-tools' own. When the data has labelled
    cells the loaders are :class:`SemiSupervisedAnnDataLoader` (pairs of full and labelled
    batches), otherwise plain ``AnnDataLoader``. Parameters as :class:`AnnLoaderDataModule`, plus
    ``n_samples_per_label``. SCANVI's ``train()`` splits with ``train_size=0.9`` by default (not
    ``None``): :func:`train` takes that default from the model.
    """

    def __init__(
        self,
        adata_manager: Any,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        n_samples_per_label: int | None = None,
        batch_size: int = 128,
        pin_memory: bool = False,
        external_indexing: list | None = None,
        *,
        device: Any = None,
        residency: str = "auto",
        **loader_kwargs,
    ):
        super().__init__(
            adata_manager=adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            n_samples_per_label=n_samples_per_label,
            pin_memory=pin_memory,
            external_indexing=external_indexing,
            batch_size=batch_size,
            **loader_kwargs,
        )
        self._place_loaders(device, residency)

    def setup(self, stage: str | None = None):
        """scvi-tools' split, then our loader classes in place of scvi-tools'."""
        super().setup(stage)
        if len(self._labeled_indices) != 0:
            self.data_loader_class = SemiSupervisedAnnDataLoader
        else:
            self.data_loader_class = AnnDataLoader
            self.data_loader_kwargs.pop("n_samples_per_label", None)

    def _make_loader(self, indices: np.ndarray, *, shuffle: bool, drop_last: bool, train: bool):
        extra = {}
        if self.data_loader_class is SemiSupervisedAnnDataLoader:
            extra["resample_labels_each_epoch"] = train
        return self.data_loader_class(
            self.adata_manager,
            indices=indices,
            shuffle=shuffle,
            drop_last=drop_last,
            pin_memory=self.pin_memory,
            device=_loader_device(_attached_trainer(self), self.device),
            residency=self.residency,
            **extra,
            **self.data_loader_kwargs,
        )


def _is_semisupervised(model: Any) -> bool:
    from scvi.model.base import SemisupervisedTrainingMixin

    return isinstance(model, SemisupervisedTrainingMixin)


def _train_defaults(model: Any) -> dict[str, Any]:
    """The split defaults of ``model.train`` (they differ: SCVI train_size=None, SCANVI 0.9)."""
    params = inspect.signature(model.train).parameters
    return {name: params[name].default for name in _SPLIT_ARGS if name in params}


def _use_distributed_sampler(strategy: Any) -> bool:
    # Mirrors scvi.model._utils.use_distributed_sampler (scvi-tools 1.4): DDP strategies only.
    if strategy is None:
        return False
    if isinstance(strategy, str):
        return "ddp" in strategy
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


def make_datamodule(
    model: Any,
    *,
    train_size: Any = inspect.Parameter.empty,
    validation_size: Any = inspect.Parameter.empty,
    shuffle_set_split: Any = inspect.Parameter.empty,
    batch_size: Any = inspect.Parameter.empty,
    n_samples_per_label: int | None = None,
    load_sparse_tensor: bool = False,
    strategy: Any = None,
    device: Any = None,
    residency: str = "auto",
    **datasplitter_kwargs,
) -> AnnLoaderDataModule | SemiSupervisedAnnLoaderDataModule:
    """The annloader_gpu data module ``model.train()`` would have split with.

    Arguments left out take the defaults of ``model.train`` (so the split is the stock one);
    ``datasplitter_kwargs`` are passed on as in ``model.train(datasplitter_kwargs=...)``.
    """
    split = _train_defaults(model)
    given = {
        "train_size": train_size,
        "validation_size": validation_size,
        "shuffle_set_split": shuffle_set_split,
        "batch_size": batch_size,
    }
    split.update({k: v for k, v in given.items() if v is not inspect.Parameter.empty})
    split["batch_size"] = split.get("batch_size") or scvi_settings.batch_size
    common = dict(device=device, residency=residency, **split)
    if _use_distributed_sampler(strategy):
        datasplitter_kwargs.setdefault("distributed_sampler", True)
    if _is_semisupervised(model):
        if load_sparse_tensor:
            raise ValueError("load_sparse_tensor is not supported for semi-supervised models (nor by scvi-tools)")
        return SemiSupervisedAnnLoaderDataModule(
            model.adata_manager, n_samples_per_label=n_samples_per_label, **common, **datasplitter_kwargs
        )
    if n_samples_per_label is not None:
        raise ValueError("n_samples_per_label only applies to semi-supervised models (SCANVI)")
    return AnnLoaderDataModule(
        model.adata_manager, load_sparse_tensor=load_sparse_tensor, **common, **datasplitter_kwargs
    )


def train(
    model: Any,
    max_epochs: int | None = None,
    *,
    train_size: Any = inspect.Parameter.empty,
    validation_size: Any = inspect.Parameter.empty,
    shuffle_set_split: Any = inspect.Parameter.empty,
    batch_size: Any = inspect.Parameter.empty,
    n_samples_per_label: int | None = None,
    load_sparse_tensor: bool = False,
    datasplitter_kwargs: dict | None = None,
    device: Any = None,
    residency: str = "auto",
    **train_kwargs,
):
    """``model.train(...)`` with annloader_gpu loading the minibatches.

    Takes ``model.train``'s arguments: the split arguments (``train_size``, ``validation_size``,
    ``shuffle_set_split``, ``batch_size``, ``n_samples_per_label`` for SCANVI,
    ``load_sparse_tensor``, ``datasplitter_kwargs``) build the data module (their defaults are
    the model's own), everything else (``accelerator``, ``devices``, ``plan_kwargs``,
    ``early_stopping``, Trainer options, ...) goes to ``model.train`` unchanged. ``device`` and
    ``residency`` are the loader's. Returns what ``model.train`` returns.
    """
    if "datamodule" in train_kwargs:
        raise TypeError("train() builds the datamodule; call model.train(datamodule=...) to pass your own")
    datamodule = make_datamodule(
        model,
        train_size=train_size,
        validation_size=validation_size,
        shuffle_set_split=shuffle_set_split,
        batch_size=batch_size,
        n_samples_per_label=n_samples_per_label,
        load_sparse_tensor=load_sparse_tensor,
        strategy=train_kwargs.get("strategy"),
        device=device,
        residency=residency,
        **(datasplitter_kwargs or {}),
    )
    # max_epochs=None: scvi-tools' heuristic on n_obs (the data module has n_obs for SCVI).
    return model.train(max_epochs=max_epochs, datamodule=datamodule, **train_kwargs)


def inference_loader(
    model: Any,
    adata: Any = None,
    indices: Any = None,
    batch_size: int | None = None,
    *,
    device: Any = None,
    residency: str = "auto",
    **loader_kwargs,
) -> AnnDataLoader:
    """Our loader over the cells scvi-tools' inference methods would visit, in the same order.

    For the ``dataloader=`` argument of ``get_latent_representation``,
    ``get_normalized_expression``, ``get_elbo``, ``get_reconstruction_error``,
    ``get_marginal_ll`` and SCANVI's ``predict``::

        z = model.get_latent_representation(dataloader=inference_loader(model))

    ``adata`` (default: the model's), ``indices`` (default: all cells) and ``batch_size``
    (default ``scvi.settings.batch_size``) mean what they mean for those methods; the batches are
    unshuffled. ``device`` defaults to the model's device when annloader_gpu's GPU path can serve
    it, else the CPU (scvi-tools' modules move CPU batches to their device).
    """
    # _validate_anndata registers (transfers the setup to) a new AnnData, as scvi-tools'
    # inference methods do before building their own loader.
    adata = model._validate_anndata(adata)
    manager = model.get_anndata_manager(adata, required=True)
    if indices is None:
        indices = np.arange(adata.n_obs)
    if device is None:
        model_device = torch.device(model.device)
        device = model_device if (model_device.type == "cuda" and gpu_usable()) else "cpu"
    return AnnDataLoader(
        manager,
        indices=indices,
        batch_size=batch_size or scvi_settings.batch_size,
        shuffle=False,
        device=device,
        residency=residency,
        **loader_kwargs,
    )
