"""Shared fixtures: compose the real Hydra configs, shrunk to run in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from cimsim.cli import register
from paper.configs import compose_cfg  # noqa: F401  (the tests compose configs as reproduce.py does)

ROOT = Path(__file__).resolve().parents[1]
E2E = Path(__file__).resolve().parent / "e2e"
CONF = ROOT / "conf"
register()  # the eval_dir resolver and the `chip: checkpoint` node that evaluate.yaml uses

# Small, fast and offline: runs never touch the network or the GPU.
FAST = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "model.widen_factor=1",
    "val_chips=2",
    "callbacks.robustness.every_n_epochs=1",
    "callbacks.robustness.chips=2",
    "callbacks.robustness.max_batches=1",
    "callbacks.robustness.final.chips=2",
    "callbacks.robustness.final.sigmas=[0.0,0.1]",
]


@pytest.fixture(autouse=True)
def _offline_and_single_threaded(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def train_cfg(tmp_path):
    """``compose_train(overrides)`` -> the shrunk training config writing under tmp_path."""

    def make(overrides: list[str] = (), out: Path | None = None) -> DictConfig:
        return compose_cfg("train", out or tmp_path, FAST + list(overrides))

    return make


def authors_scales(w: torch.Tensor, b: torch.Tensor, scale: str = "half_range"):
    """The noise scales of (W, b) by the authors' match_range, recomputed in numpy: f = r(b)/r(W),
    R = r(concat(W, b/f)); W gets R, b gets R*f (each its own range when one range is 0)."""
    W, B = (t.detach().double().numpy().ravel() for t in (w, b))

    def r(a):
        return (a.max() - a.min()) / 2 if scale == "half_range" else np.abs(a).max()

    rw, rb = r(W), r(B)
    if rw == 0 or rb == 0:
        return rw, rb
    f = rb / rw
    R = r(np.concatenate([W, B / f]))
    return R, R * f


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e/ is end-to-end: it carries the ``slow`` marker."""
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)
