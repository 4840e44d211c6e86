"""Side-by-side timing: warm-up, interleaved repetitions, median; thread count recorded."""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

__all__ = ["sample_ms", "median_ms", "UnstableTimingWarning", "enough_repeats", "machine_info", "keep_freed_memory",
           "freed_memory_kept"]

_KEPT: bool | None = None
#: interquartile range over median above which a sample counts as unstable
UNSTABLE_SPREAD = 1.0


class UnstableTimingWarning(UserWarning):
    """Repeated timings of one function disagreed too much to be trusted as absolute times."""


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


def _spread(times: list[float]) -> float:
    """Interquartile range over median: how much one function's repeated timings disagree."""
    if len(times) < 4:
        return 0.0
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / max(q[1], 1e-9)


def _sample_once(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
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


def sample_ms(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10,
              max_spread: float = UNSTABLE_SPREAD, retries: int = 1) -> dict[str, list[float]]:
    """Wall times (ms) of each function. They take turns within every repetition,
    so a noisy neighbour slows all of them alike and the ratios stay fair.

    Unstable timings are detected: when a function's interquartile range exceeds ``max_spread``
    of its median (another process took the cores for part of the run), the whole sample is
    taken again, up to ``retries`` times, and the steadiest is kept; if it is still unstable an
    ``UnstableTimingWarning`` says so (ratios measured side by side still hold; absolute times do not).
    """
    best: dict[str, list[float]] | None = None
    for attempt in range(retries + 1):
        times = _sample_once(fns, warmup, repeats)
        worst = max((_spread(v) for v in times.values()), default=0.0)
        if best is None or worst < max(_spread(v) for v in best.values()):
            best = times
        if worst <= max_spread:
            return times
    spreads = {k: _spread(v) for k, v in best.items()}
    name = max(spreads, key=spreads.get)
    message = (f"unstable timings: {name} varied by {spreads[name]:.0%} of its median "
               f"({statistics.median(best[name]):.3g} ms; interquartile range over {repeats} repeats) after "
               f"{retries + 1} tries; the machine is busy: ratios measured side by side still hold, absolute times "
               "do not")
    warnings.warn(message, UnstableTimingWarning, stacklevel=2)
    return best


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
