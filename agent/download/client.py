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

Private addresses: with ``allow_private`` off (the agent in a cluster without
``--allow-private-sources``) no connection is made to a loopback, link-local (the cloud metadata
service at 169.254.169.254) or unspecified address (:mod:`agent.download.addresses`): the check is
on each address the name resolved to, just before connecting, so a redirect or a DNS answer that changes
between two lookups cannot dodge it. Through a proxy, the target's name is resolved here and checked
too (the proxy itself is the admin's choice). Refused with :class:`~localmodel.errors.SourceNotAllowed`.

Low-speed limit (curl's ``--speed-limit``/``--speed-time``): a body that brings fewer than
``low_speed_limit`` bytes in a window of ``low_speed_time`` seconds is abandoned with a
TransientError, so a server that trickles cannot hold a worker for long; the time a worker waits
for the byte-rate cap does not count. 0 turns it off.

TLS: the system's CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured; certifi's where the system has
none), plus ``ca_bundle`` when given: the bundle boto3 trusts (``AWS_CA_BUNDLE`` or the profile's
``ca_bundle``, read at the entry point with ``aws_ca_bundle``), so a private-CA S3 endpoint that
lists also downloads.

Proxies: the ``http_proxy``/``https_proxy``/``no_proxy`` variables, as curl and huggingface_hub read
them (read at the entry point: ``proxies_from_env``). https goes through a CONNECT tunnel, http
as an absolute-form request; ``user:password@`` in the proxy's URL becomes Proxy-Authorization.

Errors, mapped here and only here (``from e``) into the project's tree:

- :class:`~localmodel.errors.TransientError`: refused, reset or closed connections, timeouts, a body
  cut short, a malformed response, a body slower than the low-speed limit: the engine retries these
  with backoff, each on a fresh connection (the one that failed is closed, never pooled);
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
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from agent.download.addresses import PrivateAddress, check_resolved, private_address
from agent.download.http_status import decimal
from agent.download.ratelimit import RateLimiter
from agent.download.wording import connection_words
from localmodel.errors import DownloadError, InvalidInput, SourceNotAllowed, TransientError

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
        return decimal(self.headers.get("Content-Length"))


# ``accept(response)`` raises to refuse a response, or returns the sink for its body: called with
# each block received (a view into a buffer reused for the next read), in the worker thread.
Sink = Callable[[memoryview], None]
Accept = Callable[[Response], Sink | None]


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


# Where a connection goes: ("direct", scheme, host, port), ("proxy", host, port) for plain http sent
# to a proxy, or ("tunnel", proxy host, proxy port, host, port) for https through CONNECT.
Route = tuple[str | int, ...]


@dataclass(frozen=True)
class ClientSettings:
    """What an :class:`HttpClient` is built with, read once at the entry point
    (:func:`agent.download.pull.http_client` derives it from the transfer settings)."""

    concurrency: int  # worker threads: the process's connection limit
    read_size: int  # bytes each worker receives at once (its reused buffer)
    connect_timeout: float  # seconds
    read_timeout: float  # seconds without a byte
    max_bandwidth: float | None = None  # bytes per second, all connections together
    proxies: Mapping[str, str] = field(default_factory=dict)  # proxies_from_env()
    low_speed_limit: int = 0  # bytes/s; 0: off
    low_speed_time: float = 30.0  # seconds
    ca_bundle: str | None = None  # trusted besides the system's CAs (aws_ca_bundle())
    allow_private: bool = True  # connections to loopback, link-local, unspecified addresses
    header_timeout: float | None = None  # seconds for the whole response header; None: see HttpClient
    # Off: a redirect is an answer like any other (a peer's: it must not send us anywhere else).
    follow_redirects: bool = True


class HttpClient:
    def __init__(self, settings: ClientSettings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: used instead of the one built from the system's CAs and the CA bundle."""
        self.settings = settings
        self.proxies = dict(settings.proxies)
        self.allow_private = settings.allow_private
        for scheme in ("http", "https"):
            if scheme in self.proxies and _proxy_url(self.proxies[scheme]).scheme != "http":
                raise InvalidInput(
                    f"{scheme}_proxy: only http:// proxies are supported (https goes through CONNECT); "
                    "set it to http://HOST:PORT"
                )
        self.read_size = settings.read_size
        self.connect_timeout = settings.connect_timeout
        self.read_timeout = settings.read_timeout
        self.limiter = RateLimiter(settings.max_bandwidth) if settings.max_bandwidth else None
        self.low_speed_limit = settings.low_speed_limit if settings.low_speed_time > 0 else 0
        self.low_speed_time = settings.low_speed_time
        self.ca_bundle = settings.ca_bundle
        # The whole response header, from sending the request: the low-speed window when the check
        # is on (a header is a few hundred bytes), else twice the read timeout (a silent server is
        # still told by the read timeout, which ends first).
        self.header_timeout = settings.header_timeout or (
            self.low_speed_time if self.low_speed_limit else 2 * settings.read_timeout
        )
        self._ssl_context = ssl_context
        self._pool = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="modelcache-fetch"
        )
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
            if self.ca_bundle:
                try:
                    context.load_verify_locations(self.ca_bundle)
                except (OSError, ssl.SSLError) as e:
                    raise DownloadError(
                        f"the CA bundle {self.ca_bundle} (AWS_CA_BUNDLE or the AWS profile's ca_bundle) "
                        f"cannot be read: {getattr(e, 'strerror', None) or e}"
                    ) from e
            self._ssl_context = context
        # Its sockets feed the low-speed check as plain ones do (_dial).
        self._ssl_context.sslsocket_class = _MeteredSSL
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
        except PrivateAddress as e:
            raise SourceNotAllowed(f"{label}: {e}") from e
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
            raise TransientError(f"{label}: {connection_words(e, url)}") from e

    def _follow(
        self, call: _Call, method: str, url: str, headers: dict[str, str], label: str, accept: Accept
    ) -> int:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            key, target, extra = self._route(parts)
            if key[0] != "direct" and not self.allow_private:
                # The proxy connects for us: what it would reach is checked by name here, each hop.
                check_resolved(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
            conn, answer = self._send(call, key, method, target, {**headers, **extra}, label)
            try:
                location = answer.getheader("Location")
                if answer.status in REDIRECTS and location and self.settings.follow_redirects:
                    answer.read(64 << 10)  # a redirect's body is short: drained, the connection is reused
                    self._checkin(key, conn, answer)
                    nxt = urljoin(url, location)
                    if urlsplit(nxt).scheme not in ("http", "https"):
                        raise DownloadError(
                            f"{label}: the server redirects to a {urlsplit(nxt).scheme or 'relative'}: "
                            "URL; only http and https redirects are followed"
                        )
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
                _drop(conn, answer)
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
            # A read timeout bounds each wait, not a header trickled a byte at a time: the whole
            # header has a deadline of its own, enforced by shutting the socket when it passes.
            late = threading.Event()
            timer = threading.Timer(self.header_timeout, _cut, (conn.sock, late))
            timer.daemon = True
            timer.start()
            try:
                conn.request(method, target, headers=headers)
                answer = conn.getresponse()
                timer.cancel()
                if late.is_set():  # the cut socket reads as the header's end: not an answer
                    _drop(conn, answer)
                    raise self._late(label)
                return conn, answer
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if late.is_set():
                    raise self._late(label) from None
                if fresh:
                    raise
                conn = None
            except BaseException:
                conn.close()
                if late.is_set():
                    raise self._late(label) from None
                raise
            finally:
                timer.cancel()
        raise AssertionError("unreachable")

    def _late(self, label: str) -> TransientError:
        return TransientError(
            f"{label}: no whole response header within {self.header_timeout:g} s (the server sends it "
            "too slowly, or not at all)"
        )

    def _stream(self, call: _Call, answer: http.client.HTTPResponse, sink: Sink, label: str) -> int:
        buf = getattr(self._local, "buf", None)  # one per worker thread, reused for every read
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.read_size))
        got = 0
        # The low-speed check runs in the socket's recv_into: a read here returns only once the
        # buffer is full, which a trickle of bytes would put off for days.
        sock = call.sock
        slow = self._check_speed(sock, label)
        try:
            while True:
                if call.stopped.is_set():
                    raise Stopped(label)
                try:
                    n = answer.readinto(buf)
                except TimeoutError:
                    if slow is not None and self.low_speed_time < self.read_timeout:
                        raise slow.error() from None
                    raise
                if not n:
                    if answer.length:  # readinto reports a body cut short as its end
                        raise http.client.IncompleteRead(b"", answer.length)
                    return got
                if self.limiter is not None and (wait := self.limiter.delay(n)) > 0:
                    call.stopped.wait(wait)
                    if slow is not None:
                        slow.pause(wait)
                sink(buf[:n])
                got += n
        finally:
            if slow is not None and isinstance(sock, _Metered | _MeteredSSL):
                sock.check = None
                with contextlib.suppress(OSError):
                    sock.settimeout(self.read_timeout)  # kept alive: the next answer's wait

    def _check_speed(self, sock: socket.socket | None, label: str) -> _SpeedCheck | None:
        """The low-speed check of one body, set on its socket (None: off, or not our socket)."""
        if not (self.low_speed_limit and isinstance(sock, _Metered | _MeteredSSL)):
            return None
        slow = sock.check = _SpeedCheck(self.low_speed_limit, self.low_speed_time, label)
        if self.low_speed_time < self.read_timeout:
            sock.settimeout(self.low_speed_time)  # a whole window without a byte is too slow
        return slow

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
        dial = functools.partial(
            _dial,
            call,
            self.allow_private or kind != "direct",
            rcvbuf=self.limiter.receive_buffer if self.limiter is not None else None,
        )
        conn._create_connection = dial  # type: ignore[attr-defined]
        try:
            conn.connect()
        except BaseException:
            conn.close()  # e.g. a CONNECT tunnel cut after its socket connected: the socket is ours
            raise
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _checkin(
        self, key: Route, conn: http.client.HTTPConnection, answer: http.client.HTTPResponse
    ) -> None:
        with self._lock:
            # Under the lock: a connection checked in after close() took the idle ones would stay
            # open until the collector found it.
            if not (answer.will_close or not answer.isclosed() or self._closed):
                self._idle.setdefault(key, []).append(conn)
                return
        _drop(conn, answer)


def _drop(conn: http.client.HTTPConnection, answer: http.client.HTTPResponse) -> None:
    """Close a connection that is not to be reused, and its answer: when the server closes after
    it (``Connection: close``, HTTP/1.0) http.client hands the socket to the answer, and
    ``conn.close()`` alone leaves it open until the collector finds it (a ResourceWarning)."""
    answer.close()
    conn.close()


class _SpeedCheck:
    """curl's low-speed rule for one body: fewer than ``limit`` bytes/s on average over a window of
    ``window`` seconds is too slow. Time spent waiting for the byte-rate cap is not counted."""

    def __init__(self, limit: int, window: float, label: str) -> None:
        self.limit, self.window, self.label = limit, window, label
        self.start = time.monotonic()
        self.bytes = 0

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def received(self, n: int) -> None:
        """Count ``n`` bytes; TransientError once a whole window went by below the limit."""
        self.bytes += n
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed >= self.window:
            if self.bytes < self.limit * elapsed:
                raise self.error()
            self.start, self.bytes = now, 0  # a new window

    def error(self) -> TransientError:
        return TransientError(f"{self.label}: slower than {self.limit} B/s for {self.window:g} s")


class _Metered(socket.socket):
    """A socket whose reads feed a :class:`_SpeedCheck` while one is set (a body being received)."""

    check: _SpeedCheck | None = None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        if self.check is not None:
            self.check.received(n)
        return n


class _MeteredSSL(ssl.SSLSocket):
    """:class:`_Metered` for TLS: the context makes these (``SSLContext.sslsocket_class``)."""

    check: _SpeedCheck | None = None

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        if self.check is not None:
            self.check.received(n)
        return n


def _cut(sock: socket.socket | None, late: threading.Event) -> None:
    """The header deadline passed: end the blocked read (the worker raises at once)."""
    late.set()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _dial(
    call: _Call,
    allow_private: bool,
    address: tuple[str, int],
    timeout: float | None,
    source_address: tuple[str, int] | None = None,
    *,
    rcvbuf: int | None = None,
) -> socket.socket:
    """``socket.create_connection``, with each socket attached to the call before it connects, so
    stopping the call interrupts a connect that would hang until its timeout (an address that drops
    SYNs): ``shutdown`` ends a pending ``connect`` at once. Without ``allow_private``, an address
    :func:`private_address` refuses is never connected to (:class:`PrivateAddress`). ``rcvbuf``:
    SO_RCVBUF in bytes, set before connecting (the window scale is agreed in the handshake)."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        if not allow_private and private_address(str(where[0])):
            raise PrivateAddress(host, str(where[0]))
        sock = _Metered(family, kind, proto)
        if not call.attach(sock):
            sock.close()
            raise Stopped(host)
        try:
            sock.settimeout(timeout)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
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
