"""Section 8a: accuracy vs the fraction of stuck devices; does training with faults pay off?"""

from __future__ import annotations

import math

from cimsim.robustness.stats import holm, mean_ci, paired, paired_p
from paper.evidence import Context
from paper.markdown import acc_text, cell, gain_text, md_table
from paper.plan import FAULT_TRAIN, RUN, STUDY


def _rate(p: float) -> str:
    return "0" if p == 0 else f"{100 * p:g} %"


def render(ctx: Context) -> str:
    rows = ctx.rows("faults")
    d, h, f = STUDY["faults"].runs
    rates = sorted({r.fault_rate for r in rows})
    sigmas = sorted({r.sigma for r in rows})
    trained = 2 * FAULT_TRAIN  # the grid's rate p: p / 2 stuck off, p / 2 on
    seeds = ctx.seeds > 1
    unit = "per-seed" if seeds else "per-chip"

    def at(run: str, p: float) -> dict[int, float]:
        return cell(rows, run, fault_rate=p)

    def base(run: str, p: float) -> float:
        return mean_ci(list(at(run, p).values()))[0]

    body = [[_rate(p), *(acc_text(at(r, p)) for r in (d, h, f))] for p in rates]
    faulty = [p for p in rates if p > 0]
    diffs = {p: paired(at(f, p), at(h, p)) for p in faulty}
    rejected = holm({p: paired_p(at(f, p), at(h, p)) for p in faulty})
    better = [p for p in faulty if rejected[p] and diffs[p].mean > 0]
    worse = [p for p in faulty if rejected[p] and diffs[p].mean < 0]
    per_rate = "; ".join(
        f"{_rate(p)}: {gain_text(diffs[p], base(h, p))}, "
        + ("better" if p in better else "worse" if p in worse else "not significant")
        for p in faulty
    )
    on_grid = [p for p in faulty if math.isclose(p, trained, rel_tol=1e-9)]
    if on_grid:
        primary = diffs[on_grid[0]]
        holds = primary.verdict == "better"
        over = f"{primary.chips} training seeds" if seeds else f"{primary.chips} common chips"
        verdict = (
            f"**Verdict: {'holds' if holds else 'does not hold'} at this scale.** At its training "
            f"rate {_rate(trained)}, {RUN[f].title} minus {RUN[h].title}: "
            f"{gain_text(primary, base(h, on_grid[0]))} over {over} "
            f"({primary.verdict})."
        )
    else:
        verdict = (
            f"**Verdict: not tested.** The training rate {_rate(trained)} is not on this grid "
            "(a --tiny grid?): no verdict."
        )
    clean = paired(at(f, 0.0), at(h, 0.0)) if 0.0 in rates else None
    hasgd = "; ".join(
        f"{_rate(p)}: {gain_text(paired(at(h, p), at(d, p)), base(d, p))}" for p in faulty
    )
    fig = ctx.figure("faults", rows, "fault_rate", "Accuracy vs fraction of stuck devices")
    ckpt = (
        "last checkpoint (`last.ckpt`)" if STUDY["faults"].last else "validation-chosen checkpoint"
    )
    notes = [f"* HA-SGD minus digital, per rate (95 % CI, each alone): {hasgd}."]
    if clean is not None:
        notes.append(
            f"* Without faults (rate 0), {RUN[f].title} minus {RUN[h].title}: "
            f"{gain_text(clean, base(h, 0.0))} ({clean.verdict}): what the faults in training "
            "cost on a chip without them."
        )
    return "\n\n".join(
        [
            "## 8a. Stuck-at faults: accuracy vs the fraction of stuck devices",
            "**Claim.** None in the paper; cimsim's extension (`noise.faults.*`, "
            "`robustness=fault_sweep`): each device of a weight's pair stuck at 0 or at g_max "
            "([`devices.md`](devices.md#stuck-at-faults-and-several-device-pairs)).",
            f"**Measured.** Three models, {RUN[d].title}, {RUN[h].title} and {RUN[f].title} "
            "(HA-SGD with a fresh faulty chip per sample: its training rate is "
            f"{_rate(trained)}), all at test sigma {', '.join(f'{s:g}' for s in sigmas)} (HA-SGD's "
            f"training sigma), each at its {ckpt}, on the same {ctx.study_chips('faults')} test "
            "chips per point and the whole test set; each chip programmed at every fault rate p "
            "(p / 2 of the devices stuck off, p / 2 on; the devices stuck at a lower rate stay "
            f"stuck). Accuracy in %, {ctx.ci_text('faults')}.",
            md_table(["fault rate", RUN[d].title, RUN[h].title, RUN[f].title], body),
            fig,
            f"**Rule.** The faults-in-the-loop model beats HA-SGD at its training rate "
            f"{_rate(trained)} when the 95 % CI of the {unit} difference (faults model minus "
            "HA-SGD, same chips) lies above 0. Over every rate > 0 of the grid, the paired "
            "t-tests of that difference are Holm-corrected (family-wise 5 %) to say where else "
            "it is better or worse.",
            f"* Faults model minus HA-SGD, per rate (points, 95 % CI; in % of HA-SGD's mean; "
            f"Holm-adjusted verdict): {per_rate}. Better at {len(better)} of {len(faulty)} "
            f"rates, worse at {len(worse)}.",
            verdict,
            "\n".join(notes),
        ]
    )
