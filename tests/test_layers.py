"""The package's layering (docs/architecture.md), read off the import statements of `src/repa`: a module imports only
from layers below it (or from its own part), the three siblings never import each other, and no part imports
another in a cycle. Function-level imports count as much as top-level ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "repa"

# lowest first; a module may import its own part and any part of a lower layer
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        (
            "errors",
            "assets",
            "seeds",
            "fileio",
            "hardware",
            "distributed",
            "transport",
            "models",
            "losses",
            "samplers",
            "encoders",
            "data",
            "config",
        ),
    ),  # fmt: skip
    ("checkpoint I/O + conversion", ("checkpoint", "architecture", "convert", "loading")),
    ("generation", ("generate",)),
    ("training | evaluation | analysis", ("training", "evaluation", "analysis")),
    ("cli", ("cli", "__main__")),
]
SIBLINGS = {"training", "evaluation", "analysis"}  # same layer, but none may import another


def part_of(module: str) -> str:
    """`repa.data.shards` -> "data"; `repa` itself -> "" (the package root)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def layer_of(part: str) -> int:
    for index, (_, parts) in enumerate(LAYERS):
        if part in parts:
            return index
    raise KeyError(part)


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, imported repa module) for every import statement of a file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "repa"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "repa":
                continue
            if target == "repa":  # `from repa import distributed`
                found += [(node.lineno, f"repa.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def edges(src: Path = SRC) -> list[tuple[str, int, str, str]]:
    """(file, line, importing part, imported part) for imports that cross parts."""
    out = []
    for path in sorted(src.rglob("*.py")):
        here = part_of(module_name(path, src))
        for line, target in imports_of(path, src):
            there = part_of(target)
            if there != here and there:
                out.append((str(path.relative_to(src.parent)), line, here, there))
    return out


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for file, line, here, there in edges(src):
        if not here:  # repa/__init__.py re-exports nothing from above the core
            here = "assets"
        if layer_of(there) > layer_of(here):
            bad.append(f"{file}:{line}: {here} ({LAYERS[layer_of(here)][0]}) imports {there} (a higher layer)")
        elif here in SIBLINGS and there in SIBLINGS:
            bad.append(f"{file}:{line}: {here} imports its sibling {there}")
    return bad


def cycles(src: Path = SRC) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for _, _, here, there in edges(src):
        if here:
            graph.setdefault(here, set()).add(there)
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt])
            elif not state.get(nxt):
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    return found


def test_every_part_has_a_layer():
    parts = {part_of(module_name(p)) for p in SRC.rglob("*.py")} - {""}
    for part in parts:
        layer_of(part)  # KeyError names a new part that docs/architecture.md and LAYERS must place


def test_no_import_from_a_higher_layer_or_a_sibling():
    assert violations() == []


def test_no_import_cycle_between_parts():
    assert cycles() == []


@pytest.mark.parametrize(
    "where, statement, expected",
    [
        ("evaluation/extra.py", "from repa.training.setup import build_model\n", "evaluation imports its sibling"),
        ("data/extra.py", "def f():\n    from repa.loading import load_model\n", "data (core) imports loading"),
        ("loading_extra.py", "import repa.generate\n", "imports generate (a higher layer)"),
    ],
)
def test_the_rule_catches_a_forbidden_import(tmp_path, where, statement, expected):
    """The checker itself: a copy of the package with one forbidden import added fails with a message naming it."""
    import shutil

    copy = tmp_path / "repa"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / where).write_text(statement)
    if where == "loading_extra.py":  # a new top-level module joins the checkpoint layer for this check
        LAYERS[1] = (LAYERS[1][0], (*LAYERS[1][1], "loading_extra"))
    try:
        found = violations(copy)
    finally:
        LAYERS[1] = ("checkpoint I/O + conversion", ("checkpoint", "architecture", "convert", "loading"))
    assert any(expected in v for v in found), found
