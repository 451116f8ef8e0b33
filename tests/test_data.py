"""Datamodules: digits splits, CIFAR files and splits (on a fake tiny CIFAR), image folders.

Over 350 lines: three datamodules, each with its split, transform and error cases.
"""

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets, transforms

from cimsim.data import CIFAR_STATS, CIFARDataModule, DigitsDataModule, ImageFolderDataModule
from cimsim.validation import ConfigError

# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    return dm


def test_digits_metadata_is_known_before_setup():
    dm = DigitsDataModule()
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    assert dm.hparams.batch_size == 64 and dm.hparams.val_fraction == 0.15


def test_digits_splits_partition_the_set_with_the_requested_sizes(digits):
    idx = digits.indices
    sizes = {k: len(v) for k, v in idx.items()}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["val"] - 0.15 * 1797) <= 1 and abs(sizes["test"] - 0.15 * 1797) <= 1
    assert len(np.unique(np.concatenate(list(idx.values())))) == 1797  # disjoint
    assert len(digits.train_set) == sizes["train"] and len(digits.test_set) == sizes["test"]


def test_digits_splits_are_stratified(digits):
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for split in (digits.train_set, digits.val_set, digits.test_set):
        counts = np.bincount(split.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - overall * len(split)) <= 1.5)


def test_digits_normalized_with_training_statistics(digits):
    x_train = digits.train_set.tensors[0]
    assert x_train.shape[1:] == (1, 8, 8)
    assert abs(x_train.mean().item()) < 1e-5 and x_train.std().item() == pytest.approx(1, abs=1e-4)
    raw = torch.tensor(load_digits().data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    train_raw = raw[digits.indices["train"]]
    val = (raw[digits.indices["val"]] - train_raw.mean()) / train_raw.std()
    torch.testing.assert_close(digits.val_set.tensors[0], val)
    assert torch.equal(
        digits.val_set.tensors[1], torch.tensor(load_digits().target[digits.indices["val"]])
    )


def test_digits_split_is_determined_by_the_seed(digits):
    again = DigitsDataModule(seed=0)
    again.setup()
    other = DigitsDataModule(seed=1)
    other.setup()
    for k in ("train", "val", "test"):
        assert np.array_equal(again.indices[k], digits.indices[k])
    assert not np.array_equal(other.indices["test"], digits.indices["test"])


def test_digits_loaders(digits):
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    first = [next(iter(digits.train_dataloader()))[1] for _ in range(2)]
    assert not torch.equal(*first)  # shuffled
    val_batches = [next(iter(digits.val_dataloader()))[1] for _ in range(2)]
    assert torch.equal(*val_batches)  # in order
    assert sum(len(b[1]) for b in digits.test_dataloader()) == len(digits.test_set)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(val_fraction=0.0), "val_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction"),
        (dict(seed=-1), "seed"),
    ],
)
def test_digits_invalid_args(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}=") as info:
        DigitsDataModule(**kwargs)
    assert info.value.key == key


# ---------------------------------------------------------------- CIFAR


class FakeCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR-100 reader without the md5 checks, for a tiny fake on disk."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**datasets.CIFAR100.meta, "md5": None}

    def download(self):
        raise urllib.error.URLError("no network in the test")


class FakeCIFARDataModule(CIFARDataModule):
    dataset_classes = {"cifar100": FakeCIFAR100}


def _write_fake_cifar100(root, n_train=60, n_test=20):
    folder = root / FakeCIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)


@pytest.fixture
def fake_cifar(tmp_path):
    _write_fake_cifar100(tmp_path)
    dm = FakeCIFARDataModule(root=str(tmp_path), batch_size=8, num_workers=0, val_size=10)
    dm.setup("fit")
    return dm


def test_cifar_missing_files_fail_early_naming_root_and_download(tmp_path):
    with pytest.raises(ConfigError) as info:
        CIFARDataModule(name="cifar10", root=str(tmp_path))
    assert info.value.key == "root"
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "data.download=true" in message


def test_cifar_download_is_deferred_to_prepare_data_and_failure_is_clear(tmp_path):
    dm = FakeCIFARDataModule(root=str(tmp_path), download=True)  # no files: no error yet
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (100, 3, 32)
    with pytest.raises(RuntimeError, match="failed") as info:
        dm.prepare_data()
    assert str(tmp_path) in str(info.value) and "manually" in str(info.value)


def test_cifar_split_sizes_and_disjointness(fake_cifar):
    train_idx, val_idx = fake_cifar.train_set.indices, fake_cifar.val_set.indices
    assert (len(train_idx), len(val_idx), len(fake_cifar.test_set)) == (50, 10, 20)
    assert sorted(train_idx + val_idx) == list(range(60))
    x, y = next(iter(fake_cifar.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.long


def test_cifar_split_is_seeded(fake_cifar, tmp_path):
    same = FakeCIFARDataModule(root=str(tmp_path), num_workers=0, val_size=10)
    same.setup()
    other = FakeCIFARDataModule(root=str(tmp_path), num_workers=0, val_size=10, seed=1)
    other.setup()
    assert same.val_set.indices == fake_cifar.val_set.indices
    assert other.val_set.indices != fake_cifar.val_set.indices


def test_cifar_val_and_test_use_the_eval_transform(fake_cifar):
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in CIFAR_STATS["cifar100"])

    def plain(image):  # (32, 32, 3) uint8 -> normalized (3, 32, 32), no augmentation
        return (torch.tensor(image).permute(2, 0, 1) / 255 - mean) / std

    files = fake_cifar.val_set.dataset.data  # the training files, (N, 32, 32, 3)
    torch.manual_seed(0)
    val_i, train_i = fake_cifar.val_set.indices[0], fake_cifar.train_set.indices[0]
    torch.testing.assert_close(fake_cifar.val_set[0][0], plain(files[val_i]))
    torch.testing.assert_close(fake_cifar.test_set[0][0], plain(fake_cifar.test_set.data[0]))
    # The training view of the same files is augmented: random crops and flips change pixels.
    views = [fake_cifar.train_set[0][0] for _ in range(5)]
    assert any(not torch.allclose(v, plain(files[train_i])) for v in views)


def test_cifar_val_size_too_large(tmp_path):
    _write_fake_cifar100(tmp_path)
    dm = FakeCIFARDataModule(root=str(tmp_path), num_workers=0, val_size=60)
    with pytest.raises(ConfigError, match="^val_size="):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(name="imagenet"), "name"),
        (dict(val_size=0), "val_size"),
        (dict(download="yes"), "download"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_cifar_invalid_args(kwargs, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        CIFARDataModule(root=str(tmp_path), **kwargs)
    assert info.value.key == key


# ---------------------------------------------------------------- image folders


def _write_tree(root, splits=("train", "val"), classes=("cat", "dog"), n=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)  # (H, W, C)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_shapes_and_classes(tmp_path, channels):
    _write_tree(tmp_path)
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=8, channels=channels, batch_size=4, num_workers=0
    )
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (2, channels, 8)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, channels, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    assert len(dm.val_set) == 6 and sorted(set(dm.val_set.targets)) == [0, 1]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (2, channels, 8, 8)  # one of each class held out of train/ (no test/)


def _files(dataset):
    """The image paths behind an ImageFolder or a Subset of one, in dataset order."""
    if isinstance(dataset, torch.utils.data.Subset):
        return [dataset.dataset.samples[i][0] for i in dataset.indices]
    return [path for path, _ in dataset.samples]


def _on_disk(folder):
    return sorted(str(p) for p in folder.rglob("*.png"))


@pytest.fixture
def carved(tmp_path):
    """A tree without test/: 3 classes x 10 training images, 20 % held out as the test set."""
    _write_tree(tmp_path, classes=("cat", "cow", "dog"), n=10)
    dm = ImageFolderDataModule(
        str(tmp_path), image_size=8, num_workers=0, test_fraction=0.2, seed=3
    )
    dm.setup()
    return dm


def test_image_folder_without_test_holds_the_test_set_out_of_train(carved, tmp_path):
    train, val, test = _files(carved.train_set), _files(carved.val_set), _files(carved.test_set)
    assert not set(test) & set(val)  # the test set is not the validation set
    assert not set(test) & set(train)  # and is never trained on
    assert sorted(train + test) == _on_disk(tmp_path / "train")  # together: train/, once each
    assert val == _on_disk(tmp_path / "val")
    # Stratified: 20 % of each class's 10 images, with the label of its class folder.
    labels = [carved.test_set[i][1] for i in range(len(carved.test_set))]
    assert np.bincount(labels).tolist() == [2, 2, 2]
    assert [carved.classes[y] for y in labels] == [Path(p).parent.name for p in test]


def test_image_folder_test_split_is_determined_by_the_seed(carved, tmp_path):
    def test_files(seed):
        dm = ImageFolderDataModule(str(tmp_path), num_workers=0, test_fraction=0.2, seed=seed)
        dm.setup()
        return _files(dm.test_set)

    assert test_files(3) == _files(carved.test_set)
    assert test_files(4) != _files(carved.test_set)
    # The checkpoint rebuilds the datamodule from its hyperparameters: the same split again.
    assert (carved.hparams.test_fraction, carved.hparams.seed) == (0.2, 3)
    rebuilt = ImageFolderDataModule(**carved.hparams)
    rebuilt.setup()
    assert _files(rebuilt.test_set) == _files(carved.test_set)


def test_image_folder_held_out_test_images_are_not_augmented(carved):
    torch.manual_seed(0)
    path = _files(carved.test_set)[0]

    def plain(p):  # resize, [0, 1], then (x - 0.5) / 0.5: no crop, no flip
        image = Image.open(p).convert("RGB").resize((8, 8), Image.BILINEAR)
        return transforms.functional.to_tensor(image) * 2 - 1

    for _ in range(5):
        torch.testing.assert_close(carved.test_set[0][0], plain(path), atol=0.02, rtol=0)
    # The training view of train/ is augmented: random crops and flips change its pixels.
    train_path = _files(carved.train_set)[0]
    views = [carved.train_set[0][0] for _ in range(10)]
    assert any(not torch.allclose(v, plain(train_path), atol=0.02) for v in views)


def test_image_folder_too_few_images_to_hold_out_a_test_set(tmp_path):
    _write_tree(tmp_path, n=1)
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(ConfigError, match="root/test/") as info:
        dm.setup()
    assert info.value.key == "root"


def test_image_folder_uses_test_split_when_present(tmp_path):
    _write_tree(tmp_path, splits=("train", "val", "test"))
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0, augment=False)
    dm.setup()
    assert _files(dm.test_set) == _on_disk(tmp_path / "test")
    assert _files(dm.train_set) == _on_disk(tmp_path / "train")  # nothing held out
    # Without augmentation the train view is deterministic.
    assert torch.equal(dm.train_set[0][0], dm.train_set[0][0])
    assert not any(isinstance(t, transforms.RandomCrop) for t in dm.train_set.transform.transforms)


def test_image_folder_missing_train_explains_layout(tmp_path):
    with pytest.raises(ConfigError, match="root/train/<class>") as info:
        ImageFolderDataModule(str(tmp_path))
    assert info.value.key == "root"


def test_image_folder_with_one_class_is_refused(tmp_path):
    _write_tree(tmp_path, classes=("cat",))  # a "classifier" that answers cat to everything
    with pytest.raises(ConfigError, match=r"one class folder \('cat'\).*at least 2") as info:
        ImageFolderDataModule(str(tmp_path))
    assert info.value.key == "root"


@pytest.mark.parametrize("other_split", ["val", "test"])
def test_image_folder_class_mismatch(tmp_path, other_split):
    _write_tree(tmp_path)
    _write_tree(tmp_path, splits=(other_split,), classes=("cow",), n=1)  # test/ is new: cow only
    with pytest.raises(ConfigError, match="differ") as info:
        ImageFolderDataModule(str(tmp_path))
    assert info.value.key == "root"


def test_image_folder_empty_class_fails_in_setup_with_config_error(tmp_path):
    _write_tree(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "val" / "bird").mkdir()
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0)
    assert dm.num_classes == 3
    with pytest.raises(ConfigError, match="bird"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(channels=2), "channels"),
        (dict(image_size=2), "image_size"),
        (dict(augment=1), "augment"),
        (dict(num_workers=-1), "num_workers"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(test_fraction="0.1"), "test_fraction"),
        (dict(seed=-1), "seed"),
        (dict(seed=0.5), "seed"),
    ],
)
def test_image_folder_invalid_args(tmp_path, kwargs, key):
    _write_tree(tmp_path)
    with pytest.raises(ConfigError) as info:
        ImageFolderDataModule(str(tmp_path), **kwargs)
    assert info.value.key == key
