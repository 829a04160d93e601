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
import signal
import sys
import uuid
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
from tests.support.azurite import ACCOUNT, KEY, Azurite

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
