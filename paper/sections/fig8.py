"""Section 2, Fig. 8: accuracy against test mean shift, models trained with a shift."""

# Each shifted model (trained at mu = +-0.005, +-0.01, +-0.02) is compared with the mu = 0 model at
# every test mu of the grid; its *window* is the run of grid mus around its own training mu in
# which it is better (paired CI above 0), and the section states what the shift costs it at
# mu = 0 and beyond its own shift.

from __future__ import annotations

from collections.abc import Sequence

from cimsim.robustness.rows import Row
from cimsim.robustness.stats import Diff, mean_ci, paired
from paper.evidence import Context
from paper.markdown import acc_text, cell, gain_text, md_table
from paper.plan import RUN, STUDY


def trained_mu(run: str) -> float:
    """The training mean shift of a plan run (``noise.mean_shift=``; 0 without one)."""
    for o in RUN[run].overrides:
        if o.startswith("noise.mean_shift="):
            return float(o.split("=", 1)[1])
    return 0.0


def window(better: dict[float, bool], mu: float) -> tuple[float, float] | None:
    """The contiguous run of grid mus around ``mu`` (on the grid) where ``better`` holds, as
    (lowest, highest); None when it does not hold at ``mu`` itself."""
    grid = sorted(better)
    if not better.get(mu):
        return None
    i = j = grid.index(mu)
    while i > 0 and better[grid[i - 1]]:
        i -= 1
    while j < len(grid) - 1 and better[grid[j + 1]]:
        j += 1
    return grid[i], grid[j]


def far_side(mu: float, shifts: Sequence[float]) -> float:
    """The test mu as far beyond ``mu`` as 0 is on its near side (2 mu), or the grid's last mu
    on that side when 2 mu is off the grid (``mu`` itself when none is beyond it)."""
    beyond = [m for m in shifts if (m - mu) * mu > 0]
    double = [m for m in beyond if abs(m - 2 * mu) < 1e-9]
    return double[0] if double else max(beyond, key=abs, default=mu)


def _mean(values: dict[int, float]) -> float:
    return mean_ci(list(values.values()))[0]


def _cost(rows: Sequence[Row], run: str, base: str, m: float) -> str:
    """``run``'s accuracy at test mu ``m`` and its paired difference with ``base`` there."""
    mine, theirs = cell(rows, run, mean_shift=m), cell(rows, base, mean_shift=m)
    return f"{acc_text(mine)} ({gain_text(paired(mine, theirs), _mean(theirs))})"


def render(ctx: Context) -> str:
    rows = ctx.rows("fig8")
    study = STUDY["fig8"]
    base, *shifted = study.runs
    shifted = sorted(shifted, key=trained_mu)
    shifts = sorted({r.mean_shift for r in rows})
    body = [
        [f"{m:g}", *(acc_text(cell(rows, r, mean_shift=m)) for r in (base, *shifted))]
        for m in shifts
    ]
    table = md_table(["test mu", *(RUN[r].title for r in (base, *shifted))], body)
    verdicts, windows, held = [], [], []
    step = min((b - a for a, b in zip(shifts, shifts[1:], strict=False)), default=0.0)
    for r in shifted:
        mu = trained_mu(r)
        diffs: dict[float, Diff] = {
            m: paired(cell(rows, r, mean_shift=m), cell(rows, base, mean_shift=m)) for m in shifts
        }
        if mu not in shifts:
            verdicts.append(f"* test mu {mu:g} is not on the grid: no verdict for {RUN[r].title}.")
            windows.append([f"{mu:+g}", "not on the grid", "–", "–", "–"])
            held.append(False)
            continue
        d = diffs[mu]
        held.append(d.verdict == "better")
        verdicts.append(
            f"* at test mu = {mu:g}: {RUN[r].title} vs the mu = 0 model: "
            f"{gain_text(d, _mean(cell(rows, base, mean_shift=mu)))} ({d.verdict})."
        )
        span = window({m: x.verdict == "better" for m, x in diffs.items()}, mu)
        edge = span is not None and (span[0] == shifts[0] or span[1] == shifts[-1])
        far = far_side(mu, shifts)
        windows.append(
            [
                f"{mu:+g}",
                "none"
                if span is None
                else f"{span[0]:g} to {span[1]:g}" + (" (grid edge)" if edge else ""),
                "–" if span is None else f"{span[1] - span[0]:.3g}",
                _cost(rows, r, base, 0.0) if 0.0 in shifts else "–",
                "none on the grid" if far == mu else f"{far:g}: {_cost(rows, r, base, far)}",
            ]
        )
    fig = ctx.figure("fig8", rows, "mean_shift", "Fig. 8: accuracy vs test mean shift")
    n_ok = sum(held)
    verdict = (
        "holds"
        if n_ok == len(shifted)
        else "does not hold"
        if n_ok == 0
        else f"holds for {n_ok} of {len(shifted)} shifted models"
    )
    trained = ", ".join(f"{trained_mu(r):+g}" for r in shifted)
    ckpt = "last" if study.last else "validation-chosen"
    unit = "paired by training seed" if ctx.seeds > 1 else "paired by chip"
    window_table = md_table(
        [
            "trained mu",
            "window: test mu where it beats the mu = 0 model",
            "width",
            "at test mu 0 (vs the mu = 0 model)",
            "beyond its shift: test mu (vs the mu = 0 model)",
        ],
        windows,
    )
    return "\n\n".join(
        [
            "## 2. Fig. 8: accuracy vs test mean shift (test sigma 0.05)",
            "**Claim** (Fig. 8's caption): \"All networks are trained with 5% device noise and "
            "tested "
            "with 5% variance device noise. The mean shift of the device can therefore be "
            'compensated by using it as a prior knowledge during training."',
            f"**Measured.** Models trained at sigma 0.05 with mean shift 0 and {trained} "
            f"(HA-SGD, L = 4), each at its {ckpt} checkpoint, tested on the test set at sigma "
            "0.05 over the mean-shift grid of `conf/robustness/mean_shift_sweep.yaml` on the same "
            f"chips. Accuracy in %, {ctx.ci_text('fig8')}.",
            table,
            fig,
            "**Rule.** A shifted model *beats* the mu = 0 model at a test mu when the 95 % CI of "
            f"the paired difference of accuracies ({unit}) lies above 0. The claim holds when "
            "every shifted model beats the mu = 0 model at its own training mu.",
            "\n".join(verdicts),
            f"**Verdict: {verdict} at this scale.**",
            "*Window and cost.* Each shifted model's window is the contiguous run of grid test "
            f"mus around its training mu in which it beats the mu = 0 model (grid step {step:g}; "
            "the width is from its lowest to its highest grid mu, 0 for its own mu alone; "
            '"grid edge": it may extend past the grid). Beside it, the model\'s accuracy at test '
            "mu 0 and beyond its own shift (at 2 x its training mu, or the grid's last mu on "
            "that side), each with its difference from the mu = 0 model there (points and "
            "percent): what the shift costs it away from the chip it was trained for.",
            window_table,
        ]
    )
