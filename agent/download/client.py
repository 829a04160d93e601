"""The HTTP client the transfer engine fetches bytes with: the standard library's ``http.client``,
blocking, in a pool of worker threads, awaited from asyncio.

Why threads and not the event loop: on a node with few cores the event loop's one thread, receiving
every byte of every connection into a new ``bytes`` object, is the limit. A worker here receives
with ``readinto`` straight into a buffer it reuses and hands it to ``pwrite``; both drop the GIL, so
every core copies bytes (bench/pull.py measured about 1.5x the throughput of aiohttp on 2 cores).
The asyncio side only schedules requests and sees their outcome.

One client serves every download of a process: its pool of ``concurrency`` workers is the global
connection limit, its rate limiter the global byte-rate cap, its idle connections are reused
(HTTP/1.1 keep-alive, one pool per server, or per proxy).

Redirects (301, 302, 303, 307, 308) are followed up to :data:`MAX_REDIRECTS`; ``Authorization`` is
dropped when a redirect leaves the origin (a Hugging Face token never reaches a CDN).

Proxies: the ``http_proxy``/``https_proxy``/``no_proxy`` variables, as curl and huggingface_hub read
them (read at the entry point: :func:`proxies_from_env`). https goes through a CONNECT tunnel, http
as an absolute-form request; ``user:password@`` in the proxy's URL becomes Proxy-Authorization.

Errors, mapped here and only here (``from e``) into the project's tree:

- :class:`~localmodel.errors.TransientError`: refused, reset or closed connections, timeouts, a body
  cut short, a malformed response: the engine retries these with backoff;
- :class:`~localmodel.errors.DownloadError`: a TLS certificate that is not trusted, too many
  redirects (retrying would not help);
- :class:`Stopped`: the awaiting task was cancelled; the worker's connect or read was ended.

An HTTP status is not an error here: the caller's ``accept`` sees the status and headers before any
body byte and raises what it means. No message carries a URL (a signed query string is a secret):
callers pass ``label``, a redacted name, for messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from localmodel.errors import DownloadError, InvalidInput, TransientError

MAX_REDIRECTS = 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Stopped(Exception):
    """The request was abandoned: the task awaiting it was cancelled."""


@dataclass(frozen=True)
class Response:
    """What ``accept`` sees before the body: the final status (after redirects) and its headers."""

    status: int
    headers: Message  # case-insensitive ``get``

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None


# ``accept(response)`` raises to refuse a response, or returns the sink for its body: called with
# each block received (a view into a buffer reused for the next read), in the worker thread.
Sink = Callable[[memoryview], None]
Accept = Callable[[Response], Sink | None]


class RateLimiter:
    """A token bucket shared by every worker: at most one second of burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def delay(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens; the seconds to wait before sending them on."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            return -self.tokens / self.rate if self.tokens < 0 else 0.0


class _Call:
    """One request in a worker, and what lets the event loop stop it: a flag, and the socket the
    worker is using, attached as soon as it exists (before it connects, so a hanging connect can be
    ended). Before that (resolving the name) the worker cannot have called ``accept`` or a sink, so a
    caller that is cancelled need not wait for it."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    def attach(self, sock: socket.socket | None) -> bool:
        """In the worker, before using a connection: False when the request was stopped."""
        with self.lock:
            if self.stopped.is_set():
                return False
            self.sock = sock
            return True

    def detach(self) -> None:
        with self.lock:
            self.sock = None

    def stop(self) -> bool:
        """From the event loop: True when the worker may be using a connection (wait for it)."""
        with self.lock:
            self.stopped.set()
            if self.sock is None:
                return False
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # a worker blocked in recv returns at once
            return True


def proxies_from_env() -> dict[str, str]:
    """``{"http": URL, "https": URL, "no": "host,.domain"}`` from the environment (entry points only)."""
    return urllib.request.getproxies_environment()


# Where a connection goes: ("direct", scheme, host, port), ("proxy", host, port) for plain http sent
# to a proxy, or ("tunnel", proxy host, proxy port, host, port) for https through CONNECT.
Route = tuple[str | int, ...]


class HttpClient:
    def __init__(
        self,
        *,
        concurrency: int,
        read_size: int,
        connect_timeout: float,
        read_timeout: float,
        max_bandwidth: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        self.proxies = dict(proxies or {})
        for scheme in ("http", "https"):
            if scheme in self.proxies and _proxy_url(self.proxies[scheme]).scheme != "http":
                raise InvalidInput(
                    f"{scheme}_proxy: only http:// proxies are supported (https goes through CONNECT); "
                    "set it to http://HOST:PORT"
                )
        self.read_size = read_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.limiter = RateLimiter(max_bandwidth) if max_bandwidth else None
        self._ssl_context = ssl_context
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="modelcache-fetch")
        self._idle: dict[Route, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False

    async def request(
        self, method: str, url: str, *, headers: Mapping[str, str], label: str, accept: Accept
    ) -> int:
        """Send one request in a worker; ``accept`` sees the response, its sink the body. The
        number of body bytes given to the sink. Cancelling the caller stops the worker (a pending
        connect or read ends at once) and waits for it unless it is still resolving the name: no
        ``accept`` or sink runs after this returns or raises."""
        call = _Call()
        future: Future[int] = self._pool.submit(self._run, call, method, url, dict(headers), label, accept)
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiting)
        except asyncio.CancelledError:
            # Its outcome (Stopped, most likely) is seen here, not logged as never retrieved.
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
            using = call.stop()
            if not future.cancel() and using:
                while not waiting.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([waiting])
            raise

    @property
    def ssl_context(self) -> ssl.SSLContext:
        # Made on first use: loading the system's CA bundle costs about 20 ms that plain http never needs.
        if self._ssl_context is None:
            context = ssl.create_default_context()  # the system's CAs (SSL_CERT_FILE/SSL_CERT_DIR honoured)
            if not context.cert_store_stats()["x509_ca"]:
                # An image without a CA bundle: certifi's, as huggingface_hub's and boto3's clients use.
                with contextlib.suppress(ImportError):
                    import certifi

                    context.load_verify_locations(certifi.where())
            self._ssl_context = context
        return self._ssl_context

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    # -- in a worker thread -------------------------------------------------------------------

    def _run(
        self, call: _Call, method: str, url: str, headers: dict[str, str], label: str, accept: Accept
    ) -> int:
        try:
            return self._follow(call, method, url, headers, label, accept)
        except (DownloadError, Stopped):
            raise
        except ssl.SSLCertVerificationError as e:
            raise DownloadError(
                f"{label}: the server's TLS certificate is not trusted ({e.verify_message})"
            ) from e
        except TimeoutError as e:
            raise TransientError(f"{label}: timed out") from e
        except (OSError, http.client.HTTPException) as e:
            if call.stopped.is_set():
                raise Stopped(label) from e
            raise TransientError(f"{label}: {type(e).__name__}") from e

    def _follow(
        self, call: _Call, method: str, url: str, headers: dict[str, str], label: str, accept: Accept
    ) -> int:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            key, target, extra = self._route(parts)
            conn, answer = self._send(call, key, method, target, {**headers, **extra}, label)
            try:
                location = answer.getheader("Location")
                if answer.status in REDIRECTS and location:
                    answer.read(64 << 10)  # a redirect's body is short: drained, the connection is reused
                    self._checkin(key, conn, answer)
                    nxt = urljoin(url, location)
                    if urlsplit(nxt).netloc != parts.netloc or urlsplit(nxt).scheme != parts.scheme:
                        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                    if answer.status == 303 and method != "HEAD":
                        method = "GET"
                    url = nxt
                    continue
                sink = accept(Response(answer.status, answer.headers))
                got = 0
                if method == "HEAD":
                    answer.read()
                elif sink is not None:
                    got = self._stream(call, answer, sink, label)
                self._checkin(key, conn, answer)
                return got
            except BaseException:
                conn.close()
                raise
            finally:
                call.detach()
        raise DownloadError(f"{label}: more than {MAX_REDIRECTS} redirects")

    def _route(self, parts: SplitResult) -> tuple[Route, str, dict[str, str]]:
        """(pool key, request target, extra headers) for a URL, through a proxy where one is set."""
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        proxy = self.proxies.get(scheme)
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # stable, untyped
        if not proxy or bypass(host, self.proxies):
            return ("direct", scheme, host, port), path, {}
        via = _proxy_url(proxy)
        phost, pport = via.hostname or "", via.port or 80
        if scheme == "https":
            return ("tunnel", phost, pport, host, port), path, {}
        return ("proxy", phost, pport), parts.geturl(), _proxy_auth(via)

    def _send(
        self,
        call: _Call,
        key: Route,
        method: str,
        target: str,
        headers: dict[str, str],
        label: str,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send on an idle connection when there is one, else on a new one; a kept-alive
        connection the server has closed meanwhile is replaced once, at no retry's cost."""
        conn = self._idle_connection(key)
        for fresh in (conn is None, True):
            if conn is None:
                conn = self._connect(key, call)
            if not call.attach(conn.sock):
                conn.close()
                raise Stopped(label)
            try:
                conn.request(method, target, headers=headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if fresh:
                    raise
                conn = None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _stream(self, call: _Call, answer: http.client.HTTPResponse, sink: Sink, label: str) -> int:
        buf = getattr(self._local, "buf", None)  # one per worker thread, reused for every read
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.read_size))
        got = 0
        while True:
            if call.stopped.is_set():
                raise Stopped(label)
            n = answer.readinto(buf)
            if not n:
                if answer.length:  # readinto reports a body cut short as its end
                    raise http.client.IncompleteRead(b"", answer.length)
                return got
            if self.limiter is not None and (wait := self.limiter.delay(n)) > 0:
                call.stopped.wait(wait)
            sink(buf[:n])
            got += n

    def _idle_connection(self, key: Route) -> http.client.HTTPConnection | None:
        with self._lock:
            conns = self._idle.get(key)
            return conns.pop() if conns else None

    def _connect(self, key: Route, call: _Call) -> http.client.HTTPConnection:
        kind, *where = key
        conn: http.client.HTTPConnection
        if kind == "direct" and where[0] == "https":
            conn = http.client.HTTPSConnection(
                str(where[1]), int(where[2]), timeout=self.connect_timeout, context=self.ssl_context
            )
        elif kind == "tunnel":
            phost, pport, host, port = where
            conn = http.client.HTTPSConnection(
                str(phost), int(pport), timeout=self.connect_timeout, context=self.ssl_context
            )
            conn.set_tunnel(str(host), int(port), headers=_proxy_auth(_proxy_url(self.proxies["https"])))
        elif kind == "proxy":
            conn = http.client.HTTPConnection(str(where[0]), int(where[1]), timeout=self.connect_timeout)
        else:
            conn = http.client.HTTPConnection(str(where[1]), int(where[2]), timeout=self.connect_timeout)
        # http.client's hook for making the socket: ours shows it to the call before connecting.
        conn._create_connection = functools.partial(_dial, call)  # type: ignore[attr-defined]
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _checkin(
        self, key: Route, conn: http.client.HTTPConnection, answer: http.client.HTTPResponse
    ) -> None:
        if answer.will_close or not answer.isclosed() or self._closed:
            conn.close()
            return
        with self._lock:
            self._idle.setdefault(key, []).append(conn)


def _dial(
    call: _Call,
    address: tuple[str, int],
    timeout: float | None,
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """``socket.create_connection``, with each socket attached to the call before it connects, so
    stopping the call interrupts a connect that would hang until its timeout (an address that drops
    SYNs): ``shutdown`` ends a pending ``connect`` at once."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        if not call.attach(sock):
            sock.close()
            raise Stopped(host)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(where)
            return sock
        except OSError as e:
            sock.close()
            if call.stopped.is_set():
                raise Stopped(host) from e
            error = e
    raise error or OSError(f"{host}: no address")


def _proxy_url(text: str) -> SplitResult:
    return urlsplit(text if "://" in text else f"http://{text}")  # "host:port" is how many set it


def _proxy_auth(via: SplitResult) -> dict[str, str]:
    if via.username is None:
        return {}
    import base64

    pair = f"{unquote(via.username)}:{unquote(via.password or '')}".encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode()}
