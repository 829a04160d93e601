"""Upgrading the agent in place: a new agent process on a cache folder written by an earlier one keeps
every published model (same files, nothing fetched again) and resumes a partial download from its
durable chunks. A downgrade, i.e. an agent that meets a newer on-disk format than it knows, refuses
to start with a clear error and deletes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from localmodel.layout import FORMAT_VERSION, storage_key
from tests.support.agents import cache_doc
from tests.support.hfhub import Hub
from tests.test_agent_process import MiB, argv, env, setup, wait_chunks


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root``: (inode, size, mtime_ns)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


async def test_new_agent_keeps_published_models_and_resumes_partial(hf_hub: Hub, tmp_path: Path) -> None:
    small = os.urandom(2 * MiB)
    big = os.urandom(24 * MiB)
    hf_hub.add_repo("org/done", {"w.safetensors": small, "config.json": b"{}"})
    hf_hub.add_repo("org/partial", {"big.safetensors": big})
    cache, docs = setup(tmp_path, cache_doc("done", "hf://org/done", "4Mi", ["h100"]))
    old = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    assert await asyncio.wait_for(old.wait(), 30) == 0
    done_key, partial_key = storage_key("hf://org/done"), storage_key("hf://org/partial")
    published = snapshot(cache / "models" / done_key)
    assert published

    # The old agent starts the second model and is replaced (rolling update: SIGKILL is the worst case).
    cache, docs = setup(
        tmp_path,
        cache_doc("done", "hf://org/done", "4Mi", ["h100"]),
        cache_doc("partial", "hf://org/partial", "30Mi", ["h100"]),
    )
    # The last chunk is held: the kill always lands mid-file, however fast the machine.
    hf_hub.file("org/partial", "big.safetensors").hold_from = 23 * MiB
    old = await asyncio.create_subprocess_exec(*argv(cache, docs), env=env(hf_hub))
    progress = cache / ".modelcache" / "staging" / partial_key / "progress.json"
    await wait_chunks(progress, "big.safetensors", 3)
    old.send_signal(signal.SIGKILL)
    await old.wait()
    durable = set(json.loads(progress.read_text())["files"]["big.safetensors"]["chunks"])
    assert 3 <= len(durable) < 24

    hf_hub.file("org/partial", "big.safetensors").hold_from = None
    hf_hub.requests.clear()
    new = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    assert await asyncio.wait_for(new.wait(), 60) == 0
    assert snapshot(cache / "models" / done_key) == published, "a published model was rewritten"
    assert not [
        r for r in hf_hub.requests if "org/done" in r.path and r.method == "GET" and "resolve" in r.path
    ]
    assert (cache / "models" / partial_key / "big.safetensors").read_bytes() == big
    fetched = [r.range for r in hf_hub.requests if r.method == "GET" and "big.safetensors" in r.path]
    starts = {int(r.split("=")[1].split("-")[0]) // MiB for r in fetched if r}
    assert starts == set(range(24)) - durable, "only the chunks not yet durable are fetched again"
    assert (cache / ".modelcache" / "format").read_text().strip() == str(FORMAT_VERSION)
    state = json.loads((cache / ".modelcache" / "state.json").read_text())
    assert state["status"]["modelStatus"] == {"done": "ModelDownloaded", "partial": "ModelDownloaded"}


async def test_older_agent_refuses_a_newer_format_and_deletes_nothing(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"w.safetensors": os.urandom(MiB)})
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "2Mi", ["h100"]))
    first = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    assert await asyncio.wait_for(first.wait(), 30) == 0
    # A future modelcache wrote format 99 (and maybe a layout this one does not understand).
    (cache / ".modelcache" / "format").write_text("99\n")
    (cache / "models" / "future-layout-entry").mkdir()
    before = snapshot(cache)
    proc = await asyncio.create_subprocess_exec(
        *argv(cache, docs, "--once"), env=env(hf_hub), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    message = err.decode()
    assert "on-disk format '99'" in message and "upgrade modelcache" in message, message
    assert "Nothing was changed" in message
    after = snapshot(cache)
    # The lock file records who holds the folder (taken before the format is read); nothing else moves.
    before.pop(".modelcache/lock", None)
    after.pop(".modelcache/lock", None)
    assert after == before, "the refusing agent changed the cache folder"
    assert (cache / "models" / "future-layout-entry").is_dir()
