"""Habits the project keeps, checked: the commit hook and the test command lint with one ruff (the pin
in .pre-commit-config.yaml is the pin in pyproject.toml's dev extra, and the installed ruff is that
version); modules and functions stay short, or say why not."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dev_pin(package: str) -> str:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [m.group(1) for r in dev if (m := re.fullmatch(rf"{package}==(\S+)", r))]
    return pin


def test_the_hooks_pin_the_projects_ruff() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in config["repos"] for h in repo["hooks"]}
    assert {"ruff", "ruff-format"} <= set(hooks)
    for hook in ("ruff", "ruff-format"):
        assert hooks[hook]["additional_dependencies"] == [f"ruff=={dev_pin('ruff')}"]


def test_the_installed_ruff_is_the_pinned_one() -> None:
    assert version("ruff") == dev_pin("ruff")


# The issue-15 sizes: a module over 600 lines, or a function over 80, says why it is not split.
PACKAGES = ("agent", "controller", "runtime", "localmodel")
MODULE_LINES, FUNCTION_LINES = 600, 80


def sources() -> list[tuple[Path, str, ast.Module]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            out.append((path.relative_to(ROOT), text, ast.parse(text)))
    return out


def test_a_module_over_600_lines_says_why_in_its_docstring() -> None:
    unexplained = [
        f"{path}: {len(text.splitlines())} lines"
        for path, text, tree in sources()
        if len(text.splitlines()) > MODULE_LINES
        and f"over {MODULE_LINES} lines" not in (ast.get_docstring(tree) or "").lower()
    ]
    assert not unexplained, "split these, or say 'Over 600 lines because ...' in the docstring"


def test_a_function_over_80_lines_says_why() -> None:
    unexplained = []
    for path, text, tree in sources():
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length <= FUNCTION_LINES:
                continue
            # The reason: in the docstring, or in a comment on the def line (its signature's lines).
            signature = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
            why = f"over {FUNCTION_LINES} lines"
            if why not in (ast.get_docstring(node) or "").lower() and why not in signature.lower():
                unexplained.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    assert not unexplained, "split these, or say why ('over 80 lines because ...')"
