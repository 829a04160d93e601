"""``pull`` into a folder it can never publish to: a mount point (a freshly mounted, empty disk) and
a read-only folder. Said at once, in one line naming DEST and the fix, with no staging left."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return src


def test_an_empty_mount_point_as_dest_is_refused_at_once(tmp_path: Path, mounted: Path) -> None:
    src = source(tmp_path)
    for _ in range(2):  # the same line each time: nothing was staged
        r = run(f"file://{src}", str(mounted))
        assert r.returncode == 2, r.stderr
        assert r.stderr == (
            f"modelcache pull: DEST: {mounted} is a mount point; a pull publishes by renaming its staged "
            f"copy onto DEST, which a mount point cannot take; pull into a folder inside it, e.g. "
            f"{mounted / 'model'}\n"
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "src"]
        assert list(mounted.iterdir()) == []
    # The way out the line names works.
    r = run(f"file://{src}", str(mounted / "model"))
    assert r.returncode == 0, r.stderr
    assert (mounted / "model" / "config.json").read_text() == "{}"


def test_a_read_only_dest_folder_is_refused_at_once(tmp_path: Path, mounted: Path) -> None:
    src = source(tmp_path)
    done = subprocess.run(["mount", "-o", "remount,ro", str(mounted)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {done.stderr.decode().strip()}")
    for dest in (mounted, mounted / "model"):
        for _ in range(2):
            r = run(f"file://{src}", str(dest))
            assert r.returncode == 2, r.stderr
            assert r.stderr == (
                f"modelcache pull: DEST: {mounted} is on a read-only filesystem; mount it read-write "
                "or name another folder\n"
            )
            assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "src"]


@pytest.mark.parametrize("dest", ["/etc/modelcache-test-x", "/usr/share/modelcache-test-x", "link/x"])
def test_system_folders_are_refused_as_dest_also_through_a_link(tmp_path: Path, dest: str) -> None:
    src = source(tmp_path)
    (tmp_path / "link").symlink_to("/etc")
    target = dest if dest.startswith("/") else str(tmp_path / dest)
    r = run(f"file://{src}", target)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("modelcache pull: DEST: '"), r.stderr
    assert "is (or is under) a system folder" in r.stderr
    assert r.stderr.count("\n") == 1
    assert not Path("/etc/modelcache-test-x").exists() and not Path("/usr/share/modelcache-test-x").exists()
    assert not Path("/etc/.modelcache").exists()
