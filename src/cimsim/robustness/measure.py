"""Monte Carlo robustness measurement over programmed chip instances (docs/model.md).

Every chip is programmed once and then swept over the grid (sigma x mean shift x ADC levels) with
the same standard draws, so the curves differ only by the swept variable (common random numbers).
A PCM time sweep (``times``) reads every programmed chip at each ``t_inference`` ``repetitions``
times (``set_time``, once per chip, time and read-out) before sweeping the other axes; a fault
sweep (``fault_rates``) programs every chip at each fault rate (the same chip with more devices
stuck: ``cimsim.chip.devices.faults``) before sweeping the other axes. The rows
go to a resumable file (``cimsim.robustness.rows``) and are summarized per grid point
(``cimsim.robustness.summary``).
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cimsim.chip.adc import CHIP_PLACEMENTS, adcs, calibrate_adc, set_adc
from cimsim.chip.convert import (
    analog_layers,
    device_layers,
    program_chip,
    set_noise,
    set_time,
    timed_chip,
)
from cimsim.chip.noise import derive_seed
from cimsim.robustness.grid import EvalSettings, Point, Read, RobustnessGrid, chip_seed
from cimsim.robustness.outcomes import OutcomesFile, bits, outcome_cell
from cimsim.robustness.rows import FaultRow, RobustnessResult, Row, RowsFile, TimedRow
from cimsim.robustness.summary import summarize
from cimsim.validation import ConfigError, check_int

# ----------------------------------------------------------------------------- one chip


@torch.no_grad()
def _measure(
    model: nn.Module, test_loader: Iterable, max_batches: int | None, hits: list | None = None
) -> tuple:
    """Top-1 accuracy, mean cross-entropy and sample count on the test batches; each batch's
    per-image right-or-not (a bool tensor) is appended to ``hits`` when given."""
    device = next(model.parameters()).device
    correct, loss_sum, n = 0, 0.0, 0
    for i, (x, y) in enumerate(test_loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, classes)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        right = logits.argmax(dim=1) == y
        correct += right.sum().item()
        if hits is not None:
            hits.append(right.cpu())
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


def _same_on_every_chip(model: nn.Module, settings: EvalSettings) -> bool:
    """Whether the chip, as set for this point, is the same network whatever its seed: no analog
    layer perturbs (no relative noise or mean shift, no device with a state of its own, no
    faults), no read draws fresh noise, and any ranges to calibrate come from batches that do
    not depend on the seed (``EvalSettings.calib_fixed``). Every chip then measures the same."""
    if _stochastic_reads(model) or any(layer.perturbed for _, layer in analog_layers(model)):
        return False
    return settings.calib_fixed or not _needs_calibration(model)


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
    grid: RobustnessGrid,
    hits: dict | None = None,
    shared: dict | None = None,
) -> list[Row]:
    """Program chip ``chip`` once and measure it at every cell (common random numbers); a PCM
    chip is moved to each read-out's time once (its weights are computed there, not per batch),
    a fault sweep's chip programmed again at each fault rate (its faults applied there once).
    The caller's random streams are left as they were: iterating a loader draws its base seed
    from the global RNG, and a training run's data order must not depend on its validation
    chips (which a noise-free run does not program). ``hits``, when given, receives the
    per-image outcomes at the outcome cells (``{(read, point): bits}``; ``outcomes``).
    ``shared`` holds the measurements of cells where every chip is the same network
    (``_same_on_every_chip``), by cell: the first chip measures such a cell, the others reuse
    it (what measuring them again gives, at none of the cost)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else [], device_type=device.type
    ):
        args = (test_loader, settings, grid, hits, {} if shared is None else shared)
        return _measure_cells(model, chip, seed, cells, *args)


def _set_faults(model: nn.Module, faults: dict[str, float]) -> None:
    """Every analog layer's chip with these stuck-at faults (``AnalogConfig.faults``)."""
    for _, layer in analog_layers(model):
        layer.config = layer.config.override({"faults": faults})


def _measure_cells(model, chip, seed, cells, test_loader, settings, grid, hits, shared) -> list:
    program_chip(model, seed)
    model.eval()
    rows, adc_kind = [], grid.adc_kind
    for read, group in itertools.groupby(cells, key=operator.itemgetter(0)):
        if grid.faulted:  # the same chip (seed) with the faults of this rate
            _set_faults(model, grid.faults_at(read[0]))
            program_chip(model, seed)
        elif read is not None:
            set_time(model, *read)
        for _, point in group:
            sigma, mean_shift, levels = point
            # Both reset the ADC calibration: the ranges depend on the noisy chip, so recalibrate.
            set_noise(model, sigma=sigma, mean_shift=mean_shift)
            set_adc(model, levels, kind=adc_kind)
            wanted = hits is not None and outcome_cell(read, point)
            same = _same_on_every_chip(model, settings)
            if same and (read, point) in shared:  # measured on an earlier chip: the same network
                acc, loss, n, outcome = shared[(read, point)]
            else:
                if _needs_calibration(model):
                    _calibrate(model, settings, seed)
                right = [] if wanted else None
                acc, loss, n = _measure_read(model, test_loader, settings, seed, read, right)
                outcome = None if right is None else bits(right)
                if same:
                    shared[(read, point)] = (acc, loss, n, outcome)
            if wanted:
                hits[(read, point)] = outcome
            measured = (chip, seed, sigma, mean_shift, levels, acc, loss, n)
            if read is None:
                rows.append(Row(*measured))
            elif grid.faulted:
                rows.append(FaultRow(*measured, fault_rate=read[0]))
            else:
                rows.append(TimedRow(*measured, t_inference=read[0], repetition=read[1]))
    return rows


def _measure_read(model, test_loader, settings: EvalSettings, seed: int, read, right) -> tuple:
    """``_measure`` of the chip as set; fresh noise per read (output or read noise) is drawn from
    a stream of the chip seed and the read-out, the same in every run."""
    if not _stochastic_reads(model):
        return _measure(model, test_loader, settings.max_batches, right)
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        # each read-out (t, repetition) of a PCM chip redraws them too
        torch.manual_seed(derive_seed("reads", seed, *(read or ())))
        return _measure(model, test_loader, settings.max_batches, right)


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
                if time is not None and layer.device_state is not None:  # and at the same time
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
    check_fault_sweep(model, grid)
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


def check_time_sweep(model: nn.Module, grid: RobustnessGrid) -> None:
    """A grid with ``times`` needs a PCM chip (a timed device): only its weights move in time."""
    if grid.timed and not timed_chip(model):
        raise ConfigError(
            "times",
            list(grid.times),
            "a time sweep needs a PCM chip (a model trained or converted with device='pcm', "
            "noise=pcm); this model's Conv/Linear weights do not drift: use times=[null]",
        )
    for device in {layer.config.device_model for layer in device_layers(model)}:
        for t in grid.times if grid.timed else ():
            if t is not None:
                device.check_time(t, "times")


def check_fault_sweep(model: nn.Module, grid: RobustnessGrid) -> None:
    """A grid with ``fault_rates`` needs Conv/Linear weights on a device with conductances."""
    devices = {layer.config.device_model for layer in device_layers(model)}
    if grid.faulted and (not devices or not all(d.conductances for d in devices)):
        names = sorted({d.name for d in devices}) or "none"
        why = f"a fault sweep needs devices with conductances (Device.conductances); got {names}"
        raise ConfigError("fault_rates", list(grid.fault_rates), why)


def sort_rows(rows: Iterable[Row], grid: RobustnessGrid) -> list[Row]:
    """Rows in the canonical order: by chip, then grid order (e.g. to merge DDP ranks' rows)."""
    order = {cell: i for i, cell in enumerate(grid.cells())}
    return sorted(rows, key=lambda r: (r.chip, order[(r.read, r.point)]))


def _announce_cost(chips: int, points: int, first: float, shared: int = 0) -> None:
    """What the sweep will cost, from its first chip: said once, before the long part. With
    ``shared`` cells (measured once for every chip) the later chips cost less than the first."""
    total = first * chips
    when = f"{total / 60:.1f} min" if total >= 90 else f"{total:.0f} s"
    less = f", less for the {shared} points that are the same on every chip" if shared else ""
    tqdm.write(
        f"sweep: {chips} chips x {points} points; the first chip took {first:.1f} s, "
        f"so about {when} in all{less}"
    )


def evaluate_robustness(
    model: nn.Module,
    test_loader: Iterable,
    grid: RobustnessGrid,
    settings: EvalSettings | None = None,
    rows_file: RowsFile | None = None,
    outcomes: OutcomesFile | None = None,
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
        settings: seed, stream, calibration, limits, which chips, progress bar (``None``: the
            defaults of ``EvalSettings``).
        rows_file: where each chip's rows go as soon as it is done (``RowsFile``): its rows
            already measured with the same settings are read back, not recomputed, and the
            returned rows carry its subject and fingerprint.
        outcomes: where each chip's per-image outcomes at test sigma 0 go, before its rows
            (``OutcomesFile``, kept in step with ``rows_file``, which it needs): reused rows
            without outcomes are measured again for them, not appended twice.

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
        if grid.faulted:  # which way the fault_rate column's devices are stuck
            known["fault_kind"] = grid.fault_kind
        kind = FaultRow if grid.faulted else grid.timed
        done = rows_file.resume(model, known, expected, timed=kind)
    if outcomes is not None and rows_file is None:
        raise ValueError("outcomes need a rows_file: they carry its rows' fingerprint")
    redo = set() if outcomes is None else outcomes.resume(done)
    todo = [
        (c, [cell for cell in cells if (c, *cell) not in done or (c, *cell) in redo]) for c in chips
    ]
    todo = [(c, missing) for c, missing in todo if missing]
    rows = list(done.values())
    n = len(chips)
    bar = tqdm(
        total=n, initial=n - len(todo), desc="chips", unit="chip", disable=not settings.progress
    )
    shared: dict = {}  # cells where every chip is the same network, measured once
    with bar, _preserved(model):
        for i, (c, missing) in enumerate(todo):
            start = time.perf_counter()
            hits = None if outcomes is None else {}
            args = (test_loader, settings, grid, hits, shared)
            new = _evaluate_chip(model, c, seeds[c], missing, *args)
            if outcomes is not None:  # before the rows: a reused row has its outcomes
                outcomes.append(c, seeds[c], hits)
                new = [r for r in new if (r.chip, r.read, r.point) not in done]
            rows += new if rows_file is None else rows_file.append(new)
            bar.update()
            if i == 0 and len(todo) > 1 and settings.progress:
                first = time.perf_counter() - start
                _announce_cost(len(todo), len(missing), first, len(shared))
    rows = sort_rows(rows, grid)
    if outcomes is not None:
        outcomes.finish(grid)
    fingerprints = {} if rows_file is None else rows_file.fingerprints
    return RobustnessResult(rows=rows, summary=summarize(rows), fingerprints=fingerprints)
