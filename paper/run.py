"""One training or one study of the plan: its overrides, its checks, and a resumable run of it."""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from cimsim import ConfigError
from cimsim.chip.devices import load_plugins
from cimsim.cli import evaluate as evaluate_cli
from cimsim.cli import train as train_cli
from cimsim.files import atomic_write, file_sha256
from cimsim.robustness.rows import ROWS_FILE
from cimsim.training.methods import training_passes
from cimsim.validation import check_int
from paper.configs import ROOT, compose_cfg, composed, config_sha256, without_teacher
from paper.evidence import STUDY_MARKER, read_json
from paper.plan import RUN, Run, Study, base_of, seeded_runs
from paper.report import git_commit, machine

EVALUATE_KEYS = (
    "robustness",
    "chip",
    "accelerator",
    "devices",
    "num_nodes",
    "progress",
    "wandb",
    "overwrite",
)
# Keys both get: the plug-in modules (devices, methods) the trainings and the studies' checkpoints
# need.
SHARED_KEYS = ("plugins",)
# Trainings: CSV logs beside the checkpoints, no end-of-fit sweep (the studies measure every
# model on the same chips), no Hessian monitor, the test set left to the studies.
TRAIN_DEFAULTS = [
    "logger=csv",
    "callbacks.robustness=null",
    "callbacks.hessian=null",
    "test=false",
    "+trainer.enable_progress_bar=false",
]
# overwrite=true: a study's done.json decides when it is redone; evaluate.py still resumes the
# same call's rows and replaces only another call's files in the study's folder.
EVALUATE_DEFAULTS = ["wandb.enabled=false", "progress=false", "overwrite=true"]
# --tiny: one epoch of two batches of a width-1 network, 2 chips on one test batch.
TINY_TRAIN = [
    "model.widen_factor=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "val_chips=1",
    "val_calib_batches=1",
]
TINY_EVALUATE = ["robustness.calib_batches=1"]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(training overrides, evaluation overrides), by the override's top-level key
    (``plugins=[module]`` goes to both)."""
    train, evaluate = [], []
    for o in overrides:
        if "=" not in o:
            raise ConfigError("override", o, "a Hydra override is KEY=VALUE")
        key = _key(o).split(".")[0]
        if key in SHARED_KEYS:
            train.append(o)
        (evaluate if key in EVALUATE_KEYS + SHARED_KEYS else train).append(o)
    return train, evaluate


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def plugin_modules(overrides: list[str]) -> list[str]:
    """The modules the last ``plugins=[...]`` of ``overrides`` names (none: ``[]``); one that
    does not parse as a list is left to composing and ``load_plugins`` to refuse."""
    modules: list[str] = []
    for o in overrides:
        if _key(o) != "plugins":
            continue
        try:
            parsed = OverridesParser.create().parse_overrides([o])[0]
        except HydraException:
            continue
        value = None if parsed.is_delete() else parsed.value()
        modules = [str(m) for m in value] if isinstance(value, list) else []
    return modules


class Progress:
    """One line per stage: what, how many done and left, elapsed time."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def __call__(self, what: str) -> None:
        elapsed = time.time() - self.start
        left = self.total - self.done
        print(
            f"[reproduce {self.done}/{self.total} done, {left} left, "
            f"{elapsed // 60:.0f}m{elapsed % 60:02.0f}s] {what}",
            flush=True,
        )


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint chosen on validation (``epoch_*.ckpt``; ``last.ckpt`` without one)."""
    best = sorted(glob.glob(str(run_dir / "checkpoints" / "epoch_*.ckpt")), key=os.path.getmtime)
    return Path(best[-1]) if best else run_dir / "checkpoints" / "last.ckpt"


def write_json(path: Path, doc: dict) -> None:
    atomic_write(path, json.dumps(doc, indent=1) + "\n")


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def train_overrides(run: Run, args, overrides: list[str], out: Path) -> list[str]:
    """Every override of ``run``'s training: the plan's, the run's own, --tiny's, the user's."""
    tiny = TINY_TRAIN if args.tiny else []
    full = [*TRAIN_DEFAULTS, *run.resolved(args.epochs), *tiny, *overrides]
    if run.teacher:  # the teacher of the same training seed
        full.append(f"distill.teacher={out / 'train' / run.teacher / 'checkpoints' / 'last.ckpt'}")
    return full


def train_run(run: Run, args, overrides: list[str], out: Path, progress: Progress) -> dict:
    """Train ``run`` unless ``done.json`` says it finished with the same overrides; resume it
    from ``last.ckpt`` when interrupted, if its ``started.json`` names the same overrides.
    Returns its record (``done.json``)."""
    run_dir = out / "train" / run.name
    marker, started = run_dir / "done.json", run_dir / "started.json"
    full = train_overrides(run, args, overrides, out)
    commit = git_commit(ROOT)
    cfg = composed("train", run_dir, full, overrides)
    load_plugins(cfg.get("plugins"))  # its methods' settings: training_methods after fitting
    cfg_hash = config_sha256(cfg)

    def refuse(record: dict, what: str) -> None:
        if record.get("overrides") != full:
            old, new = record.get("overrides") or [], full
            gone = [o for o in old if o not in new]
            added = [o for o in new if o not in old]
            why = (
                f"holds {run.name} {what} with other overrides (only there: {gone}; only now: "
                f"{added}): use another --out or delete that run"
            )
            raise ConfigError("--out", str(out), why)

    if marker.exists():
        record = json.loads(marker.read_text())
        refuse(record, "trained")
        for key, now in (("config_sha256", cfg_hash), ("commit", commit)):
            if record.get(key) is not None and record[key] != now:
                warn(f"{run.name} was trained with {key} {record[key]}, now {now}; reused")
        progress(f"train {run.name}: done before, reused")
        return {**record, "reused": True}
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = [f"ckpt_path={last}"] if last.is_file() else []
    if resume:
        if started.exists():
            refuse(json.loads(started.read_text()), "started (interrupted, not resumed)")
        else:
            warn(f"{run.name}: resuming {last} without started.json (its overrides unchecked)")
    write_json(started, {"overrides": full, "config_sha256": cfg_hash, "commit": commit})
    progress(f"train {run.name}" + (" (resuming from last.ckpt)" if resume else ""))
    if resume:
        cfg = compose_cfg("train", run_dir, full + resume)
    start = time.time()
    train_cli.train(cfg)
    best = best_checkpoint(run_dir)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    end = torch.load(last, map_location="cpu", weights_only=True)
    methods = train_cli.training_methods(cfg)
    record = {
        "overrides": full,
        "wall_s": time.time() - start,
        "resumed": bool(resume),  # wall_s then misses the interrupted part
        "commit": commit,
        "machine": machine(),
        "config_sha256": cfg_hash,
        "epochs": cfg.trainer.max_epochs,
        "L": cfg.hasgd.L,
        "sigma": cfg.noise.sigma,
        "best": str(best),
        "global_step": ckpt.get("global_step"),
        "passes": training_passes(ckpt.get("global_step", 0), cfg.hasgd.L, methods),
        "last": str(last),
        "last_global_step": end.get("global_step"),
        "last_passes": training_passes(end.get("global_step", 0), cfg.hasgd.L, methods),
        "schedule": schedule_of(cfg),
    }
    write_json(marker, record)  # last: its presence means the training finished
    return {**record, "reused": False}


def schedule_of(cfg: DictConfig) -> dict:
    """A training's learning-rate schedule: the rate, the epochs and the scheduler's settings
    (``scheduler``: its class name; StepLR's ``step_size``/``gamma``, cosine's ``T_max``)."""
    sched = OmegaConf.to_container(cfg.hasgd.scheduler, resolve=True)
    settings = {k: v for k, v in sched.items() if not k.startswith("_")}
    return {
        "lr": cfg.hasgd.optimizer.lr,
        "scheduler": str(sched.get("_target_", "")).rsplit(".", 1)[-1],
        "interval": cfg.hasgd.get("scheduler_interval", "epoch"),
        **settings,
        "max_epochs": cfg.trainer.max_epochs,
    }


def study_checkpoint(study: Study, run_dir: Path) -> Path:
    """The checkpoint ``study`` evaluates: the run's ``last.ckpt`` (fixed budget) or the best."""
    return run_dir / "checkpoints" / "last.ckpt" if study.last else best_checkpoint(run_dir)


def study_overrides(
    study: Study, args, overrides: list[str], out: Path
) -> tuple[dict[str, str], list[str]]:
    """({run: checkpoint}, every override of ``study``'s evaluate.py call)."""
    names = seeded_runs(study, args.seeds)
    ckpts = {r: str(study_checkpoint(study, out / "train" / r)) for r in names}
    limits = [f"robustness.chips={study_chips(study, args.chips)}"]
    if args.max_batches is not None:
        limits.append(f"robustness.max_batches={args.max_batches}")
    tiny = [*study.tiny, *TINY_EVALUATE] if args.tiny else []
    full = [
        f"ckpt=[{','.join(ckpts.values())}]",
        *EVALUATE_DEFAULTS,
        *study.overrides,
        *limits,
        *tiny,
        *overrides,
    ]
    # The runs' plug-ins (their plan's, or the user's plugins=, which the trainings got too):
    # the studies load their checkpoints' devices and methods from them.
    mine = [o for o in overrides if _key(o) in SHARED_KEYS]
    modules = plugin_modules(full)
    for r in names:
        base, k = base_of(r)
        trained = plugin_modules(train_overrides(RUN[base].seeded(k), args, mine, out))
        modules += [m for m in trained if m not in modules]
    if modules != plugin_modules(full):
        full.append(f"plugins=[{','.join(modules)}]")
    return ckpts, full


def study_chips(study: Study, chips: int) -> int:
    """The chips per point ``study`` measures: ``--chips``, at most the study's own cap."""
    return chips if study.chips is None else min(chips, study.chips)


def check_training(cfg: DictConfig) -> None:
    """train.py's checks of a run that need neither data nor a model: the chip, L and the
    training methods with the chip (a distillation teacher is only planned: not checked)."""
    load_plugins(cfg.get("plugins"))  # plug-in devices and methods, as train.py loads them
    train_cli.check_settings(cfg)  # unset values, seed, val_chips, trainer.max_epochs
    chip = train_cli.chip_config(cfg)
    check_int("hasgd.L", cfg.hasgd.L, minimum=1)
    train_cli.training_methods(without_teacher(cfg)).check(chip, cfg.hasgd.L)


def check_study(cfg: DictConfig) -> None:
    """evaluate.py's checks of a study that need neither data nor a checkpoint."""
    load_plugins(cfg.get("plugins"))  # as evaluate.py: chip.<plug-in device> settings
    evaluate_cli.check_settings(cfg)


def run_study(study: Study, args, overrides: list[str], out: Path, progress: Progress) -> bool:
    """One evaluate.py study over the study's runs' checkpoints (resumes from its rows), unless
    its marker records the same call on the same checkpoint files; then writes the marker.
    Returns whether it ran."""
    ckpts, full = study_overrides(study, args, overrides, out)
    sha = {r: file_sha256(p) for r, p in ckpts.items()}
    study_dir = out / "evaluate" / study.name
    marker, rows = study_dir / STUDY_MARKER, study_dir / ROWS_FILE
    record = read_json(marker)
    if rows.exists() and record.get("overrides") == full and record.get("sha256") == sha:
        progress(f"evaluate {study.name}: done before, reused")
        return False
    marker.unlink(missing_ok=True)
    before = rows.exists() and rows.stat().st_size > 0
    progress(f"evaluate {study.name}: {len(study.runs)} models x {args.seeds} seeds")
    cfg = composed("evaluate", study_dir, full, overrides)
    grid = OmegaConf.to_container(cfg.robustness, resolve=True)
    start = time.time()
    evaluate_cli.evaluate(cfg)
    record = {
        "overrides": full,
        "ckpts": ckpts,
        "sha256": sha,
        "grid": {k: grid.get(k) for k in ("sigmas", "mean_shifts", "adc_levels", "times")},
        "seed": cfg.seed,
        "chips": study_chips(study, args.chips),
        "wall_s": time.time() - start,
        "resumed": before,  # rows there before: wall_s misses their time
        "commit": git_commit(ROOT),
        "machine": machine(),
    }
    write_json(marker, record)
    return True
