"""Data sets and loaders for training and searching image classifiers.

One entry point, :func:`load_datasets`, turns a :class:`DataConfig` into a
train/validation pair plus the facts a model needs (classes, channels, size):

- ``digits``: scikit-learn's bundled 8x8 digits (1797 real images, no download),
  so searches and tests run anywhere, offline, in seconds;
- ``cifar10`` / ``cifar100``: the python-pickle releases, or the CIFAR-10 JPEG copy
  (a ``.tar.gz`` of ``train/<class>/*.jpg`` or its extracted folder), read from
  ``--data-dir`` and held in memory as uint8 tensors that are augmented a whole
  batch at a time (:mod:`~nas_grouping.data.memory`);
- ``imagefolder``: one subfolder per class, with or without ``train/`` + ``val/``;
- a name added by :func:`register_dataset` (its loader takes the config and returns :class:`Datasets`).

Splits are seeded and stratified, and loaders seed their shuffling, so a run with
the same seeds sees the same data in the same order.
"""

from __future__ import annotations

from nas_grouping.data.cifar import CIFAR10_CLASSES, load_cifar, read_cifar10_jpeg
from nas_grouping.data.config import DATASETS, DataConfig, DatasetKind, Datasets, register_dataset
from nas_grouping.data.digits import DigitsDataset, load_digits
from nas_grouping.data.imagefolder import load_imagefolder
from nas_grouping.data.loaders import make_loader
from nas_grouping.data.memory import ImageTensorDataset, TensorBatchLoader, augment_batch, tensor_source
from nas_grouping.data.splits import split_dataset
from nas_grouping.errors import ConfigError

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DataConfig",
    "DatasetKind",
    "Datasets",
    "DigitsDataset",
    "ImageTensorDataset",
    "TensorBatchLoader",
    "augment_batch",
    "load_datasets",
    "make_loader",
    "read_cifar10_jpeg",
    "register_dataset",
    "split_dataset",
    "tensor_source",
]

# the names DataConfig accepts, in the order its messages list them; CIFAR holds out 5,000 of its 50,000 training
# images (a share of 0.1), the others a fifth
register_dataset("digits", load_digits, native_size=8)
register_dataset("cifar10", load_cifar, val_fraction=0.1, native_size=32)
register_dataset("cifar100", load_cifar, val_fraction=0.1, native_size=32)
register_dataset("imagefolder", load_imagefolder)


def load_datasets(cfg: DataConfig) -> Datasets:
    """Load the train/validation pair that ``cfg`` describes.

    Raises:
        DataError: The data set is missing, incomplete or malformed; the message
            names the path looked at and how to fix it.
        ConfigError: ``cfg`` is not a :class:`DataConfig`.
    """
    if not isinstance(cfg, DataConfig):
        raise ConfigError(f"load_datasets: expected a DataConfig, got {type(cfg).__name__}")
    return DATASETS[cfg.dataset].load(cfg)
