"""gs:// sources against GCS servers (tests/support/gcs.py): exact bytes in ranges, md5 and
crc32c checks, nothing re-fetched, a tampered object refused, SIGKILL then resume of only what was
missing, denial naming the bucket, and no token in any output. The behavioural tests run against
gcsfiles (our JSON API server, which google-cloud-storage's own downloads are checked against
first); the compatibility tests against gcp-storage-emulator too."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import urllib.error
import urllib.request
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
from tests.support.gcs import FilesGcs, Gcs, env_for

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


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def _bucket(gcs: Gcs) -> str:
    name = f"b-{uuid.uuid4().hex[:8]}"
    gcs.bucket(name)
    return name


async def test_gcs_prefix_exact_bytes_in_ranges_then_nothing_refetched(any_gcs: Gcs, tmp_path: Path) -> None:
    gcs = any_gcs
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
    if isinstance(gcs, FilesGcs):  # it records requests: the weights came in 1 MiB ranges
        gets = gcs.server.media_gets("models/llama/model.safetensors")
        assert sorted(gets, key=lambda r: int(r.split("=")[1].split("-")[0])) == [  # type: ignore[union-attr]
            f"bytes={i * MiB}-{min((i + 1) * MiB, 5 * MiB + 17) - 1}" for i in range(6)
        ]
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


async def test_gcs_tampered_object_is_refused(any_gcs: Gcs, tmp_path: Path) -> None:
    gcs = any_gcs
    bucket = _bucket(gcs)
    body = os.urandom(3 * MiB)
    gcs.put(bucket, "m/weights.bin", body)
    gcs.corrupt(bucket, "m/weights.bin", 2 * MiB + 5)  # same size, one bit: only the hash can tell
    with pytest.raises(IntegrityError, match=r"weights\.bin: content does not match"):
        await run(f"gs://{bucket}/m", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_composite_objects_are_checked_by_crc32c(gcs_emulator: Gcs) -> None:
    """Composite objects have a crc32c and no md5Hash: the listing carries the crc32c, and the
    manifest's one rule checks with it (Castagnoli, big-endian, as GCS encodes it). gcsfiles
    implements no writes: composed on gcp-storage-emulator."""
    gcs = gcs_emulator
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


async def test_gcs_denied_names_the_bucket_and_prints_no_token(gcs: FilesGcs, tmp_path: Path) -> None:
    """A private bucket read without credentials: GCS's 401 (anonymous caller) names the bucket
    and the setting to fix; nothing staged."""
    bucket = _bucket(gcs)
    gcs.put(bucket, "llama/a.bin", b"a")
    gcs.server.grant(bucket, "ya29.SECRET-TOKEN")
    with pytest.raises(AccessDenied, match=f"access denied to bucket {bucket}") as info:
        await run(f"gs://{bucket}/llama", tmp_path / "m")
    assert "HTTP 401" in str(info.value) and "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)
    assert "SECRET" not in str(info.value)
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
    gcs: FilesGcs, tmp_path: Path
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
    gcs: FilesGcs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    gcs.server.grant(bucket, "ya29.SECRET-TOKEN")  # the bucket answers that token only
    settings = GcsSettings(endpoint=gcs.endpoint, credentials_file=str(sa))
    try:
        listing = await asyncio.to_thread(
            list_gcs, parse_uri(f"gs://{bucket}/m"), settings, connect_timeout=5, read_timeout=10
        )
    finally:
        await runner.cleanup()
    (f,) = listing.files
    assert dict(f.headers) == {"Authorization": "Bearer ya29.SECRET-TOKEN"} and f.url
    # The engine's GET with the listing's headers is let in; without them it is not.
    got = await asyncio.to_thread(_get, f.url, dict(f.headers))
    assert got == (200, b"a")
    assert (await asyncio.to_thread(_get, f.url, {}))[0] == 401
    # The storage client holds a scoped copy of the credentials: it and the engine each got a token.
    assert set(grants) == {"urn:ietf:params:oauth:grant-type:jwt-bearer"}
    assert "SECRET" not in repr(f) and "SECRET" not in repr(listing)

    sa.write_text("{not json")
    with pytest.raises(
        AccessDenied, match=r"GOOGLE_APPLICATION_CREDENTIALS: .* is not a usable credentials file"
    ):
        list_gcs(parse_uri(f"gs://{bucket}/m"), settings, connect_timeout=5, read_timeout=10)


def test_gcsfiles_serves_google_cloud_storage_s_own_downloads(gcs: FilesGcs, tmp_path: Path) -> None:
    """google-cloud-storage's own calls against gcsfiles: paginated and delimited listings, object
    metadata, a whole download checked by the x-goog-hash header, the transfer manager's ranged
    download checked by the object's crc32c, errors as GCS gives them. What makes the other tests'
    and the benchmark's use of this server stand for GCS."""
    import base64
    import hashlib

    import google.auth.exceptions
    import google.oauth2.credentials
    from google.api_core import exceptions as api
    from google.cloud import storage
    from google.cloud.storage import transfer_manager
    from google.cloud.storage.exceptions import DataCorruption

    bucket = _bucket(gcs)
    big = os.urandom(3 * MiB + 5)
    small = [f"m/part-{i}" for i in range(5)]
    for name in small:
        gcs.put(bucket, name, name.encode())
    gcs.put(bucket, "m/sub/big.bin", big)
    gcs.put(bucket, "other/x", b"x")
    client = gcs.client
    pages = client.list_blobs(bucket, prefix="m/", page_size=2).pages
    assert [[b.name for b in page] for page in pages] == [
        ["m/part-0", "m/part-1"], ["m/part-2", "m/part-3"], ["m/part-4", "m/sub/big.bin"],
    ]  # fmt: skip
    delimited = client.list_blobs(bucket, prefix="m/", delimiter="/")
    assert [b.name for b in delimited] == small and delimited.prefixes == {"m/sub/"}

    blob = client.bucket(bucket).get_blob("m/sub/big.bin")
    assert blob is not None and blob.size == len(big)
    assert blob.md5_hash == base64.b64encode(hashlib.md5(big).digest()).decode()
    assert blob.crc32c == base64.b64encode(google_crc32c.Checksum(big).digest()).decode()
    blob.download_to_filename(str(tmp_path / "whole"))  # checksum="auto": x-goog-hash's crc32c
    assert (tmp_path / "whole").read_bytes() == big
    transfer_manager.download_chunks_concurrently(
        blob, str(tmp_path / "chunks"), chunk_size=MiB, max_workers=4, worker_type=transfer_manager.THREAD
    )
    assert (tmp_path / "chunks").read_bytes() == big
    gets = gcs.server.media_gets("m/sub/big.bin")
    assert gets[0] is None and sorted(gets[1:]) == [  # type: ignore[type-var]
        f"bytes={i * MiB}-{min((i + 1) * MiB, len(big)) - 1}" for i in range(4)
    ]

    gcs.corrupt(bucket, "m/sub/big.bin", 7)  # GCS's record unchanged: both checks must fail
    with pytest.raises(DataCorruption):
        blob.download_to_filename(str(tmp_path / "whole"))
    with pytest.raises(DataCorruption):
        transfer_manager.download_chunks_concurrently(
            blob, str(tmp_path / "chunks"), chunk_size=MiB, worker_type=transfer_manager.THREAD
        )

    with pytest.raises(api.NotFound):
        client.get_bucket("no-such-bucket-x")
    assert client.bucket(bucket).get_blob("m/nothing") is None
    gcs.server.grant(bucket, "ya29.RIGHT")
    # GCS answers an anonymous caller 401; google-auth's session then tries to refresh anonymous
    # credentials, which raises (the gs:// source maps this to AccessDenied).
    with pytest.raises(google.auth.exceptions.InvalidOperation):
        list(client.list_blobs(bucket))
    status, body = _get(f"{gcs.endpoint}/storage/v1/b/{bucket}/o", {})
    error = json.loads(body)["error"]
    assert status == 401 and error["code"] == 401 and error["errors"][0]["reason"] == "required"
    for token, outcome in (("ya29.WRONG", api.Forbidden), ("ya29.RIGHT", None)):
        authed = storage.Client(
            project="test",
            credentials=google.oauth2.credentials.Credentials(token=token),
            client_options={"api_endpoint": gcs.endpoint},
        )
        if outcome is None:
            assert len(list(authed.list_blobs(bucket))) == 7
        else:
            with pytest.raises(outcome):
                list(authed.list_blobs(bucket))


async def test_objects_listed_without_hashes_are_checked_by_x_goog_hash(
    gcs: FilesGcs, tmp_path: Path
) -> None:
    """A listing without crc32c or md5Hash (emulators, gateways): each object's hashes come from the
    x-goog-hash header of its media answer (one 1-byte range), so the files are hash-checked, and a
    flipped byte is refused as when the listing gives them."""
    bucket = _bucket(gcs)
    body = os.urandom(2 * MiB + 3)
    gcs.put(bucket, "m/weights.bin", body)
    gcs.put(bucket, "m/config.json", b"{}")
    gcs.server.listed_hashes = False
    listed = list_gcs(
        parse_uri(f"gs://{bucket}/m"), GcsSettings.from_env(os.environ), connect_timeout=5, read_timeout=5
    )
    assert {f.path: f.crc32c for f in listed.files} == {
        "weights.bin": bytes(google_crc32c.Checksum(body).digest()).hex(),
        "config.json": bytes(google_crc32c.Checksum(b"{}").digest()).hex(),
    }
    assert gcs.server.media_gets("m/weights.bin") == ["bytes=0-0"]
    result = await run(f"gs://{bucket}/m", tmp_path / "m")
    assert tree(tmp_path / "m") == {"weights.bin": body, "config.json": b"{}"}
    assert result.verified and result.hash_checked == {"crc32c": 2}  # type: ignore[attr-defined]
    gcs.corrupt(bucket, "m/weights.bin", MiB + 1)  # the server's hashes are the object's before
    with pytest.raises(IntegrityError, match=r"weights\.bin: content does not match"):
        await run(f"gs://{bucket}/m", tmp_path / "again")
