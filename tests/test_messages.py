"""Messages that say what happened (13 §13): a 416 with the listed size, a missing CA bundle, a
redirect to another scheme, K as decimal kilo, retries in seconds, how each model was checked."""

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from agent.download.client import ClientSettings, HttpClient
from agent.download.source_settings import SourceSettings
from agent.download.sources import list_source
from agent.loop import _duration
from agent.status_cli import render_table
from localmodel.errors import DownloadError
from localmodel.quantity import parse_low_speed_limit, parse_rate
from localmodel.uri import parse_uri

SIZE = 300_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest_asyncio.fixture
async def server() -> AsyncIterator[str]:
    """/r416: ranges answered 416 with the listed size; /redirect: 302 to a file:// URL."""

    async def r416(request: web.Request) -> web.StreamResponse:
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(SIZE)}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        if request.headers.get("Range"):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{SIZE}"})
        return web.Response(body=b"x" * SIZE)

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "file:///etc/passwd"})

    app = web.Application()
    app.router.add_route("*", "/r416.bin", r416)
    app.router.add_route("*", "/redirect.bin", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def _pull(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Exit 1 with one line on stderr; in a process of its own, as a user runs it (the servers of
    this test answer from this process's loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", *argv, stderr=asyncio.subprocess.PIPE
    )
    _, raw = await asyncio.wait_for(proc.communicate(), 120)
    err = raw.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


async def test_a_416_with_the_listed_size_says_so(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pull", f"{server}/r416.bin", str(tmp_path / "d"), "--quiet", "--chunk-size", "64Ki"]
    err = await _pull(argv, capsys)
    assert f"(HTTP 416), though it says its copy has the listed {SIZE} bytes" in err
    assert "shorter" not in err


async def test_a_redirect_to_another_scheme_is_refused_by_name(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = await _pull(["pull", f"{server}/redirect.bin", str(tmp_path / "d"), "--quiet"], capsys)
    assert "redirects to a file: URL; only http and https redirects are followed" in err
    assert "gaierror" not in err


async def test_a_missing_ca_bundle_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", "/nonexistent.pem")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = HttpClient(ClientSettings(concurrency=1, read_size=1 << 16, connect_timeout=5, read_timeout=5))
    settings = SourceSettings(s3_endpoint="https://127.0.0.1:9", list_attempts=1)
    try:
        with pytest.raises(DownloadError, match=r"the CA bundle /nonexistent.pem .* does not exist"):
            await list_source(parse_uri("s3://bkt/llm"), settings=settings, client=client)
    finally:
        client.close()


@pytest.mark.parametrize("text", ["200K", "200KB/s", "200kB/s", "200k"])
def test_k_is_the_decimal_kilo(text: str) -> None:
    assert parse_rate(text) == 200_000
    assert parse_low_speed_limit(text) == 200_000
    assert parse_rate("200KiB/s") == 204_800


def test_retry_waits_are_said_in_seconds_minutes_or_hours() -> None:
    assert [_duration(s) for s in (5, 119, 600, 7200 * 2)] == ["5 s", "119 s", "10 min", "4 h"]


def test_status_shows_how_each_model_was_checked() -> None:
    models = {
        "a": {"state": "ModelDownloaded", "filesVerified": 3, "filesSizeOnly": 1},
        "b": {"state": "ModelDownloaded"},
    }
    table = render_table({"node": "n", "status": {"models": models}}).splitlines()
    start, end = table[1].index("CHECKED"), table[1].index("REASON")
    assert [line[start:end].strip() for line in table[2:]] == ["3 verified, 1 size only", "-"]


def test_status_shows_where_the_bytes_came_from_and_the_peers_dropped() -> None:
    models = {
        "a": {
            "state": "ModelDownloaded",
            "bytesFromPeers": 1_500_000_000,
            "bytesFromOrigin": 2_000_000,
            "peersDropped": [{"address": "10.0.0.7:7071", "reason": "bad bytes: w.bin failed its sha256"}],
        },
        "b": {"state": "ModelDownloaded"},
    }
    table = render_table({"node": "n", "status": {"models": models}}).splitlines()
    start, end = table[1].index("FROM"), table[1].index("CHECKED")
    assert [line[start:end].strip() for line in table[2:4]] == ["1.4 GiB peers, 1.9 MiB origin", "-"]
    assert table[4] == "warning: a: peer 10.0.0.7:7071 dropped: bad bytes: w.bin failed its sha256"
