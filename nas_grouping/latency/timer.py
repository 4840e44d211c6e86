"""Side-by-side timing: warm-up, interleaved repetitions, median; thread count recorded."""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from typing import Callable

import torch

__all__ = ["sample_ms", "median_ms", "enough_repeats", "machine_info", "keep_freed_memory", "freed_memory_kept"]

_KEPT: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of returning it to the system.

    With glibc's defaults every activation above the mmap threshold is mapped and
    unmapped on each forward pass, so a CPU model timed in a loop pays fresh page
    faults each call: a CIFAR ResNet-56 at batch 32 measured 69-71 ms alone on our
    2-core CPU and 45-46 ms with memory kept (``examples/freed_memory_timing.py``), and
    the slowdown depends on what else runs between calls, so tables and final timings
    disagreed. Keeping memory (as the CUDA caching
    allocator, jemalloc and tcmalloc do) gives steady, comparable timings; the price is
    that the process keeps its peak memory. The CLI calls this at start (set
    ``NAS_GROUPING_MALLOC=system`` to opt out). Returns whether it applied (glibc only).
    """
    global _KEPT
    if _KEPT is None:
        _KEPT = False
        if sys.platform.startswith("linux") and os.environ.get("NAS_GROUPING_MALLOC", "keep") != "system":
            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_max = -1, -4
                _KEPT = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
            except (OSError, AttributeError):
                _KEPT = False
    return _KEPT


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


def enough_repeats(ms_per_call: float, at_least: int, *, seconds: float = 1.0, at_most: int = 50) -> int:
    """Repetitions that fill about ``seconds`` of calls of ``ms_per_call`` (``at_least``..``at_most``):
    a 5 ms model timed 3 times moved its ratio to dense by 20-30% here, a 1 s one does not."""
    return max(at_least, min(at_most, int(seconds * 1e3 / max(ms_per_call, 1e-3))))


def median_ms(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median wall time (ms) of each function, measured side by side (see ``sample_ms``)."""
    return {k: statistics.median(v) for k, v in sample_ms(fns, warmup=warmup, repeats=repeats).items()}


def machine_info() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "freed_memory_kept": freed_memory_kept()}


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` applied in this process."""
    return bool(_KEPT)
