"""annloader_gpu: a GPU-resident drop-in replacement for scvi-tools' AnnDataLoader."""

__version__ = "0.1.0"
