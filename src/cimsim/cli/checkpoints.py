"""evaluate.py's checkpoints: which files, read safely, rebuilt on their test chips."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
from pathlib import Path

import torch
from omegaconf import DictConfig

from cimsim import ConfigError
from cimsim.cli.chip import check_variant_devices, chip_variants, override_chip
from cimsim.robustness.grid import RobustnessGrid
from cimsim.robustness.measure import check_fault_sweep, check_time_sweep
from cimsim.robustness.study import Subject
from cimsim.training.checkpoint import load_module
from cimsim.training.classifier import AnalogClassifier
from cimsim.training.methods import model_subject
from cimsim.validation import config_scope

TILE_STANDIN = 2  # tile ADC levels a tile sweep converts with; each grid point sets its own


def checkpoint_paths(cfg: DictConfig) -> list[Path]:
    """The checkpoints named by ``ckpt`` (a path or a list), ``ckpt_glob``, or ``sweep_dir`` (the
    best checkpoint of every job of a ``train.py -m`` sweep); all must exist."""
    if cfg.get("sweep_dir"):
        if not Path(cfg.sweep_dir).is_dir():
            raise ConfigError("sweep_dir", cfg.sweep_dir, "no such directory")
        paths = sorted(glob.glob(f"{cfg.sweep_dir}/**/checkpoints/epoch_*.ckpt", recursive=True))
        if not paths:
            raise ConfigError("sweep_dir", cfg.sweep_dir, "holds no */checkpoints/epoch_*.ckpt")
    elif cfg.get("ckpt_glob"):
        paths = sorted(glob.glob(cfg.ckpt_glob, recursive=True))
        if not paths:
            raise ConfigError("ckpt_glob", cfg.ckpt_glob, "matches no file")
    elif cfg.get("ckpt"):
        paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    else:
        raise ConfigError("ckpt", None, "give ckpt=PATH, 'ckpt=[A,B]' or ckpt_glob=PATTERN")
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError("ckpt", str(path), "no such checkpoint file")
    return [Path(p) for p in paths]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120] if text else ''}"


def read_checkpoint(path: Path) -> tuple[bytes, dict]:
    """The file's bytes and contents, loaded with ``weights_only=True``: a downloaded checkpoint
    can hold only tensors and plain types, never code that runs on loading."""
    data = path.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or objects beyond tensors
        why = "is not a PyTorch checkpoint that loads with weights_only=True (truncated, another"
        why += f" format, or objects other than tensors and plain types): {_one_line(err)}"
        raise ConfigError("ckpt", str(path), why) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        raise ConfigError(
            "ckpt", str(path), "is not a checkpoint of train.py: no state_dict/hyper_parameters"
        )
    return data, ckpt


def load_subject(
    path: Path, grid: RobustnessGrid, overrides: dict, device: torch.device
) -> tuple[Subject, dict | None]:
    """One checkpoint rebuilt on its test chip (its training chip with ``overrides``), and the
    data it was trained on."""
    data, ckpt = read_checkpoint(path)

    def load(**chip) -> AnalogClassifier:
        stream = io.BytesIO(data)
        return load_module(AnalogClassifier, stream, map_location=device, weights_only=True, **chip)

    try:
        model = load()
    except (ConfigError, KeyError, TypeError, RuntimeError, ImportError) as err:
        raise ConfigError("ckpt", str(path), f"does not load ({_one_line(err)})") from None
    trained = model.chip
    with config_scope("chip"):
        chip = override_chip(trained, overrides)
    grid = grid.for_chip(chip)
    if grid.adc_kind == "tile" and chip.tile_adc_levels is None:
        # Tile ADCs to sweep: the grid sets their levels at each point (null turns them off); a
        # fixed stand-in, so the rows' fingerprint does not change with the grid.
        chip = dataclasses.replace(chip, tile_adc_levels=TILE_STANDIN)
    if chip != trained:
        try:
            model = load(chip=chip)
        except (ConfigError, KeyError, TypeError, RuntimeError) as err:
            why = f"does not load on the test chip (overrides {overrides}): {_one_line(err)}"
            raise ConfigError("ckpt", str(path), why) from None
    model.net.to(device)
    sha = hashlib.sha256(data).hexdigest()
    step = ckpt.get("global_step", 0)
    subject = model_subject(
        model, grid, str(path), trained=trained, ckpt_sha256=sha, global_step=step
    )
    return subject, ckpt.get("datamodule")


def load_subjects(
    cfg: DictConfig, paths: list[Path], grid: RobustnessGrid, device: torch.device
) -> tuple[list[Subject], list[dict | None]]:
    """Every checkpoint's subject on each test chip (``chip_variants``), and the data each one was
    trained on. A time sweep or a list of compensations on a model that is not a PCM chip fails
    here, before any chip is measured."""
    variants = chip_variants(cfg)
    loaded = [load_subject(p, grid, o, device) for p in paths for o in variants]
    subjects = [s for s, _ in loaded]
    for s in subjects:
        with config_scope("robustness"):
            check_time_sweep(s.net, s.grid)
            check_fault_sweep(s.net, s.grid)
        check_variant_devices(cfg.robustness, s.net, s.ckpt)  # compensations: a PCM model
    labels = [s.label for s in subjects]
    for s in subjects:  # same recipe twice (e.g. two seeds): tell them apart by run folder
        if labels.count(s.label) > 1:
            s.label = f"{s.label} ({Path(s.ckpt).parent.parent.name})"
    return subjects, [spec for _, spec in loaded[:: len(variants)]]  # one per checkpoint
