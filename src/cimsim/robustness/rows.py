"""The rows of a study: ``Row`` (one chip at one grid point) and the resumable rows file.

``robustness_rows.csv`` holds one ``Row`` per chip and grid point (a time sweep's ``TimedRow`` per
chip, read-out and point, with ``t_inference`` and ``repetition`` columns; a fault sweep's
``FaultRow`` per chip, fault rate and point, with a ``fault_rate`` column), appended and fsync'd
chip by chip (``RowsFile``), so a killed run resumes where it stopped and ends with exactly the
file an uninterrupted run writes. Each row carries a fingerprint of everything that determined it
(``cimsim.robustness.fingerprints``). A subject's rows with another fingerprint are moved to
``robustness_rows.stale.csv`` and recomputed, never mixed; a row in the file twice is kept once
(``DuplicateRowsWarning``), and a value that does not parse is a ``ConfigError`` naming the
file, line and column.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from torch import nn

from cimsim.files import atomic_write
from cimsim.robustness.fingerprints import (
    describe_changes,
    fingerprint,
    model_chip,
    read_fingerprints,
    readout_draws,
    record_fingerprints,
    state_sha256,
)
from cimsim.robustness.grid import Point, Read
from cimsim.validation import ConfigError

ROWS_FILE = "robustness_rows.csv"


@dataclass(frozen=True)
class Row:
    """One chip measured at one grid point: a line of ``robustness_rows.csv``, in column order.

    Chip ``chip`` was programmed from ``chip_seed``, set to the point ``(sigma, mean_shift,
    adc_levels)`` and scored ``acc`` (top-1, a fraction) and ``loss`` (mean cross-entropy, nats)
    on ``n`` samples. ``model`` (the curve's label), ``ckpt`` (the checkpoint file) and
    ``fingerprint`` (of the settings that determined the row) are filled in by ``RowsFile``
    (below); empty otherwise.
    """

    chip: int
    chip_seed: int
    sigma: float
    mean_shift: float
    adc_levels: int | None
    acc: float
    loss: float
    n: int
    model: str = ""
    ckpt: str = ""
    fingerprint: str = ""

    @property
    def point(self) -> Point:
        return (self.sigma, self.mean_shift, self.adc_levels)

    @property
    def read(self) -> Read:
        return None


@dataclass(frozen=True)
class TimedRow(Row):
    """A row of a PCM time sweep: the chip read ``t_inference`` s after programming, read-out
    ``repetition`` (0, 1, ...; each redraws only the read noise). Its file has these two columns
    after ``chip_seed``; a sweep without times writes plain ``Row``s and today's columns."""

    t_inference: float = 0.0
    repetition: int = 0

    @property
    def read(self) -> Read:
        return (self.t_inference, self.repetition)


@dataclass(frozen=True)
class FaultRow(Row):
    """A row of a fault sweep: the chip programmed with a fraction ``fault_rate`` of its devices
    stuck (``RobustnessGrid.fault_kind`` says which way). Its file has this column after
    ``chip_seed``."""

    fault_rate: float = 0.0

    @property
    def read(self) -> Read:
        return (self.fault_rate,)


@dataclass
class RobustnessResult:
    """Per-chip rows and their per-grid-point summary (see ``summarize``).

    ``fingerprints`` maps each row fingerprint of a resumable run to the settings it stands for.
    """

    rows: list[Row] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    fingerprints: dict[str, dict] = field(default_factory=dict)


COLUMNS = [f.name for f in fields(Row)]
# A time sweep's rows: the read-out after the chip it was read from.
TIMED_COLUMNS = [*COLUMNS[:2], "t_inference", "repetition", *COLUMNS[2:]]
FAULT_COLUMNS = [*COLUMNS[:2], "fault_rate", *COLUMNS[2:]]  # a fault sweep's: its rate first
_COLUMNS_OF = {Row: COLUMNS, TimedRow: TIMED_COLUMNS, FaultRow: FAULT_COLUMNS}


def row_class(kind: bool | type[Row]) -> type[Row]:
    """The rows' class: ``kind`` itself, or ``TimedRow`` / ``Row`` for True / False (timed)."""
    return kind if isinstance(kind, type) else TimedRow if kind else Row


def columns(timed: bool | type[Row]) -> list[str]:
    """The columns of a rows file: ``COLUMNS``, ``TIMED_COLUMNS`` for a time sweep (True or
    ``TimedRow``), ``FAULT_COLUMNS`` for a fault sweep (``FaultRow``)."""
    return _COLUMNS_OF[row_class(timed)]


def row_record(row: Row) -> dict:
    """A row as its file's record: its columns in file order (``asdict`` order for a ``Row``)."""
    return {c: getattr(row, c) for c in columns(type(row))}


class StaleRowsWarning(UserWarning):
    """Rows of a model were computed with other settings; they were moved aside, not reused."""


class DuplicateRowsWarning(UserWarning):
    """A row was in the rows file more than once; the first copy was kept, the others removed."""


# ----------------------------------------------------------------------------- the rows CSV

# How a CSV field becomes a Row's value, by the field's annotation ("" is csv's None).
_FROM_TEXT = {
    "int": int,
    "float": float,
    "str": str,
    "int | None": lambda text: None if text == "" else int(text),
}
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "text",
    "int | None": "an integer or empty",
}


def _parse(raw: dict[str, str], timed: bool | type[Row] = False) -> Row:
    """A row read back from CSV with the types its class (``row_class(timed)``) declares."""
    kind = row_class(timed)
    return kind(**{f.name: _FROM_TEXT[f.type](raw[f.name]) for f in fields(kind)})


def _check_record(raw: dict, names: list[str], path: Path, line: int) -> None:
    """A rows-file record whose every column parses as its ``Row`` field's type; else a
    ``ConfigError`` naming the file, the line and the column (a bare ValueError names none)."""
    fix = "correct that line or delete it (its row is then computed again)"
    if None in raw:  # csv's key for the fields past the header's
        why = f"line {line} has {len(names) + len(raw[None])} fields, not {len(names)}: {fix}"
        raise ConfigError("rows file", str(path), why)
    for f in fields(next(k for k, n in _COLUMNS_OF.items() if n == names)):
        text = raw[f.name]
        if text is None:
            why = f"line {line} has no value in column {f.name!r} (too few fields): {fix}"
            raise ConfigError("rows file", str(path), why)
        try:
            _FROM_TEXT[f.type](text)
        except ValueError:
            why = f"line {line}, column {f.name!r} holds {text!r}, not {_TYPE_WORDS[f.type]}: {fix}"
            raise ConfigError("rows file", str(path), why) from None


def _repair(path: Path) -> None:
    """Drop a torn last line (a run killed mid-write) so appends start on a fresh line."""
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)  # 0 when not even the header is complete


def _read_raw(path: Path, names: list[str] = COLUMNS) -> list[dict[str, str]]:
    """The rows of ``path`` as text (none if it does not exist), after dropping a torn line;
    its header must be ``names`` and every value must parse (``_check_record``)."""
    if not path.exists():
        return []
    _repair(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and reader.fieldnames != names:
            why = f"has columns {reader.fieldnames}; rows are written as {names}: use another file"
            raise ConfigError("rows file", str(path), why)
        raws = []
        for raw in reader:
            _check_record(raw, names, path, reader.line_num)
            raws.append(raw)
        return raws


def _append(path: Path, records: Sequence[Mapping], names: list[str] = COLUMNS) -> None:
    """Append one chip's rows in a single write, durable before the next chip starts."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    if path.stat().st_size == 0:
        writer.writeheader()
    writer.writerows(records)
    with open(path, "a", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _write_records(path: Path, records: Sequence[Mapping], names: list[str] = COLUMNS) -> Path:
    """Write a whole rows CSV (header ``names``, then ``records``) atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)

    return atomic_write(path, write)


def write_rows(path: str | os.PathLike, rows: Sequence[Row]) -> Path:
    """Write ``rows`` as one rows CSV, atomically, in the format ``RowsFile`` appends (e.g. the
    merge of several processes' shares of the chips); a time sweep's rows with its columns."""
    names = columns(type(rows[0]) if rows else Row)
    return _write_records(Path(path), [row_record(r) for r in rows], names)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """A rows CSV as ``Row``s (``TimedRow``s for a time sweep, ``FaultRow``s for a fault sweep),
    typed as the dataclass says; read only (no torn line dropped, no header checked:
    ``RowsFile`` does that when it resumes)."""
    with open(path, newline="") as f:
        raws = list(csv.DictReader(f))
    if not raws:
        return []
    kind = TimedRow if "t_inference" in raws[0] else FaultRow if "fault_rate" in raws[0] else Row
    return [_parse(r, kind) for r in raws]


def _first_copies(raws: list[dict], timed: bool | type[Row]) -> tuple[dict, list[dict]]:
    """The rows of ``raws`` by ``(chip, read-out, point)``, each key's first copy, and the later
    copies. Copies with one fingerprint were computed with the same settings (rows are
    reproducible), so keeping the first loses nothing; refusing would leave a CSV to edit."""
    first, copies = {}, []
    for raw in raws:
        row = _parse(raw, timed)
        key = (row.chip, row.read, row.point)
        if key in first:
            copies.append(raw)
        else:
            first[key] = row
    return first, copies


class RowsFile:
    """One subject's rows in a resumable CSV that several subjects (models) share.

    ``evaluate_robustness`` calls ``resume`` once, then ``append`` after each chip. One writer per
    file (one file per DDP rank).

    Args:
        path: the CSV, created on first use.
        model: the curve's label; with ``ckpt``, which rows of the file are this subject's.
        ckpt: the checkpoint file (empty without one).
        known: what else determines the rows, for the fingerprint, e.g.
            ``{"ckpt_sha256": ..., "data": spec, "calib_split": "val"}`` (JSON-able); without a
            ``ckpt_sha256``, the model's weights are hashed (``state_sha256``).
    """

    def __init__(
        self, path: str | os.PathLike, model: str = "", ckpt: str = "", known: Mapping | None = None
    ):
        self.path, self.model, self.ckpt = Path(path), model, ckpt
        self.known = dict(known or {})
        self.fp = ""  # this run's fingerprint, set by resume
        self.fingerprints: dict[str, dict] = {}  # {fp: the settings it stands for}
        self.timed = False  # the rows' kind (True: a time sweep's; a Row class), set by resume

    def resume(
        self,
        model: nn.Module,
        determined: dict,
        expected: Mapping[tuple[int, Read, Point], int],
        timed: bool | type[Row] = False,
    ) -> dict[tuple[int, Read, Point], Row]:
        """This subject's rows already in the file with this run's settings (``known``,
        ``model``'s test chip and what the evaluation ``determined``), at the
        ``(chip, read-out, point)`` keys of ``expected`` (-> chip seed); ``timed``: the file holds
        a time sweep's rows (True, ``TIMED_COLUMNS``) or those of a class (``FaultRow``). Its
        rows with another fingerprint go to ``<rows>.stale.csv`` first, with a
        ``StaleRowsWarning`` naming what changed."""
        self.timed = timed
        settings = {**self.known, "chip": model_chip(model), **determined}
        if readout_draws(model):  # the noise generator of the chip's reads
            settings["readout_draws"] = readout_draws(model)
        if "ckpt_sha256" not in settings:  # a module without a checkpoint file: hash its weights
            settings["state_sha256"] = state_sha256(model)
        settings = json.loads(json.dumps(settings, default=str))  # as the sidecar reads back
        self.fp = fingerprint(settings)
        self.fingerprints = {self.fp: settings}
        raws = _read_raw(self.path, columns(timed))
        mine = [r for r in raws if (r["model"], r["ckpt"]) == (self.model, self.ckpt)]
        stale = [r for r in mine if r["fingerprint"] != self.fp]
        done, copies = _first_copies([r for r in mine if r["fingerprint"] == self.fp], timed)
        if stale:
            message = self._stale_message(stale, settings)
            self._retire(stale)
            warnings.warn(message, StaleRowsWarning, stacklevel=3)
        if stale or copies:
            gone = {id(r) for r in stale + copies}
            _write_records(self.path, [r for r in raws if id(r) not in gone], columns(timed))
        if copies:
            warnings.warn(self._copies_message(copies), DuplicateRowsWarning, stacklevel=3)
        record_fingerprints(self.path, self.fingerprints)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        done = {k: row for k, row in done.items() if expected.get(k) == row.chip_seed}
        if done:
            print(self._resume_message(done, expected), flush=True)
        return done

    def append(self, rows: Sequence[Row]) -> list[Row]:
        """Stamp one chip's rows with this subject and fingerprint, and append them durably."""
        stamped = [replace(r, model=self.model, ckpt=self.ckpt, fingerprint=self.fp) for r in rows]
        _append(self.path, [row_record(r) for r in stamped], columns(self.timed))
        return stamped

    def _retire(self, stale: list[dict]) -> None:
        """Append ``stale`` to ``<rows>.stale.csv``, durable before the rows file is rewritten
        without them, so a crash can duplicate them but never lose them."""
        names = columns(self.timed)
        stale_path = self.path.with_suffix(".stale.csv")
        _read_raw(stale_path, names)  # drops a torn line; refuses a file of another format
        stale_path.touch()
        _append(stale_path, stale, names)  # as read: the text of the rows, unchanged

    def _who(self) -> str:
        who = [f"{k}={v!r}" for k, v in (("model", self.model), ("ckpt", self.ckpt)) if v]
        return ", ".join(who) or "this model"

    def _copies_message(self, copies: list[dict]) -> str:
        return (
            f"{self.path}: {len(copies)} rows of {self._who()} were in the file more than once"
            " (the same chip, read-out and grid point with the same settings, e.g. written by two"
            " evaluations at once); kept the first copy of each and removed the others"
        )

    def _resume_message(self, done: dict, expected: Mapping) -> str:
        """How many of this subject's chips were read back and how many are left to compute."""
        chips = {key[0] for key in expected}
        left = {key[0] for key in expected if key not in done}
        return (
            f"{self.path}: resuming {self._who()}: {len(chips) - len(left)} of {len(chips)}"
            f" chips read back ({len(done)} of {len(expected)} rows), {len(left)} to compute"
        )

    def _stale_message(self, stale: list[dict], settings: dict) -> str:
        known = read_fingerprints(self.path)
        old = dict.fromkeys(r["fingerprint"] for r in stale)
        changes = "; ".join(describe_changes(known.get(fp), settings) for fp in old)
        return (
            f"{self.path}: {len(stale)} rows of {self._who()} were computed"
            f" with other settings ({changes}); moved them to"
            f" {self.path.with_suffix('.stale.csv').name} and recomputing"
        )
