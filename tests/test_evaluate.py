"""evaluate.py and the RobustnessMonitor end to end, on digits models trained by the tests."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from matplotlib.image import imread

import cimsim.robustness
from cimsim import ConfigError
from conftest import FAST, ROOT, compose_cfg
from evaluate import evaluate
from train import train

SMALL = ["robustness.chips=3", "robustness.sigmas=[0.0,0.1]", "progress=false"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two digits models: clean training and HA-SGD at sigma 0.1 (L=2)."""
    paths = []
    for name, recipe in [
        ("clean", ["noise.sigma=0.0"]),
        ("hasgd", ["noise.sigma=0.1", "hasgd.L=2"]),
    ]:
        out = tmp_path_factory.mktemp(name)
        cfg = compose_cfg(
            "train",
            out,
            FAST
            + recipe
            + [
                "trainer.max_epochs=3",
                "trainer.limit_train_batches=10",
                "logger=none",
                "test=false",
                "callbacks.robustness=null",
            ],
        )
        train(cfg)
        paths.append(out / "checkpoints" / "last.ckpt")
    return paths


def ckpt_list(paths) -> str:
    return "ckpt=[" + ",".join(str(p) for p in paths) + "]"


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_writes_every_file_and_the_wandb_table(checkpoints, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            ckpt_list(checkpoints),
            *SMALL,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (
        "robustness_rows.csv",
        "robustness_summary.csv",
        "robustness.json",
        "robustness.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    rows = read_rows(tmp_path / "robustness_rows.csv")
    assert len(rows) == 2 * 3 * 2  # models x chips x sigmas
    assert {r["model"] for r in rows} == {"train sigma=0, L=1", "train sigma=0.1, L=2"}
    image = imread(tmp_path / "robustness.png")
    assert image.ndim == 3 and image.shape[0] > 100
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/robust/rows_*.json"))
    assert len(tables) == 1
    assert "acc_mean" in proc.stdout and "robustness.png" in proc.stdout


def test_rerun_skips_finished_chips_and_matches_an_uninterrupted_run(
    checkpoints, tmp_path, monkeypatch
):
    args = [ckpt_list(checkpoints), *SMALL, "wandb.enabled=false"]
    evaluate(compose_cfg("evaluate", tmp_path / "whole", args))
    calls = {"n": 0}
    real = cimsim.robustness.program_chip

    def crash_on_fourth(model, seed):  # an interruption after 3 of the 6 chips
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(model, seed)

    monkeypatch.setattr(cimsim.robustness, "program_chip", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate(compose_cfg("evaluate", tmp_path / "cut", args))
    assert len(read_rows(tmp_path / "cut" / "robustness_rows.csv")) == 3 * 2
    calls["n"] = -100  # no more crashes
    evaluate(compose_cfg("evaluate", tmp_path / "cut", args))
    assert calls["n"] == -100 + 3  # only the three missing chips were programmed
    for name in ("robustness_rows.csv", "robustness_summary.csv", "robustness.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_kill_9_then_rerun_gives_the_uninterrupted_files(checkpoints, tmp_path):
    args = [
        sys.executable,
        "evaluate.py",
        f"ckpt={checkpoints[1]}",
        "robustness.chips=30",
        "progress=false",
        "wandb.enabled=false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    rows = tmp_path / "cut" / "robustness_rows.csv"
    proc = subprocess.Popen(
        args + [f"hydra.run.dir={tmp_path / 'cut'}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and (
        not rows.exists() or len(rows.read_text().splitlines()) < 1 + 3 * 11
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_rows(rows))
    assert 3 * 11 <= done < 30 * 11  # killed part-way through
    for out in ("cut", "whole"):
        subprocess.run(
            args + [f"hydra.run.dir={tmp_path / out}"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
    for name in ("robustness_rows.csv", "robustness_summary.csv", "robustness.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_adc_sweep_on_the_digits_model(checkpoints, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        tmp_path,
        [
            f"ckpt={checkpoints[0]}",
            "robustness=adc_sweep",
            "robustness.chips=2",
            "robustness.sigmas=[0.0]",
            "robustness.adc_levels=[null,2,18]",
            "progress=false",
            "wandb.enabled=false",
        ],
    )
    acc = {s["adc_levels"]: s["acc_mean"] for s in evaluate(cfg).summary}
    assert acc[None] > 0.8
    assert acc[2] < acc[None] - 0.2  # 1 bit: far below the unquantized network
    assert abs(acc[18] - acc[None]) < 0.05  # ~4.2 bits: close to it


def test_adc_sweep_resolves_each_models_training_sigma(checkpoints, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        tmp_path,
        [
            ckpt_list(checkpoints),
            "robustness=adc_sweep",
            "robustness.chips=1",
            "robustness.adc_levels=[4]",
            "progress=false",
            "wandb.enabled=false",
        ],
    )
    sigmas = {(s["model"], s["sigma"]) for s in evaluate(cfg).summary}
    assert sigmas == {
        ("train sigma=0, L=1", 0.0),
        ("train sigma=0.1, L=2", 0.0),
        ("train sigma=0.1, L=2", 0.1),
    }


@pytest.mark.parametrize(
    "override, match",
    [
        ("ckpt=/no/such.ckpt", r"^ckpt='/no/such.ckpt'"),
        ("robustness.sigmas=[]", r"^robustness.sigmas="),
        ("robustness.chips=0", r"^robustness.chips=0"),
        ("robustness.adc_levels=[1]", r"^robustness.adc_levels"),
        ("robustness.x=depth", r"^robustness.x='depth'"),
        ("accelerator=tpu", r"^accelerator='tpu'"),
        ("devices=0", r"^devices=0"),
    ],
)
def test_bad_input_fails_before_any_evaluation(checkpoints, tmp_path, override, match):
    overrides = [f"ckpt={checkpoints[0]}", "wandb.enabled=false", override]
    with pytest.raises(ConfigError, match=match):
        evaluate(compose_cfg("evaluate", tmp_path, overrides))
    assert not (tmp_path / "robustness_rows.csv").exists()


def test_no_checkpoint_given(tmp_path):
    with pytest.raises(ConfigError, match="^ckpt=None.*ckpt_glob"):
        evaluate(compose_cfg("evaluate", tmp_path, []))


def test_robustness_monitor_during_and_after_training(train_cfg, tmp_path):
    train(train_cfg(["noise.sigma=0.05", "logger=[csv]", "trainer.max_epochs=2"]))
    with open(next(tmp_path.glob("csv/version_*/metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("robust/val_acc@sigma=0.1")]
    assert len(logged) == 2  # every epoch (every_n_epochs=1 in the test config)
    rows = read_rows(tmp_path / "robustness_rows.csv")
    assert len(rows) == 2 * 2 and rows[0]["ckpt"].endswith(".ckpt")  # best checkpoint swept
    assert (tmp_path / "robustness.png").stat().st_size > 0
    assert torch.load(rows[0]["ckpt"], weights_only=False)["datamodule"]["_target_"].endswith(
        "DigitsDataModule"
    )
