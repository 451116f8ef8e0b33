"""Section 5: what hurts most: weights, analog BatchNorm, identity noise, an ADC."""

from __future__ import annotations

from collections.abc import Sequence

from cimsim.robustness.rows import Row
from cimsim.robustness.stats import mean_ci, paired
from paper.evidence import Context, identity_shortcuts
from paper.markdown import cell, gain_text, md_table, sigmas_of, variant_table
from paper.plan import HURT_ADC_LEVELS, RUN


def render(ctx: Context) -> str:
    variants = [
        ("hurt_weights", "conv/linear only"),
        ("hurt_bn", "+ analog BN"),
        ("hurt_identity", "+ identity noise"),
        ("hurt_adc", f"+ {HURT_ADC_LEVELS}-level ADC"),
    ]
    sigmas = [s for s in sigmas_of(ctx.rows("hurt_weights")) if s > 0]
    body, by = variant_table(ctx, variants, sigmas)
    steps = []
    for r in ctx.study("hurt_weights").runs:
        for s in sigmas:
            drops = []
            for (a, _), (b, title) in zip(variants, variants[1:], strict=False):
                before, after = cell(by[a], r, sigma=s), cell(by[b], r, sigma=s)
                cost = {u: before[u] - after[u] for u in set(before) & set(after)}
                diff = paired(before, after)
                base = mean_ci(list(before.values()))[0]
                drops.append((diff.mean, title, gain_text(diff, base), cost))
            first, second = sorted(drops, key=lambda t: -t[0])[:2]
            gap = paired(first[3], second[3])
            which = (
                f"**{first[1]}**, not significantly different from {second[1]} (difference "
                f"{gap} points)"
                if gap.verdict == "no significant difference"
                else f"**{first[1]}** (ahead of {second[1]} by {gap} points)"
            )
            parts = "; ".join(f"{t} costs {d}" for _, t, d, _ in drops)
            steps.append(f"* {RUN[r].title}, sigma {s:g}: {parts}. Largest: {which}.")
    unit = "per-seed" if ctx.seeds > 1 else "per-chip"
    ckpt = (
        "last checkpoint (`last.ckpt`)"
        if ctx.study("hurt_weights").last
        else "validation-chosen checkpoint"
    )
    adc_override = next(
        (o for o in ctx.study("hurt_adc").overrides if o.startswith("robustness.adc_levels=")), ""
    )
    return "\n\n".join(
        [
            "## 5. What hurts most",
            "**Claim.** None in the paper's text: the authors' code models every layer on the chip "
            "(weights, BatchNorm as an analog affine layer, identity shortcuts, optionally ADCs) "
            "and does not separate their effects; this section does.",
            f"**Measured.** The same two models, each at its {ckpt}, on chips with noise only in "
            "the conv/linear weights (`chip.analog_bn=false chip.identity_noise=false`), then "
            "adding the analog BatchNorm, "
            f"then the identity-shortcut noise (the full chip), then {HURT_ADC_LEVELS}-level ADCs "
            f"(`{adc_override}`), on the same {ctx.study_chips('hurt_weights')} chips per point "
            f"and the whole test set; accuracy in %, {ctx.ci_text('hurt_weights')}.",
            md_table(["model", "chip", *(f"sigma {s:g}" for s in sigmas)], body, 2),
            f"**Rule.** Each step's cost is the paired {unit} accuracy before minus after adding "
            "it (points, 95 % CI; in % of the accuracy before it); the largest mean cost hurts "
            "most, unless the paired CI of its difference with the second largest covers 0 "
            "(then: not significantly different).",
            "\n".join(steps),
            _identity_note(by["hurt_identity"]),
        ]
    )


def _identity_note(rows: Sequence[Row]) -> str:
    """Why identity noise may cost nothing: the network's count of identity shortcuts."""
    counts = {identity_shortcuts(r.ckpt) for r in rows if r.ckpt}
    if counts == {0}:
        return (
            "The identity-noise step costs exactly nothing here because this network has no "
            "identity shortcut: every residual block of this depth changes the width or the "
            "stride, so each shortcut is a 1x1 conv (on the chip with the conv weights). "
            "Deeper WRNs (WRN-16 and up) have identity shortcuts."
        )
    known = sorted(c for c in counts if c is not None)
    return f"Identity shortcuts in the network: {', '.join(map(str, known)) or 'unknown'}."
