"""Section 6: does HA-SGD's L matter, at the same epochs and at the same compute?"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cimsim.files import atomic_write
from cimsim.robustness.plots import write_table
from cimsim.robustness.stats import holm, mean_ci, paired, paired_p
from paper.evidence import Context, same_model_text
from paper.markdown import acc_text, cell, gain_text, md_table, sigmas_of
from paper.plan import L_EQUAL_PASSES, L_STEPS, RUN, STUDY, seed_name

TEST_SIGMA = 0.1  # the verdicts' test sigma: the runs' training sigma


def _wall(ctx: Context, run: str) -> float | None:
    """Mean training wall time (s) of ``run`` over its seeds (as recorded when they ran)."""
    runs = ctx.manifest.get("runs", {})
    walls = [
        runs[seed_name(run, k)]["wall_s"]
        for k in range(ctx.seeds)
        if runs.get(seed_name(run, k), {}).get("wall_s") is not None
        and not runs[seed_name(run, k)].get("resumed")
    ]
    return math.fsum(walls) / len(walls) if walls else None


def _arm(rows, name: str, group: Sequence[str], ev: dict, key: str) -> tuple[str, dict]:
    """One arm: every L against the arm's L = 1 at test sigma 0.1, paired; returns its line and
    ``{(arm, run): (diff, p)}`` for the Holm family of both arms."""
    base = group[0]
    values = sorted({ev[r][key] for r in group}, key=str)
    check = (
        f"all at {values[0]} {key}"
        if len(values) == 1
        else f"NOT equal: {key} {', '.join(map(str, values))}"
    )
    b = cell(rows, base, sigma=TEST_SIGMA)
    base_mean = mean_ci(list(b.values()))[0]
    tests = {}
    for r in group[1:]:
        a = cell(rows, r, sigma=TEST_SIGMA)
        tests[(name, r)] = (paired(a, b), paired_p(a, b), base_mean)
    line = f"* {name} ({check}), vs {RUN[base].title}, at sigma {TEST_SIGMA:g}"
    return line, tests


def render(ctx: Context) -> str:
    rows = ctx.rows("lstudy")
    runs = [r for r in STUDY["lstudy"].runs if cell(rows, r)]
    sigmas = sigmas_of(rows)
    ev = {r: ctx.evaluated("lstudy", r) for r in runs}
    walls = {r: _wall(ctx, r) for r in runs}
    body = [
        [
            RUN[r].title,
            str(ev[r]["epochs"]),
            str(ev[r]["global_step"]),
            str(ev[r]["passes"]),
            "n/a" if walls[r] is None else f"{walls[r]:.0f}",
            *(acc_text(cell(rows, r, sigma=s)) for s in sigmas),
        ]
        for r in runs
    ]
    header = ["model", "epochs", "steps", "passes", "wall s", *(f"sigma {s:g}" for s in sigmas)]
    table = md_table(header, body, 1)
    steps = [r for r in L_STEPS if r in runs]
    passes = [r for r in L_EQUAL_PASSES if r in runs]
    lines, tests = [], {}
    for name, group, key in (
        ("equal optimizer steps", steps, "global_step"),
        ("equal passes", passes, "passes"),
    ):
        if len(group) > 1:
            line, found = _arm(rows, name, group, ev, key)
            lines.append((line, list(found)))
            tests |= found
    rejected = holm({k: p for k, (_, p, _) in tests.items()})
    verdicts, better, worse = [], False, False
    for line, keys in lines:
        parts = []
        for k in keys:
            diff, p, base_mean = tests[k]
            sig = rejected[k]
            better |= sig and diff.mean > 0
            worse |= sig and diff.mean < 0
            kind = ("better" if diff.mean > 0 else "worse") if sig else "not significant"
            parts.append(f"{RUN[k[1]].title}: {gain_text(diff, base_mean)}, p = {p:.3g} ({kind})")
        verdicts.append(line + ": " + "; ".join(parts) + ".")
    scheds = [ctx.manifest.get("runs", {}).get(r, {}).get("schedule", {}) for r in runs]
    cosine = all(
        s.get("scheduler") == "CosineAnnealingLR" and s.get("interval") == "step" for s in scheds
    )
    lr_note = (
        f"Every run anneals its learning rate from {scheds[0].get('lr')} to 0 with a cosine over "
        "its own optimizer steps (`hasgd=cosine`, stepped after every optimizer step), so every "
        "arm ends its schedule at a rate of 0."
        if runs and cosine
        else f"Schedules: {scheds} (not the per-step cosine the study plans: stale trainings)."
    )
    records = []
    for r in runs:
        mean, ci = mean_ci(list(cell(rows, r, sigma=TEST_SIGMA).values()))
        records.append({"run": r, "passes": ev[r]["passes"], "acc_mean": mean, "acc_ci95": ci})
    ctx.written.append(write_table(ctx.figures / "lstudy_compute.csv", records))
    ctx.written.append(plot_points(records, ctx.figures / "lstudy_compute.png"))
    fig = ctx.figure("lstudy", rows, "sigma", "HA-SGD's L: accuracy vs test sigma")
    arm_text = ", ".join(f"L = {ctx.run_L(r)} for {ev[r]['epochs']} epochs" for r in passes)
    reading = "helps somewhere" if better else "does not help measurably"
    if worse:
        reading += " (and is worse somewhere)"
    return "\n\n".join(
        [
            "## 6. Does L matter?",
            "**Claim** (Algorithm 1): HA-SGD averages the gradient over L perturbation samples per "
            "step, minimizing the expected loss under the perturbation. The paper claims nothing "
            "about L beyond listing it; the authors' code defaults to one sample.",
            "**Measured.** HA-SGD at training sigma 0.1 with L = "
            f"{', '.join(str(ctx.run_L(r)) for r in steps)} in two arms: *equal optimizer "
            "steps* (every L for the base epochs) and *equal passes* (L x epochs fixed: "
            f"{arm_text}). "
            f"{lr_note} Each is evaluated at its `last.ckpt` (the end of its annealed schedule; "
            "the same rule for every run, no checkpoint chosen on validation). Epochs, steps and "
            "passes (forward-backward passes) are read from the evaluated checkpoint; wall s is "
            "each run's training time, mean over its seeds, on the machine that trained it. "
            f"Accuracy in %, {ctx.ci_text('lstudy')}.",
            table,
            f"![accuracy at sigma {TEST_SIGMA:g} vs training passes]"
            f"({ctx.link}/lstudy_compute.png)",
            fig,
            same_model_text({r: ev[r]["path"] for r in runs}),
            f"**Rule.** L helps when a model with L > 1 is better at test sigma {TEST_SIGMA:g} "
            "than L = 1 of its arm, in either arm: a paired t-test, Holm-corrected over the "
            f"{len(tests)} comparisons of both arms at family-wise 5 % (the CIs shown are "
            "uncorrected).",
            "\n".join(verdicts),
            f"**Verdict: L > 1 {reading} at this scale.**",
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
    ax.set_xlabel("training compute (forward-backward passes to the evaluated checkpoint)")
    ax.set_ylabel("top-1 accuracy (%) at sigma 0.1, mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
