"""Monte Carlo robustness evaluation over programmed chip instances (docs/model.md).

Accuracy under noise is a distribution over chips: each chip instance is one frozen draw of the
perturbation, reproducible from ``chip_seed(seed, chip, stream)``. Every chip is programmed once
and then swept over the grid (sigma x mean shift x ADC levels) with the same standard draws, so the
curves differ only by the swept variable (common random numbers). Per grid point we report the
mean, the standard deviation and a Student-t 95 % confidence interval over chips. Chips that
select checkpoints (``stream="val"``) never coincide with the chips that are reported
(``stream="test"``).

Rows go to a CSV one chip at a time (flushed and fsync'd), so a killed run resumes where it
stopped and returns exactly the rows an uninterrupted run would. Each row carries a fingerprint of
everything that determines it (weights, data, test chip, limits, calibration, seed, stream); rows
of the same model with another fingerprint are moved aside and recomputed, never mixed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from torch import nn
from tqdm import tqdm

from cimsim.adc import adcs, calibrate_adc, set_adc
from cimsim.convert import analog_layers, program_chip, set_noise
from cimsim.noise import derive_seed
from cimsim.validation import ConfigError, check_choice, check_int, check_number

ROW_COLUMNS = ("chip", "chip_seed", "sigma", "mean_shift", "adc_levels", "acc", "loss", "n")
FINGERPRINT = "fingerprint"  # the last column of a resumable rows file
SWEEPS = ("sigma", "mean_shift", "adc_levels")
GRID_AXES = SWEEPS  # AnalogConfig fields the grid sets per point: not part of the test chip
STREAMS = ("test", "val")  # chips that are reported / chips that select checkpoints
TRAIN = "train"  # in a grid's sigmas or adc_levels: each model's own training value
ROWS_FILE = "robustness_rows.csv"
SUMMARY_FILE = "robustness_summary.csv"
JSON_FILE = "robustness.json"

Point = tuple[float, float, int | None]  # (sigma, mean_shift, adc_levels)


def _non_empty_tuple(key: str, values: Any) -> tuple:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ConfigError(key, values, "must be a non-empty list")
    values = tuple(values)
    if not values:
        raise ConfigError(key, list(values), "must be a non-empty list")
    return values


@dataclass(frozen=True)
class RobustnessGrid:
    """The Monte Carlo evaluation grid: every chip is measured at every point of the product.

    Attributes:
        sigmas: test noise levels, relative std as a fraction of each tensor's range (>= 0), or
            ``"train"``: the model's own training sigma (``for_chip`` resolves it).
        mean_shifts: test mean shifts (systematic drift), same units, any sign.
        adc_levels: ADC output levels per point; ``None`` = no ADC, else an integer >= 2, or
            ``"train"``: the model's own training levels (``None`` for a model trained without
            ADC). These override the levels the model was converted with (restored afterwards).
        chips: number of chip instances N (the authors used 20, Joshi et al. 100).
    """

    sigmas: tuple[float | str, ...]
    mean_shifts: tuple[float, ...] = (0.0,)
    adc_levels: tuple[int | str | None, ...] = (None,)
    chips: int = 20

    def __post_init__(self):
        # Lists from a config file become tuples, numbers become floats: a frozen, hashable grid
        # whose values compare equal to the ones read back from a rows CSV.
        sigmas = _non_empty_tuple("sigmas", self.sigmas)
        shifts = _non_empty_tuple("mean_shifts", self.mean_shifts)
        levels = _non_empty_tuple("adc_levels", self.adc_levels)
        for s in sigmas:
            if s != TRAIN:
                check_number("sigmas", s, minimum=0.0)
        for m in shifts:
            check_number("mean_shifts", m)
        for n in levels:
            if n is not None and n != TRAIN:
                check_int("adc_levels", n, minimum=2)
        check_int("chips", self.chips, minimum=1)
        sigmas = tuple(s if s == TRAIN else float(s) for s in sigmas)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "mean_shifts", tuple(float(m) for m in shifts))
        object.__setattr__(self, "adc_levels", tuple(levels))

    def for_chip(self, chip) -> RobustnessGrid:
        """This grid with ``train`` replaced by the training ``chip``'s (an ``AnalogConfig``)
        sigma and ADC levels; a value that then appears twice is kept once."""

        def resolve(values, own):
            return list(dict.fromkeys(own if v == TRAIN else v for v in values))

        return replace(
            self,
            sigmas=resolve(self.sigmas, chip.sigma),
            adc_levels=resolve(self.adc_levels, chip.adc_levels),
        )

    def points(self) -> Iterator[Point]:
        """``(sigma, mean_shift, adc_levels)`` for every grid point, ADC levels varying fastest."""
        for key in ("sigmas", "adc_levels"):
            if TRAIN in getattr(self, key):
                raise ConfigError(
                    key, TRAIN, "resolve it first with grid.for_chip(the model's training chip)"
                )
        return itertools.product(self.sigmas, self.mean_shifts, self.adc_levels)


@dataclass
class RobustnessResult:
    """Per-chip rows and their per-grid-point summary (see ``summarize``).

    ``fingerprints`` maps each row fingerprint of a resumable run to the settings it stands for.
    """

    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    fingerprints: dict[str, dict] = field(default_factory=dict)


def chip_seed(seed: int, chip: int, stream: str = "test") -> int:
    """The seed of chip instance ``chip`` of an evaluation with base ``seed``.

    A 63-bit integer from BLAKE2b of a domain string with the stream, the seed and the chip:
    it depends on nothing else (not the grid, the model or the process), is the same on every
    platform and Python version (unlike ``hash``), and does not collide for nearby seeds the way
    ``seed + chip`` would (``seed=0, chip=1`` and ``seed=1, chip=0`` are different chips).

    Args:
        seed: base seed of the evaluation.
        chip: chip index, 0, 1, ...
        stream: ``test`` for the chips of reported curves (``"cimsim-chip:{seed}:{chip}"``, the
            domain of the first release, so published chips stay the same) or ``val`` for the
            chips that select checkpoints during training (another domain): the two never
            coincide, so checkpoint selection cannot favour the chips it is reported on.
    """
    check_choice("stream", stream, STREAMS)
    return derive_seed("chip" if stream == "test" else f"chip-{stream}", int(seed), int(chip))


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class _Data:
    test_loader: Iterable
    calib_loader: Iterable | None
    max_batches: int | None
    calib_batches: int | None
    calib_momentum: float


@torch.no_grad()
def _measure(model: nn.Module, data: _Data, device: torch.device) -> tuple[float, float, int]:
    """Top-1 accuracy, mean cross-entropy and sample count on the test set."""
    correct, loss_sum, n = 0, 0.0, 0
    for i, (x, y) in enumerate(data.test_loader):
        if data.max_batches is not None and i >= data.max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, classes)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        n += y.shape[0]
    if n == 0:
        raise ValueError("the test loader gave no samples")
    return correct / n, loss_sum / n, n


def _calibrate(model: nn.Module, data: _Data, seed: int) -> None:
    """Calibrate the programmed chip's ADC ranges, with torch's CPU generator seeded by the
    chip seed: a shuffling or augmenting calibration loader (random crops and flips of training
    images) then draws the same batches for this chip in every run and at every grid point, and
    the caller's random stream is left as it was."""
    # Data loading (samplers, transforms, worker seeds) draws from the CPU generator only.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        calibrate_adc(
            model,
            data.calib_loader,
            max_batches=data.calib_batches,
            momentum=data.calib_momentum,
        )


def _evaluate_chip(
    model: nn.Module, chip: int, seed: int, points: Sequence[Point], data: _Data
) -> list[dict]:
    """Program chip ``chip`` once and measure it at every point (common random numbers)."""
    device = next(model.parameters()).device
    program_chip(model, seed)
    model.eval()
    rows = []
    for sigma, mean_shift, levels in points:
        # Both reset the ADC calibration: the ranges depend on the noisy chip, so recalibrate.
        set_noise(model, sigma=sigma, mean_shift=mean_shift)
        set_adc(model, levels)
        if levels is not None:
            _calibrate(model, data, seed)
        acc, loss, n = _measure(model, data, device)
        rows.append(
            {
                "chip": chip,
                "chip_seed": seed,
                "sigma": sigma,
                "mean_shift": mean_shift,
                "adc_levels": levels,
                "acc": acc,
                "loss": loss,
                "n": n,
            }
        )
    return rows


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore noise settings, chip, ADC levels and ranges, and train/eval modes on exit."""
    modes = [(m, m.training) for m in model.modules()]
    layers = [(name, layer, layer.config, layer.chip_seed) for name, layer in analog_layers(model)]
    converters = [
        (a, a.levels, a.lo.clone(), a.hi.clone(), a.calibrated)
        for a in adcs(model, active_only=False)
    ]
    try:
        yield
    finally:
        for name, layer, config, seed in layers:
            layer.config = config
            if seed is None:
                layer.clear()
            else:  # draws depend only on (seed, qualified name): the same chip again
                layer.program(seed, name)
        for adc, levels, lo, hi, calibrated in converters:
            adc.levels, adc.calibrated = levels, calibrated
            adc.lo.copy_(lo)
            adc.hi.copy_(hi)
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------- fingerprints


class StaleRowsWarning(UserWarning):
    """Rows of a model were computed with other settings; they were moved aside, not reused."""


def chip_settings(config) -> dict:
    """The fields of an ``AnalogConfig`` that stay fixed over a grid (all but its axes sigma,
    mean_shift and adc_levels): what a test chip is, besides the swept values."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in GRID_AXES}


def _model_chip(model: nn.Module) -> dict | list[dict]:
    """The test chip of ``model``'s analog layers (a list when layers differ)."""
    chips = []
    for _, layer in analog_layers(model):
        settings = chip_settings(layer.config)
        if settings not in chips:
            chips.append(settings)
    return chips[0] if len(chips) == 1 else chips


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model.state_dict()``: every entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):  # a module's extra state
            digest.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A 16-hex-digit digest of the settings that determine a row (their canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(model: nn.Module, given: Mapping, seed: int, stream: str, data: _Data) -> dict:
    """Everything that determines this run's rows: what the caller knows (e.g. the checkpoint
    file's hash, the data spec, the calibration split) and what this function is told to do."""
    settings = {
        **given,
        "chip": _model_chip(model),
        "max_batches": data.max_batches,
        "calib_batches": data.calib_batches,
        "calib_momentum": data.calib_momentum,
        "seed": seed,
        "stream": stream,
    }
    if "ckpt_sha256" not in settings:  # a module without a checkpoint file: hash its weights
        settings["state_sha256"] = state_sha256(model)
    # Exactly what the sidecar reads back (tuples as lists, paths as strings).
    return json.loads(json.dumps(settings, default=str))


def _sidecar(rows_path: Path) -> Path:
    return rows_path.with_suffix(".fingerprints.json")


def _stale_path(rows_path: Path) -> Path:
    return rows_path.with_suffix(".stale.csv")


def read_fingerprints(rows_path: str | os.PathLike) -> dict[str, dict]:
    """The sidecar of a rows file, ``<rows>.fingerprints.json``: fingerprint -> settings."""
    sidecar = _sidecar(Path(rows_path))
    return json.loads(sidecar.read_text()) if sidecar.exists() else {}


def record_fingerprints(rows_path: str | os.PathLike, entries: Mapping[str, dict]) -> Path:
    """Add ``entries`` (fingerprint -> settings) to the sidecar of ``rows_path``, atomically."""
    known = read_fingerprints(rows_path)
    sidecar = _sidecar(Path(rows_path))
    if sidecar.exists() and all(known.get(k) == v for k, v in entries.items()):
        return sidecar
    known.update(entries)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
            f.write("\n")

    return _atomic_write(sidecar, write)


def _flat(value, prefix: str = "") -> dict:
    """``{"data": {"seed": 1}}`` -> ``{"data.seed": 1}``."""
    if not isinstance(value, dict) or not value:
        return {prefix.rstrip("."): value}
    flat = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}{key}."))
    return flat


_UNSET = object()


def _show(key: str, value) -> str:
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value[:12] + "..." if key.endswith("sha256") else value
    return repr(value)


def _changes(old: dict | None, new: dict) -> str:
    """``key: old -> new`` for every setting that differs, e.g. ``max_batches: 1 -> None``."""
    if old is None:
        return "settings not recorded in the fingerprint sidecar"
    a, b = _flat(old), _flat(new)
    return ", ".join(
        f"{k}: {_show(k, a.get(k, _UNSET))} -> {_show(k, b.get(k, _UNSET))}"
        for k in sorted(set(a) | set(b))
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    )


# ----------------------------------------------------------------------------- the rows CSV


def _columns(extra: dict, resumable: bool) -> list[str]:
    return list(ROW_COLUMNS) + list(extra) + ([FINGERPRINT] if resumable else [])


def _csv_text(value) -> str:
    """How ``csv`` writes a value (``None`` as an empty field)."""
    return "" if value is None else str(value)


def _repair(path: Path) -> None:
    """Drop a torn last line (a run killed mid-write) so appends start on a fresh line."""
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)  # 0 when not even the header is complete


def _parse(raw: dict) -> dict:
    """A row read back from CSV with the types ``_evaluate_chip`` writes."""
    levels = raw["adc_levels"]
    return {
        "chip": int(raw["chip"]),
        "chip_seed": int(raw["chip_seed"]),
        "sigma": float(raw["sigma"]),
        "mean_shift": float(raw["mean_shift"]),
        "adc_levels": None if levels == "" else int(levels),
        "acc": float(raw["acc"]),
        "loss": float(raw["loss"]),
        "n": int(raw["n"]),
    }


def _read_raw(path: Path, columns: list[str]) -> list[dict]:
    """The rows of ``path`` as text (none if it does not exist), after dropping a torn line."""
    if not path.exists():
        return []
    _repair(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and reader.fieldnames != columns:
            raise ConfigError(
                "rows_path",
                str(path),
                f"exists with columns {reader.fieldnames};"
                f" this run writes {columns}: use another file",
            )
        return list(reader)


def _retire(path: Path, raws: list[dict], stale: list[dict], columns: list[str]) -> None:
    """Move ``stale`` rows out of ``path``: append them to ``<rows>.stale.csv`` (durable
    first, so a crash can duplicate them but never lose them), then rewrite ``path``."""
    stale_path = _stale_path(path)
    _read_raw(stale_path, columns)  # drops a torn line; refuses a file of another format
    stale_path.touch()
    _append(stale_path, stale, columns)
    gone = {id(r) for r in stale}
    write_rows(path, [r for r in raws if id(r) not in gone], columns)


def _stale_message(path: Path, extra: dict, stale: list[dict], settings: dict) -> str:
    """Which settings changed since the stale rows were computed, e.g. max_batches: 1 -> None."""
    known = read_fingerprints(path)
    old = dict.fromkeys(r[FINGERPRINT] for r in stale)
    changes = "; ".join(_changes(known.get(fp), settings) for fp in old)
    subject = ", ".join(f"{k}={v!r}" for k, v in extra.items()) or "this model"
    return (
        f"{path}: {len(stale)} rows of {subject} were computed with other settings ({changes});"
        f" moved them to {_stale_path(path).name} and recomputing"
    )


def _resume(
    path: Path, extra: dict, fp: str, settings: dict, expected: dict[tuple[int, Point], int]
) -> dict[tuple[int, Point], dict]:
    """Rows already in ``path`` for this subject (the ``extra`` values) and fingerprint, by
    ``(chip, point)`` among ``expected`` (-> chip seed). The subject's rows with another
    fingerprint are moved to ``<rows>.stale.csv`` first, with a warning naming what changed."""
    columns = _columns(extra, resumable=True)
    raws = _read_raw(path, columns)
    mine = [r for r in raws if all(r[k] == _csv_text(v) for k, v in extra.items())]
    stale = [r for r in mine if r[FINGERPRINT] != fp]
    if stale:
        message = _stale_message(path, extra, stale, settings)
        _retire(path, raws, stale, columns)
        warnings.warn(message, StaleRowsWarning, stacklevel=3)
    record_fingerprints(path, {fp: settings})
    done = {}
    for raw in mine:
        row = _parse(raw)
        key = (row["chip"], (row["sigma"], row["mean_shift"], row["adc_levels"]))
        if raw[FINGERPRINT] == fp and expected.get(key) == row["chip_seed"] and key not in done:
            done[key] = {**row, **extra, FINGERPRINT: fp}
    return done


def _append(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Append one chip's rows in a single write, durable before the next chip starts."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if path.stat().st_size == 0:
        writer.writeheader()
    writer.writerows(rows)
    with open(path, "a", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def write_rows(
    path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` as one CSV, atomically, in the format ``evaluate_robustness`` appends
    (e.g. the merge of several processes' shares of the chips)."""
    if columns is None:
        columns = list(rows[0]) if rows else list(ROW_COLUMNS)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    return _atomic_write(Path(path), write)


def sort_rows(rows: Iterable[dict], grid: RobustnessGrid) -> list[dict]:
    """Rows in the canonical order: by chip, then grid order (e.g. to merge DDP ranks' rows)."""
    order = {p: i for i, p in enumerate(grid.points())}
    return sorted(
        rows, key=lambda r: (r["chip"], order[(r["sigma"], r["mean_shift"], r["adc_levels"])])
    )


# ----------------------------------------------------------------------------- evaluation


def check_limits(max_batches: int | None, calib_batches: int | None, calib_momentum: float):
    """Fail on a bad batch limit (``None`` = every batch) or calibration momentum."""
    for key, value in (("max_batches", max_batches), ("calib_batches", calib_batches)):
        if value is not None:
            check_int(key, value, minimum=1)
    check_number("calib_momentum", calib_momentum, minimum=0.0, maximum=1.0)
    if calib_momentum == 0:
        raise ConfigError("calib_momentum", calib_momentum, "must be in (0, 1]")


def _check_inputs(
    model: nn.Module,
    grid: RobustnessGrid,
    seed: int,
    calib_loader,
    chip_indices,
    extra: dict,
    stream: str,
) -> list[int]:
    """Fail before any work on a user mistake; return the chip indices to evaluate."""
    if not isinstance(grid, RobustnessGrid):
        raise TypeError(f"grid must be a RobustnessGrid, got {type(grid).__name__}")
    grid.points()  # no unresolved "train" left
    check_int("seed", seed)
    check_choice("stream", stream, STREAMS)
    chips = list(range(grid.chips)) if chip_indices is None else list(chip_indices)
    for c in chips:
        check_int("chip_indices", c, minimum=0)
        if c >= grid.chips:
            raise ConfigError("chip_indices", c, f"must be < chips={grid.chips}")
    if any(levels is not None for levels in grid.adc_levels):
        if calib_loader is None:
            raise ConfigError(
                "calib_loader",
                None,
                "required when adc_levels are set: ADC ranges are calibrated on training or "
                "validation data (never test data) after programming a chip",
            )
        if not adcs(model):
            raise ConfigError(
                "adc_levels",
                list(grid.adc_levels),
                "this model has no ADC "
                "points: convert it with adc_placement='layer' or add ADC() modules",
            )
    for key in extra:
        if key in ROW_COLUMNS or key == FINGERPRINT:
            raise ConfigError(
                "extra", key, f"must not reuse a row column {ROW_COLUMNS + (FINGERPRINT,)}"
            )
    return sorted(set(chips))


def evaluate_robustness(
    model: nn.Module,
    test_loader: Iterable,
    grid: RobustnessGrid,
    seed: int,
    calib_loader: Iterable | None = None,
    rows_path: str | os.PathLike | None = None,
    chip_indices: Iterable[int] | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    calib_batches: int | None = None,
    extra: dict | None = None,
    calib_momentum: float = 0.01,
    stream: str = "test",
    settings: Mapping[str, Any] | None = None,
) -> RobustnessResult:
    """Measure ``model`` on ``grid.chips`` seeded chip instances at every grid point.

    Args:
        model: a model converted with ``convert_to_analog``; its noise settings, chip, ADC levels
            and ranges and train/eval modes are restored on return (also on an exception).
        test_loader: ``(x, y)`` batches in a fixed order (rows are then bit-reproducible); top-1
            accuracy and mean cross-entropy over all of them.
        grid: the sweep and the number of chips (``train`` tokens resolved: ``grid.for_chip``).
        seed: base seed; chip ``c`` is programmed from ``chip_seed(seed, c, stream)``.
        calib_loader: training or validation batches (never test) to calibrate the ADC ranges
            on after programming each chip (required with ADC levels). Each calibration runs
            with torch's CPU generator seeded by the chip seed, so a shuffling or augmenting
            loader still gives reproducible rows.
        rows_path: CSV that receives each chip's rows as soon as it is done, each with a
            ``fingerprint`` of ``settings`` plus the chip settings of ``model``'s analog layers,
            ``max_batches``, ``calib_batches``, ``calib_momentum``, ``seed``, ``stream`` and,
            without a ``ckpt_sha256`` in ``settings``, a hash of ``model.state_dict()``; the
            sidecar ``<rows>.fingerprints.json`` maps fingerprints to those settings. Rows of
            the same subject (``extra`` values) and fingerprint are read back, not recomputed;
            the subject's rows with another fingerprint are moved to ``<rows>.stale.csv`` with a
            ``StaleRowsWarning`` naming what changed. One writer per file (one per DDP rank).
        chip_indices: evaluate only these chips (e.g. one DDP rank's share); default all.
        progress: show a tqdm bar over chips.
        max_batches: use only the first ``max_batches`` test batches.
        calib_batches: use only the first ``calib_batches`` calibration batches (None = all).
        extra: constant columns added to every row, e.g. ``{"model": label, "ckpt": path}``.
        calib_momentum: weight of each calibration batch after the first in the moving
            min/max of the ADC ranges (the authors' observer: 0.01).
        stream: ``test`` for reported curves, ``val`` for chips that select checkpoints.
        settings: what else determines the rows, for the fingerprint, e.g.
            ``{"ckpt_sha256": ..., "data": spec, "calib_split": "val"}`` (JSON-able).

    Returns:
        The rows (sorted by chip, then grid order), their ``summarize``, and the fingerprint.
    """
    extra = dict(extra or {})
    chips = _check_inputs(model, grid, seed, calib_loader, chip_indices, extra, stream)
    check_limits(max_batches, calib_batches, calib_momentum)
    data = _Data(test_loader, calib_loader, max_batches, calib_batches, calib_momentum)
    seeds = {c: chip_seed(seed, c, stream) for c in chips}
    path = None if rows_path is None else Path(rows_path)
    done, tag, fingerprints = {}, extra, {}
    if path is not None:
        used = _settings(model, settings or {}, seed, stream, data)
        fp = fingerprint(used)
        expected = {(c, p): seeds[c] for c in chips for p in grid.points()}
        done = _resume(path, extra, fp, used, expected)
        tag, fingerprints = {**extra, FINGERPRINT: fp}, {fp: used}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    todo = [(c, [p for p in grid.points() if (c, p) not in done]) for c in chips]
    todo = [(c, points) for c, points in todo if points]
    rows = list(done.values())
    bar = tqdm(
        total=len(chips),
        initial=len(chips) - len(todo),
        desc="chips",
        unit="chip",
        disable=not progress,
    )
    with bar, _preserved(model):
        for c, points in todo:
            new = [{**r, **tag} for r in _evaluate_chip(model, c, seeds[c], points, data)]
            if path is not None:
                _append(path, new, list(new[0]))
            rows += new
            bar.update()
    rows = sort_rows(rows, grid)
    return RobustnessResult(rows=rows, summary=summarize(rows), fingerprints=fingerprints)


# ----------------------------------------------------------------------------- summary


def _t_ci95(std: float, n: int) -> float:
    """Half-width of the 95 % Student-t confidence interval of a mean of ``n`` chips."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Mean, std (ddof=1), 95 % CI and mean loss over chips, per grid point and model.

    Groups keep the order in which they first appear in ``rows`` (for the rows of
    ``evaluate_robustness``: grid order). A ``model`` column, when the rows have one, keys the
    groups too, so rows of several models can be summarized at once.
    """
    groups: dict[tuple, list[dict]] = {}
    rows = list(rows)
    has_model = any("model" in r for r in rows)
    for r in rows:
        key = (r.get("model"), r["sigma"], r["mean_shift"], r["adc_levels"])
        groups.setdefault(key, []).append(r)
    summary = []
    for (model, sigma, mean_shift, levels), group in groups.items():
        acc = [r["acc"] for r in group]
        n = len(acc)
        mean = math.fsum(acc) / n
        std = math.sqrt(math.fsum((a - mean) ** 2 for a in acc) / (n - 1)) if n > 1 else math.nan
        entry = {"model": model} if has_model else {}
        entry.update(
            sigma=sigma,
            mean_shift=mean_shift,
            adc_levels=levels,
            acc_mean=mean,
            acc_std=std,
            acc_ci95=_t_ci95(std, n),
            loss_mean=math.fsum(r["loss"] for r in group) / n,
            chips=n,
        )
        summary.append(entry)
    return summary


def format_summary(summary: Sequence[dict]) -> str:
    """An aligned text table of a summary, accuracies in percent."""
    header = (["model"] if any("model" in s for s in summary) else []) + [
        "sigma",
        "mean_shift",
        "adc_levels",
        "acc_mean%",
        "ci95%",
        "acc_std%",
        "loss_mean",
        "chips",
    ]
    table = [header]
    for s in summary:
        cells = [str(s["model"])] if header[0] == "model" else []
        cells += [
            f"{s['sigma']:g}",
            f"{s['mean_shift']:g}",
            "none" if s["adc_levels"] is None else str(s["adc_levels"]),
            f"{100 * s['acc_mean']:.2f}",
            f"{100 * s['acc_ci95']:.2f}",
            f"{100 * s['acc_std']:.2f}",
            f"{s['loss_mean']:.4f}",
            str(s["chips"]),
        ]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table
    )


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def _json_safe(value):
    # NaN (the CI of a single chip) is not valid JSON: write null.
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(result: RobustnessResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``robustness_summary.csv`` and ``robustness.json`` (rows + summary) atomically.

    The per-chip rows CSV (``robustness_rows.csv``) is the one ``evaluate_robustness`` appends
    to as it goes. Returns the two paths written.
    """
    out = Path(out_dir)

    def write_csv(tmp):
        columns = list(result.summary[0]) if result.summary else []
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(result.summary)

    def write_json(tmp):
        doc = {
            key: [{k: _json_safe(v) for k, v in r.items()} for r in getattr(result, key)]
            for key in ("rows", "summary")
        }
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")

    return (
        _atomic_write(out / SUMMARY_FILE, write_csv),
        _atomic_write(out / JSON_FILE, write_json),
    )


# ----------------------------------------------------------------------------- plot

_AXIS_LABELS = {
    "sigma": "test noise sigma (fraction of range)",
    "mean_shift": "test mean shift mu (fraction of range)",
    "adc_levels": "ADC levels (log2 scale; bits = log2(levels))",
}


def _lines(summary: Sequence[dict], x: str) -> dict[str, list[dict]]:
    """Group summary entries into lines along ``x``: one per model and per value of any other
    swept variable that varies (named in the label)."""
    others = [k for k in SWEEPS if k != x and len({s[k] for s in summary}) > 1]
    lines: dict[str, list[dict]] = {}
    for s in summary:
        parts = [str(s["model"])] if s.get("model") is not None else []
        parts += [f"{k}={'none' if s[k] is None else s[k]}" for k in others]
        lines.setdefault(", ".join(parts) or "accuracy", []).append(s)
    return lines


def _draw_line(ax, label: str, entries: list[dict], x: str) -> None:
    """One mean curve with its shaded 95 % CI; for ADC sweeps "no ADC" is a dashed reference."""
    refs = [e for e in entries if x == "adc_levels" and e["adc_levels"] is None]
    entries = sorted((e for e in entries if not any(e is r for r in refs)), key=lambda e: e[x])
    color = None
    if entries:
        xs = [e[x] for e in entries]
        mean = [100 * e["acc_mean"] for e in entries]
        # NaN half-widths (one chip) leave no band rather than a misleading zero-width one.
        ci = [100 * e["acc_ci95"] for e in entries]
        (line,) = ax.plot(xs, mean, marker="o", label=label)
        color = line.get_color()
        ax.fill_between(
            xs,
            [m - c for m, c in zip(mean, ci, strict=True)],
            [m + c for m, c in zip(mean, ci, strict=True)],
            color=color,
            alpha=0.2,
            linewidth=0,
        )
    for ref in refs:
        ax.axhline(
            100 * ref["acc_mean"],
            linestyle="--",
            linewidth=1,
            color=color,
            label=f"{label} (no ADC)",
        )


def plot_robustness(
    summary: Sequence[dict], x: str, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Plot test accuracy (mean over chips, shaded 95 % CI) against the swept variable ``x``.

    Args:
        summary: entries of ``summarize``; one line per ``model`` label.
        x: ``sigma``, ``mean_shift`` or ``adc_levels`` (log2 axis; "no ADC" as a dashed line).
        path: the PNG to write (atomically, 150 dpi).
        title: optional figure title.

    Returns:
        The path written.
    """
    if x not in SWEEPS:
        raise ConfigError("x", x, "allowed values are " + ", ".join(map(repr, SWEEPS)))
    if not summary:
        raise ValueError("plot_robustness got an empty summary")
    # A bare Figure on the Agg canvas, no pyplot: no display needed, no global figure state.
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, entries in _lines(summary, x).items():
        _draw_line(ax, label, entries, x)
    if x == "adc_levels":
        ax.set_xscale("log", base=2)
        ticks = sorted({s["adc_levels"] for s in summary if s["adc_levels"] is not None})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(_AXIS_LABELS[x])
    ax.set_ylabel("top-1 test accuracy (%), mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))
