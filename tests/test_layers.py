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
