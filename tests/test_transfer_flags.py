"""The transfer flags `modelcache pull` and `modelcache agent` share (agent/transfer_flags.py): each
value judged while parsing, the same way for both, a bad one refused in one line naming the flag
(exit 2), never a traceback from deeper down."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcache.cli import main

# Only the flag under test is bad; parsing stops at it, before anything runs.
BAD = [
    # 20 GB/s and more overflowed SO_RCVBUF's C int (TypeError); a rate past float's range, float()
    (["--max-bandwidth", "2T"], "--max-bandwidth: '2T' is more than 1TB/s, which caps nothing"),
    (["--max-bandwidth", "99999999999999999999999999Ei"], "--max-bandwidth: '99999999999999999999999999Ei'"),
    (["--low-speed-limit", "2T"], "--low-speed-limit: '2T' is more than 1TB/s"),
    (["--concurrency", "99999999"], "--concurrency: 99999999 is out of range (1-256)"),
    (["--concurrency", "0"], "--concurrency: 0 is out of range (1-256)"),
    (["--concurrency", "many"], "--concurrency: 'many' is not a whole number (1-256)"),
]


@pytest.mark.parametrize(("flags", "message"), BAD)
@pytest.mark.parametrize("command", ["pull", "agent"])
def test_a_bad_transfer_flag_is_one_line_exit_2_for_both(
    command: str, flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["file:///x", str(tmp_path / "d")] if command == "pull" else ["--cache-dir", str(tmp_path / "c")]
    assert main([command, *args, *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"modelcache {command}: {message}"), err
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["pull", "agent"])
def test_the_highest_rate_and_concurrency_are_taken(command: str) -> None:
    from agent.cli import build_parser as agent_parser
    from agent.pull_cli import build_parser as pull_parser

    args = ["file:///x", "d"] if command == "pull" else ["--cache-dir", "c"]
    parser = pull_parser() if command == "pull" else agent_parser()
    ns = parser.parse_args(
        [*args, "--max-bandwidth", "1TB/s", "--concurrency", "256", "--low-speed-limit", "1T"]
    )
    assert (ns.max_bandwidth, ns.concurrency, ns.low_speed_limit) == (1e12, 256, 10**12)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["agent", "--cache-dir", "c", "--resync", "inf"],
            "--resync: must be a finite number greater than zero",
        ),
        (["agent", "--cache-dir", "c", "--retry-min", "nan"], "--retry-min: must be a finite number"),
    ],
)
def test_agent_waits_are_finite(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Every wait has a bound: an infinite resync or retry would never come.
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"modelcache agent: {message}")
