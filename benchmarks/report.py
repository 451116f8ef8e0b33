"""Markdown tables of a benchmark result (``benchmarks/run.py``'s JSON), for docs/performance.md.

    python benchmarks/report.py benchmarks/results/latest.json             # print the tables
    python benchmarks/report.py RESULT.json --publish docs/performance/cpu.json
                                # copy the JSON there and rewrite its block in the guide

The guide's tables sit between ``<!-- benchmark:NAME:begin -->`` and ``<!-- benchmark:NAME:end
-->`` (``NAME`` the published JSON's stem); tests/test_benchmark_report.py checks that every
such block is this rendering of its committed JSON, so no figure is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def render(result: dict) -> str:
    """The command, machine, date and wall time; the variants' times; the ratios and targets."""
    command = shlex.join(["python", "benchmarks/run.py", *result.get("argv", [])])
    lines = [
        f"`{command}` on {result['cpu_count']} CPUs ({result['machine']}), "
        f"{result.get('date', 'date not recorded')}, "
        f"commit {result.get('commit', 'unknown')}, torch {result['torch']}; wall time "
        f"{result.get('wall_s', float('nan')) / 60:.1f} min. {result['workload']}. "
        f"aihwkit-lightning: {result['aihwkit_lightning']}.",
        "",
        "| variant | median ms | min ms | max ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in result["seconds"].items():
        median = result["median_ms"][name]
        lines.append(
            f"| {name} | {median:.1f} | {1e3 * min(seconds):.1f} | {1e3 * max(seconds):.1f} |"
        )
    lines += ["", "| ratio | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for r in result["ratios"]:
        met = "yes" if r["met"] else "**no**"
        lines.append(f"| {r['ratio']} | {r['value']:.3f} | {r['target']} | {met} |")
    peaks = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result["peak_step_bytes"].items())
    lines += ["", f"Peak memory of one step: {peaks}."]
    return "\n".join(lines)


def block(text: str, name: str) -> re.Match | None:
    """The generated block ``name`` of a guide's text (markers included), or None."""
    tag = re.escape(f"benchmark:{name}")
    pattern = rf"<!-- {tag}:begin -->\n(.*?)<!-- {tag}:end -->"
    return re.search(pattern, text, re.S)


def publish(result_path: Path, target: Path, guide: Path = GUIDE) -> None:
    """Copy the result to ``target`` and replace its block in ``guide`` with its rendering."""
    result = json.loads(result_path.read_text())
    text = guide.read_text()
    found = block(text, target.stem)
    if found is None:
        raise SystemExit(f"{guide} has no <!-- benchmark:{target.stem}:begin/end --> block")
    rendered = render(result)  # before anything is written: a malformed result changes nothing
    target.parent.mkdir(parents=True, exist_ok=True)
    if result_path.resolve() != target.resolve():
        shutil.copyfile(result_path, target)
    begin, end = found.span(1)
    guide.write_text(text[:begin] + rendered + "\n" + text[end:])
    print(f"wrote {target} and its block in {guide}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("result", type=Path, help="a JSON written by benchmarks/run.py")
    p.add_argument("--publish", type=Path, help="copy it there and update its guide block")
    args = p.parse_args(argv)
    if args.publish is None:
        print(render(json.loads(args.result.read_text())))
    else:
        publish(args.result, args.publish)


if __name__ == "__main__":
    main()
