"""Section 4: the bi-scale bias mapping under every mapping and range convention."""

# Trained and tested under each mapping, cross-tested, with the per-layer ranges that explain the
# result (``paper.ranges``).

from __future__ import annotations

from dataclasses import asdict

from cimsim.robustness.plots import write_table
from cimsim.robustness.rows import Row
from cimsim.robustness.stats import Diff, mean_ci, paired
from paper.evidence import Context, model_of, study_checkpoints
from paper.markdown import acc_text, cell, gain_text, md_table, not_trained, sigmas_of
from paper.plan import BIAS_SIGMA, BIASES, SCALES, mapping_run
from paper.ranges import LayerRanges, checkpoint_ranges, ranges_table, reading, records, why

CLAIM = (
    '"Matching the range of W and b: To ensure that both weights and biases use the full '
    "dynamic range of the device and minimize the effect of the device noise, adjust s to match "
    'the range of bias and weights."'
)
MAPPINGS = tuple((sc, b) for sc in SCALES for b in BIASES)
AUTHORS = (SCALES[0], BIASES[0])  # half_range / separate: the authors' code (match_range)
SHORT = {"half_range": "hr", "abs_max": "am", "separate": "sep", "unscaled": "uns"}
SHORT |= {"per_tensor": "pt", "shared": "sh", "digital": "dig"}
# What each bias mapping stores (docs/model.md, "Bi-scale bias mapping")
MEANING = {
    "separate": "bi-scale `[W b/f]`, f = r(b)/r(W): W at `R = r([W, b/f])`, b at `R f`",
    "unscaled": "the naive `[W b]` (s = 1): W and b at `R_u = r([W, b])`",
    "per_tensor": "W at `r(W)`, b at `r(b)` (the authors' `match_range=False`)",
    "shared": "W and b at `r(W)` (an optimistic bound: b need not fit in W's range)",
    "digital": "W at `r(W)`, no bias noise (a bound)",
}


def study_of(mapping: tuple[str, str]) -> str:
    return f"bias_{mapping[0]}_{mapping[1]}"


def name_of(mapping: tuple[str, str]) -> str:
    return f"{mapping[0]} / {mapping[1]}"


def _mean(values: dict[int, float]) -> float:
    return mean_ci(list(values.values()))[0]


class Matrix:
    """Every study's rows: ``acc(model, tested mapping, sigma)`` is the ``cell`` of a model (a
    plan run) on the chips of a tested mapping."""

    def __init__(self, ctx: Context):
        self.by = {m: ctx.rows(study_of(m)) for m in MAPPINGS}
        self.sigmas = sigmas_of(self.by[AUTHORS])
        self._runs: dict[tuple, list[Row]] = {}  # (tested mapping, run): its rows, read once
        for m, rows in self.by.items():
            for r in rows:
                self._runs.setdefault((m, model_of(r)[0]), []).append(r)

    def acc(self, run: str, tested: tuple[str, str], sigma: float) -> dict[int, float]:
        return cell(self._runs.get((tested, run), []), run, sigma=sigma)

    def diag(self, mapping: tuple[str, str], sigma: float) -> dict[int, float]:
        """The model trained under ``mapping``, tested under it."""
        return self.acc(mapping_run(*mapping), mapping, sigma)


def _gain(a: dict[int, float], b: dict[int, float]) -> tuple[Diff, str]:
    diff = paired(a, b)
    return diff, gain_text(diff, _mean(b))


def _train_and_test(mx: Matrix, noisy: list[float]) -> tuple[str, list[str], dict[str, bool]]:
    """4a: the diagonal table, the rule's lines and whether the claim holds per convention."""
    body = []
    for m in MAPPINGS:
        accs = [acc_text(mx.diag(m, s)) for s in mx.sigmas]
        gains = [
            "reference" if m == AUTHORS else _gain(mx.diag(m, s), mx.diag(AUTHORS, s))[1]
            for s in noisy
        ]
        who = " (the authors')" if m == AUTHORS else ""
        body.append([f"{name_of(m)}{who}", *accs, *gains])
    header = [
        "trained and tested under",
        *(f"sigma {s:g}" for s in mx.sigmas),
        *(f"minus the authors', sigma {s:g}" for s in noisy),
    ]
    lines, holds = _rule(mx.diag, noisy, trained=True)
    return md_table(header, body), lines, holds


def _rule(acc, noisy: list[float], trained: bool) -> tuple[list[str], dict[str, bool]]:
    """The rule's lines and whether the claim holds per convention, on ``acc(mapping, sigma)``:
    each mapping's own model (``trained``) or one model tested under every mapping."""
    lines, holds = [], {}
    for sc in SCALES:
        never_worse, better, parts = True, False, []
        for s in noisy:
            diff, text = _gain(acc((sc, "separate"), s), acc((sc, "unscaled"), s))
            never_worse &= diff.verdict != "worse"
            better |= diff.verdict == "better"
            parts.append(f"{s:g}: {text} ({diff.verdict})")
        holds[sc] = never_worse and better
        lines.append(f"* `{sc}`: bi-scale minus unscaled, by test sigma: {'; '.join(parts)}.")
        for other in ("per_tensor", "shared", "digital"):
            others = [
                f"{s:g}: {_gain(acc((sc, 'separate'), s), acc((sc, other), s))[1]}" for s in noisy
            ]
            same = ""
            if (sc, other) == ("abs_max", "per_tensor"):  # max|b/f| = max|W|: one mapping
                same = (
                    " (under `abs_max` the two mappings are the same by construction, max|b/f| "
                    "= max|W|: the difference is between two trainings of one mapping)"
                    if trained
                    else " (under `abs_max` the two mappings are the same by construction: the "
                    "same model on the same chips, 0 by construction, not a measurement)"
                )
            lines.append(f"  * bi-scale minus {other}{same}: {'; '.join(others)}.")
    return lines, holds


def _cross_test(mx: Matrix, noisy: list[float], runs: tuple[str, ...], every: bool):
    """4b: the matrix at the training sigma (a row per trained model of ``runs``); the digital
    model's (the old ablation) and the authors' model's differences between tested mappings
    (the latter are 4a's rule lines unless ``every`` mapping trained a model); what training
    under the tested mapping adds over the authors' model (``every``)."""
    trained = {"digital": "digital model", **{mapping_run(*m): name_of(m) for m in MAPPINGS}}
    trained = {r: title for r, title in trained.items() if r in runs}
    body = [
        [title, *(f"{100 * _mean(mx.acc(run, m, BIAS_SIGMA)):.1f}" for m in MAPPINGS)]
        for run, title in trained.items()
    ]
    codes = [f"{SHORT[sc]}/{SHORT[b]}" for sc, b in MAPPINGS]
    table = md_table(["trained under (row), tested under (column)", *codes], body)
    lines = [] if every else ["* The authors' model: 4a's lines above."]
    whose = [("digital", "digital model"), (mapping_run(*AUTHORS), "authors' model")]
    for run, who in whose if every else whose[:1]:
        for sc in SCALES:
            for other in ("unscaled", "per_tensor"):
                gains = [
                    _gain(mx.acc(run, (sc, "separate"), s), mx.acc(run, (sc, other), s))[1]
                    for s in noisy
                ]
                lines.append(
                    f"* {who}, tested `{sc}` bi-scale minus `{sc}` {other}, by test sigma: "
                    + "; ".join(f"{s:g}: {g}" for s, g in zip(noisy, gains, strict=True))
                    + "."
                )
    authors = mapping_run(*AUTHORS)
    if len(trained) < len(MAPPINGS) + 1:
        return table, lines
    own = [
        f"{name_of(m)} "
        + _gain(mx.acc(mapping_run(*m), m, BIAS_SIGMA), mx.acc(authors, m, BIAS_SIGMA))[1]
        for m in MAPPINGS
        if m != AUTHORS
    ]
    lines.append(
        "* Training under the tested mapping instead of the authors' (each mapping's model minus "
        f"the authors' model, both tested under that mapping, sigma {BIAS_SIGMA:g}): "
        + "; ".join(own)
        + "."
    )
    return table, lines


def _layers(ctx: Context, path: str, scale: str) -> list[LayerRanges]:
    """A checkpoint's per-layer ranges under ``scale``: a fact of the report, so a rendering
    from the published evidence (no checkpoint) states the same."""
    stored = ctx.facts(
        "bias_ranges",
        lambda: [asdict(x) for x in checkpoint_ranges(path, scale)],
        key=f"{path} {scale}",
    )
    return [LayerRanges(**x) for x in stored]


def _ranges_part(ctx: Context, ckpts: dict[str, str]) -> str:
    """4c: the per-layer ranges of the authors' and the digital model (training seed 0) under
    each range convention, what each table says and the explanation they give."""
    parts, rows, by_scale = [], [], {sc: [] for sc in SCALES}
    for run, who in (
        (mapping_run(*AUTHORS), "The authors' model"),
        ("digital", "The digital model"),
    ):
        for sc in SCALES:
            layers = _layers(ctx, ckpts[run], sc)
            by_scale[sc] += layers
            rows += records(layers, model=run, scale=sc)
            parts += [
                f"**{who} (training seed 0), `{sc}`.** {reading(layers)}",
                ranges_table(layers),
            ]
    ctx.written.append(write_table(ctx.figures / "bias_ranges.csv", rows))
    link = f"{ctx.link}/bias_ranges.csv"
    intro = (
        "### 4c. The ranges behind the result\n\n"
        "Per layer of each checkpoint: `r(W)`, `r(b)`, the ranges of the stored weight and bias "
        "(a BatchNorm stores its fold `w = gamma / sqrt(var + eps)`, `b = beta - mean w` on its "
        "running statistics); `R` and `R f`, bi-scale's noise scales of W and b; `R_u`, the "
        "unscaled mapping's (of both). `per_tensor` puts W at `r(W)` and b at `r(b)`, so "
        "`R/r(W)` is how much bi-scale widens the noise over each tensor's own range (`R f/r(b)` "
        "is the same factor, f being `r(b)/r(W)`: bi-scale cannot widen one without the other); "
        "`R/R_u` and `R f/R_u` compare its weight and bias noise with unscaled's. A BatchNorm's "
        "output noise `nu_w x + nu_b` has the variance `sigma^2 (r_w^2 E[x^2] + r_b^2)` per "
        "channel, `E[x^2] = var + mean^2` of its input from the running statistics: its bias "
        "term's share under bi-scale, and its std over unscaled's (averaged over channels), "
        "come from the checkpoint alone; a conv's would need its inputs. Computed with cimsim's "
        f"`noise_scales` (`paper/ranges.py`); every value in [`bias_ranges.csv`]({link})."
    )
    explain = "; ".join(why(sc, by_scale[sc]) for sc in SCALES)
    return "\n\n".join([intro, *parts, f"**Why.** From these four tables: {explain}."])


def render(ctx: Context) -> str:
    mx = Matrix(ctx)
    noisy = [s for s in mx.sigmas if s > 0]
    study = study_of(AUTHORS)
    runs = ctx.study(study).runs
    every = all(mapping_run(*m) in runs for m in MAPPINGS)  # trained under every mapping
    authors = mapping_run(*AUTHORS)
    if every:
        diag_table, rule_lines, holds = _train_and_test(mx, noisy)
    else:  # the authors' model under every mapping (the design of a plan without those models)
        rule_lines, holds = _rule(lambda m, s: mx.acc(authors, m, s), noisy, trained=False)
    cross_table, cross_lines = _cross_test(mx, noisy, runs, every)
    ckpt = (
        "its last checkpoint" if ctx.study(study).last else "its validation-chosen best checkpoint"
    )
    if all(holds.values()):
        verdict = "holds under both range conventions"
    elif not any(holds.values()):
        verdict = "does not hold under either range convention"
    else:
        yes = ", ".join(f"`{sc}`" for sc in SCALES if holds[sc])
        no = ", ".join(f"`{sc}`" for sc in SCALES if not holds[sc])
        verdict = f"holds under {yes}, does not hold under {no}: it depends on the range convention"
    ckpts = study_checkpoints(ctx.eval_dir, ctx.study(study), ctx.manifest)
    if every:
        shown = [r for m in MAPPINGS for r in mx.by[m] if model_of(r)[0] == mapping_run(*m)]
        title = "each mapping's model under its own mapping"
    else:
        shown = [r for m in MAPPINGS for r in mx.by[m] if model_of(r)[0] == authors]
        title = "the authors' model under each mapping"
    fig = ctx.figure("bias", shown, "sigma", title)
    models = (
        f"HA-SGD models (sigma {BIAS_SIGMA:g}, L = 4) trained under each range convention "
        "`noise.scale` x bias mapping `noise.bias` (the authors' `half_range / separate` is "
        "Fig. 7's model), and the digital model"
        if every
        else f"The authors' HA-SGD model (sigma {BIAS_SIGMA:g}, L = 4, trained `half_range / "
        "separate`: Fig. 7's model) and the digital model"
    )
    part_a = (
        [
            "### 4a. Trained and tested under the same mapping",
            diag_table,
            fig,
            "**Rule.** Under a range convention the claim holds when, trained and tested under "
            "it, bi-scale minus unscaled (the storable naive mapping; paired over training "
            "seeds, 95 % CI) is never below 0 at a test sigma > 0 and above 0 at one. "
            "`per_tensor` (each tensor on its own range), `shared` and `digital` (bounds) are "
            "compared for information.",
        ]
        if every
        else [
            "### 4a. The authors' model tested under every mapping",
            "No model was trained under the other mappings in this report, so the "
            "train-and-test comparison is not made; the rule is read on the authors' model "
            "tested under each mapping (the cross-test below), a weaker design: it asks "
            "whether bi-scale is the better way to store this model, not whether a model "
            "trained for a mapping does better.",
            md_table(
                ["the authors' model, tested under", *(f"sigma {s:g}" for s in mx.sigmas)],
                [
                    [name_of(m), *(acc_text(mx.acc(authors, m, s)) for s in mx.sigmas)]
                    for m in MAPPINGS
                ],
            ),
            fig,
            "**Rule.** Under a range convention the claim holds when the authors' model tested "
            "under bi-scale minus tested under unscaled (the storable naive mapping; paired "
            f"{'over training seeds' if ctx.seeds > 1 else 'over chips'}, 95 % CI) is never "
            "below 0 at a test sigma > 0 and above 0 at one. `per_tensor`, `shared` and "
            "`digital` (bounds) are compared for information.",
        ]
    )
    return "\n\n".join(
        [
            "## 4. Bi-scale bias mapping: "
            + ("trained and tested under every mapping" if every else "tested under every mapping"),
            f"**Claim** (the paper's Fig. 5 caption, its only text on the mapping): {CLAIM} "
            "The text gives the augmented product `[W b/s] [x; s]` and this caption; it reports "
            "no measurement of the mapping, names no alternative it was compared with, and does "
            "not say which range (half-range or max |.|) is matched.",
            f"**Measured.** {models}; each tested on chips under every mapping (`chip.scale`, "
            f"`chip.bias`), {ctx.study_chips(study)} chips per point, the same chips for every "
            f"model, on the test set, each model at {ckpt}. Accuracy in %, "
            f"{ctx.ci_text(study)}.{not_trained(ctx, study)} The mappings:",
            "\n".join(f"* `{b}`: {MEANING[b]}" for b in BIASES),
            *part_a,
            "\n".join(rule_lines),
            f"**Verdict: {verdict} at this scale"
            + (
                ""
                if every
                else " (the authors' model tested under each mapping; no model was "
                "trained under the others)"
            )
            + ".**",
            f"### 4b. Cross-test at sigma {BIAS_SIGMA:g}",
            f"Mean accuracy (%) over training seeds at test sigma {BIAS_SIGMA:g}; rows: the "
            "mapping a model was trained under, columns: the mapping it is tested under "
            "(`hr` half_range, `am` abs_max; `sep` separate, `uns` unscaled, `pt` per_tensor, "
            "`sh` shared, `dig` digital). The digital model's row is the old ablation.",
            cross_table,
            f"Paired differences, the same model on the same chips, {ctx.ci_text(study)}:",
            "\n".join(cross_lines),
            _ranges_part(ctx, ckpts),
        ]
    )
