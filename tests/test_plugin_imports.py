"""The modules of each plugin import one another as a tree (no circle), function-level imports included.

A circle through an import inside a function does not fail when the plugin loads, only when the function
runs first in the wrong order, so it is found here from the source: every ``import`` / ``from ... import``
statement of a plugin's modules (ast, wherever it stands) is an edge between two modules of the plugin, and
the graph must have no cycle. The detector itself is checked on a package built with such a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def _module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> source file for every module of the package (the package itself is its
    ``__init__``)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imported(node, module: str, is_package: bool) -> list[str]:
    """The dotted names one import statement of ``module`` may load (a ``from X import Y`` may name a
    submodule X.Y or an attribute of X: both are returned, unknown ones are dropped later)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in its source)."""
    modules = _module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in _imported(node, name, path.name == "__init__.py") if t in modules]
            # `from pkg import sub` loads pkg.sub; the package itself counts only when nothing more specific
            # (a submodule) is named
            specific = [t for t in targets if t != package.name]
            edges.update(specific or targets)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", sorted(p.name for p in PLUGINS.iterdir() if (p / "__init__.py").exists()))
def test_plugin_modules_import_each_other_as_a_tree(package):
    graph = import_graph(PLUGINS / package)
    assert len(graph) > 1
    cycle = find_cycle(graph)
    assert cycle is None, f"{package}: import circle " + " -> ".join(cycle)


def test_the_graph_sees_function_level_and_relative_imports_and_finds_a_circle(tmp_path):
    pkg = tmp_path / "toy_circle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from toy_circle.low import X\n")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from toy_circle import low\n\ndef f():\n    from toy_circle.b import g\n    return g()\n")
    (pkg / "b.py").write_text("from . import low\n\ndef g():\n    from .a import f\n    return f\n")
    graph = import_graph(pkg)
    assert graph == {"toy_circle": {"toy_circle.low"}, "toy_circle.low": set(),
                     "toy_circle.a": {"toy_circle.low", "toy_circle.b"},
                     "toy_circle.b": {"toy_circle.low", "toy_circle.a"}}
    assert find_cycle(graph) == ["toy_circle.a", "toy_circle.b", "toy_circle.a"]
    (pkg / "b.py").write_text("from . import low\n\ndef g():\n    return low.X\n")
    assert find_cycle(import_graph(pkg)) is None


def test_diffae_evaluate_and_commands_share_a_module_below_them():
    graph = import_graph(PLUGINS / "medcfx_diffae")
    assert "medcfx_diffae.commands" not in graph["medcfx_diffae.evaluate"]
    assert "medcfx_diffae.common" in graph["medcfx_diffae.evaluate"]
    assert "medcfx_diffae.common" in graph["medcfx_diffae.commands"]
