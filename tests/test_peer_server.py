"""The peer server (agent.peer): a real server on 127.0.0.1, real HTTP clients (httpx, and raw
sockets for request targets a client would normalise), cache folders written by the agent's own
publish and resume-state code."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent.download.journal import FileProgress, Progress
from agent.download.ratelimit import RateLimiter
from agent.download.staging import Destination, publish
from agent.metrics import AgentMetrics
from agent.peer.holdings import Unsatisfiable, parse_range
from agent.peer.server import PeerServer, ServeSettings, parse_target
from agent.peer.service import PeerConfig, PeerService, advertise_address
from agent.peer.token import ROTATION_GRACE, TokenFile
from agent.status import peer_condition
from localmodel.errors import InvalidInput
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import FileEntry, Manifest
from localmodel.peering import Holding, bearer, file_path, holding_path, manifest_digest, manifest_path
from tests.support.agents import cache_doc, eventually, group_doc
from tests.support.hfhub import Hub

TOKEN = "peer-token-0123456789abcdef"
OTHER = "peer-token-fedcba9876543210"
URI = "hf://org/model"
KEY = storage_key(URI)
CHUNK = 64 << 10


def blob(n: int, seed: int) -> bytes:
    # Seeded, so each test's bytes are the same on every run (one join: += on bytes is quadratic).
    return random.Random(seed).randbytes(n)


FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "sub dir/weights#1.bin": blob(300_000, 1),
    "empty.txt": b"",
}


def publish_model(
    cache: Path, files: dict[str, bytes], *, revision: str = "rev1", uri: str = URI
) -> Manifest:
    """A model published by the agent's own publish step (staging folder, manifest, rename)."""
    key = storage_key(uri)
    dest = Destination.in_cache(CacheLayout(cache), key)
    for rel, data in files.items():
        target = dest.staging / "files" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    manifest = Manifest(
        source_model_uri=uri,
        storage_key=key,
        revision=revision,
        files=tuple(FileEntry(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()),
        published_at="2026-01-01T00:00:00Z",
    )
    publish(dest, manifest)
    return manifest


def stage_download(
    cache: Path,
    files: dict[str, bytes],
    *,
    chunks: dict[str, set[int]],
    verified: set[str],
    revision: str = "rev2",
    key: str = KEY,
) -> Path:
    """A download in progress as the engine leaves it: each file preallocated to its size with the
    recorded chunks' bytes (and garbage elsewhere: bytes not recorded are never given), verified
    files whole; the state written by the engine's own Progress.save."""
    staging = CacheLayout(cache).staging_dir(key)
    state = Progress(revision, CHUNK, {})
    for rel, data in files.items():
        target = staging / "files" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel in verified:
            target.write_bytes(data)
        else:
            content = bytearray(b"\xee" * len(data))  # not yet written: must never be given
            for i in chunks.get(rel, set()):
                content[i * CHUNK : (i + 1) * CHUNK] = data[i * CHUNK : (i + 1) * CHUNK]
            target.write_bytes(bytes(content))
        st = FileProgress(len(data), hashlib.sha256(data).hexdigest(), None, None)
        st.chunks = set(chunks.get(rel, set()))
        st.verified = rel in verified
        state.files[rel] = st
    state.save(staging / "progress.json")
    return staging


@dataclass
class Running:
    server: PeerServer
    url: str
    cache: Path
    metrics: AgentMetrics
    tokens: TokenFile

    def get(self, path: str, *, token: str | None = TOKEN, **headers: str) -> httpx.Response:
        sent = {**(bearer(token) if token is not None else {}), **headers}
        with httpx.Client(timeout=30, trust_env=False) as client:
            return client.get(self.url + path, headers=sent)

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def start(tmp_path: Path, token_file: Path) -> Iterator[Callable[..., Running]]:
    started: list[PeerServer] = []

    def run(
        *,
        cache: Path | None = None,
        tokens: TokenFile | None = None,
        sleep: Callable[[float], object] | None = None,
        limiter: RateLimiter | None = None,
        **settings: object,
    ) -> Running:
        cache = cache or tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        if tokens is None:
            tokens = TokenFile(token_file)
            tokens.load()
        metrics = AgentMetrics(CollectorRegistry())
        extra = {"sleep": sleep} if sleep is not None else {}
        server = PeerServer(
            cache,
            ServeSettings(bind=("127.0.0.1", 0), chunk_size=CHUNK, **settings),  # type: ignore[arg-type]
            tokens,
            metrics,
            limiter=limiter,
            **extra,  # type: ignore[arg-type]
        )
        host, port = server.start()
        started.append(server)
        return Running(server, f"http://{host}:{port}", cache, metrics, tokens)

    yield run
    for server in started:
        server.stop()


def raw_get(url: str, target: str, *, token: str | None = TOKEN) -> tuple[int, bytes]:
    """One request with ``target`` sent byte for byte (no client normalises its dots or escapes)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: peer\r\n{auth}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- a published model ------------------------------------------------------------------------------


def test_a_published_model_is_served_byte_exact_whole_and_by_ranges(start: Callable[..., Running]) -> None:
    peer = start()
    manifest = publish_model(peer.cache, FILES)
    r = peer.get(holding_path(KEY))
    assert r.status_code == 200
    holding = Holding.from_json(r.json())
    assert holding.published and holding.revision == "rev1" and holding.storage_key == KEY
    assert {p: (f.size, f.complete) for p, f in holding.files.items()} == {
        p: (len(d), True) for p, d in FILES.items()
    }
    r = peer.get(manifest_path(KEY))
    assert r.status_code == 200
    assert manifest_digest(Manifest.from_json(r.json())) == manifest_digest(manifest)
    weights = FILES["sub dir/weights#1.bin"]
    url = file_path(KEY, "sub dir/weights#1.bin")
    r = peer.get(url)
    assert (r.status_code, r.content) == (200, weights)
    assert r.headers["Content-Length"] == str(len(weights))
    cases = {
        "bytes=10-99": (10, 100),
        "bytes=299000-": (299_000, 300_000),
        "bytes=-5": (299_995, 300_000),
        "bytes=-400000": (0, 300_000),  # more than the file: all of it
        "bytes=299990-999999": (299_990, 300_000),  # an end past the file is cut to it
    }
    for header, (a, b) in cases.items():
        r = peer.get(url, Range=header)
        assert r.status_code == 206, header
        assert r.content == weights[a:b], header
        assert r.headers["Content-Range"] == f"bytes {a}-{b - 1}/300000", header
    assert peer.get(file_path(KEY, "config.json")).content == FILES["config.json"]
    r = peer.get(file_path(KEY, "empty.txt"))
    assert (r.status_code, r.content) == (200, b"")
    # Counted once the answer is sent: the client may have all of it a moment before.
    wait_for(lambda: peer.count("modelcache_peer_uploads_in_flight") == 0)
    wait_for(lambda: peer.count("modelcache_peer_requests_total", code="206") == len(cases))
    sent = len(weights) + sum(b - a for a, b in cases.values()) + len(FILES["config.json"])
    assert peer.count("modelcache_peer_upload_bytes_total") == sent


def test_ranges_it_cannot_satisfy_are_416_with_the_size(start: Callable[..., Running]) -> None:
    peer = start()
    publish_model(peer.cache, FILES)
    url = file_path(KEY, "sub dir/weights#1.bin")
    for header in (
        "bytes=300000-",
        "bytes=5-2",
        "bytes=0-1,5-6",
        "items=0-1",
        "bytes=abc",
        "bytes=-0",
        "bytes=",
    ):
        r = peer.get(url, Range=header)
        assert r.status_code == 416, header
        assert r.headers["Content-Range"] == "bytes */300000", header
    r = peer.get(file_path(KEY, "empty.txt"), Range="bytes=0-")
    assert r.status_code == 416


def test_numbers_past_int_s_digit_limit_are_ranges_not_a_500(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: ``bytes=0-`` and 5,000 nines was an HTTP 500 and an ERROR traceback (int()'s
    4,300-digit limit, a ValueError). A huge end is cut to the file, a huge start is past it."""
    caplog.set_level(logging.DEBUG)
    peer = start()
    publish_model(peer.cache, FILES)
    url = file_path(KEY, "sub dir/weights#1.bin")
    weights = FILES["sub dir/weights#1.bin"]
    r = peer.get(url, Range="bytes=0-" + "9" * 5000)
    assert (r.status_code, r.headers["Content-Range"]) == (206, "bytes 0-299999/300000")
    assert r.content == weights
    r = peer.get(url, Range="bytes=-" + "9" * 5000)
    assert (r.status_code, r.content) == (206, weights)
    # Under aiohttp's 8,190-byte header line: past int()'s limit, each number.
    for header in ("bytes=" + "9" * 5000 + "-", "bytes=" + "1" * 4400 + "-" + "2" * 3700):
        r = peer.get(url, Range=header)
        assert (r.status_code, r.headers["Content-Range"]) == (416, "bytes */300000")
    r = peer.get(url, Range="bytes=" + "0" * 5000 + "5-" + "0" * 3000 + "9")
    assert (r.status_code, r.content) == (206, weights[5:10])
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_parse_range_rules() -> None:
    assert (parse_range(None, 10).start, parse_range(None, 10).end, parse_range(None, 10).partial) == (
        0,
        10,
        False,
    )
    assert (parse_range("bytes=3-3", 10).start, parse_range("bytes=3-3", 10).end) == (3, 4)
    assert (parse_range(" bytes = 2 - 4 ", 10).start, parse_range(" bytes = 2 - 4 ", 10).end) == (2, 5)
    # "\u0661" is a digit to str.isdigit, but not an ASCII one.
    for bad in ("bytes=10-", "bytes=\u0661-2", "bytes=-", "bytes=1-2-3"):
        with pytest.raises(Unsatisfiable):
            parse_range(bad, 10)


# -- a download in progress -------------------------------------------------------------------------


def test_a_download_in_progress_gives_only_its_durable_chunks_and_verified_files(
    start: Callable[..., Running],
) -> None:
    peer = start()
    big, done = blob(3 * CHUNK + 100, 2), blob(1000, 3)
    staging = stage_download(
        peer.cache,
        {"big.bin": big, "done.bin": done, "none.bin": blob(50, 4)},
        chunks={"big.bin": {0, 2}},
        verified={"done.bin"},
    )
    (staging / "files" / "unnamed.bin").write_bytes(b"never given")
    holding = Holding.from_json(peer.get(holding_path(KEY)).json())
    assert not holding.published and holding.revision == "rev2" and holding.chunk_size == CHUNK
    assert {p: (f.size, f.complete, f.chunks) for p, f in holding.files.items()} == {
        "big.bin": (len(big), False, frozenset({0, 2})),
        "done.bin": (len(done), True, frozenset()),
    }
    url = file_path(KEY, "big.bin")
    r = peer.get(url, Range=f"bytes=0-{CHUNK - 1}")
    assert (r.status_code, r.content) == (206, big[:CHUNK])
    r = peer.get(url, Range=f"bytes={2 * CHUNK + 10}-{2 * CHUNK + 19}")
    assert (r.status_code, r.content) == (206, big[2 * CHUNK + 10 : 2 * CHUNK + 20])
    for header in (f"bytes={CHUNK}-{CHUNK}", f"bytes=0-{CHUNK}", f"bytes={3 * CHUNK}-", None):
        extra = {"Range": header} if header else {}
        r = peer.get(url, **extra)
        assert r.status_code == 404, header
        assert b"\xee" not in r.content
    assert peer.get(file_path(KEY, "done.bin")).content == done
    assert peer.get(file_path(KEY, "none.bin")).status_code == 404
    assert peer.get(file_path(KEY, "unnamed.bin")).status_code == 404
    assert peer.get(manifest_path(KEY)).status_code == 404  # not published yet


def test_a_new_revision_in_progress_is_given_over_the_published_one_and_an_archive_never(
    start: Callable[..., Running],
) -> None:
    peer = start()
    publish_model(peer.cache, FILES, revision="rev1")
    new = blob(2 * CHUNK, 5)
    staging = stage_download(peer.cache, {"new.bin": new}, chunks={"new.bin": {1}}, verified=set())
    holding = Holding.from_json(peer.get(holding_path(KEY)).json())
    assert (holding.revision, holding.published, set(holding.files)) == ("rev2", False, {"new.bin"})
    assert peer.get(file_path(KEY, "config.json")).status_code == 404
    assert peer.get(manifest_path(KEY)).status_code == 404
    # The same revision staged again (a re-download after a damaged file): the published copy.
    stage_download(peer.cache, {"new.bin": new}, chunks={"new.bin": {1}}, verified=set(), revision="rev1")
    holding = Holding.from_json(peer.get(holding_path(KEY)).json())
    assert (holding.revision, holding.published) == ("rev1", True)
    assert peer.get(file_path(KEY, "config.json")).content == FILES["config.json"]
    # An archive's download: its members exist only once unpacked; nothing of it is given.
    other = storage_key("s3://bucket/model.tar")
    stage_download(peer.cache, {"model.tar": new}, chunks={"model.tar": {0}}, verified=set(), key=other)
    (staging.parent / other / "archive").mkdir()
    assert peer.get(holding_path(other)).status_code == 404
    assert peer.get(file_path(other, "model.tar"), Range="bytes=0-9").status_code == 404


def test_a_key_it_does_not_hold_is_404_for_every_path(start: Callable[..., Running]) -> None:
    peer = start()
    publish_model(peer.cache, FILES)
    other = storage_key("hf://org/other")
    for path in (holding_path(other), manifest_path(other), file_path(other, "config.json")):
        assert peer.get(path).status_code == 404
    for target in (
        "/v1/models/NOTAKEY/holding",
        "/v1/models/",
        "/",
        "/v1/models/" + KEY + "/other",
        "/v1/models/" + KEY + "/holding/x",
        "/v1/models/" + KEY + "/files/",
    ):
        assert raw_get(peer.url, target)[0] == 404, target
    wait_for(lambda: peer.count("modelcache_peer_requests_total", code="404") >= 9)


# -- the token --------------------------------------------------------------------------------------


def test_a_request_without_the_token_is_401_before_any_path_is_looked_at(
    start: Callable[..., Running],
) -> None:
    peer = start()
    publish_model(peer.cache, FILES)
    url = file_path(KEY, "config.json")
    answers = [
        peer.get(url, token=None),
        peer.get(url, token=OTHER),
        peer.get(url, token=TOKEN[:-1]),
        peer.get(url, token=None, Authorization=f"Basic {TOKEN}"),
        peer.get(url, token=None, Authorization="Bearer"),
        peer.get("/no/such/path", token=None),
        peer.get(holding_path(KEY), token=OTHER),
    ]
    for r in answers:
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert KEY not in r.text and "config" not in r.text and TOKEN not in r.text
    # Two Authorization headers (one good): refused, not the first or last picked.
    host, port = peer.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"GET {url} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {OTHER}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode()
        )
        assert s.recv(100).startswith(b"HTTP/1.1 401")
    assert raw_get(peer.url, "/v1/models/../../etc/passwd", token=None)[0] == 401
    wait_for(lambda: peer.count("modelcache_peer_requests_total", code="401") == len(answers) + 2)
    assert peer.count("modelcache_peer_upload_bytes_total") == 0
    assert peer.get(url).content == FILES["config.json"]


def kubelet_secret(folder: Path, token: str) -> Path:
    """A Secret volume as the kubelet writes it: ``token -> ..data/token``, ``..data -> ..<stamp>``;
    an update writes a new stamped folder and renames a new ``..data`` link over the old one."""
    stamp = folder / f"..{time.monotonic_ns()}"
    stamp.mkdir(parents=True)
    (stamp / "token").write_text(token)
    tmp = folder / "..data_tmp"
    tmp.symlink_to(stamp.name)
    tmp.replace(folder / "..data")
    link = folder / "token"
    if not link.is_symlink():
        link.symlink_to("..data/token")
    return link


def test_a_rotated_token_is_taken_and_the_old_one_kept_for_the_grace_window(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    now = [1000.0]
    path = kubelet_secret(tmp_path / "secret", TOKEN)
    tokens = TokenFile(path, clock=lambda: now[0])
    tokens.load()
    peer = start(tokens=tokens)
    publish_model(peer.cache, FILES)
    url = holding_path(KEY)
    assert peer.get(url, token=TOKEN).status_code == 200
    assert peer.get(url, token=OTHER).status_code == 401
    kubelet_secret(tmp_path / "secret", OTHER)
    assert peer.get(url, token=OTHER).status_code == 200
    assert tokens.current() == OTHER
    assert tokens.previous() == TOKEN  # what this node, as a sender, tries on a refusal
    now[0] += ROTATION_GRACE - 1
    assert peer.get(url, token=TOKEN).status_code == 200  # the previous one, in its grace window
    assert tokens.previous() == TOKEN
    now[0] += 2
    assert peer.get(url, token=TOKEN).status_code == 401
    assert peer.get(url, token=OTHER).status_code == 200
    assert tokens.previous() is None


def test_a_token_file_missing_or_empty_refuses_the_start_and_later_keeps_the_last_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for content in (None, "", " \n", "two words", "x" * 5000):
        path = tmp_path / "t"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if content is not None:
            path.write_text(content)
        with pytest.raises(InvalidInput) as e:
            TokenFile(path).load()
        assert str(e.value).startswith("--peer-token-file: ") and str(path) in str(e.value)
        assert "\n" not in str(e.value)
        assert "two" not in str(e.value) and "xxxx" not in str(e.value)
    path.write_text(TOKEN)
    tokens = TokenFile(path)
    tokens.load()
    path.unlink()
    assert tokens.check(f"Bearer {TOKEN}")  # a Secret being swapped: the last token stays
    assert tokens.problem is not None and str(path) in tokens.problem
    path.write_text("")
    assert tokens.check(f"Bearer {TOKEN}") and "empty" in (tokens.problem or "")
    path.write_text(OTHER)
    assert tokens.check(f"Bearer {OTHER}") and tokens.problem is None
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and OTHER not in record.getMessage()


# -- paths ------------------------------------------------------------------------------------------


def test_no_path_reaches_outside_the_model_links_included(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    peer = start()
    publish_model(peer.cache, FILES)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    layout = CacheLayout(peer.cache)
    base = f"/v1/models/{KEY}/files/"
    targets = [
        base + "../../../../secret.txt",
        base + "%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        base + "%2E%2E%2F%2E%2E%2Fsecret.txt",
        base + "..%2f..%2f..%2fsecret.txt",
        base + str(secret),
        base + "/" + str(secret).lstrip("/"),
        base + "sub%20dir/../config.json",
        base + "./config.json",
        base + "config.json%00",
        base + "%ff",
        f"/v1/models/{KEY}/../{KEY}/files/config.json",
        "/v1/models/" + "../" * 6 + "etc/passwd",
    ]
    for target in targets:
        code, body = raw_get(peer.url, target)
        assert code in (400, 404), target
        assert b"TOPSECRET" not in body and b"root:" not in body
    # A link planted where the manifest names a file, in place of the model's folder, or in the
    # staging folder: never followed.
    model = layout.model_dir(KEY)
    os.chmod(model, 0o755)
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(secret)
    assert peer.get(file_path(KEY, "config.json")).status_code == 404
    (model / "config.json").unlink()
    (model / "config.json").write_text("x")  # not the manifest's size: not given either
    assert peer.get(file_path(KEY, "config.json")).status_code == 404
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_bytes(FILES["config.json"])
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(secret)
    os.rename(model, tmp_path / "moved")
    model.symlink_to(outside)
    assert peer.get(file_path(KEY, "config.json")).status_code == 404
    other = storage_key("hf://org/staged")
    staging = stage_download(peer.cache, {"a.bin": b"ok"}, chunks={}, verified={"a.bin"}, key=other)
    (staging / "files" / "a.bin").unlink()
    (staging / "files" / "a.bin").symlink_to(secret)
    assert peer.get(file_path(other, "a.bin")).status_code == 404
    assert peer.count("modelcache_peer_upload_bytes_total") == 0


def test_parse_target_decodes_each_segment_alone() -> None:
    assert parse_target(file_path(KEY, "a b/c#d?.bin")) == (KEY, "files", "a b/c#d?.bin")
    assert parse_target(f"/v1/models/{KEY}/holding?x=1") == (KEY, "holding", None)
    assert parse_target(f"/v1/models/{KEY}/files/a%2Fb") is None
    assert parse_target(f"/v1/models/{KEY}/files/%ff") is None
    assert parse_target(f"/v1/models/{KEY.upper()}/holding") is None


# -- limits -----------------------------------------------------------------------------------------


def test_uploads_over_the_limit_are_503_and_a_peer_that_hangs_up_frees_its_slot(
    start: Callable[..., Running],
) -> None:
    release = threading.Event()

    async def held(_: float) -> None:  # the upload cap's wait, held until the test lets it go
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)

    peer = start(sleep=held, limiter=RateLimiter(1 << 20), max_uploads=1)
    publish_model(peer.cache, FILES)
    url = file_path(KEY, "sub dir/weights#1.bin")
    got: list[httpx.Response] = []
    first = threading.Thread(target=lambda: got.append(peer.get(url)))
    first.start()
    wait_for(lambda: peer.count("modelcache_peer_uploads_in_flight") == 1)
    r = peer.get(url)
    assert (r.status_code, r.headers["Retry-After"]) == (503, "1")
    assert peer.get(holding_path(KEY)).status_code == 200  # the limit is on file answers only
    release.set()
    first.join(60)
    assert got[0].status_code == 200 and got[0].content == FILES["sub dir/weights#1.bin"]
    # A peer that hangs up mid-answer: its slot is freed.
    release.clear()
    host, port = peer.url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    wait_for(lambda: peer.count("modelcache_peer_uploads_in_flight") == 1)
    s.close()
    wait_for(lambda: peer.count("modelcache_peer_uploads_in_flight") == 0)
    release.set()
    assert peer.get(url).content == FILES["sub dir/weights#1.bin"]
    assert peer.count("modelcache_peer_requests_total", code="503") == 1


def test_the_upload_cap_paces_every_byte(start: Callable[..., Running]) -> None:
    now = [0.0]
    waited: list[float] = []

    async def fake_sleep(seconds: float) -> None:  # the fake clock moves only when the cap waits
        waited.append(seconds)
        now[0] += seconds

    rate = 100_000.0
    peer = start(sleep=fake_sleep, limiter=RateLimiter(rate, clock=lambda: now[0]))
    publish_model(peer.cache, FILES)
    weights = FILES["sub dir/weights#1.bin"]
    assert peer.get(file_path(KEY, "sub dir/weights#1.bin")).content == weights
    assert peer.get(file_path(KEY, "sub dir/weights#1.bin"), Range="bytes=0-49999").status_code == 206
    # Every byte was paid for at the cap's rate: 350,000 bytes at 100 kB/s are 3.5 s of waits.
    assert sum(waited) == pytest.approx((len(weights) + 50_000) / rate)
    assert len(waited) >= 3  # paced piece by piece, not in one wait


def test_an_address_it_cannot_listen_on_is_one_line_naming_the_flag(token_file: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tokens = TokenFile(token_file)
        tokens.load()
        server = PeerServer(
            tmp_path, ServeSettings(bind=("127.0.0.1", port)), tokens, AgentMetrics(CollectorRegistry())
        )
        with pytest.raises(InvalidInput, match=rf"^--peer-addr: cannot listen on 127.0.0.1:{port}"):
            server.start()
        server.stop()


def test_no_token_in_any_log_line(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    path = kubelet_secret(tmp_path / "secret", TOKEN)
    tokens = TokenFile(path)
    tokens.load()
    peer = start(tokens=tokens)
    publish_model(peer.cache, FILES)
    peer.get(holding_path(KEY), token=OTHER)
    peer.get(holding_path(KEY), token=None, Authorization=f"Basic {TOKEN}x")
    peer.get(file_path(KEY, "config.json"))
    kubelet_secret(tmp_path / "secret", OTHER)
    peer.get(holding_path(KEY), token=TOKEN)
    peer.server.stop()
    text = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert "serving peers on" in text and "changed" in text  # the lines were there to look at
    assert TOKEN not in text and OTHER not in text


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_holding_json_round_trips(start: Callable[..., Running]) -> None:
    peer = start()
    stage_download(peer.cache, {"a.bin": blob(CHUNK * 2, 9)}, chunks={"a.bin": {1}}, verified=set())
    raw = peer.get(holding_path(KEY)).json()
    assert raw == Holding.from_json(raw).to_json()
    assert json.loads(json.dumps(raw))["files"]["a.bin"]["chunks"] == [1]


# -- in the agent -----------------------------------------------------------------------------------


def agent_argv(cache: Path, docs: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "modelcache", "agent", "--node-name", "box", "--cache-dir", str(cache),
        "--standalone", str(docs), "--node-labels", "gpu=h100", "--metrics-addr", "off",
        "--health-addr", "off", "--chunk-size", "1Mi", "--status-interval", "0.2", *extra,
    ]  # fmt: skip


def peer_address(cache: Path) -> str | None:
    try:
        state = json.loads((cache / ".modelcache" / "state.json").read_text())
    except (OSError, ValueError):
        return None
    address = state["status"].get("peerAddress")
    return str(address) if address else None


async def test_the_agent_serves_its_download_in_progress_then_its_published_copy(
    hf_hub: Hub, tmp_path: Path, token_file: Path
) -> None:
    big = blob(6 << 20, 7)
    hf_hub.add_repo("org/m", {"big.safetensors": big, "config.json": b"{}"})
    hf_hub.file("org/m", "big.safetensors").hold_from = 5 << 20  # mid-download while the test looks
    cache, docs = tmp_path / "cache", tmp_path / "docs.yaml"
    docs.write_text(
        yaml.safe_dump_all([group_doc("h100", path=cache), cache_doc("m", "hf://org/m", "30Mi", ["h100"])])
    )
    key = storage_key("hf://org/m")
    progress = cache / ".modelcache" / "staging" / key / "progress.json"
    env = dict(os.environ, HF_ENDPOINT=hf_hub.endpoint, HF_HUB_DISABLE_XET="1", POD_IP="127.0.0.1")
    peer_flags = (
        "--peer-addr",
        "127.0.0.1:0",
        "--peer-token-file",
        str(token_file),
        "--peer-max-uploads",
        "2",
    )
    proc = await asyncio.create_subprocess_exec(*agent_argv(cache, docs, *peer_flags), env=env)
    try:
        await eventually(lambda: peer_address(cache) is not None, timeout=60, what="status.peerAddress")
        url = f"http://{peer_address(cache)}"
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")

        def durable() -> set[int]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                return set(json.loads(progress.read_text())["files"]["big.safetensors"]["chunks"])
            return set()

        await eventually(lambda: len(durable()) >= 2, timeout=60, what="2 durable chunks")
        async with httpx.AsyncClient(base_url=url, headers=bearer(TOKEN), trust_env=False, timeout=30) as c:
            holding = Holding.from_json((await c.get(holding_path(key))).json())
            assert not holding.published and holding.chunk_size == 1 << 20
            held = holding.files["big.safetensors"].chunks
            assert held <= {*range(6)} and 5 not in held and len(held) >= 2
            i = min(held)
            r = await c.get(
                file_path(key, "big.safetensors"), headers={"Range": f"bytes={i << 20}-{(i + 1 << 20) - 1}"}
            )
            assert (r.status_code, r.content) == (206, big[i << 20 : i + 1 << 20])
            r = await c.get(file_path(key, "big.safetensors"), headers={"Range": f"bytes={5 << 20}-"})
            assert r.status_code == 404  # held back at the origin: not durable here
            hf_hub.file("org/m", "big.safetensors").hold_from = None
            await eventually(lambda: (cache / "models" / key).is_dir(), timeout=60, what="the publish")

            async def published() -> bool:
                return bool((await c.get(holding_path(key))).json()["published"])

            deadline = time.monotonic() + 60
            while not await published():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            r = await c.get(file_path(key, "big.safetensors"))
            assert (r.status_code, r.content) == (200, big)
            assert (await c.get(holding_path(key), headers=bearer(OTHER))).status_code == 401
        shown = subprocess.run(
            [sys.executable, "-m", "modelcache", "status", "--cache-dir", str(cache)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert f"serving peers on {url.removeprefix('http://')}" in shown.stdout
        state = json.loads((cache / ".modelcache" / "state.json").read_text())
        serving = [c for c in state["status"]["conditions"] if c["type"] == "PeerServing"]
        assert serving and serving[0]["status"] == "True"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


def run_agent(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    docs = tmp_path / "docs.yaml"
    docs.write_text(yaml.safe_dump(group_doc("h100", path=tmp_path / "cache")))
    return subprocess.run(
        [*agent_argv(tmp_path / "cache", docs, *extra), "--once"], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--peer-addr", "127.0.0.1:0"), "--peer-addr needs --peer-token-file"),
        (("--peer-addr", "nowhere", "--peer-token-file", "TOKEN"), "--peer-addr: 'nowhere' is not HOST:PORT"),
        (("--peer-addr", ":0", "--peer-token-file", "EMPTY"), "--peer-token-file: "),
        (("--peer-addr", ":0", "--peer-token-file", "MISSING"), "--peer-token-file: cannot read"),
        (("--peer-advertise", "0.0.0.0:7071"), "--peer-advertise: '0.0.0.0:7071' is a wildcard"),
        (("--peer-advertise", "host"), "--peer-advertise: 'host' is not HOST:PORT"),
        (("--peer-max-upload-rate", "0"), "--peer-max-upload-rate: '0' must be greater than zero"),
        (("--peer-max-uploads", "0"), "--peer-max-uploads: must be"),
        (("--peer-token-file", " "), "--peer-token-file: empty"),
        (("--peer-advertise", "a b:1"), "--peer-advertise: 'a b' is not a host name"),
        (
            ("--peer-advertise", "http://10.0.0.7:7071"),
            "--peer-advertise: a URL, not a host",
        ),
        (
            ("--peers", "http://127.0.0.1:17071", "--peer-token-file", "TOKEN"),
            "--peers: 'http://127.0.0.1:17071': a URL",
        ),
        (
            ("--peers", "127.0.0.1:0", "--peer-token-file", "TOKEN"),
            "--peers: '127.0.0.1:0' is not HOST:PORT with a port 1-65535",
        ),
        (("--peers", "bad host:1", "--peer-token-file", "TOKEN"), "--peers: 'bad host:1': 'bad host' is not"),
        # Serving flags without the server: said, not silently ignored.
        (("--peer-advertise", "10.0.0.7:7071"), "--peer-advertise sets up the peer server, which is off"),
        (("--peer-max-uploads", "4"), "--peer-max-uploads sets up the peer server, which is off"),
        (
            ("--peer-max-upload-rate", "10MB/s"),
            "--peer-max-upload-rate sets up the peer server, which is off",
        ),
    ],
)
def test_bad_peer_flags_are_one_line_and_exit_2(
    tmp_path: Path, token_file: Path, flags: tuple[str, ...], words: str
) -> None:
    (tmp_path / "empty").write_text("\n")
    files = {"TOKEN": str(token_file), "EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "nope")}
    r = run_agent(tmp_path, *(files.get(f, f) for f in flags))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"modelcache agent: {words}"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert TOKEN not in r.stderr


def test_a_pod_ip_that_is_not_an_address_is_one_line_naming_the_variable(
    tmp_path: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_IP", "garbage value")
    r = run_agent(tmp_path, "--peer-addr", "127.0.0.1:0", "--peer-token-file", str(token_file))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("modelcache agent: POD_IP: 'garbage value' is not an IP address; "), r.stderr
    assert r.stderr.count("\n") == 1
    # --peer-advertise given: POD_IP is not what is advertised, so not checked.
    r = run_agent(
        tmp_path,
        "--peer-addr",
        "127.0.0.1:0",
        "--peer-token-file",
        str(token_file),
        "--peer-advertise",
        "h:1",
    )
    assert r.returncode == 0, r.stderr


def test_advertise_address_rules() -> None:
    bound = ("0.0.0.0", 7071)
    assert (
        advertise_address(bound=bound, given="peer.example:1", pod_ip="10.0.0.5", node_name="n")
        == "peer.example:1"
    )
    assert advertise_address(bound=bound, given=None, pod_ip="10.0.0.5", node_name="n") == "10.0.0.5:7071"
    assert advertise_address(bound=bound, given=None, pod_ip="fd00::5", node_name="n") == "[fd00::5]:7071"
    assert advertise_address(bound=("10.1.1.1", 9), given=None, pod_ip=None, node_name="n") == "10.1.1.1:9"
    assert advertise_address(bound=bound, given=None, pod_ip=" ", node_name="gpu-7") == "gpu-7:7071"


async def test_in_a_cluster_a_missing_token_file_waits_then_serves(tmp_path: Path, token_file: Path) -> None:
    path = tmp_path / "later" / "token"
    config = PeerConfig(ServeSettings(bind=("127.0.0.1", 0)), token_file=path)
    service = PeerService(
        config,
        cache_dir=tmp_path,
        metrics=AgentMetrics(CollectorRegistry()),
        node_name="n",
        pod_ip=None,
        retry=0.05,
    )
    await service.start()
    state = service.state()
    assert state.address is None and state.problem is not None and str(path) in state.problem
    assert peer_condition(state).status == "False"
    task = asyncio.create_task(service.run())
    try:
        path.parent.mkdir()
        path.write_text(TOKEN)
        deadline = time.monotonic() + 60
        while service.state().address is None:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.05)
        address = service.state().address
        assert address is not None and address.startswith("127.0.0.1:")
        assert peer_condition(service.state()).status == "True"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            r = await c.get(f"http://{address}{holding_path(KEY)}", headers=bearer(TOKEN))
            assert r.status_code == 404  # serving, and holding nothing
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert service.state().address is None
