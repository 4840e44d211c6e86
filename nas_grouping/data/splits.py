"""Seeded, stratified splits of any data set."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from nas_grouping.data.config import DataConfig, _check_fraction
from nas_grouping.errors import ConfigError

__all__ = ["split_dataset", "split_indices", "validation_indices", "refuse_holdout"]


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


def split_indices(n: int, fraction: float, seed: int, targets: np.ndarray | None) -> tuple[list[int], list[int]]:
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


def validation_indices(cfg: DataConfig, n: int, targets: np.ndarray | None
                       ) -> tuple[list[int], list[int], dict[str, int | bool]]:
    """Train and validation indices of a data set whose validation is carved from its ``n`` training images:
    ``cfg.val_fraction`` of them with ``cfg.split_seed`` (the split results are reported on). With
    ``cfg.holdout`` that split is set aside and a second one of the same size, carved from the rest with
    seed ``split_seed + 1``, validates instead. Also returns what to record of it."""
    train, val = split_indices(n, float(cfg.val_fraction), cfg.split_seed, targets)
    if not cfg.holdout:
        return train, val, {}
    kept = np.asarray(train, dtype=np.int64)
    first, second = split_indices(len(kept), len(val) / len(kept), cfg.split_seed + 1,
                                  None if targets is None else np.asarray(targets)[kept])
    return (sorted(int(i) for i in kept[first]), sorted(int(i) for i in kept[second]),
            {"holdout": True, "reported_val_set_aside": len(val)})


def refuse_holdout(cfg: DataConfig, why: str) -> None:
    """A one-line error for ``cfg.holdout`` on a data set that ships its own validation split (``why``)."""
    if cfg.holdout:
        raise ConfigError(f"holdout: {cfg.dataset} {why}, so there is no carved split to set aside; tune on that "
                          "validation split and report on a test split kept apart, or drop --holdout")


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
    first, second = split_indices(n, float(fraction), int(seed), _targets_of(dataset))
    return Subset(dataset, first), Subset(dataset, second)

