"""Scale-out paths exercised for real on the CPU: a 2-process DDP training run, distributed Monte
Carlo evaluation, a parallel 2x2 Hydra multirun and its sweep-level study, launcher configs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from torch import nn

from cimsim import AnalogConfig, convert_to_analog
from conftest import FAST, ROOT, compose_cfg

QUIET = ["logger=none", "+trainer.enable_model_summary=false"]


def run(args, **kwargs):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        **kwargs,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    "launcher, plugin, ours",
    [("parallel", "JoblibLauncher", {"n_jobs": 2}), ("slurm", "SlurmLauncher", {"mem_gb": 32})],
)
def test_launcher_configs_compose_and_instantiate(tmp_path, launcher, plugin, ours):
    with warnings.catch_warnings():  # our files extend the plugins' configs, never shadow them
        warnings.simplefilter("error")
        cfg = compose_cfg("train", tmp_path, [f"hydra/launcher={launcher}"])
    assert type(instantiate(cfg.hydra.launcher)).__name__ == plugin
    for key, value in ours.items():
        assert cfg.hydra.launcher[key] == value


@pytest.mark.parametrize("name", ["paper_fig7", "paper_fig8", "paper_fig9"])
def test_paper_sweeps_compose_as_multiruns(tmp_path, name):
    cfg = compose_cfg("train", tmp_path, [f"experiment={name}"])
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert cfg.model.depth == 28 and cfg.data.name == "cifar100"


def _sync_bn_rank(rank: int, init: str, out: str, dtype: torch.dtype) -> None:
    """One of two ranks: an analog BN converted to sync BN, trained on this rank's half."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        convert_to_analog(nn.Sequential(nn.BatchNorm2d(4)), AnalogConfig())
    ).train()
    half = x[4 * rank : 4 * (rank + 1)].to(dtype).requires_grad_()
    y = model(half)
    (y.float() ** 2).sum().backward()
    bn = model[0]
    state = [type(bn).__name__, y.float(), half.grad.float(), bn.running_mean, bn.running_var]
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_analog_sync_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path, dtype):
    mp.spawn(_sync_bn_rank, args=(str(tmp_path / "init"), str(tmp_path), dtype), nprocs=2)
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    x.requires_grad_()
    reference = nn.BatchNorm2d(4).train()
    y = reference(x)
    (y**2).sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    for rank in range(2):
        name, y_r, grad_r, mean_r, var_r = torch.load(tmp_path / f"rank{rank}.pt")
        assert name == "AnalogSyncBatchNorm"
        rows = slice(4 * rank, 4 * (rank + 1))
        torch.testing.assert_close(y_r, y[rows].detach(), **tol)
        torch.testing.assert_close(grad_r, x.grad[rows], **tol)  # through the global stats
        torch.testing.assert_close(mean_r, reference.running_mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(var_r, reference.running_var, rtol=1e-3, atol=1e-3)


def ddp_run(tmp_path, L, *extra):
    out = tmp_path / f"L{L}"
    run(
        [
            "train.py",
            *FAST,
            *QUIET,
            "trainer=ddp_cpu",
            f"hasgd.L={L}",
            "noise.sigma=0.05",
            "test=false",
            f"hydra.run.dir={out}",
            "+callbacks.probe._target_=ddp_probe.DDPProbe",
            f"+callbacks.probe.out={out}/probe.json",
            "trainer.limit_train_batches=3",
            *extra,
        ]
    )
    return out, json.loads((out / "probe.json").read_text())


def test_ddp_cpu_hasgd_syncs_once_per_step_and_ranks_agree(tmp_path):
    out, probe = ddp_run(tmp_path, L=3)
    assert probe["world_size"] == 2 and probe["steps"] == 3
    assert probe["max_param_diff"] == 0.0  # identical weights on both ranks
    assert probe["max_buffer_diff"] == 0.0  # and identical BN statistics: one model, not two
    assert probe["batches_tracked"] == [3]  # running statistics moved once per step, not L
    assert probe["bn_types"] == ["AnalogBatchNorm2d"]
    assert probe["draws_differ"]  # each rank draws its own perturbations
    # synchronized BN (trainer=ddp's default) trains and stays on the chip
    _, single = ddp_run(tmp_path, 1, "+trainer.sync_batchnorm=true")
    assert single["bn_types"] == ["AnalogSyncBatchNorm"]
    assert single["max_param_diff"] == single["max_buffer_diff"] == 0.0
    assert probe["allreduces"] == single["allreduces"] > 0  # L=3 all-reduces as often as L=1
    assert len(list((out / "checkpoints").glob("epoch_*.ckpt"))) == 1
    # the end-of-fit sweep split its chips over the two ranks and merged them
    rows = list(csv.DictReader(open(out / "robustness_rows.csv")))
    assert sorted({r["chip"] for r in rows}) == ["0", "1"]
    assert list(out.glob("robustness_rows.rank*of2.csv"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A parallel 2x2 sweep (joblib launcher, hydra/launcher=parallel): training sigma x L."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    run(
        [
            "train.py",
            "-m",
            *FAST,
            *QUIET,
            "hydra/launcher=parallel",
            "noise.sigma=0,0.1",
            "hasgd.L=1,2",
            f"hydra.sweep.dir={sweep_dir}",
            "test=false",
            "callbacks.robustness=null",
        ]
    )
    return sweep_dir


def test_multirun_makes_one_numbered_run_per_combination(sweep):
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "checkpoints").is_dir())
    assert jobs == ["0", "1", "2", "3"]
    overrides = {(sweep / j / ".hydra" / "overrides.yaml").read_text() for j in jobs}
    assert len(overrides) == 4


def test_sweep_study_has_a_curve_per_training_configuration(sweep):
    args = [
        "evaluate.py",
        f"sweep_dir={sweep}",
        "robustness.chips=2",
        "robustness.sigmas=[0.0,0.1]",
        "progress=false",
        "wandb.enabled=false",
    ]
    run(args)
    study = sweep / "evaluate" / "sigma_sweep"
    models = {r["model"] for r in csv.DictReader(open(study / "robustness_summary.csv"))}
    assert models == {f"train sigma={s}, L={L}" for s in ("0", "0.1") for L in (1, 2)}
    assert (study / "robustness.png").stat().st_size > 0
    before = (study / "robustness_rows.csv").read_bytes()
    run(args)  # resumable like a single evaluation: nothing recomputed, same files
    assert (study / "robustness_rows.csv").read_bytes() == before


def test_distributed_evaluation_matches_one_process(sweep, tmp_path):
    ckpt = next(sweep.glob("3/checkpoints/epoch_*.ckpt"))
    common = [
        "evaluate.py",
        f"ckpt={ckpt}",
        "robustness.chips=5",
        "robustness.sigmas=[0.0,0.1]",
        "progress=false",
        "wandb.enabled=false",
        "accelerator=cpu",
    ]
    run([*common, "devices=1", f"hydra.run.dir={tmp_path / 'one'}"])
    run([*common, "devices=2", f"hydra.run.dir={tmp_path / 'two'}"])
    for name in ("robustness_rows.csv", "robustness_summary.csv", "robustness.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    shares = sorted((tmp_path / "two").glob("robustness_rows.rank*of2.csv"))
    assert len(shares) == 2  # each process wrote (and can resume) its own share


def test_sweep_jobs_share_a_wandb_group_named_after_the_sweep(tmp_path):
    from cimsim.cli.train import group_sweep_runs

    cfg = compose_cfg(
        "train", tmp_path, ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/sigma_sweep"]
    )
    group_sweep_runs(cfg)
    assert cfg.logger.wandb.group == "train-sigma_sweep"
    single = compose_cfg("train", tmp_path, [])
    group_sweep_runs(single)
    assert single.logger.wandb.group is None  # single runs are not grouped
