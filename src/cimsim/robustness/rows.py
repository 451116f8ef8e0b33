"""What a robustness study writes: the resumable rows file, the summary files and the figure.

* ``robustness_rows.csv``: one ``Row`` per chip and grid point (a time sweep's ``TimedRow`` per
  chip, read-out and point, with ``t_inference`` and ``repetition`` columns), appended and
  fsync'd chip by chip (``RowsFile``), so a killed run resumes where it stopped and ends with
  exactly the file an uninterrupted run writes. Each row carries a fingerprint of everything
  that determined it (weights, data, test chip, limits, calibration, seed, stream); the sidecar
  ``robustness_rows.fingerprints.json`` says what each fingerprint stands for. A subject's rows
  with another fingerprint are moved to ``robustness_rows.stale.csv`` and recomputed, never mixed;
  a row in the file twice is kept once (``DuplicateRowsWarning``), and a value that does not
  parse is a ``ConfigError`` naming the file, line and column.
* ``robustness_summary.csv`` and ``robustness.json`` (rows and summary), written atomically.
* ``robustness.png``: accuracy against the swept variable, one line per ``lines`` group, which
  also groups the W&B curves (``cimsim.tracking``); time on a log axis in human units.
* ``evaluation.json``: the call whose files the folder holds, and ``.lock``, held while a process
  writes there (``hold_folder``): one evaluation per folder, one process at a time.

The file is over 350 lines because it holds everything a study writes, and the resumable rows
file alone (format, torn lines, fingerprints, stale and duplicate rows) is over half of it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from torch import nn

from cimsim.chip.convert import analog_layers
from cimsim.robustness.measure import (
    SWEEPS,
    Point,
    Read,
    RobustnessResult,
    Row,
    TimedRow,
    chip_settings,
    format_time,
)
from cimsim.validation import ConfigError

ROWS_FILE = "robustness_rows.csv"
SUMMARY_FILE = "robustness_summary.csv"
JSON_FILE = "robustness.json"
PLOT_FILE = "robustness.png"
COMPUTE_TABLE = "robustness_compute.csv"
COMPUTE_PLOT = "robustness_compute.png"
LOSS_TABLE = "hessian.csv"
LOSS_PLOT = "robustness_loss_prediction.png"
EVALUATION_FILE = "evaluation.json"  # the call whose files the folder holds
LOCK_FILE = ".lock"
# Every file an evaluation writes into its folder (the rows file's shares, sidecar and stale rows
# included), which ``overwrite`` deletes. W&B's and Hydra's folders log calls; they stay.
EVALUATION_FILES = (
    "robustness_rows.*",
    SUMMARY_FILE,
    JSON_FILE,
    PLOT_FILE,
    COMPUTE_TABLE,
    COMPUTE_PLOT,
    LOSS_TABLE,
    LOSS_PLOT,
)
COLUMNS = [f.name for f in fields(Row)]
# A time sweep's rows: the read-out after the chip it was read from.
TIMED_COLUMNS = [*COLUMNS[:2], "t_inference", "repetition", *COLUMNS[2:]]


def columns(timed: bool) -> list[str]:
    """The columns of a rows file: ``COLUMNS``, or ``TIMED_COLUMNS`` for a time sweep."""
    return TIMED_COLUMNS if timed else COLUMNS


def row_record(row: Row) -> dict:
    """A row as its file's record: its columns in file order (``asdict`` order for a ``Row``)."""
    return {c: getattr(row, c) for c in columns(isinstance(row, TimedRow))}


class StaleRowsWarning(UserWarning):
    """Rows of a model were computed with other settings; they were moved aside, not reused."""


class DuplicateRowsWarning(UserWarning):
    """A row was in the rows file more than once; the first copy was kept, the others removed."""


def _atomic_write(path: Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- fingerprints


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model.state_dict()``: every entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):  # a module's extra state
            digest.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _model_chip(model: nn.Module) -> dict | list[dict]:
    """The test chip of ``model``'s analog layers (a list when layers differ)."""
    chips = []
    for _, layer in analog_layers(model):
        settings = chip_settings(layer.config)
        if settings not in chips:
            chips.append(settings)
    return chips[0] if len(chips) == 1 else chips


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A 16-hex-digit digest of the settings that determine a row (their canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sidecar(rows_path: Path) -> Path:
    return rows_path.with_suffix(".fingerprints.json")


def read_fingerprints(rows_path: str | os.PathLike) -> dict[str, dict]:
    """The sidecar of a rows file, ``<rows>.fingerprints.json``: fingerprint -> settings."""
    sidecar = _sidecar(Path(rows_path))
    return json.loads(sidecar.read_text()) if sidecar.exists() else {}


def record_fingerprints(rows_path: str | os.PathLike, entries: Mapping[str, dict]) -> Path:
    """Add ``entries`` (fingerprint -> settings) to the sidecar of ``rows_path``, atomically."""
    known = read_fingerprints(rows_path)
    sidecar = _sidecar(Path(rows_path))
    if sidecar.exists() and all(known.get(k) == v for k, v in entries.items()):
        return sidecar
    known.update(entries)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
            f.write("\n")

    return _atomic_write(sidecar, write)


def _flat(value, prefix: str = "") -> dict:
    """``{"data": {"seed": 1}}`` -> ``{"data.seed": 1}``."""
    if not isinstance(value, dict) or not value:
        return {prefix.rstrip("."): value}
    flat = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}{key}."))
    return flat


_UNSET = object()


def _show(key: str, value) -> str:
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value[:12] + "..." if key.endswith("sha256") else value
    return repr(value)


def _changes(old: dict | None, new: dict, limit: int | None = None) -> str:
    """``key: old -> new`` for every setting that differs, e.g. ``max_batches: 1 -> None``; past
    ``limit`` of them, how many more."""
    if old is None:
        return "settings not recorded in the fingerprint sidecar"
    a, b = _flat(old), _flat(new)
    changed = [
        f"{k}: {_show(k, a.get(k, _UNSET))} -> {_show(k, b.get(k, _UNSET))}"
        for k in sorted(set(a) | set(b))
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    ]
    if limit is not None and len(changed) > limit:
        changed = [*changed[:limit], f"and {len(changed) - limit} more"]
    return ", ".join(changed)


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


def _parse(raw: dict[str, str], timed: bool = False) -> Row:
    """A row read back from CSV with the types ``Row`` (``TimedRow``) declares."""
    kind = TimedRow if timed else Row
    return kind(**{f.name: _FROM_TEXT[f.type](raw[f.name]) for f in fields(kind)})


def _check_record(raw: dict, names: list[str], path: Path, line: int) -> None:
    """A rows-file record whose every column parses as its ``Row`` field's type; else a
    ``ConfigError`` naming the file, the line and the column (a bare ValueError names none)."""
    fix = "correct that line or delete it (its row is then computed again)"
    if None in raw:  # csv's key for the fields past the header's
        why = f"line {line} has {len(names) + len(raw[None])} fields, not {len(names)}: {fix}"
        raise ConfigError("rows file", str(path), why)
    for f in fields(TimedRow if names == TIMED_COLUMNS else Row):
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

    return _atomic_write(path, write)


def write_rows(path: str | os.PathLike, rows: Sequence[Row]) -> Path:
    """Write ``rows`` as one rows CSV, atomically, in the format ``RowsFile`` appends (e.g. the
    merge of several processes' shares of the chips); a time sweep's rows with its columns."""
    names = columns(any(isinstance(r, TimedRow) for r in rows))
    return _write_records(Path(path), [row_record(r) for r in rows], names)


def _first_copies(raws: list[dict], timed: bool) -> tuple[dict, list[dict]]:
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
        self.timed = False  # whether the rows are a time sweep's (their columns), set by resume

    def resume(
        self,
        model: nn.Module,
        determined: dict,
        expected: Mapping[tuple[int, Read, Point], int],
        timed: bool = False,
    ) -> dict[tuple[int, Read, Point], Row]:
        """This subject's rows already in the file with this run's settings (``known``,
        ``model``'s test chip and what the evaluation ``determined``), at the
        ``(chip, read-out, point)`` keys of ``expected`` (-> chip seed); ``timed``: the file holds
        a time sweep's rows (``TIMED_COLUMNS``). Its rows with another fingerprint go to
        ``<rows>.stale.csv`` first, with a ``StaleRowsWarning`` naming what changed."""
        self.timed = timed
        settings = {**self.known, "chip": _model_chip(model), **determined}
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
        changes = "; ".join(_changes(known.get(fp), settings) for fp in old)
        return (
            f"{self.path}: {len(stale)} rows of {self._who()} were computed"
            f" with other settings ({changes}); moved them to"
            f" {self.path.with_suffix('.stale.csv').name} and recomputing"
        )


# ----------------------------------------------------------------------------- the folder


@contextlib.contextmanager
def hold_folder(out: str | os.PathLike, call: Mapping, overwrite: bool = False) -> Iterator[Path]:
    """Hold the output folder ``out`` for the evaluation ``call`` while the block runs: no other
    process may write there (``lock_folder``), and the folder holds this call's files only
    (``claim_folder``). Yields the folder."""
    with lock_folder(out) as folder:
        claim_folder(folder, call, overwrite)
        yield folder


@contextlib.contextmanager
def lock_folder(out: str | os.PathLike) -> Iterator[Path]:
    """An exclusive ``flock`` on ``<out>/.lock`` while the block runs; a second process is
    refused at once. The OS drops the lock when its process ends, even by ``kill -9``, so a lock
    is never stale; the file stays (deleting a lock file lets two processes hold two locks)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip()
            why = f"another evaluation{f' ({holder})' if holder else ''} is writing to it: wait"
            why += " for it to end, or pass run_name=NAME to write to another folder"
            raise ConfigError("output folder", str(folder), why) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)  # for the message above
        yield folder
    finally:
        os.close(fd)  # releases the lock


def evaluation_files(out: str | os.PathLike) -> list[Path]:
    """The files of an evaluation in ``out`` (``EVALUATION_FILES``, and the temporary files of a
    write that was killed), not ``evaluation.json``."""
    folder = Path(out)
    found = {p for pattern in EVALUATION_FILES for p in folder.glob(pattern)}
    found |= {p for pattern in EVALUATION_FILES for p in folder.glob(f".{pattern}.*")}
    return sorted(p for p in found if p.is_file())


def claim_folder(out: str | os.PathLike, call: Mapping, overwrite: bool = False) -> Path:
    """Record in ``<out>/evaluation.json`` that ``out`` holds the evaluation ``call`` (what its
    files depend on, JSON-able). The same call resumes. A folder that holds another evaluation's
    files is refused with what differs, unless ``overwrite``: its files are then deleted first,
    so none of them (e.g. an earlier call's ``hessian.csv``) stays beside this call's."""
    folder = Path(out)
    call = json.loads(json.dumps(call, default=str))  # as it reads back
    record = {"fingerprint": fingerprint(call), "call": call}
    path = folder / EVALUATION_FILE
    held = _read_json(path)
    if held.get("fingerprint") == record["fingerprint"]:
        return path
    files = evaluation_files(folder)
    if files and not overwrite:
        raise ConfigError("output folder", str(folder), _refusal(held, call, files))
    for file in files:
        file.unlink()

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")

    return _atomic_write(path, write)


def _read_json(path: Path) -> dict:
    """A JSON file's object; ``{}`` when it is missing or unreadable (nothing recorded)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _refusal(held: dict, call: dict, files: list[Path]) -> str:
    """Why a folder is not this call's to write to, and the two ways on."""
    ways = "pass run_name=NAME to write to another folder, or overwrite=true to delete"
    if "call" not in held:
        names = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
        what = f"files of an evaluation ({names}) but no {EVALUATION_FILE} saying which"
        return f"it holds {what}: {ways} them and run this one"
    what = f"another evaluation ({EVALUATION_FILE}: {_changes(held['call'], call, limit=4)})"
    return f"it holds {what}: {ways} its files and run this one"


# ----------------------------------------------------------------------------- summary files


def _json_safe(value):
    # NaN (the CI of a single chip) is not valid JSON: write null.
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(result: RobustnessResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``robustness_summary.csv`` and ``robustness.json`` (rows + summary) atomically.

    The per-chip rows CSV is the one ``RowsFile`` appends to as it goes. Returns the two paths.
    """
    out = Path(out_dir)

    def write_csv(tmp):
        columns = list(result.summary[0]) if result.summary else []
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(result.summary)

    def write_json(tmp):
        records = {"rows": [row_record(r) for r in result.rows], "summary": result.summary}
        doc = {
            k: [{c: _json_safe(v) for c, v in r.items()} for r in rs] for k, rs in records.items()
        }
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")

    return _atomic_write(out / SUMMARY_FILE, write_csv), _atomic_write(out / JSON_FILE, write_json)


# ----------------------------------------------------------------------------- the figure

_AXIS_LABELS = {
    "sigma": "test noise sigma (fraction of range)",
    "mean_shift": "test mean shift mu (fraction of range)",
    "adc_levels": "ADC levels (log2 scale; bits = log2(levels); dashed: no ADC)",
    "t_inference": "time after programming t_inference (log scale)",
}


def lines(summary: Sequence[dict], x: str) -> dict[str, list[dict]]:
    """The curves of a figure along ``x``: summary entries grouped by model and by the value of
    every other swept variable that varies (named in the label), in order of appearance. The PNG
    and the W&B line series both draw exactly these."""
    others = [k for k in SWEEPS if k != x and len({s.get(k) for s in summary}) > 1]
    groups: dict[str, list[dict]] = {}
    for s in summary:
        parts = [str(s["model"])] if s.get("model") is not None else []
        parts += [f"{k}={'none' if s[k] is None else s[k]}" for k in others]
        groups.setdefault(", ".join(parts) or "accuracy", []).append(s)
    return groups


def _draw_line(ax, label: str, entries: list[dict], x: str, position: Callable) -> None:
    """One mean curve with its shaded 95 % CI at ``position(x value)``; for ADC sweeps "no ADC"
    is a dashed reference."""
    refs = [e for e in entries if x == "adc_levels" and e["adc_levels"] is None]
    entries = sorted((e for e in entries if not any(e is r for r in refs)), key=lambda e: e[x])
    color = None
    if entries:
        xs = [position(e[x]) for e in entries]
        mean = [100 * e["acc_mean"] for e in entries]
        # NaN half-widths (one chip) leave no band rather than a misleading zero-width one.
        ci = [100 * e["acc_ci95"] for e in entries]
        (line,) = ax.plot(xs, mean, marker="o", label=label)
        color = line.get_color()
        low = [m - c for m, c in zip(mean, ci, strict=True)]
        high = [m + c for m, c in zip(mean, ci, strict=True)]
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    for ref in refs:
        mean = 100 * ref["acc_mean"]
        # Same colour as its curve: one legend entry per model (the dashed style is explained in
        # the axis label), so the legend stays readable with many models.
        ax.axhline(mean, linestyle="--", linewidth=1, color=color, label="_nolegend_")


def _time_axis(ax, times: Sequence[float]) -> Callable[[float], float]:
    """A log time axis with a tick at every time in human units; ``t_inference = 0`` sits a
    decade below the smallest positive time (at 1 s without one), labelled ``0``. Returns where
    a time is drawn."""
    positive = [t for t in times if t > 0]
    zero = min(positive) / 10 if positive else 1.0
    ax.set_xscale("log")
    ticks = sorted(set(times))
    ax.set_xticks([t or zero for t in ticks], [format_time(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # decades between the ticks would read as times
    return lambda t: t or zero


def plot_robustness(
    summary: Sequence[dict], x: str, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Plot test accuracy (mean over chips, shaded 95 % CI) against the swept variable ``x``.

    Args:
        summary: entries of ``summarize``; one line per ``lines`` group.
        x: ``sigma``, ``mean_shift``, ``adc_levels`` (log2 axis; "no ADC" as a dashed line) or
            ``t_inference`` (log axis, ticks in human units, t = 0 at the left).
        path: the PNG to write (atomically, 150 dpi).
        title: optional figure title.

    Returns:
        The path written.
    """
    if x not in SWEEPS:
        raise ConfigError("x", x, "allowed values are " + ", ".join(map(repr, SWEEPS)))
    if not summary:
        raise ValueError("plot_robustness got an empty summary")
    timed = x == "t_inference"
    if timed and any("t_inference" not in s for s in summary):
        raise ConfigError("x", x, "needs a time sweep's summary (a grid with times)")
    # A bare Figure on the Agg canvas, no pyplot: no display needed, no global figure state.
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    position = _time_axis(ax, [s[x] for s in summary]) if timed else (lambda value: value)
    for label, entries in lines(summary, x).items():
        _draw_line(ax, label, entries, x, position)
    if x == "adc_levels":
        ax.set_xscale("log", base=2)
        ticks = sorted({s["adc_levels"] for s in summary if s["adc_levels"] is not None})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(_AXIS_LABELS[x])
    ax.set_ylabel("top-1 test accuracy (%), mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    labels = list(lines(summary, x))
    if timed or max(map(len, labels)) > 40:  # long labels (test-chip settings): below the axes
        fig.set_figheight(4 + 0.22 * len(labels))
        fig.legend(loc="outside lower center", fontsize="small")
    else:
        ax.legend()
    if title:
        ax.set_title(title)
    return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def write_table(path: Path, records: Sequence[Mapping]) -> Path:
    """A small CSV (header from the first record), written atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)

    return _atomic_write(path, write)


def own_mean_shift(summary: Sequence[dict], model: str) -> float | None:
    """The mean shift ``model`` was measured at: its only one (a grid at ``mean_shifts=[train]``
    tests a drift-trained model at its own), else 0 when it is among several (a mean-shift
    sweep), else None."""
    shifts = {s["mean_shift"] for s in summary if s.get("model") == model}
    if len(shifts) == 1:
        return shifts.pop()
    return 0.0 if 0.0 in shifts else None


def plot_compute(
    summary: Sequence[dict], subjects: Sequence, sigma: float, out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """Robust accuracy at test ``sigma`` against training compute (forward-backward passes), one
    point per model with its 95 % CI: which method is better at equal compute.

    Args:
        summary: the study's summary (``summarize``), with a ``model`` column.
        subjects: the study's subjects (``label`` and ``passes``, e.g.
        ``cimsim.robustness.study.Subject``).
        sigma: the test sigma the comparison is made at (a point of the grid).
        out_dir: where ``robustness_compute.csv`` and ``robustness_compute.png`` go.
    """
    at = {
        s["model"]: s
        for s in summary
        if s["sigma"] == sigma and s["mean_shift"] == own_mean_shift(summary, s["model"])
    }
    missing = [s.label for s in subjects if s.label not in at]
    if missing:
        raise ConfigError("target_sigma", sigma, f"is not a grid point of {missing}")
    records = [
        {
            "model": s.label,
            "passes": s.passes,
            "acc_mean": at[s.label]["acc_mean"],
            "acc_ci95": at[s.label]["acc_ci95"],
            "chips": at[s.label]["chips"],
        }
        for s in subjects
    ]
    out = Path(out_dir)
    table = write_table(out / COMPUTE_TABLE, records)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in records:
        ax.errorbar(
            r["passes"],
            100 * r["acc_mean"],
            yerr=100 * r["acc_ci95"],
            marker="o",
            capsize=3,
            label=r["model"],
        )
    ax.set_xlabel("training compute (forward-backward passes)")
    ax.set_ylabel(f"top-1 test accuracy (%) at sigma = {sigma:g}, mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    plot = _atomic_write(out / COMPUTE_PLOT, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    return table, plot


def measured_losses(summary: Sequence[dict], model: str) -> list[tuple[float, float]]:
    """``(sigma, mean test loss)`` of ``model`` at its own mean shift without ADC, by sigma."""
    mu = own_mean_shift(summary, model)
    return sorted(
        (s["sigma"], s["loss_mean"])
        for s in summary
        if s.get("model") == model and s["mean_shift"] == mu and s["adc_levels"] is None
    )


def plot_loss_prediction(
    summary: Sequence[dict], traces: Mapping[str, dict], out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """The second-order prediction ``J(w) + sigma^2 / 2 * sum_t r_t^2 tr(H_t)`` next to the
    Monte Carlo mean test loss at each sigma (at the model's own mean shift, ``own_mean_shift``;
    no ADC): where the quadratic picture of HA-SGD holds (the traces are those of the clean
    weights). ``traces[model]`` holds ``weighted``, ``weighted_se`` and
    ``probes`` (``cimsim.training.hessian.hessian_traces``); ``J(w)`` is the sigma = 0 loss.
    """
    out = Path(out_dir)
    table = write_table(out / LOSS_TABLE, [{"model": m, **t} for m, t in traces.items()])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for model, t in traces.items():
        pts = measured_losses(summary, model)
        if not pts or pts[0][0] != 0:
            warnings.warn(f"{model}: no sigma = 0 point to predict from; not drawn", stacklevel=2)
            continue
        sig = [p[0] for p in pts]
        (line,) = ax.plot(sig, [p[1] for p in pts], marker="o", label=f"{model}: measured")
        pred = [pts[0][1] + x * x / 2 * t["weighted"] for x in sig]
        band = [2 * x * x / 2 * t["weighted_se"] for x in sig]  # +-2 standard errors
        ax.plot(sig, pred, linestyle="--", color=line.get_color(), label=f"{model}: predicted")
        ax.fill_between(
            sig,
            [p - b for p, b in zip(pred, band, strict=True)],
            [p + b for p, b in zip(pred, band, strict=True)],
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
    ax.set_xlabel("test noise sigma (fraction of range)")
    ax.set_ylabel("mean test cross-entropy")
    ax.set_title("J(w) + sigma^2/2 sum r^2 tr(H) (dashed, +-2 SE) vs Monte Carlo")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    plot = _atomic_write(out / LOSS_PLOT, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    return table, plot
