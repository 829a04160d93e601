"""The agent's command line on first contact: documents that are bad at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BAD = "apiVersion: serving.kserve.io/v1alpha1\nkind: LocalModelCache\nmetadata: {name: x}\nspec: [\n"


def agent(tmp_path: Path, docs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", "agent", "--node-name", "box",
         "--cache-dir", str(tmp_path / "cache"), "--standalone", str(docs),
         "--health-addr", "off", "--metrics-addr", "off", "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_once_with_invalid_documents_at_start_exits_2(tmp_path: Path) -> None:
    docs = tmp_path / "models.yaml"
    docs.write_text(BAD)
    r = agent(tmp_path, docs)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # said once, by the command
    assert r.stderr.startswith(f"modelcache agent: --standalone: {docs}: not valid YAML")
    assert "last good documents" not in r.stderr


def test_once_with_missing_documents_exits_2(tmp_path: Path) -> None:
    r = agent(tmp_path, tmp_path / "nope.yaml")
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        f"modelcache agent: --standalone: {tmp_path / 'nope.yaml'} does not exist; "
        "pass a YAML file or folder to --standalone\n"
    )
