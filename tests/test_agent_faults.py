"""Faults injected into a running agent (13 §0, §1; 20 §1): every failure of a download ends in
ModelDownloadError with a reason, a log line and the failure metric, and the model completes once
the cause is gone, without a restart; nothing that is not the agent's is deleted; no link in the cache
folder is followed; published models are read-only. Disks are small tmpfs mounts and read-only bind
mounts (as root, modes do not stop a write); each test skips where mounting is not allowed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from localmodel.kinds import LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from localmodel.state.memory import MemoryState
from tests.support.agents import Cluster, Running, eventually, group_doc, node_doc, running_agent, seed
from tests.support.hfhub import Hub
from tests.test_pull_s3_http import Files, http_files

__all__ = ["http_files"]  # the fixture, used by name

KiB = 1024
MiB = 1 << 20


@pytest_asyncio.fixture
async def mem() -> AsyncIterator[Cluster]:
    memory = MemoryState()
    yield Cluster(memory, memory, "memory")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not allowed here: {done.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path, at: Path | None = None) -> Iterator[Path]:
    """``path`` bind-mounted read-only at ``at`` (default: over itself)."""
    target = at or path
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(target))
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; returns it."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for step in (MiB, 4 * KiB):
            block = bytes(step)
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def state(status: dict[str, Any], name: str) -> dict[str, Any]:
    return (status.get("models") or {}).get(name) or {}


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


async def failed_with(run: Running, name: str, reason: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        m = state(await run.status(), name)
        return m if m.get("state") == "ModelDownloadError" and m.get("reason") == reason else None

    found: dict[str, Any] = await eventually(check, timeout=30, what=f"{name} failed with {reason}")
    return found


async def downloaded(run: object, name: str) -> None:
    async def check() -> bool:
        return state(await run.status(), name).get("state") == "ModelDownloaded"  # type: ignore[attr-defined]

    await eventually(check, timeout=30, what=f"{name} downloaded")


async def test_disk_filling_mid_download_is_disk_full_then_completes_once_space_is_freed(
    mem: Cluster, hf_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = os.urandom(3 * MiB)
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w.bin": body})
    hf_hub.file("org/m", "w.bin").rate = 256 * KiB  # each 1 MiB range takes about 4 s
    with tmpfs(tmp_path / "cache", "8m") as cache:
        await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", "hf://org/m", "4Mi")]))
        caplog.set_level(logging.WARNING, logger="modelcache.agent")
        async with running_agent(mem.state, cache, store=mem.store, retry_base=2.0, retry_cap=2.0) as run:
            staging = cache / ".modelcache" / "staging" / storage_key("hf://org/m")
            await eventually(lambda: (staging / "files" / "w.bin").exists(), what="the download started")
            filler = fill(cache)  # the resume state (written every 2 s) and the publish now hit ENOSPC
            m = await failed_with(run, "m", "DiskFull")
            assert "no space left" in m["message"] and m["retryAfter"]
            assert run.metric("modelcache_download_failures_total", {"reason": "DiskFull"}) >= 1
            assert any("download failed (DiskFull)" in r.getMessage() for r in caplog.records)
            key = storage_key("hf://org/m")
            await eventually(lambda: key not in run.agent.tasks, what="the task ended, not stuck")
            await eventually(lambda: not staging.exists(), what="the staging given back")
            filler.unlink()
            hf_hub.file("org/m", "w.bin").rate = None
            subprocess.run(["mount", "-o", "remount,size=16m", str(cache)], check=True)
            await downloaded(run, "m")
            assert (run.model_dir("hf://org/m") / "w.bin").read_bytes() == body


def _semi_compressible(size: int) -> bytes:
    # A 16 KiB random block repeated: deflate finds it within its 32 KiB window (about 80:1), so the
    # archive is small, passes the 200:1 ratio limit, and unpacks to ``size``.
    block = os.urandom(16 * KiB)
    return block * (size // len(block))


async def test_archive_unpacking_past_the_free_space_is_disk_full_then_completes_when_grown(
    mem: Cluster, http_files: Files, tmp_path: Path
) -> None:
    data = _semi_compressible(12 * MiB)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("w.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    http_files.bodies["/m.tar.gz"] = buf.getvalue()
    assert len(buf.getvalue()) < MiB
    uri = f"{http_files.url}/m.tar.gz"
    with tmpfs(tmp_path / "cache", "8m") as cache:
        await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", uri, None)]))
        async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
            m = await failed_with(run, "m", "DiskFull")
            assert (
                "declares 12.0 MiB, more than the" in m["message"] and "free on the cache's" in m["message"]
            )
            assert not (cache / "models" / storage_key(uri)).exists()
            subprocess.run(["mount", "-o", "remount,size=64m", str(cache)], check=True)
            await downloaded(run, "m")
            assert (run.model_dir(uri) / "w.bin").read_bytes() == data


async def test_archive_unpacking_past_its_declared_model_size_is_refused(
    mem: Cluster, http_files: Files, tmp_path: Path
) -> None:
    data = _semi_compressible(12 * MiB)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("w.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    http_files.bodies["/m.tar.gz"] = buf.getvalue()
    uri = f"{http_files.url}/m.tar.gz"
    cache = tmp_path / "cache"
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", uri, "2Mi")]))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=5.0, retry_cap=5.0) as run:
        m = await failed_with(run, "m", "VerificationFailed")
        assert "declares 12.0 MiB, more than the declared modelSize 2.0 MiB" in m["message"]
        assert not run.model_dir(uri).exists()
        staged = cache / ".modelcache" / "staging" / storage_key(uri)
        assert not (staged / "files").exists()  # the partial extraction is given back


async def test_read_only_cache_is_permission_denied_then_recovers(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w.bin": os.urandom(64 * KiB)})
    cache = tmp_path / "cache"
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", []))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        await eventually(lambda: run.agent.ready, what="ready")
        with read_only(cache):
            await mem.store.patch(
                LOCAL_MODEL_NODE, "n1", {"spec": node_doc("n1", [("m", "hf://org/m", "1Mi")])["spec"]}
            )
            m = await failed_with(run, "m", "PermissionDenied")
            assert "Read-only file system" in m["message"]
            assert run.metric("modelcache_download_failures_total", {"reason": "PermissionDenied"}) >= 1

            async def reported() -> bool:
                cond = condition(await run.status(), "CacheFolderClean")
                return "state file" in cond.get("message", "")

            await eventually(reported, what="the state file's failure in the status")
        await downloaded(run, "m")


async def test_read_only_mount_over_models_fails_the_publish_with_a_reason_then_recovers(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}"})
    cache = tmp_path / "cache"
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", []))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        await eventually(lambda: run.agent.ready, what="ready")
        with read_only(cache / "models"):
            await mem.store.patch(
                LOCAL_MODEL_NODE, "n1", {"spec": node_doc("n1", [("m", "hf://org/m", "1Mi")])["spec"]}
            )
            # Every byte fetched, the publish (a rename into the mount) refused: said, not stuck.
            m = await failed_with(run, "m", "DownloadFailed")
            assert "Invalid cross-device link" in m["message"] and "one filesystem" in m["message"]
            assert m["bytesDone"] == m["bytesTotal"] == 2
        await downloaded(run, "m")


async def test_an_unforeseen_exception_is_a_download_failure_retried_until_it_is_gone(
    mem: Cluster, hf_hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sha = hf_hub.add_repo("org/m", {"config.json": b"{}"})
    # A listing entry whose size is not a number: nothing in the pull foresees it.
    hf_hub.repos["org/m"].hostile[sha] = [
        {"type": "file", "path": "odd.bin", "size": "many", "oid": "0" * 40}
    ]
    cache = tmp_path / "cache"
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", "hf://org/m", "1Mi")]))
    caplog.set_level(logging.WARNING, logger="modelcache.agent")
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        m = await failed_with(run, "m", "DownloadFailed")
        assert "many" in m["message"] and "\n" not in m["message"]
        assert run.metric("modelcache_download_failures_total", {"reason": "DownloadFailed"}) >= 1
        assert storage_key("hf://org/m") not in run.agent.tasks
        assert any("download failed" in r.getMessage() for r in caplog.records)
        hf_hub.repos["org/m"].hostile.clear()
        await downloaded(run, "m")


async def test_a_folder_without_our_manifest_is_never_deleted(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}"})
    cache = tmp_path / "cache"
    unwanted = cache / "models" / storage_key("hf://org/gone")
    wanted = cache / "models" / storage_key("hf://org/m")
    for folder in (unwanted, wanted):
        folder.mkdir(parents=True)
        (folder / "theirs.bin").write_bytes(b"kserve's bytes")
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", "hf://org/m", "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        # The wanted one is adopted (tests/test_adoption.py): the missing file fetched beside theirs.
        await downloaded(run, "m")
        assert (wanted / "config.json").read_bytes() == b"{}"
        cond = condition(await run.status(), "CacheFolderClean")
        assert cond["status"] == "False" and f"models/{unwanted.name}" in cond["message"]
        assert f"models/{wanted.name}" not in cond["message"]
        await asyncio.sleep(1.0)  # reconciles come and go: nothing of theirs is touched
        assert (unwanted / "theirs.bin").read_bytes() == b"kserve's bytes"
        assert (wanted / "theirs.bin").read_bytes() == b"kserve's bytes"
        # Once the user removes the other one, the condition clears.
        (unwanted / "theirs.bin").unlink()
        unwanted.rmdir()

        async def clean() -> bool:
            return condition(await run.status(), "CacheFolderClean").get("status") == "True"

        await eventually(clean, what="the condition cleared")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "precious.txt").write_text("keep")
    (victim / "precious.json").write_text("{}")
    return victim


def _intact(victim: Path) -> bool:
    return (victim / "sub" / "precious.txt").read_text() == "keep" and sorted(
        p.name for p in victim.iterdir()
    ) == ["precious.json", "sub"]


async def test_links_planted_in_the_cache_are_refused_reported_and_never_followed(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/a", {"config.json": b"{}"})
    hf_hub.add_repo("org/b", {"config.json": b"{}"})
    victim = _victim(tmp_path)
    cache = tmp_path / "cache"
    hidden = cache / ".modelcache"
    for d in ("staging", "trash", "manifests"):
        (hidden / d).mkdir(parents=True)
    (cache / "models").mkdir()
    a, b = storage_key("hf://org/a"), storage_key("hf://org/b")
    (hidden / "staging" / a).symlink_to(victim)  # a wanted model's staging
    (hidden / "trash" / "x").symlink_to(victim)
    (cache / "models" / b).symlink_to(victim)  # a wanted model's folder
    (hidden / "state.json").symlink_to(victim / "precious.json")
    await seed(
        mem.store,
        group_doc("g", path=cache),
        node_doc("n1", [("a", "hf://org/a", "1Mi"), ("b", "hf://org/b", "1Mi")]),
    )
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        ma = await failed_with(run, "a", "UnsafePath")
        assert f"{hidden / 'staging' / a} is a symbolic link" in ma["message"]
        mb = await failed_with(run, "b", "UnsafePath")
        assert f"{cache / 'models' / b} is a symbolic link" in mb["message"]

        async def all_reported() -> dict[str, Any] | None:
            cond = condition(await run.status(), "CacheFolderClean")
            return cond if "state file" in cond.get("message", "") else None

        cond = await eventually(all_reported, what="the state file's link in the status")
        assert cond["status"] == "False"
        for path in (f".modelcache/staging/{a}", ".modelcache/trash/x", f"models/{b}"):
            assert path in cond["message"]
        # Wanted no more: nothing is deleted through the links either.
        await mem.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": node_doc("n1", [])["spec"]})
        await asyncio.sleep(1.0)
        assert _intact(victim) and (victim / "precious.json").read_text() == "{}"
    assert _intact(victim)
    assert (hidden / "staging" / a).is_symlink() and (cache / "models" / b).is_symlink()


@pytest.mark.parametrize("where", ["trash", "manifests", "staging"])
async def test_a_layout_folder_that_is_a_link_stops_the_agent_with_one_line(
    where: str, mem: Cluster, tmp_path: Path
) -> None:
    from agent.disk import CacheUnsafe

    victim = _victim(tmp_path)
    cache = tmp_path / "cache"
    (cache / ".modelcache").mkdir(parents=True)
    (cache / ".modelcache" / where).symlink_to(victim)
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", []))
    async with running_agent(mem.state, cache, store=mem.store) as run:
        with pytest.raises(CacheUnsafe, match="is a symbolic link"):
            await asyncio.wait_for(run.task, 10)
    assert _intact(victim)


async def test_published_model_is_read_only_and_a_read_only_mount_of_it_does_not_stop_the_agent(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w/x.bin": os.urandom(64 * KiB)})
    cache = tmp_path / "cache"
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", "hf://org/m", "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store) as run:
        await downloaded(run, "m")
        folder = run.model_dir("hf://org/m")
        for path in (folder, folder / "w"):
            assert path.stat().st_mode & 0o777 == 0o555
        for path in (folder / "config.json", folder / "w" / "x.bin"):
            assert path.stat().st_mode & 0o777 == 0o444
        # The serving volume: the model folder bind-mounted read-only elsewhere, as in a pod.
        with read_only(folder, at=tmp_path / "pod" / "model") as pod:
            with pytest.raises(OSError) as err:
                (pod / "config.json").write_bytes(b"tampered")
            assert err.value.errno == errno.EROFS
            with pytest.raises(OSError):
                (pod / "new.bin").write_bytes(b"x")
            assert (folder / "config.json").read_bytes() == b"{}"
            # The agent still deletes it when it is no longer wanted.
            await mem.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": node_doc("n1", [])["spec"]})
            await eventually(lambda: not folder.exists(), what="the model deleted")
            assert not list((cache / ".modelcache" / "trash").iterdir())
