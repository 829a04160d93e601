"""A plain HTTP file server on 127.0.0.1 (aiohttp) with the faults of web servers, proxies and CDNs.

    HEAD /{path}      Content-Length (or ``head_size``, a size that lies), ETag
    GET  /{path}      the bytes; ``Range: bytes=a-b`` answered 206 with Content-Range, 416 past the end

Faults, per file (:class:`Served`): ``shift`` answers a range with the same length from further on
(its Content-Range saying so); ``ranges_once`` honours only the first ranged GET, then answers 200
with the whole file; ``body`` sends other bytes than the announced ones (a short error page), without
a Content-Length (chunked) when ``framed`` is off. Every request is recorded with the client's port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio
from aiohttp import web


@dataclass
class Served:
    data: bytes
    head_size: int | None = None  # what HEAD announces, when not len(data)
    shift: int = 0
    ranges_once: bool = False
    body: bytes | None = None  # sent instead of data (a proxy's error page)
    framed: bool = True  # Content-Length on a 200 (off: chunked, the end is the connection's word)
    ranged_gets: int = 0


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    port: int | None


class HttpFiles:
    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.requests: list[Request] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    def add(self, path: str, data: bytes, **faults: object) -> Served:
        served = self.files[path] = Served(data, **faults)  # type: ignore[arg-type]
        return served

    def gets(self, path: str) -> list[str | None]:
        """The Range header of each GET of a path, in order (None: the whole file)."""
        return [r.range for r in self.requests if r.method == "GET" and r.path == path]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rng = request.headers.get("Range")
        self.requests.append(Request(request.method, request.path, rng, peer[1] if peer else None))
        f = self.files.get(request.path)
        if f is None:
            raise web.HTTPNotFound()
        data = f.body if f.body is not None else f.data
        headers = {"ETag": '"e"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            size = f.head_size if f.head_size is not None else len(f.data)
            return web.Response(headers={**headers, "Content-Length": str(size)})
        if rng and rng.startswith("bytes=") and not (f.ranges_once and f.ranged_gets >= 1):
            f.ranged_gets += 1
            a, _, b = rng[len("bytes=") :].partition("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{len(data)}"})
            if f.shift:
                length = end - start + 1
                start = min(start + f.shift, len(data) - length)
                end = start + length - 1
            return web.Response(
                status=206,
                body=data[start : end + 1],
                headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"},
            )
        if f.framed:
            return web.Response(body=data, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(data)
        await response.write_eof()
        return response


@pytest_asyncio.fixture
async def plain_http() -> AsyncIterator[HttpFiles]:
    server = HttpFiles()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
