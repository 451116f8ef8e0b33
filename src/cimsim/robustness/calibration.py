"""The data that calibrates a chip's ADC ranges (training or validation, never test)."""

from __future__ import annotations

from torch.utils.data import DataLoader, SequentialSampler

from cimsim.validation import ConfigError, check_choice

CALIB_SPLITS = ("train", "val")
# Datamodule arguments that change how images are fetched, not which or in what order.
LOADER_ONLY = ("num_workers", "download")


def check_calib_split(split: str) -> None:
    """ADC calibration data is ``train`` or ``val``; never ``test``, whose images score the chip."""
    if split == "test":
        raise ConfigError(
            "calib_split",
            split,
            "allowed values are 'train', 'val': never the test set, which would fit the ADC "
            "ranges to the images that score them",
        )
    check_choice("calib_split", split, CALIB_SPLITS)


def calibration_loader(datamodule, split: str) -> DataLoader:
    """The batches that calibrate ADC ranges after each chip is programmed, in a fixed order.

    ``val`` (the default of the presets): the validation loader (eval transform). ``train``: the
    training images (``shuffle=False``) as ``datamodule.train_set`` serves them; where that set
    is augmented (CIFAR, image folders with ``augment``) its crops and flips are random draws,
    which ``evaluate_robustness`` seeds from the chip seed, so rows stay reproducible. The
    authors calibrated on their shuffled, augmented training loader.
    """
    check_calib_split(split)
    if split == "val":
        return datamodule.val_dataloader()
    if datamodule.train_set is None:
        raise RuntimeError(f"{type(datamodule).__name__}.setup('fit') has not been called")
    return DataLoader(
        datamodule.train_set,
        batch_size=datamodule.batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers,
    )


def fixed_batches(loader, split: str) -> bool:
    """Whether ``loader`` gives every chip the same calibration batches (``EvalSettings.
    calib_fixed``): the validation split (its eval transform: no random augmentation) read in
    order (a ``SequentialSampler``), as every datamodule of cimsim's serves it. A validation
    loader that augments at random would need ``calib_fixed=False``."""
    return split == "val" and isinstance(getattr(loader, "sampler", None), SequentialSampler)


def data_settings(spec: dict | None) -> dict | None:
    """The settings of a datamodule spec that decide which images are tested, in which order:
    all but ``LOADER_ONLY`` (what rows and an output folder's ``evaluation.json`` record)."""
    return None if spec is None else {k: v for k, v in spec.items() if k not in LOADER_ONLY}
