"""The paper's plan as data: its trainings (``Run``), studies (``Study``) and report sections."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from paper.runs import (  # noqa: F401  (re-exported: the plan is its runs and its studies)
    BIAS_SIGMA,
    BIASES,
    FAULT_TRAIN,
    FIG7_SIGMAS,
    FIG9_SIGMAS,
    L_EQUAL_PASSES,
    L_PASSES,
    L_STEPS,
    L_VALUES,
    MEAN_SHIFT,
    MEAN_SHIFTS,
    RRAM_T_TRAIN,
    RUN,
    RUNS,
    SCALES,
    SEED0,
    Run,
    base_of,
    l_run,
    mapping_run,
    seed_name,
)

HURT_ADC_LEVELS = 8  # section 5's ADC: 8 levels (3 bits), mid-range of Fig. 9's 2..18
SIGMAS_FEW = "[0.0,0.05,0.1,0.15,0.2]"
FAULT_TEST_SIGMA = 0.1  # section 8a: every model at this test sigma (HA-SGD's training sigma)
RRAM_TIMES = "[0,1,86400,172800]"  # every time aihwkit's ReRAM model is fitted at (0: programmed)
IR_DROP_STRONG = 100.0  # section 8c: 100x aihwkit's wire resistance scale, a visible drop
IR_TILES = (None, 256, 64)  # rows per tile: one tile per layer (WRN-10-2: <= 576 rows), 256, 64
PAIRS_SIGMA = 0.1  # section 8d's test sigma
PAIRS_F = ((1.0,), (1.0, 3.0), (1.0, 1.0), (1.0, 2.0, 4.0))  # significance factors per weight


def pairs_factor(f: tuple[float, ...]) -> float:
    """The weight-error std of pairs ``f`` over one pair's (docs/model.md): sqrt(sum f^2)/sum f."""
    return math.sqrt(math.fsum(x * x for x in f)) / math.fsum(f)


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
    chips: int | None = None  # at most this many chips per point (None: ``--chips``)
    seeds: int | None = None  # at most this many training seeds of its runs (None: ``--seeds``)
    needs: tuple[str, ...] = ()  # runs its section cannot do without (``--models``), besides
    # its first (the baseline every other run is compared with)


@dataclass(frozen=True)
class Section:
    """One section of the report: ``paper/sections/<name>.py`` renders it (``render(ctx)``) from
    the rows of its ``studies``; ``title`` names it in the paper-scale compute estimate."""

    name: str
    title: str
    studies: tuple[Study, ...] = ()


_SIGMA_TINY = ("robustness.sigmas=[0.0,0.1,0.2]",)
_TWO = ("digital", "sigma0.1_L4")
_FIG7 = ("digital", *(f"sigma{s:g}_L4" for s in FIG7_SIGMAS))
_FIG8 = ("sigma0.05_L4", *(f"mu_{n}{mu:g}" for mu in MEAN_SHIFTS for n in ("neg", "pos")))
_FIG9 = ("digital", *(f"sigma{s:g}_L4" for s in FIG9_SIGMAS))
# --tiny's Fig. 8 grid: mu = 0 and every trained shift (each model's window needs its own)
_FIG8_MUS = sorted({0.0, *MEAN_SHIFTS, *(-m for m in MEAN_SHIFTS)})
_FIG8_TINY_MUS = f"[{','.join(f'{m:g}' for m in _FIG8_MUS)}]"
_MAPPINGS = tuple((sc, b) for sc in SCALES for b in BIASES)
_MAPPED = ("digital", *(mapping_run(sc, b) for sc, b in _MAPPINGS))
BIAS_SIGMAS = "[0.0,0.1,0.15]"
ONE_SEED = 1  # sections 7-8 (methods, devices): one training seed, for this machine's budget
BIAS_CHIPS = 10  # the 10 x 11-model mapping matrix: 10 chips per point


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

# The Hessian section: Fig. 7's and the L study's equal-steps models, each checkpoint's trace from
# HESSIAN_PROBES Rademacher probes (Hutchinson SE about 15 % of a checkpoint's trace) on the first
# HESSIAN_BATCHES test batches (the whole digits test set at batch size 64)
HESSIAN_SIGMAS = "[0.0,0.02,0.05,0.1,0.15,0.2]"
HESSIAN_PROBES = 16
HESSIAN_BATCHES = 5

# The report, in order: each section's studies (one evaluate.py call each) run in this order.
SECTIONS: tuple[Section, ...] = (
    Section(
        "fig7",
        "Fig. 7",
        (
            Study(
                "fig7",
                _FIG7,
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
                _FIG8,
                ("robustness=mean_shift_sweep",),
                (f"robustness.mean_shifts={_FIG8_TINY_MUS}",),
            ),
        ),
    ),
    Section(
        "fig9",
        "Fig. 9",
        (
            Study(
                "fig9",
                _FIG9,
                ("robustness=adc_sweep", "robustness.sigmas=[0.0,0.1]", "robustness.outcomes=true"),
                ("robustness.adc_levels=[null,2,8]",),
            ),
        ),
    ),
    Section(
        "bias",
        "bi-scale ablation",
        tuple(
            Study(
                f"bias_{sc}_{b}",
                _MAPPED,
                (
                    "robustness=sigma_sweep",
                    f"robustness.sigmas={BIAS_SIGMAS}",
                    f"chip.scale={sc}",
                    f"chip.bias={b}",
                ),
                _SIGMA_TINY,
                chips=BIAS_CHIPS,
                needs=(mapping_run(*_MAPPINGS[0]),),  # the authors' model
            )
            for sc, b in _MAPPINGS
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
                tuple(dict.fromkeys((*L_STEPS, *L_EQUAL_PASSES))),
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
        "hessian",
        "Hessian",
        (
            Study(
                "hessian",
                (*_FIG7, *L_STEPS),
                (
                    "robustness=sigma_sweep",
                    f"robustness.sigmas={HESSIAN_SIGMAS}",
                    "chip.analog_bn=false",
                    "chip.identity_noise=false",
                    "hessian=true",
                    f"hessian_probes={HESSIAN_PROBES}",
                    f"hessian_batches={HESSIAN_BATCHES}",
                ),
                (*_SIGMA_TINY, "hessian_probes=4", "hessian_batches=1"),
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
                seeds=ONE_SEED,
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
                seeds=ONE_SEED,
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
                seeds=ONE_SEED,
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
                seeds=ONE_SEED,
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
                seeds=ONE_SEED,
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
                seeds=ONE_SEED,
            ),
        ),
    ),
    Section("paper_scale", "paper scale"),  # the GPU-time estimate of every section above
)
STUDIES: tuple[Study, ...] = tuple(s for section in SECTIONS for s in section.studies)
STUDY = {s.name: s for s in STUDIES}
CORE = ("fig7", "bias", "hurts", "fig9")  # the core sections: a second dataset's report


def selected(sections: tuple[str, ...] | None = None) -> tuple[Section, ...]:
    """The report's sections named in ``sections`` (all when None), in the plan's order, and
    the GPU-time estimate (``paper_scale``) always; a ValueError names an unknown one."""
    if sections is None:
        return SECTIONS
    known = [s.name for s in SECTIONS if s.studies]
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise ValueError(f"no such section {', '.join(unknown)}; the plan's are {', '.join(known)}")
    return tuple(s for s in SECTIONS if s.name in sections or not s.studies)


def restricted(
    sections: tuple[Section, ...], models: tuple[str, ...] | None
) -> tuple[Section, ...]:
    """``sections`` with each study's runs cut to ``models`` (plan run names; None: all): a
    smaller plan for a slower machine or larger data, for the core sections (``CORE``), whose
    renderers read the runs a report has. A ValueError names a model the sections do not
    measure, a section outside the core, or a study left without its baseline (its first run),
    a run it ``needs`` or a second run to compare with."""
    if models is None:
        return sections
    other = [s.name for s in sections if s.studies and s.name not in CORE]
    if other:
        raise ValueError(f"only the core sections ({','.join(CORE)}) take --models, not {other}")
    measured = {r for s in sections for st in s.studies for r in st.runs}
    unknown = [m for m in models if m not in measured]
    if unknown:
        known = ", ".join(r.name for r in RUNS if r.name in measured)
        raise ValueError(f"{', '.join(unknown)} not measured by these sections (theirs: {known})")
    out = []
    for sec in sections:
        studies = tuple(
            replace(st, runs=tuple(r for r in st.runs if r in models)) for st in sec.studies
        )
        for st, cut in zip(sec.studies, studies, strict=True):
            lacking = [r for r in (st.runs[0], *st.needs) if r not in cut.runs]
            if lacking or len(cut.runs) < 2:
                why = f"lacks {', '.join(lacking)}" if lacking else "keeps one model only"
                raise ValueError(f"section {sec.name}'s study {st.name} {why}: it compares models")
        out.append(replace(sec, studies=studies))
    return tuple(out)


def planned_runs(sections: tuple[Section, ...], seeds: int) -> list[Run]:
    """Every training of ``sections``, training seed by seed (seed 0's runs first, so an
    interrupted plan has whole seeds), each seed in the plan's order (a teacher first); a run
    at the most seeds any of its studies measures (``Study.seeds``)."""
    need: dict[str, int] = {}
    for st in (st for s in sections for st in s.studies):
        for r in st.runs:
            need[r] = max(need.get(r, 0), study_seeds(st, seeds))
    for r, n in list(need.items()):
        if RUN[r].teacher:
            need[RUN[r].teacher] = max(need.get(RUN[r].teacher, 0), n)
    base = [r for r in RUNS if r.name in need]
    return [r.seeded(k) for k in range(seeds) for r in base if k < need[r.name]]


def study_seeds(study: Study, seeds: int) -> int:
    """The training seeds ``study`` measures: ``--seeds``, at most the study's cap."""
    return seeds if study.seeds is None else min(seeds, study.seeds)


def seeded_runs(study: Study, seeds: int) -> list[str]:
    """The training folders ``study`` evaluates: each of its runs at each of its seeds."""
    return [seed_name(r, k) for r in study.runs for k in range(study_seeds(study, seeds))]
