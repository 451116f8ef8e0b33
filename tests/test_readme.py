"""The README guides; it does not report. It has at most 250 lines, and no result typed by hand.

Its results are excerpts of the reports (docs/results.md, and each other report in ``REPORTS``),
each between its two marker comments: every non-empty line there is a line of that report,
verbatim, so the README cannot disagree with a report (when a report is regenerated, a stale line
is named here). Outside fenced code blocks (commands and
their values) and outside the excerpt, the README's prose holds no digit but those of ``ALLOWED``:
a measured number belongs in the report, or in a guide next to its command, machine and date.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from paper.excerpt import markers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REPORT = ROOT / "docs" / "results.md"
REPORTS = ("results", "results_cifar10_subset")  # docs/<name>.md, each quoted in the README
MAX_LINES = 250
BEGIN, END = "<!-- results-excerpt:begin -->", "<!-- results-excerpt:end -->"
MARKER = re.compile(r"<!-- ([A-Za-z0-9_-]+)-excerpt:(begin|end) -->")

# The only digits allowed in the README's prose: names, never measurements. Each is matched as
# the whole phrase, so a number next to it ("Fig. 7: 86.8") is still caught.
ALLOWED = (
    "Python 3.11",  # the interpreter the project supports (pyproject.toml)
    "ACM JETC 2022",  # the citation of the HA-SGD paper
    "WRN-10-2",  # network names: a Wide ResNet's depth and width ...
    "WRN-16-2",
    "WRN-28-10",
    "CIFAR-100",  # ... and datasets' names
    "CIFAR-10",
    "results_cifar10_subset",  # the second report's name (docs/results_cifar10_subset.md)
    "Fig. 5",  # the paper's figure numbers
    "Fig. 7",
    "Fig. 8",
    "Fig. 9",
    "--jobs 2",  # an option's value (two processes at a time), not a measurement
)
LINK_TARGET = re.compile(r"\]\([^)]*\)")  # the path of a link or image: docs/results/fig7.png
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def prose_numbers(text: str) -> list[str]:
    """Every number of the prose, as 'README.md:LINE: NUMBER in ...': outside fenced blocks, the
    excerpt and link targets, after removing ``ALLOWED``'s phrases."""
    found, fenced, excerpt = [], False, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif MARKER.fullmatch(line.strip()):
            excerpt = line.strip().endswith(":begin -->")
        elif not fenced and not excerpt:
            bare = LINK_TARGET.sub("]()", line)
            for phrase in ALLOWED:
                bare = bare.replace(phrase, " ")
            found += [
                f"README.md:{n}: {m.group()} in {line.strip()!r}" for m in NUMBER.finditer(bare)
            ]
    return found


def excerpt(text: str, name: str = "results") -> list[str]:
    """The non-empty lines between report ``name``'s markers (exactly one pair, in order)."""
    first, last = markers(name)
    lines = [line.strip() for line in text.splitlines()]
    assert lines.count(first) == 1 and lines.count(last) == 1, f"one {first} and one {last}"
    begin, end = lines.index(first), lines.index(last)
    assert begin < end, f"{first} comes before {last}"
    return [line for line in text.splitlines()[begin + 1 : end] if line.strip()]


def stale_lines(text: str, report: str, name: str = "results") -> list[str]:
    """The lines of report ``name``'s excerpt that are not a line of ``report``, verbatim."""
    known = set(report.splitlines())
    return [line for line in excerpt(text, name) if line not in known]


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines, at most {MAX_LINES}"


def test_the_readme_quotes_each_report_and_only_those():
    quoted = [m.group(1) for m in MARKER.finditer(README.read_text()) if m.group(2) == "begin"]
    assert quoted == list(REPORTS)


@pytest.mark.parametrize("name", REPORTS)
def test_each_results_excerpt_is_verbatim_from_its_report(name):
    text = README.read_text()
    assert any(line.startswith("| ") for line in excerpt(text, name)), "the excerpt holds a table"
    stale = stale_lines(text, (ROOT / "docs" / f"{name}.md").read_text(), name)
    assert not stale, f"README lines between the markers that docs/{name}.md lacks:\n" + (
        "\n".join(stale)
    )
    above = text[: text.index(markers(name)[0])].rstrip().rsplit("\n\n", 1)[-1]
    assert f"docs/{name}.md" in above and "python reproduce.py" in above, (
        "the paragraph above the excerpt names where it comes from"
    )


def test_no_number_is_typed_in_the_readme_prose():
    found = prose_numbers(README.read_text())
    assert not found, "numbers in README prose (put results in the report or a guide):\n" + (
        "\n".join(found)
    )


def test_the_checks_catch_a_typed_result():
    """The checks can fail: a result added to the prose, or an excerpt line edited by hand."""
    text = README.read_text()
    typed = text.replace(BEGIN, "The digital model keeps accuracy 86.8 at Fig. 7.\n\n" + BEGIN)
    assert [f.split(": ")[1] for f in prose_numbers(typed)] == [
        "86.8 in 'The digital model keeps accuracy 86.8 at Fig. 7.'"
    ]
    assert not prose_numbers(text.replace(BEGIN, "```\nsigma=0.1\n```\n" + BEGIN))  # code
    first = excerpt(text)[0]
    edited = text.replace(first, first + " 0.1", 1)
    assert stale_lines(edited, REPORT.read_text()) == [first + " 0.1"]


def test_every_relative_link_of_the_readme_exists():
    text = README.read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text)}
    missing = [t for t in sorted(targets) if t and "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.mark.parametrize("name", REPORTS)
def test_the_excerpt_is_what_reproduce_writes(name):
    """The block equals ``paper.excerpt``'s pick from docs/results.md: ``python reproduce.py``
    rewrites it with the report, so it is never edited by hand."""
    from paper.excerpt import block
    from paper.excerpt import excerpt as pick

    report = (ROOT / "docs" / f"{name}.md").read_text()
    assert block((ROOT / "README.md").read_text(), name) == pick(report)
