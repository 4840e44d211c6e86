"""Seeded DataLoaders for data sets that are read item by item (digits, ImageFolder)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nas_grouping.data.config import _is_int
from nas_grouping.errors import ConfigError

__all__ = ["make_loader"]


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

