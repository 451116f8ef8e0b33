"""docs/performance.md's benchmark tables are ``benchmarks/report.py``'s rendering of the JSON
that ``benchmarks/run.py`` wrote, committed beside the guide: no figure there is typed by hand."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics

import pytest

from conftest import ROOT

PUBLISHED = sorted((ROOT / "docs" / "performance").glob("*.json"))


def _report():
    path = ROOT / "benchmarks" / "report.py"
    spec = importlib.util.spec_from_file_location("benchmark_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _report()


def test_some_benchmark_is_published():
    assert PUBLISHED, "docs/performance/ holds no benchmark result"


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_the_guides_block_is_the_rendering_of_its_json(path):
    found = report.block(report.GUIDE.read_text(), path.stem)
    assert found is not None, f"docs/performance.md has no block for {path.name}"
    assert found.group(1) == report.render(json.loads(path.read_text())) + "\n"


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_the_published_ratios_follow_from_its_timings(path):
    """The medians are those of the per-round seconds, and each ratio that names two rows is
    their quotient (``met`` against its target): a hand-edited JSON fails here."""
    result = json.loads(path.read_text())
    ms = result["median_ms"]
    for name, seconds in result["seconds"].items():
        assert ms[name] == pytest.approx(1e3 * statistics.median(seconds), rel=1e-12)
    pairs = {
        "tiled step / digital step": ("tiled step L=1", "digital step"),
        "tiled chip eval / digital eval": ("tiled chip eval", "digital eval"),
        "chip eval / digital eval": ("chip eval", "digital eval"),
    }
    for r in result["ratios"]:
        if r["ratio"] in pairs:
            a, b = pairs[r["ratio"]]
            assert r["value"] == pytest.approx(ms[a] / ms[b], rel=1e-12)
        op, limit = r["target"].split()
        assert r["met"] == (
            r["value"] >= float(limit) if op == ">=" else r["value"] <= float(limit)
        )


def test_every_block_of_the_guide_has_its_json():
    names = re.findall(r"<!-- benchmark:([\w.-]+):begin -->", report.GUIDE.read_text())
    assert names and sorted(names) == [p.stem for p in PUBLISHED]


def test_publish_replaces_only_its_block(tmp_path):
    """``--publish`` copies the JSON and rewrites its block; the text around it stays."""
    result = {
        "argv": ["--repeats", "1"], "cpu_count": 2, "machine": "x86_64", "date": "today",
        "commit": "abc", "torch": "2", "wall_s": 60.0, "workload": "w",
        "aihwkit_lightning": "skipped", "seconds": {"a": [0.001, 0.003]},
        "median_ms": {"a": 2.0}, "ratios": [
            {"ratio": "a / b", "value": 1.25, "target": "<= 1.5", "met": True}
        ], "peak_step_bytes": {"digital": 2**20},
    }  # fmt: skip
    source = tmp_path / "run.json"
    source.write_text(json.dumps(result))
    guide = tmp_path / "guide.md"
    guide.write_text("before\n<!-- benchmark:x:begin -->\nold\n<!-- benchmark:x:end -->\nafter\n")
    report.publish(source, tmp_path / "pub" / "x.json", guide)
    text = guide.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| a | 2.0 | 1.0 | 3.0 |" in text and "| a / b | 1.250 | <= 1.5 | yes |" in text
    assert "`python benchmarks/run.py --repeats 1`" in text
    assert json.loads((tmp_path / "pub" / "x.json").read_text()) == result
