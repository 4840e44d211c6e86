"""Where and how a training loop runs: device, precision, and torchrun/DDP.

The loops stay the same in one process and under ``torchrun``: they ask the
runtime for the device, an autocast context, a sampler per data split, and
whether this rank writes files. Under torchrun (``WORLD_SIZE`` > 1) the model is
wrapped in DistributedDataParallel; gate latents are ordinary parameters of the
DDP model, so their gradients are all-reduced with the weights and every rank
applies the same update.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from nas_grouping.errors import ConfigError

__all__ = ["Runtime", "resolve_device", "setup_runtime"]

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N`` checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


@dataclass
class Runtime:
    device: torch.device
    precision: str = "32"
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False
    compile: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "16")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (and memory format); wrap it in DDP under torchrun."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.compile:
            model = torch.compile(model)
        return model

    def sampler(self, dataset: Dataset, *, shuffle: bool, seed: int) -> DistributedSampler | None:
        if not self.distributed:
            return None
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum Python numbers over ranks (metrics); identity in one process."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision every rank must share)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` run on rank 0 only (a measurement, a file written once), its result on every rank.

        If it raises, rank 0 raises that error and the other ranks a ``RuntimeError`` naming ``what``
        and the error, so that no rank is left waiting for a result that never comes.
        """
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as exc:
                error = exc
        value, failed = self.broadcast((value, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"{what} failed on rank 0: {failed}")
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (for consistency checks)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup_runtime(device: str = "auto", precision: str = "32", channels_last: bool = False,
                  compile: bool = False) -> Runtime:
    """Build the runtime; under torchrun this also joins the process group (gloo on CPU, nccl on GPU)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if precision == "16" and dev.type == "cpu":
        raise ConfigError("precision 16 (float16 with a gradient scaler) needs a GPU; use bf16 on the CPU")
    return Runtime(device=dev, precision=precision, rank=rank, world_size=world, channels_last=channels_last,
                   compile=compile)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP or torch.compile wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def main_first(rt: Runtime) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download), the other ranks after it."""
    if not rt.is_main:
        rt.barrier()
    yield
    if rt.is_main:
        rt.barrier()
