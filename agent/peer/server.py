"""The peer server: what this node holds, served to the other nodes' agents over the wire contract of
:mod:`localmodel.peering` (``/v1/models/<key>/holding``, ``/manifest``, ``/files/<path>``).

It runs on its own thread and event loop, so uploads (disk reads, slow readers) never hold up the
agent's reconcile loop; :meth:`PeerServer.start` returns once it listens, :meth:`PeerServer.stop`
ends it within a bounded time. It reads the cache folder only (:class:`agent.peer.holdings.Holdings`)
and shares nothing with the loop but the metrics.

Every request, whatever its path or method, is first checked for the cluster token
(:class:`agent.peer.token.TokenFile`): anything else is 401 before a path is looked at, and no answer
to a refused request names a path, a model or a file. Then:

- only ``GET`` (405 otherwise, ``Allow: GET``); a path outside the contract, a key or a file not
  held, a range not durable yet: 404 (the same words for all, naming nothing);
- ``files``: 200 with the whole file, or 206 with ``Content-Range`` for one ``Range``; 416 with
  ``Content-Range: bytes */<size>`` for a range it cannot satisfy;
- at most ``max_uploads`` file answers at once: over it 503 with ``Retry-After: 1`` (the receiver
  asks another peer or the origin);
- the bytes of all uploads together are paced by ``max_upload_rate`` (bytes/s, a
  :class:`agent.download.ratelimit.RateLimiter` of its own: the download cap is another one);
- one answer takes at most ``request_timeout`` seconds, body included: a reader that stalls is cut
  off and its slot freed; an idle kept-alive connection is closed after ``idle_timeout`` seconds.

Metrics: ``modelcache_peer_requests_total{code}``, ``modelcache_peer_upload_bytes_total``,
``modelcache_peer_uploads_in_flight`` (:class:`agent.metrics.AgentMetrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from agent.download.ratelimit import RateLimiter
from agent.metrics import AgentMetrics
from agent.peer.holdings import Holdings, Opened, Unsatisfiable
from agent.peer.token import TokenFile
from agent.threads import BoundedExecutor
from localmodel.errors import InvalidInput
from localmodel.peering import API_PREFIX, AUTH_HEADER

log = logging.getLogger("modelcache.agent")

PIECE = 256 << 10  # bytes read and written at a time (the cap's pacing step at most)
NOT_HELD = "not held here\n"


@dataclass(frozen=True)
class ServeSettings:
    """The peer server's settings, built at the agent's entry point (agent/cli.py).

    ``bind``: (host, port) to listen on (port 0: a free one); ``max_upload_rate``: bytes/s for all
    uploads together, None for no cap; ``max_uploads``: file answers at once; ``request_timeout``:
    seconds one answer may take, body included; ``idle_timeout``: seconds a kept-alive connection
    may wait for its next request; ``chunk_size``: bytes, the chunk size announced for published
    copies (the download engine's, so a receiver's chunks line up)."""

    bind: tuple[str, int]
    max_upload_rate: float | None = None
    max_uploads: int = 8
    request_timeout: float = 600.0
    idle_timeout: float = 30.0
    chunk_size: int = 16 << 20


class PeerServer:
    """Serve ``cache_dir``'s holdings to peers holding a token ``tokens`` accepts.

    ``sleep`` and ``limiter`` are the upload cap's waits and bucket (a test passes a fake clock's)."""

    def __init__(
        self,
        cache_dir: Path,
        settings: ServeSettings,
        tokens: TokenFile,
        metrics: AgentMetrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.metrics = metrics
        self.holdings = Holdings(cache_dir, chunk_size=settings.chunk_size)
        self.sleep = sleep
        rate = settings.max_upload_rate
        self.limiter = limiter if limiter is not None else (RateLimiter(rate) if rate else None)
        self.uploads = 0  # file answers in flight (on the server's loop only)
        self.bound: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.ServerRunner | None = None
        # Disk reads in daemon threads: a read blocked on a hung filesystem never holds up a stop.
        self._executor = BoundedExecutor(grace=2.0, limit=settings.max_uploads + 4)

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen; returns the (host, port) bound. Raises :class:`InvalidInput` naming
        ``--peer-addr`` when the address cannot be listened on (taken, not on this host)."""
        loop = asyncio.new_event_loop()
        loop.set_default_executor(self._executor)
        thread = threading.Thread(target=loop.run_forever, name="modelcache-peer", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self.bound = asyncio.run_coroutine_threadsafe(self._listen(), loop).result(30)
        except BaseException:
            self._end_loop()
            raise
        log.info("serving peers on %s:%d", *self.bound)
        return self.bound

    async def _listen(self) -> tuple[str, int]:
        server = web.Server(
            self._handle,
            handler_cancellation=True,  # a peer that hangs up ends its upload and frees its slot
            access_log=None,
            keepalive_timeout=self.settings.idle_timeout,
        )
        runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await runner.setup()
        host, port = self.settings.bind
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise InvalidInput(f"--peer-addr: cannot listen on {host}:{port}: {e.strerror or e}") from e
        self._runner = runner
        sockets = getattr(site._server, "sockets", None) or []
        return (host, sockets[0].getsockname()[1] if sockets else port)

    def stop(self) -> None:
        """Stop listening and end the uploads in flight (within a few seconds); idempotent."""
        loop, runner = self._loop, self._runner
        if loop is None:
            return
        if runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            self._runner = None
        self._end_loop()

    def _end_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        if not loop.is_running():
            loop.close()
        self._executor.shutdown(wait=True)

    # -- requests --------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        code = 500
        try:
            response = await self._answer(request)
            code = response.status
            return response
        except asyncio.CancelledError:
            code = 499  # the peer hung up (nginx's word for it): not a failure of ours
            raise
        finally:
            self.metrics.peer_requests.labels(code=str(code)).inc()

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        authorization = request.headers.getall(AUTH_HEADER, [])
        if len(authorization) != 1 or not self.tokens.check(authorization[0]):
            log.debug("peer request from %s refused: no valid token", request.remote)
            return web.Response(
                status=401,
                text="a valid peer token is required\n",
                headers={"WWW-Authenticate": 'Bearer realm="modelcache-peer"'},
            )
        if request.method != "GET":
            return web.Response(status=405, text="only GET\n", headers={"Allow": "GET"})
        target = parse_target(request.raw_path)
        if target is None:
            return web.Response(status=404, text=NOT_HELD)
        key, what, relative = target
        loop = asyncio.get_running_loop()
        if what == "holding":
            view = await loop.run_in_executor(None, self.holdings.view, key)
            if view is None:
                return web.Response(status=404, text=NOT_HELD)
            return _json(view.holding.to_json())
        if what == "manifest":
            manifest = await loop.run_in_executor(None, self.holdings.manifest, key)
            if manifest is None:
                return web.Response(status=404, text=NOT_HELD)
            return _json(manifest.to_json())
        assert relative is not None
        if self.uploads >= self.settings.max_uploads:
            return web.Response(
                status=503, text="too many uploads at once; ask again\n", headers={"Retry-After": "1"}
            )
        self.uploads += 1
        self.metrics.peer_uploads_in_flight.inc()
        try:
            return await self._upload(request, key, relative)
        finally:
            self.uploads -= 1
            self.metrics.peer_uploads_in_flight.dec()

    async def _upload(self, request: web.BaseRequest, key: str, relative: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        try:
            opened = await loop.run_in_executor(
                None, self.holdings.open, key, relative, request.headers.get("Range")
            )
        except Unsatisfiable as e:
            return web.Response(status=416, text=f"{e}\n", headers={"Content-Range": f"bytes */{e.size}"})
        if opened is None:
            return web.Response(status=404, text=NOT_HELD)
        try:
            return await self._send(request, opened)
        finally:
            os.close(opened.fd)

    async def _send(self, request: web.BaseRequest, opened: Opened) -> web.StreamResponse:
        wanted = opened.range
        response = web.StreamResponse(status=206 if wanted.partial else 200)
        response.content_length = wanted.end - wanted.start
        response.content_type = "application/octet-stream"
        response.headers["Accept-Ranges"] = "bytes"
        if wanted.partial:
            response.headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end - 1}/{wanted.size}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                await response.prepare(request)
                position = wanted.start
                while position < wanted.end:
                    n = min(PIECE, wanted.end - position)
                    if self.limiter is not None and (delay := self.limiter.delay(n)) > 0:
                        await self.sleep(delay)
                    data = await loop.run_in_executor(None, os.pread, opened.fd, n, position)
                    if len(data) != n:
                        raise OSError(f"the file ended at byte {position + len(data)}")
                    await response.write(data)
                    self.metrics.peer_upload_bytes.inc(n)
                    position += n
                await response.write_eof()
        except (TimeoutError, OSError, ConnectionError) as e:
            # The status line is gone already: cutting the connection is the only way to say it
            # (the receiver's length check sees a short body).
            why = f"no end within {self.settings.request_timeout:.0f} s" if isinstance(e, TimeoutError) else e
            log.info("an upload to %s was cut off: %s", request.remote, why)
            if request.transport is not None:
                request.transport.close()
        return response


def parse_target(raw_path: str) -> tuple[str, str, str | None] | None:
    """``/v1/models/<key>/holding``, ``/manifest`` or ``/files/<segments>`` (each segment
    percent-decoded on its own, :func:`localmodel.peering.file_path`'s encoding) -> (key, what,
    relative path or None); None for anything else: another prefix, a key that is not 16 hex digits,
    a segment that decodes to something with ``/`` or is not UTF-8. Whether the relative path is
    safe and held is for :class:`agent.peer.holdings.Holdings` (only names its manifest or resume
    state gives are ever opened)."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    prefix = API_PREFIX + "/"
    if not path.startswith(prefix):
        return None
    parts = path[len(prefix) :].split("/")
    if len(parts) < 2 or len(parts[0]) != 16 or not all(c in "0123456789abcdef" for c in parts[0]):
        return None
    key, what, rest = parts[0], parts[1], parts[2:]
    if what in ("holding", "manifest"):
        return (key, what, None) if not rest else None
    if what != "files" or not rest:
        return None
    segments = []
    for raw in rest:
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if "/" in segment:
            return None
        segments.append(segment)
    return key, what, "/".join(segments)


def _json(data: object) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), content_type="application/json")
