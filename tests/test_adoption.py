"""Adoption of folders KServe's agent filled (issue 16 §1): ``<root>/models/<key>/`` without our
manifest is checked against the source and kept, not fetched again; only what is missing or wrong is
fetched, in place (pods mount the folder by subPath); entries the source does not list are kept and
never deleted; a folder with a link is refused as before.

The folders are filled as KServe v0.20.0's download Job fills them: the storage initializer with
``models/<key>`` as its destination (pkg/controller/v1alpha1/localmodelnode/controller.go:148-158),
``snapshot_download(local_dir=...)`` for hf:// (python/storage/kserve_storage/kserve_storage.py:661-666)
which leaves ``.cache/huggingface/`` beside the files (huggingface_hub 0.32.4 _local_folder.py:187-224,
414-436), and S3 objects one by one, empty ones skipped (kserve_storage.py:534).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.adopt import Found, Kind, decide, survey
from agent.disk import CacheDir
from agent.download.listing import Listing, RemoteFile
from localmodel.kinds import EVENT, LOCAL_MODEL_NODE
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import Manifest
from localmodel.state.memory import MemoryState
from tests.support.agents import Cluster, Running, eventually, group_doc, node_doc, running_agent, seed
from tests.support.hfhub import Hub
from tests.support.s3 import S3

URI = "hf://org/m"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 16,  # 4 KiB: an LFS file (sha256 in the listing)
    "sub/tokenizer.json": b'{"version": "1.0"}',
}


@pytest_asyncio.fixture
async def mem() -> AsyncIterator[Cluster]:
    memory = MemoryState()
    yield Cluster(memory, memory, "memory")


def fill_like_kserve(folder: Path, hub: Hub, repo: str, files: dict[str, bytes]) -> None:
    """What KServe's storage initializer leaves for an hf:// URI: the files, and huggingface_hub's
    local-dir metadata (commit, etag, timestamp) with its lock files and .gitignore."""
    commit = hub.repos[repo].refs["main"]
    meta = folder / ".cache" / "huggingface"
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
        f = hub.file(repo, path)
        etag = f.sha256 if f.lfs else f.git_sha1
        (meta / "download" / path).parent.mkdir(parents=True, exist_ok=True)
        (meta / "download" / f"{path}.metadata").write_text(f"{commit}\n{etag}\n1712656091.123\n")
        (meta / "download" / f"{path}.lock").write_bytes(b"")
    (meta / ".gitignore").write_text("*")


def model_state(status: dict[str, Any], name: str) -> dict[str, Any]:
    return dict((status.get("models") or {}).get(name) or {})


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


async def downloaded(run: Running, name: str = "m") -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        m = model_state(await run.status(), name)
        return m if m.get("state") == "ModelDownloaded" else None

    found: dict[str, Any] = await eventually(check, timeout=30, what=f"{name} downloaded")
    return found


async def failed_with(run: Running, reason: str, name: str = "m") -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        m = model_state(await run.status(), name)
        return m if m.get("state") == "ModelDownloadError" and m.get("reason") == reason else None

    found: dict[str, Any] = await eventually(check, timeout=30, what=f"{name} failed with {reason}")
    return found


async def events(store: MemoryState, reason: str) -> list[str]:
    return [e["message"] for e in (await store.list(EVENT)).items if e["reason"] == reason]


def gets(hub: Hub, path: str = "") -> int:
    return hub.count("GET", f"/resolve/{hub.repos['org/m'].refs['main']}/{path}") + hub.count(
        "GET", f"/resolve/main/{path}"
    )


def manifest_of(cache: Path, uri: str = URI) -> Manifest:
    return Manifest.read(CacheLayout(cache).manifest_file(storage_key(uri)))


async def test_a_folder_kserve_filled_is_adopted_without_fetching_a_byte(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    inodes = {p: (folder / p).stat().st_ino for p in FILES}
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store) as run:
        m = await downloaded(run)
        assert gets(hf_hub) == 0  # not one file fetched: all of them were there and matched
        assert m["bytesTotal"] == sum(len(c) for c in FILES.values())
        assert run.metric("modelcache_adopted_bytes_total") == sum(len(c) for c in FILES.values())
        assert run.metric("modelcache_downloaded_bytes_total") == 0
        (adopted,) = await events(mem.store, "Adopted")
        assert "3 file(s) kept" in adopted and "0 fetched" in adopted and ".cache" in adopted
        assert condition(await run.status(), "CacheFolderClean").get("status") == "True"
    manifest = manifest_of(cache)
    assert sorted(f.path for f in manifest.files) == sorted(FILES)
    assert manifest.extras == (".cache",)  # huggingface_hub's metadata: theirs, kept
    assert {p: (folder / p).stat().st_ino for p in FILES} == inodes  # the same files, not copies
    assert (folder / ".cache" / "huggingface" / ".gitignore").read_text() == "*"
    # A restart finds it published (the extras do not make it foreign).
    disk = CacheDir(cache)
    disk.open()
    try:
        scan = disk.scan(verify=True)
    finally:
        disk.close()
    assert storage_key(URI) in scan.published and not scan.foreign and not scan.untrusted


async def test_an_altered_file_alone_is_fetched_again_in_place_while_readers_hold_files_open(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    weights = folder / "model.safetensors"
    altered = bytearray(FILES["model.safetensors"])
    altered[100] ^= 0xFF  # same size: only the hash tells
    weights.write_bytes(bytes(altered))
    (folder / "sub" / "tokenizer.json").unlink()  # a file the Job never finished
    config_inode = (folder / "config.json").stat().st_ino
    with (folder / "config.json").open("rb") as config_reader, weights.open("rb") as weights_reader:
        await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
        async with running_agent(mem.state, cache, store=mem.store) as run:
            await downloaded(run)
            assert gets(hf_hub, "model.safetensors") == 1 and gets(hf_hub, "sub/tokenizer.json") == 1
            assert gets(hf_hub, "config.json") == 0
            fetched = len(FILES["model.safetensors"]) + len(FILES["sub/tokenizer.json"])
            assert run.metric("modelcache_downloaded_bytes_total") == fetched
            (adopted,) = await events(mem.store, "Adopted")
            assert "1 file(s) kept" in adopted and "2 fetched" in adopted
        # The reader of the replaced file still reads what it opened (a rename, not a rewrite).
        assert weights_reader.read() == bytes(altered)
        assert config_reader.read() == FILES["config.json"]
    assert weights.read_bytes() == FILES["model.safetensors"]
    assert (folder / "sub" / "tokenizer.json").read_bytes() == FILES["sub/tokenizer.json"]
    assert (folder / "config.json").stat().st_ino == config_inode
    assert not (cache / ".modelcache" / "staging" / storage_key(URI)).exists()


async def test_entries_the_source_does_not_list_are_kept_reported_and_never_deleted(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    (folder / "sub" / "notes.txt").write_text("an operator's notes")
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store) as run:
        await downloaded(run)
        (adopted,) = await events(mem.store, "Adopted")
        assert "2 entries the source does not list kept" in adopted and "sub/notes.txt" in adopted
        assert manifest_of(cache).extras == (".cache", "sub/notes.txt")
        # The cache leaves the node: our files go, theirs stay, and so does the folder holding them.
        await mem.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": {"localModels": []}})

        async def reported() -> bool:
            return f"models/{folder.name}" in condition(await run.status(), "CacheFolderClean").get(
                "message", ""
            )

        await eventually(reported, what="the folder left with their files reported")
        assert await events(mem.store, "Deleted")
    assert not any((folder / p).exists() for p in FILES)
    assert (folder / "sub" / "notes.txt").read_text() == "an operator's notes"
    assert (folder / ".cache" / "huggingface" / ".gitignore").read_text() == "*"
    assert not CacheLayout(cache).manifest_file(folder.name).exists()


async def test_an_adopted_folder_found_damaged_at_start_is_repaired_in_place_with_theirs_kept(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store) as run:
        await downloaded(run)
    weights = folder / "model.safetensors"
    weights.chmod(0o644)
    damaged = bytearray(FILES["model.safetensors"])
    damaged[7] ^= 0x01
    weights.write_bytes(bytes(damaged))
    config_inode = (folder / "config.json").stat().st_ino
    # Untrusted at start (its hash no longer matches): never swapped or deleted, since theirs are in
    # it; the one damaged file is fetched again in place.
    async with running_agent(mem.state, cache, store=mem.store, verify_on_start=True) as run:
        await eventually(
            lambda: gets(hf_hub, "model.safetensors") == 1, what="the damaged file fetched again"
        )
        await downloaded(run)
    assert weights.read_bytes() == FILES["model.safetensors"] and gets(hf_hub) == 1
    assert (folder / "config.json").stat().st_ino == config_inode
    assert (folder / ".cache" / "huggingface" / ".gitignore").read_text() == "*"
    assert manifest_of(cache).extras == (".cache",)


async def test_a_folder_with_a_link_out_of_it_is_not_adopted_until_the_link_is_gone(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the model's")
    (folder / "sub" / "extra.json").symlink_to(outside)
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        m = await failed_with(run, "ForeignFolder")
        assert "symbolic link (sub/extra.json)" in m["message"]
        assert condition(await run.status(), "CacheFolderClean").get("status") == "False"
        assert gets(hf_hub) == 0 and not CacheLayout(cache).manifest_file(folder.name).exists()
        assert outside.read_text() == "not the model's" and (folder / "sub" / "extra.json").is_symlink()
        (folder / "sub" / "extra.json").unlink()  # the user removes it: the retry adopts
        await downloaded(run)
        assert gets(hf_hub) == 0


async def test_an_unreachable_source_leaves_the_folder_foreign_and_is_retried(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    repo = hf_hub.repos.pop("org/m")  # the listing answers 404 now (hf: "not found or private")
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        m = await failed_with(run, "AccessDenied")
        assert m.get("retryAfter")
        assert condition(await run.status(), "CacheFolderClean").get("status") == "False"
        assert not CacheLayout(cache).manifest_file(folder.name).exists()
        hf_hub.repos["org/m"] = repo
        await downloaded(run)
        assert gets(hf_hub) == 0


async def test_an_s3_folder_without_its_empty_objects_is_adopted_and_they_are_created(
    mem: Cluster, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.bucket("adopt")
    objects = {"m/config.json": b"{}", "m/weights.bin": os.urandom(3000), "m/empty.txt": b""}
    for key, body in objects.items():
        s3.client.put_object(Bucket=bucket, Key=key, Body=body)
    uri = f"s3://{bucket}/m"
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(uri)
    folder.mkdir(parents=True)
    for key, body in objects.items():
        if body:  # kserve_storage.py:534 skips empty objects
            (folder / key.removeprefix("m/")).write_bytes(body)
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", uri, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store) as run:
        await downloaded(run)
        assert run.metric("modelcache_downloaded_bytes_total") == 0
        (adopted,) = await events(mem.store, "Adopted")
        assert "2 file(s) kept" in adopted and "1 empty file(s) created" in adopted
    assert (folder / "empty.txt").read_bytes() == b""
    manifest = manifest_of(cache, uri)
    assert sorted(f.path for f in manifest.files) == ["config.json", "empty.txt", "weights.bin"]
    assert manifest.extras == ()
    # S3's multipart-free ETag is the md5: the kept files were checked by it.
    assert (
        next(f for f in manifest.files if f.path == "weights.bin").md5
        == hashlib.md5(objects["m/weights.bin"], usedforsecurity=False).hexdigest()
    )


# -- the pure rules ----------------------------------------------------------------------------


def _listing(*files: RemoteFile, archive: str | None = None) -> Listing:
    return Listing("hf://org/m", "abc", files, archive=archive)


def test_survey_names_extras_by_their_topmost_path_and_hashes_only_files_of_the_listed_size() -> None:
    sha = hashlib.sha256(b"abcd").hexdigest()
    listing = _listing(RemoteFile("a/w.bin", 4, sha256=sha), RemoteFile("b.txt", 2), RemoteFile("e", 0))
    found = (
        Found("a", Kind.DIR),
        Found("a/w.bin", Kind.FILE, 4),
        Found("a/notes", Kind.FILE, 9),
        Found("b.txt", Kind.FILE, 3),
        Found(".cache", Kind.DIR),
        Found(".cache/huggingface", Kind.DIR),
        Found(".cache/huggingface/.gitignore", Kind.FILE, 1),
    )
    plan = survey(listing, found, where="f")
    assert plan.refusal is None
    assert plan.extras == (".cache", "a/notes")
    assert set(plan.to_hash) == {"a/w.bin"} and plan.fetch == ("b.txt",) and plan.create == ("e",)
    kept = decide(listing, plan, {"a/w.bin": sha})
    assert [e.path for e in kept.keep] == ["a/w.bin"] and [f.path for f in kept.fetch] == ["b.txt"]
    wrong = decide(listing, plan, {"a/w.bin": "0" * 64})
    assert not wrong.keep and [f.path for f in wrong.fetch] == ["a/w.bin", "b.txt"]


def test_a_file_without_a_source_hash_is_fetched_unless_its_bytes_were_checked_otherwise() -> None:
    listing = _listing(RemoteFile("w.bin", 4))
    plan = survey(listing, (Found("w.bin", Kind.FILE, 4),), where="f")
    assert plan.to_hash == {"w.bin": None}
    digest = hashlib.sha256(b"abcd").hexdigest()
    # The right size says nothing of the content: fetched again.
    by_size = decide(listing, plan, {"w.bin": digest})
    assert not by_size.keep and [f.path for f in by_size.fetch] == ["w.bin"]
    # Checked by its multipart ETag or against the file:// source: kept, its sha256 recorded.
    (entry,) = decide(listing, plan, {"w.bin": digest}, {"w.bin": "s3-multipart-etag"}).keep
    assert entry.sha256 == digest


@pytest.mark.parametrize(
    ("found", "words"),
    [
        ((Found("x", Kind.LINK),), "symbolic link (x)"),
        ((Found("fifo", Kind.OTHER),), "special file (fifo)"),
        ((Found("a", Kind.FILE, 1),), "a is a file there"),
        ((Found("w.bin", Kind.DIR),), "w.bin is a folder there"),
    ],
)
def test_links_special_files_and_layout_clashes_refuse_the_adoption(
    found: tuple[Found, ...], words: str
) -> None:
    listing = _listing(RemoteFile("w.bin", 4), RemoteFile("a/b", 1))
    plan = survey(listing, found, where="models/k")
    assert plan.refusal is not None and words in plan.refusal


def test_an_archive_source_is_not_adopted() -> None:
    plan = survey(_listing(RemoteFile("m.tar.gz", 9), archive=".tar.gz"), (), where="models/k")
    assert plan.refusal is not None and "archive" in plan.refusal


def test_a_manifest_with_extras_reads_back_and_refuses_unsafe_ones(tmp_path: Path) -> None:
    m = Manifest("hf://org/m", storage_key("hf://org/m"), "abc", (), extras=(".cache", "sub/n"))
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))).extras == (".cache", "sub/n")
    bad = m.to_json() | {"extras": ["../x"]}
    with pytest.raises(Exception, match="extras"):
        Manifest.from_json(bad)
    assert "extras" not in Manifest("u", "k", None, ()).to_json()


# -- modelcache pull --adopt -------------------------------------------------------------------


async def test_pull_adopt_keeps_a_dest_another_tool_filled_and_fetches_only_the_altered_file(
    hf_hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelcache.cli import main

    hf_hub.add_repo("org/m", FILES)
    dest = tmp_path / "dest"
    fill_like_kserve(dest, hf_hub, "org/m", FILES)
    (dest / "config.json").write_bytes(b'{"model_type": "llamA"}')  # same size, another hash
    # Without --adopt: refused as before, nothing changed (exit 2, one line naming --adopt).
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--adopt" in err and err.count("\n") == 1
    weights = (dest / "model.safetensors").stat().st_ino
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--quiet", "--adopt"]) == 0
    out = capsys.readouterr().out
    assert "2 file(s) kept" in out and "1 fetched" in out and ".cache" in out
    assert gets(hf_hub) == 1 and gets(hf_hub, "config.json") == 1
    assert (dest / "config.json").read_bytes() == FILES["config.json"]
    assert (dest / "model.safetensors").stat().st_ino == weights
    # Ours now, with theirs recorded: a second pull is up to date and fetches nothing.
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--quiet", "--adopt"]) == 0
    assert "up to date" in capsys.readouterr().out and gets(hf_hub) == 1
    (dest / "config.json").chmod(0o644)
    (dest / "config.json").write_bytes(b"{}")  # changed since: checked again, fetched again
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--quiet", "--adopt"]) == 0
    assert "1 fetched" in capsys.readouterr().out and gets(hf_hub, "config.json") == 2
    assert (dest / ".cache" / "huggingface" / ".gitignore").read_text() == "*"


async def test_pull_adopt_refuses_a_dest_with_a_link_and_changes_nothing(
    hf_hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelcache.cli import main

    hf_hub.add_repo("org/m", FILES)
    dest = tmp_path / "dest"
    fill_like_kserve(dest, hf_hub, "org/m", FILES)
    (dest / "passwd").symlink_to("/etc/passwd")
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--quiet", "--adopt"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link (passwd)" in err and err.count("\n") == 1
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--adopt", "--force"]) == 2
    assert gets(hf_hub) == 0 and (dest / "passwd").is_symlink()


async def test_a_kserve_folder_on_a_nearly_full_disk_is_adopted_not_refused_for_room(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    from tests.test_agent_faults import tmpfs

    big = {"config.json": b"{}", "model.safetensors": os.urandom(1536 * 1024)}
    hf_hub.add_repo("org/m", big)
    with tmpfs(tmp_path / "cache", "2m") as cache:
        folder = cache / "models" / storage_key(URI)
        fill_like_kserve(folder, hf_hub, "org/m", big)
        # Less free space than the model: what is already in the folder needs no new room.
        assert os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize < len(big["model.safetensors"])
        await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1540Ki")]))
        async with running_agent(mem.state, cache, store=mem.store) as run:
            await downloaded(run)
            assert gets(hf_hub) == 0


async def test_a_private_model_is_adopted_with_the_cache_s_own_credentials(
    kube_api: Any, hf_hub: Hub, tmp_path: Path
) -> None:
    # The listing needs the token the cache's ServiceAccount names, as the download path uses it.
    from localmodel.kinds import KINDS_BY_NAME
    from tests.test_credentials import _agent_env, _lmn, _run_agent, account, secret

    hf_hub.add_repo("org/m", FILES, token="hf_adoptTOKEN123")
    folder = tmp_path / "cache" / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    model = {"modelName": "good", "sourceModelUri": URI, "serviceAccountName": "good-sa"}
    for obj in (
        group_doc("g", path=tmp_path / "cache"),
        _lmn([model]),
        account("good-sa", ["good-token"]),
        secret("good-token", {"HF_TOKEN": "hf_adoptTOKEN123"}),
    ):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    env = _agent_env(tmp_path, {"HF_ENDPOINT": hf_hub.endpoint, "HF_HUB_DISABLE_XET": "1"})
    _, logs = await _run_agent(tmp_path, kube_api, env, "--once", "--retry-min", "3600")
    node = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert node["status"]["modelStatus"]["good"] == "ModelDownloaded", logs[-2000:]
    assert gets(hf_hub) == 0 and manifest_of(tmp_path / "cache").extras == (".cache",)


# -- nothing kept unchecked: sources without a content hash ------------------------------------


def _multipart(s3: S3, bucket: str, key: str, body: bytes, part: int) -> str:
    up = s3.client.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for n, start in enumerate(range(0, len(body), part), start=1):
        answer = s3.client.upload_part(
            Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=body[start : start + part]
        )
        parts.append({"ETag": answer["ETag"], "PartNumber": n})
    s3.client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    return str(s3.client.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


async def test_pull_adopt_checks_an_s3_multipart_object_by_its_etag_and_fetches_a_wrong_one(
    s3: S3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelcache.cli import main

    bucket = s3.bucket("multipart")
    part = 5 * 1024 * 1024  # S3's least part size
    good = os.urandom(part) + os.urandom(1000)
    assert _multipart(s3, bucket, "m/w.bin", good, part).endswith("-2")  # no md5, no sha256 given
    uri = f"s3://{bucket}/m"
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "w.bin").write_bytes(b"\0" * len(good))  # the right size, not the right bytes
    assert await asyncio.to_thread(main, ["pull", uri, str(dest), "--quiet", "--adopt"]) == 0
    out = capsys.readouterr().out
    assert "0 file(s) kept" in out and "1 fetched" in out, out
    assert (dest / "w.bin").read_bytes() == good
    assert _published(dest).checked_by == {"w.bin": "fetched"}
    # Another writer's right copy: kept, checked by the multipart ETag computed from its parts.
    other = tmp_path / "other"
    other.mkdir()
    (other / "w.bin").write_bytes(good)
    inode = (other / "w.bin").stat().st_ino
    assert await asyncio.to_thread(main, ["pull", uri, str(other), "--quiet", "--adopt"]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) kept" in out and "1 by S3 multipart ETag" in out and "0 fetched" in out, out
    assert (other / "w.bin").stat().st_ino == inode
    assert _published(other).checked_by == {"w.bin": "s3-multipart-etag"}


def _published(dest: Path) -> Manifest:
    from agent.download.staging import Destination

    manifest = Destination.for_folder(dest).published()
    assert manifest is not None
    return manifest


async def test_pull_adopt_compares_a_file_source_s_bytes_and_fetches_a_file_that_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelcache.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 3000)
    (src / "b.bin").write_bytes(b"b" * 3000)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.bin").write_bytes(b"a" * 3000)  # the same bytes: kept
    (dest / "b.bin").write_bytes(b"B" * 3000)  # the same size only: fetched
    inode = (dest / "a.bin").stat().st_ino
    assert await asyncio.to_thread(main, ["pull", f"file://{src}", str(dest), "--quiet", "--adopt"]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) kept" in out and "1 by comparing with the source file" in out, out
    assert "1 fetched (2.9 KiB)" in out, out
    assert _published(dest).checked_by == {"a.bin": "source-bytes", "b.bin": "fetched"}
    assert (dest / "b.bin").read_bytes() == b"b" * 3000 and (dest / "a.bin").stat().st_ino == inode


def test_the_manifest_records_how_each_adopted_file_was_checked() -> None:
    checked = {"a": "sha256", "b": "s3-multipart-etag", "c": "fetched"}
    m = Manifest("s3://b/m", storage_key("s3://b/m"), "abc", (), checked_by=checked)
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))).checked_by == checked
    assert "checkedBy" not in Manifest("u", "k", None, ()).to_json()


# -- hard links, names, the words ---------------------------------------------------------------


async def test_a_folder_with_a_hard_linked_file_is_not_adopted_and_the_other_path_is_untouched(
    mem: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", FILES)
    cache = tmp_path / "cache"
    folder = cache / "models" / storage_key(URI)
    fill_like_kserve(folder, hf_hub, "org/m", FILES)
    victim = tmp_path / "victim"
    victim.write_bytes(FILES["model.safetensors"])
    victim.chmod(0o600)
    (folder / "model.safetensors").unlink()
    os.link(victim, folder / "model.safetensors")  # the right bytes, shared with a path not ours
    await seed(mem.store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "1Mi")]))
    async with running_agent(mem.state, cache, store=mem.store, retry_base=1.0, retry_cap=1.0) as run:
        m = await failed_with(run, "ForeignFolder")
        assert "a file with other hard links (model.safetensors)" in m["message"]
        assert not CacheLayout(cache).manifest_file(folder.name).exists()
        assert victim.stat().st_mode & 0o777 == 0o600 and (folder / "model.safetensors").stat().st_nlink == 2
        victim.unlink()  # the other link gone: the retry adopts
        await downloaded(run)


async def test_pull_adopt_refuses_a_dest_with_a_hard_linked_file_and_changes_nothing(
    hf_hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelcache.cli import main

    hf_hub.add_repo("org/m", FILES)
    dest = tmp_path / "dest"
    fill_like_kserve(dest, hf_hub, "org/m", FILES)
    os.link(dest / "config.json", tmp_path / "theirs.json")
    mode = (dest / "config.json").stat().st_mode
    assert await asyncio.to_thread(main, ["pull", URI, str(dest), "--quiet", "--adopt"]) == 2
    err = capsys.readouterr().err
    assert "hard links (config.json)" in err and err.count("\n") == 1
    assert (tmp_path / "theirs.json").stat().st_mode == mode and gets(hf_hub) == 0


async def test_pull_adopt_on_a_link_says_why_and_names_in_the_summary_are_escaped(
    hf_hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelcache.cli import main

    hf_hub.add_repo("org/m", FILES)
    real = tmp_path / "real"
    fill_like_kserve(real, hf_hub, "org/m", FILES)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert await asyncio.to_thread(main, ["pull", URI, str(link), "--quiet", "--adopt"]) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link" in err and "pass --adopt" not in err and err.count("\n") == 1, err
    (real / "x\nERROR forged line").write_bytes(b"theirs")
    assert await asyncio.to_thread(main, ["pull", URI, str(real), "--quiet", "--adopt"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "x\\nERROR forged line" in out, out


def test_the_adopted_words_say_what_was_received_by_this_try() -> None:
    from agent.download.adoption import AdoptResult, adopted_words

    r = AdoptResult(
        files=2, bytes_total=3000, kept=1, fetched=1, created=0, bytes_kept=1000, bytes_fetched=2000,
        extras=(), revision="abc", seconds=1.0, verified=2, size_only=0, bytes_received=0,
        kept_by={"sha256": 1},
    )  # fmt: skip
    words = adopted_words("hf://org/m", "models/k", r)
    assert "1 file(s) kept (1000 B; checked 1 by sha256), 1 fetched (2.0 KiB, 0 B of it received" in words
    whole = adopted_words("hf://org/m", "models/k", dataclasses.replace(r, bytes_received=2000))
    assert "1 fetched (2.0 KiB)" in whole and "received" not in whole
