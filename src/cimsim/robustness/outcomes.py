"""Per-image outcomes at the noise-free points: which test images each chip classified right.

At test sigma 0 (no read-out or fault sweep) nothing is drawn from a chip's seed but its
calibration batches, so with a fixed-order calibration split every chip is the same network, and
two models can be compared image by image (McNemar, ``cimsim.robustness.stats.mcnemar``); the
rows hold only each chip's accuracy. With ``robustness.outcomes=true``, evaluate.py keeps beside
its rows file ``<rows>.outcomes.csv`` (``robustness_rows.outcomes.csv``): one line per subject,
chip and sigma-0 point, with the row's key and fingerprint and ``correct``, one ``0`` / ``1`` per
test image in the loader's order (1: classified right). Every chip is recorded, so a reader can
check that the chips agree before it treats them as one network.

The file follows the rows (``OutcomesFile``): a chip's outcomes are appended, in one fsync'd
write, before its rows, so a row that a resume reuses has its outcomes unless they were never
asked for; a resume keeps only the outcomes of the rows it reuses (same fingerprint, chip seed
and accuracy) and measures the missing ones again without appending their rows twice; at the end
the subject's lines are rewritten atomically in chip and grid order, so a resumed run ends with
the file an uninterrupted one writes. The switch is in no fingerprint: it adds this file and
changes no row.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from cimsim.files import atomic_write
from cimsim.robustness.grid import Point, Read, RobustnessGrid
from cimsim.robustness.rows import Row, RowsFile
from cimsim.validation import ConfigError

OUTCOMES_FILE = "robustness_rows.outcomes.csv"  # beside ``ROWS_FILE`` (``outcomes_path``)

Key = tuple[int, Read, Point]  # (chip, read-out, point): as ``evaluate_robustness`` keys rows


@dataclass(frozen=True)
class Outcome:
    """Chip ``chip`` (from ``chip_seed``) at the point ``(sigma, mean_shift, adc_levels)``:
    ``correct[i]`` is ``"1"`` when it classified test image ``i`` right. ``model``, ``ckpt`` and
    ``fingerprint`` are its row's."""

    chip: int
    chip_seed: int
    sigma: float
    mean_shift: float
    adc_levels: int | None
    correct: str
    model: str = ""
    ckpt: str = ""
    fingerprint: str = ""

    @property
    def point(self) -> Point:
        return (self.sigma, self.mean_shift, self.adc_levels)

    @property
    def key(self) -> Key:
        return (self.chip, None, self.point)

    def agrees(self, row: Row) -> bool:
        """Whether this is the outcome of ``row``: same chip seed, images and accuracy."""
        return (
            self.chip_seed == row.chip_seed
            and len(self.correct) == row.n
            and self.correct.count("1") == round(row.acc * row.n)
        )


OUTCOME_COLUMNS = ["model", "ckpt", "fingerprint", *[f.name for f in fields(Outcome)][:6]]


def outcomes_path(rows_path: str | os.PathLike) -> Path:
    """The outcomes file beside a rows file: ``robustness_rows.csv`` ->
    ``robustness_rows.outcomes.csv``, a DDP rank's ``...rank0of2.csv`` ->
    ``...rank0of2.outcomes.csv``."""
    return Path(rows_path).with_suffix(".outcomes.csv")


def outcome_cell(read: Read, point: Point) -> bool:
    """Whether ``evaluate_robustness`` records outcomes at this cell: test sigma 0, no read-out
    time or fault rate (those draw from the chip's seed)."""
    return read is None and point[0] == 0


def bits(hits: Sequence[torch.Tensor]) -> str:
    """Per-batch booleans (right or not, per image) as one ``0`` / ``1`` string."""
    return "".join("1" if h else "0" for h in torch.cat(list(hits)).tolist())


def _parse(raw: Mapping[str, str]) -> Outcome:
    levels = raw["adc_levels"]
    if set(raw["correct"]) - {"0", "1"} or not raw["correct"]:
        raise ValueError(f"correct must be 0s and 1s, got {raw['correct'][:20]!r}")
    return Outcome(
        int(raw["chip"]),
        int(raw["chip_seed"]),
        float(raw["sigma"]),
        float(raw["mean_shift"]),
        None if levels == "" else int(levels),
        raw["correct"],
        raw["model"],
        raw["ckpt"],
        raw["fingerprint"],
    )


def read_outcomes(path: str | os.PathLike) -> list[Outcome]:
    """The outcomes in ``path`` (none when it does not exist). A line that does not parse (a
    torn last write) is left out: a resume measures it again. Another header is a
    ``ConfigError``."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a torn last line
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is not None and reader.fieldnames != OUTCOME_COLUMNS:
        why = f"has columns {reader.fieldnames}; outcomes are written as {OUTCOME_COLUMNS}"
        raise ConfigError("outcomes file", str(path), why)
    out = []
    for raw in reader:
        try:
            out.append(_parse(raw))
        except (TypeError, ValueError):
            continue
    return out


def _record(o: Outcome) -> dict:
    return {c: getattr(o, c) for c in OUTCOME_COLUMNS}


def write_outcomes(path: str | os.PathLike, outcomes: Iterable[Outcome]) -> Path:
    """Write a whole outcomes file atomically (e.g. the merge of several processes' shares)."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=OUTCOME_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(_record(o) for o in outcomes)

    return atomic_write(Path(path), write)


def ordered(outcomes: Iterable[Outcome], grid: RobustnessGrid) -> list[Outcome]:
    """Outcomes by chip, then in ``grid``'s cell order (the rows' order)."""
    order = {cell: i for i, cell in enumerate(grid.cells())}
    return sorted(outcomes, key=lambda o: (o.chip, order[(None, o.point)]))


class OutcomesFile:
    """One subject's outcomes in a file that several subjects share, kept in step with its
    ``RowsFile`` (whose subject and fingerprint stamp them). ``evaluate_robustness`` calls
    ``resume`` after the rows' resume, ``append`` after each chip (before its rows) and
    ``finish`` at the end; ``entries`` then holds the subject's outcomes."""

    def __init__(self, path: str | os.PathLike, rows_file: RowsFile):
        self.path, self.rows_file = Path(path), rows_file
        self.others: list[Outcome] = []  # the other subjects' lines, as found
        self.entries: dict[Key, Outcome] = {}

    def _mine(self, o: Outcome) -> bool:
        return (o.model, o.ckpt) == (self.rows_file.model, self.rows_file.ckpt)

    def resume(self, done: Mapping[Key, Row]) -> set[Key]:
        """Keep the outcomes of the rows ``done`` (reused: this fingerprint, and the same chip
        seed and accuracy); drop the subject's others and rewrite the file. Returns the keys of
        ``done`` at outcome cells that have no outcome: measure them again."""
        self.others, self.entries = [], {}
        for o in read_outcomes(self.path):
            if not self._mine(o):
                self.others.append(o)
            elif (
                o.fingerprint == self.rows_file.fp
                and o.key in done
                and o.key not in self.entries
                and o.agrees(done[o.key])
            ):
                self.entries[o.key] = o
        write_outcomes(self.path, [*self.others, *self.entries.values()])
        return {k for k in done if outcome_cell(k[1], k[2]) and k not in self.entries}

    def append(self, chip: int, seed: int, hits: Mapping[tuple[Read, Point], str]) -> None:
        """Append one chip's outcomes (``{(read, point): bits}``) in one durable write."""
        new = [
            Outcome(chip, seed, *point, correct, self.rows_file.model, self.rows_file.ckpt)
            for (_, point), correct in hits.items()
        ]
        new = [replace(o, fingerprint=self.rows_file.fp) for o in new]
        if not new:
            return
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=OUTCOME_COLUMNS, lineterminator="\n").writerows(
            map(_record, new)
        )
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.entries.update((o.key, o) for o in new)

    def finish(self, grid: RobustnessGrid) -> list[Outcome]:
        """Rewrite the file with the subject's outcomes in chip and grid order, after the other
        subjects' (as an uninterrupted run appends them); returns the subject's outcomes."""
        mine = ordered(self.entries.values(), grid)
        write_outcomes(self.path, [*self.others, *mine])
        return mine
