""" "Verified" means verified: how each file was checked (PullResult, the pull summary), the hashes a
manifest records for every source, and re-verification (``--verify-on-start``) by each of them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from agent.disk import CacheDir
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import PullResult, TransferSettings
from agent.pull_cli import checked
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import FileEntry, Manifest, entry_check, hash_check
from localmodel.uri import parse_uri
from tests.support.agents import Cluster, eventually, group_doc, node_doc, running_agent, seed
from tests.support.hfhub import Hub
from tests.support.httpfiles import HttpFiles
from tests.support.s3files import S3Files

MiB = 1 << 20
KiB = 1024


async def run(uri: str, dest: Destination, sources: SourceSettings | None = None, **kw: object) -> PullResult:
    return await pull(
        parse_uri(uri),
        dest,
        sources=sources or SourceSettings.from_env(),
        transfer=TransferSettings(**{"chunk_size": MiB, "backoff_initial": 0.01, **kw}),  # type: ignore[arg-type]
    )


def in_cache(root: Path, uri: str) -> Destination:
    return Destination.in_cache(CacheLayout(root), storage_key(uri))


def flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def untrusted_after_flip(root: Path, uri: str, name: str) -> bool:
    """Flip one byte of a published file; True when a re-verifying scan no longer trusts the model."""
    cache = CacheDir(root)
    key = storage_key(uri)
    assert key in cache.scan(verify=True).published
    flip(root / "models" / key / name)
    assert key in cache.scan().published  # same size: trusted by a scan that does not hash
    return key in cache.scan(verify=True).untrusted


def test_hash_check_rule_and_old_manifests(tmp_path: Path) -> None:
    assert hash_check("AB" * 32, "cd" * 20, "ef" * 16) == entry_check(FileEntry("a", 1, "AB" * 32))
    assert hash_check(None, "cd" * 20, "ef" * 16).name == "sha1"  # type: ignore[union-attr]
    assert hash_check(None, None, "EF" * 16).expected == "ef" * 16  # type: ignore[union-attr]
    assert hash_check(None, None, None) is None
    sha1 = hash_check(None, hashlib.sha1(b"blob 3\0abc").hexdigest(), None)
    assert sha1 is not None
    h = sha1.new(3)
    h.update(b"abc")
    assert h.hexdigest() == sha1.expected  # the git blob header comes first
    # A manifest written before md5 existed still reads; md5 round-trips.
    old = {"format": 1, "files": [{"path": "a", "size": 1, "sha256": None, "sha1": None}]}
    assert Manifest.from_json(old).files == (FileEntry("a", 1),)
    new = Manifest("s3://b/m", "k", "r", (FileEntry("a", 1, md5="0" * 32),))
    assert Manifest.from_json(json.loads(json.dumps(new.to_json()))).files == new.files


async def test_hf_files_are_verified_by_sha256_and_git_sha1(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo(
        "org/m", {"config.json": b"{}", "tokenizer.json": b"t" * 900, "w.bin": os.urandom(2 * MiB)}
    )
    result = await run(
        "hf://org/m", in_cache(tmp_path, "hf://org/m"), SourceSettings(hf_endpoint=hf_hub.endpoint)
    )
    assert dict(result.hash_checked) == {"sha256": 1, "sha1": 2}
    assert result.size_only == 0 and result.verified
    assert checked(result, verify=True) == "verified by sha256/sha1"
    # A flipped byte in a small file known only by its git blob sha1 is found by --verify-on-start.
    assert untrusted_after_flip(tmp_path, "hf://org/m", "config.json")


async def test_http_without_checksum_is_size_only_and_its_sha256_recorded(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    body = os.urandom(3 * MiB + 1)  # several ranges: hashed as they land
    plain_http.add("/w.bin", body)
    uri = f"{plain_http.url}/w.bin"
    result = await run(uri, in_cache(tmp_path, uri))
    assert dict(result.hash_checked) == {} and result.size_only == 1 and not result.verified
    assert result.size_only_names == ("w.bin",)
    assert checked(result, verify=True) == "1 checked by size only (w.bin): the source gives no hash for it"
    manifest = in_cache(tmp_path, uri).published()
    assert manifest is not None
    assert [(e.sha256, e.sha1, e.md5) for e in manifest.files] == [
        (hashlib.sha256(body).hexdigest(), None, None)
    ]
    assert untrusted_after_flip(tmp_path, uri, "w.bin")


async def test_s3_md5_is_recorded_and_multipart_objects_are_size_only(
    s3files: S3Files, tmp_path: Path
) -> None:
    bucket = s3files.bucket("models")
    s3files.put(bucket, "m/config.json", b'{"a": 1}')
    s3files.put(bucket, "m/sha.bin", b"with a sha256", sha256=True)
    big = s3files.path(bucket, "m/big.bin")
    with big.open("wb") as fh:
        fh.truncate(17 * MiB)  # over MD5_LIMIT: a multipart-style ETag, which is no hash
    result = await run("s3://models/m", in_cache(tmp_path, "s3://models/m"))
    assert dict(result.hash_checked) == {"md5": 1, "sha256": 1}
    assert (result.size_only, result.size_only_names) == (1, ("big.bin",))
    assert checked(result, verify=True) == "2 files verified by sha256/md5, 1 checked by size only (big.bin)"
    manifest = in_cache(tmp_path, "s3://models/m").published()
    assert manifest is not None
    entries = {e.path: (e.sha256, e.md5) for e in manifest.files}
    assert entries["config.json"] == (None, hashlib.md5(b'{"a": 1}').hexdigest())
    assert entries["sha.bin"][0] == hashlib.sha256(b"with a sha256").hexdigest()
    assert entries["big.bin"] == (None, None)  # S3 objects are not hashed by us (see the engine)
    assert untrusted_after_flip(tmp_path, "s3://models/m", "config.json")


async def test_file_source_flip_is_found_by_its_recorded_sha256(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a" * 100)
    uri = f"file://{src}"
    result = await run(uri, in_cache(tmp_path / "cache", uri))
    assert result.size_only == 1
    assert untrusted_after_flip(tmp_path / "cache", uri, "a.txt")


async def test_no_verify_says_sizes_checked(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}"})
    result = await run(
        "hf://org/m",
        in_cache(tmp_path, "hf://org/m"),
        SourceSettings(hf_endpoint=hf_hub.endpoint),
        verify=False,
    )
    assert result.size_only == 1 and checked(result, verify=False) == "sizes checked"


async def test_pull_summary_line(hf_hub: Hub, plain_http: HttpFiles, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w.bin": os.urandom(2 * KiB)})
    plain_http.add("/w.bin", b"w" * 10)
    for uri, want in (
        ("hf://org/m", ", verified by sha256/sha1, revision "),
        (
            f"{plain_http.url}/w.bin",
            ", 1 checked by size only (w.bin): the source gives no hash for it, revision",
        ),
    ):
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "modelcache", "pull", uri, str(tmp_path / uri[-5:]), "--quiet"),
            env={**os.environ, "HF_ENDPOINT": hf_hub.endpoint},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert want in out.decode() and err == b""


@pytest.mark.parametrize("cluster", ["memory"], indirect=True)
async def test_verify_on_start_refetches_a_flipped_git_sha1_file(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    config = b'{"architectures": ["X"]}'
    hf_hub.add_repo("org/a", {"config.json": config, "w.bin": os.urandom(64 * KiB)})
    await seed(cluster.store, group_doc("g", path=cache), node_doc("n1", [("a", "hf://org/a", "1Mi")]))
    async with running_agent(cluster.state, cache, store=cluster.store) as run_:
        await eventually(lambda: run_.model_dir("hf://org/a").is_dir(), what="a published")
    target = cache / "models" / storage_key("hf://org/a") / "config.json"
    flip(target, 3)  # a small file: the hub gives only its git blob sha1
    async with running_agent(cluster.state, cache, store=cluster.store, verify_on_start=True) as run_:
        await eventually(lambda: target.exists() and target.read_bytes() == config, what="a fetched again")
