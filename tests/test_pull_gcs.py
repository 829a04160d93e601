"""gs:// sources against a GCS emulator (tests/support/gcs.py): exact bytes in ranges, md5 and
crc32c checks, nothing re-fetched, a tampered object refused, SIGKILL then resume of only what was
missing, denial naming the bucket, and no token in any output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path

import google_crc32c
import pytest
from aiohttp import web

from agent.download.gcs import GcsSettings, list_gcs
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.errors import AccessDenied, IntegrityError, SourceNotFound
from localmodel.manifest import Manifest, entry_check, hash_check
from localmodel.uri import parse_uri
from tests.support.gcs import Gcs, env_for

MiB = 1 << 20


async def run(uri: str, dest: Path, **kw: object) -> object:
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(**{"chunk_size": MiB, "backoff_initial": 0.01, **kw}),  # type: ignore[arg-type]
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bucket(gcs: Gcs) -> str:
    name = f"b-{uuid.uuid4().hex[:8]}"
    gcs.bucket(name)
    return name


async def test_gcs_prefix_exact_bytes_in_ranges_then_nothing_refetched(gcs: Gcs, tmp_path: Path) -> None:
    bucket = _bucket(gcs)
    expected = {
        "model.safetensors": os.urandom(5 * MiB + 17),  # 6 ranges of 1 MiB
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer/vocab.txt": b"a\nb\n",
        "empty.txt": b"",
    }
    for name, body in expected.items():
        gcs.put(bucket, f"models/llama/{name}", body)
    gcs.put(bucket, "models/llama/tokenizer_$folder$", b"")  # a Hadoop folder marker
    gcs.put(bucket, "models/llama-other/x", b"not ours")
    dest = tmp_path / "m"
    first = await run(f"gs://{bucket}/models/llama", dest)
    assert tree(dest) == expected
    assert first.files == 4 and first.bytes_transferred == sum(map(len, expected.values()))  # type: ignore[attr-defined]
    # CRC32C, as google-cloud-storage checks downloads where google-crc32c's C extension is built.
    assert first.verified and first.hash_checked == {"crc32c": 4}  # type: ignore[attr-defined]
    manifest = Manifest.read(Destination.for_folder(dest).manifest)
    crcs = {f.path: f.crc32c for f in manifest.files}
    assert crcs == {
        name: bytes(google_crc32c.Checksum(body).digest()).hex() for name, body in expected.items()
    }
    # The agent's re-verify reads the manifest back and checks each file by the same rule.
    for entry in Manifest.from_json(manifest.to_json()).files:
        check = entry_check(entry)
        assert check is not None and check.name == "crc32c"
        h = check.new(entry.size)
        h.update((dest / entry.path).read_bytes())
        assert h.hexdigest() == check.expected
    second = await run(f"gs://{bucket}/models/llama", dest)  # the same URI: the same storage key
    assert second.up_to_date and second.bytes_transferred == 0  # type: ignore[attr-defined]


async def test_gcs_single_object_and_missing(gcs: Gcs, tmp_path: Path) -> None:
    bucket = _bucket(gcs)
    gcs.put(bucket, "dir/model.gguf", b"gguf bytes")
    await run(f"gs://{bucket}/dir/model.gguf", tmp_path / "one")
    assert tree(tmp_path / "one") == {"model.gguf": b"gguf bytes"}
    with pytest.raises(SourceNotFound, match="no objects under this prefix"):
        await run(f"gs://{bucket}/nothing-here", tmp_path / "none")
    with pytest.raises(SourceNotFound, match="bucket no-such-bucket-x not found"):
        await run("gs://no-such-bucket-x/m", tmp_path / "none")
    assert not (tmp_path / "none").exists()


async def test_gcs_tampered_object_is_refused(gcs: Gcs, tmp_path: Path) -> None:
    bucket = _bucket(gcs)
    body = os.urandom(3 * MiB)
    gcs.put(bucket, "m/weights.bin", body)
    stored = gcs.stored(bucket, "m/weights.bin")
    flipped = bytearray(body)
    flipped[2 * MiB + 5] ^= 0x01  # same size, one bit: only the md5 can tell
    stored.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match=r"weights\.bin: content does not match"):
        await run(f"gs://{bucket}/m", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_composite_objects_are_checked_by_crc32c(gcs: Gcs) -> None:
    """Composite objects have a crc32c and no md5Hash: the listing carries the crc32c, and the
    manifest's one rule checks with it (Castagnoli, big-endian, as GCS encodes it)."""
    bucket = _bucket(gcs)
    parts = [b"first part ", b"second part"]
    for i, part in enumerate(parts):
        gcs.put(bucket, f"parts/{i}", part)
    b = gcs.client.bucket(bucket)
    b.blob("m/joined.bin").compose([b.blob("parts/0"), b.blob("parts/1")])
    listing = list_gcs(
        parse_uri(f"gs://{bucket}/m/joined.bin"),
        GcsSettings.from_env({"STORAGE_EMULATOR_HOST": gcs.endpoint}),
        connect_timeout=5,
        read_timeout=10,
    )
    (f,) = listing.files
    whole = b"".join(parts)
    assert f.crc32c == bytes(google_crc32c.Checksum(whole).digest()).hex() and f.md5 is None
    check = hash_check(None, None, None, f.crc32c)
    assert check is not None and check.name == "crc32c"
    h = check.new(len(whole))
    h.update(whole[:5])
    h.update(whole[5:])
    assert h.hexdigest() == check.expected


async def test_gcs_denied_names_the_bucket_and_prints_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def deny(request: web.Request) -> web.Response:
        body = {"error": {"code": 403, "message": "caller does not have storage.objects.list access"}}
        return web.json_response(body, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", deny)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
        with pytest.raises(AccessDenied, match="access denied to bucket private-models") as info:
            await run("gs://private-models/llama", tmp_path / "m")
        assert "HTTP 403" in str(info.value)
    finally:
        await runner.cleanup()
    assert not (tmp_path / "m").exists()


def test_bearer_token_is_never_in_a_repr() -> None:
    from agent.download.gcs import BearerHeaders

    class Creds:
        valid = True
        token = "ya29.SECRET-TOKEN"

    headers = BearerHeaders(Creds(), 5)
    assert dict(headers) == {"Authorization": "Bearer ya29.SECRET-TOKEN"}
    assert "SECRET" not in repr(headers)
    assert "SECRET" not in repr(GcsSettings(credentials_file="/secret/key.json"))


def test_an_expired_token_that_cannot_be_refreshed_is_access_denied() -> None:
    from google.auth.exceptions import RefreshError

    from agent.download.gcs import BearerHeaders

    class Expired:
        valid = False
        token = "ya29.OLD-SECRET"
        timeouts: list[float] = []

        def refresh(self, request: object) -> None:
            raise RefreshError("invalid_grant: SECRET-DETAIL")

    with pytest.raises(AccessDenied, match="the Google credentials could not be refreshed") as info:
        dict(BearerHeaders(Expired(), 5))
    assert "SECRET" not in str(info.value)


async def test_gcs_sigkill_mid_file_then_resume_fetches_only_what_was_missing(
    gcs: Gcs, tmp_path: Path
) -> None:
    bucket = _bucket(gcs)
    size = 24 * MiB
    body = os.urandom(size)
    gcs.put(bucket, "llama/model.safetensors", body)
    gcs.put(bucket, "llama/config.json", b"{}")
    dest = tmp_path / "out" / "model"
    argv = [
        sys.executable, "-m", "modelcache", "pull", f"gs://{bucket}/llama", str(dest), "--quiet",
        "--chunk-size", "1Mi", "--concurrency", "2", "--max-bandwidth", "4MB/s",
    ]  # fmt: skip
    env = env_for(gcs)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL, env=env)
    progress = Destination.for_folder(dest).staging / "progress.json"
    done: list[int] = []
    for _ in range(1200):
        await asyncio.sleep(0.05)
        if progress.exists():
            try:
                files = json.loads(progress.read_text())["files"]
            except (ValueError, KeyError):
                continue
            done = files.get("model.safetensors", {}).get("chunks", [])
            if len(done) >= 4:
                break
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    done = json.loads(progress.read_text())["files"]["model.safetensors"]["chunks"]
    assert 4 <= len(done) < 24 and not dest.exists()

    proc = await asyncio.create_subprocess_exec(
        *argv[:-2], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr
    missing = size - len(done) * MiB
    out = stdout.decode()
    # "... 25.2 MB (25165826 bytes, 17825792 transferred) in ..."
    transferred = int(re.search(r"(\d+) transferred", out).group(1))  # type: ignore[union-attr]
    assert transferred in (missing, missing + 2), out  # config.json (2 bytes) may have landed before
    assert (dest / "model.safetensors").read_bytes() == body
    assert (dest / "config.json").read_bytes() == b"{}"


async def test_service_account_key_gives_a_bearer_token_never_printed(
    gcs: Gcs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GOOGLE_APPLICATION_CREDENTIALS names a service account key: google-auth trades a signed JWT
    for a token at the key's token_uri (a local OAuth server here), and the engine's GETs carry it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    grants: list[str] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        grants.append(str(form.get("grant_type")))
        return web.json_response(
            {"access_token": "ya29.SECRET-TOKEN", "expires_in": 3600, "token_type": "Bearer"}
        )

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    sa = tmp_path / "sa.json"
    sa.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "reader@p.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"http://127.0.0.1:{port}/token",
            }
        )
    )
    bucket = _bucket(gcs)
    gcs.put(bucket, "m/a.bin", b"a")
    settings = GcsSettings(endpoint=gcs.endpoint, credentials_file=str(sa))
    try:
        listing = await asyncio.to_thread(
            list_gcs, parse_uri(f"gs://{bucket}/m"), settings, connect_timeout=5, read_timeout=10
        )
    finally:
        await runner.cleanup()
    (f,) = listing.files
    assert dict(f.headers) == {"Authorization": "Bearer ya29.SECRET-TOKEN"}
    # The storage client holds a scoped copy of the credentials: it and the engine each got a token.
    assert set(grants) == {"urn:ietf:params:oauth:grant-type:jwt-bearer"}
    assert "SECRET" not in repr(f) and "SECRET" not in repr(listing)

    sa.write_text("{not json")
    with pytest.raises(
        AccessDenied, match=r"GOOGLE_APPLICATION_CREDENTIALS: .* is not a usable credentials file"
    ):
        list_gcs(parse_uri(f"gs://{bucket}/m"), settings, connect_timeout=5, read_timeout=10)
