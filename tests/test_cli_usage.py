"""Usage errors of every subcommand: one line, exit 2, and no abbreviated flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcache.cli import main

# One flag per subcommand, shortened to a prefix argparse would otherwise take for it.
ABBREVIATED = [
    ("agent", ["--node-name", "n", "--cache-dir", "/nonexistent", "--standalon", "x"], "--standalon"),
    ("pull", ["hf://org/m", "/tmp/x", "--concurren", "4"], "--concurren"),
    ("status", ["--cache-dir", "/tmp", "--outp", "json"], "--outp"),
    ("controller", ["--standalon", "x", "--once"], "--standalon"),
]


@pytest.mark.parametrize(("command", "argv", "flag"), ABBREVIATED)
def test_abbreviations_are_not_flags(
    command: str, argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # (`serve` passes unknown flags through to vLLM; its parser has refused abbreviations since it
    # was written: tests/test_runtime_cli.py.)
    code = main([command, *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert f"unrecognized arguments: {flag}" in err
    assert "Traceback" not in err


def test_status_of_a_file_says_it_is_not_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "cache"
    file.write_text("not a cache")
    assert main(["status", "--cache-dir", str(file)]) == 2
    err = capsys.readouterr().err
    assert err == f"modelcache status: --cache-dir: {file} is not a folder; pass the agent's cache folder\n"


def test_status_of_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--cache-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"modelcache status: --cache-dir: {tmp_path / 'nope'} does not exist\n"
