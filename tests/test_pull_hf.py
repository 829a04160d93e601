"""`modelcache pull hf://...` against a local Hugging Face-compatible hub."""

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.download.pull import http_client, pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import PullResult, TransferSettings
from localmodel.errors import AccessDenied, IntegrityError, TransientError, UnsafePath
from localmodel.uri import parse_uri
from tests.support.hfhub import Hub

MiB = 1 << 20
TOKEN = "hf_SECRETtoken1234567890"


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer/tokenizer.json": b'{"vocab": {}}' * 10,
        "model-00001-of-00002.safetensors": os.urandom(3 * MiB + 17),
        "model-00002-of-00002.safetensors": os.urandom(2 * MiB),
        "nested/deep/readme.md": b"# hi\n",
    }


async def run_pull(hub: Hub, uri: str, dest: Path, **kw: Any) -> PullResult:
    options: dict[str, Any] = {"chunk_size": MiB, "backoff_initial": 0.01, **kw}
    settings = TransferSettings(**options)
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=SourceSettings(hf_endpoint=hub.endpoint, hf_token=os.environ.get("HF_TOKEN")),
        transfer=settings,
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_pull_lays_out_the_repo_and_verifies(hf_hub: Hub, tmp_path: Path) -> None:
    files = model_files()
    sha = hf_hub.add_repo("org/model", files)
    result = await run_pull(hf_hub, "hf://org/model", tmp_path / "m")
    assert tree(tmp_path / "m") == files
    assert result.revision == sha and result.bytes_transferred == sum(map(len, files.values()))
    manifest = json.loads((tmp_path / ".modelcache" / "pull" / "manifests" / "m.json").read_text())
    shards = {f["path"]: f for f in manifest["files"]}
    assert (
        shards["model-00002-of-00002.safetensors"]["sha256"]
        == hf_hub.file("org/model", "model-00002-of-00002.safetensors").sha256
    )
    assert shards["config.json"]["sha1"]  # small files are verified by their git blob sha1
    # Large files went as parallel ranges.
    assert hf_hub.count("GET", "model-00001-of-00002") == 4

    hf_hub.requests.clear()
    again = await run_pull(hf_hub, "hf://org/model", tmp_path / "m")
    assert again.up_to_date and again.bytes_transferred == 0
    assert [r.method for r in hf_hub.requests if "/resolve/" in r.path] == []
    assert len(hf_hub.requests) == 2  # one listing: the revision, then the tree


async def test_revision_is_pinned_and_selectable(hf_hub: Hub, tmp_path: Path) -> None:
    v1 = hf_hub.add_repo("org/model", {"a.txt": b"one"}, revision="v1")
    main = hf_hub.add_repo("org/model", {"a.txt": b"two", "b.txt": b"new"}, revision="main")
    r1 = await run_pull(hf_hub, "hf://org/model:v1", tmp_path / "one")
    assert r1.revision == v1 and tree(tmp_path / "one") == {"a.txt": b"one"}
    r2 = await run_pull(hf_hub, "hf://org/model", tmp_path / "two")
    assert r2.revision == main and tree(tmp_path / "two") == {"a.txt": b"two", "b.txt": b"new"}
    # Every file was fetched at the pinned commit, never at a moving branch name.
    assert all(
        f"/resolve/{main}/" in r.path or f"/resolve/{v1}/" in r.path
        for r in hf_hub.requests
        if "/resolve/" in r.path
    )


async def test_gated_repo_needs_a_token_and_never_leaks_it(
    hf_hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    hf_hub.add_repo("org/gated", model_files(), token=TOKEN)
    with pytest.raises(AccessDenied, match="access denied to org/gated"):
        await run_pull(hf_hub, "hf://org/gated", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    await run_pull(hf_hub, "hf://org/gated", tmp_path / "g")
    assert tree(tmp_path / "g") == {
        p: f.disk.read_bytes()
        for p, f in hf_hub.repos["org/gated"].commits[hf_hub.repos["org/gated"].refs["main"]].items()
    }
    out, err = capfd.readouterr()
    assert TOKEN not in out + err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()


async def test_gated_repo_cli_exit_1_names_repo(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/gated", {"a": b"x"}, token=TOKEN)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelcache",
        "pull",
        "hf://org/gated",
        str(tmp_path / "g"),
        "--quiet",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert err.decode().startswith("modelcache pull: access denied to org/gated")


async def test_tampered_file_is_refetched_once_then_fails_naming_it(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/model", model_files())
    hf_hub.tamper("org/model", "model-00002-of-00002.safetensors")
    with pytest.raises(IntegrityError, match=r"model-00002-of-00002\.safetensors.*sha256"):
        await run_pull(hf_hub, "hf://org/model", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert hf_hub.count("GET", "model-00002-of-00002") == 4  # 2 ranges, fetched twice


async def test_no_verify_skips_hashes_but_not_sizes(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/model", model_files())
    hf_hub.tamper("org/model", "config.json")
    await run_pull(hf_hub, "hf://org/model", tmp_path / "m", verify=False)
    assert (tmp_path / "m" / "config.json").exists()


async def test_503_twice_then_success(hf_hub: Hub, tmp_path: Path) -> None:
    files = model_files()
    hf_hub.add_repo("org/model", files)
    hf_hub.file("org/model", "config.json").fail_first = 2
    hf_hub.file("org/model", "config.json").retry_after = "0"
    await run_pull(hf_hub, "hf://org/model", tmp_path / "m")
    assert tree(tmp_path / "m") == files
    assert hf_hub.count("GET", "config.json") == 3


@pytest.mark.parametrize("path", ["../escape.txt", "/abs/path.txt", "a/../../b.txt"])
async def test_hostile_listing_is_refused_and_nothing_written(hf_hub: Hub, tmp_path: Path, path: str) -> None:
    hf_hub.add_repo("org/model", {"a.txt": b"a"})
    hf_hub.add_hostile_entry("org/model", path)
    with pytest.raises(UnsafePath):
        await run_pull(hf_hub, "hf://org/model", tmp_path / "out" / "m")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "escape.txt").exists()
    assert not (tmp_path / "out" / "m").exists()


async def test_server_without_ranges(hf_hub: Hub, tmp_path: Path) -> None:
    files = model_files()
    hf_hub.add_repo("org/model", files)
    hf_hub.ranges = False
    await run_pull(hf_hub, "hf://org/model", tmp_path / "m")
    assert tree(tmp_path / "m") == files
    assert hf_hub.count("GET", "model-00001-of-00002") == 1


async def test_sigkill_mid_file_then_resume_fetches_only_the_rest(hf_hub: Hub, tmp_path: Path) -> None:
    big = os.urandom(24 * MiB)
    hf_hub.add_repo("org/model", {"big.safetensors": big, "config.json": b"{}"})
    # The last chunk is held: the kill always lands mid-file, however fast the machine.
    hf_hub.file("org/model", "big.safetensors").hold_from = 23 * MiB
    dest = tmp_path / "m"
    env = dict(os.environ, HF_ENDPOINT=hf_hub.endpoint)
    argv = [
        sys.executable,
        "-m",
        "modelcache",
        "pull",
        "hf://org/model",
        str(dest),
        "--quiet",
        "--chunk-size",
        "1Mi",
        "--concurrency",
        "4",
    ]
    proc = await asyncio.create_subprocess_exec(*argv, env=env)
    progress = tmp_path / ".modelcache" / "pull" / "staging" / "m" / "progress.json"
    for _ in range(300):
        await asyncio.sleep(0.05)
        if (
            progress.exists()
            and len(json.loads(progress.read_text())["files"].get("big.safetensors", {}).get("chunks", []))
            >= 4
        ):
            break
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    done = set(json.loads(progress.read_text())["files"]["big.safetensors"]["chunks"])
    assert 4 <= len(done) < 24 and not dest.exists()

    hf_hub.file("org/model", "big.safetensors").hold_from = None
    hf_hub.requests.clear()
    proc = await asyncio.create_subprocess_exec(*argv, env=env)
    assert await proc.wait() == 0
    assert (dest / "big.safetensors").read_bytes() == big
    fetched = [r.range for r in hf_hub.requests if r.method == "GET" and "big.safetensors" in r.path]
    starts = {int(r.split("=")[1].split("-")[0]) // MiB for r in fetched if r}
    assert starts == set(range(24)) - done  # only the chunks that were not durable


async def test_a_new_revision_fetches_only_what_changed(hf_hub: Hub, tmp_path: Path) -> None:
    files = model_files()
    hf_hub.add_repo("org/m", files)
    dest = tmp_path / "m"
    await run_pull(hf_hub, "hf://org/m", dest)
    before = (dest / "model-00001-of-00002.safetensors").stat()

    changed = dict(files, **{"model-00002-of-00002.safetensors": os.urandom(2 * MiB), "new.txt": b"hi"})
    hf_hub.add_repo("org/m", changed)  # a push to main: one shard changed, one file added
    hf_hub.requests.clear()
    result = await run_pull(hf_hub, "hf://org/m", dest)
    assert tree(dest) == changed
    fetched = {
        r.path.rsplit("/", 1)[-1] for r in hf_hub.requests if r.method == "GET" and "/resolve/" in r.path
    }
    assert "model-00001-of-00002.safetensors" not in fetched  # unchanged: linked from the old copy
    assert {"model-00002-of-00002.safetensors", "new.txt"} <= fetched
    assert result.bytes_transferred < 3 * MiB
    assert (dest / "model-00001-of-00002.safetensors").stat().st_ino == before.st_ino


async def test_a_damaged_old_copy_is_fetched_again_not_reused(hf_hub: Hub, tmp_path: Path) -> None:
    files = model_files()
    hf_hub.add_repo("org/m", files)
    dest = tmp_path / "m"
    await run_pull(hf_hub, "hf://org/m", dest)
    shard = dest / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size: only the hash can tell
    old_inode = shard.stat().st_ino
    hf_hub.add_repo("org/m", dict(files, **{"new.txt": b"hi"}))
    await run_pull(hf_hub, "hf://org/m", dest)
    assert shard.read_bytes() == files["model-00001-of-00002.safetensors"]
    # Fetched into a new file: the published copy was never written in place.
    assert shard.stat().st_ino != old_inode


async def test_an_unreachable_hub_is_a_transient_error_naming_the_endpoint(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        endpoint = f"http://127.0.0.1:{port}"  # nothing listens there once closed
    refused = rf"connection refused by 127\.0\.0\.1:{port} \(after \d attempts"
    with pytest.raises(TransientError, match=refused):
        await pull(
            parse_uri("hf://org/model"),
            Destination.for_folder(tmp_path / "m"),
            sources=SourceSettings(hf_endpoint=endpoint),
            transfer=TransferSettings(),
        )
    assert not (tmp_path / "m").exists()


async def test_downloads_sharing_a_client_take_turns(hf_hub: Hub, tmp_path: Path) -> None:
    """One client (the agent's) for two models: the second is not queued behind every chunk of the
    first. The big model has 16 throttled ranges on 2 connections; the small one finishes first."""
    hf_hub.add_repo("org/big", {"model.safetensors": os.urandom(4 * MiB)})
    hf_hub.add_repo("org/small", {"model.safetensors": os.urandom(256 << 10)})
    hf_hub.file("org/big", "model.safetensors").rate = 4 * MiB  # 1 MiB/s per connection, 2 connections
    settings = TransferSettings(concurrency=2, chunk_size=256 << 10, backoff_initial=0.01)
    client = http_client(settings)
    sources = SourceSettings(hf_endpoint=hf_hub.endpoint)
    finished: list[str] = []

    async def one(repo: str) -> None:
        await pull(
            parse_uri(f"hf://{repo}"),
            Destination.for_folder(tmp_path / repo.split("/")[1]),
            sources=sources,
            transfer=settings,
            client=client,
        )
        finished.append(repo)

    try:
        big = asyncio.create_task(one("org/big"))
        while hf_hub.count("GET", "org/big/resolve") < 2:  # both connections busy with the big one
            await asyncio.sleep(0.01)
        await asyncio.wait_for(one("org/small"), 10)
        # The small one's request went between the big one's ranges, not after all 16 of them.
        assert finished == ["org/small"] and hf_hub.count("GET", "org/big/resolve") <= 6
        await asyncio.wait_for(big, 30)
        assert finished == ["org/small", "org/big"]
    finally:
        client.close()
