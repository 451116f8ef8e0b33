"""Sections 5, 7a, 7b and 8a-8d with training seeds: each renders at one and several seeds, says
what its CIs cover and which checkpoint it evaluates, and its verdict follows the per-seed
numbers (each seed's mean over the common chips, then a t-CI over seeds), recomputed here with
numpy and scipy: a mutation of one seed's rows changes it."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
from paper_fakes import (
    FAKE_CHIPS,
    fake_faults,
    fake_hurts,
    fake_ir_drop,
    fake_methods,
    fake_pairs,
    fake_pcm,
    fake_rram,
    seed_means,
    shift_seed,
)
from scipy import stats

from paper.evidence import ci_text
from paper.markdown import chip_value
from paper.plan import FAULT_TRAIN, IR_DROP_STRONG, PAIRS_SIGMA, RRAM_T_TRAIN, STUDY
from paper.sections.ir_drop import label_of

DEVICE = {"faults": fake_faults, "rram": fake_rram, "ir_drop": fake_ir_drop, "pairs": fake_pairs}
OTHER = {"hurts": fake_hurts, "pcm": fake_pcm, "methods": fake_methods}
FIRST = {"hurts": "hurt_weights"}  # the study whose CI the section's table states


def make(name: str, tmp_path, seeds: int, holds: bool = True):
    if name in DEVICE:
        return DEVICE[name](tmp_path, holds, seeds)
    return OTHER[name](tmp_path, seeds)


def render(name: str, ctx) -> str:
    return importlib.import_module(f"paper.sections.{name}").render(ctx)


def verdict(text: str) -> str:
    return re.search(r"\*\*Verdict: (holds|does not hold|not tested)", text).group(1)


def t_text(diff: list[float]) -> str:
    """A paired difference as the report writes it, computed independently: mean and the
    Student-t 95 % half-width over the units, in points."""
    d = np.array(diff)
    half = stats.sem(d) * stats.t.ppf(0.975, len(d) - 1)
    return f"{100 * d.mean():+.1f} ± {100 * half:.1f}"


def minus(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("name", sorted({**DEVICE, **OTHER}))
@pytest.mark.parametrize("seeds", [1, 2, 3])
def test_each_section_says_what_its_ci_covers_and_which_checkpoint(name, seeds, tmp_path):
    text = render(name, make(name, tmp_path, seeds))
    study = FIRST.get(name, name)
    assert ci_text(seeds, FAKE_CHIPS) in text  # the table's CI: over seeds, or over chips
    assert f"same {FAKE_CHIPS} " in text  # the chips every model shares
    assert not STUDY[study].last
    assert re.search("validation-chosen checkpoint|checkpoint chosen on validation", text)
    assert re.search(r"points \([+-]\d+\.\d %\)", text)  # gains in points and in percent
    assert ("training seeds" in text) == (seeds > 1)
    assert "common chips" not in text or seeds == 1


@pytest.mark.parametrize("name", sorted(DEVICE))
def test_device_verdicts_hold_at_three_seeds_as_at_one(name, tmp_path):
    for holds in (True, False):
        text = render(name, make(name, tmp_path / str(holds), 3, holds))
        assert verdict(text) == ("holds" if holds else "does not hold"), (name, holds)


def test_faults_verdict_is_a_t_ci_over_seeds_and_one_seed_can_overturn_it(tmp_path):
    ctx = fake_faults(tmp_path, True, 3)
    rate = 2 * FAULT_TRAIN

    def diff() -> list[float]:
        rows = ctx.rows("faults")

        def at(run):
            return seed_means(rows, run, lambda r: r.fault_rate == rate)

        return minus(at("faults"), at("sigma0.1_L4"))

    text = render("faults", ctx)
    assert verdict(text) == "holds"
    assert f"{t_text(diff())} points" in text.split("**Verdict:")[1]
    assert "over 3 training seeds (better)" in text
    shift_seed(ctx, "faults", "faults.s2", -0.15, lambda r: r.fault_rate == rate)
    text = render("faults", ctx)  # seed 2 now loses 10 points: seeds +5, +5, -10
    assert verdict(text) == "does not hold"
    assert f"{t_text(diff())} points" in text.split("**Verdict:")[1]


def test_rram_seeds_are_means_over_chips_of_means_over_read_outs(tmp_path):
    ctx = fake_rram(tmp_path, True, 3)

    def diff() -> list[float]:
        rows = ctx.rows("rram")

        def at(run):  # every chip has 2 read-outs: the mean of chip means is the plain mean
            return seed_means(rows, run, lambda r: r.t_inference == RRAM_T_TRAIN)

        return minus(at("rram"), at("digital"))

    text = render("rram", ctx)
    assert verdict(text) == "holds" and f"{t_text(diff())} points" in text
    shift_seed(ctx, "rram", "rram.s1", -0.2, lambda r: r.t_inference == RRAM_T_TRAIN)
    text = render("rram", ctx)
    assert verdict(text) == "does not hold" and f"{t_text(diff())} points" in text


def test_ir_drop_softening_is_paired_by_seed(tmp_path):
    ctx = fake_ir_drop(tmp_path, True, 3)

    def variant(tiles, ir):
        return lambda r: (
            chip_value(label_of(r), "tile_rows") == tiles
            and chip_value(label_of(r), "ir_drop") == ir
        )

    strong = f"{IR_DROP_STRONG}"

    def soften() -> list[float]:
        rows = ctx.rows("ir_drop")

        def drop(tiles):
            clean = seed_means(rows, "sigma0.1_L4", variant(tiles, None))
            return minus(clean, seed_means(rows, "sigma0.1_L4", variant(tiles, strong)))

        return minus(drop(None), drop("64"))

    text = render("ir_drop", ctx)
    assert re.search(
        re.escape(t_text(soften())) + r" points \(.*\) over 3 training seeds \(better", text
    )
    shift_seed(ctx, "ir_drop", "sigma0.1_L4.s2", -0.4, variant("64", strong))
    text = render("ir_drop", ctx)  # seed 2's 64-row tiles now lose 40 points
    assert verdict(text) == "does not hold"
    assert f"{t_text(soften())} points" in text.split("**Verdict:")[1]


def test_pairs_closed_form_check_is_over_seeds(tmp_path):
    ctx = fake_pairs(tmp_path, False, 3)  # pairs 8 points above the closed form at every seed
    assert verdict(render("pairs", ctx)) == "does not hold"
    for run in STUDY["pairs"].runs:  # seed 2 now 8 points below: seeds +8, +8, -8
        shift_seed(
            ctx,
            "pairs",
            f"{run}.s2",
            -0.16,
            lambda r: r.sigma == PAIRS_SIGMA and chip_value(label_of(r), "pairs.f") is not None,
        )
    text = render("pairs", ctx)
    assert verdict(text) == "holds"
    rows = ctx.rows("pairs")
    f = [r for r in rows if chip_value(label_of(r), "pairs.f") == "(1.0, 3.0)"][0]
    s = min({r.sigma for r in rows}, key=lambda x: abs(x - PAIRS_SIGMA * np.sqrt(10) / 4))
    with_f = seed_means(
        rows, "digital", lambda r: label_of(r) == label_of(f) and r.sigma == PAIRS_SIGMA
    )
    one = seed_means(
        rows, "digital", lambda r: chip_value(label_of(r), "pairs.f") is None and r.sigma == s
    )
    assert f"[1, 3] vs one pair at sigma {s:.4f}: {t_text(minus(with_f, one))} points" in text


def _largest(text: str, title: str, sigma: float) -> str:
    line = next(li for li in text.splitlines() if li.startswith(f"* {title}, sigma {sigma:g}:"))
    return re.search(r"Largest: \*\*(.+?)\*\*", line).group(1)


def test_hurts_largest_cost_follows_the_seeds(tmp_path):
    ctx = fake_hurts(tmp_path, 3)
    title = "digital (sigma=0, L=1)"
    text = render("hurts", ctx)
    assert _largest(text, title, 0.1) == "+ 8-level ADC"  # 12 points, ahead of BN's 6

    def cost() -> list[float]:
        def at(study):
            return seed_means(ctx.rows(study), "digital", lambda r: r.sigma == 0.1)

        return minus(at("hurt_identity"), at("hurt_adc"))

    assert f"+ 8-level ADC costs {t_text(cost())} points" in text
    shift_seed(ctx, "hurt_adc", "digital.s2", 0.2, lambda r: r.sigma == 0.1)
    text = render("hurts", ctx)  # seed 2's ADC now gains 8: mean cost 5.3 < BN's 6
    assert _largest(text, title, 0.1) == "+ analog BN"
    assert f"+ 8-level ADC costs {t_text(cost())} points" in text
    assert _largest(text, title, 0.2) == "+ 8-level ADC"  # sigma 0.2 untouched


def test_methods_states_each_seeds_checkpoint_and_pairs_by_seed(tmp_path):
    ctx = fake_methods(tmp_path, 3)
    text = render("methods", ctx)
    line = next(li for li in text.splitlines() if li.startswith("| HA-SGD sigma=0.1, L=4 |"))
    assert "| 5 of 10, 6 of 10, 7 of 10 | 2000, 2400, 2800 |" in line  # L = 4 passes a step
    assert "Training seed 1: Same model: HA-SGD L=4, distilled" in text
    assert "Training seed 0" not in text and "Training seed 2" not in text

    def gain() -> list[float]:
        rows = ctx.rows("methods")

        def at(run):
            return seed_means(rows, run, lambda r: r.sigma == 0.1)

        return minus(at("distill"), at("sigma0.1_L4"))

    ref = np.mean(seed_means(ctx.rows("methods"), "sigma0.1_L4", lambda r: r.sigma == 0.1))
    distill = "* HA-SGD L=4, distilled from the digital model: "
    rel = f"{100 * np.mean(gain()) / ref:+.1f} %"
    assert f"{distill}{t_text(gain())} points ({rel}) (better)" in text
    shift_seed(ctx, "methods", "distill.s2", -0.2, lambda r: r.sigma == 0.1)
    text = render("methods", ctx)
    assert f"{distill}{t_text(gain())} points" in text
    assert re.search(re.escape(distill) + r".*\(no significant difference\)", text)


def test_pcm_drift_is_paired_by_seed(tmp_path):
    ctx = fake_pcm(tmp_path, 3)
    text = render("pcm", ctx)
    assert "| seed std |" in text

    def fall(label) -> list[float]:
        rows = ctx.rows("pcm")
        last = seed_means(rows, "pcm", lambda r: label_of(r) == label and r.t_inference > 1e7)
        return minus(
            last, seed_means(rows, "pcm", lambda r: label_of(r) == label and r.t_inference == 0)
        )

    comp = next(label_of(r) for r in ctx.rows("pcm") if "drift_compensation" not in r.model)
    note = next(li for li in text.splitlines() if li.startswith(f"* {comp}:"))
    assert f"{t_text(fall(comp))} points" in note and note.endswith("worse).")
    assert "paired over 3 training seeds" in note
    shift_seed(ctx, "pcm", "pcm.s2", 0.04, lambda r: label_of(r) == comp and r.t_inference > 1e7)
    text = render("pcm", ctx)
    note = next(li for li in text.splitlines() if li.startswith(f"* {comp}:"))
    assert f"{t_text(fall(comp))} points" in note and "no significant difference" in note
