"""Side-by-side timing: warm-up, interleaved repetitions, median; thread count recorded."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["sample_ms", "median_ms", "machine_info"]


def sample_ms(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10) -> dict[str, list[float]]:
    """Wall times (ms) of each function. They take turns within every repetition,
    so a noisy neighbour slows all of them alike and the ratios stay fair."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()  # GPU kernels run asynchronously: time until they are done, not until they are queued
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median wall time (ms) of each function, measured side by side (see ``sample_ms``)."""
    return {k: statistics.median(v) for k, v in sample_ms(fns, warmup=warmup, repeats=repeats).items()}


def machine_info() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
