"""What to load and how to batch it (:class:`DataConfig`), and what loading returns (:class:`Datasets`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from nas_grouping.errors import ConfigError, DataError

__all__ = ["DATASETS", "DatasetKind", "register_dataset", "DataConfig", "Datasets", "require_data_dir"]

_CHECK_IMAGES = ("lazy", "check", "skip")


@dataclass(frozen=True)
class DatasetKind:
    """A data set that :class:`DataConfig` can name: its loader and the defaults its settings need.

    Attributes:
        load: ``load(cfg) -> Datasets``.
        val_fraction: The validation share when none is given.
        native_size: The side of its square images, which are not resized (``image_size`` must be
            None or this); None where ``image_size`` applies.
    """

    load: Callable[["DataConfig"], "Datasets"]
    val_fraction: float = 0.2
    native_size: int | None = None


#: Data sets by the (lower-case) name :class:`DataConfig` accepts; :func:`register_dataset` adds one, and
#: :func:`~nas_grouping.data.load_datasets` loads ``cfg.dataset`` with its ``load``.
DATASETS: dict[str, DatasetKind] = {}


def register_dataset(name: str, load: Callable[["DataConfig"], "Datasets"] | None = None, *,
                     val_fraction: float = 0.2, native_size: int | None = None) -> Any:
    """Make ``name`` a data set that :class:`DataConfig` accepts, loaded by ``load(cfg) -> Datasets``.

    Called with ``load`` it registers it and returns it; without, it is a decorator of the loader.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"register_dataset: expected a name, got {name!r}")
    _check_fraction(f"register_dataset({name!r}).val_fraction", val_fraction)

    def register(fn: Callable[["DataConfig"], "Datasets"]) -> Callable[["DataConfig"], "Datasets"]:
        DATASETS[name.strip().lower()] = DatasetKind(fn, val_fraction, native_size)
        return fn
    return register(load) if load is not None else register


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """What to load and how to batch it.

    Attributes:
        dataset: One of ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"imagefolder"``, or a name
            added by :func:`register_dataset`.
        data_dir: Folder holding the data (not used by ``digits``, which is bundled).
        download: Let torchvision download CIFAR into ``data_dir`` (needs internet).
        batch_size: Samples per batch, at least 1.
        num_workers: DataLoader worker processes, 0 loads in the main process.
        val_fraction: Share held out for validation when the data set has no
            separate validation split (``digits``, single-folder ``imagefolder``,
            the CIFAR JPEG copy); default 0.2, or 0.1 for CIFAR (45,000 / 5,000).
        split_seed: Seed of that train/validation split.
        holdout: Set the validation split (val_fraction, split_seed) aside unseen and validate on
            a second one of the same size, carved from the remaining training images with seed
            split_seed + 1: the split to tune on (nas-grouping tune), so the reported one never
            steers a choice.
            Only for data sets whose validation is carved from the training images.
        augment: Random crops/flips/shifts on the training split.
        crop_padding: CIFAR: pixels of zero padding around each training image
            before a random 32x32 crop (4, the usual; 0 turns crops off).
        cutout: CIFAR: side of a square set to zero (after normalisation) at a
            random place in each training image; 0 (default) turns it off.
        image_size: Square side for ``imagefolder`` (default 224); the other data
            sets keep their native size (8 for digits, 32 for CIFAR).
        check_images: ``imagefolder``: ``lazy`` (an unreadable file stops training
            with one line naming it), ``check`` (read every image before training
            and name the unreadable ones) or ``skip`` (leave them out, with a warning).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 64
    num_workers: int = 0
    val_fraction: float | None = None
    split_seed: int = 0
    holdout: bool = False
    augment: bool = True
    crop_padding: int = 4
    cutout: int = 0
    image_size: int | None = None
    check_images: str = "lazy"

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or self.dataset.strip().lower() not in DATASETS:
            raise ConfigError(
                f"DataConfig.dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}"
            )
        self.dataset = self.dataset.strip().lower()
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise ConfigError(
                f"DataConfig.data_dir: expected a folder path (str) or None, got {self.data_dir!r}"
            )
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"DataConfig.batch_size: expected an integer >= 1, got {self.batch_size!r}")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise ConfigError(f"DataConfig.num_workers: expected an integer >= 0, got {self.num_workers!r}")
        if self.check_images not in _CHECK_IMAGES:
            raise ConfigError(f"DataConfig.check_images: expected one of {', '.join(_CHECK_IMAGES)}, got "
                              f"{self.check_images!r}")
        if self.val_fraction is None:
            self.val_fraction = DATASETS[self.dataset].val_fraction
        _check_fraction("DataConfig.val_fraction", self.val_fraction)
        for name in ("crop_padding", "cutout"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= 32:
                raise ConfigError(f"DataConfig.{name}: expected an integer number of pixels in 0..32, got {value!r}")
        if not _is_int(self.split_seed):
            raise ConfigError(f"DataConfig.split_seed: expected an integer, got {self.split_seed!r}")
        if not isinstance(self.holdout, bool):
            raise ConfigError(f"DataConfig.holdout: expected true or false, got {self.holdout!r}")
        if self.image_size is not None:
            if not _is_int(self.image_size) or self.image_size < 1:
                raise ConfigError(
                    f"DataConfig.image_size: expected an integer >= 1 or None, got {self.image_size!r}"
                )
            native = DATASETS[self.dataset].native_size
            if native is not None and self.image_size != native:
                raise ConfigError(
                    f"DataConfig.image_size: {self.dataset} images are {native}x{native} and are not "
                    f"resized; expected None or {native}, got {self.image_size!r} "
                    "(image_size only applies to imagefolder)"
                )


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name}: expected a fraction strictly between 0 and 1, got {value!r}")


@dataclass
class Datasets:
    """A train/validation pair and the facts a model needs about it.

    Attributes:
        train: Training split, items are ``(image tensor C x H x W, int label)``.
        val: Validation split (CIFAR's test split), same item format, no augmentation.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
        in_channels: Image channels (1 for digits, 3 otherwise).
        input_size: ``(H, W)`` of the image tensors.
        name: The data set name from :class:`DataConfig`.
        split: How validation was carved from the training images (seed, share,
            per-class counts, the held-out indices), or None where the data set
            ships its own validation split; search and compress save it as
            ``data_split.json`` in the run folder.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    name: str
    split: dict[str, Any] | None = None



def require_data_dir(cfg: DataConfig, what: str, hint: str) -> Path:
    """``cfg.data_dir`` as an absolute path, or a DataError saying that ``what`` needs one and ``hint``."""
    if cfg.data_dir is None:
        raise DataError(f"{what} needs a data folder, but none was given: set --data-dir (DataConfig.data_dir); "
                        f"{hint}.")
    return Path(os.path.expanduser(os.fspath(cfg.data_dir))).resolve()
