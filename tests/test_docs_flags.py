"""The docs and ``--help`` cannot drift: every subcommand's flags, read from its parser object, are in
the command's flag table and usage block in docs/commands.md (serve's also in docs/runtime.md), every
flag those name exists, and every flag has a help text. The serve plan's keys are the documented ones."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent import pull_cli, status_cli
from controller import cli as controller_cli
from runtime import cli as runtime_cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS_DOC = (ROOT / "docs" / "commands.md").read_text()
CONFIGURATION_DOC = (ROOT / "docs" / "configuration.md").read_text()
RUNTIME_DOC = (ROOT / "docs" / "runtime.md").read_text()

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "pull": pull_cli.build_parser,
    "agent": agent_cli.build_parser,
    "status": status_cli.build_parser,
    "controller": controller_cli._parser,
    "serve": runtime_cli._parser,
}
FLAG = re.compile(r"--(?:\[no-\])?[a-z][a-z0-9_-]*")


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole line) to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    rest = text[start + len(heading) + 2 :]
    end = re.search(rf"^{level} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def flags_in(text: str) -> set[str]:
    found: set[str] = set()
    for flag in FLAG.findall(text):
        if "[no-]" in flag:
            found |= {flag.replace("[no-]", ""), flag.replace("[no-]", "no-")}
        else:
            found.add(flag)
    return found


def table_flags(text: str) -> set[str]:
    """Flags named in the first column of the section's tables."""
    return flags_in("\n".join(line.split("|")[1] for line in text.splitlines() if line.startswith("| ")))


def usage_flags(text: str) -> set[str] | None:
    """Flags in the section's usage block (the code block that starts with ``modelcache``), if any."""
    block = re.search(r"```\n(modelcache .*?)```", text, re.DOTALL)
    return flags_in(block.group(1)) if block else None


def docs_of(command: str) -> str:
    own = section(COMMANDS_DOC, f"## `modelcache {command}`")
    if command == "serve":
        # The launcher's own table; the KServe server flags below it are another command's.
        own += section(RUNTIME_DOC, "## Flags and environment").split("\n### ")[0]
    return own


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings]


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_is_in_the_docs_table_and_usage(command: str) -> None:
    doc = docs_of(command)
    table, usage = table_flags(doc), usage_flags(doc)
    for action in actions(PARSERS[command]()):
        names = set(action.option_strings)
        assert names & table, f"modelcache {command} {action.option_strings[0]}: not in its docs' flag table"
        if usage is not None:
            assert names & usage, f"modelcache {command} {action.option_strings[0]}: not in its docs' usage"


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_the_docs_name_exists(command: str) -> None:
    doc = docs_of(command)
    known = {o for a in actions(PARSERS[command]()) for o in a.option_strings}
    named = table_flags(doc) | (usage_flags(doc) or set())
    assert named <= known, f"modelcache {command}: the docs name flags it does not take: {named - known}"


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_has_a_help_text(command: str) -> None:
    missing = [a.option_strings[0] for a in actions(PARSERS[command]()) if not a.help]
    assert missing == [], f"modelcache {command}: flags without help: {missing}"


def test_the_drift_checks_can_fail() -> None:
    doc = "```\nmodelcache x [--a]\n```\n\n| flag | meaning |\n|---|---|\n| `--a`, `--[no-]b` | ... `--c` |\n"
    assert usage_flags(doc) == {"--a"}
    assert table_flags(doc) == {"--a", "--b", "--no-b"}  # not --c: only the first column names flags


def test_the_serve_plan_keys_are_the_documented_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_runtime_preflight import make_model

    make_model(tmp_path / "m")
    assert runtime_cli.main(["--model_dir", str(tmp_path / "m"), "--gpus-per-node", "1", "--dry-run"]) == 0
    keys = set(json.loads(capsys.readouterr().out))
    row = next(line for line in docs_of("serve").splitlines() if line.startswith("| `--dry-run`"))
    documented = set(re.findall(r"`([a-z_]+)`", row.split("|")[2]))
    assert keys <= documented, f"dry-run keys not in docs/commands.md: {keys - documented}"


def test_pull_help_names_every_kind_of_source() -> None:
    text = " ".join(pull_cli.build_parser().format_help().split())
    for kind in ("hf://", "s3://", "http(s)://", "file:///PATH", "a plain /PATH"):
        assert kind in text
    assert "`file:///PATH` or `/PATH`" in section(CONFIGURATION_DOC, "## Sources")
