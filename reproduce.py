"""Regenerate the results report, docs/results.md and docs/results/: every training and Monte
Carlo study it needs, then the report from their rows (the plan and its sections: ``paper/``).

    python reproduce.py --chips 10 --jobs 2          # digits, WRN-10-2, 3 seeds: docs/results.md
                                                     # (32 min on 2 CPUs, docs/scaling.md)
    python reproduce.py --tiny                       # the smoke version (seconds per stage)
    python reproduce.py --sections fig7,bias --seeds 5   # two sections, five training seeds
    python reproduce.py --train-only                 # train now, measure and report later
    python reproduce.py --report-only                # the report again, from the rows on disk
    python reproduce.py --report-only --from-published docs/results/evidence --report-dir /tmp/r
                                                     # ... from its published evidence alone
    python reproduce.py experiment=paper_wrn28_10_cifar100 data.download=true --epochs 200
                                                     # paper scale (a GPU)
    python reproduce.py --report-name results_cifar10_subset --models digital,sigma0.1_L4 \
        --sections fig7,hurts data=image_folder data.root=...   # a second report, a cut plan

Training seeds: every model is trained at seeds 42 + k for k < ``--seeds`` (default 3), in
folders ``<run>`` (k = 0) and ``<run>.s<k>``; every study measures every seed on the same chips,
and the report's means, CIs and verdicts are over seeds (each seed's mean over the chips, then a
Student-t CI; comparisons paired by seed). The data split is the same for every seed.

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

from cimsim import ConfigError
from paper import options
from paper.configs import compose_cfg  # noqa: F401  (tests/conftest.py composes with it)
from paper.driver import report_only, run_plan


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options with their defaults resolved, the Hydra overrides): ``paper.options``."""
    return options.parse(argv, __doc__)


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
