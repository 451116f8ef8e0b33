"""Section 8b: an RRAM chip at 0 s, 1 s, 1 day and 2 days; does HA-SGD against it pay off?"""

from __future__ import annotations

import math
from collections.abc import Iterable

from cimsim.robustness.rows import TimedRow
from cimsim.robustness.stats import holm, mean_ci, paired, paired_p
from cimsim.robustness.summary import format_time
from paper.evidence import Context, model_of
from paper.markdown import acc_text, gain_text, md_table
from paper.plan import RRAM_T_TRAIN, RUN, STUDY


def read_cell(rows: Iterable[TimedRow]) -> dict[int, float]:
    """The unit values of one model's time-sweep rows at one point and time, a chip's accuracy
    being its mean over its read-outs (they share its programming): with two or more training
    seeds, each seed's mean of its chips' (keyed by seed, as ``markdown.cell``); with one seed,
    each chip's (keyed by chip)."""
    per: dict[int, dict[int, list[float]]] = {}
    for r in rows:
        per.setdefault(model_of(r)[1], {}).setdefault(r.chip, []).append(r.acc)
    chips = {k: {c: math.fsum(v) / len(v) for c, v in by.items()} for k, by in per.items()}
    if len(chips) == 1:
        return next(iter(chips.values()))
    return {k: math.fsum(m.values()) / len(m) for k, m in sorted(chips.items())}


def render(ctx: Context) -> str:
    rows = ctx.rows("rram")
    d, m = STUDY["rram"].runs
    times = sorted({r.t_inference for r in rows})
    reads = max(r.repetition for r in rows) + 1
    at = {
        (run, t): read_cell(r for r in rows if model_of(r)[0] == run and r.t_inference == t)
        for run in (d, m)
        for t in times
    }
    seeds = ctx.seeds > 1
    unit = "per-seed" if seeds else "per-chip"

    def base(run: str, t: float) -> float:
        return mean_ci(list(at[run, t].values()))[0]

    body = [[format_time(t), *(acc_text(at[run, t]) for run in (d, m))] for t in times]
    drops = []
    for run in (d, m):
        parts = []
        for t in times[1:]:
            diff = paired(at[run, t], at[run, times[0]])
            parts.append(
                f"{format_time(t)}: {gain_text(diff, base(run, times[0]))} ({diff.verdict})"
            )
        drops.append(f"* {RUN[run].title}, minus t = {format_time(times[0])}: " + "; ".join(parts))
    gains = {t: paired(at[m, t], at[d, t]) for t in times}
    rejected = holm({t: paired_p(at[m, t], at[d, t]) for t in times})
    gain_text_all = "; ".join(
        f"{format_time(t)}: {gain_text(gains[t], base(d, t))}, "
        + (
            ("better" if gains[t].mean > 0 else "worse")
            if rejected[t] and gains[t].mean != 0
            else "not significant"
        )
        for t in times
    )
    fell = {
        run: times[-1] > 0 and paired(at[run, times[-1]], at[run, times[0]]).verdict == "worse"
        for run in (d, m)
    }
    trained = [t for t in times if math.isclose(t, RRAM_T_TRAIN)]
    if trained:
        primary = gains[trained[0]]
        holds = primary.verdict == "better"
        over = f"{primary.chips} training seeds" if seeds else f"{primary.chips} common chips"
        verdict = (
            f"**Verdict: {'holds' if holds else 'does not hold'} at this scale.** At "
            f"t = {format_time(trained[0])} (the training time), {RUN[m].title} minus "
            f"{RUN[d].title}: {gain_text(primary, base(d, trained[0]))} over {over} "
            f"({primary.verdict})."
        )
    else:
        verdict = "**Verdict: not tested.** The training time is not on this grid: no verdict."
    fig = ctx.figure("rram", rows, "t_inference", "RRAM chip: accuracy vs time after programming")
    fall = ", ".join(
        f"{RUN[run].title}: {'falls' if fell[run] else 'no significant fall'}" for run in (d, m)
    )
    ckpt = "last checkpoint (`last.ckpt`)" if STUDY["rram"].last else "validation-chosen checkpoint"
    return "\n\n".join(
        [
            "## 8b. An RRAM chip at 0 s, 1 s, 1 day and 2 days",
            "**Claim.** None in the paper; cimsim's extension on IBM aihwkit's ReRAM model "
            "(`noise=rram`, fitted to Wan et al., Nature 2022, at 1 s, 1 day and 2 days only; "
            "[`devices.md`](devices.md#an-rram-chip-at-1-s-1-day-and-2-days)).",
            f"**Measured.** {RUN[m].title} (`noise=rram noise.sigma=0 noise.t_train="
            f"{RRAM_T_TRAIN:g}`: HA-SGD against the chip one day after programming, "
            f"L = {ctx.run_L(m)}) and {RUN[d].title} converted to the same RRAM chip "
            f"(`chip.device=rram`), each at its {ckpt}, on the same "
            f"{ctx.study_chips('rram')} test chips, each programmed once and read {reads} times "
            "at each time (t = 0: the programmed chip; later: a fresh draw of aihwkit's model per "
            "read-out), global drift compensation, the whole test set. A chip's accuracy is its "
            f"mean over its read-outs; accuracy in %, {ctx.ci_text('rram')}.",
            md_table(["t", RUN[d].title, RUN[m].title], body),
            fig,
            f"**Rules.** (1) A model's accuracy *falls over time* when the 95 % CI of its {unit} "
            f"accuracy at {format_time(times[-1])} minus at {format_time(times[0])} lies below "
            "0. (2) HA-SGD against the RRAM chip *pays off* when, at its training time "
            f"{format_time(RRAM_T_TRAIN)}, the 95 % CI of the {unit} difference (RRAM-trained "
            "minus digital, same chips) lies above 0; at every time, those paired t-tests are "
            "also Holm-corrected (family-wise 5 %) over the times.",
            "\n".join(drops),
            f"* Rule 1: {fall}.",
            f"* RRAM-trained minus digital, per time (points, 95 % CI; in % of digital's mean; "
            f"Holm-adjusted verdict): {gain_text_all}.",
            verdict,
        ]
    )
