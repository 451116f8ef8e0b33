"""Monte Carlo robustness measurement over programmed chip instances (docs/model.md).

Accuracy under noise is a distribution over chips: each chip instance is one frozen draw of the
perturbation, reproducible from ``chip_seed(seed, chip, stream)``. Every chip is programmed once
and then swept over the grid (sigma x mean shift x ADC levels) with the same standard draws, so the
curves differ only by the swept variable (common random numbers). Per grid point we report the
mean, the standard deviation and a Student-t 95 % confidence interval over chips. Chips that
select checkpoints (``stream="val"``) never coincide with the chips that are reported
(``stream="test"``).

This module measures; ``cimsim.report`` keeps the rows in a resumable file and draws them, and
``cimsim.study`` runs several models into one set of files. The file is over 350 lines because
the measurement reads as one story: the grid, the row, the settings, one chip, many chips, the
summary.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from tqdm import tqdm

from cimsim.adc import adcs, calibrate_adc, set_adc
from cimsim.convert import analog_layers, program_chip, set_noise
from cimsim.noise import derive_seed
from cimsim.validation import ConfigError, check_choice, check_int, check_number

if TYPE_CHECKING:  # report imports this module; the annotation only names its class
    from cimsim.report import RowsFile

# AnalogConfig fields a grid sweeps: the figure's possible x axes, and what a test chip leaves to
# the grid (the rest of the chip is fixed for a whole sweep).
SWEEPS = ("sigma", "mean_shift", "adc_levels")
STREAMS = ("test", "val")  # chips that are reported / chips that select checkpoints
TRAIN = "train"  # in a grid's sigmas or adc_levels: each model's own training value

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


@dataclass(frozen=True)
class Row:
    """One chip measured at one grid point: a line of ``robustness_rows.csv``, in column order.

    Chip ``chip`` was programmed from ``chip_seed``, set to the point ``(sigma, mean_shift,
    adc_levels)`` and scored ``acc`` (top-1, a fraction) and ``loss`` (mean cross-entropy, nats)
    on ``n`` samples. ``model`` (the curve's label), ``ckpt`` (the checkpoint file) and
    ``fingerprint`` (of the settings that determined the row) are filled in by
    ``cimsim.report.RowsFile``; empty otherwise.
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


def _calibrate(model: nn.Module, settings: EvalSettings, seed: int) -> None:
    """Calibrate the programmed chip's ADC ranges, with torch's CPU generator seeded by the
    chip seed: a shuffling or augmenting calibration loader (random crops and flips of training
    images) then draws the same batches for this chip in every run and at every grid point, and
    the caller's random stream is left as it was."""
    # Data loading (samplers, transforms, worker seeds) draws from the CPU generator only.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        calibrate_adc(
            model,
            settings.calib_loader,
            max_batches=settings.calib_batches,
            momentum=settings.calib_momentum,
        )


def _evaluate_chip(
    model: nn.Module, chip: int, seed: int, points: Sequence[Point], test_loader, settings
) -> list[Row]:
    """Program chip ``chip`` once and measure it at every point (common random numbers)."""
    program_chip(model, seed)
    model.eval()
    rows = []
    for sigma, mean_shift, levels in points:
        # Both reset the ADC calibration: the ranges depend on the noisy chip, so recalibrate.
        set_noise(model, sigma=sigma, mean_shift=mean_shift)
        set_adc(model, levels)
        if levels is not None:
            _calibrate(model, settings, seed)
        acc, loss, n = _measure(model, test_loader, settings.max_batches)
        rows.append(Row(chip, seed, sigma, mean_shift, levels, acc, loss, n))
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
    given = settings.chip_indices
    chips = list(range(grid.chips)) if given is None else list(given)
    for c in chips:
        check_int("chip_indices", c, minimum=0)
        if c >= grid.chips:
            raise ConfigError("chip_indices", c, f"must be < chips={grid.chips}")
    if any(levels is not None for levels in grid.adc_levels):
        if settings.calib_loader is None:
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
    return sorted(set(chips))


def sort_rows(rows: Iterable[Row], grid: RobustnessGrid) -> list[Row]:
    """Rows in the canonical order: by chip, then grid order (e.g. to merge DDP ranks' rows)."""
    order = {p: i for i, p in enumerate(grid.points())}
    return sorted(rows, key=lambda r: (r.chip, order[r.point]))


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
        grid: the sweep and the number of chips (``train`` tokens resolved: ``grid.for_chip``).
        settings: seed, stream, calibration, limits, which chips, progress bar (``None``: the
            defaults of ``EvalSettings``).
        rows_file: where each chip's rows go as soon as it is done (``cimsim.report.RowsFile``):
            its rows already measured with the same settings are read back, not recomputed,
            and the returned rows carry its subject and fingerprint.

    Returns:
        The rows (sorted by chip, then grid order), their ``summarize``, and the fingerprint.
    """
    settings = settings or EvalSettings()
    chips = _chips(model, grid, settings)
    seeds = {c: chip_seed(settings.seed, c, settings.stream) for c in chips}
    done: dict[tuple[int, Point], Row] = {}
    if rows_file is not None:
        expected = {(c, p): seeds[c] for c in chips for p in grid.points()}
        done = rows_file.resume(model, settings.determinants(), expected)
    todo = [(c, [p for p in grid.points() if (c, p) not in done]) for c in chips]
    todo = [(c, points) for c, points in todo if points]
    rows = list(done.values())
    n = len(chips)
    bar = tqdm(
        total=n, initial=n - len(todo), desc="chips", unit="chip", disable=not settings.progress
    )
    with bar, _preserved(model):
        for c, points in todo:
            new = _evaluate_chip(model, c, seeds[c], points, test_loader, settings)
            rows += new if rows_file is None else rows_file.append(new)
            bar.update()
    rows = sort_rows(rows, grid)
    fingerprints = {} if rows_file is None else rows_file.fingerprints
    return RobustnessResult(rows=rows, summary=summarize(rows), fingerprints=fingerprints)


# ----------------------------------------------------------------------------- summary


def _t_ci95(std: float, n: int) -> float:
    """Half-width of the 95 % Student-t confidence interval of a mean of ``n`` chips."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def summarize(rows: Iterable[Row]) -> list[dict]:
    """Mean, std (ddof=1), 95 % CI and mean loss over chips, per grid point and model.

    Groups keep the order in which they first appear in ``rows`` (for the rows of
    ``evaluate_robustness``: grid order). When rows name their ``model``, it keys the groups and
    heads every entry, so rows of several models can be summarized at once.
    """
    groups: dict[tuple, list[Row]] = {}
    rows = list(rows)
    has_model = any(r.model for r in rows)
    for r in rows:
        groups.setdefault((r.model, *r.point), []).append(r)
    summary = []
    for (model, sigma, mean_shift, levels), group in groups.items():
        acc = [r.acc for r in group]
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
            loss_mean=math.fsum(r.loss for r in group) / n,
            chips=n,
        )
        summary.append(entry)
    return summary


def format_summary(summary: Sequence[dict]) -> str:
    """An aligned text table of a summary, accuracies in percent."""
    named = any("model" in s for s in summary)
    head = ["sigma", "mean_shift", "adc_levels", "acc_mean%", "ci95%", "acc_std%", "loss_mean"]
    header = ["model"] * named + head + ["chips"]
    table = [header]
    for s in summary:
        levels = "none" if s["adc_levels"] is None else str(s["adc_levels"])
        percent = [f"{100 * s[k]:.2f}" for k in ("acc_mean", "acc_ci95", "acc_std")]
        cells = [f"{s['sigma']:g}", f"{s['mean_shift']:g}", levels, *percent]
        table.append([str(s["model"])] * named + cells + [f"{s['loss_mean']:.4f}", str(s["chips"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table
    )
