"""file:// sources list regular files only (13 §4, §11, §13): a FIFO, a device or (in a cluster) a
file with several hard links is refused in one line naming it; a blocked copy never keeps a stopping
agent alive (agent.threads)."""

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.download.client import ClientSettings, HttpClient
from agent.download.source_settings import SourceSettings
from agent.download.sources import list_source
from agent.threads import BoundedExecutor
from localmodel.errors import UnsafePath
from localmodel.uri import parse_uri


async def _list(uri: str, prefixes: tuple[str, ...] | None = None) -> object:
    client = HttpClient(ClientSettings(concurrency=1, read_size=1 << 16, connect_timeout=5, read_timeout=5))
    try:
        return await list_source(
            parse_uri(uri), settings=SourceSettings(file_prefixes=prefixes), client=client
        )
    finally:
        client.close()


async def test_a_fifo_in_a_folder_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "m" / "pipe")
    with pytest.raises(UnsafePath, match=r"pipe is a FIFO, not a regular file"):
        await _list(f"file://{tmp_path / 'm'}")


async def test_a_device_is_not_a_regular_file_or_folder() -> None:
    with pytest.raises(UnsafePath, match=r"zero is a device, not a regular file or folder"):
        await _list("file:///dev/zero")


async def test_a_hard_link_is_refused_in_a_cluster_only(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "m").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("SECRET")
    os.link(tmp_path / "secret.txt", allowed / "m" / "secret.txt")
    with pytest.raises(UnsafePath, match=r"secret.txt has 2 hard links"):
        await _list(f"file://{allowed / 'm'}", (str(allowed),))
    listing = await _list(f"file://{allowed / 'm'}")  # pull, standalone: the user's own machine
    assert [f.path for f in listing.files] == ["secret.txt"]  # type: ignore[attr-defined]


def test_pull_of_a_fifo_is_one_line_and_ends(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    done = subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", f"file://{tmp_path / 'pipe'}", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "is a FIFO" in done.stderr


def test_a_blocked_job_does_not_keep_the_loop_from_closing() -> None:
    never = threading.Event()

    async def main() -> str:
        asyncio.get_running_loop().set_default_executor(BoundedExecutor(grace=0.5))
        blocked = asyncio.ensure_future(asyncio.to_thread(never.wait))
        assert await asyncio.to_thread(lambda: "done") == "done"
        blocked.cancel()
        return "stopped"

    try:
        assert asyncio.run(main()) == "stopped"  # the default executor would join the thread forever
    finally:
        never.set()
