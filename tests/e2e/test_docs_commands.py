"""The shell commands of the README and its guides run as written, on a fresh folder: a command
that no longer parses, or names a file that a fresh clone never makes (``epoch_008.ckpt``), fails
here.

Every fenced ```bash block of ``DOCS`` (README.md, then the guides, in that order: a guide's
commands read what the README's workflow wrote) is read in order, line by line
(``\\``-continuations joined, ``&&`` chains split). ``NAME=...`` lines are kept and rerun before
each later command of their block; each ``python ...`` command is expanded by bash itself (quotes,
``$A``, ``$(ls ...)`` exactly as in a terminal, under ``set -eu``: a glob that matches nothing
fails). Then ``train.py`` or ``evaluate.py`` runs as ``__main__`` in this process (``runpy``: torch
is imported once, not per command), in a temporary working directory, so ``outputs/...`` starts
empty. Small-run overrides are appended (``SMALL``: one epoch of two batches, width 1, two chips
of one test batch); they win over a command's own values, but a config group that a command
chooses itself (``trainer=``, ``logger=``) is left alone.

Commands that cannot run here are skipped by a rule of ``SKIP`` (a pattern and why), each one
listed as a skipped test with its file and line (``pytest -ra`` prints them); a rule that matches
no command fails, so the list cannot rot. The full ``python reproduce.py`` is in no block (13
min); its outputs, which a command may read, are stood in for by the workflow's two models
copied into reproduce's layout (``STAND_INS``: the same recipes).
"""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, ROOT
from paper.plan import RUN

# The files whose ```bash blocks run, in this order; every docs/*.md with such a block is here.
DOCS = (
    "README.md",
    "docs/training.md",
    "docs/devices.md",
    "docs/periphery.md",
    "docs/methods.md",
    "docs/evaluation.md",
    "docs/scaling.md",
    "docs/performance.md",
    "docs/extending.md",
)
# (pattern in the command as written, why it is not run here)
SKIP = (
    (r"^pip ", "installs packages: needs the network"),
    (r"^python -m pytest", "the test suite itself"),
    (r"plugins=\[my_devices\]|method=clip\b", "a worked example: test_extending.py runs it"),
    (r"data\.download=true", "downloads a dataset (and trains at paper scale: a GPU)"),
    (r"/path/to/", "a template: needs your own image folder"),
    (r"hydra/launcher=slurm", "submits SLURM jobs"),
    (r"trainer=ddp", "several processes or GPUs (test_scale_out.py runs trainer=ddp_cpu)"),
    (r"\bdevices=[2-9]", "several processes (tests/e2e/test_scale_out.py runs devices=2)"),
    (r"^python train\.py -m ", "a sweep of several trainings (test_scale_out.py runs one)"),
    (r"\bsweep_dir=", "evaluates a train.py -m sweep, and sweeps are skipped"),
)
# Appended to every command of the script: small, fast, offline, on the CPU.
SMALL = {
    "train.py": [
        "trainer=cpu",
        "logger=csv",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1",
        "++trainer.enable_progress_bar=false",
        "model.widen_factor=1",
        "val_chips=1",
        "val_calib_batches=1",
        "callbacks.robustness=null",
        "callbacks.hessian=null",
    ],
    "evaluate.py": [
        "robustness.chips=2",
        "robustness.max_batches=1",
        "robustness.calib_batches=1",
        "hessian_probes=2",
        "hessian_batches=1",
        "wandb.enabled=false",
        "progress=false",
    ],
}
# ... and after a preset's choice: its longest axis shortened (tile sweeps: 84 points of 2 models)
SMALL_PRESET = {"robustness=tile_sweep": ["robustness.adc_levels=[null,8]"]}
# python reproduce.py's runs that README commands read -> the workflow's run of the same recipe
STAND_INS = {"digital": "outputs/train/clean", "sigma0.1_L4": "outputs/train/hasgd"}
REPRODUCED = re.compile(r"outputs/reproduce/train/([^/]+)/")


@dataclass(frozen=True)
class Command:
    file: str  # README.md or docs/NAME.md
    line: int
    text: str  # as written, one simple command
    prelude: tuple[str, ...]  # the block's NAME=... lines before it

    def __str__(self) -> str:
        bare = re.sub(r"\s+#.*$", "", self.text)  # without its comment
        return f"{self.file}:{self.line}: {bare}"


def readme_commands(path: Path = ROOT / "README.md") -> list[Command]:
    """Every command of every ```bash block of ``path`` (README.md or a guide), in order."""
    name = path.relative_to(ROOT).as_posix()
    commands, prelude, block = [], [], False
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        start, text = i + 1, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):  # a continued command
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        if text.startswith("```"):
            block, prelude = text == "```bash", []
        elif not block or not text.strip() or text.lstrip().startswith("#"):
            continue
        elif re.match(r"[A-Za-z_]\w*=", text):
            prelude.append(text)
        else:
            parts = [p.strip() for p in text.split(" && ")]
            commands += [Command(name, start, part, tuple(prelude)) for part in parts]
    return commands


def skip_reason(command: Command) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, command.text)), None)


COMMANDS = [c for doc in DOCS for c in readme_commands(ROOT / doc)]
RUNNABLE = [c for c in COMMANDS if skip_reason(c) is None]
SKIPPED = [c for c in COMMANDS if skip_reason(c) is not None]


def expand(command: Command, cwd: Path) -> list[str]:
    """The command's words as bash makes them, after its block's ``NAME=...`` lines."""
    script = "\n".join(
        ["set -eu -o pipefail", *command.prelude, "python() { printf '%s\\0' python \"$@\"; }"]
        + [command.text]
    )
    done = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{command}\nbash: {done.stderr.strip()}"
    return done.stdout.split("\0")[:-1]


def small(script: str, args: list[str]) -> list[str]:
    """``SMALL[script]``, less the config groups the command chooses itself, plus
    ``SMALL_PRESET``'s for the presets it chooses."""
    chosen = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    mine = [o for o in SMALL[script] if not (is_group(o) and o.split("=")[0] in chosen)]
    return mine + [o for a in args for o in SMALL_PRESET.get(a, [])]


def is_group(override: str) -> bool:
    """Whether ``override`` chooses a config group's file (``logger=csv``), not a value."""
    return (CONF / override.split("=")[0]).is_dir()


def stand_in(command: Command, cwd: Path) -> None:
    """The runs of ``python reproduce.py`` the command reads, from the workflow's models."""
    for name in REPRODUCED.findall(" ".join([*command.prelude, command.text])):
        assert name in RUN, f"{command}: reproduce.py has no run {name!r}"
        assert name in STAND_INS, f"{command}: no stand-in for reproduce.py's run {name!r}"
        target = cwd / "outputs" / "reproduce" / "train" / name
        if not target.exists():
            shutil.copytree(cwd / STAND_INS[name], target)


def run(command: Command, cwd: Path, monkeypatch) -> None:
    """``command`` through its script's Hydra entry point, with the ``SMALL`` overrides."""
    stand_in(command, cwd)
    words = expand(command, cwd)
    assert words[0] == "python" and words[1] in SMALL, f"{command}: not a train.py or evaluate.py"
    script, args = words[1], words[2:]
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args, *small(script, args)])
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{command}\nexited with {stop.code}"


def test_every_guide_with_commands_is_read():
    guides = [p for p in sorted((ROOT / "docs").glob("*.md")) if "```bash" in p.read_text()]
    unread = sorted({p.relative_to(ROOT).as_posix() for p in guides} - set(DOCS))
    assert not unread, f"guides with ```bash blocks missing from DOCS: {unread}"


def test_every_readme_command_is_known_and_every_skip_rule_is_used():
    assert RUNNABLE, "no runnable command found: is README.md's ```bash fencing intact?"
    for command in RUNNABLE:
        assert re.match(r"python (train|evaluate)\.py\b", command.text), command
    unused = [p for p, _ in SKIP if not any(re.search(p, c.text) for c in COMMANDS)]
    assert not unused, f"skip rules that match no command of README.md or a guide: {unused}"


def test_the_readme_commands_run_as_written(tmp_path, monkeypatch):
    """In order, as a reader on a fresh clone would type them, each after the ones above it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # a failure's own traceback, not Hydra's summary
    torch.set_num_threads(1)  # width-1 networks gain nothing from a second thread
    for command in RUNNABLE:
        run(command, tmp_path, monkeypatch)


@pytest.mark.parametrize("command", SKIPPED, ids=lambda c: f"{Path(c.file).stem}:{c.line}")
def test_skipped_command(command):
    pytest.skip(f"{command}: {skip_reason(command)}")
