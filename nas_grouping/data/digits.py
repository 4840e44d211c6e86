"""scikit-learn's bundled 8x8 digits: 1797 real images, no download, searches and tests in seconds."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nas_grouping.data.config import DataConfig, Datasets
from nas_grouping.data.splits import validation_indices
from nas_grouping.errors import ConfigError

__all__ = ["DigitsDataset", "load_digits"]


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


def load_digits(cfg: DataConfig) -> Datasets:
    """The bundled digits, split into train/validation by ``cfg.val_fraction`` (stratified, seeded)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx, _ = validation_indices(cfg, len(labels), bunch.target)
    train_x, val_x = images[train_idx], images[val_idx]
    mean = float(train_x.mean())
    std = float(train_x.std()) or 1.0
    common = {"pad_value": -mean / std, "mean": mean, "std": std}
    train = DigitsDataset(
        (train_x - mean) / std, labels[train_idx], augment=cfg.augment, indices=train_idx, **common
    )
    val = DigitsDataset((val_x - mean) / std, labels[val_idx], augment=False, indices=val_idx, **common)
    return Datasets(train=train, val=val, num_classes=10, in_channels=1, input_size=(8, 8), name=cfg.dataset)

