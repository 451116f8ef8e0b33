"""``python evaluate.py robustness=drift_sweep`` on a digits model trained for a PCM chip: each
model with and without drift compensation, nested chip overrides, and the settings refused
before any evaluation. Rows are checked against the checkpoint loaded and measured by hand.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from cimsim import ConfigError, program_chip, set_time
from cimsim.cli.evaluate import evaluate
from cimsim.cli.train import train
from cimsim.robustness.fingerprints import read_fingerprints
from cimsim.robustness.grid import chip_seed
from cimsim.robustness.rows import COLUMNS, TIMED_COLUMNS, Row
from cimsim.training.classifier import AnalogClassifier
from conftest import FAST, compose_cfg

YEAR = 31536000.0


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pcm_ckpt(tmp_path_factory):
    """A digits model trained for a PCM chip read an hour after programming."""
    out = tmp_path_factory.mktemp("pcm")
    overrides = [
        "noise=pcm", "noise.t_train=3600", "trainer.max_epochs=2", "trainer.limit_train_batches=10",
        "logger=none", "test=false", "callbacks.robustness=null",
    ]  # fmt: skip
    train(compose_cfg("train", out, FAST + overrides))
    return out / "checkpoints" / "last.ckpt"


def drift_cfg(out, *overrides):
    small = ["robustness=drift_sweep", "robustness.chips=2", f"robustness.times=[0,{YEAR:g}]",
             "robustness.repetitions=2", "progress=false", "wandb.enabled=false"]  # fmt: skip
    return compose_cfg("evaluate", out, small + list(overrides))


def edited_ckpt(pcm_ckpt, path, **chip):
    """The PCM checkpoint's weights, recorded as trained on another chip."""
    contents = torch.load(pcm_ckpt, weights_only=True)
    contents["hyper_parameters"]["chip"].update(chip)
    torch.save(contents, path)
    return path


@torch.no_grad()
def ckpt_by_hand(ckpt, chip_index, t, rep, **pcm) -> tuple[float, int]:
    """A row of evaluate.py's drift sweep without its code: the checkpoint as the README loads
    it, on its chip with ``pcm`` fields replaced, chip ``chip_index`` of seed 0 at (t, rep)."""
    model = AnalogClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    chip = dataclasses.replace(model.chip, pcm=dataclasses.replace(model.chip.pcm, **pcm))
    model = AnalogClassifier.load_from_checkpoint(ckpt, weights_only=True, chip=chip)
    data = instantiate(torch.load(ckpt, weights_only=True)["datamodule"])
    data.setup("test")
    net = model.net.eval()
    program_chip(net, chip_seed(0, chip_index))
    set_time(net, t, rep)
    correct, n = 0, 0
    for x, y in data.test_dataloader():
        correct += (net(x).argmax(1) == y).sum().item()
        n += len(y)
    return correct / n, n


def test_drift_sweep_draws_each_model_with_and_without_compensation(pcm_ckpt, tmp_path):
    result = evaluate(drift_cfg(tmp_path, f"ckpt={pcm_ckpt}"))
    recipe = "train sigma=0, L=1, PCM t_train=3600s | chip device=pcm"
    labels = [recipe, f"{recipe}, pcm.drift_compensation=none"]
    rows = read_csv(tmp_path / "robustness_rows.csv")
    assert list(rows[0]) == TIMED_COLUMNS
    assert [r["model"] for r in rows] == [labels[0]] * 8 + [labels[1]] * 8  # 2 chips x 2 x 2
    known = read_fingerprints(tmp_path / "robustness_rows.csv")
    assert [known[r["fingerprint"]]["chip"]["pcm"]["drift_compensation"] for r in rows[::8]] == [
        "global", "none",
    ]  # fmt: skip
    for r in rows[7::8]:  # each subject's last chip, a year on, second read-out, by hand
        mode = "none" if r["model"] == labels[1] else "global"
        acc, n = ckpt_by_hand(pcm_ckpt, 1, YEAR, 1, drift_compensation=mode)
        assert (float(r["acc"]), int(r["n"])) == (acc, n)
        assert int(r["chip_seed"]) == chip_seed(0, 1)  # the same chips for both curves
    assert [s["model"] for s in result.summary] == [labels[0]] * 2 + [labels[1]] * 2
    written = read_csv(tmp_path / "robustness_summary.csv")
    assert list(written[0])[:6] == ["model", "t_inference", "sigma", "mean_shift", "adc_levels",
                                    "acc_mean"]  # fmt: skip
    assert [float(s["acc_p5"]) for s in written] == [s["acc_p5"] for s in result.summary]
    for s in written:  # the spreads recomputed with numpy from the rows file
        key = (s["model"], s["t_inference"])
        a = np.array([float(r["acc"]) for r in rows if (r["model"], r["t_inference"]) == key])
        a = a.reshape(2, 2)  # (chips, read-outs): rows are in chip, then read-out order
        read = np.sqrt(a.var(axis=1, ddof=1).mean())
        assert float(s["acc_std_read"]) == pytest.approx(read, rel=1e-9, abs=1e-15)
        chip = a.mean(axis=1).std(ddof=1)
        assert float(s["acc_std_chip"]) == pytest.approx(chip, rel=1e-9, abs=1e-15)
        assert float(s["acc_mean"]) == pytest.approx(a.mean(), rel=1e-12)
    year = {s["model"]: s["loss_mean"] for s in result.summary if s["t_inference"] == YEAR}
    assert year[labels[0]] != year[labels[1]]
    assert (tmp_path / "robustness.png").stat().st_size > 0


def test_a_nested_chip_override_changes_only_its_field(pcm_ckpt, tmp_path):
    ckpt = edited_ckpt(pcm_ckpt, tmp_path / "g20.ckpt", pcm={"g_max": 20.0})
    args = [f"ckpt={ckpt}", "robustness.chips=1", "robustness.times=[0]",
            "robustness.repetitions=1", "chip.pcm.drift_compensation=none"]  # fmt: skip
    result = evaluate(drift_cfg(tmp_path / "out", *args))  # the override wins over the list
    (label,) = {r.model for r in result.rows}
    assert label.endswith("| chip device=pcm, pcm.g_max=20.0, pcm.drift_compensation=none")
    (settings,) = read_fingerprints(tmp_path / "out" / "robustness_rows.csv").values()
    assert settings["chip"]["pcm"]["g_max"] == 20.0  # the checkpoint's, not the default 25
    assert settings["chip"]["pcm"]["drift_compensation"] == "none"
    (row,) = result.rows
    assert (row.acc, row.n) == ckpt_by_hand(ckpt, 0, 0.0, 0, drift_compensation="none")


@pytest.mark.parametrize(
    "override, match",
    [
        ("chip.pcm.drift_compensation=bogus", r"^chip\.pcm\.drift_compensation='bogus'"),
        ("robustness.compensations=[global,global]", r"^robustness\.compensations=.*repeat"),
        ("robustness.compensations=[sometimes]", r"^robustness\.compensations='sometimes'"),
        ("robustness.times=[60,-1]", r"^robustness\.times=-1"),
        ("robustness.x=depth", r"^robustness\.x='depth'"),
    ],
)
def test_bad_drift_sweep_settings_fail_before_any_evaluation(pcm_ckpt, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        evaluate(drift_cfg(tmp_path, f"ckpt={pcm_ckpt}", override))
    assert not (tmp_path / "robustness_rows.csv").exists()


def test_a_time_sweep_of_a_relative_checkpoint_fails_naming_robustness_times(pcm_ckpt, tmp_path):
    ckpt = edited_ckpt(pcm_ckpt, tmp_path / "relative.ckpt", device="relative")
    with pytest.raises(ConfigError, match=r"^robustness\.times=\[0\.0, 31536000\.0\] is invalid"):
        evaluate(drift_cfg(tmp_path / "out", f"ckpt={ckpt}"))
    assert not (tmp_path / "out" / "robustness_rows.csv").exists()
    sigma = ["robustness=sigma_sweep", "robustness.x=t_inference", "wandb.enabled=false"]
    with pytest.raises(ConfigError, match=r"^robustness\.x='t_inference' .*robustness\.times"):
        evaluate(compose_cfg("evaluate", tmp_path / "out", [f"ckpt={ckpt}", *sigma]))
    small = ["robustness.sigmas=[0.0]", "robustness.chips=1", "progress=false"]
    plain = evaluate(
        compose_cfg("evaluate", tmp_path / "plain", [f"ckpt={pcm_ckpt}", *sigma[::2], *small])
    )
    assert list(read_csv(tmp_path / "plain" / "robustness_rows.csv")[0]) == COLUMNS
    assert all(type(r) is Row for r in plain.rows)  # a PCM model without times: today's rows
