"""Two `modelcache pull` into the same DEST at once (13 §7): the second waits for the lock a bounded
time, then exits 1 naming the holder; no traceback, no staging left; with time to wait it finds the
model up to date. DEST in a cache folder takes the cache's lock, the one the agent holds."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from pathlib import Path

from localmodel.layout import CacheLayout, storage_key
from tests.support.agents import eventually
from tests.support.hfhub import Hub

MODELCACHE = str(Path(sys.executable).parent / "modelcache")


async def _pull(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        MODELCACHE, "pull", *args, "--quiet", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def test_second_writer_waits_then_exits_1_naming_the_first(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/slow", {"config.json": b"{}", "w.bin": os.urandom(2 << 20)})
    hf_hub.file("org/slow", "w.bin").rate = 1 << 20  # about 2 s
    dest = tmp_path / "m"
    first = await _pull("hf://org/slow", str(dest))
    staging = tmp_path / ".modelcache" / "pull" / "staging" / "m"
    await eventually(staging.exists, what="the first pull to start")
    second = await _pull("hf://org/slow", str(dest), "--lock-wait", "0.3")
    _, err = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 1
    text = err.decode()
    assert text.count("\n") == 1 and "Traceback" not in text
    assert f"in use by process {first.pid}, another modelcache pull" in text and "--lock-wait" in text
    third = await _pull("hf://org/slow", str(dest), "--lock-wait", "60")
    _, err3 = await asyncio.wait_for(third.communicate(), 60)
    await asyncio.wait_for(first.communicate(), 60)
    assert first.returncode == 0
    assert third.returncode == 0, err3.decode()
    assert (dest / "config.json").read_bytes() == b"{}"
    assert not staging.exists()


async def test_pull_into_a_cache_folder_takes_the_agents_lock(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}"})
    layout = CacheLayout(tmp_path / "cache")
    layout.hidden.mkdir(parents=True)
    layout.models.mkdir()
    fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the agent does
        os.write(fd, f"{os.getpid()}\n".encode())
        dest = layout.model_dir(storage_key("hf://org/m"))
        proc = await _pull("hf://org/m", str(dest), "--lock-wait", "0.2")
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        text = err.decode()
        assert f"in use by process {os.getpid()}" in text and f"(lock {layout.lock_file}, still held" in text
        assert not dest.exists() and not layout.staging_dir(storage_key("hf://org/m")).exists()
    finally:
        os.close(fd)
    proc = await _pull("hf://org/m", str(dest))
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert (dest / "config.json").read_bytes() == b"{}"
