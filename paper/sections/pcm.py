"""Section 7a: a PCM chip over time, with and without drift compensation."""

from __future__ import annotations

import math

from cimsim.robustness.stats import mean_ci, mean_std, paired
from cimsim.robustness.summary import format_time, summarize_times
from paper.evidence import Context, model_of
from paper.markdown import gain_text, md_table, pp
from paper.plan import STUDY
from paper.sections.ir_drop import label_of
from paper.sections.rram import read_cell


def _pooled(values: list[float]) -> float:
    """The root mean square of per-seed standard deviations (the pooled within-seed std)."""
    return math.sqrt(math.fsum(v * v for v in values) / len(values))


def render(ctx: Context) -> str:
    rows = ctx.rows("pcm")
    seeds = sorted({model_of(r)[1] for r in rows})
    several = len(seeds) > 1
    labels = list(dict.fromkeys(label_of(r) for r in rows))
    times = sorted({r.t_inference for r in rows})
    group = {
        (label, t): [r for r in rows if label_of(r) == label and r.t_inference == t]
        for label in labels
        for t in times
    }
    body = []
    for label in labels:
        for t in times:
            units = read_cell(group[label, t])
            mean, ci = mean_ci(list(units.values()))
            per_seed = [
                summarize_times([r for r in group[label, t] if model_of(r)[1] == k])[0]
                for k in seeds
            ]
            body.append(
                [
                    label.split("| chip ")[-1],
                    format_time(t),
                    f"{100 * mean:.1f}",
                    pp(ci),
                    *([pp(mean_std(list(units.values()))[1])] if several else []),
                    pp(_pooled([s["acc_std_chip"] for s in per_seed])),
                    pp(_pooled([s["acc_std_read"] for s in per_seed])),
                    f"{100 * math.fsum(s['acc_p5'] for s in per_seed) / len(seeds):.1f}",
                ]
            )
    fig = ctx.figure("pcm", rows, "t_inference", "PCM chip: accuracy vs time after programming")
    notes = []
    for label in labels:
        first, last = read_cell(group[label, times[0]]), read_cell(group[label, times[-1]])
        diff = paired(last, first)
        over = (
            f"paired over {diff.chips} training seeds, each seed's mean over its chips"
            if several
            else "paired over chips"
        )
        notes.append(
            f"* {label}: {gain_text(diff, mean_ci(list(first.values()))[0])} from "
            f"t = {format_time(times[0])} to {format_time(times[-1])} ({over}, each chip's mean "
            f"over read-outs; {diff.verdict})."
        )
    pcm_L = ctx.manifest.get("runs", {}).get("pcm", {}).get("L", "not recorded")
    ckpt = "last checkpoint (`last.ckpt`)" if STUDY["pcm"].last else "validation-chosen checkpoint"
    spreads = (
        "the seed-to-seed std of those means, the chip-to-chip and read-to-read stds within a "
        "seed (pooled over seeds: root mean square), the 5th-percentile chip (mean over seeds)"
        if several
        else "chip-to-chip and read-to-read spreads, 5th-percentile chip"
    )
    header = ["chip", "t", "mean", "95 % CI", *(["seed std"] if several else [])]
    return "\n\n".join(
        [
            "## 7a. A PCM chip over time",
            "**Claim.** None in the paper (its noise is a static perturbation); this is cimsim's "
            "extension on IBM aihwkit's statistical PCM model (programming noise, drift, read "
            "noise, drift compensation).",
            "**Measured.** A model trained as `experiment=pcm_digits` (`noise=pcm "
            "noise.t_train=3600`: for a chip read 1 h after programming, "
            f"L = {pcm_L}), at its {ckpt}, on the same {ctx.study_chips('pcm')} test chips, read "
            "at each time with and without global drift compensation (`robustness=drift_sweep`) "
            f"on the whole test set. A chip's accuracy is its mean over its read-outs; "
            f"{ctx.ci_text('pcm')}; {spreads}; in %.",
            md_table([*header, "chip std", "read std", "5th pct"], body, 2),
            fig,
            "\n".join(notes),
        ]
    )
