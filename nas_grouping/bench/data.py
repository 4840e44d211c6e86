"""Does the data path keep up with the model? One training epoch against the model's own step time.

On a 2-core CPU the data path competes with the model for the same cores. This
benchmark times, in one process and on the same batches: the model alone (forward,
backward and SGD step on batches prepared beforehand), an epoch through the in-memory
path (:class:`~nas_grouping.data.TensorBatchLoader`), and a few batches through the
per-sample torchvision transforms a user would otherwise write (PIL crop and flip,
``ToTensor``, ``Normalize`` in a DataLoader), extrapolated to an epoch. The ratios are
what to read: 1.0 means the data costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nas_grouping.config import setting
from nas_grouping.data import DataConfig, load_datasets
from nas_grouping.errors import ConfigError
from nas_grouping.latency.timer import machine_info
from nas_grouping.runtime import setup_runtime
from nas_grouping.training import epoch_loader

__all__ = ["DataBenchConfig", "bench_data", "format_data_bench"]


@dataclass
class DataBenchConfig:
    """`nas-grouping bench data`: the data path against the model's step time."""

    data_dir: str = setting("../shared/data/cifar10", "CIFAR-10: the JPEG copy (tarball or folder) or the pickle folder")
    space: str = setting("resnet20", "the model whose step time the data path is compared with")
    batch_size: int = setting(256, "batch size")
    batches: int | None = setting(None, "batches of the in-memory epoch to time (default: the whole epoch)")
    old_batches: int = setting(8, "batches timed through the per-sample torchvision transforms (extrapolated)")
    old_workers: int = setting(0, "DataLoader workers of the per-sample path")
    channels_last: bool = setting(True, "the model in channels-last memory format (faster on this CPU)")
    out: str | None = setting(None, "also write the result as JSON here")

    def __post_init__(self) -> None:
        for name in ("batch_size", "old_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batches is not None and self.batches < 2:
            raise ConfigError(f"batches must be >= 2 or unset (the whole epoch), got {self.batches}")


class _PerSample(Dataset):
    """The CIFAR training images through torchvision's usual per-sample PIL transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        import torchvision.transforms as T

        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_data(cfg: DataBenchConfig) -> dict[str, Any]:
    """Time the model alone, the in-memory epoch, and the per-sample path; return seconds and ratios."""
    from nas_grouping.data import make_loader
    from search_spaces import get_space

    rt = setup_runtime("cpu", "32", cfg.channels_last, False)
    start = time.perf_counter()
    ds = load_datasets(DataConfig(dataset="cifar10", data_dir=cfg.data_dir, batch_size=cfg.batch_size))
    load_s = time.perf_counter() - start
    torch.manual_seed(0)
    model = get_space(cfg.space, num_classes=ds.num_classes, in_channels=ds.in_channels, dense=True).to(rt.device)
    model = rt.prepare(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(rt.to_device(x)), y).backward()
        opt.step()

    def loader():
        return epoch_loader(ds.train, rt, batch_size=cfg.batch_size, train=True, seed=0, epoch=0)

    n = min(cfg.batches or len(loader()), len(loader()))
    t = time.perf_counter()
    batches = [b for _, b in zip(range(n), loader())]
    data_only_s = time.perf_counter() - t
    for x, y in batches[:2]:  # warm-up
        step(x, y)
    t = time.perf_counter()
    for x, y in batches:
        step(x, y)
    model_s = time.perf_counter() - t
    del batches
    t = time.perf_counter()
    for _, (x, y) in zip(range(n), loader()):
        step(x, y)
    epoch_s = time.perf_counter() - t

    images = ds.train.images
    mean, std = ds.train.mean, ds.train.std
    old = make_loader(_PerSample(images, ds.train.targets, mean, std), batch_size=cfg.batch_size, shuffle=True,
                      num_workers=cfg.old_workers, seed=0)
    old_it = iter(old)
    next(old_it)
    t = time.perf_counter()
    for _, (x, y) in zip(range(cfg.old_batches), old_it):
        step(x, y)
    old_s = time.perf_counter() - t
    model_per_batch = model_s / n
    result = {
        "dataset": "cifar10", "data_dir": cfg.data_dir, "images": len(ds.train), "load_s": load_s,
        "space": cfg.space, "batch_size": cfg.batch_size, "channels_last": cfg.channels_last,
        "batches_timed": n, "batches_per_epoch": len(loader()),
        "model_s_per_batch": model_per_batch, "data_only_s_per_batch": data_only_s / n,
        "in_memory_s_per_batch": epoch_s / n, "in_memory_ratio": epoch_s / model_s,
        "old_batches_timed": cfg.old_batches, "old_workers": cfg.old_workers,
        "old_s_per_batch": old_s / cfg.old_batches, "old_ratio": (old_s / cfg.old_batches) / model_per_batch,
        "epoch_s_in_memory": epoch_s / n * len(loader()), "epoch_s_model_only": model_per_batch * len(loader()),
        "epoch_s_old_extrapolated": old_s / cfg.old_batches * len(loader()),
        **machine_info(),
    }
    if cfg.out:
        from nas_grouping.report import write_json

        write_json(cfg.out, result)
    return result


def format_data_bench(r: dict[str, Any]) -> str:
    """The result as a few readable lines."""
    return "\n".join([
        f"CIFAR-10 ({r['images']:,} training images, decoded into memory in {r['load_s']:.1f} s), {r['space']}, "
        f"batch {r['batch_size']}, channels_last={r['channels_last']}, {r.get('threads')} threads, "
        f"torch {r.get('torch')}",
        f"  model alone (forward+backward+step, batches prepared): {r['model_s_per_batch'] * 1e3:8.1f} ms/batch",
        f"  in-memory path, data alone:                            {r['data_only_s_per_batch'] * 1e3:8.1f} ms/batch",
        f"  in-memory epoch ({r['batches_timed']} batches):       {r['in_memory_s_per_batch'] * 1e3:8.1f} ms/batch"
        f"  = {r['in_memory_ratio']:.3f}x the model alone",
        f"  per-sample torchvision path ({r['old_batches_timed']} batches, {r['old_workers']} workers): "
        f"{r['old_s_per_batch'] * 1e3:8.1f} ms/batch = {r['old_ratio']:.2f}x the model alone",
        f"  an epoch of {r['batches_per_epoch']} batches: model alone {r['epoch_s_model_only']:.0f} s, in-memory "
        f"{r['epoch_s_in_memory']:.0f} s, per-sample path {r['epoch_s_old_extrapolated']:.0f} s (extrapolated)",
    ])
