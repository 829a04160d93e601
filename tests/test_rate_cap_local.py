"""``--max-bandwidth`` holds for file:// sources too (the copy in the kernel is paid for in steps),
measured over every window of a second as tests/test_rate_cap.py does; and a capped client's
sockets get a bounded receive buffer, so the server cannot run far ahead of the cap on the wire."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from aiohttp import web

from agent.download.client import ClientSettings, HttpClient
from agent.download.pull import pull
from agent.download.ratelimit import RateLimiter
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.uri import parse_uri
from tests.test_download_client import Server
from tests.test_rate_cap import capped_fetch, worst_window

MiB = 1 << 20
RATE = 2 * MiB


class Log:
    def __init__(self) -> None:
        self.deliveries: list[tuple[float, int]] = []

    def start(self, *, total_bytes: int, done_bytes: int, files: int) -> None:
        return None

    def advance(self, nbytes: int) -> None:
        self.deliveries.append((time.monotonic(), nbytes))


async def test_a_file_source_is_copied_under_the_cap(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * (3 * MiB))
    (src / "b.bin").write_bytes(b"b" * (2 * MiB))
    log = Log()
    await pull(
        parse_uri(f"file://{src}"),
        Destination.for_folder(tmp_path / "dest"),
        sources=SourceSettings(),
        transfer=TransferSettings(max_bandwidth=RATE),
        progress=log,
    )
    assert (tmp_path / "dest" / "a.bin").read_bytes() == b"a" * (3 * MiB)
    assert sum(n for _, n in log.deliveries) == 5 * MiB
    # Before: each file in one copy_file_range of 64 MiB, 5 MiB within a second under a 2 MiB/s cap.
    step = RateLimiter(RATE).step
    worst = worst_window(log.deliveries)
    assert worst <= RATE + RATE * RateLimiter.SAVED + 3 * step, f"{worst / MiB:.2f} MiB in one second"


async def test_a_capped_clients_connections_have_a_bounded_receive_buffer() -> None:
    def routes(server: Server) -> list[web.RouteDef]:
        async def blob(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * 1000)

        return [web.get("/blob", blob)]

    server = Server(routes)
    await server.start()
    buffers = []
    try:
        for cap in (None, MiB):
            client = HttpClient(
                ClientSettings(
                    concurrency=1, read_size=MiB, connect_timeout=5, read_timeout=5, max_bandwidth=cap
                )
            )
            try:
                assert await capped_fetch(client, f"{server.url}/blob", []) == 1000
                (conn,) = [c for conns in client._idle.values() for c in conns]
                assert conn.sock is not None
                buffers.append(conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
            finally:
                client.close()
    finally:
        await server.stop()
    assert RateLimiter(MiB).receive_buffer == MiB // 8
    assert RateLimiter(64 * 1024).receive_buffer == 64 << 10  # never under 64 KiB
    # Linux reports twice what was set (its bookkeeping); uncapped, the kernel's own default.
    assert buffers[1] == 2 * (MiB // 8), buffers
    assert buffers[0] != buffers[1]


async def test_a_cap_above_what_a_socket_buffer_holds_still_downloads(tmp_path: Path) -> None:
    # 20 GB/s: an eighth of a second's worth (2.5 GB) overflowed setsockopt's C int (TypeError).
    def routes(server: Server) -> list[web.RouteDef]:
        async def blob(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * 1000)

        return [web.get("/blob", blob)]

    cap = 20e9
    assert RateLimiter(cap).receive_buffer == RateLimiter.MAX_RECEIVE_BUFFER
    assert RateLimiter(cap).step == RateLimiter.MAX_STEP
    server = Server(routes)
    await server.start()
    client = HttpClient(
        ClientSettings(concurrency=1, read_size=MiB, connect_timeout=5, read_timeout=5, max_bandwidth=cap)
    )
    try:
        assert await capped_fetch(client, f"{server.url}/blob", []) == 1000
    finally:
        client.close()
        await server.stop()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * (3 * MiB))
    await pull(
        parse_uri(f"file://{src}"),
        Destination.for_folder(tmp_path / "dest"),
        sources=SourceSettings(),
        transfer=TransferSettings(max_bandwidth=cap),
        progress=Log(),
    )
    assert (tmp_path / "dest" / "a.bin").read_bytes() == b"a" * (3 * MiB)
