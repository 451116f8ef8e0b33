"""Section 6b: the curvature HA-SGD penalizes (range-weighted Hessian traces), measured."""

# Section 6b: the Hessian trace HA-SGD penalizes, and where its quadratic loss prediction holds.

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cimsim.files import atomic_write
from cimsim.robustness.folders import LOSS_TABLE
from cimsim.robustness.plots import write_table
from cimsim.robustness.rows import Row
from cimsim.robustness.stats import Diff, mean_ci, paired
from paper.evidence import Context, run_of
from paper.markdown import acc_text, cell, first_from, md_table, seed_cells, sigmas_of
from paper.plan import L_STEPS, RUN, STUDY, seed_name

TOL = 0.25  # the prediction holds where predicted/measured loss increase is within 1 +- TOL
ACC_SIGMA = 0.1  # the table's robust accuracy: at this test sigma (the L models' training sigma)
PAPER = (
    '"it is proposed to use the Hessian-Aware Stochastic Gradient Descent (HA-SGD) training '
    'algorithm to enhance the inference accuracy of the trained DNNs"; Fig. 6: "A '
    "(doubly-)stochastic optimization, minimizing the expected loss E_p(dw)[J(w + dw; X)] (when "
    'taking q = p)."'
)


def read_traces(folder: Path, rows: Sequence[Row]) -> dict[str, dict]:
    """``hessian.csv`` of a study folder, keyed by training folder (its ``model`` column is the
    rows' label): each checkpoint's ``weighted`` trace, ``weighted_se``, ``probes``, ``batches``."""
    path = folder / LOSS_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run reproduce.py (the study runs hessian=true)")
    folder_of = {r.model: run_of(r) for r in rows}
    with open(path, newline="") as f:
        return {
            folder_of[t["model"]]: {
                "weighted": float(t["weighted"]),
                "weighted_se": float(t["weighted_se"]),
                "probes": int(t["probes"]),
                "batches": int(t["batches"]),
            }
            for t in csv.DictReader(f)
            if t["model"] in folder_of
        }


def trace_units(traces: dict[str, dict], rows: Sequence[Row], run: str) -> dict[int, dict]:
    """The trace records of ``run``'s training seeds (those with rows), by seed index."""
    return {k: traces[seed_name(run, k)] for k in seed_cells(rows, run)}


def trace_ci(units: dict[int, dict]) -> tuple[float, float]:
    """Mean and 95 % half-width of a model's trace: a t-CI over training seeds; with one seed,
    its checkpoint's Hutchinson error (normal 95 %)."""
    if len(units) > 1:
        return mean_ci([u["weighted"] for u in units.values()])
    (u,) = units.values()
    return u["weighted"], 1.96 * u["weighted_se"]


def trace_diff(a: dict[int, dict], b: dict[int, dict]) -> Diff:
    """Trace of ``a`` minus ``b``: paired over training seeds; with one seed, the Hutchinson
    errors of the two checkpoints taken as independent (normal 95 %)."""
    if len(a) > 1:
        return paired(
            {k: u["weighted"] for k, u in a.items()}, {k: u["weighted"] for k, u in b.items()}
        )
    (ua,), (ub,) = a.values(), b.values()
    ci = 1.96 * math.hypot(ua["weighted_se"], ub["weighted_se"])
    return Diff(ua["weighted"] - ub["weighted"], ci, 1)


def num(mean: float, ci: float | None = None) -> str:
    """A trace (3 significant digits), with its CI half-width when given."""
    text = f"{mean:.3g}"
    return text if ci is None else f"{text} ± {'n/a' if math.isnan(ci) else f'{ci:.2g}'}"


def diff_text(d: Diff, base: float) -> str:
    """A trace difference with its CI and in percent of ``base`` (a mean trace)."""
    rel = "n/a" if base == 0 else f"{100 * d.mean / base:+.1f} %"
    return f"{d.mean:+.3g} ± {'n/a' if math.isnan(d.ci) else f'{d.ci:.2g}'} ({rel})"


@dataclasses.dataclass(frozen=True)
class Fit:
    """The quadratic prediction at one test sigma: mean measured and predicted loss increase
    over sigma 0, their ratio (predicted / measured) and its CI half-width, and the rule: it
    holds (the CI inside ``1 +- TOL``), fails (the CI outside it) or neither (undetermined)."""

    sigma: float
    measured: float
    predicted: float
    ratio: float
    ci: float

    @property
    def known(self) -> bool:  # a rise was measured, with a CI
        return self.measured > 0 and not math.isnan(self.ci)

    @property
    def holds(self) -> bool:
        """The CI of predicted / measured lies inside ``1 +- TOL`` (an equivalence test)."""
        return self.known and abs(self.ratio - 1) + self.ci <= TOL

    @property
    def fails(self) -> bool:
        """The CI of predicted / measured lies outside ``1 +- TOL``."""
        return self.known and abs(self.ratio - 1) - self.ci > TOL

    def __str__(self) -> str:
        if self.measured <= 0:
            return "no rise"
        ci = "n/a" if math.isnan(self.ci) else f"{self.ci:.2f}"
        return f"{self.ratio:.2f} ± {ci}" + (" ✓" if self.holds else " ✗" if self.fails else "")


def fit(losses: Sequence[Row], run: str, units: dict[int, dict], sigma: float) -> Fit:
    """The prediction of ``run``'s loss increase at ``sigma`` against the measured one, over the
    units of ``cell`` (``losses``: rows whose ``acc`` is their loss): per training seed, its mean
    loss over the chips at ``sigma`` minus at 0, predicted by ``sigma^2 / 2`` times that seed's
    trace (``units``); with one seed, per chip, each predicted by the one trace. The CI is the
    t-CI of predicted minus measured over the units, divided by the mean measured increase."""
    at0, at = cell(losses, run, sigma=0.0), cell(losses, run, sigma=sigma)
    keys = sorted(set(at0) & set(at))
    (only,) = units.values() if len(units) == 1 else (None,)
    trace = [(only or units[u])["weighted"] for u in keys]
    measured = [at[u] - at0[u] for u in keys]
    predicted = [sigma * sigma / 2 * t for t in trace]
    m_mean, p_mean = math.fsum(measured) / len(keys), math.fsum(predicted) / len(keys)
    if m_mean <= 0:
        return Fit(sigma, m_mean, p_mean, math.nan, math.nan)
    _, half = mean_ci([p - m for p, m in zip(predicted, measured, strict=True)])
    return Fit(sigma, m_mean, p_mean, p_mean / m_mean, half / m_mean)


def train_sigma(run: str) -> float:
    """The training sigma of a plan's run (its ``noise.sigma=`` override)."""
    (value,) = [o.split("=", 1)[1] for o in RUN[run].overrides if o.startswith("noise.sigma=")]
    return float(value)


def direction(d: Diff) -> str:
    """A trace difference's reading: lower, higher or not significant (95 % CI)."""
    return {"worse": "lower", "better": "higher"}.get(d.verdict, "not significant")


def compare(runs: list[str], units: dict[str, dict], name: Callable[[str], str]) -> dict:
    """Each of ``runs[1:]``'s trace minus ``runs[0]``'s: ``text`` (each difference, named by
    ``name``, in percent of the first's mean too, and the mean traces in order), ``way`` (the
    direction every difference shares: ``lower``, ``higher``, else ``mixed``), ``counts`` and
    ``falling`` (the mean trace decreases from each run to the next)."""
    base = trace_ci(units[runs[0]])[0]
    diffs = {r: trace_diff(units[r], units[runs[0]]) for r in runs[1:]}
    means = [trace_ci(units[r])[0] for r in runs]
    falling = all(a > b for a, b in zip(means, means[1:], strict=False))
    got = [direction(d) for d in diffs.values()]
    lower, higher, n = got.count("lower"), got.count("higher"), len(got)
    each = "; ".join(f"{name(r)}: {diff_text(d, base)} ({direction(d)})" for r, d in diffs.items())
    trend = ", ".join(num(m) for m in means)
    return {
        "text": f"{each}. Mean traces in order: {trend} ({'' if falling else 'not '}decreasing).",
        "way": "lower" if lower == n else "higher" if higher == n else "mixed",
        "counts": f"lower at {lower}, higher at {higher}, not significant at "
        f"{n - lower - higher} of {n}",
        "falling": falling,
    }


def trace_verdicts(ctx: Context, by_sigma: list[str], by_L: list[str], units) -> tuple[str, str]:
    """(the per-model differences, the verdict sentence) on the trace vs training sigma and L."""
    lines, verdict = [], []
    if len(by_sigma) > 1 and train_sigma(by_sigma[0]) == 0:
        c = compare(by_sigma, units, lambda r: f"training sigma {train_sigma(r):g}")
        lines.append(f"* *Training sigma* (minus {RUN[by_sigma[0]].title}): {c['text']}")
        if c["way"] == "lower":
            verdict.append(
                "falls with the training sigma"
                if c["falling"]
                else "is below the digital model's at every training sigma but does not fall "
                "monotonically with it"
            )
        else:
            verdict.append(f"does not fall with the training sigma ({c['counts']})")
    if len(by_L) > 1:
        c = compare(by_L, units, lambda r: f"L = {ctx.run_L(r)}")
        lines.append(f"* *L* (minus L = {ctx.run_L(by_L[0])}, same steps): {c['text']}")
        effect = {"lower": "is lowered by L > 1", "higher": "is raised by L > 1"}
        verdict.append(effect.get(c["way"], f"has no consistent dependence on L ({c['counts']})"))
    return "\n".join(lines), " and ".join(verdict) or "is not compared"


def count_text(by_run: dict[str, float | None], how: str, none: str) -> str:
    """How many models share each value of ``by_run`` (a test sigma, or None): ``how`` names a
    sigma (``up to {s}``), ``none`` names None."""
    values = list(by_run.values())
    parts = [
        f"{how.format(s=f'{s:g}')} for {values.count(s)}" for s in sorted(set(values) - {None})
    ]
    parts += [f"{none} for {values.count(None)}"] if None in values else []
    return f"{', '.join(parts)} (of {len(values)} models)"


def render(ctx: Context) -> str:
    """The range-weighted trace of each model (``hessian.csv``, a fact) against its training
    sigma and L, and the test sigmas where ``J(w) + sigma^2 / 2 * trace`` matches the rows' loss."""
    study = STUDY["hessian"]
    rows = ctx.rows(study.name)
    traces = ctx.facts(
        "hessian_traces", lambda: read_traces(ctx.eval_dir / study.name, rows), key=study.name
    )
    runs = [r for r in study.runs if seed_cells(rows, r)]
    units = {r: trace_units(traces, rows, r) for r in runs}
    sigmas = sigmas_of(rows)
    if 0.0 not in sigmas:
        raise ValueError(f"study {study.name} has no test sigma 0: no clean loss to predict from")
    by_sigma = sorted((r for r in runs if r not in L_STEPS), key=train_sigma)
    by_L = sorted((r for r in runs if r in L_STEPS), key=ctx.run_L)
    ordered = [*by_sigma, *by_L]
    acc_sigma = ACC_SIGMA if ACC_SIGMA in sigmas else sigmas[-1]
    body = [
        [
            RUN[r].title,
            f"{train_sigma(r):g}",
            str(ctx.run_L(r)),
            num(*trace_ci(units[r])),
            num(math.fsum(u["weighted_se"] for u in units[r].values()) / len(units[r])),
            acc_text(cell(rows, r, sigma=acc_sigma)),
        ]
        for r in ordered
    ]
    header = ["model", "training sigma", "L", "trace", "SE per ckpt", f"acc. at {acc_sigma:g}"]
    differences, verdict = trace_verdicts(ctx, by_sigma, by_L, units)
    losses = [dataclasses.replace(r, acc=r.loss) for r in rows]  # cell() then averages losses
    noisy = [s for s in sigmas if s > 0]
    fits = {r: [fit(losses, r, units[r], s) for s in noisy] for r in runs}
    holds_to = {r: max((f.sigma for f in fits[r] if f.holds), default=None) for r in ordered}
    fails_from = {r: first_from(noisy, {f.sigma: f.fails for f in fits[r]}) for r in ordered}
    fit_body = [
        [
            RUN[r].title,
            *map(str, fits[r]),
            "nowhere" if holds_to[r] is None else f"{holds_to[r]:g}",
            "never" if fails_from[r] is None else f"{fails_from[r]:g}",
        ]
        for r in ordered
    ]
    under = sum(fits[r][-1].measured > 0 and fits[r][-1].ratio < 1 for r in runs)
    trace_rows = [{"run": r, "seed": k, **u} for r in runs for k, u in units[r].items()]
    fit_rows = [
        {"run": r, **dataclasses.asdict(f), "holds": f.holds} for r in runs for f in fits[r]
    ]
    ctx.written += [
        write_table(ctx.figures / "hessian_trace.csv", trace_rows),
        write_table(ctx.figures / "hessian_prediction.csv", fit_rows),
        plot_traces(by_sigma, by_L, units, ctx.run_L, ctx.figures / "hessian_trace.png"),
        plot_fits((by_sigma, by_L), fits, ctx.figures / "hessian_prediction.png"),
    ]
    return "\n\n".join(
        [
            "## 6b. The Hessian: the curvature HA-SGD penalizes",
            f"**Claim.** The paper: {PAPER} It names the method Hessian-aware but its text gives "
            "no expansion; cimsim's reading ([`model.md`](model.md), "
            "[`training.md`](training.md#ha-sgd-and-the-curvature-it-penalizes)) is that for "
            "zero-mean noise E[J(w + dw)] ~ J(w) + sigma^2 / 2 * sum_t r_t^2 tr(H_t), so "
            "training at sigma penalizes the range-weighted Hessian trace (the *trace* below). "
            "Does the trace fall with the training sigma and with L, and up to which test sigma "
            "does the quadratic term predict the loss the chips measure?",
            measured_text(ctx, by_L, units, rows),
            md_table(header, body),
            f"![range-weighted trace vs training sigma and L]({ctx.link}/hessian_trace.png)\n\n"
            f"(Tables: [`hessian_trace.csv`]({ctx.link}/hessian_trace.csv), "
            f"[`hessian_prediction.csv`]({ctx.link}/hessian_prediction.csv).)",
            "**Rule (trace).** Trace differences are paired by training seed (95 % t-CI over "
            "seeds; with one seed, the two checkpoints' Hutchinson errors). The trace *falls with "
            "the training sigma* when every HA-SGD model's trace is below the digital model's (CI "
            "below 0) and the mean trace decreases from each training sigma to the next; it is "
            "*lowered by L > 1* when every L > 1 model's trace is below L = 1's.",
            differences,
            "**Rule (prediction).** Per training seed, the measured increase is its mean loss "
            "over the chips at the test sigma minus at 0, the predicted one sigma^2 / 2 times its "
            "checkpoint's trace. The table gives predicted / measured (mean over seeds of each, "
            "± the 95 % t-CI of predicted minus measured over seeds, divided by the mean measured "
            f"increase); the prediction *holds* at a test sigma (✓) when that interval lies "
            f"inside 1 ± {TOL:g}, *fails* (✗) when it lies outside, and is undetermined "
            "otherwise. *Holds up to*: the largest test sigma where it holds; *fails from*: the "
            "smallest from which it fails at every larger one. Below 1, the chips lose more than "
            "the quadratic term predicts.",
            md_table(
                ["model", *(f"sigma {s:g}" for s in noisy), "holds up to", "fails from"], fit_body
            ),
            f"![predicted / measured loss increase]({ctx.link}/hessian_prediction.png)",
            f"**Verdict.** The range-weighted trace {verdict}. The quadratic prediction holds "
            f"{count_text(holds_to, 'up to test sigma {s}', 'nowhere')}; it fails "
            f"{count_text(fails_from, 'from test sigma {s} on', 'from no test sigma on')}; at "
            f"the largest test sigma, {noisy[-1]:g}, it falls short of the measured increase "
            f"for {under} of {len(runs)} models.",
        ]
    )


def measured_text(ctx: Context, by_L: list[str], units: dict, rows: Sequence[Row]) -> str:
    """What was measured: models, checkpoints, probes, chips, the test chip, the CIs."""
    study = STUDY["hessian"]
    records = [u for r in units for u in units[r].values()]
    rel = [u["weighted_se"] / abs(u["weighted"]) for u in records if u["weighted"]]
    seeds = max(len(u) for u in units.values())
    over = (
        f"95 % t-CI over {seeds} training seeds"
        if seeds > 1
        else "one training seed: the CI covers the Hutchinson probes only"
    )
    ckpt = (
        "last checkpoint (`last.ckpt`: the same budget for every model, no epoch chosen on "
        "validation; Fig. 7's models end at their constant StepLR rate, section 6's annealed to "
        "0, so the two groups' traces are of differently settled iterates and are compared "
        "only within each group)"
        if study.last
        else "validation-chosen checkpoint"
    )
    chip = ", ".join(f"`{o}`" for o in study.overrides if o.startswith("chip."))
    images = ", ".join(str(n) for n in sorted({r.n for r in rows}))
    L = ", ".join(str(ctx.run_L(r)) for r in by_L)
    n = records[0]["batches"]
    batches = "test batch" if n == 1 else f"{n} test batches"
    return (
        f"**Measured.** {len(units)} models at {seeds} training seed{'s' if seeds > 1 else ''} "
        "each: Fig. 7's (the digital model and HA-SGD, L = 4, at each training sigma) and "
        "section 6's equal-steps models (HA-SGD, sigma 0.1, cosine schedule, L = "
        f"{L}), each at its {ckpt}. Per "
        "checkpoint, the trace is Hutchinson's estimate at the clean weights with "
        f"{records[0]['probes']} Rademacher probes (the same probes for every checkpoint) on the "
        f"first {batches}; its standard error is "
        f"{100 * min(rel):.0f}-{100 * max(rel):.0f} % of the checkpoint's trace. The loss (mean "
        f"cross-entropy, nats) is measured on {ctx.study_chips(study.name)} chips per test "
        f"sigma, the same for every model, on the test set ({images} images), on a test chip "
        "that perturbs exactly the tensors the trace covers, the Conv/Linear weights and biases "
        f"({chip}). Traces: {over}; accuracy in %, {ctx.ci_text(study.name)}."
    )


def plot_traces(by_sigma, by_L, units, run_L, path: Path) -> Path:
    """The trace (mean ± CI, and each seed's) against the training sigma and against L."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (runs, x, label) in enumerate(
        (
            (by_sigma, train_sigma, "training sigma (HA-SGD L = 4; 0: digital)"),
            (by_L, run_L, "L (HA-SGD sigma 0.1, cosine, same steps)"),
        )
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in runs:
            mean, ci = trace_ci(units[r])
            ax.errorbar(x(r), mean, yerr=0 if math.isnan(ci) else ci, fmt="o", capsize=3, c="C0")
            seeds = [u["weighted"] for u in units[r].values()]
            ax.plot([x(r)] * len(seeds), seeds, "k.", alpha=0.4)
        ax.set_xlabel(label)
        ax.set_ylabel("range-weighted Hessian trace")
        ax.set_title("mean ± 95 % CI; dots: training seeds", fontsize=9)
        ax.grid(True, alpha=0.3)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def plot_fits(groups, fits, path: Path) -> Path:
    """Predicted / measured loss increase (± CI) against the test sigma, one panel per group of
    runs (each a little apart on x), over the band ``1 ± TOL`` where the prediction holds; the
    y range covers the ratios (not every CI)."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, runs in enumerate(groups):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.axhspan(1 - TOL, 1 + TOL, color="0.88", label=f"1 ± {TOL:g}")
        ratios = [1.0]
        for j, r in enumerate(runs):
            got = [f for f in fits[r] if not math.isnan(f.ratio)]
            ratios += [f.ratio for f in got]
            ax.errorbar(
                [f.sigma * (1 + 0.015 * (j - len(runs) / 2)) for f in got],
                [f.ratio for f in got],
                yerr=[0 if math.isnan(f.ci) else f.ci for f in got],
                marker="o",
                capsize=3,
                label=RUN[r].title,
            )
        ax.set_ylim(min(0.0, min(ratios)) - 0.1, max(2.0, max(ratios)) + 0.1)
        ax.set_xlabel("test sigma")
        ax.set_ylabel("predicted / measured loss increase")
        ax.set_title("mean over seeds ± 95 % CI", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
