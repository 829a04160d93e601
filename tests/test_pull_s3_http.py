"""`modelcache pull` from S3 (moto) and from plain HTTP servers (aiohttp), archives included."""

import base64
import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import PullResult, TransferSettings
from localmodel.errors import AccessDenied, IntegrityError, SourceNotFound, UnsafePath
from localmodel.uri import parse_uri
from tests.support.s3 import S3
from tests.support.s3files import S3Files

MiB = 1 << 20


async def run(uri: str, dest: Path, **kw: Any) -> PullResult:
    options: dict[str, Any] = {"chunk_size": MiB, "backoff_initial": 0.01, **kw}
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(**options),
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_s3_prefix_with_more_than_1000_objects(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    expected = {f"shard/{i:04d}.bin": f"{i}".encode() for i in range(1005)}
    for key, body in expected.items():
        s3.client.put_object(Bucket=bucket, Key=f"models/llama/{key}", Body=body)
    s3.client.put_object(Bucket=bucket, Key="models/llama-other/x", Body=b"not ours")
    result = await run(f"s3://{bucket}/models/llama", tmp_path / "m")
    assert tree(tmp_path / "m") == expected
    assert result.files == 1005


async def test_s3_multipart_object_in_ranges_and_checksums(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    part1, part2 = os.urandom(5 * MiB), os.urandom(MiB + 3)
    up = s3.client.create_multipart_upload(Bucket=bucket, Key="m/big.bin")
    etags = [
        s3.client.upload_part(
            Bucket=bucket, Key="m/big.bin", UploadId=up["UploadId"], PartNumber=n, Body=body
        )["ETag"]
        for n, body in ((1, part1), (2, part2))
    ]
    s3.client.complete_multipart_upload(
        Bucket=bucket,
        Key="m/big.bin",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]},
    )
    small = b"single part: its ETag is the MD5"
    s3.client.put_object(Bucket=bucket, Key="m/config.json", Body=small)
    sha = base64.b64encode(hashlib.sha256(b"with sha").digest()).decode()
    s3.client.put_object(Bucket=bucket, Key="m/sha.txt", Body=b"with sha", ChecksumSHA256=sha)
    await run(f"s3://{bucket}/m/", tmp_path / "m")
    assert tree(tmp_path / "m") == {"big.bin": part1 + part2, "config.json": small, "sha.txt": b"with sha"}


async def test_s3_single_object_and_missing(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    s3.client.put_object(Bucket=bucket, Key="dir/model.gguf", Body=b"gguf")
    await run(f"s3://{bucket}/dir/model.gguf", tmp_path / "one")
    assert tree(tmp_path / "one") == {"model.gguf": b"gguf"}
    with pytest.raises(SourceNotFound):
        await run(f"s3://{bucket}/nothing-here", tmp_path / "none")
    with pytest.raises(SourceNotFound):
        await run("s3://no-such-bucket-x/m", tmp_path / "none")


async def test_s3_denied_is_access_denied(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    s3.client.put_object(Bucket=bucket, Key="m/a", Body=b"a")
    s3.client.put_bucket_policy(
        Bucket=bucket,
        Policy='{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*","Action":"s3:*","Resource":"*"}]}',
    )
    with pytest.raises(AccessDenied, match="access denied") as info:
        await run(f"s3://{bucket}/m", tmp_path / "m")
    assert "testingSECRETkey" not in str(info.value)
    assert not (tmp_path / "m").exists()


# -- plain HTTP ---------------------------------------------------------------------------------


class Files:
    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.ranges = True
        self.seen: list[str] = []
        self.url = ""
        self.head_size: int | None = None  # a HEAD that lies about the size


@pytest_asyncio.fixture
async def http_files() -> AsyncIterator[Files]:
    files = Files()

    async def handler(request: web.Request) -> web.StreamResponse:
        files.seen.append(request.path_qs)
        body = files.bodies.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        if request.query.get("token") not in (None, "s3cr3t"):
            raise web.HTTPForbidden()
        if request.method == "HEAD" and files.head_size is not None:
            return web.Response(headers={"Content-Length": str(files.head_size)})
        rng = request.headers.get("Range") if files.ranges else None
        if rng:
            a, _, b = rng[6:].partition("-")
            start, end = int(a), int(b) if b else len(body) - 1
            return web.Response(
                status=206,
                body=body[start : end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{len(body)}", "ETag": '"e"'},
            )
        return web.Response(
            body=body, headers={"ETag": '"e"', "Accept-Ranges": "bytes" if files.ranges else "none"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    files.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield files
    finally:
        await runner.cleanup()


def targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("ranges", [True, False])
async def test_http_single_file_with_and_without_ranges(
    http_files: Files, tmp_path: Path, ranges: bool
) -> None:
    body = os.urandom(3 * MiB + 5)
    http_files.bodies["/w/model.safetensors"] = body
    http_files.ranges = ranges
    await run(f"{http_files.url}/w/model.safetensors", tmp_path / "m")
    assert tree(tmp_path / "m") == {"model.safetensors": body}


async def test_http_archive_is_unpacked(http_files: Files, tmp_path: Path) -> None:
    members = {"model/config.json": b"{}", "model/w.bin": os.urandom(2 * MiB)}
    http_files.bodies["/m.tar.gz"] = targz(members)
    await run(f"{http_files.url}/m.tar.gz", tmp_path / "m")
    assert tree(tmp_path / "m") == members


async def test_http_archive_escaping_member_fails_whole_download(http_files: Files, tmp_path: Path) -> None:
    http_files.bodies["/m.tgz"] = targz({"ok.txt": b"ok", "../evil.txt": b"evil"})
    with pytest.raises(UnsafePath):
        await run(f"{http_files.url}/m.tgz", tmp_path / "out" / "m")
    assert not (tmp_path / "out" / "m").exists() and not list(tmp_path.rglob("evil.txt"))


async def test_signed_url_query_never_leaks(
    http_files: Files, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    http_files.bodies["/m.bin"] = b"x" * 100
    await run(f"{http_files.url}/m.bin?token=s3cr3t", tmp_path / "m")
    with pytest.raises(AccessDenied) as info:
        await run(f"{http_files.url}/m.bin?token=WRONGs3cr3t", tmp_path / "n")
    assert "s3cr3t" not in str(info.value)
    out, err = capfd.readouterr()
    assert "s3cr3t" not in out + err
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "m.bin":
            assert b"s3cr3t" not in path.read_bytes(), path


async def test_http_size_mismatch_is_an_integrity_error(http_files: Files, tmp_path: Path) -> None:
    # The HEAD announces 1000 bytes, the GET sends more: caught, nothing published.
    http_files.bodies["/m.bin"] = b"y" * 1005
    http_files.head_size = 1000
    http_files.ranges = False
    with pytest.raises(IntegrityError, match="more than the listed"):
        await run(f"{http_files.url}/m.bin", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


async def test_s3_prefix_objects_are_verified_by_their_full_object_sha256(
    s3files: S3Files, tmp_path: Path
) -> None:
    bucket = s3files.bucket("models")
    good, bad = os.urandom(3 * MiB), os.urandom(2 * MiB)
    s3files.put(bucket, "m/good.bin", good, sha256=True)
    s3files.put(bucket, "m/plain.json", b"{}")
    await run("s3://models/m", tmp_path / "ok")
    manifest = Destination.for_folder(tmp_path / "ok").published()
    assert manifest is not None
    assert {e.path: e.sha256 for e in manifest.files}["good.bin"] == hashlib.sha256(good).hexdigest()
    # One HEAD asks whether "m" is a single object; then only the object stored with a checksum
    # costs a HEAD of its own.
    heads = [r.key for r in s3files.requests if r.method == "HEAD"]
    assert heads == ["m", "m/good.bin"]

    # An object whose bytes do not match the checksum S3 stored for it fails, naming the file.
    s3files.put(bucket, "m/bad.bin", bad)
    s3files.describe(bucket, "m/bad.bin", sha256=hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(IntegrityError, match=r"bad\.bin"):
        await run("s3://models/m", tmp_path / "fails")
    assert not (tmp_path / "fails").exists()
