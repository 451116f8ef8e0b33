"""Regenerate the results report, docs/results.md and docs/results/: every training and Monte
Carlo study it needs, then the report from their rows (the plan and its sections: ``paper/``).

    python reproduce.py                              # digits, WRN-10-2 (~15-20 min on 2 CPUs)
    python reproduce.py --tiny                       # the smoke version (seconds per stage)
    python reproduce.py --report-only                # the report again, from the rows on disk
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
study; ``plugins=[...]`` goes to both. Evaluations always read the data each checkpoint was
trained on. Every training's and study's config is composed and checked before the first
training starts: a bad option or override fails at once, in one line naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cimsim import ConfigError
from paper.configs import compose_cfg  # noqa: F401  (tests/conftest.py composes with it)
from paper.driver import report_only, run_plan, settle


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
        "--report-only",
        action="store_true",
        help="re-render the report from the rows and records already under --out (trains "
        "and measures nothing)",
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
    return settle(args), overrides


def reproduce(argv: list[str]) -> dict:
    """Check the whole plan, run every training and study, then write the report (only the
    report with ``--report-only``); returns what was trained/reused."""
    start = time.time()
    args, overrides = parse(argv)
    if args.report_only:
        return report_only(args, overrides, argv, start)
    return run_plan(args, overrides, argv, start)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        reproduce(sys.argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
