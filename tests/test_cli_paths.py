"""A cache folder or DEST that can never work (a file, a read-only filesystem, ``/``, a system folder)
is one line naming the path and the fix, exit 2, no traceback: for ``agent`` and ``pull`` alike."""

from __future__ import annotations

import os
import shutil
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


def without_dac(*args: str) -> subprocess.CompletedProcess[str]:
    """``modelcache ARGS`` as root without the capabilities that pass every permission check
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a folder of another owner's, 0700, is closed to it."""
    return subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
            sys.executable,
            "-m",
            "modelcache",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_folder_above_the_cache_or_dest_this_user_may_not_search_is_one_line(tmp_path: Path) -> None:
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to take away the permission checks' bypass")
    (tmp_path / "x" / "a").mkdir(parents=True)
    os.chown(tmp_path / "x", 65532, 65532)
    (tmp_path / "x").chmod(0o700)  # another user's: nothing below it can even be looked at
    docs = tmp_path / "docs.yaml"
    docs.write_text(DOCS)
    cache = str(tmp_path / "x" / "a" / "cache")
    hidden = str(tmp_path / "x" / "a" / "docs.yaml")
    for argv, prefix in (
        (
            ["agent", "--node-name", "box", "--cache-dir", cache, "--standalone", str(docs), "--once"],
            "agent: --cache-dir",
        ),
        (["status", "--cache-dir", cache], "status: --cache-dir"),
        (
            [
                "agent",
                "--node-name",
                "box",
                "--cache-dir",
                str(tmp_path / "c"),
                "--standalone",
                hidden,
                "--once",
            ],
            "agent: --standalone",
        ),
        (["controller", "--standalone", hidden, "--once"], "controller"),
        (["pull", "file:///etc/hostname", str(tmp_path / "x" / "a" / "d")], "pull: DEST"),
    ):
        r = without_dac(*argv)
        if r.returncode == 2 and "setpriv:" in r.stderr:
            pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"modelcache {prefix}: {tmp_path / 'x' / 'a'}"), r.stderr
        assert "Permission denied" in r.stderr and "search (x) permission" in r.stderr, r.stderr
    (tmp_path / "x").chmod(0o755)  # pytest's clean-up
