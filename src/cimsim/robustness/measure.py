"""Monte Carlo robustness measurement over programmed chip instances (docs/model.md).

Accuracy under noise is a distribution over chips: each chip instance is one frozen draw of the
perturbation, reproducible from ``chip_seed(seed, chip, stream)``. Every chip is programmed once
and then swept over the grid (sigma x mean shift x ADC levels) with the same standard draws, so the
curves differ only by the swept variable (common random numbers). Per grid point we report the
mean, the standard deviation and a Student-t 95 % confidence interval over chips. Chips that
select checkpoints (``stream="val"``) never coincide with the chips that are reported
(``stream="test"``).

A PCM time sweep (``times``) reads every programmed chip at each ``t_inference`` ``repetitions``
times (``set_time``, once per chip, time and read-out) before sweeping the other axes; its summary
separates the chip-to-chip spread from the read-to-read spread (``summarize``).

This module measures; ``cimsim.robustness.rows`` keeps the rows in a resumable file and draws
them, and ``cimsim.robustness.study`` runs several models into one set of files. The file is over 600
lines because the measurement reads as one story: the grid (and its time axis), the row, the settings, one
chip, many chips, the summary (and that of a time sweep).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from tqdm import tqdm

from cimsim.chip.adc import CHIP_PLACEMENTS, adcs, calibrate_adc, set_adc
from cimsim.chip.config import check_relative
from cimsim.chip.convert import analog_layers, program_chip, set_noise, set_time
from cimsim.chip.noise import derive_seed
from cimsim.validation import ConfigError, check_choice, check_int, check_number

if TYPE_CHECKING:  # report imports this module; the annotation only names its class
    from cimsim.robustness.rows import RowsFile

# What a grid sweeps: the figure's possible x axes, and what a test chip leaves to the grid (the
# AnalogConfig fields sigma, mean_shift, adc_levels and a PCM chip's time after programming; the
# rest of the chip is fixed for a whole sweep).
SWEEPS = ("sigma", "mean_shift", "adc_levels", "t_inference")
STREAMS = ("test", "val")  # chips that are reported / chips that select checkpoints
TRAIN = "train"  # in a grid's sigmas, mean_shifts or adc_levels: each model's own training value
ADC_KINDS = ("chip", "tile")  # what a grid's adc_levels set: the chip's ADCs or the tiles'

Point = tuple[float, float, int | None]  # (sigma, mean_shift, adc_levels)
Read = tuple[float, int] | None  # (t_inference, repetition) of a PCM time sweep; None otherwise


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
        mean_shifts: test mean shifts (systematic drift), same units, any sign, or ``"train"``:
            the model's own training mean shift (a model trained for a drifted chip is tested
            on that chip).
        adc_levels: ADC output levels per point; ``None`` = no ADC, else an integer >= 2, or
            ``"train"``: the model's own training levels (``None`` for a model trained without
            ADC). These override the levels the model was converted with (restored afterwards).
        chips: number of chip instances N (the authors used 20, Joshi et al. 100).
        times: ``t_inference`` values (s after programming) at which a PCM chip
            (``device='pcm'``) is read, or ``(None,)`` (default): no time sweep, the chip as
            programmed.
        repetitions: read-outs R per chip and time (each redraws only the read noise); 1 without
            ``times``.
        adc_kind: which converters ``adc_levels`` sets: ``chip`` (default), the block/layer ADCs
            of ``AnalogConfig.adc_levels``; or ``tile``, the crossbar tiles' ADCs of
            ``AnalogConfig.tile_adc_levels`` (``train`` then means the model's tile levels).
    """

    sigmas: tuple[float | str, ...]
    mean_shifts: tuple[float | str, ...] = (0.0,)
    adc_levels: tuple[int | str | None, ...] = (None,)
    chips: int = 20
    times: tuple[float | None, ...] = (None,)
    repetitions: int = 1
    adc_kind: str = "chip"

    def __post_init__(self):
        # Lists from a config file become tuples, numbers become floats: a frozen, hashable grid
        # whose values compare equal to the ones read back from a rows CSV.
        sigmas = _non_empty_tuple("sigmas", self.sigmas)
        shifts = _non_empty_tuple("mean_shifts", self.mean_shifts)
        levels = _non_empty_tuple("adc_levels", self.adc_levels)
        for key, values in (("sigmas", sigmas), ("mean_shifts", shifts), ("adc_levels", levels)):
            for v in values:
                if isinstance(v, str) and v != TRAIN:
                    why = f"must be a number or '{TRAIN}' (each model's own training value)"
                    raise ConfigError(key, v, why)
        for s in sigmas:
            if s != TRAIN:
                check_relative("sigmas", s)
        for m in shifts:
            if m != TRAIN:
                check_relative("mean_shifts", m, signed=True)
        for n in levels:
            if n is not None and n != TRAIN:
                check_int("adc_levels", n, minimum=2)
        check_int("chips", self.chips, minimum=1)
        check_choice("adc_kind", self.adc_kind, ADC_KINDS)
        sigmas = tuple(s if s == TRAIN else float(s) for s in sigmas)
        object.__setattr__(self, "sigmas", sigmas)
        shifts = tuple(m if m == TRAIN else float(m) for m in shifts)
        object.__setattr__(self, "mean_shifts", shifts)
        object.__setattr__(self, "adc_levels", tuple(levels))
        object.__setattr__(self, "times", self._checked_times())

    def _checked_times(self) -> tuple[float | None, ...]:
        times = _non_empty_tuple("times", self.times)
        check_int("repetitions", self.repetitions, minimum=1)
        if times == (None,):
            if self.repetitions != 1:
                why = "read-outs are repeated per time: set times too (seconds after programming)"
                raise ConfigError("repetitions", self.repetitions, why)
            return times
        for t in times:
            if t is None:
                raise ConfigError("times", list(times), "null only alone: [null] = no time sweep")
            check_number("times", t, minimum=0.0)
        if len(set(times)) != len(times):
            raise ConfigError("times", list(times), "must not repeat a time")
        return tuple(float(t) for t in times)

    @property
    def timed(self) -> bool:
        """Whether this is a PCM time sweep (``times`` given)."""
        return self.times != (None,)

    def for_chip(self, chip) -> RobustnessGrid:
        """This grid with ``train`` replaced by the training ``chip``'s (an ``AnalogConfig``)
        sigma, mean shift and ADC levels; a value that then appears twice is kept once."""

        def resolve(values, own):
            return list(dict.fromkeys(own if v == TRAIN else v for v in values))

        own_levels = chip.tile_adc_levels if self.adc_kind == "tile" else chip.adc_levels
        return replace(
            self,
            sigmas=resolve(self.sigmas, chip.sigma),
            mean_shifts=resolve(self.mean_shifts, chip.mean_shift),
            adc_levels=resolve(self.adc_levels, own_levels),
        )

    def points(self) -> Iterator[Point]:
        """``(sigma, mean_shift, adc_levels)`` for every grid point, ADC levels varying fastest."""
        for key in ("sigmas", "mean_shifts", "adc_levels"):
            if TRAIN in getattr(self, key):
                raise ConfigError(
                    key, TRAIN, "resolve it first with grid.for_chip(the model's training chip)"
                )
        return itertools.product(self.sigmas, self.mean_shifts, self.adc_levels)

    def reads(self) -> list[Read]:
        """``(t_inference, repetition)`` of every read-out of a chip, in order; ``[None]``
        without a time sweep."""
        if not self.timed:
            return [None]
        return [(t, rep) for t in self.times for rep in range(self.repetitions)]

    def cells(self) -> list[tuple[Read, Point]]:
        """What a chip is measured at: every read-out, and at each every point (fastest)."""
        return list(itertools.product(self.reads(), self.points()))


@dataclass(frozen=True)
class Row:
    """One chip measured at one grid point: a line of ``robustness_rows.csv``, in column order.

    Chip ``chip`` was programmed from ``chip_seed``, set to the point ``(sigma, mean_shift,
    adc_levels)`` and scored ``acc`` (top-1, a fraction) and ``loss`` (mean cross-entropy, nats)
    on ``n`` samples. ``model`` (the curve's label), ``ckpt`` (the checkpoint file) and
    ``fingerprint`` (of the settings that determined the row) are filled in by
    ``cimsim.robustness.rows.RowsFile``; empty otherwise.
    """

    chip: int
    chip_seed: int
    sigma: float
    mean_shift: float
    adc_levels: int | None
    acc: float
    loss: float
    n: int
    model: str = ""
    ckpt: str = ""
    fingerprint: str = ""

    @property
    def point(self) -> Point:
        return (self.sigma, self.mean_shift, self.adc_levels)

    @property
    def read(self) -> Read:
        return None


@dataclass(frozen=True)
class TimedRow(Row):
    """A row of a PCM time sweep: the chip read ``t_inference`` s after programming, read-out
    ``repetition`` (0, 1, ...; each redraws only the read noise). Its file has these two columns
    after ``chip_seed``; a sweep without times writes plain ``Row``s and today's columns."""

    t_inference: float = 0.0
    repetition: int = 0

    @property
    def read(self) -> Read:
        return (self.t_inference, self.repetition)


@dataclass
class RobustnessResult:
    """Per-chip rows and their per-grid-point summary (see ``summarize``).

    ``fingerprints`` maps each row fingerprint of a resumable run to the settings it stands for.
    """

    rows: list[Row] = field(default_factory=list)
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


def check_limits(max_batches: int | None, calib_batches: int | None, calib_momentum: float):
    """Fail on a bad batch limit (``None`` = every batch) or calibration momentum."""
    for key, value in (("max_batches", max_batches), ("calib_batches", calib_batches)):
        if value is not None:
            check_int(key, value, minimum=1)
    check_number("calib_momentum", calib_momentum, minimum=0.0, maximum=1.0)
    if calib_momentum == 0:
        raise ConfigError("calib_momentum", calib_momentum, "must be in (0, 1]")


@dataclass(frozen=True)
class EvalSettings:
    """How chips are programmed and measured: everything but the model, test data and grid.

    Attributes:
        seed: base seed; chip ``c`` is programmed from ``chip_seed(seed, c, stream)``.
        stream: ``test`` for reported curves, ``val`` for chips that select checkpoints.
        calib_loader: training or validation batches (never test) that calibrate the ADC ranges
            after programming each chip; required with ADC levels. Each calibration runs with
            torch's CPU generator seeded by the chip seed, so a shuffling or augmenting loader
            still gives reproducible rows.
        max_batches: test batches per chip and point (``None`` = all).
        calib_batches: calibration batches per chip and point (``None`` = all).
        calib_momentum: weight of each calibration batch after the first in the moving min/max
            of the ADC ranges (the authors' observer: 0.01).
        chip_indices: evaluate only these chips (e.g. one DDP rank's share); ``None`` = all.
        progress: show a tqdm bar over chips.
    """

    seed: int = 0
    stream: str = "test"
    calib_loader: Iterable | None = None
    max_batches: int | None = None
    calib_batches: int | None = None
    calib_momentum: float = 0.01
    chip_indices: Sequence[int] | None = None
    progress: bool = True

    def __post_init__(self):
        check_int("seed", self.seed)
        check_choice("stream", self.stream, STREAMS)
        check_limits(self.max_batches, self.calib_batches, self.calib_momentum)

    def determinants(self) -> dict:
        """The settings that change what a chip measures (the rest only select or show)."""
        keys = ("max_batches", "calib_batches", "calib_momentum", "seed", "stream")
        return {k: getattr(self, k) for k in keys}


def chip_settings(config) -> dict:
    """The fields of an ``AnalogConfig`` that stay fixed over a grid (all but ``SWEEPS``), as
    plain values (nested device settings as dicts): what a test chip is, besides the swept ones."""
    return {k: v for k, v in asdict(config).items() if k not in SWEEPS}


# ----------------------------------------------------------------------------- one chip


@torch.no_grad()
def _measure(model: nn.Module, test_loader: Iterable, max_batches: int | None) -> tuple:
    """Top-1 accuracy, mean cross-entropy and sample count on the test batches."""
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, 0
    for i, (x, y) in enumerate(test_loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, classes)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        n += y.shape[0]
    if n == 0:
        raise ValueError("the test loader gave no samples")
    return correct / n, loss_sum / n, n


def _needs_calibration(model: nn.Module) -> bool:
    """Whether the chip has ranges to calibrate: enabled ADCs, tile ADCs or calibrated DACs."""
    return any(a.enabled and a.calibratable for a in adcs(model))


def _stochastic_reads(model: nn.Module) -> bool:
    """Whether every read of the chip draws fresh noise (output or weight read noise)."""
    return any(
        layer.config.out_noise > 0 or layer.config.w_read_noise > 0
        for _, layer in analog_layers(model)
        if layer.uses_device
    )


def _calibrate(model: nn.Module, settings: EvalSettings, seed: int) -> None:
    """Calibrate the programmed chip's ADC ranges, with torch's CPU generator seeded by the
    chip seed: a shuffling or augmenting calibration loader (random crops and flips of training
    images) then draws the same batches for this chip in every run and at every grid point, and
    the caller's random stream is left as it was."""
    # Data loading (samplers, transforms, worker seeds) draws from the CPU generator; output and
    # read noise during calibration (which upstream ranges see) from the model's device's.
    device = next(model.parameters()).device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(derive_seed("calib-reads", seed))
        calibrate_adc(
            model,
            settings.calib_loader,
            max_batches=settings.calib_batches,
            momentum=settings.calib_momentum,
        )


def _evaluate_chip(
    model: nn.Module,
    chip: int,
    seed: int,
    cells: Sequence[tuple[Read, Point]],
    test_loader,
    settings: EvalSettings,
    adc_kind: str = "chip",
) -> list[Row]:
    """Program chip ``chip`` once and measure it at every cell (common random numbers); a PCM
    chip is moved to each read-out's time once (its weights are computed there, not per batch).
    The caller's random streams are left as they were: iterating a loader draws its base seed
    from the global RNG, and a training run's data order must not depend on its validation
    chips (which a noise-free run does not program)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else [], device_type=device.type
    ):
        return _measure_cells(model, chip, seed, cells, test_loader, settings, adc_kind)


def _measure_cells(model, chip, seed, cells, test_loader, settings, adc_kind) -> list[Row]:
    program_chip(model, seed)
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for read, group in itertools.groupby(cells, key=operator.itemgetter(0)):
        if read is not None:
            set_time(model, *read)
        for _, (sigma, mean_shift, levels) in group:
            # Both reset the ADC calibration: the ranges depend on the noisy chip, so recalibrate.
            set_noise(model, sigma=sigma, mean_shift=mean_shift)
            set_adc(model, levels, kind=adc_kind)
            if _needs_calibration(model):
                _calibrate(model, settings, seed)
            if _stochastic_reads(model):  # fresh noise per read, the same in every run
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices, device_type=device.type):
                    # each read-out (t, repetition) of a PCM chip redraws them too
                    torch.manual_seed(derive_seed("reads", seed, *(read or ())))
                    acc, loss, n = _measure(model, test_loader, settings.max_batches)
            else:
                acc, loss, n = _measure(model, test_loader, settings.max_batches)
            measured = (chip, seed, sigma, mean_shift, levels, acc, loss, n)
            if read is None:
                rows.append(Row(*measured))
            else:
                rows.append(TimedRow(*measured, t_inference=read[0], repetition=read[1]))
    return rows


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore noise settings, chip, ADC levels and ranges, and train/eval modes on exit."""
    modes = [(m, m.training) for m in model.modules()]
    layers = [
        (name, layer, layer.config, layer.chip_seed, layer.chip_time)
        for name, layer in analog_layers(model)
    ]
    converters = [
        (a, a.levels, a.lo.clone(), a.hi.clone(), a.calibrated)
        for a in adcs(model, active_only=False)
    ]
    try:
        yield
    finally:
        for name, layer, config, seed, time in layers:
            layer.config = config
            if seed is None:
                layer.clear()
            else:  # draws depend only on (seed, qualified name): the same chip again
                layer.program(seed, name)
                if time is not None and layer._pcm is not None:  # and at the same time
                    layer.set_time(*time)
        for adc, levels, lo, hi, calibrated in converters:
            adc.levels, adc.calibrated = levels, calibrated
            adc.lo.copy_(lo)
            adc.hi.copy_(hi)
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------- many chips


def _chips(model: nn.Module, grid: RobustnessGrid, settings: EvalSettings) -> list[int]:
    """Fail before any work on a user mistake; return the chip indices to evaluate."""
    if not isinstance(grid, RobustnessGrid):
        raise TypeError(f"grid must be a RobustnessGrid, got {type(grid).__name__}")
    grid.points()  # no unresolved "train" left
    check_time_sweep(model, grid)
    given = settings.chip_indices
    chips = list(range(grid.chips)) if given is None else list(given)
    for c in chips:
        check_int("chip_indices", c, minimum=0)
        if c >= grid.chips:
            raise ConfigError("chip_indices", c, f"must be < chips={grid.chips}")
    periphery = any(a.calibratable for a in adcs(model) if a.placement in ("tile", "dac"))
    if any(levels is not None for levels in grid.adc_levels) or periphery:
        if settings.calib_loader is None:
            raise ConfigError(
                "calib_loader",
                None,
                "required when adc_levels are set (or the chip has DACs or tile ADCs): ADC "
                "ranges are calibrated on training or validation data (never test data) after "
                "programming a chip",
            )
    if any(levels is not None for levels in grid.adc_levels):
        placements = ("tile",) if grid.adc_kind == "tile" else CHIP_PLACEMENTS
        if not any(a.placement in placements for a in adcs(model)):
            raise ConfigError(
                "adc_levels",
                list(grid.adc_levels),
                "this model has no tile ADCs: test it on a chip with tile_adc_levels set"
                if grid.adc_kind == "tile"
                else "this model has no ADC points: convert it with adc_placement='layer' or "
                "add ADC() modules",
            )
    return sorted(set(chips))


def is_pcm(model: nn.Module) -> bool:
    """Whether ``model`` has Conv/Linear weights on PCM devices (``AnalogConfig(device='pcm')``)."""
    return any(layer.uses_device and layer.config.pcm_device for _, layer in analog_layers(model))


def check_time_sweep(model: nn.Module, grid: RobustnessGrid) -> None:
    """A grid with ``times`` needs a PCM chip: only its weights move in time."""
    if grid.timed and not is_pcm(model):
        raise ConfigError(
            "times",
            list(grid.times),
            "a time sweep needs a PCM chip (a model trained or converted with device='pcm', "
            "noise=pcm); this model's Conv/Linear weights do not drift: use times=[null]",
        )


def sort_rows(rows: Iterable[Row], grid: RobustnessGrid) -> list[Row]:
    """Rows in the canonical order: by chip, then grid order (e.g. to merge DDP ranks' rows)."""
    order = {cell: i for i, cell in enumerate(grid.cells())}
    return sorted(rows, key=lambda r: (r.chip, order[(r.read, r.point)]))


def _announce_cost(chips: int, points: int, first: float) -> None:
    """What the sweep will cost, from its first chip: said once, before the long part."""
    total = first * chips
    when = f"{total / 60:.1f} min" if total >= 90 else f"{total:.0f} s"
    tqdm.write(
        f"sweep: {chips} chips x {points} points; the first chip took {first:.1f} s, "
        f"so about {when} in all"
    )


def evaluate_robustness(
    model: nn.Module,
    test_loader: Iterable,
    grid: RobustnessGrid,
    settings: EvalSettings | None = None,
    rows_file: RowsFile | None = None,
) -> RobustnessResult:
    """Measure ``model`` on ``grid.chips`` seeded chip instances at every grid point.

    Args:
        model: a model converted with ``convert_to_analog``; its noise settings, chip, ADC levels
            and ranges and train/eval modes are restored on return (also on an exception).
        test_loader: ``(x, y)`` batches in a fixed order (rows are then bit-reproducible); top-1
            accuracy and mean cross-entropy over all of them.
        grid: the sweep and the number of chips (``train`` tokens resolved: ``grid.for_chip``);
            with ``times``, each chip is programmed once and read at every time and repetition
            (``TimedRow``s), which needs a PCM model.
        settings: seed, stream, calibration, limits, which chips, progress bar (``None``:
        the             defaults of ``EvalSettings``).
        rows_file: where each chip's rows go as soon as it is done 
        (``cimsim.robustness.rows.RowsFile``):
            its rows already measured with the same settings are read back, not recomputed,
            and the returned rows carry its subject and fingerprint.

    Returns:
        The rows (sorted by chip, then read-out and grid order), their ``summarize``, and the
        fingerprints.
    """
    settings = settings or EvalSettings()
    chips = _chips(model, grid, settings)
    seeds = {c: chip_seed(settings.seed, c, settings.stream) for c in chips}
    cells = grid.cells()
    done: dict[tuple[int, Read, Point], Row] = {}
    if rows_file is not None:
        expected = {(c, *cell): seeds[c] for c in chips for cell in cells}
        known = settings.determinants()
        if grid.adc_kind != "chip":  # the levels column means the tiles' ADCs
            known["adc_kind"] = grid.adc_kind
        done = rows_file.resume(model, known, expected, timed=grid.timed)
    todo = [(c, [cell for cell in cells if (c, *cell) not in done]) for c in chips]
    todo = [(c, missing) for c, missing in todo if missing]
    rows = list(done.values())
    n = len(chips)
    bar = tqdm(
        total=n, initial=n - len(todo), desc="chips", unit="chip", disable=not settings.progress
    )
    with bar, _preserved(model):
        for i, (c, missing) in enumerate(todo):
            start = time.perf_counter()
            new = _evaluate_chip(model, c, seeds[c], missing, test_loader, settings, grid.adc_kind)
            rows += new if rows_file is None else rows_file.append(new)
            bar.update()
            if i == 0 and len(todo) > 1 and settings.progress:
                _announce_cost(len(todo), len(missing), time.perf_counter() - start)
    rows = sort_rows(rows, grid)
    fingerprints = {} if rows_file is None else rows_file.fingerprints
    return RobustnessResult(rows=rows, summary=summarize(rows), fingerprints=fingerprints)


# ----------------------------------------------------------------------------- summary


def _t_ci95(std: float, n: int) -> float:
    """Half-width of the 95 % Student-t confidence interval of a mean of ``n`` chips."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and std (ddof=1; NaN for one value) with exactly rounded sums."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((a - mean) ** 2 for a in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def summarize(rows: Iterable[Row]) -> list[dict]:
    """Mean, std (ddof=1), 95 % CI and mean loss over chips, per grid point and model.

    Groups keep the order in which they first appear in ``rows`` (for the rows of
    ``evaluate_robustness``: grid order). When rows name their ``model``, it keys the groups and
    heads every entry, so rows of several models can be summarized at once. Rows of a time sweep
    (``TimedRow``) are summarized per time as ``summarize_times`` says.
    """
    rows = list(rows)
    has_model = any(r.model for r in rows)
    timed = [isinstance(r, TimedRow) for r in rows]
    if any(timed):
        if not all(timed):
            raise ValueError(
                "rows of a time sweep and of another sweep cannot be summarized together"
            )
        return summarize_times(rows, has_model)
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, *r.point), []).append(r)
    summary = []
    for (model, sigma, mean_shift, levels), group in groups.items():
        acc = [r.acc for r in group]
        n = len(acc)
        mean, std = _mean_std(acc)
        entry = {"model": model} if has_model else {}
        entry.update(
            sigma=sigma,
            mean_shift=mean_shift,
            adc_levels=levels,
            acc_mean=mean,
            acc_std=std,
            acc_ci95=_t_ci95(std, n),
            loss_mean=math.fsum(r.loss for r in group) / n,
            chips=n,
        )
        summary.append(entry)
    return summary


def summarize_times(rows: Sequence[TimedRow], has_model: bool = True) -> list[dict]:
    """The summary of a time sweep, per model, ``t_inference`` and grid point.

    Chips are the independent units; the R read-outs of a chip share its programming noise and
    drift exponents. With ``a[c, r]`` the accuracy of chip c at read-out r and ``m[c]`` its mean
    over read-outs: ``acc_mean`` = mean of ``m`` (the mean over chips and read-outs when every
    chip has R), ``acc_ci95`` = Student-t 95 % CI half-width of that mean over chips,
    ``acc_std_chip`` = std (ddof=1) of ``m`` (chip-to-chip spread), ``acc_std_read`` =
    ``sqrt(mean_c var_r a[c, r])`` (ddof=1; read-to-read spread, NaN for R = 1), ``acc_p5`` = the
    5th percentile of ``m`` (linear interpolation, numpy's default), ``loss_mean`` over all rows,
    ``chips`` N and ``repetitions`` (read-outs per chip, the fewest if they differ).
    """
    groups: dict[tuple, dict[int, list[TimedRow]]] = {}
    for r in rows:
        key = (r.model, r.t_inference, *r.point)
        groups.setdefault(key, {}).setdefault(r.chip, []).append(r)
    summary = []
    for (model, t, sigma, mean_shift, levels), by_chip in groups.items():
        reads = [[r.acc for r in chip_rows] for chip_rows in by_chip.values()]  # (N, R)
        means = [_mean_std(a)[0] for a in reads]
        n = len(means)
        mean, chip_std = _mean_std(means)
        read_var = [_mean_std(a)[1] ** 2 for a in reads]
        losses = [r.loss for chip_rows in by_chip.values() for r in chip_rows]
        entry = {"model": model} if has_model else {}
        entry.update(
            t_inference=t,
            sigma=sigma,
            mean_shift=mean_shift,
            adc_levels=levels,
            acc_mean=mean,
            acc_ci95=_t_ci95(chip_std, n),
            acc_std_chip=chip_std,
            acc_std_read=math.sqrt(math.fsum(read_var) / n),
            acc_p5=float(np.percentile(means, 5)),
            loss_mean=math.fsum(losses) / len(losses),
            chips=n,
            repetitions=min(len(a) for a in reads),
        )
        summary.append(entry)
    return summary


_TIME_UNITS = (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_time(seconds: float) -> str:
    """A ``t_inference`` in human units: ``0``, ``20 s``, ``1 min``, ``1 h``, ``30 d``, ``1 y``
    (a year is 365 days)."""
    if seconds == 0:
        return "0"
    for unit, size in _TIME_UNITS:
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def format_summary(summary: Sequence[dict]) -> str:
    """An aligned text table of a summary, accuracies in percent (times in human units)."""
    named = any("model" in s for s in summary)
    timed = any("t_inference" in s for s in summary)
    columns = [("model", "model", str)] * named
    columns += [("t_inference", "t_inference", format_time)] * timed
    columns += [
        ("sigma", "sigma", "{:g}".format),
        ("mean_shift", "mean_shift", "{:g}".format),
        ("adc_levels", "adc_levels", lambda n: "none" if n is None else str(n)),
        ("acc_mean", "acc_mean%", _percent),
        ("acc_ci95", "ci95%", _percent),
    ]
    if timed:
        columns += [
            ("acc_std_chip", "chip_std%", _percent),
            ("acc_std_read", "read_std%", _percent),
            ("acc_p5", "p5%", _percent),
        ]
    else:
        columns.append(("acc_std", "acc_std%", _percent))
    columns += [("loss_mean", "loss_mean", "{:.4f}".format), ("chips", "chips", str)]
    columns += [("repetitions", "reads", str)] * timed
    table = [[header for _, header, _ in columns]]
    table += [[show(s[key]) for key, _, show in columns] for s in summary]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table
    )
