"""Datasets as LightningDataModules: sklearn digits (CPU smoke tests), CIFAR-10/100, image folders.

Each datamodule knows ``num_classes``, ``in_channels`` and ``image_size`` right after
``__init__``, so the model can be built from them before any data is loaded.

The file is over 350 lines because it holds three datamodules that share one loader base and
the same validation conventions; each is a short class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from cimsim.validation import ConfigError, check_choice, check_int, check_number

# Per-channel mean/std of the training images (pixels in [0, 1]).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _check_fraction(key: str, value: float) -> None:
    check_number(key, value, minimum=0.0, maximum=1.0)
    if value in (0, 1):
        raise ConfigError(key, value, "must be strictly between 0 and 1")


def _check_bool(key: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")


class _SplitDataModule(pl.LightningDataModule):
    """Shared loaders over ``train_set``, ``val_set`` and ``test_set``, built by ``setup``."""

    batch_size: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    Args:
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_fraction: fraction of all images held out for validation, in (0, 1).
        test_fraction: fraction of all images held out for testing, in (0, 1).
        seed: seed of the stratified train/val/test split.

    Pixels (0..16) are scaled to [0, 1], then standardized with the training split's mean and
    std. Tensors are ``(N, 1, 8, 8)``.
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ):
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                "val_fraction",
                val_fraction,
                f"with test_fraction={test_fraction!r}, the two must sum to < 1",
            )
        check_int("seed", seed, minimum=0)
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        index = np.arange(len(digits.target))
        rest, test = train_test_split(
            index, test_size=self.test_fraction, stratify=digits.target, random_state=self.seed
        )
        # The val fraction is of the whole set, so rescale it to the remainder.
        val_share = self.val_fraction / (1 - self.test_fraction)
        train, val = train_test_split(
            rest, test_size=val_share, stratify=digits.target[rest], random_state=self.seed
        )
        x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16  # (N, 1, 8, 8)
        y = torch.tensor(digits.target, dtype=torch.long)  # (N,)
        self.indices = {"train": train, "val": val, "test": test}  # into load_digits()
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])


class CIFARDataModule(_SplitDataModule):
    """CIFAR-10 or CIFAR-100 (Krizhevsky 2009) through torchvision.

    Args:
        name: ``cifar10`` or ``cifar100``.
        root: folder holding torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``.
        download: download the files into ``root`` in ``prepare_data`` (needs internet).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        val_size: number of training images held out (seeded) for validation.
        seed: seed of the train/val split.

    Training images are augmented with a 4-pixel padded random crop and a horizontal flip (the
    standard CIFAR recipe of He et al. 2016); validation and test images are only normalized.
    The official test set is the test split.
    """

    # name -> torchvision dataset class (a test swaps in one without the md5 checks)
    dataset_classes = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    in_channels = 3
    image_size = 32

    def __init__(
        self,
        name: str = "cifar100",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        val_size: int = 5000,
        seed: int = 0,
    ):
        super().__init__()
        check_choice("name", name, tuple(self.dataset_classes))
        _check_bool("download", download)
        _check_loader_args(batch_size, num_workers)
        check_int("val_size", val_size, minimum=1)
        check_int("seed", seed, minimum=0)
        self.save_hyperparameters()
        self.name, self.root, self.download = name, Path(root), download
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_size, self.seed = val_size, seed
        self.num_classes = 10 if name == "cifar10" else 100
        self.dataset_class = self.dataset_classes[name]
        folder = self.root / self.dataset_class.base_folder
        if not download and not folder.is_dir():
            raise ConfigError(
                "root",
                str(root),
                f"{folder} does not exist. Put torchvision's {name} files there (the extracted "
                f"{self.dataset_class.filename}), or set data.download=true to download them "
                "(needs internet)",
            )

    def prepare_data(self) -> None:
        if not self.download:
            return
        try:
            for train in (True, False):
                self.dataset_class(self.root, train=train, download=True)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(
                f"downloading {self.name} from {self.dataset_class.url} into {self.root} failed "
                f"({e}). Download and extract {self.dataset_class.filename} under {self.root} "
                "manually and run with data.download=false"
            ) from e

    def transform(self, train: bool) -> transforms.Compose:
        """The train (augmented) or eval transform: PIL image -> normalized (3, 32, 32) tensor."""
        mean, std = CIFAR_STATS[self.name]
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        return transforms.Compose(
            [*(augment if train else []), transforms.ToTensor(), transforms.Normalize(mean, std)]
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # Two views of the same training files: augmented for train, plain for val.
        full_train = self.dataset_class(self.root, train=True, transform=self.transform(True))
        full_val = self.dataset_class(self.root, train=True, transform=self.transform(False))
        if self.val_size >= len(full_train):
            raise ConfigError(
                "val_size",
                self.val_size,
                f"must be smaller than the {len(full_train)} training images",
            )
        perm = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.seed))
        self.train_set = Subset(full_train, perm[self.val_size :].tolist())
        self.val_set = Subset(full_val, perm[: self.val_size].tolist())
        self.test_set = self.dataset_class(self.root, train=False, transform=self.transform(False))


class ImageFolderDataModule(_SplitDataModule):
    """Any image classification set laid out as ``root/{train,val[,test]}/<class>/<image>``.

    Args:
        root: folder with ``train/`` and ``val/`` (and optionally ``test/``), each with one
            sub-folder per class.
        image_size: images are resized to ``image_size x image_size`` pixels.
        channels: 1 (grayscale) or 3 (RGB).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        augment: random padded crop and horizontal flip on the training images.
        test_fraction: without ``root/test/``, the fraction of each class's ``train/`` images
            held out as the test set, in (0, 1). Unused when ``root/test/`` exists.
        seed: seed of that held-out test split; keep it the same for runs that are compared, so
            that they share one test set.
        name: how reports (``reproduce.py``) name this dataset, e.g. where the images come
            from; ``None``: by the root folder's name. Stored in the checkpoint, loads nothing.

    ``train/`` needs at least 2 class folders. ``val/`` selects the best checkpoint and
    calibrates the ADCs, so it is never the test set.
    With ``root/test/``, that folder is the test set as is. Without it, the test set is carved
    out of ``train/``: a seeded, stratified ``test_fraction`` of each class (rounded, at least
    one image per class, and at least one left to train on; so each class needs 2 images or
    more), seen with the eval transform (no augmentation) and never trained on. The rest of
    ``train/`` is the training set.

    Images are normalized to mean 0.5, std 0.5 per channel (values in [-1, 1]).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 4,
        augment: bool = True,
        test_fraction: float = 0.1,
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__()
        check_int("image_size", image_size, minimum=4)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError("name", name, "must be a non-empty string or null")
        check_choice("channels", channels, (1, 3))
        _check_loader_args(batch_size, num_workers)
        _check_bool("augment", augment)
        _check_fraction("test_fraction", test_fraction)
        check_int("seed", seed, minimum=0)
        self.save_hyperparameters()  # the checkpoint records these to rebuild the same splits
        self.root = Path(root)
        self.image_size, self.in_channels, self.augment = image_size, channels, augment
        self.batch_size, self.num_workers = batch_size, num_workers
        self.test_fraction, self.seed = test_fraction, seed
        # Without root/test/, the test set is held out of train/ (never val/: see the docstring).
        self.carve_test = not (self.root / "test").is_dir()
        self.classes = self._check_layout()
        self.num_classes = len(self.classes)

    def _classes(self, split: str) -> list[str]:
        folder = self.root / split
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    def _check_layout(self) -> list[str]:
        layout = "expected root/train/<class>/<images>, root/val/<class>/<images> (same classes)"
        classes = self._classes("train")
        if not classes:
            raise ConfigError(
                "root",
                str(self.root),
                f"no class folders in {self.root / 'train'}; "
                + layout
                + " and optionally root/test/<class>/<images>",
            )
        if len(classes) < 2:  # one class trains a model that answers it for every image
            raise ConfigError(
                "root",
                str(self.root),
                f"{self.root / 'train'} has one class folder ({classes[0]!r}); a classifier "
                "needs at least 2: " + layout,
            )
        for split in ["val"] + ([] if self.carve_test else ["test"]):
            other = self._classes(split)
            if other != classes:
                raise ConfigError(
                    "root",
                    str(self.root),
                    f"the classes of {split}/ {other} differ from train/ {classes}; " + layout,
                )
        return classes

    def transform(self, train: bool) -> transforms.Compose:
        """PIL image -> ``(channels, image_size, image_size)`` tensor in [-1, 1]."""
        size = self.image_size
        steps = [transforms.Resize((size, size))]
        if self.in_channels == 1:
            steps.append(transforms.Grayscale(num_output_channels=1))
        if train and self.augment:
            steps += [
                transforms.RandomCrop(size, padding=max(1, size // 8)),
                transforms.RandomHorizontalFlip(),
            ]
        half = (0.5,) * self.in_channels
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(half, half)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            train_view = self._folder("train", train=True)
            self.val_set = self._folder("val", train=False)
            if self.carve_test:
                # Two views of the same train/ files: augmented for train, plain for test.
                train_idx, test_idx = self._carve_test(train_view.targets)
                self.test_set = Subset(self._folder("train", train=False), test_idx)
                self.train_set = Subset(train_view, train_idx)
            else:
                self.test_set = self._folder("test", train=False)
                self.train_set = train_view
        except FileNotFoundError as e:  # a class folder without images
            raise ConfigError("root", str(self.root), str(e)) from e

    def _folder(self, split: str, train: bool) -> datasets.ImageFolder:
        return datasets.ImageFolder(self.root / split, transform=self.transform(train))

    def _carve_test(self, targets: list[int]) -> tuple[list[int], list[int]]:
        """``(train, test)`` indices into ``train/``; fails if a class has fewer than 2 images."""
        counts = np.bincount(targets, minlength=self.num_classes)
        if counts.min() < 2:
            small = self.classes[int(counts.argmin())]
            raise ConfigError(
                "root",
                str(self.root),
                f"class {small!r} has {counts.min()} image(s) in train/; without root/test/ the "
                "test set is held out of train/, which needs >= 2 images per class. Add images "
                "or a root/test/<class>/<images> folder",
            )
        return stratified_holdout(targets, self.test_fraction, self.seed)


def stratified_holdout(
    targets: list[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices ``0..N-1`` into ``(kept, held_out)``, stratified by class and seeded.

    Args:
        targets: the class of each item, ``(N,)``; every class needs at least 2 items.
        fraction: the share of each class held out, rounded, clipped to ``[1, n_class - 1]``.
        seed: seed of the draw; the same seed gives the same split.

    Returns:
        Two sorted, disjoint index lists that together cover ``0..N-1``.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(targets)
    kept, held_out = [], []
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()  # (n_class,)
        members = members[torch.randperm(len(members), generator=generator)]
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        held_out += members[:k].tolist()
        kept += members[k:].tolist()
    return sorted(kept), sorted(held_out)
