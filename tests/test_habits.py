"""The commit hook and the test command lint with one ruff: the pin in .pre-commit-config.yaml is
the pin in pyproject.toml's dev extra, and the installed ruff is that version."""

from __future__ import annotations

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
