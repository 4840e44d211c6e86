"""Tests of nas_grouping.data: bundled digits, CIFAR files in the real format, ImageFolder."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from nas_grouping.data import (
    DATASETS,
    DataConfig,
    Datasets,
    load_datasets,
    make_loader,
    register_dataset,
    split_dataset,
)
from nas_grouping.errors import ConfigError, DataError


# --------------------------------------------------------------------------- helpers


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _batch(rng: np.random.Generator, n: int, num_classes: int, label_key: str, *, bytes_keys: bool = False) -> dict:
    entry = {
        "batch_label": "testing batch",
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    if bytes_keys:  # what pickle.load(..., encoding="bytes") of the real files gives
        entry = {k.encode(): v for k, v in entry.items()}
    return entry


def write_cifar10(root: Path, n: int = 20, *, bytes_keys: bool = False) -> Path:
    """CIFAR-10 python-pickle files (5 train batches + test) with n images each."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", _batch(rng, n, 10, "labels", bytes_keys=bytes_keys))
    _write_pickle(folder / "test_batch", _batch(rng, n, 10, "labels", bytes_keys=bytes_keys))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": n, "num_vis": 3072})
    return folder


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    for name, n in (("train", n_train), ("test", n_test)):
        entry = _batch(rng, n, 100, "fine_labels")
        entry["coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
        _write_pickle(folder / name, entry)
    _write_pickle(
        folder / "meta",
        {"fine_label_names": [f"class_{i}" for i in range(100)], "coarse_label_names": [f"super_{i}" for i in range(20)]},
    )
    return folder


def write_images(folder: Path, classes: dict[str, int], *, size: tuple[int, int] = (12, 10), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(pixels).save(folder / cls / f"{i}.{ext}")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"dataset": "cifar10", "image_size": 64}, "image_size"),
        ({"dataset": "imagefolder", "image_size": 0}, "image_size"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        DataConfig(**kwargs)
    assert repr(kwargs[field]) in str(info.value)  # says what came
    assert isinstance(info.value, ValueError)


def test_config_normalises_dataset_name_and_keeps_defaults():
    cfg = DataConfig(dataset=" CIFAR10 ")
    assert cfg.dataset == "cifar10"
    assert DataConfig().dataset == "digits" and DataConfig().val_fraction == 0.2


def test_load_datasets_rejects_non_config():
    with pytest.raises(ConfigError, match="DataConfig"):
        load_datasets({"dataset": "digits"})  # type: ignore[arg-type]


def test_unknown_dataset_is_one_line_listing_the_registered_names():
    with pytest.raises(ConfigError, match="expected one of digits, cifar10, cifar100, imagefolder, got 'tiny'") as info:
        DataConfig(dataset="tiny")
    assert "\n" not in str(info.value)
    assert list(DATASETS) == ["digits", "cifar10", "cifar100", "imagefolder"]
    assert (DATASETS["cifar10"].val_fraction, DATASETS["cifar10"].native_size) == (0.1, 32)


def test_a_registered_dataset_is_valid_in_the_config_and_loads():
    def load_tiny(cfg: DataConfig) -> Datasets:
        data = TensorDataset(torch.randn(8, 1, 4, 4), torch.arange(8) % 2)
        return Datasets(train=data, val=data, num_classes=2, in_channels=1, input_size=(4, 4), name=cfg.dataset)

    assert register_dataset("Tiny", load_tiny, val_fraction=0.25, native_size=4) is load_tiny
    try:
        cfg = DataConfig(dataset="TINY")
        assert cfg.dataset == "tiny" and cfg.val_fraction == 0.25
        ds = load_datasets(cfg)
        assert ds.name == "tiny" and ds.input_size == (4, 4) and len(ds.train) == 8
        with pytest.raises(ConfigError, match="image_size"):
            DataConfig(dataset="tiny", image_size=8)
    finally:
        del DATASETS["tiny"]
    with pytest.raises(ConfigError, match="tiny"):
        DataConfig(dataset="tiny")

    @register_dataset("tiny")
    def load_tiny_too(cfg: DataConfig) -> Datasets:  # the decorator form
        return load_tiny(cfg)

    try:
        assert DATASETS["tiny"].load is load_tiny_too and DataConfig(dataset="tiny").val_fraction == 0.2
    finally:
        del DATASETS["tiny"]


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> Datasets:
    return load_datasets(DataConfig(dataset="digits", augment=False))


def test_digits_sizes_shapes_and_metadata(digits):
    assert len(digits.train) + len(digits.val) == 1797
    assert len(digits.val) == pytest.approx(0.2 * 1797, abs=1)
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert (digits.num_classes, digits.in_channels, digits.input_size, digits.name) == (10, 1, (8, 8), "digits")
    assert set(digits.val.targets.tolist()) == set(range(10))


def test_digits_split_is_fixed_disjoint_and_stratified(digits):
    again = load_datasets(DataConfig(dataset="digits", augment=True))
    assert digits.train.indices == again.train.indices
    assert digits.val.indices == again.val.indices
    assert torch.equal(digits.val.images, again.val.images)
    assert not set(digits.train.indices) & set(digits.val.indices)
    assert sorted(digits.train.indices + digits.val.indices) == list(range(1797))
    counts = np.bincount(digits.val.targets.numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~36 per class: stratified
    other = load_datasets(DataConfig(dataset="digits", split_seed=1))
    assert other.val.indices != digits.val.indices


def test_digits_normalised_with_train_statistics(digits):
    train = digits.train.images
    assert abs(float(train.mean())) < 1e-4
    assert float(train.std()) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(digits.val.images.mean())) < 0.1  # train stats, so only roughly 0
    assert digits.val.mean == digits.train.mean and 0 < digits.train.mean < 1


def test_digits_augmentation_shifts_but_keeps_shape():
    ds = load_datasets(DataConfig(dataset="digits", augment=True))
    plain = ds.train.images[5]
    torch.manual_seed(0)
    draws = [ds.train[5][0] for _ in range(20)]
    assert all(d.shape == (1, 8, 8) for d in draws)
    assert any(not torch.equal(d, plain) for d in draws)
    # a shift by at most one pixel: every draw matches some (dy, dx) in {-1, 0, 1}^2 of the padded image
    padded = torch.nn.functional.pad(plain, (1, 1, 1, 1), value=ds.train.pad_value)
    crops = [padded[:, y : y + 8, x : x + 8] for y in range(3) for x in range(3)]
    assert all(any(torch.equal(d, c) for c in crops) for d in draws)
    torch.manual_seed(0)
    assert all(torch.equal(a, ds.train[5][0]) for a in draws)  # seeded: repeats
    assert torch.equal(ds.val[5][0], ds.val.images[5])  # never on validation


def test_seeded_loaders_repeat_order(digits):
    def order(seed):
        loader = make_loader(digits.train, batch_size=256, shuffle=True, seed=seed)
        return torch.cat([y for _, y in loader]).tolist()

    first = order(3)
    assert first == order(3)
    assert first != order(4)
    assert sorted(first) == sorted(digits.train.targets.tolist())
    unshuffled = make_loader(digits.train, batch_size=256, shuffle=False)
    assert torch.cat([y for _, y in unshuffled]).tolist() == digits.train.targets.tolist()


def test_loader_epochs_differ_but_sequence_repeats():
    data = TensorDataset(torch.arange(50))

    def two_epochs(seed):
        loader = make_loader(data, batch_size=7, shuffle=True, seed=seed)
        return [torch.cat([b[0] for b in loader]).tolist() for _ in range(2)]

    a, b = two_epochs(0), two_epochs(0)
    assert a == b and a[0] != a[1]


def test_loader_with_sampler_uses_it_and_forbids_shuffle():
    data = TensorDataset(torch.arange(10))
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    loader = make_loader(data, batch_size=4, shuffle=False, sampler=sampler, drop_last=False)
    assert torch.cat([b[0] for b in loader]).tolist() == [1, 3, 5, 7, 9]
    with pytest.raises(ConfigError, match="shuffle"):
        make_loader(data, batch_size=4, shuffle=True, sampler=sampler)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(data, batch_size=0, shuffle=False)


# --------------------------------------------------------------------------- split_dataset


def test_split_dataset_is_deterministic_disjoint_and_stratified(digits):
    a1, b1 = split_dataset(digits.train, 0.5, seed=0)
    a2, b2 = split_dataset(digits.train, 0.5, seed=0)
    assert isinstance(a1, Subset) and a1.indices == a2.indices and b1.indices == b2.indices
    assert not set(a1.indices) & set(b1.indices)
    assert sorted(a1.indices + b1.indices) == list(range(len(digits.train)))
    assert abs(len(a1) - len(b1)) <= 1
    ca = np.bincount(digits.train.targets[a1.indices].numpy(), minlength=10)
    cb = np.bincount(digits.train.targets[b1.indices].numpy(), minlength=10)
    assert np.abs(ca - cb).max() <= 1  # stratified halves
    assert split_dataset(digits.train, 0.5, seed=1)[1].indices != b1.indices


def test_split_dataset_fraction_is_second_part_and_works_without_targets():
    data = TensorDataset(torch.arange(100))
    first, second = split_dataset(data, 0.3, seed=0)
    assert (len(first), len(second)) == (70, 30)
    nested_a, nested_b = split_dataset(first, 0.5, seed=0)  # a Subset of a Subset
    assert set(nested_a.indices) | set(nested_b.indices) == set(range(70))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_dataset_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        split_dataset(TensorDataset(torch.arange(10)), fraction, seed=0)


def test_split_dataset_rejects_single_item():
    with pytest.raises(ConfigError, match="at least 2"):
        split_dataset(TensorDataset(torch.arange(1)), 0.5, seed=0)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_loads_small_files_in_real_format(tmp_path, bytes_keys):
    write_cifar10(tmp_path, n=20, bytes_keys=bytes_keys)
    ds = load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert (len(ds.train), len(ds.val)) == (100, 20)
    assert (ds.num_classes, ds.in_channels, ds.input_size) == (10, 3, (32, 32))
    image, label = ds.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        expected = pickle.load(fh)
    key = b"labels" if bytes_keys else "labels"
    assert [ds.val[i][1] for i in range(20)] == expected[key]
    assert ds.train.classes[0] == "airplane"
    with pytest.raises(ConfigError, match="holdout: cifar10 here is the python-pickle release"):
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path), holdout=True))


def test_cifar10_validation_pixels_match_file(tmp_path):
    write_cifar10(tmp_path, n=20)
    ds = load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path), augment=False))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        raw = pickle.load(fh)["data"][3].reshape(3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = (torch.from_numpy(raw).float() / 255 - mean) / std
    assert torch.allclose(ds.val[3][0], expected, atol=1e-5)
    assert torch.equal(ds.train[0][0], ds.train[0][0])  # no augmentation: stable


def test_cifar100_loads_small_files_in_real_format(tmp_path):
    write_cifar100(tmp_path, n_train=40, n_test=20)
    ds = load_datasets(DataConfig(dataset="cifar100", data_dir=str(tmp_path)))
    assert (len(ds.train), len(ds.val), ds.num_classes, ds.name) == (40, 20, 100, "cifar100")
    image, label = ds.val[0]
    assert image.shape == (3, 32, 32)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as fh:
        assert [ds.val[i][1] for i in range(20)] == pickle.load(fh)["fine_labels"]
    assert len(ds.train.classes) == 100


def test_cifar_loader_batches(tmp_path):
    write_cifar10(tmp_path, n=20)
    ds = load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    x, y = next(iter(make_loader(ds.train, batch_size=16, shuffle=True)))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long


def test_cifar_without_data_dir_mentions_flag():
    with pytest.raises(DataError, match="--data-dir"):
        load_datasets(DataConfig(dataset="cifar10"))


@pytest.mark.parametrize(("dataset", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_folder_names_path_and_fix(tmp_path, dataset, folder):
    with pytest.raises(DataError) as info:
        load_datasets(DataConfig(dataset=dataset, data_dir=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path.resolve() / folder) in message
    assert "--download" in message and "--data-dir" in message
    assert isinstance(info.value, FileNotFoundError)


def test_cifar_data_dir_pointing_inside_folder_gets_hint(tmp_path):
    folder = write_cifar10(tmp_path)
    with pytest.raises(DataError, match="parent"):
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(folder)))


def test_cifar_missing_file_is_named(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as info:
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert str(folder.resolve() / "data_batch_3") in str(info.value)
    assert "data_batch_2" not in str(info.value)


def test_cifar_corrupt_file_is_named(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"\x00garbage, not a pickle\xff" * 10)
    with pytest.raises(DataError) as info:
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert str(folder.resolve() / "data_batch_2") in str(info.value)
    assert info.value.__cause__ is not None  # chained, not swallowed


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"data": np.zeros((20, 3072), np.uint8)}, "labels"),  # key missing
        ({"data": np.zeros((20, 1024), np.uint8), "labels": [0] * 20}, "3072"),  # wrong shape
        ({"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 19}, "one integer label"),
        ({"data": np.zeros((20, 3072), np.uint8), "labels": [10] * 20}, r"0\.\.9"),
        ({"data": np.full((20, 3072), 0.5), "labels": [0] * 20}, "uint8"),
        ([1, 2, 3], "dict"),
    ],
)
def test_cifar_malformed_batch_is_named(tmp_path, entry, match):
    folder = write_cifar10(tmp_path)
    _write_pickle(folder / "test_batch", entry)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=match) as info:
        load_datasets(cfg)
    assert str(folder.resolve() / "test_batch") in str(info.value)


def test_cifar_meta_without_label_names_is_named(tmp_path):
    folder = write_cifar10(tmp_path)
    _write_pickle(folder / "batches.meta", {"num_vis": 3072})
    with pytest.raises(DataError, match="label_names") as info:
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert "batches.meta" in str(info.value)


def test_cifar_download_failure_becomes_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DataError, match="download") as info:
        load_datasets(DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=True))
    assert str(tmp_path.resolve()) in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_with_train_and_val(tmp_path):
    write_images(tmp_path / "train", {"cat": 4, "dog": 3, "fox": 2})
    write_images(tmp_path / "val", {"cat": 1, "dog": 1, "fox": 1}, seed=1)
    ds = load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=16))
    assert (len(ds.train), len(ds.val)) == (9, 3)
    assert (ds.num_classes, ds.in_channels, ds.input_size) == (3, 3, (16, 16))
    image, label = ds.train[0]
    assert image.shape == (3, 16, 16) and label == 0
    assert sorted(ds.val[i][1] for i in range(3)) == [0, 1, 2]
    assert ds.val[2][0].shape == (3, 16, 16)


def test_imagefolder_default_size_is_224(tmp_path):
    write_images(tmp_path, {"a": 2, "b": 2})
    ds = load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), val_fraction=0.5))
    assert ds.input_size == (224, 224)
    assert ds.val[0][0].shape == (3, 224, 224)


def test_imagefolder_single_folder_split_is_deterministic_and_stratified(tmp_path):
    write_images(tmp_path, {"a": 5, "b": 5, "c": 5, "d": 5})
    cfg = DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, val_fraction=0.2, augment=False)
    one, two = load_datasets(cfg), load_datasets(cfg)
    assert one.num_classes == 4
    assert (len(one.train), len(one.val)) == (16, 4)
    assert one.train.indices == two.train.indices and one.val.indices == two.val.indices
    assert not set(one.train.indices) & set(one.val.indices)
    assert sorted(one.val[i][1] for i in range(4)) == [0, 1, 2, 3]  # one per class
    assert torch.equal(one.train[0][0], two.train[0][0])
    other = load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), split_seed=7, image_size=8))
    assert other.val.indices != one.val.indices


def test_imagefolder_batches_through_loader(tmp_path):
    write_images(tmp_path, {"a": 4, "b": 4})
    ds = load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=16, val_fraction=0.25))
    x, y = next(iter(make_loader(ds.train, batch_size=6, shuffle=True)))
    assert x.shape == (6, 3, 16, 16) and y.dtype == torch.long
    assert float(x.min()) < 0 < float(x.max())  # ImageNet-normalised, not raw 0..1


def test_imagefolder_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="one subfolder per class") as info:
        load_datasets(DataConfig(dataset="imagefolder", data_dir=str(missing)))
    assert str(missing) in str(info.value)


def test_imagefolder_without_data_dir():
    with pytest.raises(DataError, match="--data-dir"):
        load_datasets(DataConfig(dataset="imagefolder"))


def test_imagefolder_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no class subfolders") as info:
        load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    assert str(tmp_path.resolve()) in str(info.value)


def test_imagefolder_class_folders_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no usable images") as info:
        load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    assert str(tmp_path.resolve()) in str(info.value) and ".png" in str(info.value)


def test_imagefolder_train_val_class_mismatch(tmp_path):
    write_images(tmp_path / "train", {"cat": 2, "dog": 2})
    write_images(tmp_path / "val", {"cat": 1})
    with pytest.raises(DataError, match="dog"):
        load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))


def test_imagefolder_train_without_val_is_rejected(tmp_path):
    write_images(tmp_path / "train", {"cat": 2, "dog": 2})
    with pytest.raises(DataError, match="no val/") as info:
        load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))
    assert str(tmp_path.resolve() / "val") in str(info.value)


def test_holdout_sets_the_reported_split_aside_and_validates_on_another_of_its_size(digits, tmp_path):
    held = load_datasets(DataConfig(dataset="digits", holdout=True))
    reported = set(digits.val.indices)
    assert len(held.val) == len(digits.val) and len(held.train) == len(digits.train) - len(digits.val)
    seen = set(held.train.indices) | set(held.val.indices)
    assert not seen & reported  # the reported split is never loaded
    assert not set(held.train.indices) & set(held.val.indices)
    counts = np.bincount(held.val.targets.numpy(), minlength=10)
    assert counts.min() >= 33 and counts.max() <= 39  # stratified too
    assert load_datasets(DataConfig(dataset="digits", holdout=True)).val.indices == held.val.indices
    write_images(tmp_path / "sf", {"a": 10, "b": 10})
    single = load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "sf"), image_size=8,
                                      val_fraction=0.2))
    hsingle = load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "sf"), image_size=8,
                                       val_fraction=0.2, holdout=True))
    assert not (set(hsingle.train.indices) | set(hsingle.val.indices)) & set(single.val.indices)
    write_images(tmp_path / "tv" / "train", {"cat": 2, "dog": 2})
    write_images(tmp_path / "tv" / "val", {"cat": 1, "dog": 1}, seed=1)
    with pytest.raises(ConfigError, match="holdout: imagefolder in .* ships its own val/ folder"):
        load_datasets(DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "tv"), holdout=True))
    with pytest.raises(ConfigError, match="holdout: expected true or false"):
        DataConfig(holdout="yes")
