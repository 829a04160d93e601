"""A Hugging Face-compatible hub on 127.0.0.1, speaking the protocol huggingface_hub 2.x uses.

    GET  /api/models/{repo}/revision/{rev}          {"id", "sha", "siblings"}
    GET  /api/models/{repo}/tree/{rev}[/{path}]     [{type, path, size, oid, lfs?}], paged by Link
    HEAD/GET /{repo}/resolve/{rev}/{path}           the bytes, with ranges, X-Repo-Commit, ETag

File bytes live on disk and are sent with ``FileResponse`` (sendfile), so the hub also serves
benchmarks of several GiB without being the bottleneck. Faults for tests: a gated repo (401 without
the right token), a tampered file (bytes differ from the announced sha256, same size), a file that
answers 503 N times before it works, a per-file bandwidth cap (``rate=1``: a trickle of one byte a
second), a wrong range (``shift``: a ranged GET answered 206 with the same length from another
offset, its Content-Range saying so), a held range (``hold_from``: a GET from that offset on sends
its headers and then nothing until the field is cleared, so a pull cannot finish before a test is
done with it), no range support, hostile tree entries. Every request is
recorded, with the client's port (a new port: a new connection).

For fleets of agents (tests/support/fleet.py, bench/fleet.py): :attr:`Hub.bytes_sent` counts the
body bytes of file GETs per ``repo/path`` (whole bodies sent by sendfile once sent, and every block
of the paced path as it is written), and ``link_rate`` (bytes/s, off by default) paces every file
body through one shared link, standing for the WAN link to a real hub: all clients together get at
most that rate, blocks served in turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp import web


@dataclass
class HubFile:
    path: str
    disk: Path  # what is served
    size: int
    sha256: str  # of the true content (what the listing announces)
    git_sha1: str
    lfs: bool
    fail_first: int = 0  # answer 503 this many times
    retry_after: str | None = None
    rate: int | None = None  # bytes/s cap for GET
    shift: int = 0  # a ranged GET is answered from this many bytes further on (same length)
    hold_from: int | None = None  # a GET starting at or past this offset sends no byte while set


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool
    port: int | None = None  # the client's port: a new one is a new connection


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    hostile: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sha -> extra entries
    token: str | None = None  # gated: needs this bearer token


class Link:
    """One link of ``rate`` bytes/s shared by every response: a block waits until the blocks before
    it (of any response) have had their time on the wire, so the bytes sent in any window of ``w``
    seconds are at most ``rate * w`` plus one block."""

    BLOCK = 256 << 10  # bytes a paced response writes at a time

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"a link rate must be above 0 bytes/s, not {rate}")
        self.rate = rate
        self.free_at = 0.0  # the event loop's clock: when the link has sent what it was given

    async def send(self, n: int) -> None:
        """Wait for ``n`` bytes' turn on the link (returns once they would have been sent)."""
        now = asyncio.get_running_loop().time()
        self.free_at = max(now, self.free_at) + n / self.rate
        await asyncio.sleep(self.free_at - now)


class Hub:
    def __init__(self, *, page_size: int = 50, link_rate: float | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.ranges = True
        self.page_size = page_size
        self.link = Link(link_rate) if link_rate is not None else None
        self.bytes_sent: Counter[str] = Counter()  # "repo/path" -> body bytes of file GETs
        self._folder: Path | None = None  # made on first use: a hub serving files by path needs none
        self._runner: web.AppRunner | None = None
        self.endpoint = ""

    @property
    def _dir(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="hfhub-"))
        return self._folder

    # -- building repositories ---------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        revision: str = "main",
        lfs_threshold: int = 1024,
        token: str | None = None,
    ) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        repo.token = token if token is not None else repo.token
        entries: dict[str, HubFile] = {}
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for path, content in sorted(files.items()):
            if isinstance(content, Path):
                disk = content
                sha256, sha1 = _hash_file(disk)
            else:
                disk = self._dir / hashlib.sha256(content).hexdigest()
                disk.write_bytes(content)
                sha256 = hashlib.sha256(content).hexdigest()
                sha1 = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
            size = disk.stat().st_size
            digest.update(f"{path}:{sha256}".encode())
            entries[path] = HubFile(path, disk, size, sha256, sha1, lfs=size >= lfs_threshold)
        sha = digest.hexdigest()
        repo.commits[sha] = entries
        repo.refs[revision] = sha
        return sha

    def file(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)][path]

    def tamper(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Serve other bytes of the same size: the listing still announces the true sha256."""
        f = self.file(repo_id, path, revision)
        bad = self._dir / f"tampered-{f.sha256}"
        data = bytearray(f.disk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
        f.disk = bad

    def add_hostile_entry(self, repo_id: str, path: str, revision: str = "main") -> None:
        repo = self.repos[repo_id]
        sha = repo.refs[revision]
        repo.hostile.setdefault(sha, []).append({"type": "file", "path": path, "size": 4, "oid": "0" * 40})

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for r in self.requests if r.method == method and fragment in r.path)

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def reset_counts(self) -> None:
        """Forget the requests and byte counts so far (a test's next phase counts from zero)."""
        self.requests.clear()
        self.bytes_sent.clear()

    # -- serving -----------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/api/models/{owner}/{name}/revision/{rev:.+}", self._revision)
        app.router.add_route("GET", "/api/models/{owner}/{name}/tree/{rest:.*}", self._tree)
        app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._folder is not None:  # the repositories' files: tests leave nothing
            shutil.rmtree(self._folder, ignore_errors=True)

    def _record(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            Request(
                request.method,
                request.path_qs,
                request.headers.get("Range"),
                bool(auth),
                peer[1] if peer else None,
            )
        )
        return bool(auth)

    def _repo(self, request: web.Request) -> tuple[str, Repo]:
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _error(404, "RepoNotFound", f"Repository Not Found for url: {request.path}")
        if repo.token is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {repo.token}":
                raise _error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must be authenticated.",
                )
        return repo_id, repo

    def _commit(self, repo: Repo, rev: str) -> str:
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    async def _revision(self, request: web.Request) -> web.Response:
        self._record(request)
        repo_id, repo = self._repo(request)
        sha = self._commit(repo, request.match_info["rev"])
        siblings = [{"rfilename": p} for p in repo.commits[sha]]
        return web.json_response(
            {"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings, "private": False}
        )

    async def _tree(self, request: web.Request) -> web.Response:
        self._record(request)
        _, repo = self._repo(request)
        rev, _, sub = request.match_info["rest"].partition("/")
        sha = self._commit(repo, rev)
        entries = [_entry(f) for f in repo.commits[sha].values() if not sub or f.path.startswith(sub + "/")]
        entries += repo.hostile.get(sha, [])
        start = int(request.query.get("cursor", "0"))
        page = entries[start : start + self.page_size]
        headers = {}
        if start + self.page_size < len(entries):
            query = dict(request.query, cursor=str(start + self.page_size))
            url = request.url.with_query(query)
            headers["Link"] = f'<{url}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        repo_id, repo = self._repo(request)
        sha = self._commit(repo, request.match_info["rev"])
        f = repo.commits[sha].get(request.match_info["path"])
        if f is None:
            raise _error(404, "EntryNotFound", f"{request.match_info['path']} does not exist")
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{f.sha256 if f.lfs else f.git_sha1}"',
            "Accept-Ranges": "bytes" if self.ranges else "none",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if request.method == "GET" and f.fail_first > 0:
            f.fail_first -= 1
            extra = {"Retry-After": f.retry_after} if f.retry_after else {}
            return web.Response(status=503, text="try again", headers=extra)
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(f.size)})
        counted = f"{repo_id}/{f.path}"
        plain = f.rate is None and not f.shift and f.hold_from is None and self.link is None
        if plain and (self.ranges or "Range" not in request.headers):
            return _CountedFile(f.disk, headers, self.bytes_sent, counted)
        return await self._slow(request, f, headers, counted)

    async def _slow(
        self, request: web.Request, f: HubFile, headers: dict[str, str], counted: str
    ) -> web.StreamResponse:
        start, end = 0, f.size - 1
        status = 200
        rng = request.headers.get("Range") if self.ranges else None
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), int(b) if b else f.size - 1
            if f.shift:
                # The same length, from further on; clipped to the file, as a buggy cache would.
                length = end - start + 1
                start = min(start + f.shift, f.size - length)
                end = start + length - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start + 1
        await response.prepare(request)
        while f.hold_from is not None and start >= f.hold_from:
            await asyncio.sleep(0.05)  # bounded by the test: it clears the field or stops the hub
        step = max(1, (f.rate or 1 << 20) // 20)
        if self.link is not None:
            step = min(step, Link.BLOCK)
        with f.disk.open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                data = fh.read(min(step, left))
                if self.link is not None:
                    await self.link.send(len(data))
                await response.write(data)
                self.bytes_sent[counted] += len(data)
                left -= len(data)
                if f.rate:
                    await asyncio.sleep(len(data) / f.rate)
        await response.write_eof()
        return response


class _CountedFile(web.FileResponse):
    """FileResponse that adds its body's length to ``counts[key]`` once sent whole: aiohttp calls
    :meth:`prepare` once, after the handler, and a client that leaves mid-body makes it raise
    ConnectionError, which aiohttp ends quietly (nothing counted)."""

    def __init__(self, path: Path, headers: dict[str, str], counts: Counter[str], key: str) -> None:
        super().__init__(path, headers=headers)
        self._counts = counts
        self._key = key

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        if self.status in (200, 206) and self.content_length is not None:
            self._counts[self._key] += self.content_length
        return writer


def _entry(f: HubFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": f.path, "size": f.size, "oid": f.git_sha1}
    if f.lfs:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {f.size}\n"
        entry["oid"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer.encode()).hexdigest()
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)}
    return entry


def _error(status: int, code: str, message: str) -> web.HTTPException:
    cls = {401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound}[status]
    return cls(
        text=json.dumps({"error": message}),
        content_type="application/json",
        headers={"X-Error-Code": code, "X-Error-Message": message},
    )


def _hash_file(path: Path) -> tuple[str, str]:
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


@pytest_asyncio.fixture
async def hf_hub(monkeypatch: Any) -> AsyncIterator[Hub]:
    hub = Hub()
    await hub.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield hub
    finally:
        await hub.close()
        os.environ.pop("HF_HUB_OFFLINE", None)
