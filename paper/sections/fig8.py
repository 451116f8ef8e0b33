"""Section 2, Fig. 8: accuracy against test mean shift, models trained with a shift."""

from __future__ import annotations

from cimsim.robustness.stats import paired
from paper.evidence import Context
from paper.markdown import acc_text, cell, md_table
from paper.plan import MEAN_SHIFT, RUN, STUDY


def render(ctx: Context) -> str:
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
