"""The layers hold (DESIGN.md, "Layers"): bot -> core -> storage, nothing imports upward, and
core/ and storage/ never import Slack. Every import counts, a function's own included, and
`importlib.import_module("...")` with a literal name too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["storage", "core", "bot"]  # lowest first; a package may import its own and those below
SLACK = ("slack_sdk", "slack_bolt")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, wherever it is written."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(layer: str) -> list[str]:
    above = LAYERS[LAYERS.index(layer) + 1 :]
    forbidden = tuple(above) + (SLACK if layer in ("core", "storage") else ())
    out = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imported(path):
            if module.split(".")[0] in forbidden:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("layer", ["storage", "core"])
def test_nothing_imports_upward_and_only_bot_speaks_slack(layer: str) -> None:
    assert violations(layer) == []


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The check above cannot pass by not looking."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import bot.router\n"
        "from slack_sdk import WebClient\n"
        "def f():\n"
        "    from core import health\n"
        "    import importlib\n"
        "    importlib.import_module('slack_bolt.app')\n"
        "from . import sibling\n"
    )
    assert [m for _, m in imported(sample)] == [
        "bot.router",
        "slack_sdk",
        "core",
        "importlib",
        "slack_bolt.app",
    ]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a function's own imports too: a deferred import
    hides a circle from Python at start-up, not from a reader). ``from a import b`` counts as
    importing ``a.b`` when that is a module, else ``a``."""
    paths = {
        module_name(p): p
        for layer in LAYERS
        for p in (ROOT / layer).rglob("*.py")
        if "migrations" not in p.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in paths:
                        edges.add(sub)
                    elif node.module in paths:
                        edges.add(node.module)
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    """A package's __init__ importing its own modules is not a circle unless one of them
    imports the package back."""
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
