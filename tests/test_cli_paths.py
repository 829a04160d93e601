"""A cache folder or DEST that can never work (a file, a read-only filesystem, ``/``, a system folder)
is one line naming the path and the fix, exit 2, no traceback: for ``agent`` and ``pull`` alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_agent_faults import read_only

DOCS = (
    "apiVersion: serving.kserve.io/v1alpha1\nkind: LocalModelNodeGroup\nmetadata: {name: g}\n"
    "spec: {storageLimit: 1Gi}\n"
)


def modelcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", *args], capture_output=True, text=True, timeout=60
    )


def agent(tmp_path: Path, cache_dir: str) -> subprocess.CompletedProcess[str]:
    docs = tmp_path / "docs.yaml"
    docs.write_text(DOCS)
    return modelcache(
        "agent", "--node-name", "box", "--cache-dir", cache_dir, "--standalone", str(docs),
        "--health-addr", "off", "--metrics-addr", "off", "--once",
    )  # fmt: skip


def one_line(r: subprocess.CompletedProcess[str], expected: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr == expected + "\n"


def test_agent_cache_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for given in (tmp_path / "f", tmp_path / "f" / "sub"):
        one_line(
            agent(tmp_path, str(given)),
            f"modelcache agent: --cache-dir: {tmp_path / 'f'} is a file, not a folder; "
            "name a folder (it is created if missing)",
        )


def test_agent_cache_dir_on_a_read_only_filesystem(tmp_path: Path) -> None:
    with read_only(tmp_path / "ro") as ro:
        r = agent(tmp_path, str(ro / "cache"))
    one_line(
        r,
        f"modelcache agent: --cache-dir: {ro} is on a read-only filesystem; mount it read-write or "
        "name another folder",
    )


@pytest.mark.parametrize("path", ["/", "/etc/modelcache", "/usr/lib/x"])
def test_agent_cache_dir_that_is_a_system_folder(tmp_path: Path, path: str) -> None:
    r = agent(tmp_path, path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "system folder" in r.stderr and "/var/lib/modelcache" in r.stderr


def test_agent_cache_dir_through_a_link_to_root(tmp_path: Path) -> None:
    (tmp_path / "root").symlink_to("/")
    r = agent(tmp_path, str(tmp_path / "root"))
    assert r.returncode == 2, r.stderr
    assert r.stderr == (
        "modelcache agent: --cache-dir: '/' is a shared system folder: give a folder of its own below "
        "it, e.g. /var/lib/modelcache\n"
    )


def test_pull_into_a_read_only_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with read_only(tmp_path / "ro") as ro:
        r = modelcache("pull", str(src), str(ro / "model"))
    one_line(
        r,
        f"modelcache pull: DEST: {ro} is on a read-only filesystem; mount it read-write or name "
        "another folder",
    )
    assert not (ro / "model").exists()


def test_pull_under_a_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (tmp_path / "f").write_text("x")
    one_line(
        modelcache("pull", str(src), str(tmp_path / "f" / "model")),
        f"modelcache pull: DEST: {tmp_path / 'f'} is a file, not a folder; name a folder (it is "
        "created if missing)",
    )
