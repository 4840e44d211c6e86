"""The CIFAR-10 JPEG copy (tarball or folder, in the shipped layout), the in-memory batch path, and its splits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nas_grouping.search.loop as search_mod
from nas_grouping.config import SearchConfig
from nas_grouping.data import (
    CIFAR10_CLASSES,
    DataConfig,
    ImageTensorDataset,
    TensorBatchLoader,
    augment_batch,
    load_datasets,
)
from helpers import interrupt_train_epoch
from nas_grouping.errors import DataError
from nas_grouping.runtime import setup_runtime
from nas_grouping.search.loop import search
from nas_grouping.training import epoch_loader

PER_CLASS = 10


def _image(seed: int, size: int = 32) -> np.ndarray:
    """A smooth colour image (JPEG keeps it close), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [rng.uniform(40, 215) + 30 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * x + rng.uniform() * y))
                for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _files(classes=CIFAR10_CLASSES, per_class: int = PER_CLASS) -> dict[str, bytes]:
    return {f"train/{c}/{i:04d}.jpg": _jpeg(_image(100 * k + i)) for k, c in enumerate(classes)
            for i in range(per_class)}


def write_tarball(path: Path, files: dict[str, bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (files or _files()).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(root: Path, files: dict[str, bytes] | None = None) -> Path:
    for name, data in (files or _files()).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _load(data_dir: Path, **kw) -> object:
    return load_datasets(DataConfig(dataset="cifar10", data_dir=str(data_dir), **kw))


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize("layout", ["tarball", "folder-with-tarball", "extracted"])
def test_reads_the_copy_in_place_in_every_layout(tmp_path, layout):
    if layout == "tarball":
        data_dir = write_tarball(tmp_path / "cifar10-train-jpg.tar.gz")
    elif layout == "folder-with-tarball":
        write_tarball(tmp_path / "cifar10" / "cifar10-train-jpg.tar.gz")
        (tmp_path / "cifar10" / "README.md").write_text("not data")
        data_dir = tmp_path / "cifar10"
    else:
        data_dir = write_folder(tmp_path / "extracted")
    ds = _load(data_dir, augment=False)
    assert (len(ds.train), len(ds.val), ds.num_classes, ds.input_size) == (90, 10, 10, (32, 32))
    assert isinstance(ds.train, ImageTensorDataset) and ds.train.images.dtype == torch.uint8
    assert ds.train.classes == list(CIFAR10_CLASSES)
    # the validation images are the decoded files, normalised with CIFAR-10's statistics
    i = ds.split["val_indices"][0]
    label, k = divmod(i, PER_CLASS)
    original = torch.from_numpy(_image(100 * label + k)).permute(2, 0, 1).float()
    mean = torch.tensor(ds.val.mean).view(3, 1, 1)
    std = torch.tensor(ds.val.std).view(3, 1, 1)
    pixels = (ds.val[0][0] * std + mean) * 255
    assert ds.val[0][1] == label
    assert (pixels - original).abs().mean() < 4  # JPEG at quality 95 of a smooth image


def test_validation_is_a_seeded_stratified_split_recorded_with_the_run(tmp_path):
    data_dir = write_tarball(tmp_path / "c.tar.gz")
    a, b = _load(data_dir), _load(data_dir)
    assert a.split["val_indices"] == b.split["val_indices"]
    assert a.split["val_per_class"] == dict.fromkeys(CIFAR10_CLASSES, 1)
    assert (a.split["train"], a.split["val"], a.split["seed"], a.split["val_fraction"]) == (90, 10, 0, 0.1)
    other = _load(data_dir, split_seed=1)
    assert other.split["val_indices"] != a.split["val_indices"]
    assert sorted(int(y) for y in a.val.targets) == list(range(10))
    half = _load(data_dir, val_fraction=0.5)
    assert (len(half.train), len(half.val)) == (50, 50)
    held = _load(data_dir, holdout=True)  # for tuning: the reported split set aside, another validates
    assert held.split["holdout"] and held.split["reported_val_set_aside"] == 10
    assert (held.split["train"], held.split["val"]) == (80, 10)
    assert not set(held.split["val_indices"]) & set(a.split["val_indices"])
    assert held.split["val_per_class"] == dict.fromkeys(CIFAR10_CLASSES, 1)


def test_damaged_tarball_is_one_clear_error(tmp_path):
    good = write_tarball(tmp_path / "good.tar.gz").read_bytes()
    bad = tmp_path / "bad" / "cifar10-train-jpg.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="not a readable tar archive") as info:
        _load(bad)
    assert str(bad) in str(info.value)


def test_missing_class_folder_is_named(tmp_path):
    files = _files(classes=[c for c in CIFAR10_CLASSES if c != "frog"])
    with pytest.raises(DataError, match="frog"):
        _load(write_tarball(tmp_path / "c.tar.gz", files))


def test_label_set_that_is_not_cifar10_is_refused(tmp_path):
    files = {**_files(), "train/zebra/0000.jpg": _jpeg(_image(7))}
    with pytest.raises(DataError, match="zebra"):
        _load(write_folder(tmp_path / "x", files))


def test_image_that_is_not_32x32_is_named(tmp_path):
    files = {**_files(), "train/cat/0099.jpg": _jpeg(_image(7, size=40))}
    with pytest.raises(DataError, match=r"cat/0099\.jpg.*40x40.*32x32"):
        _load(write_tarball(tmp_path / "c.tar.gz", files))


def test_unreadable_jpeg_is_named(tmp_path):
    files = {**_files(), "train/dog/0042.jpg": b"\xff\xd8 not really a jpeg"}
    with pytest.raises(DataError, match=r"dog/0042\.jpg"):
        _load(write_folder(tmp_path / "x", files))


def test_folder_without_any_cifar_layout_keeps_the_old_hint(tmp_path):
    with pytest.raises(DataError, match="JPEG copy") as info:
        _load(tmp_path)
    assert "--download" in str(info.value)


def test_a_changed_source_is_read_anew(tmp_path):
    path = write_tarball(tmp_path / "c.tar.gz")
    before = _load(path).train.images.clone()
    write_tarball(path, _files(per_class=3))
    assert len(_load(path, val_fraction=0.5).train) == 15 != len(before) + 15


# --------------------------------------------------------------------------- batches


def _tiny(augment: bool, cutout: int = 0, n: int = 24) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageTensorDataset(images, torch.arange(n) % 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                              augment=augment, cutout=cutout)


def test_crop_and_flip_are_windows_of_the_padded_image():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(3), crop_padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    assert torch.equal(augment_batch(x, None, crop_padding=0, flip=False), x)
    shifted = [not torch.equal(out[i], x[i]) for i in range(16)]
    assert sum(shifted) >= 12  # nearly all moved: 1/81 chance of no shift, and flips


def test_cutout_zeroes_a_square_after_normalisation():
    ds = _tiny(augment=True, cutout=8)
    ds.crop_padding = 0
    x, _ = ds.batch(torch.arange(24), generator=torch.Generator().manual_seed(0))
    zeros = (x == 0).all(1).sum((1, 2))
    assert zeros.max() == 64 and zeros.min() >= 16  # a full 8x8 square, or one clipped at a corner


def test_epoch_batches_repeat_for_a_seed_and_differ_between_epochs():
    ds = _tiny(augment=True)
    rt = setup_runtime("cpu")

    def batches(epoch):
        return list(epoch_loader(ds, rt, batch_size=8, train=True, seed=5, epoch=epoch))

    first, again, second = batches(0), batches(0), batches(1)
    assert len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], second[0][0])
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(ds.targets.tolist())


def test_evaluation_batches_are_in_order_and_unaugmented():
    ds = _tiny(augment=False)
    rt = setup_runtime("cpu")
    x, y = next(iter(epoch_loader(ds, rt, batch_size=5, train=False, seed=0, epoch=0)))
    assert torch.equal(y, ds.targets[:5])
    assert torch.allclose(x[2], (ds.images[2].float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_ranks_take_disjoint_shards_of_one_permutation():
    ds = _tiny(augment=False, n=23)
    idx = torch.arange(23)
    for shuffle in (True, False):
        seen = []
        for rank in range(2):
            loader = TensorBatchLoader(ds, idx, batch_size=4, shuffle=shuffle, seed=1, device=torch.device("cpu"),
                                       rank=rank, world=2)
            ys = [int(v) for _, y in loader for v in y]
            assert len(loader) == -(-len(ys) // 4)
            seen.append(ys)
        # training drops the odd sample so that ranks take equal steps; evaluation sees every sample once
        assert len(seen[0]) + len(seen[1]) == (22 if shuffle else 23)


def test_subsets_of_in_memory_data_stay_on_the_fast_path():
    from nas_grouping.data import split_dataset

    first, _ = split_dataset(_tiny(augment=False), 0.25, seed=0)
    loader = epoch_loader(first, setup_runtime("cpu"), batch_size=6, train=False, seed=0, epoch=0)
    assert isinstance(loader, TensorBatchLoader)
    assert sum(len(y) for _, y in loader) == len(first)


# --------------------------------------------------------------------------- runs


def _train_config(data_dir: Path, out: Path, **kw) -> SearchConfig:
    base = dict(space="resnet20", dense=True, epochs=2, finetune_epochs=0, warmup_epochs=0, progress=False,
                measure_latency=False, out=str(out), lr_schedule="onecycle", lr_warmup_epochs=1.0,
                label_smoothing=0.1, data=DataConfig(dataset="cifar10", data_dir=str(data_dir), batch_size=16))
    base.update(kw)
    return SearchConfig(**base)


def test_training_on_the_copy_writes_the_split_and_resumes_exactly(tmp_path, monkeypatch):
    data_dir = write_tarball(tmp_path / "c.tar.gz")
    whole = search(_train_config(data_dir, tmp_path / "a"))
    split = json.loads((tmp_path / "a" / "data_split.json").read_text())
    assert split["val_indices"] == whole_split(data_dir) and split["seed"] == 0
    lrs = [row["lr"] for row in whole.history]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)  # onecycle ends at 0

    real = search_mod.train_epoch
    cfg = _train_config(data_dir, tmp_path / "b")
    interrupt_train_epoch(monkeypatch, search_mod, at=2)
    with pytest.raises(KeyboardInterrupt):
        search(cfg)
    monkeypatch.setattr(search_mod, "train_epoch", real)
    resumed = search(cfg, resume=True)
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-5)
    assert resumed.summary["val_acc"] == whole.summary["val_acc"]


def whole_split(data_dir: Path) -> list[int]:
    return _load(data_dir).split["val_indices"]


def test_data_benchmark_reports_ratios_on_a_small_copy(tmp_path):
    from nas_grouping.bench.data import DataBenchConfig, bench_data, format_data_bench

    data_dir = write_tarball(tmp_path / "c.tar.gz")
    result = bench_data(DataBenchConfig(data_dir=str(data_dir), batch_size=16, batches=2, old_batches=1,
                                        out=str(tmp_path / "bench.json")))
    assert result["batches_timed"] == 2 and result["batches_per_epoch"] == 5
    assert result["in_memory_ratio"] > 0 and result["old_ratio"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["images"] == 90
    assert "x the model alone" in format_data_bench(result)
