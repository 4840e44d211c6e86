"""CIFAR-10/100: the python-pickle release, or a JPEG copy (a tarball or the folder it extracts to).

Every source is decoded once into a uint8 tensor held in memory
(:class:`~nas_grouping.data.memory.ImageTensorDataset`), so training batches are
augmented as tensors at the speed of the model.

- **python-pickle** (``cifar-10-batches-py/``): read with a structure check instead of
  torchvision's md5, so any file in the same format loads and a bad one is named; its
  test split is the validation split.
- **JPEG copy** (``train/<class>/*.jpg``, as a ``.tar.gz`` or extracted): the training
  images only, so validation is a seeded, stratified share of them (5,000 of 50,000
  by default), recorded in :attr:`Datasets.split`. Every image must be 32x32, and the
  class folders must be CIFAR-10's ten names, whose sorted order is its label order.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.vision import VisionDataset

from nas_grouping.data.config import DataConfig, Datasets, require_data_dir
from nas_grouping.data.memory import ImageTensorDataset
from nas_grouping.data.splits import refuse_holdout, validation_indices
from nas_grouping.errors import DataError

__all__ = ["CIFAR10_CLASSES", "load_cifar", "read_cifar10_jpeg"]

logger = logging.getLogger("nas_grouping")

#: CIFAR-10's class names in label order (also their sorted order).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Per-channel statistics of the CIFAR training sets (pixels in [0, 1]).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_JPEG_SUFFIXES = (".jpg", ".jpeg")


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

    def __init__(self, root: str | Path, train: bool = True) -> None:
        VisionDataset.__init__(self, root)  # type: ignore[arg-type]
        self.train = train
        folder = Path(self.root) / self.base_folder
        datas, targets = [], []
        for name, _md5 in self.train_list if train else self.test_list:
            data, labels = self._read_batch(folder / name)
            datas.append(data)
            targets.extend(int(t) for t in labels)
        self.data = np.vstack(datas).reshape(-1, 3, 32, 32)
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


def _in_memory(images: np.ndarray | torch.Tensor, labels: Any, cfg: DataConfig, classes: list[str], *,
               train: bool) -> ImageTensorDataset:
    mean, std = _CIFAR_STATS[cfg.dataset]
    return ImageTensorDataset(torch.as_tensor(np.ascontiguousarray(images)), torch.as_tensor(labels), mean=mean,
                              std=std, augment=cfg.augment and train, crop_padding=cfg.crop_padding,
                              cutout=cfg.cutout, classes=classes)


def _downloaded(cfg: DataConfig, root: Path, plain_cls: type, label: str) -> tuple[Any, Any]:
    try:
        return (plain_cls(str(root), train=True, download=True), plain_cls(str(root), train=False, download=False))
    except Exception as exc:  # noqa: BLE001 - network, disk and md5 failures all end here
        raise DataError(
            f"{label}: downloading or checking '{root / plain_cls.base_folder}' failed ({type(exc).__name__}: "
            f"{exc}). Check the internet connection and free space under '{root}', or download "
            f"{plain_cls.url} yourself and extract it under --data-dir ('{root}')."
        ) from exc


def _jpeg_source(root: Path) -> Path | None:
    """The JPEG copy at ``root``: the archive itself, the folder holding ``train/``, or the one archive in it."""
    if root.is_file():
        return root if root.name.endswith(_ARCHIVE_SUFFIXES) else None
    if (root / "train").is_dir():
        return root / "train"
    if not root.is_dir():
        return None
    archives = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(_ARCHIVE_SUFFIXES))
    if len(archives) > 1:
        archives = [p for p in archives if "jpg" in p.name or "jpeg" in p.name]
    return archives[0] if len(archives) == 1 else None


def load_cifar(cfg: DataConfig) -> Datasets:
    """CIFAR-10/100 from ``cfg.data_dir``: the python-pickle folder, or the CIFAR-10 JPEG copy."""
    plain_cls, checked_cls = _CIFAR_CLASSES[cfg.dataset]
    label = checked_cls.label
    hint = (f"pass --download to fetch it there, or put the extracted '{plain_cls.base_folder}' folder there"
            + (", or the CIFAR-10 JPEG copy" if cfg.dataset == "cifar10" else ""))
    root = require_data_dir(cfg, label, hint)
    folder = root / plain_cls.base_folder
    needed = [name for name, _ in plain_cls.train_list + plain_cls.test_list] + [plain_cls.meta["filename"]]

    why = "here is the python-pickle release, whose test batch is the validation split"
    if cfg.download:
        refuse_holdout(cfg, why)
        train, val = _downloaded(cfg, root, plain_cls, label)
        train_data = np.asarray(train.data).transpose((0, 3, 1, 2))
        val_data = np.asarray(val.data).transpose((0, 3, 1, 2))
    elif not folder.is_dir() and cfg.dataset == "cifar10" and _jpeg_source(root) is not None:
        return _load_cifar10_jpeg(cfg, _jpeg_source(root))
    else:
        hint = (
            f"Pass --download to fetch it, or put the extracted '{plain_cls.base_folder}' folder "
            f"under --data-dir ('{root}')"
            + (", or the CIFAR-10 JPEG copy (a .tar.gz of train/<class>/*.jpg, or the folder holding train/)"
               if cfg.dataset == "cifar10" else "")
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
        refuse_holdout(cfg, why)
        train = checked_cls(str(root), train=True)
        val = checked_cls(str(root), train=False)
        train_data, val_data = train.data, val.data
    classes = list(train.classes)
    return Datasets(
        train=_in_memory(train_data, train.targets, cfg, classes, train=True),
        val=_in_memory(val_data, val.targets, cfg, classes, train=False),
        num_classes=checked_cls.num_classes, in_channels=3, input_size=(32, 32), name=cfg.dataset,
    )


# --------------------------------------------------------------------------- the JPEG copy


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    handle = archive.extractfile(member)
                    yield member.name, handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"CIFAR-10: '{path}' is not a readable tar archive ({type(exc).__name__}: {exc}); the file "
                        "is damaged or incomplete: copy it again, or extract it and pass the folder") from exc


def _folder_members(train: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(train.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(train.parent)), path.read_bytes()


def _decode(name: str, data: bytes, where: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"CIFAR-10: '{name}' in '{where}' is not a readable JPEG image ({exc}); replace or remove "
                        "it") from exc
    if array.shape != (32, 32, 3):
        raise DataError(f"CIFAR-10: '{name}' in '{where}' is {array.shape[1]}x{array.shape[0]} pixels, expected "
                        "32x32 as every CIFAR image; replace or remove it")
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@lru_cache(maxsize=2)
def _read_jpeg_cached(source: str, _stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    where = Path(source)
    members = _folder_members(where) if where.is_dir() else _archive_members(where)
    images, labels, seen = [], [], set()
    index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    for name, data in members:
        parts = Path(name).parts
        if not name.lower().endswith(_JPEG_SUFFIXES) or len(parts) < 3 or parts[-3] != "train":
            continue
        cls = parts[-2]
        if cls not in index:
            raise DataError(f"CIFAR-10: '{where}' has a class folder '{cls}' ('{name}'); expected CIFAR-10's "
                            f"classes {', '.join(CIFAR10_CLASSES)}")
        images.append(_decode(name, data, where))
        labels.append(index[cls])
        seen.add(cls)
    missing = [c for c in CIFAR10_CLASSES if c not in seen]
    if missing:
        raise DataError(f"CIFAR-10: '{where}' has no images of {', '.join(missing)}; expected train/<class>/*.jpg for "
                        f"every class of CIFAR-10 ({', '.join(CIFAR10_CLASSES)}): the copy is incomplete")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def read_cifar10_jpeg(source: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the CIFAR-10 JPEG copy (a tar archive, or a ``train/`` folder of class folders) into memory.

    Returns ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` in archive (or sorted file)
    order, and labels in CIFAR-10's order. The result is kept for the process, keyed
    by the source's path, size and modification time, so repeated loads (a benchmark's
    cells, a study's trials) decode once, and a changed source is decoded anew.

    Raises:
        DataError: a damaged archive, an unreadable or non-32x32 image, a class folder
            that is not CIFAR-10's, or a class without images; the message names it.
    """
    path = Path(source).resolve()
    if path.is_dir():
        stats = ((p, p.stat()) for p in sorted(path.rglob("*")) if p.is_file())
        stamp = tuple((str(p), st.st_size, st.st_mtime_ns) for p, st in stats)
    else:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    return _read_jpeg_cached(str(path), stamp)


def _load_cifar10_jpeg(cfg: DataConfig, source: Path) -> Datasets:
    logger.info("decoding the CIFAR-10 JPEG copy in %s", source)
    images, labels = read_cifar10_jpeg(source)
    train_idx, val_idx, holdout = validation_indices(cfg, len(labels), labels.numpy())
    counts = np.bincount(labels[val_idx].numpy(), minlength=10)
    split = {"source": str(source), "images": len(labels), "kind": "stratified", "seed": cfg.split_seed,
             "val_fraction": cfg.val_fraction, "train": len(train_idx), "val": len(val_idx),
             "val_per_class": dict(zip(CIFAR10_CLASSES, counts.tolist())), **holdout, "val_indices": val_idx}
    classes = list(CIFAR10_CLASSES)
    return Datasets(
        train=_in_memory(images[train_idx], labels[train_idx], cfg, classes, train=True),
        val=_in_memory(images[val_idx], labels[val_idx], cfg, classes, train=False),
        num_classes=10, in_channels=3, input_size=(32, 32), name=cfg.dataset, split=split,
    )
