"""The Monte Carlo grid and how chips are drawn and measured: seeds, limits, settings.

Accuracy under noise is a distribution over chips: each chip instance is one frozen draw of the
perturbation, reproducible from ``chip_seed(seed, chip, stream)``. Chips that select checkpoints
(``stream="val"``) never coincide with the chips that are reported (``stream="test"``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cimsim.chip.config import check_relative
from cimsim.chip.noise import derive_seed
from cimsim.validation import ConfigError, check_choice, check_int, check_number

# What a grid sweeps: the figure's possible x axes, and what a test chip leaves to the grid (the
# AnalogConfig fields sigma, mean_shift, adc_levels, a PCM chip's time after programming and the
# fraction of stuck devices; the rest of the chip is fixed for a whole sweep).
SWEEPS = ("sigma", "mean_shift", "adc_levels", "t_inference", "fault_rate")
STREAMS = ("test", "val")  # chips that are reported / chips that select checkpoints
TRAIN = "train"  # in a grid's sigmas, mean_shifts or adc_levels: each model's own training value
ADC_KINDS = ("chip", "tile")  # what a grid's adc_levels set: the chip's ADCs or the tiles'
# What a grid's fault rate p sets (chip.faults): p/2 stuck off and p/2 on, or all one way.
FAULT_KINDS = ("both", "stuck_off", "stuck_on")

Point = tuple[float, float, int | None]  # (sigma, mean_shift, adc_levels)
# What a chip is set to before the points: (t_inference, repetition) of a PCM time sweep, or
# (fault_rate,) of a fault sweep (the chip programmed with those faults); None otherwise.
Read = tuple[float, int] | tuple[float] | None


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
        fault_rates: fractions p of stuck devices (``AnalogConfig.faults``), in [0, 1], at which
            each chip is programmed (the same chip: the devices stuck at a lower rate stay stuck),
            or ``(None,)`` (default): no fault sweep, the test chip's own faults. Not with times.
        fault_kind: how a rate sets the faults: ``both`` (default; ``stuck_off = stuck_on =
            p / 2``), ``stuck_off`` or ``stuck_on`` (all p one way).
    """

    sigmas: tuple[float | str, ...]
    mean_shifts: tuple[float | str, ...] = (0.0,)
    adc_levels: tuple[int | str | None, ...] = (None,)
    chips: int = 20
    times: tuple[float | None, ...] = (None,)
    repetitions: int = 1
    adc_kind: str = "chip"
    fault_rates: tuple[float | None, ...] = (None,)
    fault_kind: str = "both"

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
        object.__setattr__(self, "fault_rates", self._checked_faults())

    def _checked_faults(self) -> tuple[float | None, ...]:
        rates = _non_empty_tuple("fault_rates", self.fault_rates)
        check_choice("fault_kind", self.fault_kind, FAULT_KINDS)
        if rates == (None,):
            return rates
        for p in rates:
            if p is None:
                raise ConfigError("fault_rates", list(rates), "null only alone: no fault sweep")
            check_number("fault_rates", p, minimum=0.0, maximum=1.0)
        if len(set(rates)) != len(rates):
            raise ConfigError("fault_rates", list(rates), "must not repeat a rate")
        if self.timed:
            why = "a fault sweep reads each chip as programmed: times=[null] (one sweep at a time)"
            raise ConfigError("fault_rates", list(rates), why)
        return tuple(float(p) for p in rates)

    @property
    def faulted(self) -> bool:
        """Whether this is a fault sweep (``fault_rates`` given)."""
        return self.fault_rates != (None,)

    def faults_at(self, rate: float) -> dict[str, float]:
        """The chip's ``faults`` at fault rate ``rate`` (``fault_kind``)."""
        if self.fault_kind == "both":
            return {"stuck_off": rate / 2, "stuck_on": rate / 2}
        return {"stuck_off": 0.0, "stuck_on": 0.0, self.fault_kind: rate}

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
        """``(t_inference, repetition)`` of every read-out of a chip, in order; ``(fault_rate,)``
        of every rate of a fault sweep; ``[None]`` without either."""
        if self.faulted:
            return [(p,) for p in self.fault_rates]
        if not self.timed:
            return [None]
        return [(t, rep) for t in self.times for rep in range(self.repetitions)]

    def cells(self) -> list[tuple[Read, Point]]:
        """What a chip is measured at: every read-out, and at each every point (fastest)."""
        return list(itertools.product(self.reads(), self.points()))


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
        calib_fixed: the calibration batches are the same whatever the seed (a fixed-order
            loader without random augmentation, such as the validation split's:
            ``calibration.fixed_batches``; an augmenting one must leave it False). A point where
            no chip differs from another (no noise, mean shift, device state, faults or per-read
            noise) is then measured on the first chip only and its rows reused for the others,
            which would measure the same; False measures every chip.
    """

    seed: int = 0
    stream: str = "test"
    calib_loader: Iterable | None = None
    max_batches: int | None = None
    calib_batches: int | None = None
    calib_momentum: float = 0.01
    chip_indices: Sequence[int] | None = None
    progress: bool = True
    calib_fixed: bool = False

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
    return {k: v for k, v in config.as_dict().items() if k not in SWEEPS}
