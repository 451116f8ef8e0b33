"""The paper's plan as data: its trainings (``Run``), studies (``Study``) and report sections."""

from __future__ import annotations

import math
from dataclasses import dataclass

HURT_ADC_LEVELS = 8  # section 5's ADC: 8 levels (3 bits), mid-range of Fig. 9's 2..18
MEAN_SHIFT = 0.01  # Fig. 8's training mean shifts: -MEAN_SHIFT, 0, +MEAN_SHIFT (at sigma 0.05)
SIGMAS_FEW = "[0.0,0.05,0.1,0.15,0.2]"
FAULT_TRAIN = 0.005  # the faults-in-the-loop model: 0.5 % of devices stuck off, 0.5 % on
FAULT_TEST_SIGMA = 0.1  # section 8a: every model at this test sigma (HA-SGD's training sigma)
RRAM_T_TRAIN = 86400.0  # the RRAM model is trained for the chip one day after programming
RRAM_TIMES = "[0,1,86400,172800]"  # every time aihwkit's ReRAM model is fitted at (0: programmed)
IR_DROP_STRONG = 100.0  # section 8c: 100x aihwkit's wire resistance scale, a visible drop
IR_TILES = (None, 256, 64)  # rows per tile: one tile per layer (WRN-10-2: <= 576 rows), 256, 64
PAIRS_SIGMA = 0.1  # section 8d's test sigma
PAIRS_F = ((1.0,), (1.0, 3.0), (1.0, 1.0), (1.0, 2.0, 4.0))  # significance factors per weight


def pairs_factor(f: tuple[float, ...]) -> float:
    """The weight-error std of pairs ``f`` over one pair's (docs/model.md): sqrt(sum f^2)/sum f."""
    return math.sqrt(math.fsum(x * x for x in f)) / math.fsum(f)


@dataclass(frozen=True)
class Run:
    """One training: ``train.py`` overrides, at ``epochs_factor`` x the base epochs (``{half}``
    in an override becomes half the run's epochs); ``teacher``: the run whose ``last.ckpt``
    this one distils from."""

    name: str
    title: str
    overrides: tuple[str, ...]
    epochs_factor: float = 1.0
    teacher: str | None = None

    def epochs(self, base: int) -> int:
        return max(1, round(base * self.epochs_factor))

    def resolved(self, base: int) -> list[str]:
        """The overrides with the run's epochs (``trainer.max_epochs``) filled in."""
        epochs = self.epochs(base)
        extra = [o.format(half=epochs / 2) for o in self.overrides]
        return [*extra, f"trainer.max_epochs={epochs}"]


@dataclass(frozen=True)
class Study:
    """One ``evaluate.py`` call over ``runs``' best checkpoints (``last``: their ``last.ckpt``,
    the fixed budget of the plan, instead); ``tiny``: its grid overrides in the tiny mode
    (``reproduce.py --tiny``)."""

    name: str
    runs: tuple[str, ...]
    overrides: tuple[str, ...]
    tiny: tuple[str, ...] = ()
    last: bool = False


@dataclass(frozen=True)
class Section:
    """One section of the report: ``paper/sections/<name>.py`` renders it (``render(ctx)``) from
    the rows of its ``studies``; ``title`` names it in the paper-scale compute estimate."""

    name: str
    title: str
    studies: tuple[Study, ...] = ()


def _hasgd(sigma: float, L: int, factor: float = 1.0, **kw) -> Run:
    ep = "" if factor == 1 else f", {factor:g}x epochs"
    return Run(
        f"sigma{sigma:g}_L{L}" + ("" if factor == 1 else f"_x{factor:g}ep"),
        f"HA-SGD sigma={sigma:g}, L={L}{ep}",
        (f"noise.sigma={sigma}", f"hasgd.L={L}"),
        factor,
        **kw,
    )


def _method(name: str, title: str, **kw) -> Run:
    return Run(name, title, ("noise.sigma=0.1", f"method={name}"), **kw)


RUNS: tuple[Run, ...] = (  # in training order: the digital model (a distillation teacher) first
    Run("digital", "digital (sigma=0, L=1)", ("noise.sigma=0.0", "hasgd.L=1")),
    _hasgd(0.05, 4),
    _hasgd(0.1, 4),
    _hasgd(0.15, 4),
    Run(
        f"mu_neg{MEAN_SHIFT:g}",
        f"HA-SGD sigma=0.05, mu=-{MEAN_SHIFT:g}, L=4",
        ("noise.sigma=0.05", f"noise.mean_shift=-{MEAN_SHIFT}", "hasgd.L=4"),
    ),
    Run(
        f"mu_pos{MEAN_SHIFT:g}",
        f"HA-SGD sigma=0.05, mu=+{MEAN_SHIFT:g}, L=4",
        ("noise.sigma=0.05", f"noise.mean_shift={MEAN_SHIFT}", "hasgd.L=4"),
    ),
    _hasgd(0.1, 1),
    _hasgd(0.1, 2),
    _hasgd(0.1, 8),
    _hasgd(0.1, 1, 4.0),
    _hasgd(0.1, 2, 2.0),
    _hasgd(0.1, 8, 0.5),
    # experiment=pcm_digits's settings, spelled out: a second experiment= (the paper-scale
    # command's) would replace it, and the base epochs apply as to every run.
    Run(
        "pcm",
        "PCM, t_train=1 h, L=2",
        ("noise=pcm", "noise.sigma=0.0", "noise.t_train=3600.0", "hasgd.L=2"),
    ),
    _method("antithetic", "HA-SGD L=4, antithetic pairs"),
    Run(
        "ramp",
        "HA-SGD L=4, sigma ramped over half the epochs",
        ("noise.sigma=0.1", "method=ramp", "noise.schedule.ramp_epochs={half}"),
    ),
    _method("overscaled", "HA-SGD L=4, 1.5x sigma"),
    Run(
        "distill",
        "HA-SGD L=4, distilled from the digital model",
        ("noise.sigma=0.1", "method=distill"),
        teacher="digital",
    ),
    _method("sam", "HA-SGD L=4 after a SAM ascent (rho 0.05)"),
    Run(
        "faults",
        f"HA-SGD sigma=0.1, L=4, faults {100 * FAULT_TRAIN:g} % off + {100 * FAULT_TRAIN:g} % on",
        (
            "noise.sigma=0.1",
            "hasgd.L=4",
            f"noise.faults.stuck_off={FAULT_TRAIN}",
            f"noise.faults.stuck_on={FAULT_TRAIN}",
        ),
    ),
    # noise=rram's settings spelled out as the pcm run's: trained for the chip 1 day on
    Run(
        "rram",
        "RRAM, t_train=1 d, L=2",
        ("noise=rram", "noise.sigma=0.0", f"noise.t_train={RRAM_T_TRAIN}", "hasgd.L=2"),
    ),
)
RUN = {r.name: r for r in RUNS}

_SIGMA_TINY = ("robustness.sigmas=[0.0,0.1,0.2]",)
_TWO = ("digital", "sigma0.1_L4")
_L_RUNS = tuple(
    f"sigma0.1_L{L}" + s for s in ("", "_x4ep", "_x2ep", "_x0.5ep") for L in (1, 2, 4, 8)
)


def _variants(settings: list[str]) -> str:
    """``+robustness.variants=[...]``: a test chip (a curve) per setting (Hydra's flow syntax)."""
    return f"+robustness.variants=[{','.join('{' + v + '}' for v in settings)}]"


def _tiles(rows: int | None) -> str:
    return f"tile_rows:{'null' if rows is None else rows}"


_IR_VARIANTS = [
    *(f"{_tiles(n)},ir_drop:{d}" for n in IR_TILES for d in (0.0, IR_DROP_STRONG)),
    f"{_tiles(None)},ir_drop:1.0",  # aihwkit's scale, where its drop is largest: one tile
]
_PAIRS_VARIANTS = [f"pairs:{{f:[{','.join(map(str, f))}]}}" for f in PAIRS_F]
# the one-pair chip at the sigmas the closed form gives the other pairs' weight errors
PAIRS_SIGMAS = sorted({PAIRS_SIGMA, *(PAIRS_SIGMA * pairs_factor(f) for f in PAIRS_F)})
_HURTS = (
    ("weights", ("chip.analog_bn=false", "chip.identity_noise=false")),
    ("bn", ("chip.identity_noise=false",)),
    ("identity", ()),
    ("adc", (f"robustness.adc_levels=[{HURT_ADC_LEVELS}]",)),
)

# The report, in order: each section's studies (one evaluate.py call each) run in this order.
SECTIONS: tuple[Section, ...] = (
    Section(
        "fig7",
        "Fig. 7",
        (
            Study(
                "fig7",
                ("digital", "sigma0.05_L4", "sigma0.1_L4", "sigma0.15_L4"),
                ("robustness=sigma_sweep",),
                _SIGMA_TINY,
            ),
        ),
    ),
    Section(
        "fig8",
        "Fig. 8",
        (
            Study(
                "fig8",
                ("sigma0.05_L4", f"mu_neg{MEAN_SHIFT:g}", f"mu_pos{MEAN_SHIFT:g}"),
                ("robustness=mean_shift_sweep",),
                (f"robustness.mean_shifts=[-{MEAN_SHIFT},0.0,{MEAN_SHIFT}]",),
            ),
        ),
    ),
    Section(
        "fig9",
        "Fig. 9",
        (Study("fig9", _TWO, ("robustness=adc_sweep",), ("robustness.adc_levels=[null,2,8]",)),),
    ),
    Section(
        "bias",
        "bi-scale ablation",
        tuple(
            Study(
                f"bias_{b}",
                _TWO,
                ("robustness=sigma_sweep", f"robustness.sigmas={SIGMAS_FEW}", f"chip.bias={b}"),
                _SIGMA_TINY,
            )
            for b in ("separate", "unscaled", "shared", "digital")
        ),
    ),
    Section(
        "hurts",
        "what hurts most",
        tuple(
            Study(
                f"hurt_{name}",
                _TWO,
                ("robustness=sigma_sweep", "robustness.sigmas=[0.0,0.1,0.2]", *chip),
            )
            for name, chip in _HURTS
        ),
    ),
    Section(
        "lstudy",
        "L",
        (
            Study(
                "lstudy",
                tuple(r for r in _L_RUNS if r in RUN),
                (
                    "robustness=sigma_sweep",
                    "robustness.sigmas=[0.0,0.1,0.2]",
                    "robustness.target_sigma=0.1",
                ),
                last=True,
            ),
        ),
    ),
    Section(
        "pcm",
        "PCM",
        (
            Study(
                "pcm",
                ("pcm",),
                ("robustness=drift_sweep",),
                ("robustness.times=[0,3600,31536000]", "robustness.repetitions=2"),
            ),
        ),
    ),
    Section(
        "methods",
        "methods",
        (
            Study(
                "methods",
                (
                    "digital",
                    "sigma0.1_L1",
                    "sigma0.1_L4",
                    "antithetic",
                    "ramp",
                    "overscaled",
                    "distill",
                    "sam",
                ),
                (
                    "robustness=sigma_sweep",
                    f"robustness.sigmas={SIGMAS_FEW}",
                    "robustness.target_sigma=0.1",
                ),
                _SIGMA_TINY,
            ),
        ),
    ),
    Section(
        "faults",
        "stuck-at faults",
        (
            Study(
                "faults",
                ("digital", "sigma0.1_L4", "faults"),
                ("robustness=fault_sweep", f"robustness.sigmas=[{FAULT_TEST_SIGMA}]"),
                ("robustness.fault_rates=[0.0,0.001,0.01,0.1]",),
            ),
        ),
    ),
    Section(
        "rram",
        "RRAM",
        (
            Study(
                "rram",
                ("digital", "rram"),
                (
                    "robustness=drift_sweep",
                    f"robustness.times={RRAM_TIMES}",
                    "robustness.compensations=null",
                    "chip.device=rram",
                ),
                ("robustness.repetitions=2",),
            ),
        ),
    ),
    Section(
        "ir_drop",
        "IR drop",
        (
            Study(
                "ir_drop",
                ("sigma0.1_L4",),
                ("robustness=sigma_sweep", "robustness.sigmas=[0.1]", _variants(_IR_VARIANTS)),
            ),
        ),
    ),
    Section(
        "pairs",
        "device pairs",
        (
            Study(
                "pairs",
                _TWO,
                (
                    "robustness=sigma_sweep",
                    f"robustness.sigmas=[{','.join(repr(s) for s in PAIRS_SIGMAS)}]",
                    "chip.analog_bn=false",
                    "chip.identity_noise=false",
                    "chip.bias=digital",
                    _variants(_PAIRS_VARIANTS),
                ),
            ),
        ),
    ),
    Section("paper_scale", "paper scale"),  # the GPU-time estimate of every section above
)
STUDIES: tuple[Study, ...] = tuple(s for section in SECTIONS for s in section.studies)
STUDY = {s.name: s for s in STUDIES}
