"""Azurite, Microsoft's Azure Storage emulator (npm package ``azurite``), on 127.0.0.1 for tests.

Found at ``.azurite/node_modules/.bin/azurite-blob`` (``scripts/install-azurite`` puts it there; the
fixture runs that script once when node and npm are present, and skips naming what is missing when
not), or as ``azurite-blob`` on the PATH. It speaks the Blob REST API with shared-key, SAS and
anonymous (public container) access, paginates listings at 5,000 blobs, and honours ``Range``.
It has no hierarchical namespace: ADLS Gen2 directories are stood for by what the blob API shows of
them (empty blobs with ``hdi_isfolder=true`` metadata).

The fixture sets ``AZURE_STORAGE_ACCESS_KEY`` (the emulator's well-known key) and
``AZURE_STORAGE_BLOB_ENDPOINT`` (its account URL), and clears the service principal variables.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, the same in every installation).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def azurite_binary() -> str:
    """The azurite-blob executable, installed on first use; pytest.skip naming what is missing."""
    local = ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    if found := shutil.which("azurite-blob"):
        return found
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Azurite needs node and npm (apt-get install nodejs npm); neither azurite-blob found")
    done = subprocess.run(
        [str(ROOT / "scripts" / "install-azurite")], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0 or not local.exists():
        pytest.skip(f"npm could not install azurite: {done.stderr.strip()[-300:]}")
    return str(local)


@dataclass
class Azurite:
    endpoint: str  # the account URL: http://127.0.0.1:PORT/devstoreaccount1
    service: Any  # azure.storage.blob.BlobServiceClient with the account key

    def container(self, name: str, *, public: bool = False) -> Any:
        return self.service.create_container(name, public_access="container" if public else None)

    def url(self, container: str, path: str = "", query: str = "") -> str:
        """The URI a user would write for the real service (the endpoint setting redirects it)."""
        base = f"https://{ACCOUNT}.blob.core.windows.net/{container}" + (f"/{path}" if path else "")
        return base + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = azurite_binary()
    workspace = tmp_path_factory.mktemp("azurite")
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workspace),
            "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}?comp=list", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (403 without credentials): up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Azurite did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workspace, ignore_errors=True)


@pytest.fixture
def azurite(azurite_server: str, monkeypatch: pytest.MonkeyPatch) -> Azurite:
    from azure.storage.blob import BlobServiceClient

    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", KEY)
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", azurite_server)
    for name in ("CLIENT_ID", "CLIENT_SECRET", "TENANT_ID"):
        monkeypatch.delenv(f"AZ_{name}", raising=False)
        monkeypatch.delenv(f"AZURE_{name}", raising=False)
    service = BlobServiceClient(azurite_server, credential={"account_name": ACCOUNT, "account_key": KEY})
    return Azurite(azurite_server, service)


def env_without_key(env: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment less the account key (SAS and anonymous access)."""
    result = dict(os.environ if env is None else env)
    result.pop("AZURE_STORAGE_ACCESS_KEY", None)
    return result
