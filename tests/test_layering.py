"""The package is layered top to bottom, without import cycles: an ``ast`` scan of every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

SRC = ROOT / "src"
# Lower layers never import higher ones: base -> chip -> robustness -> training -> cli -> paper ->
# the entry scripts. The package root (``cimsim/__init__.py``) re-exports the chip's public API.
LAYERS = {
    "cimsim.validation": 0,
    "cimsim.files": 0,
    "cimsim.data": 0,
    "cimsim": 1,
    "cimsim.chip": 1,
    "cimsim.wide_resnet": 1,
    "cimsim.robustness": 2,
    "cimsim.tracking": 2,
    "cimsim.training": 3,
    "cimsim.cli": 4,
    "paper": 5,
    "train": 6,
    "evaluate": 6,
    "reproduce": 6,
}
MAX_LINES = 400
SHELL_LINES = 150  # the entry scripts compose, instantiate and call one library function


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC if SRC in path.parents else ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer(module: str) -> int | None:
    """The layer of ``module``: its longest prefix in ``LAYERS`` (``None``: not ours)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py")) + sorted((ROOT / "paper").rglob("*.py"))
    return files + [ROOT / f"{name}.py" for name in ("train", "evaluate", "reproduce")]


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from cimsim.chip import layers`` imports the module cimsim.chip.layers
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sources()}
    known = set(files)
    return {m: imports(p, known) - {m} for m, p in files.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in graph() if layer(m) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def test_no_upward_import():
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(upward)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``g`` as a list of modules (first == last), or ``None``; iterative DFS."""
    colour = dict.fromkeys(g, 0)  # 0 new, 1 on the stack, 2 done
    for start in g:
        if colour[start]:
            continue
        stack, path = [(start, iter(sorted(g[start])))], [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(g[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_short_and_says_its_job(path):
    lines = path.read_text().splitlines()
    most = SHELL_LINES if path.parent == ROOT else MAX_LINES
    assert len(lines) <= most, f"{len(lines)} lines (at most {most}: split it by job)"
    doc = ast.get_docstring(ast.parse("\n".join(lines)))
    assert doc, "opens without a docstring saying its job"
