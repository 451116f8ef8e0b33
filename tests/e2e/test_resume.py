"""Resuming a run: its own settings from the checkpoint, in its own folder, and an override that
contradicts it refused unless resume_overrides=allow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cimsim import ConfigError
from cimsim.cli.train import resume_in_place, train
from cimsim.training.checkpoint import RUN
from cimsim.validation import remove_failed_run_dir
from conftest import FAST, ROOT

# The run being resumed: not the defaults (sigma 0, L 1), so a resume that forgets them shows.
RUN_SETTINGS = ["noise.sigma=0.05", "hasgd.L=2"]
QUIET = ["logger=none", "test=false", "callbacks.robustness=null", "callbacks.hessian=null"]


def interrupted_run(train_cfg, out: Path) -> Path:
    """A one-epoch run at RUN_SETTINGS (as if killed after its first epoch): its last.ckpt."""
    train(train_cfg([*RUN_SETTINGS, *QUIET], out=out))
    return out / "checkpoints" / "last.ckpt"


def trained_with(path: Path) -> tuple[float, int, int]:
    """(chip sigma, L, epoch) of the model a checkpoint holds."""
    ckpt = torch.load(path, weights_only=True)
    return ckpt["hyper_parameters"]["chip"]["sigma"], ckpt["hyper_parameters"]["L"], ckpt["epoch"]


def test_resume_takes_the_runs_settings_from_the_checkpoint(train_cfg, tmp_path):
    last = interrupted_run(train_cfg, tmp_path / "run")
    stored = torch.load(last, weights_only=True)[RUN]  # plain types: weights_only loads it
    assert stored["config"]["noise"]["sigma"] == 0.05 and "hasgd.L=2" in stored["overrides"]
    # Not the run's settings, only where to resume from and for how long (and the FAST and
    # QUIET settings, which are the run's too): not the defaults' sigma 0, L 1.
    resume = train_cfg([*QUIET, f"ckpt_path={last}", "trainer.max_epochs=2"], out=tmp_path / "run")
    train(resume)
    assert trained_with(last) == (0.05, 2, 1)


def test_a_contradicting_override_is_refused_unless_allowed(train_cfg, tmp_path):
    last = interrupted_run(train_cfg, tmp_path / "run")
    before = last.read_bytes()
    bad = train_cfg([*QUIET, f"ckpt_path={last}", "trainer.max_epochs=2", "noise.sigma=0.1"])
    with pytest.raises(ConfigError, match=r"contradicts the run being resumed \(noise.sigma=0.05"):
        train(bad)
    assert last.read_bytes() == before  # refused before any training
    with pytest.raises(ConfigError) as info:  # a config group too
        train(train_cfg([*QUIET, f"ckpt_path={last}", "model=wrn16_4"]))
    assert info.value.key == "model" and "model=wrn10_2" in str(info.value)
    allowed = ["noise.sigma=0.1", "resume_overrides=allow"]
    train(
        train_cfg(
            [*QUIET, f"ckpt_path={last}", "trainer.max_epochs=2", *allowed], out=tmp_path / "run"
        )
    )
    assert trained_with(last) == (0.1, 2, 1)  # sigma changed, L still the run's


def test_an_old_checkpoint_resumes_with_its_run_folders_hydra_config(train_cfg, tmp_path):
    run = tmp_path / "run"
    last = interrupted_run(train_cfg, run)
    old = torch.load(last, weights_only=True)
    del old[RUN]  # as written before checkpoints stored their run
    torch.save(old, last)
    resume = train_cfg([*QUIET, f"ckpt_path={last}", "trainer.max_epochs=2"], out=run)
    with pytest.raises(ConfigError, match=r"^ckpt_path=.*\.hydra/config\.yaml does not exist"):
        train(resume)
    # What Hydra writes into every run folder: the composed config, unresolved.
    composed = train_cfg([*RUN_SETTINGS, *QUIET], out=run)
    (run / ".hydra").mkdir()
    config = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
    OmegaConf.save(config, run / ".hydra/config.yaml")
    OmegaConf.save(list(composed.hydra.overrides.task), run / ".hydra/overrides.yaml")
    train(train_cfg([*QUIET, f"ckpt_path={last}", "trainer.max_epochs=2"], out=run))
    assert trained_with(last) == (0.05, 2, 1)


def test_a_run_stored_with_the_flat_layouts_targets_resumes(train_cfg, tmp_path):
    """A run written before the package had sub-packages stored ``cimsim.callbacks.*`` and
    ``cimsim.robustness.RobustnessGrid`` as its callbacks' targets: it still resumes."""
    run = tmp_path / "run"
    train(
        train_cfg([*RUN_SETTINGS, "logger=none", "test=false", "callbacks.hessian=null"], out=run)
    )
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    monitor = ckpt[RUN]["config"]["callbacks"]["robustness"]
    assert monitor["_target_"] == "cimsim.training.callbacks.RobustnessMonitor"
    monitor["_target_"] = "cimsim.callbacks.RobustnessMonitor"  # as 0.1's checkpoints hold it
    monitor["final"]["_target_"] = "cimsim.robustness.RobustnessGrid"
    torch.save(ckpt, last)
    train(train_cfg(["logger=none", f"ckpt_path={last}", "trainer.max_epochs=2"], out=run))
    assert trained_with(last) == (0.05, 2, 1)


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_resume_continues_in_the_runs_own_folder_and_wandb_run(tmp_path):
    first = cli([*FAST, *RUN_SETTINGS, *QUIET[1:]], tmp_path)  # with the W&B logger
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    refused = cli([f"ckpt_path={last}", "hasgd.L=4"], tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("config error: hasgd.L=4 is invalid")
    assert not list((run / ".hydra").glob("resume_*"))  # the refused resume left nothing
    resumed = cli([f"ckpt_path={last}", "trainer.max_epochs=2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # no new run folder
    assert trained_with(last) == (0.05, 2, 1)
    original = OmegaConf.load(run / ".hydra" / "config.yaml")  # not the resume's
    assert original.noise.sigma == 0.05 and original.ckpt_path is None
    assert len(list((run / ".hydra").glob("resume_*/config.yaml"))) == 1
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1


def test_only_a_run_folder_of_hydras_files_written_by_this_process_is_removed(tmp_path):
    def hydra_run(name: str, *extra: str) -> Path:
        folder = tmp_path / name
        for file in [".hydra/config.yaml", "train.log", *extra]:
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_text("x")
        return folder

    since = time.time() - 60
    assert remove_failed_run_dir(hydra_run("failed"), since=since) == tmp_path / "failed"
    assert not (tmp_path / "failed").exists()
    kept = hydra_run("resumed", "checkpoint.ckpt")  # anything but Hydra's files: kept
    assert remove_failed_run_dir(kept, since=since) is None and kept.exists()
    older = hydra_run("older")  # files written before this process started
    assert remove_failed_run_dir(older, since=time.time() + 60) is None and older.exists()
    resume = hydra_run("run", "checkpoints/last.ckpt", ".hydra/resume_1/config.yaml")
    assert remove_failed_run_dir(resume, ".hydra/resume_1", since) == resume / ".hydra/resume_1"
    assert (resume / ".hydra" / "config.yaml").exists()  # the run's own record stays
    (resume / ".hydra" / "config.yaml").unlink()  # a run folder without .hydra/ of its own
    (resume / ".hydra" / "resume_2").mkdir()
    (resume / ".hydra" / "resume_2" / "config.yaml").write_text("x")
    assert remove_failed_run_dir(resume, ".hydra/resume_2", since) is not None
    assert sorted(p.name for p in resume.iterdir()) == ["checkpoints", "train.log"]


def test_the_cli_resumes_in_the_checkpoints_run_folder_only(tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    extra = resume_in_place([f"ckpt_path={last}", "trainer.max_epochs=2"])
    assert extra[0] == f"hydra.run.dir='{tmp_path / 'run'}'"  # not a new timestamped folder
    assert extra[1].startswith("hydra.output_subdir=.hydra/resume_")  # .hydra/ itself stays
    assert resume_in_place([f"ckpt_path={last}", f"hydra.run.dir={tmp_path}"]) == []
    assert resume_in_place(["-m", f"ckpt_path={last}"]) == []
    (tmp_path / "loose.ckpt").write_bytes(b"")  # in no run's checkpoints/: no run folder
    assert resume_in_place([f"ckpt_path={tmp_path / 'loose.ckpt'}"]) == []
