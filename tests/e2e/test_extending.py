"""docs/extending.md's worked examples run as written: a training method and a device added from
outside the package (the study example renders in tests/paper/test_plan.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from docs_blocks import section_blocks
from test_docs_commands import SMALL  # one epoch of two batches, two chips: the guides' size

from conftest import ROOT

GUIDE = ROOT / "docs" / "extending.md"


def project_copy(tmp: Path) -> Path:
    """The entry scripts and conf/ in a fresh folder: the user's checkout."""
    for script in ("train.py", "evaluate.py"):
        shutil.copy(ROOT / script, tmp / script)
    shutil.copytree(ROOT / "conf", tmp / "conf")
    return tmp


def run(command: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "python", command
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(cwd)}
    done = subprocess.run(
        [sys.executable, *words[1:], *extra], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_add_a_training_method_as_written(tmp_path):
    blocks = section_blocks(GUIDE, "Add a training method")
    (_, method), (_, yaml), (_, command) = blocks
    cwd = project_copy(tmp_path)
    # the text names where each block goes: the module beside train.py, the yaml in conf/method/
    (cwd / "clip_grad.py").write_text(method)
    (cwd / "conf" / "method" / "clip.yaml").write_text(yaml)
    run(command.strip(), cwd, *SMALL["train.py"], "hydra.run.dir=outputs/train/clip")
    ckpt = torch.load(
        cwd / "outputs/train/clip/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["hyper_parameters"]["methods"]["clip_norm"] == 1.0
    assert ckpt["hyper_parameters"]["L"] == 4


def test_add_a_device_as_written(tmp_path):
    (_, module), (_, commands) = section_blocks(GUIDE, "Add a device")
    cwd = project_copy(tmp_path)
    (cwd / "my_devices.py").write_text(module)
    train, evaluate = commands.strip().splitlines()
    run(train, cwd, *SMALL["train.py"], "hydra.run.dir=outputs/train/stuck")
    ckpt = cwd / "outputs/train/stuck/checkpoints/last.ckpt"
    chip = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["chip"]
    assert chip["device"] == "stuck" and chip["stuck"] == {"p": 0.02}
    run(evaluate.replace("PATH.ckpt", str(ckpt)), cwd, *SMALL["evaluate.py"], "run_name=stuck")
    rows = list((cwd / "outputs").rglob("robustness_rows.csv"))
    assert rows, "evaluate.py wrote no rows"
    # the model keeps its training device in its label; the test chip names what the call changed
    assert "stuck p=0.02 | chip device=stuck, stuck.p=0.05" in rows[0].read_text()


def test_convert_any_model_as_written(tmp_path):
    """The transformer on digits: converted, trained with HA-SGD, evaluated on programmed chips."""
    ((language, code),) = section_blocks(GUIDE, "Convert any model: a transformer on digits")
    assert language == "python"
    script = tmp_path / "digits_transformer.py"
    script.write_text(code)
    done = run(f"python {script.name}", tmp_path)
    assert "MAC coverage" in done.stdout and "AnalogMultiheadAttention" in done.stdout
    accuracy = {}
    for line in done.stdout.splitlines():
        if line.startswith("sigma "):
            sigma, rest = line.removeprefix("sigma ").split(": accuracy ")
            accuracy[float(sigma)] = tuple(float(v) for v in rest.split(" +- "))
    assert sorted(accuracy) == [0.0, 0.05, 0.1]
    assert accuracy[0.0][1] == 0.0  # sigma 0: every chip is the trained model
    # 397 test digits, chance 0.1: a trained transformer is far above, noise or not
    assert accuracy[0.0][0] > 0.85 and accuracy[0.05][0] > 0.85 and accuracy[0.1][0] > 0.7
