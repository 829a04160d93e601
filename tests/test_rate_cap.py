"""``--max-bandwidth``: the cap holds over every window of a second, from the first byte on (no burst
at the start, none after a pause), measured where the bytes are handed on, with a local server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from aiohttp import web

from agent.download.client import ClientSettings, HttpClient, Response
from agent.download.ratelimit import RateLimiter
from tests.test_download_client import Server

MiB = 1 << 20
RATE = 4 * MiB
READ = 64 << 10
WORKERS = 4


def worst_window(deliveries: list[tuple[float, int]], width: float = 1.0) -> int:
    """The most bytes handed on within any window of ``width`` seconds (windows start at a delivery)."""
    deliveries.sort()
    worst, j, total = 0, 0, 0
    for i, (start, _) in enumerate(deliveries):
        while j < len(deliveries) and deliveries[j][0] < start + width:
            total += deliveries[j][1]
            j += 1
        worst = max(worst, total)
        total -= deliveries[i][1]
    return worst


async def capped_fetch(client: HttpClient, url: str, log: list[tuple[float, int]]) -> int:
    got = [0]
    lock = threading.Lock()

    def accept(response: Response) -> Callable[[memoryview], None]:
        assert response.status == 200

        def sink(data: memoryview) -> None:
            with lock:
                log.append((time.monotonic(), len(data)))
            got[0] += len(data)

        return sink

    await client.request("GET", url, headers={}, label="test", accept=accept)
    return got[0]


async def test_no_window_of_a_second_exceeds_the_cap() -> None:
    size = 3 * MiB

    def routes(server: Server) -> list[web.RouteDef]:
        async def blob(request: web.Request) -> web.Response:
            return web.Response(body=b"x" * size)

        return [web.get("/blob", blob)]

    server = Server(routes)
    await server.start()
    client = HttpClient(
        ClientSettings(
            concurrency=WORKERS, read_size=READ, connect_timeout=5, read_timeout=10, max_bandwidth=RATE
        )
    )
    log: list[tuple[float, int]] = []
    try:
        got = await asyncio.gather(*(capped_fetch(client, f"{server.url}/blob", log) for _ in range(WORKERS)))
        assert got == [size] * WORKERS
        # An idle pause, then more: what the pause did not use is not spent as a burst afterwards.
        await asyncio.sleep(1.5)
        assert await capped_fetch(client, f"{server.url}/blob", log) == size
    finally:
        client.close()
        await server.stop()
    # The bound: a second's worth and what may be saved between reads, plus the one read straddling
    # the window's start and, on a loaded machine, the reads of workers the scheduler woke late
    # together (never early): one per worker.
    slack = RATE * RateLimiter.SAVED + (WORKERS + 1) * READ
    worst = worst_window(log)
    assert worst <= RATE + slack, f"{worst / MiB:.2f} MiB in one second under a cap of {RATE / MiB} MiB/s"
    # The old bucket started full: a second's worth at once, twice the cap in the first second.
    assert sum(n for _, n in log) == 5 * size


def test_worst_window_counts_a_sliding_second() -> None:
    assert worst_window([(0.0, 5), (0.5, 5), (0.99, 5), (1.0, 7), (3.0, 1)]) == 17
    assert worst_window([]) == 0
