"""The Hessian section rendered from fake rows and a fake ``hessian.csv``: every trace, paired
difference and predicted / measured ratio recomputed here with numpy and scipy, the verdicts
following the evidence (a mutation flips them), and the replay from published facts."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from scipy import stats

from cimsim.robustness.folders import LOSS_TABLE
from cimsim.robustness.rows import ROWS_FILE, Row, write_rows
from paper.evidence import STUDY_MARKER, Context, Facts
from paper.plan import FIG7_SIGMAS, L_VALUES, RUN, STUDY, l_run, seed_name
from paper.sections import hessian

CHIPS = 4
SIGMAS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2)
PROBES = 32
# Per run: its trace (seed k: trace * (1 + 0.03 (k - 1))), L, and the curvature the quadratic
# term misses: the measured increase is sigma^2 / 2 * trace * (1 + a sigma^2), so predicted /
# measured is 1 / (1 + a sigma^2); within 1 +- 0.25 up to 0.05 at a = 40, 0.02 at a = 400, 0.2
# at a = -1 (above 1: the only model the prediction does not fall short of).
TRACE = {"digital": 10.0, **{f"sigma{s:g}_L4": 9.0 - 20 * s for s in FIG7_SIGMAS}}
TRACE |= {l_run(L): 8.0 - L / 2 for L in L_VALUES}
CURVE = {r: 40.0 for r in TRACE} | {l_run(4): -1.0, l_run(8): 400.0}


def L_of(run: str) -> int:
    (value,) = [o.split("=")[1] for o in RUN[run].overrides if o.startswith("hasgd.L=")]
    return int(value)


def seed_trace(run: str, k: int) -> float:
    return TRACE[run] * (1 + 0.03 * (k - 1))


def clean_loss(run: str, k: int) -> float:
    return 0.1 + 0.01 * k + 0.001 * len(run)


def jitter(c: int, sigma: float) -> float:
    """Chip ``c``'s loss offset at ``sigma``: +-e pairs (zero mean over the chips)."""
    return (1 if c % 2 else -1) * (1 + c // 2) * 0.02 * sigma * sigma


def fake(out, seeds: int = 3, trace=seed_trace) -> Context:
    """The study's rows (loss as in ``CURVE``; chips ``jitter``, so each seed's mean over chips is
    exact), its marker and ``hessian.csv`` (trace ``trace(run, k)``, SE 5 % of it)."""
    rows, table, ckpts, runs = [], [], {}, {}
    for k in range(seeds):
        for run in STUDY["hessian"].runs:
            folder = seed_name(run, k)
            ckpts[folder] = str(out / "train" / folder / "checkpoints" / "last.ckpt")
            runs[folder] = {"L": L_of(run)}
            label = f"{RUN[run].title} ({folder})"
            t = trace(run, k)
            table.append({"model": label, "weighted": t, "weighted_se": 0.05 * t})
            table[-1] |= {"probes": PROBES, "batches": 5}
            for s in SIGMAS:
                rise = s * s / 2 * t * (1 + CURVE[run] * s * s)
                for c in range(CHIPS):
                    loss = clean_loss(run, k) + rise + jitter(c, s)
                    rows.append(Row(c, c, s, 0.0, None, 0.9 - s, loss, 270, label, ckpts[folder]))
    folder = out / "evaluate" / "hessian"
    write_rows(folder / ROWS_FILE, rows)
    (folder / STUDY_MARKER).write_text(json.dumps({"ckpts": ckpts, "chips": CHIPS}))
    with open(folder / LOSS_TABLE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    ctx = Context(out / "evaluate", out / "report" / "results", CHIPS, {"runs": runs})
    ctx.meta["seeds"] = seeds
    return ctx


def t_half(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(stats.sem(v) * stats.t.ppf(0.975, len(v) - 1))


def line_of(text: str, title: str) -> list[str]:
    """The cells of the fit table's row of the model ``title`` (its last table row of it)."""
    rows = [ln for ln in text.splitlines() if ln.startswith(f"| {title} |")]
    return [c.strip() for c in rows[-1].strip("|").split("|")]


def test_trace_table_is_the_mean_and_t_ci_over_seeds(tmp_path):
    text = hessian.render(fake(tmp_path))
    t = [seed_trace("sigma0.1_L4", k) for k in range(3)]
    cells = [ln for ln in text.splitlines() if ln.startswith(f"| {RUN['sigma0.1_L4'].title} |")]
    assert f"| {np.mean(t):.3g} ± {t_half(t):.2g} |" in cells[0]
    assert f"| {0.05 * np.mean(t):.3g} |" in cells[0]  # the mean Hutchinson SE
    assert "95 % t-CI over 3 training seeds" in text


def test_trace_differences_are_paired_by_seed_in_units_and_percent(tmp_path):
    text = hessian.render(fake(tmp_path))
    d = [seed_trace("sigma0.2_L4", k) - seed_trace("digital", k) for k in range(3)]
    base = np.mean([seed_trace("digital", k) for k in range(3)])
    want = f"{np.mean(d):+.3g} ± {t_half(d):.2g} ({100 * np.mean(d) / base:+.1f} %) (lower)"
    assert f"training sigma 0.2: {want}" in text


@pytest.mark.parametrize("seeds", [1, 3])
def test_prediction_holds_where_predicted_over_measured_is_within_the_tolerance(seeds, tmp_path):
    text = hessian.render(fake(tmp_path, seeds))
    if seeds == 1:  # the trace's CI: its checkpoint's Hutchinson error, normal 95 %
        t = seed_trace("digital", 0)
        assert f"| {t:.3g} ± {1.96 * 0.05 * t:.2g} |" in text
        assert "one training seed: the CI covers the Hutchinson probes only" in text
    for run, reach in (
        ("sigma0.1_L4", ["0.05", "0.1"]),
        (l_run(4), ["0.2", "never"]),
        (l_run(8), ["0.02", "0.05"]),
    ):
        assert line_of(text, RUN[run].title)[-2:] == reach, run
    # the ratio at sigma 0.1 of one model, recomputed: seeds as units (chips with one seed)
    run, s = "sigma0.05_L4", 0.1
    rise = [s * s / 2 * seed_trace(run, k) * (1 + 40 * s * s) for k in range(seeds)]
    pred = [s * s / 2 * seed_trace(run, k) for k in range(seeds)]
    if seeds == 1:
        rise, pred = [rise[0] + jitter(c, s) for c in range(CHIPS)], pred * CHIPS
    half = t_half(np.subtract(pred, rise)) / np.mean(rise)
    ratio = f"{np.mean(pred) / np.mean(rise):.2f} ± {half:.2f} ✗"  # 0.71: outside 1 +- 0.25
    assert line_of(text, RUN[run].title)[3] == ratio
    assert line_of(text, RUN[run].title)[2].endswith(" ✓")  # 0.91 at sigma 0.05
    assert "(✓)" in text and "1 ± 0.25" in text


def test_verdicts_follow_the_traces_and_flip_when_one_model_rises(tmp_path):
    text = hessian.render(fake(tmp_path / "a"))
    verdict = text.split("**Verdict.**")[1]
    assert "falls with the training sigma and is lowered by L > 1" in verdict
    holds = "up to test sigma 0.02 for 1, up to test sigma 0.05 for 8, up to test sigma 0.2 for 1"
    assert f"prediction holds {holds} (of 10 models)" in verdict
    fails = (
        "from test sigma 0.05 on for 1, from test sigma 0.1 on for 8, from no test sigma on for 1"
    )
    assert f"it fails {fails} (of 10 models)" in verdict
    assert "falls short of the measured increase for 9 of 10 models" in verdict

    def risen(run: str, k: int) -> float:
        return seed_trace(run, k) * (2.0 if run in ("sigma0.1_L4", l_run(2)) else 1.0)

    verdict = hessian.render(fake(tmp_path / "b", trace=risen)).split("**Verdict.**")[1]
    assert "does not fall with the training sigma (lower at 4, higher at 1, not " in verdict
    assert "has no consistent dependence on L (lower at 2, higher at 1," in verdict


def test_replays_from_published_facts_without_hessian_csv(tmp_path):
    ctx = fake(tmp_path)
    text = hessian.render(ctx)
    (tmp_path / "evaluate" / "hessian" / LOSS_TABLE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(LOSS_TABLE)):
        hessian.render(Context(**{**vars(ctx), "store": Facts(), "written": []}))
    replay = Context(**{**vars(ctx), "store": Facts(stored=ctx.store.table), "written": []})
    assert hessian.render(replay) == text
