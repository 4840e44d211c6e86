"""SG-CNN's per-layer steps: k-means over filters (by importance vectors), centroid-based pruning.

Guo et al., "Self-grouping Convolutional Neural Networks", Neural Networks 2020, Sec. 3.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["kmeans_labels", "balance_labels", "centroid_prune", "Pruning"]

_SMALL_KMEANS = 200_000  # filters x input channels below which k-means runs on one thread


def kmeans_labels(vectors: np.ndarray, k: int, *, seed: int, restarts: int, init: str) -> np.ndarray:
    """Cluster the rows of ``vectors`` into at most ``k`` clusters (scikit-learn k-means, seeded).

    Labels are renumbered by first appearance, so equal inputs give equal groupings. Fewer
    clusters come back when the rows hold fewer than ``k`` distinct values.
    """
    n = vectors.shape[0]
    if k <= 1:
        labels = np.zeros(n, dtype=np.int64)
    elif k >= n:
        labels = np.arange(n, dtype=np.int64)
    else:
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        # small layers: OpenMP threads cost more than they save (7x on a shared 2-core CPU)
        threads = 1 if vectors.size < _SMALL_KMEANS else None
        with warnings.catch_warnings(), threadpool_limits(limits=threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=k, init=init, n_init=restarts, max_iter=300, random_state=seed)
            labels = km.fit_predict(np.ascontiguousarray(vectors, dtype=np.float64))
    labels = np.asarray(labels, dtype=np.int64)
    used, first = np.unique(labels, return_index=True)
    by_appearance = used[np.argsort(first)]
    renumber = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    renumber[by_appearance] = np.arange(by_appearance.size)
    return renumber[labels]


def balance_labels(vectors: np.ndarray, labels: np.ndarray, k: int, *, iterations: int = 10) -> np.ndarray:
    """Equal-size clusters (sizes differ by at most one) near the k-means ones.

    Alternates an optimal assignment of the rows to k clusters of fixed capacities (squared
    distance to the centroids; ``scipy.optimize.linear_sum_assignment`` over capacity slots)
    with recomputing the centroids, starting from the k-means centroids.
    """
    from scipy.optimize import linear_sum_assignment

    n = vectors.shape[0]
    k = min(k, n)
    if k <= 1 or k >= n:
        return labels
    capacity = np.array([n // k + (1 if c < n % k else 0) for c in range(k)])
    slots = np.repeat(np.arange(k), capacity)
    centroids = np.stack([vectors[labels == c].mean(0) if np.any(labels == c) else vectors[c] for c in range(k)])
    for _ in range(iterations):
        cost = ((vectors[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost[:, slots])
        new = np.empty(n, dtype=np.int64)
        new[rows] = slots[cols]
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack([vectors[labels == c].mean(0) for c in range(k)])
    return labels


@dataclass
class Pruning:
    """What centroid-based pruning decided for one layer."""

    mask: Tensor                   # C_out x C_in, bool, inside the existing mask
    groups: list[list[int]]        # filter groups F_g (clusters split by their existing mask rows)
    clusters: int                  # non-empty k-means clusters
    threshold: float               # highest centroid value pruned; -inf if nothing was
    kept: int                      # kept connections


def centroid_prune(importance: np.ndarray, mask: Tensor, labels: np.ndarray, keep: int, *,
                   mode: str = "layer") -> Pruning:
    """Prune the (group, input channel) pairs of lowest centroid value until at most ``keep`` connections remain.

    Each filter's value for input channel i is its cluster centroid at i, times the existing mask
    (so pruning stays inside it). ``mode="layer"`` is the paper's percentile threshold over
    all centroid values of the layer, counted per filter; ties are broken by group and channel
    order, so the kept count never exceeds ``keep``. ``mode="cluster"`` keeps the same share
    of input channels in every group (each its own most important ones, rounded down), which
    gives groups of equal input width: the diverse group layer's one-kernel grouped form then
    wastes no padding. Filters of a cluster whose existing mask rows differ (a grouped layer)
    form separate groups, as each group must read one input set.
    """
    m = mask.numpy().astype(bool)
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    centroids = np.zeros((n_clusters, m.shape[1]))
    np.add.at(centroids, labels, importance)
    centroids /= np.bincount(labels, minlength=n_clusters)[:, None]
    groups: dict[tuple[int, bytes], list[int]] = {}
    for o, label in enumerate(labels.tolist()):
        groups.setdefault((label, m[o].tobytes()), []).append(o)
    keys = list(groups)
    values, weights, group_idx, channels = [], [], [], []
    for g, key in enumerate(keys):
        cols = np.flatnonzero(m[groups[key][0]])
        values.append(centroids[key[0], cols])
        weights.append(np.full(cols.size, len(groups[key]), dtype=np.int64))
        group_idx.append(np.full(cols.size, g, dtype=np.int64))
        channels.append(cols)
    values_a = np.concatenate(values) if values else np.zeros(0)
    weights_a = np.concatenate(weights) if weights else np.zeros(0, dtype=np.int64)
    group_a = np.concatenate(group_idx) if group_idx else np.zeros(0, dtype=np.int64)
    chan_a = np.concatenate(channels) if channels else np.zeros(0, dtype=np.int64)
    existing = int(weights_a.sum())
    to_prune = existing - max(int(keep), 0)
    new = m.copy()
    cut = float("-inf")
    pruned = 0
    if to_prune > 0 and mode == "cluster":
        share = max(int(keep), 0) / existing
        for g, key in enumerate(keys):
            sel = np.flatnonzero(group_a == g)
            n_drop = sel.size - int(np.floor(share * sel.size + 1e-9))
            if n_drop <= 0:
                continue
            drop = sel[np.lexsort((chan_a[sel], values_a[sel]))[:n_drop]]
            new[np.ix_(groups[key], chan_a[drop])] = False
            cut = max(cut, float(values_a[drop].max()))
            pruned += n_drop * len(groups[key])
    elif to_prune > 0:
        order = np.lexsort((chan_a, group_a, values_a))
        cum = np.cumsum(weights_a[order])
        n = int(np.searchsorted(cum, to_prune)) + 1
        chosen = order[:n]
        for g, i in zip(group_a[chosen].tolist(), chan_a[chosen].tolist()):
            new[groups[keys[g]], i] = False
        cut = float(values_a[chosen[-1]])
        pruned = int(cum[n - 1])
    return Pruning(mask=torch.from_numpy(new), groups=[groups[k] for k in keys], clusters=n_clusters,
                   threshold=cut, kept=existing - pruned)
