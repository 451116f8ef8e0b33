"""Section 7b: the training methods against HA-SGD, on the same chips."""

from __future__ import annotations

from cimsim.robustness.stats import paired
from paper.evidence import Context, same_model_text
from paper.markdown import acc_text, cell, md_table, sigmas_of
from paper.plan import RUN, STUDY


def render(ctx: Context) -> str:
    rows = ctx.rows("methods")
    runs = STUDY["methods"].runs
    sigmas = sigmas_of(rows)
    ev = {r: ctx.evaluated("methods", r) for r in runs}
    body = [
        [
            RUN[r].title,
            f"{ev[r]['epochs']} of {ev[r]['max_epochs'] or 'not recorded'}",
            str(ev[r]["passes"]),
            *(acc_text(cell(rows, r, sigma=s)) for s in sigmas),
        ]
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
            "the CIs are over chips, not over training runs). Each model is evaluated at the "
            'checkpoint chosen on validation (noisy validation accuracy); "epoch" is the '
            "chosen checkpoint's epoch of the run's maximum, \"passes\" its forward-backward "
            "passes.",
            md_table(["method", "epoch", "passes", *(f"sigma {s:g}" for s in sigmas)], body, 1),
            fig,
            same_model_text({r: ev[r]["path"] for r in runs}),
            "**Rule.** Each method minus HA-SGD (sigma 0.1, L = 4) at test sigma 0.1, paired 95 % "
            "CI "
            "over the same chips.",
            "\n".join(verdicts),
        ]
    )
