"""Answers trickled a byte at a time are cut off (13 §3): a response header has a deadline of its own
in the HTTP client (every GET and HEAD), and every listing attempt a total deadline (hf, s3, http)."""

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent.download.client import ClientSettings, HttpClient
from agent.download.source_settings import SourceSettings
from agent.download.sources import list_source
from localmodel.errors import TransientError
from localmodel.uri import parse_uri
from tests.support.s3files import aws_env


class Trickle:
    """A server that answers every request with a header one byte at a time, never finished, or
    (``body``) a whole header then a JSON body one byte at a time."""

    def __init__(self, *, body: bool = False) -> None:
        self.body = body
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.body:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while True:
                writer.write(b" " if self.body else b"a")
                await writer.drain()
                await asyncio.sleep(0.2)
        except (OSError, asyncio.IncompleteReadError):
            pass

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()


@pytest_asyncio.fixture
async def header_trickle() -> AsyncIterator[Trickle]:
    server = Trickle()
    await server.start()
    yield server
    await server.close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_trickled_header_is_cut_off_by_the_low_speed_time(
    header_trickle: Trickle, method: str
) -> None:
    client = HttpClient(
        ClientSettings(
            concurrency=2,
            read_size=1 << 16,
            connect_timeout=5,
            read_timeout=600,
            low_speed_limit=1024,
            low_speed_time=1,
        )
    )
    try:
        with pytest.raises(TransientError, match=r"no whole response header within 1 s"):
            await client.request(
                method, f"{header_trickle.url}/f.bin", headers={}, label="f.bin", accept=lambda r: None
            )
    finally:
        client.close()


def _settings(endpoint: str) -> SourceSettings:
    return SourceSettings(
        hf_endpoint=endpoint, s3_endpoint=endpoint, read_timeout=600, list_attempts=1, list_deadline=1.0
    )


# An S3 HEAD answered whole would read as one object: its listing is tested with the header trickled.
@pytest.mark.parametrize(
    ("uri", "body"), [("hf://org/model", False), ("hf://org/model", True), ("s3://bkt/llm", False)]
)
async def test_every_listing_has_a_total_deadline(
    uri: str, body: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    trickle = Trickle(body=body)
    await trickle.start()
    for k, v in aws_env(trickle.url).items():
        monkeypatch.setenv(k, v)
    client = HttpClient(ClientSettings(concurrency=2, read_size=1 << 16, connect_timeout=5, read_timeout=600))
    try:
        with pytest.raises(TransientError) as caught:
            await list_source(parse_uri(uri), settings=_settings(trickle.url), client=client)
    finally:
        client.close()
        await trickle.close()
    assert f"cannot reach {trickle.url}" in str(caught.value)
    assert "no whole listing" in str(caught.value) and "1 s" in str(caught.value)


async def test_an_http_head_listing_is_cut_off(header_trickle: Trickle) -> None:
    client = HttpClient(ClientSettings(concurrency=2, read_size=1 << 16, connect_timeout=5, read_timeout=600))
    try:
        with pytest.raises(TransientError, match=r"no whole listing|no whole response header"):
            await list_source(
                parse_uri(f"{header_trickle.url}/f.bin"),
                settings=_settings(header_trickle.url),
                client=client,
            )
    finally:
        client.close()
