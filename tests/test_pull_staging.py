"""A failed or interrupted ``modelcache pull`` says where its partial download is and that the same
command resumes it; a failure no rerun gets past (the source gone, access denied) drops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.test_agent_faults import tmpfs

MiB = 1 << 20


def modelcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "w.bin").write_bytes(os.urandom(3 * MiB))
    return src


def test_a_full_disk_keeps_the_staging_and_says_where_then_a_rerun_resumes(tmp_path: Path) -> None:
    src = source(tmp_path)
    with tmpfs(tmp_path / "small", "2m") as small:
        r = modelcache(str(src), str(small / "m"))
        staging = small / ".modelcache" / "pull" / "staging" / "m"
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("modelcache pull: "), r.stderr
        assert "no space left" in r.stderr
        assert r.stderr.endswith(f"; partial download kept in {staging}; run the same command to resume\n")
        assert staging.is_dir()
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        again = modelcache(str(src), str(small / "m"))
        assert again.returncode == 0, again.stderr
        assert (small / "m" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
        assert not staging.exists()


def test_a_final_failure_drops_the_staging(tmp_path: Path) -> None:
    src = source(tmp_path)
    with tmpfs(tmp_path / "small", "2m") as small:
        staging = small / ".modelcache" / "pull" / "staging" / "m"
        assert modelcache(str(src), str(small / "m")).returncode == 1
        assert staging.is_dir()
        (src / "w.bin").unlink()
        (src / "config.json").unlink()
        src.rmdir()  # the source is gone: no rerun can finish what was staged
        r = modelcache(str(src), str(small / "m"))
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and "partial download" not in r.stderr, r.stderr
        assert not staging.exists()
        assert not (small / "m").exists()


def test_an_interrupted_pull_says_where_its_partial_download_is(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "big.bin").write_bytes(os.urandom(8 * MiB))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    dest = tmp_path / "out" / "m"
    staging = tmp_path / "out" / ".modelcache" / "pull" / "staging" / "m"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        pull = subprocess.Popen(
            [sys.executable, "-m", "modelcache", "pull", f"http://127.0.0.1:{port}/big.bin", str(dest),
             "--quiet", "--max-bandwidth", "1Mi"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        files = staging / "files"
        while time.monotonic() < deadline and not (files.is_dir() and any(files.rglob("*"))):
            time.sleep(0.1)
        time.sleep(0.5)
        pull.send_signal(signal.SIGINT)
        _, err = pull.communicate(timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert pull.returncode == 130, err
    assert err == (
        f"modelcache pull: interrupted; partial download kept in {staging}; run the same command to resume\n"
    )
    assert staging.is_dir() and not dest.exists()
