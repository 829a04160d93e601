"""The download engine's HTTP client (agent/download/client.py) against real local HTTP servers:
redirects, kept-alive connections the server closed, cancellation, TLS, the global limits."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.typedefs import Handler

from agent.download.client import ClientSettings, HttpClient, Response
from localmodel.errors import AccessDenied, DownloadError, InvalidInput, TransientError
from tests.support.proxy import Proxy
from tests.support.tls import make_cert

MiB = 1 << 20


class Server:
    """An aiohttp server on 127.0.0.1 that records every request's path and headers."""

    def __init__(self, routes: Callable[[Server], list[web.RouteDef]], **runner: object) -> None:
        self.routes = routes
        self.runner_options = {"shutdown_timeout": 0.5, **runner}  # a stalled handler is not waited for
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.peers: set[tuple[str, int]] = set()
        self.url = ""

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.seen.append((request.path_qs, dict(request.headers)))
            if request.transport is not None:
                self.peers.add(request.transport.get_extra_info("peername"))
            return await handler(request)

        app = web.Application(middlewares=[record])
        app.add_routes(self.routes(self))
        self.runner = web.AppRunner(app, **self.runner_options)  # type: ignore[arg-type]
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient(ClientSettings(concurrency=4, read_size=64 << 10, connect_timeout=5, read_timeout=5))
    yield c
    c.close()


async def fetch(client: HttpClient, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    body = bytearray()
    status = []

    def accept(response: Response) -> Callable[[memoryview], None]:
        status.append(response.status)
        return lambda data: body.extend(data)

    await client.request("GET", url, headers=headers or {}, label="test", accept=accept)
    return status[-1], bytes(body)


async def test_redirects_keep_authorization_only_within_the_origin(client: HttpClient) -> None:
    payload = b"weights" * 1000

    def cdn_routes(server: Server) -> list[web.RouteDef]:
        async def blob(request: web.Request) -> web.Response:
            return web.Response(body=payload)

        return [web.get("/blob", blob)]

    cdn = Server(cdn_routes)
    await cdn.start()

    def hub_routes(server: Server) -> list[web.RouteDef]:
        async def resolve(request: web.Request) -> web.Response:
            raise web.HTTPFound("/moved/file")  # relative, same origin

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(f"{cdn.url}/blob")  # another origin

        return [web.get("/resolve/file", resolve), web.get("/moved/file", moved)]

    hub = Server(hub_routes)
    await hub.start()
    try:
        status, body = await fetch(client, f"{hub.url}/resolve/file", {"Authorization": "Bearer hf_SECRET"})
        assert (status, body) == (200, payload)
        assert [(p, h.get("Authorization")) for p, h in hub.seen] == [
            ("/resolve/file", "Bearer hf_SECRET"),
            ("/moved/file", "Bearer hf_SECRET"),
        ]
        assert [(p, h.get("Authorization")) for p, h in cdn.seen] == [("/blob", None)]
    finally:
        await hub.stop()
        await cdn.stop()


async def test_a_redirect_loop_is_an_error_naming_the_label_not_the_url(client: HttpClient) -> None:
    def routes(server: Server) -> list[web.RouteDef]:
        async def loop(request: web.Request) -> web.Response:
            raise web.HTTPFound("/loop?X-Amz-Signature=secret")

        return [web.get("/loop", loop)]

    server = Server(routes)
    await server.start()
    try:
        with pytest.raises(DownloadError) as info:
            await fetch(client, f"{server.url}/loop")
        assert not isinstance(info.value, TransientError)
        assert "redirects" in str(info.value) and "secret" not in str(info.value)
        assert len(server.seen) == 11
    finally:
        await server.stop()


async def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error(
    client: HttpClient,
) -> None:
    def routes(server: Server) -> list[web.RouteDef]:
        async def small(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * 100)

        return [web.get("/small", small)]

    server = Server(routes, keepalive_timeout=0.05)  # closes idle connections after 50 ms
    await server.start()
    try:
        assert await fetch(client, f"{server.url}/small") == (200, b"x" * 100)
        assert await fetch(client, f"{server.url}/small") == (200, b"x" * 100)  # reused at once
        assert len(server.peers) == 1
        await asyncio.sleep(0.3)  # the server has closed it by now; the client still holds it idle
        assert await fetch(client, f"{server.url}/small") == (200, b"x" * 100)
        assert len(server.peers) == 2
    finally:
        await server.stop()


async def test_cancelling_stops_the_worker_before_returning(client: HttpClient) -> None:
    """A body that stalls: cancelling the awaiting task returns at once, and nothing is written
    afterwards (the engine closes the file's descriptor right after)."""
    started = asyncio.Event()

    def routes(server: Server) -> list[web.RouteDef]:
        async def stall(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": str(100 * MiB)})
            await response.prepare(request)
            await response.write(b"x" * (64 << 10))
            started.set()
            await asyncio.sleep(3600)
            return response

        return [web.get("/stall", stall)]

    server = Server(routes)
    await server.start()
    writes: list[int] = []
    done = threading.Event()

    def accept(response: Response) -> Callable[[memoryview], None]:
        return lambda data: writes.append(len(data))

    async def request() -> None:
        try:
            await client.request("GET", f"{server.url}/stall", headers={}, label="t", accept=accept)
        finally:
            done.set()

    try:
        task = asyncio.create_task(request())
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.2)
        before = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - before < 2  # not the 5 s read timeout
        assert done.is_set()
        count = len(writes)
        await asyncio.sleep(0.3)
        assert len(writes) == count and sum(writes) == 64 << 10
    finally:
        await server.stop()


async def test_statuses_reach_accept_and_connection_errors_are_transient(client: HttpClient) -> None:
    def routes(server: Server) -> list[web.RouteDef]:
        async def denied(request: web.Request) -> web.Response:
            return web.Response(status=403, text="no")

        async def cut(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"x" * 10)
            assert request.transport is not None
            request.transport.close()
            return response

        return [web.get("/denied", denied), web.get("/cut", cut)]

    server = Server(routes)
    await server.start()

    def refuse(response: Response) -> None:
        if response.status == 403:
            raise AccessDenied("test: access denied (HTTP 403)")

    try:
        with pytest.raises(AccessDenied):
            await client.request("GET", f"{server.url}/denied", headers={}, label="t", accept=refuse)
        with pytest.raises(TransientError, match=r"the connection to 127\.0\.0\.1:\d+ closed with \d+ bytes"):
            await fetch(client, f"{server.url}/cut")
        port = server.url.rsplit(":", 1)[1]
    finally:
        await server.stop()
    with pytest.raises(TransientError, match=rf"connection refused by 127\.0\.0\.1:{port}$"):
        await fetch(client, f"http://127.0.0.1:{port}/gone")


async def test_a_refused_answer_the_server_closes_after_closes_its_socket(client: HttpClient) -> None:
    # "Connection: close": http.client hands the socket to the answer, which closing the connection
    # alone left open until the collector found it (a ResourceWarning, some tests later).
    def routes(server: Server) -> list[web.RouteDef]:
        async def denied(request: web.Request) -> web.Response:
            return web.Response(status=403, text="no" * 1000, headers={"Connection": "close"})

        async def body(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * 100_000, headers={"Connection": "close"})

        return [web.get("/denied", denied), web.get("/body", body)]

    def refuse(response: Response) -> None:
        raise AccessDenied("test: access denied (HTTP 403)")

    def refuse_body(response: Response) -> Callable[[memoryview], None]:
        def sink(data: memoryview) -> None:
            raise DownloadError("test: refused mid-body")

        return sink

    server = Server(routes)
    await server.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(AccessDenied):
                await client.request("GET", f"{server.url}/denied", headers={}, label="t", accept=refuse)
            with pytest.raises(DownloadError, match="refused mid-body"):
                await client.request("GET", f"{server.url}/body", headers={}, label="t", accept=refuse_body)
            gc.collect()
        assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    finally:
        await server.stop()


async def test_an_untrusted_certificate_is_not_retried_and_a_trusted_one_works(tmp_path: Path) -> None:
    make_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    def routes(server: Server) -> list[web.RouteDef]:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(body=b"hello")

        return [web.get("/hello", hello)]

    server = Server(routes)
    await server.start(ssl_context=context)
    strict = HttpClient(ClientSettings(concurrency=2, read_size=MiB, connect_timeout=5, read_timeout=5))
    trusting = HttpClient(
        ClientSettings(concurrency=2, read_size=MiB, connect_timeout=5, read_timeout=5),
        ssl_context=ssl.create_default_context(cafile=str(tmp_path / "tls.crt")),
    )
    try:
        with pytest.raises(DownloadError, match="certificate is not trusted") as info:
            await fetch(strict, f"{server.url}/hello")
        assert not isinstance(info.value, TransientError)
        assert await fetch(trusting, f"{server.url}/hello") == (200, b"hello")
    finally:
        strict.close()
        trusting.close()
        await server.stop()


async def test_the_rate_cap_holds_for_all_requests_together() -> None:
    size = 2 * MiB

    def routes(server: Server) -> list[web.RouteDef]:
        async def blob(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * size)

        return [web.get("/blob", blob)]

    server = Server(routes)
    await server.start()
    capped = HttpClient(
        ClientSettings(
            concurrency=4, read_size=64 << 10, connect_timeout=5, read_timeout=5, max_bandwidth=4 * MiB
        )
    )
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(fetch(capped, f"{server.url}/blob") for _ in range(4)))
        elapsed = time.monotonic() - started
        assert all(body == b"x" * size for _, body in results)
        # 8 MiB at 4 MiB/s, no burst: at least about two seconds, whatever the concurrency.
        assert elapsed >= 1.9
    finally:
        capped.close()
        await server.stop()


async def test_proxies_tunnel_https_forward_http_and_honour_no_proxy(tmp_path: Path) -> None:
    make_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    def routes(server: Server) -> list[web.RouteDef]:
        async def blob(request: web.Request) -> web.Response:
            return web.Response(body=b"through " + request.scheme.encode())

        return [web.get("/blob", blob)]

    plain, tls, proxy = Server(routes), Server(routes), Proxy()
    await plain.start()
    await tls.start(ssl_context=context)
    await proxy.start()
    auth_url = proxy.url.replace("http://", "http://user:p%40ss@")

    def make(proxies: dict[str, str]) -> HttpClient:
        return HttpClient(
            ClientSettings(concurrency=2, read_size=MiB, connect_timeout=5, read_timeout=5, proxies=proxies),
            ssl_context=ssl.create_default_context(cafile=str(tmp_path / "tls.crt")),
        )

    via = make({"http": auth_url, "https": auth_url})
    bypass = make({"http": auth_url, "https": auth_url, "no": "localhost,127.0.0.1"})
    try:
        assert await fetch(via, f"{plain.url}/blob?x=1") == (200, b"through http")
        assert await fetch(via, f"{tls.url}/blob") == (200, b"through https")
        basic = "Basic dXNlcjpwQHNz"  # user:p@ss
        assert proxy.seen == [
            ("GET", f"{plain.url}/blob?x=1", basic),
            ("CONNECT", tls.url.removeprefix("https://"), basic),
        ]
        proxy.seen.clear()
        assert await fetch(bypass, f"{plain.url}/blob") == (200, b"through http")
        assert proxy.seen == []
        with pytest.raises(InvalidInput, match="https_proxy: only http://"):
            make({"https": "https://proxy.example:3128"})
    finally:
        via.close()
        bypass.close()
        await proxy.stop()
        await plain.stop()
        await tls.stop()


async def test_cancelling_a_connect_that_hangs_ends_it_and_frees_the_worker() -> None:
    """A listener whose accept queue is full drops new SYNs, so a connect hangs until its timeout.
    Cancelling the caller ends that connect at once: the client's only worker is free for the next
    request, long before the 3 s connect timeout, and ``accept`` never ran."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue; later connects are left hanging
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    await asyncio.sleep(0.2)

    def routes(server: Server) -> list[web.RouteDef]:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(body=b"hello")

        return [web.get("/hello", hello)]

    server = Server(routes)
    await server.start()
    one = HttpClient(ClientSettings(concurrency=1, read_size=MiB, connect_timeout=3, read_timeout=3))
    called: list[int] = []

    def accept(response: Response) -> None:
        called.append(response.status)

    try:
        task = asyncio.create_task(
            one.request("GET", f"http://127.0.0.1:{port}/x", headers={}, label="t", accept=accept)
        )
        await asyncio.sleep(0.5)
        assert not task.done()  # still connecting
        before = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await fetch(one, f"{server.url}/hello") == (200, b"hello")
        assert time.monotonic() - before < 1.0
        assert called == []
    finally:
        one.close()
        await server.stop()
        for s in fillers:
            s.close()
        listener.close()


def test_without_a_system_ca_bundle_certifi_s_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty.pem").write_text("")
    (tmp_path / "certs").mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "empty.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "certs"))
    assert ssl.create_default_context().cert_store_stats()["x509_ca"] == 0  # as in a bare image
    bare = HttpClient(ClientSettings(concurrency=1, read_size=MiB, connect_timeout=5, read_timeout=5))
    try:
        assert bare.ssl_context.cert_store_stats()["x509_ca"] > 100
    finally:
        bare.close()
