"""A node agent's peer server on 127.0.0.1 for tests, speaking :mod:`localmodel.peering`'s protocol
from bytes in memory, with the faults of a broken or hostile peer.

    GET /v1/models/<key>/holding        the Holding JSON (404 when it holds nothing)
    GET /v1/models/<key>/manifest       the manifest JSON, when one is set (404 otherwise)
    GET /v1/models/<key>/files/<path>   the bytes; one ``Range: bytes=a-b`` answered 206, 404 for a
                                        chunk it does not hold, 416 past the end

Every request must carry ``Authorization: Bearer <token>``: anything else is 401 before a path is
looked at. Faults (:attr:`TestPeer.mode`): ``tamper`` (one byte of each answer flipped),
``lie_size`` (its holding says each file is a byte longer), ``lie_total`` (a Content-Range whose
total is not the file's size), ``wrong_range`` (the same length from one chunk further on, its
Content-Range saying so), ``trickle`` (ten bytes a second), ``error500``, ``die`` (half the
bytes, then the connection closed), ``busy`` (503 with ``Retry-After: 1`` for the first
:attr:`TestPeer.busy_left` file requests), ``capped`` (at most :attr:`TestPeer.max_uploads` file
answers at once, each held :attr:`TestPeer.upload_delay` seconds; more are 503 with
``Retry-After: 1``, as the agent's ``--peer-max-uploads``), ``missing`` (404 for every file,
while its holding says it has them), ``redirect`` (302 to another address). Every file request is
recorded as (path, range), and the bytes sent are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from localmodel.peering import API_PREFIX, FileHolding, Holding

MODES = (
    "tamper",
    "lie_size",
    "lie_total",
    "wrong_range",
    "trickle",
    "error500",
    "die",
    "busy",
    "capped",
    "missing",
    "redirect",
)


@dataclass
class Held:
    data: bytes
    chunks: set[int] | None = None  # None: all of it (complete); else these chunk indexes


@dataclass
class TestPeer:
    storage_key: str
    revision: str | None
    chunk_size: int
    token: str = "cluster-token"
    published: bool = True
    files: dict[str, Held] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    mode: str | None = None
    busy_left: int = 2
    max_uploads: int = 1
    upload_delay: float = 0.05
    uploading: int = 0
    refused: int = 0  # 503s sent
    holding_asked: int = 0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    sent: int = 0
    unauthorized: int = 0
    _runner: web.AppRunner | None = None
    address: str = ""

    __test__ = False  # not a pytest test class

    def hold(self, path: str, data: bytes, chunks: set[int] | None = None) -> None:
        self.files[path] = Held(data, chunks)

    def holding(self) -> Holding:
        files = {
            p: FileHolding(
                len(h.data) + (1 if self.mode == "lie_size" else 0),
                h.chunks is None,
                frozenset(h.chunks or ()),
            )
            for p, h in self.files.items()
        }
        return Holding(self.storage_key, self.revision, self.chunk_size, self.published, files)

    def served(self, path: str) -> list[str]:
        """The ranges asked of ``path``, in order ("" for a request without one)."""
        return [r or "" for p, r in self.requests if p == path]

    async def start(self, port: int = 0) -> None:
        """Serve on 127.0.0.1:``port`` (0: a free one); :attr:`address` says which."""
        app = web.Application(middlewares=[self._auth])
        app.router.add_get(API_PREFIX + "/{key}/holding", self._holding)
        app.router.add_get(API_PREFIX + "/{key}/manifest", self._manifest)
        app.router.add_get(API_PREFIX + "/{key}/files/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.address = f"127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return web.Response(status=401, text="unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    async def _holding(self, request: web.Request) -> web.Response:
        self.holding_asked += 1
        if request.match_info["key"] != self.storage_key or not self.files:
            return web.Response(status=404)
        return web.json_response(self.holding().to_json())

    async def _manifest(self, request: web.Request) -> web.Response:
        if request.match_info["key"] != self.storage_key or self.manifest is None:
            return web.Response(status=404)
        return web.json_response(self.manifest)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        rng = request.headers.get("Range")
        self.requests.append((path, rng))
        held = self.files.get(path)
        if request.match_info["key"] != self.storage_key or held is None or self.mode == "missing":
            return web.Response(status=404)
        if self.mode == "error500":
            return web.Response(status=500, text="boom")
        if self.mode == "redirect":  # elsewhere: a peer must answer for itself
            return web.Response(status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"})
        if self.mode == "busy" and self.busy_left > 0:
            self.busy_left -= 1
            self.refused += 1
            return web.Response(status=503, headers={"Retry-After": "1"})
        if self.mode == "capped":
            if self.uploading >= self.max_uploads:
                self.refused += 1
                return web.Response(status=503, headers={"Retry-After": "1"})
            self.uploading += 1
            try:
                await asyncio.sleep(self.upload_delay)
                return await self._answer(request, held, rng)
            finally:
                self.uploading -= 1
        return await self._answer(request, held, rng)

    async def _answer(self, request: web.Request, held: Held, rng: str | None) -> web.StreamResponse:
        size = len(held.data)
        start, end = 0, size - 1
        if rng is not None:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
            if start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        if held.chunks is not None:
            wanted = range(start // self.chunk_size, end // self.chunk_size + 1)
            if not all(i in held.chunks for i in wanted):
                return web.Response(status=404)
        return await self._send(request, held.data, start, end, ranged=rng is not None)

    async def _send(
        self, request: web.Request, data: bytes, start: int, end: int, *, ranged: bool
    ) -> web.StreamResponse:
        size = len(data)
        if self.mode == "wrong_range":
            length = end - start + 1
            start = min(start + self.chunk_size, size - length)
            end = start + length - 1
        body = bytearray(data[start : end + 1])
        if self.mode == "tamper" and body:
            body[len(body) // 2] ^= 0xFF
        total = size + 7 if self.mode == "lie_total" else size
        headers = {"Content-Range": f"bytes {start}-{end}/{total}"} if ranged else {}
        response = web.StreamResponse(status=206 if ranged else 200, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        if self.mode == "die":
            await response.write(bytes(body[: len(body) // 2]))
            self.sent += len(body) // 2
            assert request.transport is not None
            request.transport.close()  # mid-body: the client sees a connection cut short
            return response
        step = 10 if self.mode == "trickle" else 1 << 20
        for i in range(0, len(body), step):
            await response.write(bytes(body[i : i + step]))
            self.sent += min(step, len(body) - i)
            if self.mode == "trickle":
                await asyncio.sleep(1)
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def running(*peers: TestPeer) -> AsyncIterator[None]:
    """The peers serving for the block, closed after it whatever happens."""
    for p in peers:
        await p.start()
    try:
        yield
    finally:
        for p in peers:
            await p.close()
