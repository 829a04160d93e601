"""``modelcache pull`` counts in one unit: decimal megabytes (1 MB = 1,000,000 bytes) in the progress
bar and the summary, as ``--max-bandwidth 50MB/s`` means; ``--help`` says so."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from agent.pull_cli import _Bar, build_parser


def test_the_progress_bar_counts_decimal_megabytes() -> None:
    out = io.StringIO()
    bar = _Bar(out, enabled=True)
    bar.start(total_bytes=5_000_000, done_bytes=0, files=2)
    bar.advance(5_000_000)
    bar.close()
    assert "5.00MB/5.00MB" in out.getvalue()  # binary units would show 4.77MB


def test_the_summary_gives_megabytes_and_exact_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"\0" * 2_500_000)
    r = subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", str(src), str(tmp_path / "m"), "--quiet"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 file, 2.5 MB (2500000 bytes, 2500000 transferred) in " in r.stdout
    assert re.search(r" s, \d+\.\d MB/s, ", r.stdout), r.stdout


def test_help_states_the_units() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "1 MB = 1,000,000 bytes" in text
    assert "50Mi or 50MiB/s is 52,428,800" in text
