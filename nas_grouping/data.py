"""Data sets and loaders for training and searching image classifiers.

One entry point, :func:`load_datasets`, turns a :class:`DataConfig` into a
train/validation pair plus the facts a model needs (classes, channels, size):

- ``digits``: scikit-learn's bundled 8x8 digits (1797 real images, no download),
  so searches and tests run anywhere, offline, in seconds;
- ``cifar10`` / ``cifar100``: the python-pickle releases, read from ``--data-dir``;
  without ``--download`` the files are checked for structure (keys, shapes,
  labels) instead of md5, so a bad folder gives a clear :class:`DataError`;
- ``imagefolder``: one subfolder per class, with or without ``train/`` + ``val/``.

Splits are seeded and stratified, and :func:`make_loader` seeds its shuffling,
so a run with the same seeds sees the same data in the same order.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.vision import VisionDataset

from .errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "DataConfig",
    "Datasets",
    "DigitsDataset",
    "load_datasets",
    "make_loader",
    "split_dataset",
]

#: Data set names that :class:`DataConfig` accepts.
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder")

_NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}
_DEFAULT_IMAGEFOLDER_SIZE = 224

# Per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- config


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """What to load and how to batch it.

    Attributes:
        dataset: One of ``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"imagefolder"``.
        data_dir: Folder holding the data (not used by ``digits``, which is bundled).
        download: Let torchvision download CIFAR into ``data_dir`` (needs internet).
        batch_size: Samples per batch, at least 1.
        num_workers: DataLoader worker processes, 0 loads in the main process.
        val_fraction: Share held out for validation when the data set has no
            separate validation split (``digits``, single-folder ``imagefolder``).
        split_seed: Seed of that train/validation split.
        augment: Random crops/flips/shifts on the training split.
        image_size: Square side for ``imagefolder`` (default 224); the other data
            sets keep their native size (8 for digits, 32 for CIFAR).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 64
    num_workers: int = 0
    val_fraction: float = 0.2
    split_seed: int = 0
    augment: bool = True
    image_size: int | None = None

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
        _check_fraction("DataConfig.val_fraction", self.val_fraction)
        if not _is_int(self.split_seed):
            raise ConfigError(f"DataConfig.split_seed: expected an integer, got {self.split_seed!r}")
        if self.image_size is not None:
            if not _is_int(self.image_size) or self.image_size < 1:
                raise ConfigError(
                    f"DataConfig.image_size: expected an integer >= 1 or None, got {self.image_size!r}"
                )
            native = _NATIVE_SIZE.get(self.dataset)
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
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    name: str


# --------------------------------------------------------------------------- splits


def _targets_of(dataset: Dataset) -> np.ndarray | None:
    """Labels of every item, without loading images, or None when unknown."""
    if isinstance(dataset, Subset):
        parent = _targets_of(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        arr = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    except Exception:  # noqa: BLE001 - exotic targets: fall back to an unstratified split
        return None
    if arr.ndim != 1 or len(arr) != len(dataset):  # type: ignore[arg-type]
        return None
    return arr


def _split_indices(n: int, fraction: float, seed: int, targets: np.ndarray | None) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)``; stratified by ``targets`` when that is possible."""
    from sklearn.model_selection import train_test_split  # lazy: keeps `import nas_grouping` fast

    if n < 2:
        raise ConfigError(f"cannot split a data set of {n} item(s) in two; expected at least 2 items")
    n_second = min(max(int(round(fraction * n)), 1), n - 1)
    indices = np.arange(n)
    first = second = None
    if targets is not None:
        try:
            first, second = train_test_split(
                indices, test_size=n_second, random_state=seed, shuffle=True, stratify=targets
            )
        except ValueError:  # a class too small to stratify: plain seeded split instead
            first = second = None
    if first is None or second is None:
        first, second = train_test_split(indices, test_size=n_second, random_state=seed, shuffle=True)
    return sorted(int(i) for i in first), sorted(int(i) for i in second)


def split_dataset(dataset: Dataset, fraction: float, *, seed: int) -> tuple[Subset, Subset]:
    """Split a data set in two, the same way every time for the same seed.

    Used for the bi-level search: the first part trains the weights, the second
    the architecture gates. The split is stratified by label when the data set
    (or the data set under a ``Subset``) has ``targets`` and every class is big
    enough; otherwise it is a plain seeded shuffle.

    Args:
        dataset: Any sized data set.
        fraction: Share of items in the SECOND subset, strictly between 0 and 1
            (like ``test_size`` of scikit-learn's ``train_test_split``).
        seed: Seed of the split.

    Returns:
        ``(first, second)``: disjoint subsets covering the whole data set, each
        non-empty, with sorted indices.

    Raises:
        ConfigError: ``fraction`` outside (0, 1) or fewer than 2 items.
    """
    _check_fraction("split_dataset fraction", fraction)
    n = len(dataset)  # type: ignore[arg-type]
    first, second = _split_indices(n, float(fraction), int(seed), _targets_of(dataset))
    return Subset(dataset, first), Subset(dataset, second)


# --------------------------------------------------------------------------- loaders


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from the seed torch gave it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling (and worker seeds) repeat for the same seed.

    Each epoch gets a new order, but the sequence of orders is the same in every
    run with the same ``seed``. Augmentation in the main process
    (``num_workers=0``) draws from torch's global RNG: call ``torch.manual_seed``
    to repeat it too.

    Args:
        dataset: The data set to batch.
        batch_size: Samples per batch, at least 1.
        shuffle: Reshuffle every epoch; must be False when ``sampler`` is given.
        num_workers: Worker processes, 0 loads in the main process.
        seed: Seed of the loader's ``torch.Generator``.
        sampler: A sampler deciding the order (e.g. a ``DistributedSampler``).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).
        drop_last: Drop the last incomplete batch.

    Returns:
        The configured ``DataLoader``.

    Raises:
        ConfigError: ``batch_size`` < 1, ``num_workers`` < 0, or ``shuffle`` with a ``sampler``.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"make_loader batch_size: expected an integer >= 1, got {batch_size!r}")
    if not _is_int(num_workers) or num_workers < 0:
        raise ConfigError(f"make_loader num_workers: expected an integer >= 0, got {num_workers!r}")
    if sampler is not None and shuffle:
        raise ConfigError(
            "make_loader: shuffle must be False when a sampler is given (the sampler decides the "
            "order; call sampler.set_epoch(epoch) on a DistributedSampler to reshuffle)"
        )
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        sampler=sampler,
        num_workers=int(num_workers),
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )


# --------------------------------------------------------------------------- digits


class DigitsDataset(Dataset):
    """Normalised 8x8 grayscale digits; optional random shift by up to 1 pixel.

    Items are ``(float tensor 1 x 8 x 8, int label)``. The shift pads one pixel
    of background on every side and crops 8x8 at a random offset drawn from
    torch's RNG, so ``torch.manual_seed`` (or a seeded loader's workers) repeats it.

    Args:
        images: Normalised images, shape ``(N, C, H, W)``.
        labels: Labels, shape ``(N,)``.
        augment: Apply the random shift.
        pad_value: Value of a blank pixel after normalisation.
        indices: Where each item comes from in the full data set (kept as
            ``self.indices``; defaults to ``0 .. N-1``).
        mean: Mean used for normalisation (kept as ``self.mean``).
        std: Standard deviation used for normalisation (kept as ``self.std``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        augment: bool = False,
        pad_value: float = 0.0,
        indices: Sequence[int] | None = None,
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ConfigError(
                f"DigitsDataset: expected images (N, C, H, W) and N labels, got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.targets = torch.as_tensor(labels).long()
        self.augment = augment
        self.pad_value = float(pad_value)
        self.indices = list(range(len(images))) if indices is None else [int(i) for i in indices]
        self.mean = float(mean)
        self.std = float(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            h, w = image.shape[-2:]
            padded = F.pad(image, (1, 1, 1, 1), value=self.pad_value)
            dy, dx = (int(v) for v in torch.randint(0, 3, (2,)))
            image = padded[:, dy : dy + h, dx : dx + w]
        return image, int(self.targets[index])


def _load_digits(cfg: DataConfig) -> Datasets:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx = _split_indices(len(labels), cfg.val_fraction, cfg.split_seed, bunch.target)
    train_x, val_x = images[train_idx], images[val_idx]
    mean = float(train_x.mean())
    std = float(train_x.std()) or 1.0
    common = {"pad_value": -mean / std, "mean": mean, "std": std}
    train = DigitsDataset(
        (train_x - mean) / std, labels[train_idx], augment=cfg.augment, indices=train_idx, **common
    )
    val = DigitsDataset((val_x - mean) / std, labels[val_idx], augment=False, indices=val_idx, **common)
    return Datasets(train=train, val=val, num_classes=10, in_channels=1, input_size=(8, 8), name=cfg.dataset)


# --------------------------------------------------------------------------- CIFAR


def _require_data_dir(cfg: DataConfig, what: str) -> Path:
    if cfg.data_dir is None:
        hint = (
            f"pass --download to fetch it there, or put the extracted "
            f"'{_CIFAR_CLASSES[cfg.dataset][0].base_folder}' folder there"
            if cfg.dataset in _CIFAR_CLASSES
            else "point it at a folder with one subfolder per class (or train/ and val/ holding those)"
        )
        raise DataError(
            f"{what} needs a data folder, but none was given: set --data-dir "
            f"(DataConfig.data_dir); {hint}."
        )
    return Path(os.path.expanduser(os.fspath(cfg.data_dir))).resolve()


def _read_cifar_pickle(path: Path, label: str) -> dict[str, Any]:
    """Unpickle one CIFAR file into a dict with str keys, or raise DataError naming it."""
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(
            f"{label}: cannot read '{path}' as a CIFAR python-pickle file ({type(exc).__name__}: {exc}); "
            "the file is corrupt or not from the python version of the data set. Delete it and "
            "re-extract the archive, or pass --download to fetch it again."
        ) from exc
    if not isinstance(entry, dict):
        raise DataError(
            f"{label}: '{path}' holds a {type(entry).__name__}, expected a dict as in the CIFAR "
            "python-pickle release; re-extract the archive or pass --download."
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


class _CheckedCIFAR:
    """Mixin: read CIFAR batches checking their structure instead of their md5.

    The md5 check of torchvision only accepts the exact official files; this
    reads any files in the same on-disk format (pickled dicts with ``data``
    uint8 N x 3072 and ``labels``/``fine_labels``) and raises DataError naming
    the file when one is unreadable or malformed.
    """

    base_folder: str
    train_list: list
    test_list: list
    meta: dict
    label: str
    num_classes: int
    label_key: str

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        VisionDataset.__init__(self, root, transform=transform)  # type: ignore[arg-type]
        self.train = train
        folder = Path(self.root) / self.base_folder
        datas, targets = [], []
        for name, _md5 in self.train_list if train else self.test_list:
            data, labels = self._read_batch(folder / name)
            datas.append(data)
            targets.extend(int(t) for t in labels)
        self.data = np.vstack(datas).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC for PIL
        self.targets = targets
        self._load_meta()

    def _read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        fix = "re-extract the archive or pass --download."
        entry = _read_cifar_pickle(path, self.label)
        if "data" not in entry or self.label_key not in entry:
            raise DataError(
                f"{self.label}: '{path}' has keys {sorted(map(str, entry))}, expected 'data' and "
                f"'{self.label_key}'; {fix}"
            )
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[self.label_key])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{self.label}: '{path}' has 'data' of shape {data.shape}, expected (N, 3072) uint8 "
                f"(N images of 3x32x32); {fix}"
            )
        if data.dtype != np.uint8:
            is_int = np.issubdtype(data.dtype, np.integer)
            in_range = data.size == 0 or (is_int and data.min() >= 0 and data.max() <= 255)
            if not in_range:
                raise DataError(
                    f"{self.label}: '{path}' has 'data' of dtype {data.dtype}, expected uint8 pixel "
                    f"values 0..255; {fix}"
                )
            data = data.astype(np.uint8)
        int_labels = labels.size == 0 or np.issubdtype(labels.dtype, np.integer)
        if labels.ndim != 1 or len(labels) != len(data) or not int_labels:
            raise DataError(
                f"{self.label}: '{path}' has '{self.label_key}' of shape {labels.shape} and dtype "
                f"{labels.dtype} for {len(data)} images, expected one integer label per image; {fix}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(
                f"{self.label}: '{path}' has labels in [{labels.min()}, {labels.max()}], expected "
                f"0..{self.num_classes - 1}; {fix}"
            )
        return data, labels

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        entry = _read_cifar_pickle(path, self.label)
        key = self.meta["key"]
        if key not in entry:
            raise DataError(
                f"{self.label}: '{path}' has keys {sorted(map(str, entry))}, expected '{key}'; "
                "re-extract the archive or pass --download."
            )
        self.classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in entry[key]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CheckedCIFAR10(_CheckedCIFAR, CIFAR10):
    label, num_classes, label_key = "CIFAR-10", 10, "labels"


class _CheckedCIFAR100(_CheckedCIFAR, CIFAR100):
    label, num_classes, label_key = "CIFAR-100", 100, "fine_labels"


_CIFAR_CLASSES = {"cifar10": (CIFAR10, _CheckedCIFAR10), "cifar100": (CIFAR100, _CheckedCIFAR100)}


def _load_cifar(cfg: DataConfig) -> Datasets:
    plain_cls, checked_cls = _CIFAR_CLASSES[cfg.dataset]
    label = checked_cls.label
    num_classes = checked_cls.num_classes
    root = _require_data_dir(cfg, label)
    folder = root / plain_cls.base_folder
    needed = [name for name, _ in plain_cls.train_list + plain_cls.test_list] + [plain_cls.meta["filename"]]

    mean, std = _CIFAR_STATS[cfg.dataset]
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(
        ([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []) + normalize
    )
    val_tf = T.Compose(normalize)

    if cfg.download:
        try:
            train = plain_cls(str(root), train=True, transform=train_tf, download=True)
            val = plain_cls(str(root), train=False, transform=val_tf, download=False)
        except Exception as exc:  # noqa: BLE001 - network, disk and md5 failures all end here
            raise DataError(
                f"{label}: downloading or checking '{folder}' failed ({type(exc).__name__}: {exc}). "
                f"Check the internet connection and free space under '{root}', or download "
                f"{plain_cls.url} yourself and extract it under --data-dir ('{root}')."
            ) from exc
    else:
        hint = (
            f"Pass --download to fetch it, or put the extracted '{plain_cls.base_folder}' folder "
            f"under --data-dir ('{root}')"
        )
        if not folder.is_dir():
            extra = ""
            if (root / plain_cls.filename).is_file():
                extra = f" The archive '{root / plain_cls.filename}' is there: extract it with `tar xzf`."
            elif root.name == plain_cls.base_folder or (root / needed[0]).is_file():
                extra = (
                    f" --data-dir seems to be the '{plain_cls.base_folder}' folder itself: "
                    f"pass its parent '{root.parent}'."
                )
            elif not root.exists():
                extra = f" (--data-dir '{root}' does not exist either.)"
            raise DataError(
                f"{label} not found: expected the folder '{folder}' holding {', '.join(needed)}, "
                f"but it does not exist. {hint}.{extra}"
            )
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"{label} is incomplete: '{folder}' lacks {', '.join(missing)} "
                f"(looked for {', '.join(str(folder / m) for m in missing)}). {hint}."
            )
        train = checked_cls(str(root), train=True, transform=train_tf)
        val = checked_cls(str(root), train=False, transform=val_tf)
    return Datasets(
        train=train, val=val, num_classes=num_classes, in_channels=3, input_size=(32, 32), name=cfg.dataset
    )


# --------------------------------------------------------------------------- ImageFolder


class _TransformSubset(Subset):
    """A ``Subset`` of an untransformed data set that applies its own transform."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None) -> None:
        super().__init__(dataset, indices)
        self.transform = transform

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes  # type: ignore[attr-defined]

    def __getitem__(self, idx: int) -> tuple[Any, int]:  # type: ignore[override]
        image, target = self.dataset[self.indices[idx]]
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:  # type: ignore[override]
        return [self[i] for i in indices]


def _image_folder(path: Path, transform: Callable | None, role: str) -> ImageFolder:
    expects = (
        "one subfolder per class holding image files (.png, .jpg, ...), e.g. "
        f"'{path / 'cat' / '0001.jpg'}'"
    )
    if not path.is_dir():
        raise DataError(
            f"image folder not found: '{path}' ({role}) does not exist or is not a folder; expected {expects}. "
            "Set --data-dir to such a folder."
        )
    class_dirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image folder '{path}' ({role}) has no class subfolders; expected {expects}. "
            "Move the images into one subfolder per class."
        )
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError, RuntimeError, ValueError) as exc:
        raise DataError(
            f"image folder '{path}' ({role}) has no usable images ({exc}); expected {expects}. "
            "Add images to every class subfolder or remove the empty ones."
        ) from exc


def _load_imagefolder(cfg: DataConfig) -> Datasets:
    root = _require_data_dir(cfg, "imagefolder")
    size = cfg.image_size or _DEFAULT_IMAGEFOLDER_SIZE
    normalize = [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    if cfg.augment:
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + normalize)
    else:
        train_tf = T.Compose([T.Resize(size), T.CenterCrop(size)] + normalize)
    val_tf = T.Compose([T.Resize(max(size, round(size * 256 / 224))), T.CenterCrop(size)] + normalize)

    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"image folder '{root}' has a {present}/ subfolder but no {absent}/ ('{root / absent}' is "
            f"missing); expected either both train/ and val/ (each with one subfolder per class) or "
            f"only class subfolders, to be split by val_fraction. Add {absent}/ or rename {present}/."
        )
    if has_train and has_val:
        train = _image_folder(root / "train", train_tf, "training split")
        val = _image_folder(root / "val", val_tf, "validation split")
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise DataError(
                f"image folder '{root}': train/ and val/ must have the same class subfolders (labels "
                f"come from their sorted names); only in train/: {only_train or 'none'}, only in val/: "
                f"{only_val or 'none'}. Add the missing class folders (with images) to both."
            )
        classes = train.classes
    else:
        base = _image_folder(root, None, "split into train/val by val_fraction")
        train_idx, val_idx = _split_indices(
            len(base), cfg.val_fraction, cfg.split_seed, np.asarray(base.targets)
        )
        train = _TransformSubset(base, train_idx, train_tf)
        val = _TransformSubset(base, val_idx, val_tf)
        classes = base.classes
    return Datasets(
        train=train,
        val=val,
        num_classes=len(classes),
        in_channels=3,
        input_size=(size, size),
        name=cfg.dataset,
    )


# --------------------------------------------------------------------------- entry point


def load_datasets(cfg: DataConfig) -> Datasets:
    """Load the train/validation pair that ``cfg`` describes.

    Args:
        cfg: Which data set, where it lives, and how to split/augment it.

    Returns:
        The two splits with ``num_classes``, ``in_channels`` and ``input_size``.

    Raises:
        DataError: The data set is missing, incomplete or malformed; the message
            names the path looked at and how to fix it.
        ConfigError: ``cfg`` is not a :class:`DataConfig`.
    """
    if not isinstance(cfg, DataConfig):
        raise ConfigError(f"load_datasets: expected a DataConfig, got {type(cfg).__name__}")
    if cfg.dataset == "digits":
        return _load_digits(cfg)
    if cfg.dataset in ("cifar10", "cifar100"):
        return _load_cifar(cfg)
    return _load_imagefolder(cfg)
