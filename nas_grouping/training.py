"""The pieces every training loop here shares: seeding, epoch loaders, one epoch, evaluation, checkpoints.

The search loop and the self-grouping fine-tuning both call ``train_epoch`` and
``evaluate``; the search adds gate steps through its arguments rather than a
loop of its own. Loaders are rebuilt per epoch from ``seed + epoch``, so a run
resumed from a checkpoint sees the same batches as one that never stopped.
Checkpoints are written to a temporary file and renamed, so a crash mid-write
never destroys the last good one.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from nas_grouping.data import TensorBatchLoader, make_loader, tensor_source
from nas_grouping.errors import ConfigError
from nas_grouping.files import atomic_write
from nas_grouping.runtime import Runtime

__all__ = ["seed_everything", "epoch_loader", "train_epoch", "evaluate", "save_checkpoint", "load_checkpoint",
           "make_lr_scheduler", "EpochStats", "Distillation"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _ShardSampler(Sampler[int]):
    """Rank r takes samples r, r + world, ... in order: no padding, so metrics stay exact."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_loader(dataset: Dataset, rt: Runtime, *, batch_size: int, train: bool, seed: int, epoch: int,
                 num_workers: int = 0) -> Iterable:
    """A loader for one epoch: shuffled from ``seed`` and ``epoch`` for training, in order for evaluation.

    Data held in memory (CIFAR) is batched on the training device by a
    :class:`~nas_grouping.data.TensorBatchLoader` (``num_workers`` does not apply);
    other data sets go through a seeded DataLoader.
    """
    source = tensor_source(dataset)
    if source is not None:
        base, indices = source
        return TensorBatchLoader(base, indices, batch_size=batch_size, shuffle=train, seed=seed * 100_003 + epoch,
                                 device=rt.device, drop_last=train and len(dataset) > batch_size * rt.world_size,
                                 rank=rt.rank, world=rt.world_size)
    pin = rt.device.type == "cuda"
    if train:
        sampler = rt.sampler(dataset, shuffle=True, seed=seed)
        if sampler is not None:
            sampler.set_epoch(epoch)
        return make_loader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                           num_workers=num_workers, seed=seed * 100_003 + epoch, pin_memory=pin,
                           drop_last=len(dataset) > batch_size * rt.world_size)
    sampler = _ShardSampler(len(dataset), rt.rank, rt.world_size) if rt.distributed else None
    return make_loader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers,
                       pin_memory=pin)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, epochs: int, steps_per_epoch: int,
                      warmup_epochs: float = 0.0) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The learning-rate schedule of a training run, and whether it steps per batch (else per epoch).

    ``cosine`` anneals to 0 over ``epochs``, one step per epoch; ``onecycle`` rises linearly
    from 0 over ``warmup_epochs``, then falls linearly to 0 at the last batch.
    """
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs), False
    if kind != "onecycle":
        raise ConfigError(f"lr_schedule must be cosine or onecycle, got {kind!r}")
    total = max(1, epochs * steps_per_epoch)
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


class EpochStats(dict):
    """loss, acc and samples of one pass (summed over ranks)."""


class Distillation:
    """Knowledge distillation from a teacher (Hinton et al., 2015), the usual lever to recover accuracy when a
    compressed model is fine-tuned from the model it came from.

    The loss minimised is ``(1 - weight) * task + weight * T^2 * KL(teacher || student)`` with both softmaxes at
    temperature ``T``. The teacher is a frozen copy in eval mode, run without gradients on the student's batch.
    """

    def __init__(self, teacher: nn.Module, *, weight: float = 0.5, temperature: float = 4.0) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if not 0 < weight <= 1:
            raise ConfigError(f"distillation weight must be in (0, 1], got {weight}")
        if not temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)

    def place(self, rt: Runtime) -> "Distillation":
        """Put the teacher where the student trains: ``rt``'s device and memory format (never DDP-wrapped)."""
        self.teacher.to(rt.device)
        if rt.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        return self

    def loss(self, x: Tensor, logits: Tensor, task: Tensor) -> Tensor:
        """The distilled loss of a batch ``x`` whose student ``logits`` gave the task loss ``task``."""
        with torch.no_grad():
            target = self.teacher(x).float()
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(target / t, 1), log_target=True,
                      reduction="batchmean")
        return (1 - self.weight) * task + self.weight * t * t * kl


def _to_targets(y: Any, rt: Runtime) -> Tensor:
    return torch.as_tensor(y).to(rt.device, non_blocking=True).long()


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    rt: Runtime,
    *,
    weight_optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    loss_hook: Callable[[Tensor], Tensor] | None = None,
    gate_step: Callable[[], None] | None = None,
    gate_optimizer: torch.optim.Optimizer | None = None,
    label_smoothing: float = 0.0,
    batch_scheduler: Any = None,
    distill: Distillation | None = None,
    progress: bool = False,
    desc: str = "train",
) -> EpochStats:
    """One pass over ``loader`` updating the weights (and, when given, the gates).

    Args:
        loss_hook: maps the task loss to the loss that is minimised (a regularizer).
        gate_optimizer: stepped together with the weights (single-level search).
        gate_step: called before each weight step (bi-level search: a gate update
            on its own batch).
        label_smoothing: of the training loss (the reported loss is plain cross-entropy).
        batch_scheduler: a learning-rate scheduler stepped after every weight step.
        distill: a teacher whose outputs the loss also follows (applied before ``loss_hook``).
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and rt.is_main), dynamic_ncols=True)
    for x, y in bar:
        if gate_step is not None:
            gate_step()
        x, y = rt.to_device(x), _to_targets(y, rt)
        weight_optimizer.zero_grad(set_to_none=True)
        if gate_optimizer is not None:
            gate_optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            out = model(x)
            task = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
            trained = distill.loss(x, out, task) if distill is not None else task
        loss = loss_hook(trained) if loss_hook is not None else trained
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{desc}: the loss became {loss.item()} (diverged); lower the learning rate or the regularizer strength"
            )
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(weight_optimizer)
            if gate_optimizer is not None:
                scaler.step(gate_optimizer)
            scaler.update()
        else:
            loss.backward()
            weight_optimizer.step()
            if gate_optimizer is not None:
                gate_optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        n = y.shape[0]
        plain = F.cross_entropy(out.detach().float(), y) if label_smoothing else task.detach()
        total_loss += float(plain) * n
        correct += int((out.detach().argmax(1) == y).sum())
        seen += n
    total_loss, correct, seen = rt.all_reduce_sum([total_loss, correct, seen])
    return EpochStats(loss=total_loss / max(seen, 1), acc=correct / max(seen, 1), samples=int(seen))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, rt: Runtime) -> EpochStats:
    """Mean cross-entropy and accuracy over ``loader`` (exact under DDP: shards, no padding)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = rt.to_device(x), _to_targets(y, rt)
        with rt.autocast():
            out = model(x)
        total_loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        seen += y.shape[0]
    total_loss, correct, seen = rt.all_reduce_sum([total_loss, correct, seen])
    return EpochStats(loss=total_loss / max(seen, 1), acc=correct / max(seen, 1), samples=int(seen))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` written atomically: a crash mid-write keeps the last good checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path.resolve()}: nothing to resume; run without --resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # several exception types for corrupt files
        raise ConfigError(f"{path} is not a readable checkpoint ({exc}); remove it to start over") from exc
