"""GCS servers on 127.0.0.1 for tests, behind one interface (:class:`Gcs`).

``gcs``: tests/support/gcsfiles.py, our JSON API server over files in a folder (ranged reads with
sendfile, metadata as GCS gives it, private buckets with bearer tokens). The behavioural tests run
against it: it serves ranges as GCS does, at the cost of their bytes, and can refuse access.

``gcs_emulator``: PyPI's gcp-storage-emulator, a third-party emulator, in a process of its own:
the compatibility tests run against it too (and it is the one that implements writes such as
compose). Its HTTP server serves one request at a time; the launcher gives it a threading server
so ranged GETs run in parallel. It reads a whole object for every request: fine for tests of a few
MiB. It checks no credentials.

Each fixture sets ``STORAGE_EMULATOR_HOST`` as for any GCS emulator.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gcsfiles import GcsFiles

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


class Gcs:
    """A GCS server and a google-cloud-storage client of it (anonymous, as for an emulator)."""

    name = ""

    def __init__(self, endpoint: str) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.endpoint = endpoint
        self.client = storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )

    def bucket(self, name: str) -> None:
        raise NotImplementedError

    def put(self, bucket: str, name: str, data: bytes) -> None:
        raise NotImplementedError

    def corrupt(self, bucket: str, name: str, offset: int) -> None:
        """Flip a bit of a stored object, GCS's record of it (size, hashes, generation) unchanged."""
        raise NotImplementedError


class EmulatorGcs(Gcs):
    name = "gcp-storage-emulator"

    def __init__(self, endpoint: str, data_dir: Path) -> None:
        super().__init__(endpoint)
        self.data_dir = data_dir

    def bucket(self, name: str) -> None:
        self.client.create_bucket(name)

    def put(self, bucket: str, name: str, data: bytes) -> None:
        self.client.bucket(bucket).blob(name).upload_from_string(data)

    def corrupt(self, bucket: str, name: str, offset: int) -> None:
        # The emulator keeps its metadata apart from the bytes: rewriting the bytes keeps it.
        matches = [p for p in self.data_dir.rglob(name.rsplit("/", 1)[-1]) if bucket in p.parts]
        (path,) = [p for p in matches if p.as_posix().endswith(f"{bucket}/{name}")]
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))


class FilesGcs(Gcs):
    name = "gcsfiles"

    def __init__(self, server: GcsFiles) -> None:
        super().__init__(server.endpoint)
        self.server = server

    def bucket(self, name: str) -> None:
        self.server.bucket(name)

    def put(self, bucket: str, name: str, data: bytes) -> None:
        self.server.put(bucket, name, data)

    def corrupt(self, bucket: str, name: str, offset: int) -> None:
        self.server.corrupt(bucket, name, offset)


@pytest.fixture(scope="session")
def gcs_emulator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
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


def _point_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


@pytest.fixture
def gcs_emulator(gcs_emulator_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Gcs:
    endpoint, data = gcs_emulator_server
    _point_at(endpoint, monkeypatch)
    return EmulatorGcs(endpoint, data)


@pytest.fixture(scope="session")
def gcsfiles_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsFiles]:
    server = GcsFiles(tmp_path_factory.mktemp("gcsfiles"))
    server.start()
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def gcs(gcsfiles_server: GcsFiles, monkeypatch: pytest.MonkeyPatch) -> Iterator[FilesGcs]:
    """gcsfiles, its request log emptied and its grants dropped after the test."""
    _point_at(gcsfiles_server.endpoint, monkeypatch)
    gcsfiles_server.requests.clear()
    try:
        yield FilesGcs(gcsfiles_server)
    finally:
        gcsfiles_server.requests.clear()
        gcsfiles_server.revoke_all()
        gcsfiles_server.listed_hashes = True


@pytest.fixture(params=["gcsfiles", "gcp-storage-emulator"])
def any_gcs(request: pytest.FixtureRequest) -> Gcs:
    """Each server in turn: a test of what both must serve alike."""
    fixture = "gcs" if request.param == "gcsfiles" else "gcs_emulator"
    server: Gcs = request.getfixturevalue(fixture)
    return server


def env_for(gcs: Gcs) -> dict[str, str]:
    """The environment of a `modelcache pull` subprocess that reads from the emulator."""
    env = dict(os.environ)
    env["STORAGE_EMULATOR_HOST"] = gcs.endpoint
    return env
