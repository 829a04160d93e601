"""A GCS emulator on 127.0.0.1 for tests: PyPI's gcp-storage-emulator, in a process of its own.

Chosen because it is a Python package (pip installs it like the rest; fake-gcs-server is a Go
binary), and it speaks what the gs:// source uses: the JSON API's object listing with size,
generation, md5Hash and crc32c, and media downloads (``alt=media``) honouring ``Range`` with a 206
and ``Content-Range``. Its objects are files on disk under ``data_dir`` (a test rewrites one to
tamper with it). Its HTTP server serves one request at a time; the launcher gives it a threading
server so ranged GETs run in parallel as on GCS. It reads a whole object for every request: fine for
tests of a few MiB. It checks no credentials: the denial test puts a front before it that answers
403 in GCS's JSON error format.

The fixture sets ``STORAGE_EMULATOR_HOST`` as for any GCS emulator.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LAUNCHER = """
import sys
from http import server
from gcp_storage_emulator import server as emulator

emulator.server.HTTPServer = server.ThreadingHTTPServer
emulator.create_server("127.0.0.1", int(sys.argv[1]), in_memory=False, data_dir=sys.argv[2]).run()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gcs:
    endpoint: str
    data_dir: Path
    client: Any  # google.cloud.storage.Client

    def bucket(self, name: str) -> Any:
        return self.client.create_bucket(name)

    def put(self, bucket: str, name: str, data: bytes) -> None:
        self.client.bucket(bucket).blob(name).upload_from_string(data)

    def stored(self, bucket: str, name: str) -> Path:
        """The file that holds an object's bytes (tamper with it to corrupt the object)."""
        matches = [p for p in self.data_dir.rglob(name.rsplit("/", 1)[-1]) if bucket in p.parts]
        (path,) = [p for p in matches if p.as_posix().endswith(f"{bucket}/{name}")]
        return path


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed")
    data = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(port), str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        yield endpoint, data
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def gcs(gcs_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Gcs:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    endpoint, data = gcs_server
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    client = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )
    return Gcs(endpoint, data, client)


def env_for(gcs: Gcs) -> dict[str, str]:
    """The environment of a `modelcache pull` subprocess that reads from the emulator."""
    env = dict(os.environ)
    env["STORAGE_EMULATOR_HOST"] = gcs.endpoint
    return env
