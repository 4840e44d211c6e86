"""Images held in memory as one uint8 tensor, augmented and normalised a whole batch at a time.

On a CPU with two cores, torchvision's per-sample PIL transforms cost more than the
ResNet-20 step they feed. Here a data set is decoded once into ``(N, C, H, W)``
uint8, kept on the training device, and every batch is cropped, flipped, cut out and
normalised as tensors in a few vectorised operations. The random draws come from a
CPU generator seeded per epoch, so a batch is the same on every device, and a run
resumed at epoch ``e`` sees the batches that an uninterrupted run would.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from nas_grouping.errors import ConfigError

__all__ = ["ImageTensorDataset", "TensorBatchLoader", "augment_batch", "tensor_source"]


def augment_batch(images: Tensor, generator: torch.Generator | None, *, crop_padding: int = 4,
                  flip: bool = True) -> Tensor:
    """Random crops (zero padding, then a crop of the original size) and horizontal flips of a batch.

    Args:
        images: ``(B, C, H, W)`` images of any dtype, on any device.
        generator: CPU generator for the random draws (None: torch's global RNG).
        crop_padding: Pixels of zero padding on every side before cropping; 0: no crop.
        flip: Flip each image left-right with probability 1/2.

    Returns:
        A new batch of the same shape, dtype and device.
    """
    b, c, h, w = images.shape
    device = images.device
    if crop_padding:
        p = crop_padding
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)).to(device)
        cols = (dx[:, None] + torch.arange(w)).to(device)
        images = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
        images = images.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(device)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


def _cutout(x: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """Zero a ``size`` x ``size`` square (clipped at the borders) centred at a random pixel of each image."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=generator).to(x.device)
    cx = torch.randint(0, w, (b,), generator=generator).to(x.device)
    lo = size // 2
    ys = torch.arange(h, device=x.device)[None, :] - cy[:, None]
    xs = torch.arange(w, device=x.device)[None, :] - cx[:, None]
    inside = ((ys >= -lo) & (ys < size - lo))[:, :, None] & ((xs >= -lo) & (xs < size - lo))[:, None, :]
    return x.masked_fill(inside[:, None], 0.0)


class ImageTensorDataset(Dataset):
    """uint8 images and integer labels in memory, normalised (and augmented) per batch.

    Items are ``(float tensor C x H x W, int label)`` as from any torchvision data set,
    so generic code keeps working; :func:`~nas_grouping.training.epoch_loader` instead
    batches it with :class:`TensorBatchLoader`, which is what makes it fast.

    Args:
        images: ``(N, C, H, W)`` uint8 images.
        labels: ``(N,)`` integer labels.
        mean: Per-channel mean of pixels scaled to [0, 1].
        std: Per-channel standard deviation, likewise.
        augment: Random crops and flips on this split.
        crop_padding: Zero padding before the random crop (pixels).
        cutout: Side of the square zeroed after normalisation; 0: none.
        classes: Class names in label order.
    """

    def __init__(self, images: Tensor, labels: Tensor | Sequence[int], *, mean: Sequence[float],
                 std: Sequence[float], augment: bool = False, crop_padding: int = 4, cutout: int = 0,
                 classes: Sequence[str] | None = None) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ConfigError(f"ImageTensorDataset: expected uint8 images (N, C, H, W) and N labels, got "
                              f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ConfigError(f"ImageTensorDataset: expected one mean and std per channel ({images.shape[1]}), "
                              f"got {len(mean)} and {len(std)}")
        self.images = images
        self.targets = labels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.crop_padding, self.cutout = bool(augment), int(crop_padding), int(cutout)
        self.classes = list(classes) if classes is not None else None
        self._on_device: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Images and labels on ``device``, copied there once."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.images.to(device)
            self._on_device[key + ":labels"] = self.targets.to(device)
        return self._on_device[key], self._on_device[key + ":labels"]

    def batch(self, index: Tensor, device: torch.device | None = None,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The normalised (and, for a training split, augmented) float batch at ``index``."""
        images, labels = self.on(device or self.images.device)
        index = index.to(images.device)
        x = images[index]
        if self.augment:
            x = augment_batch(x, generator, crop_padding=self.crop_padding)
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=x.device).view(1, -1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=x.device).view(1, -1, 1, 1)
        x = torch.addcmul(shift, x.float(), scale)
        if self.augment and self.cutout:
            x = _cutout(x, self.cutout, generator)
        return x, labels[index]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.batch(torch.tensor([int(index)]))
        return x[0], int(y[0])


def tensor_source(dataset: Dataset) -> tuple[ImageTensorDataset, Tensor] | None:
    """``(base, indices)`` when ``dataset`` is an :class:`ImageTensorDataset` or a (nested) Subset of one."""
    if isinstance(dataset, ImageTensorDataset):
        return dataset, torch.arange(len(dataset))
    if isinstance(dataset, Subset):
        inner = tensor_source(dataset.dataset)
        if inner is not None:
            base, indices = inner
            return base, indices[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    return None


class TensorBatchLoader:
    """Batches of an in-memory data set for one epoch: shuffled from ``seed``, sharded over ranks.

    Training batches follow one permutation drawn from ``seed`` (the same on every rank),
    of which rank ``r`` takes every ``world``-th sample; evaluation takes samples in order,
    rank ``r`` the ones at ``r, r + world, ...`` (no padding: metrics stay exact).
    """

    def __init__(self, dataset: ImageTensorDataset, indices: Tensor, *, batch_size: int, shuffle: bool,
                 seed: int, device: torch.device, drop_last: bool = False, rank: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), shuffle
        self.seed, self.device, self.drop_last = int(seed), device, drop_last
        self.indices, self.rank, self.world = indices, rank, world

    def _order(self, generator: torch.Generator) -> Tensor:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
            order = order[: len(order) - len(order) % self.world] if self.world > 1 else order
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        n = len(self.indices)
        if self.shuffle and self.world > 1:
            n -= n % self.world
        n = len(range(self.rank, n, self.world))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        order = self._order(generator)
        for i in range(len(self)):
            yield self.dataset.batch(order[i * self.batch_size : (i + 1) * self.batch_size], self.device, generator)
