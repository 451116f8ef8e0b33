"""The device sections (8a-8d: faults, RRAM, IR drop, pairs) rendered from fake rows: each states
its measurement, its rule and a verdict that follows the rows (one case where the rule holds,
one where it does not), with the verdict's CI recomputed here with numpy and scipy."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
from paper_fakes import FAKE_CHIPS, fake_faults, fake_ir_drop, fake_pairs, fake_rram
from scipy import stats

from paper.evidence import run_of
from paper.markdown import chip_value
from paper.plan import FAULT_TRAIN, IR_DROP_STRONG, PAIRS_F, PAIRS_SIGMA, pairs_factor

FAKES = {"faults": fake_faults, "rram": fake_rram, "ir_drop": fake_ir_drop, "pairs": fake_pairs}


def render(name: str, tmp_path, holds: bool) -> str:
    ctx = FAKES[name](tmp_path, holds)
    return importlib.import_module(f"paper.sections.{name}").render(ctx)


def ci_text(diff: list[float]) -> str:
    """A paired difference as the report writes it, computed independently: mean and the
    Student-t 95 % half-width (scipy's sem times t quantile), in points."""
    d = np.array(diff)
    half = stats.sem(d) * stats.t.ppf(0.975, len(d) - 1)
    return f"{100 * d.mean():+.1f} ± {100 * half:.1f}"


def verdict(text: str) -> str:
    return re.search(r"\*\*Verdict: (holds|does not hold|not tested)", text).group(1)


@pytest.mark.parametrize("name", sorted(FAKES))
@pytest.mark.parametrize("holds", [True, False])
def test_each_section_states_its_measurement_rule_and_a_verdict_that_follows_the_rows(
    name, holds, tmp_path
):
    text = render(name, tmp_path, holds)
    for part in ("**Measured.**", "**Rule", "95 % CI"):
        assert part in text, (name, part)
    assert f"{FAKE_CHIPS} test chips" in text
    assert verdict(text) == ("holds" if holds else "does not hold"), text
    assert re.search(r"points \([+-]\d+\.\d %\)", text)  # every gain in points and in percent


def test_faults_verdict_is_the_paired_difference_at_the_training_rate(tmp_path):
    ctx = fake_faults(tmp_path, True)
    text = importlib.import_module("paper.sections.faults").render(ctx)
    rows = ctx.rows("faults")
    rate = 2 * FAULT_TRAIN

    def accs(run):
        got = {r.chip: r.acc for r in rows if r.fault_rate == rate and run_of(r) == run}
        return np.array([got[c] for c in range(FAKE_CHIPS)])

    diff = accs("faults") - accs("sigma0.1_L4")
    assert (
        f"{ci_text(diff)} points (+{100 * diff.mean() / accs('sigma0.1_L4').mean():.1f} %)"
        in (text.split("**Verdict:")[1])
    )
    assert "Better at 3 of 3 rates, worse at 0" in text  # +5 points at every rate > 0


def test_rram_compares_chip_means_over_read_outs(tmp_path):
    ctx = fake_rram(tmp_path, False)
    text = importlib.import_module("paper.sections.rram").render(ctx)
    rows = ctx.rows("rram")

    def means(run, t):
        per = {}
        for r in rows:
            if run_of(r) == run and r.t_inference == t:
                per.setdefault(r.chip, []).append(r.acc)
        return np.array([np.mean(per[c]) for c in range(FAKE_CHIPS)])

    drop = means("digital", 172800.0) - means("digital", 0.0)  # -15 points by construction
    assert ci_text(drop) in text and "falls" in text
    gain = means("rram", 86400.0) - means("digital", 86400.0)
    assert f"{ci_text(gain)} points" in text.split("**Verdict:")[1]


def test_ir_drop_reads_the_tile_size_and_scale_from_the_labels(tmp_path):
    ctx = fake_ir_drop(tmp_path, True)
    labels = {r.model for r in ctx.rows("ir_drop")}
    keys = {(chip_value(m, "tile_rows"), chip_value(m, "ir_drop")) for m in labels}
    assert keys == {
        (None, None),
        (None, "1.0"),
        (None, f"{IR_DROP_STRONG}"),
        ("256", None),
        ("256", f"{IR_DROP_STRONG}"),
        ("64", None),
        ("64", f"{IR_DROP_STRONG}"),
    }
    text = importlib.import_module("paper.sections.ir_drop").render(ctx)

    def accs(tiles, ir):
        got = {
            r.chip: r.acc
            for r in ctx.rows("ir_drop")
            if (chip_value(r.model, "tile_rows"), chip_value(r.model, "ir_drop")) == (tiles, ir)
        }
        return np.array([got[c] for c in range(FAKE_CHIPS)])

    strong = f"{IR_DROP_STRONG}"
    one = accs(None, None) - accs(None, strong)  # 30 points by construction
    small = accs("64", None) - accs("64", strong)  # none
    assert f"one per layer: {ci_text(one)} points" in text and "(hurts)" in text
    assert f"64 rows: {ci_text(small)} points" in text
    rel = f"{100 * (one - small).mean() / one.mean():+.1f} %"
    assert f"{ci_text(one - small)} points ({rel}) over {FAKE_CHIPS} common chips (better" in text


def test_pairs_table_states_the_closed_form_beside_the_measurement(tmp_path):
    text = render("pairs", tmp_path, True)
    for f in PAIRS_F:
        k = pairs_factor(f)
        line = next(
            li
            for li in text.splitlines()
            if li.startswith(f"| [{', '.join(f'{x:g}' for x in f)}] |")
        )
        assert f"| {k:.3f} | {PAIRS_SIGMA * k:.4f} |" in line
    assert pairs_factor((1.0, 3.0)) == pytest.approx(np.sqrt(10) / 4)  # docs: 0.79
    assert pairs_factor((1.0, 1.0)) == pytest.approx(1 / np.sqrt(2))
    # pairs f at sigma 0.1 vs one pair at the closed form's sigma: equal by construction
    assert text.count("(consistent)") == 2 * (len(PAIRS_F) - 1)
    assert "Pairs help at 3 of 3 settings" in text  # a smaller weight error: higher accuracy
