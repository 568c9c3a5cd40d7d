"""The package rules of ARCHITECTURE.md, checked on the source: module and function sizes, no import cycle
between files, and who may import whom (DESIGN.md: planner imports none of the runtime; launch does not
import benchmarks)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("planner", "offload", "optim", "launch", "benchmarks", "examples")
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, tree: ast.AST, path: Path) -> set[str]:
    """Project modules `name` imports at run time (anywhere in the file; TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from pkg import module`: the module, not the package
                    found.add(sub)
                elif base in MODULES:
                    found.add(base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: _imported(name, ast.parse(path.read_text()), path) for name, path in MODULES.items()}


GRAPH = _graph()


def test_no_module_is_too_long():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long.items() if k > MAX_MODULE_LINES} == {}


def test_no_function_is_too_long():
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{node.name}: {lines} lines")
    assert found == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_files():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("planner", ("offload", "launch", "benchmarks", "examples")),
        ("optim", ("planner", "offload", "launch", "benchmarks", "examples")),
        ("offload", ("launch", "benchmarks", "examples")),
        ("launch", ("benchmarks", "examples")),
    ],
)
def test_who_may_import_whom(package, forbidden):
    bad = sorted(
        f"{a} -> {b}"
        for a, deps in GRAPH.items()
        if a.split(".")[0] == package
        for b in deps
        if b.split(".")[0] in forbidden
    )
    assert bad == []


def test_one_producer_of_ds_config():
    """memtier's DeepSpeed config comes from planner/emit.py alone: no other module of the product builds or
    patches its ZeRO block (benchmarks configure their DeepSpeed competitors themselves)."""
    writers = sorted(
        os.path.relpath(path, ROOT)
        for name, path in MODULES.items()
        if name != "planner.emit"
        and name.split(".")[0] in ("planner", "launch", "offload", "examples")
        and '"zero_optimization"' in path.read_text()
    )
    assert writers == []
