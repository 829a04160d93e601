"""Listings of many files: descriptors bounded by the concurrency, and a resume state whose
checkpoint costs what changed (a journal of finished files), read back after a SIGKILL, in its
older one-file format too."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from pathlib import Path

from tests.support.hfhub import Hub

MiB = 1 << 20


def pull_argv(hub: Hub, uri: str, dest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "modelcache", "pull", uri, str(dest), "--quiet", *extra]


def env(hub: Hub) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1")


async def test_thousands_of_files_under_a_low_descriptor_limit(hf_hub: Hub, tmp_path: Path) -> None:
    files = {f"shard/{i:05d}.json": f"{i}".encode() * 3 for i in range(3000)}
    hf_hub.page_size = 1000
    hf_hub.add_repo("org/many", files)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = await asyncio.create_subprocess_exec(
        *pull_argv(hf_hub, "hf://org/many", tmp_path / "m"),
        env=env(hf_hub),
        preexec_fn=limit,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()
    assert "3000 files" in out.decode() and "verified by sha1" in out.decode()
    got = {
        p.relative_to(tmp_path / "m").as_posix(): p.read_bytes()
        for p in (tmp_path / "m").rglob("*")
        if p.is_file()
    }
    assert got == files


async def _killed_mid_pull(hub: Hub, tmp_path: Path) -> tuple[Path, dict[str, bytes], set[int]]:
    """Pull a repo of small files and one large one whose last chunk the hub holds back (the pull
    cannot finish, however fast or slow the machine, and three of its four connections stay free);
    SIGKILL once the small ones are journaled and a few chunks of the large one are durable.
    (staging folder, files, durable chunks)."""
    files = {f"small/{i:03d}.txt": os.urandom(100 + i) for i in range(40)}
    files["big.safetensors"] = os.urandom(12 * MiB)
    hub.add_repo("org/m", files)
    hub.file("org/m", "big.safetensors").hold_from = 11 * MiB  # chunks 0-10 come, 11 never
    staging = tmp_path / ".modelcache" / "pull" / "staging" / "m"
    proc = await asyncio.create_subprocess_exec(
        *pull_argv(hub, "hf://org/m", tmp_path / "m", "--chunk-size", "1Mi", "--concurrency", "4"),
        env=env(hub),
    )
    chunks: set[int] = set()
    for _ in range(1200):  # 60 s at most: then the asserts below say what was missing
        await asyncio.sleep(0.05)
        try:
            done = (staging / "done.jsonl").read_bytes().count(b"\n")
            header = json.loads((staging / "progress.json").read_text())
        except (OSError, ValueError):
            continue
        chunks = set(header["files"].get("big.safetensors", {}).get("chunks", []))
        if done == 40 and len(chunks) >= 2:
            break
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    header = json.loads((staging / "progress.json").read_text())
    # Only the file in flight is in the header; the finished ones are one line each in the journal.
    assert set(header["files"]) == {"big.safetensors"}
    chunks = set(header["files"]["big.safetensors"]["chunks"])
    assert 2 <= len(chunks) < 12 and 11 not in chunks
    journal = [json.loads(line) for line in (staging / "done.jsonl").read_text().splitlines()]
    assert {r["path"] for r in journal} == {p for p in files if p.startswith("small/")}
    assert all(r["verified"] and r["checkedBy"] == "sha1" for r in journal)
    assert not (tmp_path / "m").exists()
    return staging, files, chunks


async def _resume_fetches_only_the_rest(
    hub: Hub, tmp_path: Path, files: dict[str, bytes], durable: set[int]
) -> None:
    hub.file("org/m", "big.safetensors").hold_from = None
    hub.requests.clear()
    proc = await asyncio.create_subprocess_exec(
        *pull_argv(hub, "hf://org/m", tmp_path / "m", "--chunk-size", "1Mi", "--concurrency", "4"),
        env=env(hub),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    assert "41 files" in out.decode() and "verified by sha256/sha1" in out.decode()
    got = {
        p.relative_to(tmp_path / "m").as_posix(): p.read_bytes()
        for p in (tmp_path / "m").rglob("*")
        if p.is_file()
    }
    assert got == files
    fetched = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert all("big.safetensors" in r.path for r in fetched), "a journaled file was fetched again"
    starts = {int((r.range or "bytes=0-").split("=")[1].split("-")[0]) // MiB for r in fetched}
    assert starts == set(range(12)) - durable


async def test_sigkill_then_resume_reads_the_journal(hf_hub: Hub, tmp_path: Path) -> None:
    staging, files, durable = await _killed_mid_pull(hf_hub, tmp_path)
    await _resume_fetches_only_the_rest(hf_hub, tmp_path, files, durable)
    assert not staging.exists()


async def test_resume_reads_the_older_one_file_progress(hf_hub: Hub, tmp_path: Path) -> None:
    staging, files, durable = await _killed_mid_pull(hf_hub, tmp_path)
    # The same state as an older modelcache wrote it: every file in progress.json, no journal.
    header = json.loads((staging / "progress.json").read_text())
    for line in (staging / "done.jsonl").read_text().splitlines():
        record = json.loads(line)
        header["files"][record.pop("path")] = {**record, "chunks": [0]}
    header["version"] = 1
    (staging / "progress.json").write_text(json.dumps(header))
    (staging / "done.jsonl").unlink()
    await _resume_fetches_only_the_rest(hf_hub, tmp_path, files, durable)
