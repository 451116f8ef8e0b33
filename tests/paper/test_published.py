"""The report's published evidence (``paper.publish``): the report renders again from it alone,
with every verdict the same; a changed published row changes the report; the committed report's
verdicts follow from its committed evidence."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from cimsim import ConfigError
from cimsim.robustness.rows import Row, TimedRow, read_rows
from conftest import ROOT
from paper import report
from paper.evidence import Facts, fact
from paper.publish import EVIDENCE, ROWS_GZ, read_rows_gz, relative, write_rows_gz
from reproduce import reproduce

SECTIONS = "fig7,pcm"  # the tiny plan: a seeded table of verdicts and a time sweep
DOCS = ROOT / "docs"
COMMITTED = ("results", "results_cifar10_subset")  # docs/<name>.md with docs/<name>/evidence/


def verdicts(text: str) -> list[str]:
    """The lines of the report's sections (after its header) that say what it found: verdicts
    (``**Verdict``), bullets and table rows."""
    body = text.split("\n## ", 1)[1]
    return [li for li in body.splitlines() if "**Verdict" in li or li.startswith(("* ", "| "))]


def published_rows(path: Path) -> list[dict]:
    """A published rows file read with csv and gzip alone (not the code under test)."""
    return list(csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))


def write_published(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path.write_bytes(gzip.compress(buf.getvalue().encode()))


# ------------------------------------------------------------------ the parts, without a plan


def test_a_fact_is_computed_once_when_written_and_replayed_without_its_checkpoint(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"layers": (1, 2), 3: "x"}

    ckpt = tmp_path / "train" / "a.s1" / "checkpoints" / "last.ckpt"
    store = Facts(tmp_path)
    with store.active():
        first = fact("ranges", ckpt, compute)
        again = fact("ranges", str(ckpt), compute)
    assert calls == [1]
    assert first == again == {"layers": [1, 2], "3": "x"}  # as JSON gives it back, both ways
    assert store.table == {"ranges": {"train/a.s1/checkpoints/last.ckpt": first}}
    replay = Facts(stored=store.table)

    def unreadable():
        raise AssertionError("a replay computes nothing")

    assert replay.get("ranges", "train/a.s1/checkpoints/last.ckpt", unreadable) == first
    with pytest.raises(LookupError, match="no fact 'ranges' of 'train/b/x.ckpt'"):
        replay.get("ranges", "train/b/x.ckpt", unreadable)
    assert fact("outside", "k", lambda: 7) == 7  # no report being written: just computed


def test_published_paths_are_relative_to_the_plan_folder(tmp_path):
    out = str(tmp_path / "out")
    doc = {
        "ckpts": {"a": f"{out}/train/a/checkpoints/x.ckpt"},
        "overrides": [f"ckpt=[{out}/train/a/x.ckpt,{out}/train/b/y.ckpt]", "seed=42"],
        f"{out}/train/c": [out, "/elsewhere/train/d/x.ckpt", 3],
    }
    assert relative(doc, (out,)) == {
        "ckpts": {"a": "train/a/checkpoints/x.ckpt"},
        "overrides": ["ckpt=[train/a/x.ckpt,train/b/y.ckpt]", "seed=42"],
        "train/c": [".", "/elsewhere/train/d/x.ckpt", 3],
    }


def test_published_rows_read_back_as_written_and_compress_the_same_each_time(tmp_path):
    rows = [
        Row(0, 11, 0.1, 0.0, None, 0.5, 1.25, 270, "m, L=4", "train/m/checkpoints/x.ckpt", "ab"),
        Row(1, 12, 0.1, -0.01, 8, 1 / 3, 2.0, 270, "m, L=4", "train/m/checkpoints/x.ckpt", "ab"),
    ]
    timed = [TimedRow(**asdict(r), t_inference=3600.0 * r.chip, repetition=1) for r in rows]
    for kind, these in (("plain", rows), ("timed", timed)):
        path = write_rows_gz(tmp_path / kind / ROWS_GZ, these)
        assert read_rows_gz(path) == these
        again = write_rows_gz(tmp_path / f"{kind}2" / ROWS_GZ, these)
        assert again.read_bytes() == path.read_bytes()


# ---------------------------------------------------------------- a tiny plan, published

slow = pytest.mark.slow  # the tests below train and evaluate a tiny plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny plan of ``SECTIONS`` (2 seeds, 2 chips), its report and published evidence."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("published")
    argv = ["--tiny", "--sections", SECTIONS, "--out", str(tmp / "out")]
    reproduce([*argv, "--report-dir", str(tmp / "docs")])
    return tmp


@pytest.fixture
def no_checkpoints(monkeypatch):
    """Neither a checkpoint nor the data can be read: only the published evidence."""

    def refuse(*args, **kwargs):
        raise AssertionError("a published report was rendered from a checkpoint or the data")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(report, "load_datamodule", refuse)


def render_from(evidence: Path, report_dir: Path) -> str:
    reproduce(["--report-only", "--from-published", str(evidence), "--report-dir", str(report_dir)])
    return (report_dir / "results.md").read_text()


@slow
def test_the_report_renders_again_from_its_published_evidence_alone(tiny, tmp_path, no_checkpoints):
    evidence = shutil.copytree(tiny / "docs" / "results" / EVIDENCE, tmp_path / "evidence")
    original = (tiny / "docs" / "results.md").read_text()
    again = render_from(evidence, tmp_path / "docs")
    assert verdicts(again) == verdicts(original)
    assert sum("**Verdict" in li for li in verdicts(original)) >= 1
    assert again == original  # the header too: its facts are published
    figures = sorted(p.name for p in (tiny / "docs" / "results").glob("*.csv"))
    assert figures
    for name in figures:
        assert (tmp_path / "docs" / "results" / name).read_text() == (
            tiny / "docs" / "results" / name
        ).read_text()
    assert "* data: sklearn digits, 8x8 grayscale, 10 classes: 1257 training / 270 " in original
    assert "* model: WRN-10-1, 1 identity shortcut\n" in original  # width 1: 16 -> 16 channels
    assert "2 training seeds per model (seed 42, 43)" in original
    # the digital model at test sigma 0: each seed's mean over its chips, then their mean
    rows = [r for r in read_rows(tiny / "out" / "evaluate" / "fig7" / "robustness_rows.csv")]
    seeds = {}
    for r in rows:
        if r.sigma == 0.0 and Path(r.ckpt).parts[-3].split(".")[0] == "digital":
            seeds.setdefault(Path(r.ckpt).parts[-3], []).append(r.acc)
    assert len(seeds) == 2
    clean = 100 * np.mean([np.mean(v) for v in seeds.values()])
    assert f"* clean accuracy: the digital model scores {clean:.1f} % at test sigma 0 " in original
    assert "(Fig. 7's rows), against 10.0 % by chance" in original


@slow
def test_from_published_writes_the_report_under_the_name_given(tiny, tmp_path, no_checkpoints):
    """--report-name with --from-published: another name than the evidence's report needs
    --force; then the same report under that name, its figures and a copy of its evidence in its
    own folder (so it renders again); never over a page that is no report."""
    evidence = shutil.copytree(tiny / "docs" / "results" / EVIDENCE, tmp_path / "evidence")
    argv = ["--report-only", "--from-published", str(evidence), "--report-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match=r"^--report-name='again' is invalid: .*add --force"):
        reproduce([*argv, "--report-name", "again"])
    for _ in range(2):  # the second time over its own first rendering
        reproduce([*argv, "--report-name", "again", "--force"])
    original = (tiny / "docs" / "results.md").read_text()
    again = (tmp_path / "again.md").read_text()
    assert verdicts(again) == verdicts(original)
    assert "(again/fig7.png)" in again and (tmp_path / "again" / "fig7.png").is_file()
    copied = sorted(p.name for p in (tmp_path / "again" / EVIDENCE).rglob("*"))
    assert copied == sorted(p.name for p in evidence.rglob("*"))
    record = json.loads((tmp_path / "again" / EVIDENCE / "report.json").read_text())
    assert record["report_name"] == "again"  # rendered from its copy, it is again.md
    reproduce(["--report-only", "--from-published", str(tmp_path / "again" / EVIDENCE)] + argv[3:])
    assert (tmp_path / "again.md").read_text() == again
    inside = ["--report-dir", str(evidence / "r"), "--report-name", "x", "--force"]
    with pytest.raises(ConfigError, match=r"^--report-dir=.*where the report's evidence is"):
        reproduce([*argv[:3], *inside])
    assert not (tmp_path / "results.md").exists()
    (tmp_path / "guide.md").write_text("a guide page\n")
    with pytest.raises(ConfigError, match=r"^--report-name='guide' is invalid: .*not a report"):
        reproduce([*argv, "--report-name", "guide", "--force"])
    assert (tmp_path / "guide.md").read_text() == "a guide page\n"


@slow
def test_published_rows_are_the_rows_the_report_used_with_relative_paths(tiny):
    out = str(tiny / "out")
    evidence = tiny / "docs" / "results" / EVIDENCE
    for study in SECTIONS.split(","):
        published = published_rows(evidence / "evaluate" / study / ROWS_GZ)
        on_disk = read_rows(tiny / "out" / "evaluate" / study / "robustness_rows.csv")
        assert len(published) == len(on_disk)  # the tiny grid: every row is on it
        assert {r["ckpt"].split("/")[0] for r in published} == {"train"}
        assert {r.acc for r in on_disk} == {float(r["acc"]) for r in published}
    for path in evidence.rglob("*"):
        if path.is_file() and path.name != "report.json":  # the command, as it was typed
            data = path.read_bytes()
            text = gzip.decompress(data) if path.suffix == ".gz" else data
            assert out.encode() not in text, path


@slow
def test_a_changed_published_row_changes_the_table(tiny, tmp_path, no_checkpoints):
    """Digital's seed-0 chip-0 accuracy at test sigma 0.2 set to 1: its Fig. 7 cell becomes the
    mean and t-CI over seeds of each seed's mean over chips, recomputed here."""
    evidence = shutil.copytree(tiny / "docs" / "results" / EVIDENCE, tmp_path / "evidence")
    path = evidence / "evaluate" / "fig7" / ROWS_GZ
    rows = published_rows(path)
    digital = [r for r in rows if r["ckpt"].split("/")[1] in ("digital", "digital.s1")]
    at = [r for r in digital if float(r["sigma"]) == 0.2]
    target = next(r for r in at if r["ckpt"].split("/")[1] == "digital" and r["chip"] == "0")
    target["acc"] = "1.0"
    write_published(path, rows)
    per_seed = [
        np.mean([float(r["acc"]) for r in at if r["ckpt"].split("/")[1] == run])
        for run in ("digital", "digital.s1")
    ]
    mean = np.mean(per_seed)
    ci = stats.sem(per_seed) * stats.t.ppf(0.975, len(per_seed) - 1)
    expected = f"{100 * mean:.1f} ± {100 * ci:.1f}"
    text = render_from(evidence, tmp_path / "docs")

    def cell(text: str) -> str:
        return next(li for li in text.splitlines() if li.startswith("| 0.2 |")).split(" | ")[1]

    assert cell(text) == expected
    assert cell((tiny / "docs" / "results.md").read_text()) != expected


# ----------------------------------------------------------------- the committed report


@pytest.mark.parametrize("name", COMMITTED)
def test_each_committed_report_follows_from_its_committed_evidence(name, tmp_path, no_checkpoints):
    evidence = DOCS / name / EVIDENCE
    assert (evidence / "report.json").is_file(), (
        f"docs/{name}.md is committed without its evidence: `python reproduce.py` publishes "
        f"{evidence.relative_to(ROOT)} with it"
    )
    committed = (DOCS / f"{name}.md").read_text()
    report.render_published(evidence, tmp_path)
    again = (tmp_path / f"{name}.md").read_text()
    assert verdicts(again) == verdicts(committed)
    assert sum("**Verdict" in li for li in verdicts(committed)) >= 1
