"""The whole plan as reproduce.py runs it: options, checks first, trainings, studies, report."""

from __future__ import annotations

import argparse
import shlex
import time
from datetime import datetime
from pathlib import Path

from cimsim import ConfigError
from paper.configs import ROOT, composed
from paper.evidence import read_json
from paper.plan import RUNS, STUDIES
from paper.report import git_commit, machine, write_report
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


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """The options with their defaults resolved: ``--tiny`` changes them, and keeps its report
    out of docs/ unless ``--force``."""
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
    return args


def check_plan(args, train_over: list[str], eval_over: list[str], out: Path) -> None:
    """Compose and check every training's and study's config before the first training, so a
    bad override fails in seconds, naming itself, not after the trainings before it."""
    for run in RUNS:
        full = train_overrides(run, args, train_over, out)
        check_training(composed("train", out / "train" / run.name, full, train_over))
    for study in STUDIES:
        _, full = study_overrides(study, args, eval_over, out)
        check_study(composed("evaluate", out / "evaluate" / study.name, full, eval_over))


def command_meta(args, argv: list[str], start: float) -> dict:
    """This command's record for the report's header, before its counts."""
    return {
        "command": shlex.join(["python", "reproduce.py", *argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - start,
    }


def scale_meta(args) -> dict:
    return {
        "commit": git_commit(ROOT),
        "machine": machine(),
        "chips": args.chips,
        "scale": "tiny (smoke test)" if args.tiny else f"base epochs {args.epochs}",
    }


def run_plan(args, overrides: list[str], argv: list[str], start: float) -> dict:
    """Check the whole plan, run every training and study, then write the report; returns
    what was trained/reused."""
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
        **command_meta(args, argv, start),
        "trained": sum(not r["reused"] for r in records.values()),
        "skipped": sum(r["reused"] for r in records.values()),
        "studied": studied,
        "studies_reused": len(STUDIES) - studied,
        **scale_meta(args),
    }
    write_json(out / REPORT_META, meta)
    report = write_report(out, args.report_dir, meta)
    progress.done += 1
    progress(f"wrote {report} and {args.report_dir / 'results'}/")
    return meta


def report_only(args, overrides: list[str], argv: list[str], start: float) -> dict:
    """Write the report again from the rows, markers and manifest under ``--out``, with the
    provenance of the command that measured them (``report.json``), or this command's."""
    if overrides:
        raise ConfigError("--report-only", shlex.join(overrides), "takes no Hydra overrides")
    out = args.out.resolve()
    if not (out / "manifest.json").is_file():
        why = "holds no trained plan (no manifest.json): run reproduce.py without --report-only"
        raise ConfigError("--out", str(args.out), why)
    meta = read_json(out / REPORT_META) or {
        **command_meta(args, argv, start),
        "trained": 0,
        "skipped": len(RUNS),
        "studied": 0,
        "studies_reused": len(STUDIES),
        **scale_meta(args),
    }
    report = write_report(out, args.report_dir, meta)
    print(f"[reproduce] wrote {report} and {args.report_dir / 'results'}/ from {out}/", flush=True)
    return meta
