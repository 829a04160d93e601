"""Azure Blob and ADLS Gen2 sources against Azurite (tests/support/azurite.py): exact bytes in
ranges, Content-MD5 checks, nothing re-fetched, a tampered blob refused, SIGKILL then resume of
only what was missing, shared key, SAS and anonymous access, denial naming the container, more than
5,000 blobs, and no key or SAS in any output or state file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.download.azure import AzureSettings, list_azure
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.errors import AccessDenied, IntegrityError, SourceNotFound
from localmodel.uri import parse_uri
from tests.support.azurite import ACCOUNT, KEY, ROOT, Azurite, azurite_binary
from tests.support.entra import Entra, Grant

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


def texts_under(root: Path) -> str:
    return "".join(
        p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix == ".json"
    )


def _container(azurite: Azurite, *, public: bool = False) -> str:
    name = f"c-{uuid.uuid4().hex[:8]}"
    azurite.container(name, public=public)
    return name


def _put(azurite: Azurite, container: str, name: str, data: bytes, **kw: object) -> None:
    azurite.service.get_blob_client(container, name).upload_blob(data, overwrite=True, **kw)


def _sas(container: str) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return str(
        generate_container_sas(
            ACCOUNT,
            container,
            account_key=KEY,
            permission=ContainerSasPermissions(read=True, list=True),
            expiry=datetime.now(UTC) + timedelta(hours=1),
        )
    )


async def test_azure_folder_exact_bytes_in_ranges_then_nothing_refetched(
    azurite: Azurite, tmp_path: Path
) -> None:
    container = _container(azurite)
    expected = {
        "model.safetensors": os.urandom(5 * MiB + 17),  # 6 ranges of 1 MiB
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer/vocab.txt": b"a\nb\n",
    }
    for name, body in expected.items():
        _put(azurite, container, f"models/llama/{name}", body)
    _put(azurite, container, "models/llama-other/x", b"not ours")
    dest = tmp_path / "m"
    first = await run(azurite.url(container, "models/llama"), dest)
    assert tree(dest) == expected
    assert first.bytes_transferred == sum(map(len, expected.values()))  # type: ignore[attr-defined]
    # Put Blob stores a Content-MD5 for single-shot uploads: every file checked by it.
    assert first.verified and first.hash_checked == {"md5": 3}  # type: ignore[attr-defined]
    second = await run(azurite.url(container, "models/llama"), dest)  # the same URI: the same storage key
    assert second.up_to_date and second.bytes_transferred == 0  # type: ignore[attr-defined]
    assert KEY not in texts_under(tmp_path)


async def test_azure_single_blob_and_missing(azurite: Azurite, tmp_path: Path) -> None:
    container = _container(azurite)
    _put(azurite, container, "dir/model.gguf", b"gguf bytes")
    await run(azurite.url(container, "dir/model.gguf"), tmp_path / "one")
    assert tree(tmp_path / "one") == {"model.gguf": b"gguf bytes"}
    with pytest.raises(SourceNotFound, match=f"no blobs under this prefix in container {container}"):
        await run(azurite.url(container, "nothing-here"), tmp_path / "none")
    with pytest.raises(SourceNotFound, match=r"ContainerNotFound \(container no-such-container"):
        await run(azurite.url("no-such-container", "m"), tmp_path / "none")
    assert not (tmp_path / "none").exists()


async def test_adls_gen2_directories_are_not_files(azurite: Azurite, tmp_path: Path) -> None:
    """What the blob API shows of an ADLS Gen2 filesystem: directories are empty blobs marked
    hdi_isfolder=true. The abfss:// form names the same data."""
    container = _container(azurite)
    for folder in ("models", "models/llama", "models/llama/tokenizer"):
        _put(azurite, container, folder, b"", metadata={"hdi_isfolder": "true"})
    _put(azurite, container, "models/llama/config.json", b"{}")
    _put(azurite, container, "models/llama/tokenizer/vocab.txt", b"v")
    _put(azurite, container, "models/llama/empty.txt", b"")  # an empty file is a file
    await run(f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/models/llama", tmp_path / "m")
    assert tree(tmp_path / "m") == {"config.json": b"{}", "tokenizer/vocab.txt": b"v", "empty.txt": b""}


async def test_azure_tampered_blob_is_refused(azurite: Azurite, tmp_path: Path) -> None:
    from azure.storage.blob import ContentSettings

    container = _container(azurite)
    body = os.urandom(3 * MiB)
    _put(azurite, container, "m/weights.bin", body)
    # The stored Content-MD5 no longer matches the bytes: what a corrupted or swapped blob looks like.
    other = hashlib.md5(body + b"x").digest()
    azurite.service.get_blob_client(container, "m/weights.bin").set_http_headers(
        content_settings=ContentSettings(content_md5=bytearray(other))
    )
    with pytest.raises(IntegrityError, match=r"weights\.bin: content does not match"):
        await run(azurite.url(container, "m"), tmp_path / "m")
    assert not (tmp_path / "m").exists()


async def test_azure_sas_in_the_url_and_anonymous_public_container(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    private = _container(azurite)
    _put(azurite, private, "m/a.bin", b"private bytes")
    sas = _sas(private)
    await run(azurite.url(private, "m", sas), tmp_path / "sas")
    assert tree(tmp_path / "sas") == {"a.bin": b"private bytes"}
    sig = next(v for k, v in (p.split("=", 1) for p in sas.split("&")) if k == "sig")
    assert sig not in texts_under(tmp_path) and "sig=" not in texts_under(tmp_path)

    public = _container(azurite, public=True)
    _put(azurite, public, "m/b.bin", b"public bytes")
    await run(azurite.url(public, "m"), tmp_path / "anon")
    assert tree(tmp_path / "anon") == {"b.bin": b"public bytes"}

    with pytest.raises(AccessDenied, match=f"access denied to container {private} of account {ACCOUNT}"):
        await run(azurite.url(private, "m"), tmp_path / "denied")  # no key, no SAS, not public


async def test_azure_wrong_key_is_access_denied_without_the_key(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = _container(azurite)
    _put(azurite, container, "m/a", b"a")
    wrong = KEY[:-8] + "AAAAAAA="
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", wrong)
    with pytest.raises(AccessDenied, match=f"access denied to container {container}") as info:
        await run(azurite.url(container, "m"), tmp_path / "m")
    assert wrong not in str(info.value) and KEY not in str(info.value)
    assert "SECRET" not in repr(AzureSettings(access_key="SECRET", client_secret="SECRET"))


def test_azure_listing_pages_past_5000_blobs(azurite: Azurite) -> None:
    container = _container(azurite)
    client = azurite.service.get_container_client(container)
    names = [f"many/shard-{i:05d}.bin" for i in range(5003)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: client.upload_blob(n, b"x"), names))
    listing = list_azure(
        parse_uri(azurite.url(container, "many")),
        AzureSettings.from_env(os.environ),
        connect_timeout=5,
        read_timeout=30,
    )
    assert [f.path for f in listing.files] == [n.split("/", 1)[1] for n in names]
    assert all(f.size == 1 and f.md5 == hashlib.md5(b"x").hexdigest() for f in listing.files)


async def test_azure_sigkill_mid_file_then_resume_fetches_only_what_was_missing(
    azurite: Azurite, tmp_path: Path
) -> None:
    container = _container(azurite)
    size = 24 * MiB
    body = os.urandom(size)
    _put(azurite, container, "llama/model.safetensors", body)
    _put(azurite, container, "llama/config.json", b"{}")
    dest = tmp_path / "out" / "model"
    argv = [
        sys.executable, "-m", "modelcache", "pull", azurite.url(container, "llama"), str(dest), "--quiet",
        "--chunk-size", "1Mi", "--concurrency", "2", "--max-bandwidth", "4MB/s",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    progress = Destination.for_folder(dest).staging / "progress.json"
    done: list[int] = []
    for _ in range(1200):
        await asyncio.sleep(0.05)
        if progress.exists():
            try:
                done = (
                    json.loads(progress.read_text())["files"].get("model.safetensors", {}).get("chunks", [])
                )
            except (ValueError, KeyError):
                continue
            if len(done) >= 4:
                break
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    done = json.loads(progress.read_text())["files"]["model.safetensors"]["chunks"]
    assert 4 <= len(done) < 24 and not dest.exists()
    assert KEY not in progress.read_text()

    proc = await asyncio.create_subprocess_exec(
        *argv[:-2], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr
    out = stdout.decode()
    # "... 25.2 MB (25165826 bytes, 17825792 transferred) in ..."
    transferred = int(re.search(r"(\d+) transferred", out).group(1))  # type: ignore[union-attr]
    missing = size - len(done) * MiB
    assert transferred in (missing, missing + 2), out  # config.json (2 bytes) may have landed before
    assert (dest / "model.safetensors").read_bytes() == body
    assert KEY not in out + stderr.decode() and "sig=" not in out + stderr.decode()


def _azurite_version(binary: str) -> tuple[int, ...]:
    for folder in Path(binary).resolve().parents:
        package = folder / "package.json"
        if package.is_file() and json.loads(package.read_text()).get("name") == "azurite":
            return tuple(int(x) for x in json.loads(package.read_text())["version"].split(".")[:3])
    return ()


def _azurite_knowing_sas_2026() -> str:
    """Azurite 3.37 or later: azure-storage-blob signs user delegation SAS as of version 2026-04-06
    (signed request headers and query parameters), which earlier Azurites refuse. An older local
    install is upgraded with scripts/install-azurite (which pins 3.37.0)."""
    binary = azurite_binary()
    if _azurite_version(binary) >= (3, 37, 0):
        return binary
    if not binary.startswith(str(ROOT)):
        pytest.skip(f"{binary} is older than Azurite 3.37.0, which user delegation SAS need")
    subprocess.run([str(ROOT / "scripts" / "install-azurite")], capture_output=True, timeout=300, check=False)
    if _azurite_version(binary) < (3, 37, 0):
        pytest.skip("scripts/install-azurite could not install Azurite 3.37.0")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def entra_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Entra, str]]:
    """A service principal's world: the Entra token server (tests/support/entra.py) and Azurite
    with ``--oauth basic`` over HTTPS (Azurite takes bearer tokens only over HTTPS), sharing one
    self-signed certificate. Yields the server and Azurite's account URL."""
    binary = _azurite_knowing_sas_2026()
    entra = Entra(tmp_path_factory.mktemp("entra"))
    entra.start()
    workspace = tmp_path_factory.mktemp("azurite-oauth")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workspace),
            "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose",
            "--oauth", "basic", "--cert", str(entra.cert), "--key", str(entra.key),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"https://127.0.0.1:{port}/{ACCOUNT}"
    context = ssl.create_default_context(cafile=str(entra.ca))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}?comp=list", timeout=2, context=context).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without credentials): up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Azurite (HTTPS, OAuth) did not start") from None
                time.sleep(0.2)
        yield entra, endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        entra.close()
        shutil.rmtree(workspace, ignore_errors=True)


def _sp_env(entra: Entra, endpoint: str, secret: str) -> dict[str, str]:
    """A node's environment as KServe's storage-config secret gives a service principal: AZ_*,
    no account key; the proxy and CA bundle make login.microsoftonline.com the local server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AZURE_", "AZ_")) and k.lower() not in ("https_proxy", "http_proxy", "no_proxy")
    }
    return env | {
        "AZ_CLIENT_ID": CLIENT_ID,
        "AZ_CLIENT_SECRET": secret,
        "AZ_TENANT_ID": TENANT_ID,
        "AZURE_STORAGE_BLOB_ENDPOINT": endpoint,
        "HTTPS_PROXY": entra.proxy_url,
        "NO_PROXY": "127.0.0.1,localhost",
        "REQUESTS_CA_BUNDLE": str(entra.ca),  # requests (azure-identity, azure-storage-blob)
        "SSL_CERT_FILE": str(entra.ca),  # the engine's client
    }


TENANT_ID = "8d3c1c3e-5a8e-4a1c-9f57-1d6c5b1e2f10"
CLIENT_ID = "0b5e8a52-1c37-4c0f-a6a1-6a2f9b6f2d11"


def test_azure_service_principal_from_kserve_env(
    entra_azurite: tuple[Entra, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AZ_CLIENT_ID/AZ_CLIENT_SECRET/AZ_TENANT_ID, as KServe reads them: azure-identity's
    ClientSecretCredential gets a token for storage from Entra, azure-storage-blob lists with it
    and signs a user delegation SAS, the engine fetches with that SAS; the secret, the token and the
    SAS are in no output or state file. A wrong secret is AccessDenied naming the container."""
    from azure.storage.blob import BlobServiceClient

    entra, endpoint = entra_azurite
    secret = "sp~SECRET~" + uuid.uuid4().hex
    entra.add_principal(TENANT_ID, CLIENT_ID, secret)
    container = f"c-{uuid.uuid4().hex[:8]}"
    admin = BlobServiceClient(
        endpoint, credential={"account_name": ACCOUNT, "account_key": KEY}, connection_verify=str(entra.ca)
    )
    admin.create_container(container)  # private: no anonymous access
    body = os.urandom(3 * MiB + 3)
    for name, data in (("m/model.safetensors", body), ("m/config.json", b"{}")):
        admin.get_blob_client(container, name).upload_blob(data)
    uri = f"https://{ACCOUNT}.blob.core.windows.net/{container}/m"
    env = _sp_env(entra, endpoint, secret)

    for k, v in env.items():
        if k.startswith(("AZ", "HTTPS_PROXY", "NO_PROXY", "REQUESTS_CA")):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY", raising=False)
    listing = list_azure(parse_uri(uri), AzureSettings.from_env(env), connect_timeout=5, read_timeout=30)
    assert sorted(f.path for f in listing.files) == ["config.json", "model.safetensors"]
    for f in listing.files:  # a user delegation SAS: signed for the principal's object id
        assert f.url and "skoid=" in f.url and "sp=r" in f.url and secret not in f.url
    assert secret not in repr(listing) and secret not in repr(AzureSettings.from_env(env))
    assert entra.grants[-1] == Grant(TENANT_ID, CLIENT_ID, "https://storage.azure.com/.default", True)

    dest = tmp_path / "out" / "model"
    argv = [sys.executable, "-m", "modelcache", "pull", uri, str(dest), "--chunk-size", "1Mi"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (dest / "model.safetensors").read_bytes() == body and (dest / "config.json").read_bytes() == b"{}"
    said = done.stdout + done.stderr + texts_under(tmp_path)
    assert secret not in said and "sig=" not in said and "Bearer" not in said

    wrong = subprocess.run(
        [*argv[:-3], str(tmp_path / "denied")],
        env=env | {"AZ_CLIENT_SECRET": "sp~WRONG~" + uuid.uuid4().hex},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert wrong.returncode == 1
    assert f"access denied to container {container} of account {ACCOUNT}" in wrong.stderr
    assert "WRONG" not in wrong.stdout + wrong.stderr and secret not in wrong.stdout + wrong.stderr
    assert entra.grants[-1].ok is False and not (tmp_path / "denied").exists()
