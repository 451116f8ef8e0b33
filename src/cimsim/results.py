"""The results report (``docs/results.md``): the paper's claims against measured rows.

``PLAN`` is what ``reproduce.py`` runs: the trainings (``Run``) and the Monte Carlo studies
(``Study``, one ``evaluate.py`` call each, so every model of a study sees the same chips). This
module reads the studies' ``robustness_rows.csv`` files back and builds every table, figure and
verdict from them: no number of the report is typed. A verdict follows a rule stated next to it,
on paired differences: two models measured on the same chips (common random numbers), the 95 %
Student-t CI of the per-chip difference of their accuracies; "better" when it lies above 0.

Nothing here imports Hydra: the plan is plain data, the report plain files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from torch import nn

from cimsim.convert import build_network
from cimsim.report import ROWS_FILE, plot_robustness
from cimsim.robustness import Row, TimedRow, format_time, summarize, summarize_times
from cimsim.validation import ConfigError

# ----------------------------------------------------------------------------- the plan

HURT_ADC_LEVELS = 8  # section 5's ADC: 8 levels (3 bits), mid-range of Fig. 9's 2..18
MEAN_SHIFT = 0.01  # Fig. 8's training mean shifts: -MEAN_SHIFT, 0, +MEAN_SHIFT (at sigma 0.05)
SIGMAS_FEW = "[0.0,0.05,0.1,0.15,0.2]"


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
    """One ``evaluate.py`` call over ``runs``' best checkpoints; ``tiny``: its grid overrides in
    the tiny mode (``reproduce.py --tiny``)."""

    name: str
    runs: tuple[str, ...]
    overrides: tuple[str, ...]
    tiny: tuple[str, ...] = ()


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


RUNS: tuple[Run, ...] = (
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
    Run("pcm", "PCM, t_train=1 h, L=2 (experiment=pcm_digits)", ("experiment=pcm_digits",)),
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
)
RUN = {r.name: r for r in RUNS}

_SIGMA_TINY = ("robustness.sigmas=[0.0,0.1,0.2]",)
_L_RUNS = tuple(
    f"sigma0.1_L{L}" + s for s in ("", "_x4ep", "_x2ep", "_x0.5ep") for L in (1, 2, 4, 8)
)
STUDIES: tuple[Study, ...] = (
    Study(
        "fig7",
        ("digital", "sigma0.05_L4", "sigma0.1_L4", "sigma0.15_L4"),
        ("robustness=sigma_sweep",),
        _SIGMA_TINY,
    ),
    Study(
        "fig8",
        ("sigma0.05_L4", f"mu_neg{MEAN_SHIFT:g}", f"mu_pos{MEAN_SHIFT:g}"),
        ("robustness=mean_shift_sweep",),
        (f"robustness.mean_shifts=[-{MEAN_SHIFT},0.0,{MEAN_SHIFT}]",),
    ),
    Study(
        "fig9",
        ("digital", "sigma0.1_L4"),
        ("robustness=adc_sweep",),
        ("robustness.adc_levels=[null,2,8]",),
    ),
    *(
        Study(
            f"bias_{b}",
            ("digital", "sigma0.1_L4"),
            ("robustness=sigma_sweep", f"robustness.sigmas={SIGMAS_FEW}", f"chip.bias={b}"),
            _SIGMA_TINY,
        )
        for b in ("separate", "unscaled", "shared", "digital")
    ),
    *(
        Study(
            f"hurt_{name}",
            ("digital", "sigma0.1_L4"),
            ("robustness=sigma_sweep", "robustness.sigmas=[0.0,0.1,0.2]", *chip),
        )
        for name, chip in (
            ("weights", ("chip.analog_bn=false", "chip.identity_noise=false")),
            ("bn", ("chip.identity_noise=false",)),
            ("identity", ()),
            ("adc", (f"robustness.adc_levels=[{HURT_ADC_LEVELS}]",)),
        )
    ),
    Study(
        "lstudy",
        tuple(r for r in _L_RUNS if r in RUN),
        (
            "robustness=sigma_sweep",
            "robustness.sigmas=[0.0,0.1,0.2]",
            "robustness.target_sigma=0.1",
        ),
    ),
    Study(
        "pcm",
        ("pcm",),
        ("robustness=drift_sweep",),
        ("robustness.times=[0,3600,31536000]", "robustness.repetitions=2"),
    ),
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
)
STUDY = {s.name: s for s in STUDIES}


# ----------------------------------------------------------------------------- reading rows


def read_rows(path: str | os.PathLike) -> list[Row]:
    """A rows CSV as ``Row``s (``TimedRow``s for a time sweep), typed as the dataclass says."""
    with open(path, newline="") as f:
        raws = list(csv.DictReader(f))
    if not raws:
        return []
    kind = TimedRow if "t_inference" in raws[0] else Row
    parse = {
        "int": int,
        "float": float,
        "str": str,
        "int | None": lambda t: None if t == "" else int(t),
    }
    return [
        kind(**{f.name: parse[f.type](r[f.name]) for f in dataclasses.fields(kind)}) for r in raws
    ]


def run_of(row: Row) -> str:
    """The training run a row's checkpoint belongs to: ``<out>/train/<run>/checkpoints/x.ckpt``."""
    return Path(row.ckpt).parent.parent.name


def study_rows(eval_dir: Path, study: Study, chips: int) -> list[Row]:
    """The rows of ``study`` for its runs' checkpoints and chips ``0..chips-1``."""
    path = eval_dir / study.name / ROWS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: run reproduce.py first")
    return [r for r in read_rows(path) if run_of(r) in study.runs and r.chip < chips]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and Student-t 95 % CI half-width (NaN for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def cell(rows: Iterable[Row], run: str, **point) -> dict[int, float]:
    """Accuracy per chip of ``run`` at ``point`` (keys of ``Row``: sigma, mean_shift, ...)."""
    out = {}
    for r in rows:
        if run_of(r) == run and all(getattr(r, k) == v for k, v in point.items()):
            out[r.chip] = r.acc
    return out


@dataclass
class Diff:
    """A paired difference ``a - b`` over common chips: mean and 95 % CI half-width."""

    mean: float
    ci: float
    chips: int

    @property
    def verdict(self) -> str:
        if not math.isnan(self.ci) and self.mean - self.ci > 0:
            return "better"
        if not math.isnan(self.ci) and self.mean + self.ci < 0:
            return "worse"
        return "no significant difference"

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} ± {_pp(self.ci)}"


def paired(a: dict[int, float], b: dict[int, float]) -> Diff:
    """``a - b`` chip by chip (the chips both have)."""
    chips = sorted(set(a) & set(b))
    if not chips:
        raise ValueError("no common chips to compare")
    mean, ci = mean_ci([a[c] - b[c] for c in chips])
    return Diff(mean, ci, len(chips))


# ----------------------------------------------------------------------------- formatting


def _pp(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def acc_text(values: dict[int, float]) -> str:
    """``98.5 ± 1.8`` (percent, 95 % CI over chips)."""
    if not values:
        return "–"
    mean, ci = mean_ci(list(values.values()))
    return f"{100 * mean:.1f} ± {_pp(ci)}"


def md_table(header: Sequence[str], body: Sequence[Sequence[str]], right: int = 1) -> str:
    """A markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = [header, align, *body]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_csv(path: Path, records: Sequence[dict]) -> Path:
    """A table's records as CSV (header from the first record), atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)

    return atomic_write(path, write)


def _sigmas(rows: Iterable[Row]) -> list[float]:
    return sorted({r.sigma for r in rows})


def accuracy_records(rows: Sequence[Row], x: str) -> list[dict]:
    """The CSV of a figure: per run and grid point, mean, CI and chips over the rows."""
    summary = summarize(rows)
    label_run = {r.model: run_of(r) for r in rows}
    return [{"run": label_run[s["model"]], **s} for s in summary]


# ----------------------------------------------------------------------------- the report


@dataclass
class Context:
    """What every section reads: the rows' folder, the report's folder, the chips per point,
    the trainings' manifest entries (``reproduce.py``), the figures' link prefix."""

    eval_dir: Path
    figures: Path
    chips: int
    manifest: dict
    link: str = "results"
    written: list[Path] = field(default_factory=list)

    def rows(self, study: str) -> list[Row]:
        return study_rows(self.eval_dir, STUDY[study], self.chips)

    def figure(self, name: str, rows: Sequence[Row], x: str, title: str) -> str:
        """Draw rows' means and CIs against ``x`` into ``<figures>/<name>.png``, write their
        table as ``<name>.csv``; return the markdown image link."""
        summary = summarize(rows) if x != "t_inference" else summarize_times(rows)
        self.written.append(plot_robustness(summary, x, self.figures / f"{name}.png", title))
        self.written.append(write_csv(self.figures / f"{name}.csv", accuracy_records(rows, x)))
        link = f"{self.link}/{name}"
        return f"![{title}]({link}.png)\n\n(Table: [`{name}.csv`]({link}.csv).)"


CLAIM_DIGITAL = (
    '"Simulation results show that the DNNs trained for high-precision digital computing '
    'engines are not resilient against the uncertainty of the analog NVM devices."'
)
CLAIM_GAIN = (
    '"We observe that the hardware-aware methodology increase the neural network resiliency by '
    "up to about 40% increase of network accuracy depending on the application, and more than "
    '50% if low-resolution ADCs are used in the CIM architecture."'
)


def _first_from(sigmas: list[float], good: dict[float, bool]) -> float | None:
    """The smallest sigma from which ``good`` holds at every larger grid sigma (None: never)."""
    start = None
    for s in reversed(sigmas):
        if not good[s]:
            break
        start = s
    return start


def section_fig7(ctx: Context) -> str:
    rows = ctx.rows("fig7")
    runs = STUDY["fig7"].runs
    sigmas = _sigmas(rows)
    body = [[f"{s:g}", *(acc_text(cell(rows, r, sigma=s)) for r in runs)] for s in sigmas]
    table = md_table(["test sigma", *(RUN[r].title for r in runs)], body)
    verdicts, best_gain = [], (0.0, None, None)
    for r in runs[1:]:
        diffs = {s: paired(cell(rows, r, sigma=s), cell(rows, "digital", sigma=s)) for s in sigmas}
        start = _first_from(sigmas, {s: d.verdict == "better" for s, d in diffs.items()})
        top = max(sigmas, key=lambda s: diffs[s].mean)
        if diffs[top].mean > best_gain[0]:
            best_gain = (diffs[top].mean, r, top)
        where = "never" if start is None else f"at every test sigma >= {start:g}"
        clean = diffs[0.0] if 0.0 in diffs else None
        cost = "" if clean is None else f"; at sigma 0 it differs by {clean} points"
        verdicts.append(
            f"* {RUN[r].title}: better than digital {where} (largest gain {diffs[top]} points, "
            f"at sigma {top:g}){cost}."
        )
    holds = all("never" not in v for v in verdicts)
    gain = (
        f"The largest gain measured is {100 * best_gain[0]:.1f} points ({RUN[best_gain[1]].title}, "
        f'test sigma {best_gain[2]:g}); the paper\'s "up to about 40%" is for WRN-28-10 / '
        "CIFAR-100."
        if best_gain[1]
        else "No HA-SGD model gains on the digital one anywhere on the grid."
    )
    fig = ctx.figure("fig7", rows, "sigma", "Fig. 7: accuracy vs test sigma")
    return "\n\n".join(
        [
            "## 1. Fig. 7: accuracy vs test noise",
            f"**Claim.** {CLAIM_DIGITAL} Fig. 7's caption: \"A higher training noise level leads "
            "to "
            "better resiliency that can stand stronger analog uncertainty, but also sacrifices a "
            f'little of zero-noise inference accuracy." And: {CLAIM_GAIN}',
            "**Measured.** Models trained at sigma 0 (digital), 0.05, 0.10 and 0.15 (HA-SGD, L = "
            "4), "
            "each tested on the same chips at every test sigma; accuracy in %, mean ± 95 % CI over "
            "chips.",
            table,
            fig,
            "**Rule.** A model is *better* than the digital one at a test sigma when the 95 % CI "
            "of "
            "the per-chip difference of accuracies (same chips) lies above 0. The claim holds when "
            "every HA-SGD model is better from some test sigma on (to the end of the grid).",
            "\n".join(verdicts),
            f"**Verdict: {'holds' if holds else 'does not hold'} at this scale.** {gain}",
        ]
    )


def section_fig8(ctx: Context) -> str:
    rows = ctx.rows("fig8")
    runs = STUDY["fig8"].runs
    shifts = sorted({r.mean_shift for r in rows})
    body = [[f"{m:g}", *(acc_text(cell(rows, r, mean_shift=m)) for r in runs)] for m in shifts]
    table = md_table(["test mu", *(RUN[r].title for r in runs)], body)
    verdicts, ok = [], True
    for r, mu in ((runs[1], -MEAN_SHIFT), (runs[2], MEAN_SHIFT)):
        if mu not in shifts:
            verdicts.append(f"* test mu {mu:g} is not on the grid: no verdict for {RUN[r].title}.")
            ok = False
            continue
        d = paired(cell(rows, r, mean_shift=mu), cell(rows, runs[0], mean_shift=mu))
        ok &= d.verdict == "better"
        verdicts.append(
            f"* at test mu = {mu:g}: {RUN[r].title} vs the mu = 0 model: {d} points ({d.verdict})."
        )
    fig = ctx.figure("fig8", rows, "mean_shift", "Fig. 8: accuracy vs test mean shift")
    return "\n\n".join(
        [
            "## 2. Fig. 8: accuracy vs test mean shift (test sigma 0.05)",
            "**Claim** (Fig. 8's caption): \"All networks are trained with 5% device noise and "
            "tested "
            "with 5% variance device noise. The mean shift of the device can therefore be "
            'compensated by using it as a prior knowledge during training."',
            f"**Measured.** Models trained at sigma 0.05 with mean shift 0 and ±{MEAN_SHIFT:g} "
            "(HA-SGD, L = 4), tested at sigma 0.05 over the mean-shift grid of "
            "`conf/robustness/mean_shift_sweep.yaml` on the same chips.",
            table,
            fig,
            "**Rule.** The claim holds when, at each shifted model's own training mu, the shifted "
            "model is better than the mu = 0 model (95 % CI of the paired per-chip difference "
            "above "
            "0).",
            "\n".join(verdicts),
            f"**Verdict: {'holds' if ok else 'does not hold'} at this scale.**",
        ]
    )


def _adc_text(levels: int | None) -> str:
    return "none" if levels is None else str(levels)


def _drop(rows: Sequence[Row], run: str, sigma: float, levels: int) -> dict[int, float]:
    """Per chip: accuracy without ADC minus accuracy with ``levels``, at ``sigma``."""
    full = cell(rows, run, sigma=sigma, adc_levels=None)
    quantized = cell(rows, run, sigma=sigma, adc_levels=levels)
    return {c: full[c] - quantized[c] for c in set(full) & set(quantized)}


def section_fig9(ctx: Context) -> str:
    rows = ctx.rows("fig9")
    d, h = STUDY["fig9"].runs
    sigmas = _sigmas(rows)
    levels = sorted({r.adc_levels for r in rows}, key=lambda n: -1 if n is None else n)
    header = ["ADC levels"] + [f"{RUN[r].title}, sigma {s:g}" for s in sigmas for r in (d, h)]
    body = [
        [
            _adc_text(n),
            *(acc_text(cell(rows, r, sigma=s, adc_levels=n)) for s in sigmas for r in (d, h)),
        ]
        for n in levels
    ]
    verdicts, softened = [], False
    for s in sigmas:
        softer, harder, gain = [], [], []
        for n in levels:
            if n is None:
                continue
            drops = [_drop(rows, run, s, n) for run in (d, h)]
            diff = paired(*drops)  # digital's drop minus HA-SGD's
            gap = paired(cell(rows, h, sigma=s, adc_levels=n), cell(rows, d, sigma=s, adc_levels=n))
            gain.append((gap.mean, n, gap))
            if diff.verdict == "better":
                softer.append(f"{n} ({diff})")
            elif diff.verdict == "worse":
                harder.append(f"{n} ({diff})")
        softened |= s > 0 and bool(softer)
        top = max(gain, key=lambda g: g[0]) if gain else None
        lead = f" Largest HA-SGD lead with ADCs: {top[2]} points at {top[1]} levels." if top else ""
        verdicts.append(
            f"* test sigma {s:g}: HA-SGD's ADC drop is significantly smaller at levels "
            f"{', '.join(softer) or 'none'}, larger at {', '.join(harder) or 'none'} (digital's "
            f"drop minus HA-SGD's, points).{lead}"
        )
    fig = ctx.figure("fig9", rows, "adc_levels", "Fig. 9: accuracy vs ADC levels")
    return "\n\n".join(
        [
            "## 3. Fig. 9: accuracy vs ADC levels, at the same test sigmas",
            "**Claim** (Fig. 9's caption): \"If we digitize the output of each layer with low "
            "bitwidth (which is necessary for some implementations of convolutional neural "
            "networks), the performance will suffer, and HA-SGD can reduce that performance drop "
            "as "
            f'an interesting side-effect." And: {CLAIM_GAIN}',
            "**Measured.** The digital and the HA-SGD (sigma 0.1, L = 4) models, both at test "
            "sigma "
            f"{' and '.join(f'{s:g}' for s in sigmas)}, with ADCs of 2 to 18 levels "
            "(`conf/robustness/adc_sweep.yaml`; ranges calibrated on the validation split after "
            'programming each chip); "none" = no ADC.',
            md_table(header, body),
            fig,
            "**Rule.** A model's ADC drop at N levels is, chip by chip, its accuracy without ADC "
            "minus its accuracy with N levels. HA-SGD *softens* N-level ADCs when the 95 % CI of "
            "(digital's drop - HA-SGD's drop) lies above 0. The claim holds when it does so at "
            "some "
            "level at a test sigma > 0.",
            "\n".join(verdicts),
            f"**Verdict: {'holds' if softened else 'does not hold'} at this scale.**",
        ]
    )


def _variant_table(ctx: Context, studies: Sequence[tuple[str, str]], sigmas: Sequence[float]):
    """(markdown body, rows by study) of accuracy per model, variant and test sigma."""
    body, by = [], {}
    for study, title in studies:
        rows = ctx.rows(study)
        by[study] = rows
        for r in STUDY[study].runs:
            body.append([RUN[r].title, title, *(acc_text(cell(rows, r, sigma=s)) for s in sigmas)])
    return body, by


def _bias_verdicts(by: dict, other: str, name: str, sigmas) -> tuple[list[str], bool, bool]:
    """Bi-scale minus ``other`` per model and test sigma > 0; whether it is never significantly
    worse, and whether it is better somewhere."""
    lines, never_worse, better = [], True, False
    for r in STUDY["bias_separate"].runs:
        parts = []
        for s in sigmas:
            if s == 0:
                continue
            diff = paired(cell(by["bias_separate"], r, sigma=s), cell(by[other], r, sigma=s))
            parts.append(f"{s:g}: {diff} ({diff.verdict})")
            never_worse &= diff.verdict != "worse"
            better |= diff.verdict == "better"
        lines.append(f"* {RUN[r].title}, bi-scale minus {name}, by test sigma: {'; '.join(parts)}.")
    return lines, never_worse, better


def section_bias(ctx: Context) -> str:
    variants = [
        ("bias_separate", "separate (bi-scale)"),
        ("bias_unscaled", "unscaled [W b] (naive)"),
        ("bias_shared", "shared: r(W) for b"),
        ("bias_digital", "digital"),
    ]
    sigmas = _sigmas(ctx.rows("bias_separate"))
    body, by = _variant_table(ctx, variants, sigmas)
    verdicts, never_worse, better = _bias_verdicts(by, "bias_unscaled", "unscaled", sigmas)
    vs_shared, shared_never_worse, _ = _bias_verdicts(by, "bias_shared", "shared", sigmas)
    ok = never_worse and better
    all_rows = [r for rows in by.values() for r in rows]
    fig = ctx.figure("bias", all_rows, "sigma", "bias mapping on the chip")
    return "\n\n".join(
        [
            "## 4. Bi-scale bias mapping: ablation",
            "**Claim** (the paper's Fig. 5): matching the ranges of W and b/s \"ensure[s] that "
            "both "
            "weights and biases use the full dynamic range of the device and minimize[s] the "
            "effect "
            'of the device noise".',
            "**Measured.** The digital and HA-SGD (sigma 0.1, L = 4) models, each tested on chips "
            "with `chip.bias=separate` (the bi-scale union range `R = r([W, b/f])`, the default), "
            "`unscaled` (the naive `[W b]` with s = 1: the weights' scale must span the bias, "
            "`R = r([W, b])` for both), `shared` (W and b relative to r(W), as if the bias fitted "
            "in the weights' range: an optimistic bound, not a storable mapping when |b| exceeds "
            "it) and `digital` (noise-free bias), on the same chips.",
            md_table(["model", "bias on the chip", *(f"sigma {s:g}" for s in sigmas)], body, 2),
            fig,
            "**Rule.** The paper compares the bi-scale mapping with storing b as is (`unscaled`). "
            "The claim holds when bi-scale minus unscaled (paired per-chip 95 % CI) is never below "
            "0 and is above 0 at some test sigma.",
            "\n".join(verdicts),
            f"**Verdict: {'holds' if ok else 'does not hold'} at this scale** (never worse than "
            f"unscaled: {'yes' if never_worse else 'no'}; better somewhere: "
            f"{'yes' if better else 'no'}).",
            "Against the optimistic `shared` bound (the bias noise at the weights' scale, "
            f"weights not widened): never worse: {'yes' if shared_never_worse else 'no'}.",
            "\n".join(vs_shared),
            "Bi-scale perturbs the weights relative to the union range, which the scaled bias "
            "widens where W and b/f are not centred alike (analog BatchNorm: w > 0, b centred), so "
            "it can lose to `shared`, which never widens the weights' range.",
        ]
    )


def section_hurts(ctx: Context) -> str:
    variants = [
        ("hurt_weights", "conv/linear only"),
        ("hurt_bn", "+ analog BN"),
        ("hurt_identity", "+ identity noise"),
        ("hurt_adc", f"+ {HURT_ADC_LEVELS}-level ADC"),
    ]
    sigmas = [s for s in _sigmas(ctx.rows("hurt_weights")) if s > 0]
    body, by = _variant_table(ctx, variants, sigmas)
    steps = []
    for r in STUDY["hurt_weights"].runs:
        for s in sigmas:
            drops = []
            for (a, _), (b, title) in zip(variants, variants[1:], strict=False):
                diff = paired(cell(by[a], r, sigma=s), cell(by[b], r, sigma=s))
                drops.append((diff.mean, title, diff))
            top = max(drops, key=lambda t: t[0])
            parts = "; ".join(f"{t} costs {d}" for _, t, d in drops)
            steps.append(f"* {RUN[r].title}, sigma {s:g}: {parts}. Largest: **{top[1]}**.")
    return "\n\n".join(
        [
            "## 5. What hurts most",
            "**Claim.** The paper models every layer on the chip (weights, BatchNorm as an analog "
            "affine layer, identity shortcuts, optionally ADCs) and does not separate their "
            "effects; this section does.",
            "**Measured.** The same two models on chips with noise only in the conv/linear weights "
            "(`chip.analog_bn=false chip.identity_noise=false`), then adding the analog BatchNorm, "
            f"then the identity-shortcut noise (the full chip), then {HURT_ADC_LEVELS}-level ADCs "
            "(`robustness.adc_levels=[8]`), on the same chips.",
            md_table(["model", "chip", *(f"sigma {s:g}" for s in sigmas)], body, 2),
            "**Rule.** Each step's cost is the paired per-chip accuracy before minus after adding "
            "it (points, 95 % CI); the largest mean cost hurts most.",
            "\n".join(steps),
            _identity_note(by["hurt_identity"]),
        ]
    )


def _identity_note(rows: Sequence[Row]) -> str:
    """Why identity noise may cost nothing: the network's count of identity shortcuts."""
    counts = {identity_shortcuts(r.ckpt) for r in rows if r.ckpt}
    if counts == {0}:
        return (
            "The identity-noise step costs exactly nothing here because this network has no "
            "identity shortcut: every residual block of this depth changes the width or the "
            "stride, so each shortcut is a 1x1 conv (on the chip with the conv weights). "
            "Deeper WRNs (WRN-16 and up) have identity shortcuts."
        )
    known = sorted(c for c in counts if c is not None)
    return f"Identity shortcuts in the network: {', '.join(map(str, known)) or 'unknown'}."


def identity_shortcuts(ckpt: str) -> int | None:
    """How many identity shortcuts (``nn.Identity``) the checkpoint's network has (None: the
    checkpoint cannot be read)."""
    try:
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
        net = build_network(dict(hparams["net"]))
    except (OSError, KeyError, RuntimeError, ConfigError):
        return None
    return sum(isinstance(m, nn.Identity) for m in net.modules())


def _passes(ctx: Context, run: str) -> int | None:
    return ctx.manifest.get("runs", {}).get(run, {}).get("passes")


def section_l(ctx: Context) -> str:
    rows = ctx.rows("lstudy")
    runs = [r for r in STUDY["lstudy"].runs if cell(rows, r)]
    sigmas = _sigmas(rows)
    info = ctx.manifest.get("runs", {})
    body = [
        [
            RUN[r].title,
            str(info.get(r, {}).get("epochs", "?")),
            str(_passes(ctx, r)),
            *(acc_text(cell(rows, r, sigma=s)) for s in sigmas),
        ]
        for r in runs
    ]
    table = md_table(["model", "epochs", "passes", *(f"sigma {s:g}" for s in sigmas)], body, 1)
    same_epochs = [r for r in runs if RUN[r].epochs_factor == 1]
    same_compute = [r for r in runs if RUN[r].epochs_factor * int(r.split("_L")[1][0]) == 4]
    verdicts = []
    for name, group, base in (
        ("same epochs", same_epochs, "sigma0.1_L1"),
        ("same compute", same_compute, "sigma0.1_L1_x4ep"),
    ):
        parts = []
        for r in group:
            if r == base:
                continue
            diff = paired(cell(rows, r, sigma=0.1), cell(rows, base, sigma=0.1))
            parts.append(f"{RUN[r].title}: {diff} ({diff.verdict})")
        verdicts.append(f"* {name}, vs {RUN[base].title}, at sigma 0.1: " + "; ".join(parts) + ".")
    sched = ctx.manifest.get("schedule", {})
    lr_note = (
        f"The learning rate is {sched.get('lr')} with StepLR (x{sched.get('gamma')} every "
        f"{sched.get('step_size')} epochs); the longest run here has {sched.get('max_epochs')} "
        "epochs, so "
        + (
            "no run reaches a step: every run trains at a constant rate."
            if sched.get("max_epochs", 0) <= sched.get("step_size", 0)
            else "some runs pass a step and others do not: the comparison mixes schedules."
        )
    )
    records = []
    for r in runs:
        mean, ci = mean_ci(list(cell(rows, r, sigma=0.1).values()))
        records.append({"run": r, "passes": _passes(ctx, r), "acc_mean": mean, "acc_ci95": ci})
    ctx.written.append(write_csv(ctx.figures / "lstudy_compute.csv", records))
    ctx.written.append(plot_points(records, ctx.figures / "lstudy_compute.png"))
    fig = ctx.figure("lstudy", rows, "sigma", "HA-SGD's L: accuracy vs test sigma")
    better = any("(better)" in v for v in verdicts)
    return "\n\n".join(
        [
            "## 6. Does L matter?",
            "**Claim** (Algorithm 1): HA-SGD averages the gradient over L perturbation samples per "
            "step, minimizing the expected loss under the perturbation.",
            "**Measured.** HA-SGD at sigma 0.1 with L = 1, 2, 4, 8 for the same epochs, and at the "
            "same compute (L x epochs fixed: L = 1 at 4x, L = 2 at 2x, L = 4 at 1x, L = 8 at 0.5x "
            'the epochs); "passes" = forward-backward passes to the chosen checkpoint. ' + lr_note,
            table,
            f"![accuracy at sigma 0.1 vs training passes]({ctx.link}/lstudy_compute.png)",
            fig,
            "**Rule.** L helps when a model with L > 1 is better at test sigma 0.1 than L = 1 "
            "(paired 95 % CI above 0), at the same epochs and at the same compute.",
            "\n".join(verdicts),
            f"**Verdict: L > 1 {'helps somewhere' if better else 'does not help measurably'} at "
            "this scale.**",
        ]
    )


def plot_points(records: Sequence[dict], path: Path) -> Path:
    """Accuracy at sigma 0.1 (± 95 % CI) against training passes, one point per run."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in records:
        ax.errorbar(
            r["passes"] or 0,
            100 * r["acc_mean"],
            yerr=100 * r["acc_ci95"],
            marker="o",
            capsize=3,
            label=RUN[r["run"]].title,
        )
    ax.set_xlabel("training compute (forward-backward passes to the chosen checkpoint)")
    ax.set_ylabel("top-1 accuracy (%) at sigma 0.1, mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def section_pcm(ctx: Context) -> str:
    rows = ctx.rows("pcm")
    summary = summarize_times(rows)
    body = [
        [
            s["model"].split("| chip ")[-1],
            format_time(s["t_inference"]),
            f"{100 * s['acc_mean']:.1f}",
            _pp(s["acc_ci95"]),
            _pp(s["acc_std_chip"]),
            _pp(s["acc_std_read"]),
            f"{100 * s['acc_p5']:.1f}",
        ]
        for s in summary
    ]
    fig = ctx.figure("pcm", rows, "t_inference", "PCM chip: accuracy vs time after programming")
    by = {}
    for s in summary:
        by.setdefault(s["model"], []).append(s)
    notes = []
    for model, entries in by.items():
        first, last = entries[0], entries[-1]
        d = 100 * (last["acc_mean"] - first["acc_mean"])
        notes.append(
            f"* {model}: {d:+.1f} points from t = 0 to {format_time(last['t_inference'])}."
        )
    return "\n\n".join(
        [
            "## 7a. A PCM chip over time",
            "**Claim.** None in the paper (its noise is a static perturbation); this is cimsim's "
            "extension on IBM aihwkit's statistical PCM model (programming noise, drift, read "
            "noise, "
            "drift compensation).",
            "**Measured.** `experiment=pcm_digits` (trained for a chip read 1 h after programming, "
            "L = 2), read at each time with and without global drift compensation "
            "(`robustness=drift_sweep`); mean, 95 % CI over chips, chip-to-chip and read-to-read "
            "spreads, 5th-percentile chip, in %.",
            md_table(["chip", "t", "mean", "95 % CI", "chip std", "read std", "5th pct"], body, 2),
            fig,
            "\n".join(notes),
        ]
    )


def section_methods(ctx: Context) -> str:
    rows = ctx.rows("methods")
    runs = STUDY["methods"].runs
    sigmas = _sigmas(rows)
    body = [
        [RUN[r].title, str(_passes(ctx, r)), *(acc_text(cell(rows, r, sigma=s)) for s in sigmas)]
        for r in runs
    ]
    ref = "sigma0.1_L4"
    verdicts = []
    for r in runs:
        if r == ref:
            continue
        diff = paired(cell(rows, r, sigma=0.1), cell(rows, ref, sigma=0.1))
        verdicts.append(f"* {RUN[r].title}: {diff} points ({diff.verdict})")
    fig = ctx.figure("methods", rows, "sigma", "training methods: accuracy vs test sigma")
    return "\n\n".join(
        [
            "## 7b. Training methods on the same chips",
            "**Claim.** The paper proposes HA-SGD (L samples per step); the other methods are "
            "cimsim's extensions, compared here with it at the same epochs (one training seed "
            "each: "
            "the CIs are over chips, not over training runs).",
            md_table(["method", "passes", *(f"sigma {s:g}" for s in sigmas)], body),
            fig,
            "**Rule.** Each method minus HA-SGD (sigma 0.1, L = 4) at test sigma 0.1, paired 95 % "
            "CI "
            "over the same chips.",
            "\n".join(verdicts),
        ]
    )


# ----------------------------------------------------------------------------- paper scale

# NVIDIA H200 (SXM) dense BF16 tensor-core peak, TFLOP/s (the datasheet's 1979 is with sparsity).
H200_BF16_DENSE_TFLOPS = 989.5
ASSUMED_UTILIZATION = 0.40
# CIFAR-100 with the data config's 5000-image validation split: train, val, test images.
CIFAR100_IMAGES = (45_000, 5_000, 10_000)
PAPER_EPOCHS = 200


def forward_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and linear layers of one forward pass of
    one input of ``shape`` (C, H, W), counted from each layer's output size with hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_out = module.in_features
        total += 2 * per_out * output.numel()

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return total


def _run_passes(run: Run) -> float:
    """Forward-backward passes per training image of a run (L, SAM's ascent, a teacher's
    forward at a third of a pass)."""
    over = dict(o.split("=", 1) for o in run.overrides)
    method = over.get("method")
    L = int(over.get("hasgd.L", 1 if method is None else 4))
    if run.name == "pcm":
        L = 2
    return L + (1 if method == "sam" else 0) + (1 / 3 if method == "distill" else 0)


def section_paper_scale(ctx: Context) -> str:
    from cimsim.wide_resnet import WideResNet

    fwd = forward_flops(WideResNet(depth=28, widen_factor=10, num_classes=100), (3, 32, 32))
    rate = H200_BF16_DENSE_TFLOPS * 1e12 * ASSUMED_UTILIZATION
    train_imgs, val_imgs, test_imgs = CIFAR100_IMAGES
    seen: set[str] = set()
    sections = [
        ("Fig. 7", ["fig7"]),
        ("Fig. 8", ["fig8"]),
        ("Fig. 9", ["fig9"]),
        ("bi-scale ablation", ["bias_separate", "bias_shared", "bias_digital"]),
        ("what hurts most", ["hurt_weights", "hurt_bn", "hurt_identity", "hurt_adc"]),
        ("L", ["lstudy"]),
        ("PCM", ["pcm"]),
        ("methods", ["methods"]),
    ]
    body, total = [], 0.0
    for title, studies in sections:
        new = [r for s in studies for r in STUDY[s].runs if r not in seen]
        new = list(dict.fromkeys(new))
        seen.update(new)
        train = sum(
            3 * fwd * train_imgs * PAPER_EPOCHS * RUN[r].epochs_factor * _run_passes(RUN[r])
            for r in new
        )
        evals = 0.0
        for s in studies:
            rows = ctx.rows(s)
            calib = sum(1 for r in rows if r.adc_levels is not None)
            evals += fwd * (len(rows) * test_imgs + calib * val_imgs)
        hours = (train + evals) / rate / 3600
        total += hours
        body.append(
            [title, str(len(new)), f"{train / 1e18:.1f}", f"{evals / 1e18:.2f}", f"{hours:.1f}"]
        )
    body.append(["total", str(len(seen)), "", "", f"{total:.1f}"])
    return "\n\n".join(
        [
            "## Paper scale: an ESTIMATE of GPU time (not a measurement)",
            "`python reproduce.py data=cifar100 model=wrn28_10 trainer=gpu --epochs 200` runs the "
            "same plan at the paper's scale. No GPU was used to write this report, so the times "
            "below are estimates: FLOPs counted, divided by an assumed sustained rate.",
            f"* WRN-28-10 forward pass, one 32x32 image: {fwd / 1e9:.2f} GFLOP (convolutions and "
            "linear layers, 2 FLOPs per multiply-add, counted with forward hooks); a training pass "
            "(forward + backward) is taken as 3 forwards; HA-SGD with L samples costs L passes per "
            "image, SAM one more, distillation a third more (the teacher's forward).",
            f"* {PAPER_EPOCHS} epochs x the plan's epoch factors, over {train_imgs} training "
            "images; "
            f"every evaluated row (chip x grid point, as measured here, {ctx.chips} chips per "
            f"point) is one pass over {test_imgs} test images, plus one over {val_imgs} validation "
            "images to calibrate ADCs where a row has them.",
            f"* Assumed sustained rate: {100 * ASSUMED_UTILIZATION:.0f} % of one H200's dense BF16 "
            f"peak ({H200_BF16_DENSE_TFLOPS:g} TFLOP/s), i.e. {rate / 1e12:.0f} TFLOP/s. Real "
            "utilization of WRN-28-10 at batch 200 may well be lower (data loading, BatchNorm and "
            "the noise draws are not counted): read these as lower bounds. Each training is "
            "counted in the first section that uses it.",
            md_table(
                [
                    "section",
                    "new trainings",
                    "training EFLOP",
                    "evaluation EFLOP",
                    "GPU hours (estimate)",
                ],
                body,
            ),
        ]
    )


# ----------------------------------------------------------------------------- header, all


def git_commit(root: Path) -> str:
    """The repository's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(meta: dict) -> str:
    """The report's provenance: command, date, machine, wall time, versions."""
    import pytorch_lightning as pl

    return "\n".join(
        [
            "# Results: the paper's claims, reproduced at CPU scale",
            "",
            "Generated by `reproduce.py` from the rows of its Monte Carlo studies; every number "
            "below is computed from those rows (`src/cimsim/results.py`), none is typed. The "
            "paper's "
            "numbers are for WRN-28-10 / CIFAR-100 and are not expected here.",
            "",
            f"* command: `{meta.get('command', '?')}`",
            f"* date: {meta.get('date', '?')}",
            f"* machine: {platform.platform()}, {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}",
            f"* wall time of this command: {meta.get('wall_s', 0):.0f} s; trainings run "
            f"{meta.get('trained', 0)}, reused {meta.get('skipped', 0)}; summed wall time of all "
            f"trainings, as recorded when they ran: {meta.get('train_s', 0):.0f} s",
            f"* versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"pytorch-lightning {pl.__version__}, cimsim commit {meta.get('commit', '?')}",
            f"* scale: {meta.get('scale', '?')}; {meta.get('chips', '?')} chips per grid point, "
            "the "
            "same chips for every model (chip c is programmed from seed (0, c))",
        ]
    )


SECTIONS = (
    section_fig7,
    section_fig8,
    section_fig9,
    section_bias,
    section_hurts,
    section_l,
    section_pcm,
    section_methods,
    section_paper_scale,
)


def write_report(out: Path, report_dir: Path, meta: dict) -> Path:
    """Build ``<report_dir>/results.md`` and ``<report_dir>/results/*`` from the rows under
    ``<out>/evaluate`` and the trainings' ``<out>/manifest.json``."""
    manifest = json.loads((out / "manifest.json").read_text())
    ctx = Context(out / "evaluate", report_dir / "results", int(meta["chips"]), manifest)
    parts = [header(meta), *(section(ctx) for section in SECTIONS)]
    text = "\n\n".join(parts) + "\n"
    path = report_dir / "results.md"

    def write(tmp):
        Path(tmp).write_text(text)

    return atomic_write(path, write)
