"""What a training checkpoint holds besides the weights, as tensors and plain types only.

``ResumeState`` adds the random streams (so a resumed run draws the same noise and shuffles the
same batches as an uninterrupted one) and the datamodule spec (so ``evaluate.py`` finds the test
set without being told). Everything is a tensor, a number, a string or a container of them, so a
checkpoint loads with ``torch.load(..., weights_only=True)``: loading one never runs its code.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states


def plain_rng_states() -> dict:
    """Lightning's RNG states with numpy's key array as a tensor (no numpy objects to unpickle)."""
    states = _collect_rng_states()
    name, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of ``plain_rng_states``."""
    states = dict(states)
    name, keys, pos, has_gauss, cached = states["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    states["numpy"] = (name, keys, pos, has_gauss, cached)
    _set_rng_states(states)


def datamodule_spec(datamodule: pl.LightningDataModule) -> dict:
    """``{"_target_": "module.Class", **hparams}``: enough to rebuild the datamodule."""
    cls = type(datamodule)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **dict(datamodule.hparams)}


class ResumeState(pl.Callback):
    """Save the random streams and the datamodule spec in every checkpoint; restore the streams
    when a run resumes. ``train.py`` always adds it."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["rng_states"] = plain_rng_states()
        if trainer.datamodule is not None:
            checkpoint["datamodule"] = datamodule_spec(trainer.datamodule)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
