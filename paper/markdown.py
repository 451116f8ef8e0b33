"""The report's markdown: tables, accuracy cells and the small readings every section shares."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from cimsim.robustness.rows import Row
from cimsim.robustness.stats import Diff, mean_ci
from paper.evidence import Context, model_of
from paper.plan import RUN, STUDY


def pp(x: float) -> str:
    """A fraction in percentage points, one decimal (``n/a`` for NaN)."""
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def acc_text(values: dict[int, float]) -> str:
    """``98.5 ± 1.8`` (percent, 95 % CI over chips)."""
    if not values:
        return "–"
    mean, ci = mean_ci(list(values.values()))
    return f"{100 * mean:.1f} ± {pp(ci)}"


def md_table(header: Sequence[str], body: Sequence[Sequence[str]], right: int = 1) -> str:
    """A markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = [header, align, *body]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def seed_cells(rows: Iterable[Row], run: str, **point) -> dict[int, dict[int, float]]:
    """Accuracy per training seed and chip of the plan's ``run`` at ``point`` (keys of ``Row``:
    sigma, mean_shift, ...): ``{seed index: {chip: accuracy}}``."""
    out: dict[int, dict[int, float]] = {}
    for r in rows:
        base, k = model_of(r)
        if base == run and all(getattr(r, key) == v for key, v in point.items()):
            out.setdefault(k, {})[r.chip] = r.acc
    return out


def cell(rows: Iterable[Row], run: str, **point) -> dict[int, float]:
    """The unit values of ``run`` at ``point`` that the report's means, CIs and paired
    differences are over: with two or more training seeds, each seed's mean over its chips
    (keyed by seed: runs pair by seed, the chips being common); with one seed, each chip's
    accuracy (keyed by chip)."""
    by_seed = seed_cells(rows, run, **point)
    if len(by_seed) == 1:
        return next(iter(by_seed.values()))
    return {k: math.fsum(v.values()) / len(v) for k, v in sorted(by_seed.items())}


def sigmas_of(rows: Iterable[Row]) -> list[float]:
    """The test sigmas of ``rows``, ascending."""
    return sorted({r.sigma for r in rows})


def first_from(sigmas: list[float], good: dict[float, bool]) -> float | None:
    """The smallest sigma from which ``good`` holds at every larger grid sigma (None: never)."""
    start = None
    for s in reversed(sigmas):
        if not good[s]:
            break
        start = s
    return start


def deterministic(values: dict[int, float]) -> bool:
    """Every chip measured the same accuracy (no chip noise: one measurement)."""
    return len(set(values.values())) <= 1


def variant_table(ctx: Context, studies: Sequence[tuple[str, str]], sigmas: Sequence[float]):
    """(markdown body, rows by study) of accuracy per model, variant and test sigma."""
    body, by = [], {}
    for study, title in studies:
        rows = ctx.rows(study)
        by[study] = rows
        for r in ctx.study(study).runs:
            body.append([RUN[r].title, title, *(acc_text(cell(rows, r, sigma=s)) for s in sigmas)])
    return body, by


def chip_value(label: str, key: str) -> str | None:
    """The test-chip setting ``key`` a row's model label names (``... | chip tile_rows=64,
    pairs.f=(1.0, 3.0)``), as text; None when the label leaves it at its default."""
    chip = label.split(" | chip ", 1)[1] if " | chip " in label else ""
    match = re.search(rf"(?:^|, ){re.escape(key)}=(\([^)]*\)|[^,]+)", chip)
    return match.group(1) if match else None


def gain_text(diff: Diff, base: float) -> str:
    """A paired difference in points with its CI, and in percent of ``base`` (a mean)."""
    rel = "n/a" if base == 0 else f"{100 * diff.mean / base:+.1f} %"
    return f"{diff} points ({rel})"


def not_trained(ctx: Context, study: str) -> str:
    """A sentence naming the plan's models of ``study`` that this report did not train
    (``reproduce.py --models``), or ``""``."""
    left = [RUN[r].title for r in STUDY[study].runs if r not in ctx.study(study).runs]
    if not left:
        return ""
    return f" Not trained for this report (`--models`, its compute budget): {'; '.join(left)}."
