"""The README's results excerpt: lines of docs/results.md picked by a fixed rule, written in."""

from __future__ import annotations

import re
from pathlib import Path

from cimsim.files import atomic_write

BEGIN, END = "<!-- results-excerpt:begin -->", "<!-- results-excerpt:end -->"
HEADER = ("* command:", "* date:", "* machine:", "* wall time of this command alone:", "* scale:")
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
    """The excerpt of ``report`` (docs/results.md's text): its provenance lines, section 1's
    measurement and table, and the claim and verdict of the sections in ``VERDICTS``."""
    lines, parts = report.splitlines(), sections(report)
    out = [line for line in lines if line.startswith(HEADER)]
    for number in dict.fromkeys(TABLES + VERDICTS):
        body = parts[number]
        block = _first(body, "**Claim")
        if number in TABLES:
            block += ["", *_first(body, "**Measured.**"), "", *_table(body)]
        out += ["", *block, "", *_first(body, "**Verdict")]
    return out


def block(readme: str) -> list[str]:
    """The lines between the README's markers."""
    lines = readme.splitlines()
    return lines[lines.index(BEGIN) + 1 : lines.index(END)]


def update_readme(readme: Path, report: Path) -> None:
    """Write ``report``'s excerpt between the markers of ``readme`` (the rest untouched)."""
    text = readme.read_text()
    head, rest = text.split(BEGIN + "\n", 1)
    _, tail = rest.split(END, 1)
    body = "\n".join(excerpt(report.read_text())).strip("\n")
    atomic_write(readme, f"{head}{BEGIN}\n{body}\n{END}{tail}")
