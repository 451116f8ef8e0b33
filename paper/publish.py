"""The report's published evidence: everything ``results.md`` was computed from, small enough to
commit beside it, so that the report renders again, and every verdict is recomputed, without the
checkpoints, the data or the plan's output folder (``reproduce.py --report-only --from-published
<evidence>``; tests/paper/test_published.py).

Its layout, under ``<report dir>/results/evidence/``:

* ``report.json``: the command's record (``meta``: command, date, machine, chips, seeds, ...);
* ``manifest.json``: the trainings' records;
* ``facts.json``: what the report read from checkpoints or data (``paper.evidence.Facts``: the
  header's data and model, ``ckpt_info``, ``identity_shortcuts``, and any ``ctx.facts``);
* ``evaluate/<study>/done.json``: the marker of each study of the report's sections;
* ``evaluate/<study>/robustness_rows.csv.gz``: the rows the report used (``study_rows``: the
  evaluated checkpoints, on the study's grid, chips ``0..chips-1``), gzip-compressed.

Paths under the plan's output folder are written relative to it (``train/<run>/checkpoints/
x.ckpt``), in the rows, the markers, the manifest and the facts' keys alike, so the published
files name no machine's folders and the rows still match their markers' checkpoints.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cimsim.files import atomic_write
from cimsim.robustness.rows import ROWS_FILE, Row, columns, read_rows, row_record

EVIDENCE = "evidence"  # the published evidence's folder, in the report's results/ folder
ROWS_GZ = ROWS_FILE + ".gz"
FACTS = "facts.json"
MANIFEST = "manifest.json"
META = "report.json"
STUDY_MARKER = "done.json"  # a study's record, beside its rows (``reproduce.py``)


def roots_of(out: Path | None) -> tuple[str, ...]:
    """The spellings of the plan's output folder that paths may start with (as given, and with
    its links resolved)."""
    return () if out is None else tuple(dict.fromkeys((str(out), str(Path(out).resolve()))))


def relative_text(text: str, roots: Sequence[str]) -> str:
    """``text`` with every path under one of ``roots`` written relative to it: the folder itself
    becomes ``.``, the prefix ``<root>/`` is dropped wherever it occurs (also inside an override
    such as ``ckpt=[<root>/train/a/x.ckpt,...]``)."""
    for root in roots:
        if text == root:
            return "."
        text = text.replace(root + os.sep, "")
    return text


def relative(value: Any, roots: Sequence[str]) -> Any:
    """A JSON value with ``relative_text`` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return relative_text(value, roots)
    if isinstance(value, dict):
        return {relative_text(str(k), roots): relative(v, roots) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [relative(v, roots) for v in value]
    return value


def write_rows_gz(path: Path, rows: Sequence[Row]) -> Path:
    """``rows`` as a rows CSV (``robustness_rows.csv``'s columns and format), gzip-compressed with
    no timestamp: the same rows give the same bytes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(type(rows[0]) if rows else Row))
    writer.writeheader()
    writer.writerows(row_record(r) for r in rows)
    return atomic_write(path, gzip.compress(buf.getvalue().encode(), mtime=0))


def read_rows_gz(path: Path) -> list[Row]:
    """The rows of a ``write_rows_gz`` file, typed as ``read_rows`` types a rows CSV."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / ROWS_FILE
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        return read_rows(plain)


def _write_json(path: Path, doc: Any) -> Path:
    return atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def publish(ctx: Any, out: Path, evidence: Path) -> int:  # a paper.evidence.Context (no cycle)
    """Write ``ctx``'s evidence (a report just rendered from the plan under ``out``) into the
    folder ``evidence``, replacing what it held; returns its size in bytes."""
    roots = roots_of(out)
    if evidence.is_dir():
        shutil.rmtree(evidence)  # a study the report no longer reads must not stay published
    for study, rows in ctx.used.items():
        rows = [replace(r, ckpt=relative_text(r.ckpt, roots)) for r in rows]
        write_rows_gz(evidence / "evaluate" / study / ROWS_GZ, rows)
    for study in {st.name for section in ctx.sections for st in section.studies} | set(ctx.used):
        marker = ctx.marker(study)  # the header reads every study's record (wall time, seed)
        if marker:
            _write_json(evidence / "evaluate" / study / STUDY_MARKER, relative(marker, roots))
    _write_json(evidence / MANIFEST, relative(ctx.manifest, roots))
    _write_json(evidence / META, ctx.meta)
    _write_json(evidence / FACTS, ctx.store.table)
    return sum(p.stat().st_size for p in evidence.rglob("*") if p.is_file())


def read_published(evidence: Path) -> tuple[dict, dict, dict]:
    """(meta, manifest, facts) of a published evidence folder; a FileNotFoundError says what is
    missing."""
    docs = []
    for name in (META, MANIFEST, FACTS):
        path = evidence / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not published evidence (write the report first)")
        docs.append(json.loads(path.read_text()))
    return docs[0], docs[1], docs[2]
