"""The repository stands alone: nothing in it points to a file outside it."""

from __future__ import annotations

import subprocess

from conftest import ROOT

# Spelled in pieces so this file does not match itself.
OUTSIDE = ("MODEL" + ".md", "../" + "shared", "/work/" + "shared")


def test_no_file_refers_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".txt", ""} or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{name}: {ref}" for ref in OUTSIDE if ref in text]
    assert not offenders, "\n".join(offenders)
    assert (ROOT / "docs" / "model.md").is_file()  # where every model reference points
