"""reproduce.py's command line: its options (argparse) and the Hydra overrides after them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paper.driver import settle


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, exit status 2 (``--help`` shows the usage)."""

    def error(self, message: str):
        print(f"config error: {message} (python reproduce.py --help)", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str], doc: str) -> tuple[argparse.Namespace, list[str]]:
    """(options with their defaults resolved, the Hydra overrides). ``--tiny`` changes the
    defaults (``--help`` lists them) and keeps its report out of docs/ unless ``--force``."""
    parser = Parser(
        description=doc.split("\n\n")[0],
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
        "--report-name",
        default=None,
        help="the report's name: <report-dir>/NAME.md, its figures and evidence in "
        "<report-dir>/NAME/ (default results; --report-only: the name the plan was measured "
        "for). A report on other data or a smaller plan (--models) takes its own name",
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
        "--seeds",
        type=int,
        default=None,
        help="training seeds of every model (default 3; --tiny: 2): seed 42 + k, k < SEEDS",
    )
    parser.add_argument(
        "--sections",
        type=lambda text: tuple(t for t in text.split(",") if t),
        default=None,
        help="only these sections (comma-separated, e.g. fig7,bias,hurts,fig9) and the "
        "trainings they need (default: all)",
    )
    parser.add_argument(
        "--models",
        type=lambda text: tuple(t for t in text.split(",") if t),
        default=None,
        help="only these of the sections' models (the plan's run names, comma-separated, e.g. "
        "digital,sigma0.1_L4): a smaller plan; each study measures those of its models it "
        "names, and a section says what it could not measure (default: all)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings (then studies) at a time, each in its own process with this process's "
        "torch threads shared out (default 1: all in this process). Small networks use 2 cores "
        "better as --jobs 2",
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="run the trainings only (a later call without it measures and reports)",
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
        "and measures nothing; --epochs/--chips/--seeds/--sections/--models, if given, must be "
        "those the rows were measured with)",
    )
    parser.add_argument(
        "--from-published",
        type=Path,
        default=None,
        metavar="EVIDENCE",
        help="with --report-only: render the report from a published evidence folder alone "
        "(e.g. docs/results/evidence; no checkpoints, data or --out needed)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="let a --tiny report, or one from --from-published, replace the committed one "
        "(--report-dir docs)",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.from_published is not None and not args.report_only:
        parser.error("--from-published needs --report-only")
    for o in overrides:
        if o.startswith("-"):
            parser.error(f"unknown option {o}")
    return settle(args), overrides
