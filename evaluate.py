"""Monte Carlo robustness of trained checkpoints (Wan et al. 2022, Figs. 7-9).

    python evaluate.py ckpt=PATH.ckpt                            # accuracy vs. test sigma
    python evaluate.py 'ckpt=[A.ckpt,B.ckpt]'                    # several models, one figure
    python evaluate.py ckpt_glob='outputs/train/runs/*/checkpoints/epoch_*.ckpt'
    python evaluate.py ckpt=A.ckpt robustness=mean_shift_sweep   # or robustness=adc_sweep
    python evaluate.py sweep_dir=outputs/train/multiruns/<date>  # every job of a train.py -m sweep
    python evaluate.py ckpt=A.ckpt devices=4                     # chips split over 4 processes

Writes robustness_rows.csv (one row per chip and grid point), robustness_summary.csv,
robustness.json and robustness.png into outputs/evaluate/<run_name>/, logs them to W&B, and
prints a summary table. Rerunning the same command resumes from the rows already written.
A sweep's study goes to <sweep_dir>/evaluate/<run_name>/.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from cimsim import ConfigError
from cimsim.classifier import AnalogClassifier
from cimsim.robustness import SWEEPS, RobustnessGrid, format_summary
from cimsim.study import Evaluation, Subject, run_study
from cimsim.tracking import default_wandb_mode, log_robustness
from cimsim.validation import check_choice, check_int, config_scope

TRAIN_SIGMA = "train"  # in robustness.sigmas: each model's own training sigma
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def output_dir(sweep_dir: str | None, task_name: str, run_name: str) -> str:
    """Where a study writes: next to the sweep it evaluates, else outputs/<task>/<run_name>."""
    return f"{sweep_dir}/evaluate/{run_name}" if sweep_dir else f"outputs/{task_name}/{run_name}"


OmegaConf.register_new_resolver("eval_dir", output_dir, replace=True)


def checkpoint_paths(cfg: DictConfig) -> list[Path]:
    """The checkpoints named by ``ckpt`` (a path or a list), ``ckpt_glob``, or ``sweep_dir`` (the
    best checkpoint of every job of a ``train.py -m`` sweep); all must exist."""
    if cfg.get("sweep_dir"):
        if not Path(cfg.sweep_dir).is_dir():
            raise ConfigError("sweep_dir", cfg.sweep_dir, "no such directory")
        paths = sorted(glob.glob(f"{cfg.sweep_dir}/**/checkpoints/epoch_*.ckpt", recursive=True))
        if not paths:
            raise ConfigError("sweep_dir", cfg.sweep_dir, "holds no */checkpoints/epoch_*.ckpt")
    elif cfg.get("ckpt_glob"):
        paths = sorted(glob.glob(cfg.ckpt_glob, recursive=True))
        if not paths:
            raise ConfigError("ckpt_glob", cfg.ckpt_glob, "matches no file")
    elif cfg.get("ckpt"):
        paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    else:
        raise ConfigError("ckpt", None, "give ckpt=PATH, 'ckpt=[A,B]' or ckpt_glob=PATTERN")
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError("ckpt", str(path), "no such checkpoint file")
    return [Path(p) for p in paths]


def grid_for(cfg: DictConfig, train_sigma: float) -> RobustnessGrid:
    """The robustness grid, with ``train`` in ``sigmas`` replaced by ``train_sigma``."""
    r = cfg.robustness
    sigmas = [train_sigma if s == TRAIN_SIGMA else s for s in r.sigmas]
    with config_scope("robustness"):
        return RobustnessGrid(
            sigmas=list(dict.fromkeys(sigmas)),
            mean_shifts=list(r.mean_shifts),
            adc_levels=list(r.adc_levels),
            chips=r.chips,
        )


def load_subjects(cfg: DictConfig, paths: list[Path], device: torch.device) -> list[Subject]:
    subjects = []
    for path in paths:
        model = AnalogClassifier.load_from_checkpoint(path, map_location=device, weights_only=False)
        subjects.append(
            Subject(
                model.label,
                model.net.to(device).eval(),
                grid_for(cfg, model.chip.sigma),
                ckpt=str(path),
            )
        )
    labels = [s.label for s in subjects]
    for s in subjects:  # same recipe twice (e.g. two seeds): tell them apart by run folder
        if labels.count(s.label) > 1:
            s.label = f"{s.label} ({Path(s.ckpt).parent.parent.name})"
    return subjects


def load_datamodule(cfg: DictConfig, path: Path):
    """``cfg.data`` if given, else the data the checkpoint was trained on."""
    spec = cfg.get("data")
    if spec is None:
        spec = torch.load(path, map_location="cpu", weights_only=False).get("datamodule")
        if spec is None:
            raise ConfigError("data", None, f"{path} does not record its data: pass data=NAME")
    with config_scope("data"):
        datamodule = instantiate(spec)
    datamodule.setup("test")
    return datamodule


def evaluate(cfg: DictConfig):
    """Run the study and write its files; returns the ``RobustnessResult`` (on every rank)."""
    paths = checkpoint_paths(cfg)
    grid_for(cfg, 0.0)  # validate the grid before loading anything
    check_choice("robustness.x", cfg.robustness.x, SWEEPS)
    check_choice("accelerator", cfg.accelerator, ACCELERATORS)
    check_int("devices", cfg.devices, minimum=1)
    check_int("num_nodes", cfg.num_nodes, minimum=1)
    fabric = launch(cfg)
    datamodule = load_datamodule(cfg, paths[0])
    subjects = load_subjects(cfg, paths, fabric.device)
    r = cfg.robustness
    ev = Evaluation(
        datamodule.test_dataloader(),
        cfg.seed,
        datamodule.val_dataloader(),
        r.max_batches,
        r.calib_batches,
        cfg.progress,
        fabric.global_rank,
        fabric.world_size,
    )
    title = f"{r.name}: {r.chips} chips per point, seed {cfg.seed}"
    result, files = run_study(subjects, ev, cfg.paths.output_dir, r.x, title=title)
    if files is None:  # not rank 0
        return result
    run = start_wandb(cfg)
    if run is not None:
        log_robustness(result.summary, result.rows, r.x, files.plot)
        run.finish()
    print(format_summary(result.summary))
    for name, path in vars(files).items():
        print(f"{name:<8}: {path}")
    return result


def launch(cfg: DictConfig) -> Fabric:
    """One process per device (Lightning Fabric DDP); each evaluates a share of the chips."""
    accelerator = "cuda" if cfg.accelerator == "gpu" else cfg.accelerator
    processes = cfg.devices * cfg.num_nodes
    fabric = Fabric(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="ddp" if processes > 1 else "auto",
    )
    fabric.launch()
    return fabric


def start_wandb(cfg: DictConfig):
    if not cfg.wandb.enabled:
        return None
    import wandb

    default_wandb_mode()
    return wandb.init(
        project=cfg.wandb.project,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags),
        job_type="evaluate",
        name=f"evaluate/{cfg.run_name}",
        dir=cfg.paths.output_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
