"""The whole plan as reproduce.py runs it: options, checks first, trainings, studies, report."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cimsim import ConfigError
from cimsim.validation import config_scope
from paper.configs import ROOT, composed
from paper.evidence import read_json
from paper.parallel import Line, Task, run_tasks, threads_per_job
from paper.plan import SEED0, planned_runs, restricted, selected
from paper.publish import EVIDENCE
from paper.report import git_commit, machine, render_published, write_report
from paper.run import (
    Progress,
    check_study,
    check_training,
    run_study,
    split_overrides,
    study_overrides,
    train_overrides,
    train_run,
    write_json,
)

DOCS = ROOT / "docs"  # the committed report: only the full plan writes here by default
REPORT_META = "report.json"  # the report's provenance, beside manifest.json (--report-only)
# a study's grid axes (their lengths multiply into its points)
GRID_KEYS = ("sigmas", "mean_shifts", "adc_levels", "times", "variants", "fault_rates")
GRID_KEYS += ("compensations",)


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """The options with their defaults resolved: ``--tiny`` changes them, and keeps its report
    out of docs/ unless ``--force``."""
    tiny = args.tiny
    args.given = {k for k in ("epochs", "chips", "seeds", "sections", "models") if getattr(args, k)}
    args.epochs = args.epochs if args.epochs is not None else (1 if tiny else 10)
    args.chips = args.chips if args.chips is not None else (2 if tiny else 20)
    args.seeds = args.seeds if args.seeds is not None else (2 if tiny else 3)
    if args.max_batches is None and tiny:
        args.max_batches = 1
    try:
        args.sections = selected(args.sections)
    except ValueError as err:
        raise ConfigError("--sections", ",".join(args.sections), str(err)) from None
    try:
        args.sections = restricted(args.sections, args.models)
    except ValueError as err:
        raise ConfigError("--models", ",".join(args.models), str(err)) from None
    if args.report_name is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", args.report_name):
        why = "must be a file name of letters, digits, _ and - (the report is <report-dir>/NAME.md)"
        raise ConfigError("--report-name", args.report_name, why)
    for key in ("epochs", "chips", "max_batches", "seeds", "jobs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}", value, "must be an integer >= 1")
    args.out = args.out or Path("outputs/reproduce-tiny" if tiny else "outputs/reproduce")
    args.report_dir = args.report_dir or (args.out / "report" if tiny else DOCS)
    into_docs = args.report_dir.resolve().is_relative_to(DOCS.resolve())
    if (tiny or args.from_published is not None) and into_docs and not args.force:
        what = "--tiny report" if tiny else "report rendered from published evidence"
        why = (
            f"a {what} would replace the committed report in docs/ (and the README's excerpt): "
            "give another --report-dir, or add --force"
        )
        raise ConfigError("--report-dir", str(args.report_dir), why)
    if args.models is not None and into_docs and (args.report_name or "results") == "results":
        if not args.force and not args.report_only:
            why = (
                "a plan cut by --models would replace the committed report docs/results.md: "
                "give it its own --report-name (or --report-dir), or add --force"
            )
            raise ConfigError("--models", ",".join(args.models), why)
    return args


def check_report_name(report_dir: Path, name: str, force: bool) -> None:
    """Refuse a report name that would overwrite a file of ``report_dir`` that is not a report
    (a guide such as docs/model.md): a report has its published evidence beside it."""
    page, record = report_dir / f"{name}.md", report_dir / name / "evidence" / REPORT_META
    if page.is_file() and not record.is_file() and not force:
        why = f"{page} exists and is not a report (no {record}): choose another name"
        raise ConfigError("--report-name", name, why)


def plan_of(args) -> tuple[list, list]:
    """(the trainings, the studies) of the options' sections and seeds."""
    studies = [st for section in args.sections for st in section.studies]
    return planned_runs(args.sections, args.seeds), studies


def check_plan(args, train_over: list[str], eval_over: list[str], out: Path) -> dict[str, float]:
    """Compose and check every training's and study's config before the first training, so a
    bad override fails in seconds, naming itself, not after the trainings before it. Returns
    each one's cost (``--jobs``'s order): a training's epochs x L, a study's checkpoints x grid
    points x chips."""
    for o in train_over:
        if o.split("=", 1)[0].lstrip("+~") == "seed":
            why = f"reproduce.py trains seed {SEED0} + k for k < --seeds; give --seeds instead"
            raise ConfigError("seed", o.split("=", 1)[1], why)
    runs, studies = plan_of(args)
    costs = {}
    for run in runs:
        full = train_overrides(run, args, train_over, out)
        cfg = composed("train", out / "train" / run.name, full, train_over)
        check_training(cfg)
        costs[run.name] = float(cfg.trainer.max_epochs * cfg.hasgd.L)
    for study in studies:
        ckpts, full = study_overrides(study, args, eval_over, out)
        cfg = composed("evaluate", out / "evaluate" / study.name, full, eval_over)
        check_study(cfg)
        grid = OmegaConf.to_container(cfg.robustness, resolve=True)
        points = math.prod(len(v) for k in GRID_KEYS if isinstance(v := grid.get(k), list) and v)
        reads = grid.get("repetitions") or 1
        costs[study.name] = float(len(ckpts) * points * reads * (grid.get("chips") or 1))
    return costs


def command_meta(args, argv: list[str], start: float) -> dict:
    """This command's record for the report's header, before its counts."""
    return {
        "command": shlex.join(["python", "reproduce.py", *argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - start,
    }


def scale_meta(args, provenance: bool = True) -> dict:
    """The plan's scale for the report's header (with the commit and machine: ``provenance``)."""
    where = {"commit": git_commit(ROOT), "machine": machine()} if provenance else {}
    return {
        **where,
        "chips": args.chips,
        "seeds": args.seeds,
        "sections": [s.name for s in args.sections],
        "models": None if args.models is None else list(args.models),
        "report_name": args.report_name,
        "scale": "tiny (smoke test)" if args.tiny else f"base epochs {args.epochs}",
    }


def run_plan(args, overrides: list[str], argv: list[str], start: float) -> dict:
    """Check the whole plan, run every training and study, then write the report; returns
    what was trained/reused."""
    train_over, eval_over = split_overrides(overrides)
    out = args.out.resolve()
    args.report_name = args.report_name or "results"
    check_report_name(args.report_dir, args.report_name, args.force)
    costs = check_plan(args, train_over, eval_over, out)
    scale = "--tiny, a smoke test: docs/ is left alone; " if args.tiny else ""
    jobs = f", {args.jobs} at a time" if args.jobs > 1 else ""
    print(f"[reproduce] {scale}runs under {out}/{jobs}, report to {args.report_dir}/", flush=True)
    runs, studies = plan_of(args)
    progress = Progress(len(runs) + (0 if args.train_only else len(studies) + 1))
    if args.jobs > 1:
        prepare_data_once(runs[0], args, train_over, out)
    # in one process: seed by seed, in the plan's order (the digital model, a teacher, first)
    records = each(runs, train_run, (args, train_over, out), args, progress, costs, runs)
    runs = {name: {k: v for k, v in r.items() if k != "reused"} for name, r in records.items()}
    longest = max(runs.values(), key=lambda r: r["schedule"]["max_epochs"])
    write_json(out / "manifest.json", {"runs": runs, "schedule": longest["schedule"]})
    if args.train_only:
        progress("trained: --train-only, no studies (rerun without it to measure)")
        return {"trained": sum(not r["reused"] for r in records.values())}
    studied = sum(each(studies, run_study, (args, eval_over, out), args, progress, costs).values())
    progress("report")
    meta = {
        **command_meta(args, argv, start),
        "trained": sum(not r["reused"] for r in records.values()),
        "skipped": sum(r["reused"] for r in records.values()),
        "studied": studied,
        "studies_reused": len(studies) - studied,
        **scale_meta(args),
        "jobs": args.jobs,
        "threads": threads_per_job(args.jobs) if args.jobs > 1 else torch.get_num_threads(),
    }
    write_json(out / REPORT_META, meta)
    report = write_report(out, args.report_dir, meta)
    progress.done += 1
    progress(f"wrote {report} and {args.report_dir / args.report_name}/")
    return meta


def prepare_data_once(run, args, train_over: list[str], out: Path) -> None:
    """``--jobs``: the data prepared (``data.download=true``: downloaded) once, here, before the
    workers start: each would otherwise download into the same folder at the same time."""
    full = train_overrides(run, args, train_over, out)
    cfg = composed("train", out / "train" / run.name, full, train_over)
    with config_scope("data"):
        instantiate(cfg.data).prepare_data()


def needs(item, runs) -> tuple[str, ...]:
    """The trainings of ``runs`` that ``item`` waits for: a training's distillation teacher (same
    seed), if any and planned (one trained before, outside the plan, is on disk already)."""
    teacher = getattr(item, "teacher", None)
    return tuple(r.name for r in runs if r.name == teacher)


def each(items, call, tail: tuple, args, progress: Progress, costs: dict, runs=()) -> dict:
    """``call(item, *tail, progress)`` for each of ``items`` (trainings or studies), its result by
    name in ``items``' order: in this process, in that order (``--jobs 1``), or in ``--jobs``
    worker processes (``paper.parallel``), a training after its teacher among ``runs``."""
    if args.jobs == 1:
        done = {}
        for item in items:
            done[item.name] = call(item, *tail, progress)
            progress.done += 1
        return done

    def finished(what: str) -> None:
        progress.done += 1
        progress(what)

    tasks = [Task(i.name, call, (i, *tail, Line()), costs[i.name], needs(i, runs)) for i in items]
    done = run_tasks(tasks, args.jobs, finished)
    return {i.name: done[i.name] for i in items}


def report_only(args, overrides: list[str], argv: list[str], start: float) -> dict:
    """Write the report again from the rows, markers and manifest under ``--out``, with the
    provenance of the command that measured them (``report.json``), or this command's."""
    if overrides:
        raise ConfigError("--report-only", shlex.join(overrides), "takes no Hydra overrides")
    if args.from_published is not None:
        return from_published(args, args.from_published, args.report_dir)
    out = args.out.resolve()
    if not (out / "manifest.json").is_file():
        why = "holds no trained plan (no manifest.json): run reproduce.py without --report-only"
        raise ConfigError("--out", str(args.out), why)
    runs, studies = plan_of(args)
    meta = read_json(out / REPORT_META) or {
        **command_meta(args, argv, start),
        "trained": 0,
        "skipped": len(runs),
        "studied": 0,
        "studies_reused": len(studies),
        **scale_meta(args),
    }
    check_recorded(args, meta, out)
    name = name_to_write(args, meta, f"{out} was measured for the report", "--report-only")
    check_report_name(args.report_dir, name, args.force)
    meta = {**meta, "report_name": name}
    report = write_report(out, args.report_dir, meta)
    print(f"[reproduce] wrote {report} and {report.with_suffix('')}/ from {out}/", flush=True)
    return meta


def name_to_write(args, meta: dict, whose: str, option: str) -> str:
    """The report's name: ``--report-name``, else the recorded one; another name than the
    recorded one only with ``--force`` (the rows were measured for that report)."""
    recorded = meta.get("report_name") or "results"
    name = args.report_name or recorded
    if name != recorded and not args.force:
        why = (
            f"{whose} {recorded!r}: {option} writes that one (leave --report-name out), or add "
            "--force to write it under another name"
        )
        raise ConfigError("--report-name", name, why)
    return name


def check_recorded(args, meta: dict, out: Path) -> None:
    """``--report-only`` measures nothing: refuse a plan option that differs from the one the
    rows under ``out`` were measured with, rather than report them under it silently."""
    now = scale_meta(args, provenance=False)
    now["epochs"] = now["scale"]  # "base epochs N", or a --tiny plan's scale
    for key in sorted(args.given):
        recorded = meta.get("scale" if key == "epochs" else key)
        if recorded is None:
            continue
        same = sorted(now[key]) == sorted(recorded) if key == "models" else now[key] == recorded
        if not same:
            show = [",".join(v) if isinstance(v, list) else str(v) for v in (recorded, now[key])]
            why = (
                f"the rows under {out} were measured with {show[0]}: --report-only reports "
                f"what was measured (leave --{key} out, or rerun without --report-only)"
            )
            raise ConfigError(f"--{key}", show[1] if isinstance(now[key], list) else now[key], why)


def from_published(args, evidence: Path, report_dir: Path) -> dict:
    """``--report-only --from-published EVIDENCE``: the report rendered from a published
    evidence folder alone (``paper.publish``; no checkpoint, data or plan folder); returns the
    record of the command that measured it."""
    if not (evidence / REPORT_META).is_file():
        why = (
            f"holds no published evidence (no {REPORT_META}): give the results/evidence/ folder "
            "that a report was written with, e.g. docs/results/evidence"
        )
        raise ConfigError("--from-published", str(evidence), why)
    meta = read_json(evidence / REPORT_META)
    check_recorded(args, meta, evidence)
    name = name_to_write(
        args, meta, f"{evidence} is the evidence of the report", "--from-published"
    )
    check_report_name(report_dir, name, force=False)  # never over a guide page
    target = report_dir / name / EVIDENCE  # the page's evidence beside it, as write_report's
    if target.resolve() != evidence.resolve():
        src, dst = evidence.resolve(), target.resolve()
        if dst.is_relative_to(src) or src.is_relative_to(dst):
            why = f"holds or lies in {target}, where the report's evidence is copied: choose apart"
            raise ConfigError("--report-dir", str(report_dir), why)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(evidence, target)
        write_json(target / REPORT_META, {**meta, "report_name": name})  # its own name
    report = render_published(evidence, report_dir, name)
    print(f"[reproduce] wrote {report} and {report.with_suffix('')}/ from {evidence}/", flush=True)
    return meta
