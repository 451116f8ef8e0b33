"""Section 4 (the bi-scale bias mapping) and ``paper/ranges.py``: the per-layer ranges against a
hand-computed two-layer network and a checkpoint; the section rendered from fake rows of its ten
studies, its verdict following the rows, its cells and paired differences recomputed here with
numpy and scipy."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy import stats
from torch import nn

from cimsim.chip.config import AnalogConfig
from cimsim.chip.convert import convert_to_analog
from cimsim.robustness.rows import ROWS_FILE, Row, write_rows
from cimsim.training.classifier import AnalogClassifier
from paper import plan
from paper.evidence import STUDY_MARKER, Context, Facts
from paper.ranges import LayerRanges, checkpoint_ranges, layer_ranges, reading, why
from paper.sections import bias

# ------------------------------------------------------------------- the ranges, by hand


def two_layers() -> nn.Module:
    """Conv W = [1, -3], b = [2, 0]; BatchNorm gamma = [1, 2], beta = [0.5, -0.5], running mean
    [1, 0], var [3, 0], eps 1: its fold w = gamma / sqrt(var + 1) = [0.5, 2], b = beta - mean w =
    [0, -0.5]; a bias-free conv (no bias to map: left out)."""
    net = nn.Sequential(
        nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, eps=1.0), nn.Conv2d(2, 2, 1, bias=False)
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -3.0]).reshape(2, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([2.0, 0.0]))
        net[1].weight.copy_(torch.tensor([1.0, 2.0]))
        net[1].bias.copy_(torch.tensor([0.5, -0.5]))
        net[1].running_mean.copy_(torch.tensor([1.0, 0.0]))
        net[1].running_var.copy_(torch.tensor([3.0, 0.0]))
    return convert_to_analog(net, AnalogConfig())


# (r(W), r(b), R, R f, R_u, E[x^2]) per layer, by hand:
# half_range. Conv: r(W) = (1 + 3)/2 = 2, r(b) = 1, f = 1/2, b/f = [4, 0]: the union [-3, 4] gives
#   R = 3.5, R f = 1.75; [W b] spans [-3, 2]: R_u = 2.5. BN: r(w) = 0.75, r(b) = 0.25, f = 1/3,
#   b/f = [0, -1.5]: union [-1.5, 2], R = 1.75, R f = 1.75/3; [w b] spans [-0.5, 2]: R_u = 1.25.
# abs_max. Conv: r(W) = 3, r(b) = 2, max|b/f| = 3 = max|W|: R = 3, R f = 2, R_u = 3. BN: r(w) = 2,
#   r(b) = 0.5, R = 2, R f = 0.5, R_u = 2.
# E[x^2] = mean over channels of var + mean^2 = (4 + 0) / 2 = 2.
HAND = {
    "half_range": [(2.0, 1.0, 3.5, 1.75, 2.5, None), (0.75, 0.25, 1.75, 1.75 / 3, 1.25, 2.0)],
    "abs_max": [(3.0, 2.0, 3.0, 2.0, 3.0, None), (2.0, 0.5, 2.0, 0.5, 2.0, 2.0)],
}
# The BN's bias share of the output noise variance R^2 E[x^2] + (R f)^2 under bi-scale, and its
# std over unscaled's R_u^2 (E[x^2] + 1): half_range (R f)^2 = R^2 / 9, so 1/19, and
# sqrt(1.75^2 (2 + 1/9) / (1.25^2 3)) = sqrt(6.4653 / 4.6875); abs_max 0.25 / 8.25 = 1/33, and
# sqrt(8.25 / 12).
HAND_BN = {"half_range": (1 / 19, 1.174419), "abs_max": (1 / 33, math.sqrt(0.6875))}


@pytest.mark.parametrize("scale", ["half_range", "abs_max"])
def test_layer_ranges_match_the_hand_computed_two_layer_case(scale):
    layers = layer_ranges(two_layers(), scale)
    assert [(x.layer, x.kind) for x in layers] == [("0", "Conv2d"), ("1", "BatchNorm2d")]
    for x, want in zip(layers, HAND[scale], strict=True):
        got = (x.r_w, x.r_b, x.big_r, x.big_rf, x.r_u)
        assert got == pytest.approx(want[:5], rel=1e-12)
        assert x.x2 == (None if want[5] is None else pytest.approx(want[5]))
        assert x.widen_w == pytest.approx(x.widen_b)  # R/r(W) = R f/r(b): f = r(b)/r(W)
    share, out = HAND_BN[scale]
    assert layers[1].bias_share == pytest.approx(share, rel=1e-9)
    assert layers[1].out_vs_unscaled == pytest.approx(out, rel=1e-5)
    assert layers[0].bias_share is None and layers[0].out_vs_unscaled is None


def test_reading_names_the_term_that_exceeds_unscaled():
    half = reading(layer_ranges(two_layers(), "half_range"))
    # R/R_u = 3.5/2.5 = 1.75/1.25 = 1.4 in both layers; R f/R_u = 0.7 (conv), 0.467 (BN)
    assert "R/R_u 1.4 (BatchNorm), 1.4 (conv/linear)" in half
    assert "in the weights of 2 and the bias of 0 of 2 layers" in half
    assert "larger excess is in the weight noise (R f/R_u up to 0.7, R/R_u up to 1.4)" in half
    assert "bias term is 5.26 % of bi-scale's noise variance, whose std is 1.17x" in half
    flat = reading(layer_ranges(two_layers(), "abs_max"))
    assert "R/r(W) 1 (BatchNorm), 1 (conv/linear)" in flat
    assert "Neither term is noisier than unscaled's in any layer." in flat
    # a BatchNorm whose bias noise is 3x unscaled's and weights' half: the bias dominates
    bn = LayerRanges("bn", "BatchNorm2d", 1.0, 1.0, 0.5, 3.0, 1.0, 1.0)
    text = why("half_range", [bn])
    assert (
        "larger excess over unscaled is in the bias noise (R f/R_u up to 3, R/R_u up to 0.5)"
        in text
    )
    # 9 / (0.25 + 9) of the variance; std sqrt(9.25 / 2) = 2.15x unscaled's
    assert "1 of the 1 BatchNorm layers have an output noise above unscaled's (std 2.15x)" in text
    assert "the bias term being 97.3 % of it" in text
    assert "nowhere above unscaled's" in why("abs_max", layer_ranges(two_layers(), "abs_max"))


NET = {
    "_target_": "cimsim.wide_resnet.WideResNet",
    "depth": 10,
    "widen_factor": 1,
    "num_classes": 3,
    "in_channels": 1,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, AnalogClassifier]:
    """A tiny WRN's checkpoint with random parameters and running statistics."""
    torch.manual_seed(7)
    model = AnalogClassifier(net=NET, chip={"sigma": 0.1})
    with torch.no_grad():
        for name, t in model.net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("var") else torch.randn_like(t))
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    hparams = dict(model.hparams)
    record = {"pytorch-lightning_version": pl.__version__, "hyper_parameters": hparams}
    torch.save({**record, "state_dict": model.state_dict()}, path)
    return str(path), model


def test_checkpoint_ranges_are_the_networks(checkpoint):
    path, model = checkpoint
    for scale in ("half_range", "abs_max"):
        got = checkpoint_ranges(path, scale)
        assert got == tuple(layer_ranges(model.net.eval(), scale))
    kinds = [x.kind for x in got]  # stem, 3 blocks (the first with an identity shortcut), bn, fc
    assert kinds.count("BatchNorm2d") == 7 and kinds.count("Conv2d") == 9 and kinds[-1] == "Linear"
    bn = model.net.group2[0].bn1
    w = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # the fold the chip stores
    x = next(x for x in got if x.layer == "group2.0.bn1")
    assert x.r_w == pytest.approx(w.abs().max().item(), rel=1e-6)  # abs_max: max |w|


# ------------------------------------------------------------- the section, from fake rows

CHIPS, SIGMAS = 4, (0.0, 0.1, 0.15)
CHIP_EFFECT = (0.01, -0.02, 0.015, -0.005)  # every model's chip c shares it: pairs cancel it


def accuracy(run: str, tested: tuple[str, str], s: float, k: int, holds: dict) -> float:
    """0.8 - s, and on the diagonal of ``separate`` under each convention 5 points above (or
    below: ``holds``) the rest at s > 0, plus 0.2 points per training seed k there."""
    acc = 0.8 - s
    if s > 0 and tested[1] == "separate" and run == plan.mapping_run(*tested):
        acc += (0.05 if holds[tested[0]] else -0.05) + 0.002 * k
    return acc


def fake(out, holds: dict, seeds: int, ckpt_file: str) -> Context:
    """The ten studies' rows (every run at every seed, sigma and chip) with their markers, the
    manifest, and a real checkpoint for the authors' and the digital model at seed 0."""
    runs = {}
    for tested in bias.MAPPINGS:
        study = plan.STUDY[bias.study_of(tested)]
        rows, ckpts = [], {}
        for run in study.runs:
            for k in range(seeds):
                folder = plan.seed_name(run, k)
                path = out / "train" / folder / "checkpoints" / "best.ckpt"
                ckpts[folder] = str(path)
                runs[folder] = {"best": str(path), "L": 4}
                label = f"{plan.RUN[run].title} | chip {bias.name_of(tested)}"
                for s in SIGMAS:
                    a = accuracy(run, tested, s, k, holds)
                    rows += [
                        Row(c, c, s, 0.0, None, a + e, 1.0, 270, label, str(path))
                        for c, e in enumerate(CHIP_EFFECT)
                    ]
        write_rows(out / "evaluate" / study.name / ROWS_FILE, rows)
        marker = {"ckpts": ckpts, "chips": CHIPS}
        (out / "evaluate" / study.name / STUDY_MARKER).write_text(json.dumps(marker))
    for run in (plan.mapping_run(*bias.AUTHORS), "digital"):
        path = out / "train" / run / "checkpoints" / "best.ckpt"
        path.parent.mkdir(parents=True)
        shutil.copy(ckpt_file, path)
    ctx = Context(out / "evaluate", out / "report" / "results", CHIPS, {"runs": runs})
    ctx.meta["seeds"] = seeds
    return ctx


def units(ctx: Context, run: str, tested: tuple[str, str], s: float) -> np.ndarray:
    """What the CI is over, recomputed from the rows file: per-seed means over the chips (one
    seed: the chips)."""
    by: dict[int, dict[int, float]] = {}
    for r in ctx.rows(bias.study_of(tested)):
        folder = r.ckpt.split("/")[-3]
        base, _, k = folder.partition(".s")
        if base == run and r.sigma == s:
            by.setdefault(int(k or 0), {})[r.chip] = r.acc
    if len(by) == 1:
        return np.array([by[0][c] for c in range(CHIPS)])
    return np.array([np.mean(list(by[k].values())) for k in sorted(by)])


def ci(values: np.ndarray) -> float:
    return stats.sem(values) * stats.t.ppf(0.975, len(values) - 1)


@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize(
    ("holds", "verdict"),
    [
        (
            {"half_range": False, "abs_max": True},
            "holds under `abs_max`, does not hold under `half_range`: it depends on the range "
            "convention",
        ),
        ({"half_range": True, "abs_max": True}, "holds under both range conventions"),
        ({"half_range": False, "abs_max": False}, "does not hold under either range convention"),
    ],
)
def test_the_verdict_follows_the_rows_per_range_convention(
    holds, verdict, seeds, tmp_path, checkpoint
):
    ctx = fake(tmp_path, holds, seeds, checkpoint[0])
    text = bias.render(ctx)
    assert f"**Verdict: {verdict} at this scale.**" in text
    assert text.count("**Verdict:") == 1
    over = f"over {seeds} training seeds" if seeds > 1 else f"over {CHIPS} chips"
    assert over in text
    # bi-scale minus unscaled under abs_max at 0.1, each trained under it: numpy and scipy
    sep = units(ctx, *_diag("abs_max"))
    uns = units(ctx, plan.mapping_run("abs_max", "unscaled"), ("abs_max", "unscaled"), 0.1)
    d = sep - uns
    rel = 100 * d.mean() / uns.mean()
    word = "better" if holds["abs_max"] else "worse"
    line = f"0.1: {100 * d.mean():+.1f} ± {100 * ci(d):.1f} points ({rel:+.1f} %) ({word})"
    assert line in text


def _diag(scale: str) -> tuple[str, tuple[str, str], float]:
    return plan.mapping_run(scale, "separate"), (scale, "separate"), 0.1


def test_tables_are_the_rows_and_the_ranges_part_is_the_checkpoints(tmp_path, checkpoint):
    holds = {"half_range": False, "abs_max": True}
    ctx = fake(tmp_path, holds, 3, checkpoint[0])
    text = bias.render(ctx)
    # 4a: the authors' row, sigma 0.1: mean ± CI over seeds
    authors = units(ctx, *_diag("half_range"))
    cell = f"{100 * authors.mean():.1f} ± {100 * ci(authors):.1f}"
    row = next(li for li in text.splitlines() if li.startswith("| half_range / separate (the"))
    assert row.split(" | ")[2] == cell
    # 4b: the digital model's row, mean over seeds of each tested mapping at 0.1
    row = next(li for li in text.splitlines() if li.startswith("| digital model |"))
    means = [f"{100 * units(ctx, 'digital', m, 0.1).mean():.1f}" for m in bias.MAPPINGS]
    assert row.strip(" |").split(" | ")[1:] == means
    # 4c: four tables of the checkpoint's layers, the CSV, and the explanation
    path = checkpoint[0]
    for scale in plan.SCALES:
        assert reading(checkpoint_ranges(path, scale)) in text
    assert text.count("| layer | kind | r(W) |") == 4
    assert (tmp_path / "report" / "results" / "bias_ranges.csv").is_file()
    assert re.search(r"\*\*Why\.\*\* From these four tables: under `half_range` ", text)
    assert (tmp_path / "report" / "results" / "bias.png").stat().st_size > 1000


def test_the_section_renders_again_from_its_facts_without_checkpoints(
    tmp_path, checkpoint, monkeypatch
):
    """Published evidence holds no checkpoint: the per-layer ranges are facts of the report, keyed
    by the checkpoints' paths as the published markers name them (relative to the plan folder)."""
    monkeypatch.chdir(tmp_path)
    ctx = fake(Path("."), {"half_range": False, "abs_max": True}, 2, checkpoint[0])
    ctx.store = Facts(Path("."))
    text = bias.render(ctx)
    assert len(ctx.store.table["bias_ranges"]) == 4  # two models x two range conventions
    for path in Path("train").glob("*/checkpoints/best.ckpt"):
        path.unlink()
    checkpoint_ranges.cache_clear()
    with pytest.raises(FileNotFoundError):
        bias.render(dataclasses.replace(ctx, store=Facts(Path("."))))
    ctx.store = Facts(stored=ctx.store.table)
    assert bias.render(ctx) == text
