"""One subfolder per class, with or without train/ + val/ (read item by item with PIL)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torchvision.transforms as T
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from nas_grouping.data.config import DataConfig, Datasets, require_data_dir
from nas_grouping.data.splits import refuse_holdout, validation_indices
from nas_grouping.errors import DataError

__all__ = ["load_imagefolder"]

logger = logging.getLogger("nas_grouping")

_DEFAULT_IMAGEFOLDER_SIZE = 224
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _load_rgb(path: str) -> Any:
    """PIL's RGB image at ``path``, or a DataError naming the file (not a traceback from inside the loader)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"image file '{path}' cannot be read ({exc}); remove or replace it, or load with "
                        "--check-images skip to leave unreadable files out") from None


def _readable(path: str) -> bool:
    try:
        _load_rgb(path)
    except DataError:
        return False
    return True


def _check_images(folder: ImageFolder, mode: str, role: str) -> None:
    """``check``: fail before training on any unreadable image, naming them; ``skip``: leave them out."""
    if mode == "lazy":
        return
    bad = [p for p, _ in folder.samples if not _readable(p)]
    if not bad:
        return
    if mode == "check":
        shown = ", ".join(f"'{p}'" for p in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} image file(s) of the {role} cannot be read: {shown}; remove or replace them, "
                        "or pass --check-images skip to leave them out")
    logger.warning("leaving out %d unreadable image file(s) of the %s, e.g. %s", len(bad), role, bad[0])
    unreadable = set(bad)
    folder.samples = [s for s in folder.samples if s[0] not in unreadable]
    folder.imgs = folder.samples
    folder.targets = [t for _, t in folder.samples]


def _image_folder(path: Path, transform: Callable | None, role: str, check: str = "lazy") -> ImageFolder:
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
        folder = ImageFolder(str(path), transform=transform, loader=_load_rgb)
    except (FileNotFoundError, OSError, RuntimeError, ValueError) as exc:
        raise DataError(
            f"image folder '{path}' ({role}) has no usable images ({exc}); expected {expects}. "
            "Add images to every class subfolder or remove the empty ones."
        ) from exc
    _check_images(folder, check, role)
    return folder


def load_imagefolder(cfg: DataConfig) -> Datasets:
    root = require_data_dir(cfg, "imagefolder", "point it at a folder with one subfolder per class (or train/ and "
                            "val/ holding those)")
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
        refuse_holdout(cfg, f"in {root} ships its own val/ folder")
        train = _image_folder(root / "train", train_tf, "training split", cfg.check_images)
        val = _image_folder(root / "val", val_tf, "validation split", cfg.check_images)
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
        base = _image_folder(root, None, "split into train/val by val_fraction", cfg.check_images)
        train_idx, val_idx, _ = validation_indices(cfg, len(base), np.asarray(base.targets))
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

