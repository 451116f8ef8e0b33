"""Section 7a: a PCM chip over time, with and without drift compensation."""

from __future__ import annotations

import math

from cimsim.robustness.stats import paired
from cimsim.robustness.summary import format_time, summarize_times
from paper.evidence import Context
from paper.markdown import md_table, pp


def render(ctx: Context) -> str:
    rows = ctx.rows("pcm")
    summary = summarize_times(rows)
    body = [
        [
            s["model"].split("| chip ")[-1],
            format_time(s["t_inference"]),
            f"{100 * s['acc_mean']:.1f}",
            pp(s["acc_ci95"]),
            pp(s["acc_std_chip"]),
            pp(s["acc_std_read"]),
            f"{100 * s['acc_p5']:.1f}",
        ]
        for s in summary
    ]
    fig = ctx.figure("pcm", rows, "t_inference", "PCM chip: accuracy vs time after programming")
    notes = []
    times = sorted({r.t_inference for r in rows})
    for model in dict.fromkeys(r.model for r in rows):
        per = {}  # (t, chip) -> accuracies over read-outs
        for r in rows:
            if r.model == model:
                per.setdefault((r.t_inference, r.chip), []).append(r.acc)
        at = {t: {c: math.fsum(v) / len(v) for (tt, c), v in per.items() if tt == t} for t in times}
        diff = paired(at[times[-1]], at[times[0]])
        notes.append(
            f"* {model}: {diff} points from t = {format_time(times[0])} to "
            f"{format_time(times[-1])} (paired over chips, each chip's mean over read-outs; "
            f"{diff.verdict})."
        )
    pcm_L = ctx.manifest.get("runs", {}).get("pcm", {}).get("L", "not recorded")
    return "\n\n".join(
        [
            "## 7a. A PCM chip over time",
            "**Claim.** None in the paper (its noise is a static perturbation); this is cimsim's "
            "extension on IBM aihwkit's statistical PCM model (programming noise, drift, read "
            "noise, "
            "drift compensation).",
            "**Measured.** A model trained as `experiment=pcm_digits` (`noise=pcm "
            "noise.t_train=3600`: for a chip read 1 h after programming, "
            f"L = {pcm_L}), read at each time with and without global drift compensation "
            "(`robustness=drift_sweep`); mean, 95 % CI over chips, chip-to-chip and read-to-read "
            "spreads, 5th-percentile chip, in %.",
            md_table(["chip", "t", "mean", "95 % CI", "chip std", "read std", "5th pct"], body, 2),
            fig,
            "\n".join(notes),
        ]
    )
