"""The README's results excerpts: lines of each committed report (docs/<name>.md) picked by a
fixed rule, written between the README's markers for that report."""

from __future__ import annotations

import re
from pathlib import Path

from cimsim.files import atomic_write


def markers(name: str = "results") -> tuple[str, str]:
    """The README's comments around the excerpt of report ``name`` (docs/<name>.md)."""
    return f"<!-- {name}-excerpt:begin -->", f"<!-- {name}-excerpt:end -->"


BEGIN, END = markers()
HEADER = ("* data:", "* model:", "* clean accuracy:", "* models:", "* command:", "* date:")
HEADER += ("* machine:", "* wall time of this command alone:", "* scale:")
TABLES = ("1.",)  # sections whose "Measured." line and first table are quoted whole
VERDICTS = ("1.", "3.", "4.", "6.")  # sections whose first claim and verdict are quoted


def sections(report: str) -> dict[str, list[str]]:
    """``{number: lines}`` of every numbered ``## `` section of the report (``"1."``, ``"7a."``)."""
    found, current = {}, None
    for line in report.splitlines():
        if line.startswith("## "):
            match = re.match(r"## (\d+[a-z]?\.)", line)
            current = match.group(1) if match else None
            if current:
                found[current] = []
        elif current:
            found[current].append(line)
    return found


def _first(lines: list[str], prefix: str) -> list[str]:
    return [next(line for line in lines if line.startswith(prefix))]


def _table(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def excerpt(report: str) -> list[str]:
    """The excerpt of ``report`` (a report's text): its provenance lines, section 1's
    measurement and table, and the claim and verdict of the sections in ``VERDICTS`` that the
    report has."""
    lines, parts = report.splitlines(), sections(report)
    out = [line for line in lines if line.startswith(HEADER)]
    for number in (n for n in dict.fromkeys(TABLES + VERDICTS) if n in parts):
        body = parts[number]
        block = _first(body, "**Claim")
        if number in TABLES:
            block += ["", *_first(body, "**Measured.**"), "", *_table(body)]
        out += ["", *block, "", *_first(body, "**Verdict")]
    return out


def block(readme: str, name: str = "results") -> list[str]:
    """The lines between the README's markers of report ``name``."""
    begin, end = markers(name)
    lines = readme.splitlines()
    return lines[lines.index(begin) + 1 : lines.index(end)]


def update_readme(readme: Path, report: Path, name: str = "results") -> None:
    """Write ``report``'s excerpt between the markers of report ``name`` in ``readme`` (the rest
    untouched); a README without them quotes no excerpt of that report, and is left alone."""
    begin, end = markers(name)
    text = readme.read_text()
    if begin + "\n" not in text or end not in text:
        print(f"[reproduce] {readme.name} has no {begin} ... {end}: no excerpt written")
        return
    head, rest = text.split(begin + "\n", 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(excerpt(report.read_text())).strip("\n")
    atomic_write(readme, f"{head}{begin}\n{body}\n{end}{tail}")
