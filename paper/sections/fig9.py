"""Section 3, Fig. 9: accuracy against ADC levels; does HA-SGD soften the ADC's drop?"""

# Three HA-SGD models (training sigma 0.05, 0.1, 0.15) against the digital one, at test sigma 0
# (ADC quantization alone) and 0.1. At sigma 0 every chip is the same network, so the chips give
# one measurement per model and the test is over test images: an exact McNemar test per ADC level
# and training seed, from the per-image outcomes evaluate.py keeps there
# (``robustness.outcomes=true``). Under noise, the ADC's drop is compared paired over training
# seeds (per-seed means over the common chips), Holm-corrected over the ADC levels.

from __future__ import annotations

import math
from collections.abc import Sequence

from cimsim.robustness.outcomes import OUTCOMES_FILE, read_outcomes
from cimsim.robustness.plots import write_table
from cimsim.robustness.rows import Row
from cimsim.robustness.stats import Diff, holm, mcnemar, mean_ci, paired, paired_p
from paper.evidence import Context, ckpt_info, model_of
from paper.markdown import acc_text, cell, gain_text, md_table, not_trained, sigmas_of
from paper.plan import RUN
from paper.sections.fig7 import CLAIM_GAIN

ALPHA = 0.05  # family-wise level of each Holm family


def _adc_text(levels: int | None) -> str:
    return "none" if levels is None else str(levels)


def _mean(values: dict[int, float]) -> float:
    return mean_ci(list(values.values()))[0]


def _drop(rows: Sequence[Row], run: str, sigma: float, levels: int) -> dict[int, float]:
    """Per unit (seed, or chip with one seed): accuracy without ADC minus with ``levels``."""
    full = cell(rows, run, sigma=sigma, adc_levels=None)
    quantized = cell(rows, run, sigma=sigma, adc_levels=levels)
    return {c: full[c] - quantized[c] for c in set(full) & set(quantized)}


def discordant(ctx: Context, rows: Sequence[Row]) -> list[dict]:
    """Per HA-SGD model, training seed and ADC level at test sigma 0 (a fact of the report):
    ``n`` test images, ``right`` of them digital classified right, ``b`` only digital got right,
    ``c`` only the HA-SGD model, and ``deterministic``: every chip of both models gave the same
    outcomes (chip 0's are counted). From the outcomes file, for the rows' checkpoints and
    fingerprints; empty when the study kept no outcomes."""
    d, *hs = ctx.study("fig9").runs
    chips = ctx.study_chips("fig9")

    def compute() -> list[dict]:
        fps = {(r.ckpt, r.point): r.fingerprint for r in rows if r.sigma == 0}
        found: dict[tuple, dict[int, str]] = {}
        for o in read_outcomes(ctx.eval_dir / "fig9" / OUTCOMES_FILE):
            if o.chip < chips and fps.get((o.ckpt, o.point)) == o.fingerprint:
                found.setdefault((*model_of(o), o.adc_levels), {})[o.chip] = o.correct
        out = []
        for (run, k, n), mine in sorted(found.items(), key=lambda kv: _order(kv[0])):
            base = found.get((d, k, n))
            if run == d or base is None:
                continue
            same = all(len(x) == chips and len(set(x.values())) == 1 for x in (mine, base))
            a, h = base[min(base)], mine[min(mine)]
            record = {
                "run": run,
                "seed": k,
                "adc_levels": n,
                "n": len(a),
                "right": a.count("1"),
                "b": sum(x == "1" and y == "0" for x, y in zip(a, h, strict=True)),
                "c": sum(x == "0" and y == "1" for x, y in zip(a, h, strict=True)),
                "deterministic": same,
                "softer": None,  # images where digital's drop is larger (at an ADC level)
                "harsher": None,  # images where HA-SGD's is
            }
            a0, h0 = found.get((d, k, None)), found.get((run, k, None))
            if n is not None and a0 and h0:  # the drop per image: no ADC minus this ADC
                drops = [
                    (int(x0) - int(x)) - (int(y0) - int(y))
                    for x0, x, y0, y in zip(a0[min(a0)], a, h0[min(h0)], h, strict=True)
                ]
                record["softer"] = sum(v > 0 for v in drops)  # digital drops more here
                record["harsher"] = sum(v < 0 for v in drops)
            out.append(record)
        return out

    return ctx.facts("fig9_discordant", compute)


def _order(key: tuple) -> tuple:
    run, k, n = key
    return (run, k, -1 if n is None else n)


def mcnemar_tests(records: Sequence[dict]) -> list[dict]:
    """``records`` (``discordant``) with the McNemar p-value ``p`` and a ``verdict``: per model
    and seed, Holm over the ADC levels (``better`` / ``worse`` than digital, or ``not
    significant``); the no-ADC level is a reference outside the family (unadjusted at 5 %). A
    record whose chips disagree is not tested (``not deterministic``, p NaN)."""
    out = [{**r, "p": mcnemar(r["b"], r["c"]) if r["deterministic"] else math.nan} for r in records]
    families: dict[tuple, dict[int, float]] = {}
    for i, r in enumerate(out):
        if r["adc_levels"] is not None and r["deterministic"]:
            families.setdefault((r["run"], r["seed"]), {})[i] = r["p"]
    rejected = {i: ok for family in families.values() for i, ok in holm(family, ALPHA).items()}
    for i, r in enumerate(out):
        sig = rejected.get(i, r["adc_levels"] is None and r["p"] <= ALPHA)
        r["verdict"] = (
            "not deterministic"
            if not r["deterministic"]
            else "not significant"
            if not sig
            else "better"
            if r["c"] > r["b"]
            else "worse"
        )
    return out


def _significant(t: dict) -> bool:
    return t["verdict"] in ("better", "worse")


def _cell_text(tests: list[dict]) -> str:
    """A table cell: HA-SGD minus digital over the test images, mean over seeds in points and in
    percent of digital's accuracy, then each seed's p (``*``: significant)."""
    if not tests:
        return "–"
    gain = math.fsum((t["c"] - t["b"]) / t["n"] for t in tests) / len(tests)
    right = math.fsum(t["right"] / t["n"] for t in tests) / len(tests)
    rel = "n/a" if right == 0 else f"{100 * gain / right:+.1f} %"
    ps = ", ".join(
        "n/a" if math.isnan(t["p"]) else f"{t['p']:.2g}{'*' if _significant(t) else ''}"
        for t in sorted(tests, key=lambda t: t["seed"])
    )
    return f"{100 * gain:+.1f} ({rel}); p {ps}"


def agreement(tests: Sequence[dict], h: str, levels: Sequence[int | None]) -> str:
    """How the seeds agree for model ``h``: the levels where every seed has the same verdict,
    grouped by verdict, and the levels where they differ (each seed's verdict)."""
    groups: dict[str, list[str]] = {}
    for n in levels:
        ts = sorted((t for t in tests if (t["run"], t["adc_levels"]) == (h, n)), key=_seed)
        verdicts = {t["verdict"] for t in ts}
        if len(verdicts) == 1:
            groups.setdefault(f"{verdicts.pop()} in every seed", []).append(_adc_text(n))
        elif ts:
            each = "/".join(t["verdict"].replace("not significant", "n.s.") for t in ts)
            groups.setdefault("seeds disagree", []).append(f"{_adc_text(n)} ({each})")
    return "; ".join(f"{what} at {', '.join(where)}" for what, where in groups.items())


def _seed(t: dict) -> int:
    return t["seed"]


def _zero_noise(ctx, rows, tests, floor, levels) -> tuple[list[str], dict[str, bool]]:
    """The test-sigma-0 part: the McNemar table (its caption first) and, per HA-SGD model, its
    reading, and whether the claim holds there (``tests`` empty: no outcomes kept, no test)."""
    d, *hs = ctx.study("fig9").runs
    adc = [n for n in levels if n is not None]
    if not tests:
        drops = "; ".join(
            f"{RUN[h].title}: "
            + ", ".join(
                f"{n}: {100 * (_mean(_drop(rows, d, 0.0, n)) - _mean(_drop(rows, h, 0.0, n))):+.1f}"
                for n in adc
            )
            for h in hs
        )
        line = (
            "* test sigma 0: no per-image outcomes were kept (`robustness.outcomes=true` keeps "
            f"them): no test over images. Digital's drop minus each HA-SGD model's, in points: "
            f"{drops}."
        )
        return [line], dict.fromkeys(hs, False)
    ctx.figures.mkdir(parents=True, exist_ok=True)
    ctx.written.append(write_table(ctx.figures / "fig9_mcnemar.csv", tests))
    body = [
        [_adc_text(n)]
        + [_cell_text([t for t in tests if (t["run"], t["adc_levels"]) == (h, n)]) for h in hs]
        for n in levels
    ]
    caption = (
        "*Test sigma 0, McNemar* (HA-SGD minus digital over the test images: mean over seeds in "
        "points and in percent of digital's accuracy; then each training seed's p, `*` "
        f"significant; every model, seed and level in [`fig9_mcnemar.csv`]({ctx.link}/"
        "fig9_mcnemar.csv)):"
    )
    lines = [caption + "\n\n" + md_table(["ADC levels", *(RUN[h].title for h in hs)], body)]
    holds = {}
    for h in hs:
        above = [n for n in adc if not floor(0.0, n, (d, h))]
        mine = [t for t in tests if t["run"] == h and t["adc_levels"] in above]
        drop = drop_tests(mine)
        softer = [n for n in above if all(drop[i] == "softer" for i in _at(mine, n))]
        against = sorted(
            {t["adc_levels"] for i, t in enumerate(mine) if drop[i] in ("harsher", "untested")}
        )
        holds[h] = bool(above) and 2 * len(softer) > len(above) and not against
        lines.append(
            f"* {RUN[h].title}, test sigma 0: McNemar on accuracy with the ADC: "
            f"{agreement(tests, h, levels)}. The drop itself (exact sign test over the images "
            "whose drop differs between the two models, Holm over the above-floor levels of each "
            f"seed): softer than digital's in every seed at {len(softer)} of {len(above)} "
            f"above-floor ADC levels, harsher or untested in some seed at {len(against)}: "
            f"{'holds' if holds[h] else 'does not hold'} here."
        )
    return lines, holds


def _at(tests: Sequence[dict], n: int) -> list[int]:
    return [i for i, t in enumerate(tests) if t["adc_levels"] == n]


def drop_tests(tests: Sequence[dict]) -> dict[int, str]:
    """For each test (index) at an ADC level: is HA-SGD's per-image drop (no ADC minus this
    ADC) smaller than digital's? An exact two-sided sign test over the images where the two
    drops differ (``softer``: digital's is larger there, ``harsher``: HA-SGD's), Holm over the
    levels of each training seed; ``untested`` where the chips disagree or no outcome without
    ADC was kept."""
    out, families = {}, {}
    for i, t in enumerate(tests):
        if not t["deterministic"] or t.get("softer") is None:
            out[i] = "untested"
            continue
        families.setdefault(t["seed"], {})[i] = mcnemar(t["harsher"], t["softer"])
    for family in families.values():
        for i, sig in holm(family, ALPHA).items():
            t = tests[i]
            out[i] = ("softer" if t["softer"] > t["harsher"] else "harsher") if sig else "n.s."
    return out


def _noisy(ctx, rows, s, floor, adc) -> tuple[list[str], dict[str, bool], list]:
    """The verdicts at test sigma ``s`` > 0, paired over seeds: per HA-SGD model, the Holm-
    corrected paired t-tests of (digital's drop - its drop) over the above-floor ADC levels;
    and its lead over digital (HA-SGD minus digital accuracy) at each ADC level."""
    d, *hs = ctx.study("fig9").runs
    lines, holds, leads = [], {}, []
    for h in hs:
        above = [n for n in adc if not floor(s, n, (d, h))]
        drops = {n: (_drop(rows, d, s, n), _drop(rows, h, s, n)) for n in above}
        diffs = {n: paired(*drops[n]) for n in above}
        rejected = holm({n: paired_p(*drops[n]) for n in above}, ALPHA)
        softer = [n for n in above if rejected[n] and diffs[n].mean > 0]
        harder = [n for n in above if rejected[n] and diffs[n].mean < 0]
        for n in adc:
            base = cell(rows, d, sigma=s, adc_levels=n)
            leads.append((paired(cell(rows, h, sigma=s, adc_levels=n), base), h, s, n, _mean(base)))
        holds[h] = bool(above) and 2 * len(softer) > len(above) and not harder
        floors = [n for n in adc if n not in above]
        if not above:
            lines.append(
                f"* {RUN[h].title}, test sigma {s:g}: every ADC level is at the floor: no test, "
                "does not hold here."
            )
            continue
        lines.append(
            f"* {RUN[h].title}, test sigma {s:g}: at the floor: "
            f"{', '.join(map(str, floors)) or 'none'}. Above it, digital's drop minus HA-SGD's "
            "(points, 95 % CI; Holm): "
            + "; ".join(
                f"{n}: {diffs[n]} "
                f"({'softer' if n in softer else 'harsher' if n in harder else 'not significant'})"
                for n in above
            )
            + f". Softer at {len(softer)} of {len(above)}, harsher at {len(harder)}: "
            f"{'holds' if holds[h] else 'does not hold'} here."
        )
    return lines, holds, leads


def render(ctx: Context) -> str:
    rows = ctx.rows("fig9")
    study = ctx.study("fig9")
    d, *hs = study.runs
    sigmas = sigmas_of(rows)
    levels = sorted({r.adc_levels for r in rows}, key=lambda n: -1 if n is None else n)
    adc = [n for n in levels if n is not None]
    classes = {ckpt_info(r.ckpt).get("num_classes") for r in rows}
    chance = 1 / classes.pop() if len(classes) == 1 and None not in classes else None

    def floor(s: float, n: int | None, runs: Sequence[str]) -> bool:
        """Every one of ``runs`` within 5 points of chance at (s, n)."""
        return (
            chance is not None
            and n is not None
            and all(_mean(cell(rows, r, sigma=s, adc_levels=n)) <= chance + 0.05 for r in runs)
        )

    tables = []
    for s in sigmas:
        body = [
            [_adc_text(n) + (" (floor)" if floor(s, n, study.runs) else "")]
            + [acc_text(cell(rows, r, sigma=s, adc_levels=n)) for r in study.runs]
            for n in levels
        ]
        header = [f"ADC levels (test sigma {s:g})", *(RUN[r].title for r in study.runs)]
        tables.append(md_table(header, body))
    holds = {h: [] for h in hs}
    zero: list[str] = []
    if 0.0 in sigmas:
        tests = mcnemar_tests(discordant(ctx, rows))
        zero, ok = _zero_noise(ctx, rows, tests, floor, levels)
        for h in hs:
            holds[h].append(ok[h])
    noisy, leads = [], []
    for s in (s for s in sigmas if s > 0):
        lines, ok, found = _noisy(ctx, rows, s, floor, adc)
        noisy += lines
        leads += found
        for h in hs:
            holds[h].append(ok[h])
    good = [h for h in hs if holds[h] and all(holds[h])]
    verdict = (
        "holds"
        if len(good) == len(hs)
        else "does not hold"
        if not good
        else "holds for " + ", ".join(RUN[h].title for h in good) + " only"
    )
    if leads:
        top: tuple[Diff, str, float, int, float] = max(leads, key=lambda g: g[0].mean)
        lead = (
            f"The largest HA-SGD lead over digital with an ADC is {gain_text(top[0], top[4])} "
            f"({RUN[top[1]].title}, test sigma {top[2]:g}, {top[3]} levels); the paper's \"more "
            'than 50%" with low-resolution ADCs (points or percent: the paper does not say) is '
            "for WRN-28-10 / CIFAR-100."
        )
    else:
        lead = "No test sigma > 0 is on the grid: no HA-SGD lead under noise to compare."
    fig = ctx.figure("fig9", rows, "adc_levels", "Fig. 9: accuracy vs ADC levels")
    span = f"{min(adc)} to {max(adc)}" if adc else "no"
    trained = ", ".join(f"{ctx.manifest['runs'][h]['sigma']:g}" for h in hs)
    ckpt = "last" if study.last else "validation-chosen"
    unit = "paired by training seed" if ctx.seeds > 1 else "paired by chip"
    return "\n\n".join(
        [
            "## 3. Fig. 9: accuracy vs ADC levels, at the same test sigmas",
            "**Claim** (Fig. 9's caption): \"If we digitize the output of each layer with low "
            "bitwidth (which is necessary for some implementations of convolutional neural "
            "networks), the performance will suffer, and HA-SGD can reduce that performance drop "
            f'as an interesting side-effect." And: {CLAIM_GAIN}',
            f"**Measured.** The digital model and HA-SGD models trained at sigma {trained} (L = "
            f"4), each at its {ckpt} checkpoint, on the test set at test sigma "
            f"{' and '.join(f'{s:g}' for s in sigmas)}, with ADCs of {span} levels "
            "(`conf/robustness/adc_sweep.yaml`; ranges calibrated on the validation split after "
            'programming each chip); "none" = no ADC; "floor": every model within 5 points of '
            f"chance. Accuracy in %, {ctx.ci_text('fig9')}.{not_trained(ctx, 'fig9')}",
            *tables,
            fig,
            "**Rule.** *Test sigma 0* (ADC quantization alone): every chip is the same network "
            "(checked: each chip's per-image outcomes agree), so the test is over test images: "
            "per HA-SGD model, training seed and ADC level, an exact two-sided McNemar test of "
            "HA-SGD against digital on the images only one of them classifies right, "
            "Holm-corrected over the ADC levels of that model and seed (family-wise 5 %); the "
            "no-ADC row is an unadjusted reference. That tests accuracy with the ADC, not the "
            "drop the claim is about, so the verdict at sigma 0 rests on the drop itself: per "
            "image, a model's drop is 1 where it is right without the ADC and wrong with it, -1 "
            "the other way round, else 0; an exact two-sided sign test over the images where "
            "digital's drop and HA-SGD's differ, Holm-corrected over the above-floor levels of "
            "each model and seed. At sigma 0 the claim holds for a model when its drop is "
            "softer than digital's in every seed at a majority of the above-floor levels and "
            "harsher or untested in no seed at any. *Test sigma > 0*: "
            "a model's ADC drop at N levels is its accuracy without ADC minus with N levels; "
            f"per HA-SGD model, the paired t-tests ({unit}) of (digital's drop - its drop) over "
            "the above-floor levels are Holm-corrected; the claim holds there when HA-SGD softens "
            "the drop at a majority of them and is harsher at none. The claim holds for a model "
            "when it holds at every test sigma.",
            *zero[:1],
            "\n".join(zero[1:] + noisy),
            f"**Verdict: {verdict} at this scale.** {lead}",
        ]
    )
