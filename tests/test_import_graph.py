"""The library's import graph: no circles, no private names across packages, no experiments.

Walks every module under ``src/influscope`` with :mod:`ast` (nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: The CLI runs the demo (``influscope demo``): the top layer may import it.
APPS = ("influscope.cli", "influscope.demo")
DEMO = "influscope.demo"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, top_level: bool) -> list[tuple[str, str | None]]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circles_at_module_level():
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for mod, name in _imports(p, top_level=True):
            target = f"{mod}.{name}" if f"{mod}.{name}" in mods else mod
            if target in mods and target != m:
                graph[m].add(target)
    # iterative DFS for a back edge
    state: dict[str, int] = {}
    for root in graph:
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        state[root] = 1
        path = [root]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                cycle = [*path[path.index(child) :], child]
                raise AssertionError("import circle: " + " → ".join(cycle))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)


def test_no_private_names_imported_across_packages():
    bad = []
    for m, p in _modules().items():
        for mod, name in _imports(p, top_level=False):
            if not mod.startswith("influscope") or not name:
                continue
            private = name.startswith("_") and not name.startswith("__")
            if private and _package(mod) != _package(m):
                bad.append(f"{m} imports {mod}.{name}")
    assert not bad, "private names imported across packages (make them public):\n" + "\n".join(bad)


def test_library_imports_neither_benchmarks_nor_the_demo():
    # at any depth, function-level imports included: experiment code lives under benchmarks/
    bad = []
    for m, p in _modules().items():
        for mod, name in _imports(p, top_level=False):
            full = f"{mod}.{name}" if name else mod  # `from influscope import demo` too
            if any(t == "benchmarks" or t.startswith("benchmarks.") for t in (mod, full)):
                bad.append(f"{m} imports {full}")
            demo = any(t == DEMO or t.startswith(DEMO + ".") for t in (mod, full))
            if demo and not m.startswith(APPS):
                bad.append(f"{m} imports {full}")
    assert not bad, "library modules import experiment code:\n" + "\n".join(sorted(set(bad)))


def test_every_pytest_raises_names_its_message():
    # a raised type alone cannot tell one refusal from another: match= the message
    bad = []
    for p in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "raises"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "pytest"
                and not any(k.arg == "match" for k in node.keywords)
            ):
                bad.append(f"{p.name}:{node.lineno}")
    assert not bad, "pytest.raises without match=: " + ", ".join(bad)


def test_public_names_are_listed_once_in_each_of_the_three_lists():
    """``influscope/__init__.py`` names its public API three times: ``_LAZY`` (resolved on
    first use), the ``TYPE_CHECKING`` imports (for IDEs) and ``__all__``; they must agree, and
    every lazy name must resolve to the object its module defines."""
    import importlib

    import influscope

    init = SRC / "influscope" / "__init__.py"
    tree = ast.parse(init.read_text())
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                typed.update({alias.name: imp.module for alias in imp.names})
    assert typed == influscope._LAZY
    eager = {n for n in influscope.__all__ if n not in influscope._LAZY}
    assert set(influscope.__all__) == eager | set(influscope._LAZY)
    assert len(influscope.__all__) == len(set(influscope.__all__))
    for name, module in influscope._LAZY.items():
        assert getattr(influscope, name) is getattr(importlib.import_module(module), name)
    for name in eager:  # the rest are imported eagerly (errors, version)
        assert name in vars(influscope)
