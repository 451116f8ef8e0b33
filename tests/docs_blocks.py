"""The fenced code blocks of one ``## `` section of a markdown guide, in order, as written."""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def section_blocks(path: Path, heading: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block under ``## {heading}`` (to the next ``## ``)."""
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(body)]
