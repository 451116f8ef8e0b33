"""Regenerate the results report, docs/results.md and docs/results/: every training and Monte
Carlo study it needs, then the report from their rows (``paper.results``).

    python reproduce.py                              # digits, WRN-10-2 (~15-20 min on 2 CPUs)
    python reproduce.py --tiny                       # the smoke version (seconds per stage)
    python reproduce.py experiment=paper_wrn28_10_cifar100 data.download=true --epochs 200
                                                     # paper scale (a GPU)

Where it writes: the trainings and studies under ``--out`` (default outputs/reproduce), the
report into ``--report-dir`` (default the repository's docs/). ``--tiny`` is a smoke test, so it
keeps away from both: its default ``--out`` is outputs/reproduce-tiny and its report goes to
``<out>/report`` (outputs/reproduce-tiny/report/results.md). A ``--tiny`` report is refused
inside docs/ (it would replace the committed report and its figures with smoke-test numbers)
unless ``--force`` says so.

Resumable: rerun the same command after an interruption. A finished training (``done.json``
beside its checkpoints, written last) is skipped, an interrupted one resumes from its
``last.ckpt`` if its ``started.json`` names the same overrides, and a study whose marker
(``done.json``) records the same call on the same checkpoint files is skipped; otherwise it
resumes from its ``robustness_rows.csv`` (``evaluate.py``).

Hydra overrides after the options go to every training (``data=``, ``model=``, ``trainer=``,
``hasgd.*``, ...), except those of evaluate.py's own keys (``robustness.*``, ``chip.*``,
``accelerator``, ``devices``, ``num_nodes``, ``progress``, ``wandb.*``), which go to every
study. Evaluations always read the data each checkpoint was trained on. Every training's and
study's config is composed and checked before the first training starts: a bad option or
override fails at once, in one line naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

import evaluate as evaluate_cli
import train as train_cli
from cimsim import ConfigError
from cimsim.robustness.study import training_passes
from cimsim.validation import check_int
from paper.results import (
    RUNS,
    STUDIES,
    STUDY_MARKER,
    Run,
    Study,
    atomic_write,
    file_sha256,
    git_commit,
    machine,
    read_json,
    write_report,
)

ROOT = Path(__file__).resolve().parent
DOCS = ROOT / "docs"  # the committed report: only the full plan writes here by default
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


def compose_cfg(config_name: str, out_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The real config as the CLI composes it, with its run directory set to ``out_dir`` (the
    tests compose theirs with it too)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def override_error(override: str, err: HydraException, config_name: str) -> ConfigError:
    """Hydra's error for the user's ``override`` as one line: its key, its value, what is wrong."""
    key, _, value = override.partition("=")
    if isinstance(err, MissingConfigException) and err.options:
        why = f"no such {key} config; allowed values are {', '.join(err.options)}"
    elif isinstance(err.__cause__, ConfigAttributeError | ConfigKeyError):
        why = f"no such key in conf/{config_name}.yaml or its groups (a new key: +{override})"
    elif isinstance(err, OverrideParseException):
        why = f"does not parse as a Hydra override ({str(err).splitlines()[0]})"
    else:
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return ConfigError(key, value, why)


# check_plan composes every config once (~0.2 s each); the trainings and studies reuse them
COMPOSED: dict[tuple, DictConfig] = {}


def composed(config_name: str, out_dir: Path, overrides: list[str], mine: list[str]) -> DictConfig:
    """``compose_cfg``, composed once per distinct call (later ones get a copy); when Hydra
    refuses, the ``ConfigError`` names the user's override (one of ``mine``) that it refuses."""
    key = (config_name, str(out_dir), tuple(overrides))
    if key not in COMPOSED:
        COMPOSED[key] = checked_compose(config_name, out_dir, overrides, mine)
    cfg = copy.deepcopy(COMPOSED[key])
    HydraConfig().set_config(cfg)  # as compose_cfg does: ${hydra:...} resolves from it
    return cfg


def checked_compose(config_name: str, out_dir: Path, overrides: list[str], mine: list[str]):
    """``compose_cfg``, a Hydra error blamed on the one of ``mine`` that Hydra refuses alone
    (composed with the plan's overrides)."""
    try:
        return compose_cfg(config_name, out_dir, overrides)
    except HydraException:
        plan = [o for o in overrides if o not in mine]
        for o in mine:
            try:
                compose_cfg(config_name, out_dir, [*plan, o])
            except HydraException as err:
                raise override_error(o, err, config_name) from None
        raise  # none of the user's alone: the plan itself is broken, a bug worth its traceback


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(training overrides, evaluation overrides), by the override's top-level key."""
    train, evaluate = [], []
    for o in overrides:
        if "=" not in o:
            raise ConfigError("override", o, "a Hydra override is KEY=VALUE")
        key = o.split("=", 1)[0].lstrip("+~").split(".")[0]
        (evaluate if key in EVALUATE_KEYS else train).append(o)
    return train, evaluate


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
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))


def config_sha256(cfg: DictConfig) -> str:
    """A hash of the resolved config, Hydra's own node left out."""
    doc = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def train_overrides(run: Run, args, overrides: list[str], out: Path) -> list[str]:
    """Every override of ``run``'s training: the plan's, the run's own, --tiny's, the user's."""
    tiny = TINY_TRAIN if args.tiny else []
    full = [*TRAIN_DEFAULTS, *run.resolved(args.epochs), *tiny, *overrides]
    if run.teacher:
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
        "schedule": {
            "lr": cfg.hasgd.optimizer.lr,
            "step_size": cfg.hasgd.scheduler.step_size,
            "gamma": cfg.hasgd.scheduler.gamma,
            "max_epochs": cfg.trainer.max_epochs,
        },
    }
    write_json(marker, record)  # last: its presence means the training finished
    return {**record, "reused": False}


def study_checkpoint(study: Study, run_dir: Path) -> Path:
    """The checkpoint ``study`` evaluates: the run's ``last.ckpt`` (fixed budget) or the best."""
    return run_dir / "checkpoints" / "last.ckpt" if study.last else best_checkpoint(run_dir)


def study_overrides(
    study: Study, args, overrides: list[str], out: Path
) -> tuple[dict[str, str], list[str]]:
    """({run: checkpoint}, every override of ``study``'s evaluate.py call)."""
    ckpts = {r: str(study_checkpoint(study, out / "train" / r)) for r in study.runs}
    limits = [f"robustness.chips={args.chips}"]
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
    return ckpts, full


def check_training(cfg: DictConfig) -> None:
    """train.py's checks of a run that need neither data nor a model: the chip, L and the
    training methods with the chip (a distillation teacher is only planned: not checked)."""
    train_cli.check_settings(cfg)  # unset values, seed, val_chips, trainer.max_epochs
    chip = train_cli.chip_config(cfg)
    check_int("hasgd.L", cfg.hasgd.L, minimum=1)
    methods = cfg.copy()
    with open_dict(methods):
        methods.distill = {**OmegaConf.to_container(cfg.get("distill") or {}), "teacher": None}
    train_cli.training_methods(methods).check(chip, cfg.hasgd.L)


def check_plan(args, train_over: list[str], eval_over: list[str], out: Path) -> None:
    """Compose and check every training's and study's config before the first training, so a
    bad override fails in seconds, naming itself, not after the trainings before it."""
    for run in RUNS:
        full = train_overrides(run, args, train_over, out)
        check_training(composed("train", out / "train" / run.name, full, train_over))
    for study in STUDIES:
        _, full = study_overrides(study, args, eval_over, out)
        cfg = composed("evaluate", out / "evaluate" / study.name, full, eval_over)
        evaluate_cli.check_settings(cfg)


def run_study(study: Study, args, overrides: list[str], out: Path, progress: Progress) -> bool:
    """One evaluate.py study over the study's runs' checkpoints (resumes from its rows), unless
    its marker records the same call on the same checkpoint files; then writes the marker.
    Returns whether it ran."""
    ckpts, full = study_overrides(study, args, overrides, out)
    sha = {r: file_sha256(p) for r, p in ckpts.items()}
    study_dir = out / "evaluate" / study.name
    marker, rows = study_dir / STUDY_MARKER, study_dir / "robustness_rows.csv"
    record = read_json(marker)
    if rows.exists() and record.get("overrides") == full and record.get("sha256") == sha:
        progress(f"evaluate {study.name}: done before, reused")
        return False
    marker.unlink(missing_ok=True)
    before = rows.exists() and rows.stat().st_size > 0
    progress(f"evaluate {study.name}: {len(study.runs)} models")
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
        "chips": args.chips,
        "wall_s": time.time() - start,
        "resumed": before,  # rows there before: wall_s misses their time
        "commit": git_commit(ROOT),
        "machine": machine(),
    }
    write_json(marker, record)
    return True


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, exit status 2 (``--help`` shows the usage)."""

    def error(self, message: str):
        print(f"config error: {message} (python reproduce.py --help)", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options with their defaults resolved, the Hydra overrides). ``--tiny`` changes the
    defaults (``--help`` lists them) and keeps its report out of docs/ unless ``--force``."""
    parser = Parser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Hydra overrides (KEY=VALUE), e.g. data=cifar100.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the trainings and studies go (default outputs/reproduce; "
        "--tiny: outputs/reproduce-tiny)",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="where results.md and results/ go (default the repository's docs/; --tiny: "
        "<out>/report, and docs/ only with --force)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="base epochs of every training (default 10; --tiny: 1)",
    )
    parser.add_argument(
        "--chips", type=int, default=None, help="chips per grid point (default 20; --tiny: 2)"
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="test batches per chip (default all; --tiny: 1)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a smoke test: 1 epoch of 2 batches, width 1, 2 chips, 1 test batch, short grids",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="let a --tiny report replace the committed one (--report-dir docs)",
    )
    args, overrides = parser.parse_known_args(argv)
    for o in overrides:
        if o.startswith("-"):
            parser.error(f"unknown option {o}")
    tiny = args.tiny
    args.epochs = args.epochs if args.epochs is not None else (1 if tiny else 10)
    args.chips = args.chips if args.chips is not None else (2 if tiny else 20)
    if args.max_batches is None and tiny:
        args.max_batches = 1
    for key in ("epochs", "chips", "max_batches"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}", value, "must be an integer >= 1")
    args.out = args.out or Path("outputs/reproduce-tiny" if tiny else "outputs/reproduce")
    args.report_dir = args.report_dir or (args.out / "report" if tiny else DOCS)
    if tiny and not args.force and args.report_dir.resolve().is_relative_to(DOCS.resolve()):
        why = (
            "a --tiny report would replace the committed report in docs/ with smoke-test "
            "numbers: give another folder, or add --force"
        )
        raise ConfigError("--report-dir", str(args.report_dir), why)
    return args, overrides


def reproduce(argv: list[str]) -> dict:
    """Check the whole plan, run every training and study, then write the report; returns
    what was trained/reused."""
    start = time.time()
    args, overrides = parse(argv)
    train_over, eval_over = split_overrides(overrides)
    out = args.out.resolve()
    check_plan(args, train_over, eval_over, out)
    scale = "--tiny, a smoke test: docs/ is left alone; " if args.tiny else ""
    print(f"[reproduce] {scale}runs under {out}/, report to {args.report_dir}/", flush=True)
    progress = Progress(len(RUNS) + len(STUDIES) + 1)
    records = {}
    for run in RUNS:  # in order: the digital model (a distillation teacher) first
        records[run.name] = train_run(run, args, train_over, out, progress)
        progress.done += 1
    runs = {name: {k: v for k, v in r.items() if k != "reused"} for name, r in records.items()}
    longest = max(runs.values(), key=lambda r: r["schedule"]["max_epochs"])
    write_json(out / "manifest.json", {"runs": runs, "schedule": longest["schedule"]})
    studied = 0
    for study in STUDIES:
        studied += run_study(study, args, eval_over, out, progress)
        progress.done += 1
    progress("report")
    meta = {
        "command": shlex.join(["python", "reproduce.py", *argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - start,
        "trained": sum(not r["reused"] for r in records.values()),
        "skipped": sum(r["reused"] for r in records.values()),
        "studied": studied,
        "studies_reused": len(STUDIES) - studied,
        "commit": git_commit(ROOT),
        "machine": machine(),
        "chips": args.chips,
        "scale": "tiny (smoke test)" if args.tiny else f"base epochs {args.epochs}",
    }
    report = write_report(out, args.report_dir, meta)
    progress.done += 1
    progress(f"wrote {report} and {args.report_dir / 'results'}/")
    return meta


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        reproduce(sys.argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
