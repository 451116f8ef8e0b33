"""Section 6: does HA-SGD's L matter, at the same epochs and at the same compute?"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cimsim.files import atomic_write
from cimsim.robustness.plots import write_table
from cimsim.robustness.stats import mean_ci, paired
from paper.evidence import Context, same_model_text
from paper.markdown import acc_text, cell, md_table, sigmas_of
from paper.plan import RUN, STUDY


def render(ctx: Context) -> str:
    rows = ctx.rows("lstudy")
    runs = [r for r in STUDY["lstudy"].runs if cell(rows, r)]
    sigmas = sigmas_of(rows)
    ev = {r: ctx.evaluated("lstudy", r) for r in runs}
    body = [
        [
            RUN[r].title,
            str(ev[r]["epochs"]),
            str(ev[r]["passes"]),
            *(acc_text(cell(rows, r, sigma=s)) for s in sigmas),
        ]
        for r in runs
    ]
    table = md_table(["model", "epochs", "passes", *(f"sigma {s:g}" for s in sigmas)], body, 1)
    same_epochs = [r for r in runs if RUN[r].epochs_factor == 1]
    same_compute = [r for r in runs if RUN[r].epochs_factor * ctx.run_L(r) == 4]
    verdicts = []
    for name, group, base, key in (
        ("same epochs", same_epochs, "sigma0.1_L1", "epochs"),
        ("same compute", same_compute, "sigma0.1_L1_x4ep", "passes"),
    ):
        if base not in group:
            continue
        values = sorted({ev[r][key] for r in group}, key=str)
        check = (
            f"all at {values[0]} {key}"
            if len(values) == 1
            else f"NOT equal: {key} {', '.join(map(str, values))}"
        )
        parts = []
        for r in group:
            if r == base:
                continue
            diff = paired(cell(rows, r, sigma=0.1), cell(rows, base, sigma=0.1))
            parts.append(f"{RUN[r].title}: {diff} ({diff.verdict})")
        verdicts.append(
            f"* {name} ({check}), vs {RUN[base].title}, at sigma 0.1: " + "; ".join(parts) + "."
        )
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
        records.append({"run": r, "passes": ev[r]["passes"], "acc_mean": mean, "acc_ci95": ci})
    ctx.written.append(write_table(ctx.figures / "lstudy_compute.csv", records))
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
            "the epochs), each evaluated at its `last.ckpt`: the fixed budget of the plan, not a "
            "checkpoint chosen on validation (which would stop runs at different epochs). "
            '"epochs" and "passes" (forward-backward passes) are read from the evaluated '
            "checkpoint (its epoch and global step). " + lr_note,
            table,
            f"![accuracy at sigma 0.1 vs training passes]({ctx.link}/lstudy_compute.png)",
            fig,
            same_model_text({r: ev[r]["path"] for r in runs}),
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
    ax.set_xlabel("training compute (forward-backward passes to the evaluated checkpoint)")
    ax.set_ylabel("top-1 accuracy (%) at sigma 0.1, mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
