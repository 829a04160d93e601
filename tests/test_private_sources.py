"""In a cluster, a spec's URI must not make the agent connect to the node's own services or the
cloud metadata service: no connection to a loopback, link-local or unspecified address unless
``--allow-private-sources``, checked on the address actually connected (after DNS, each redirect) and
on the listing clients' endpoints. Standalone mode and ``pull`` allow them."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from agent.download.addresses import private_address
from agent.download.client import ClientSettings, HttpClient
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.errors import SourceNotAllowed
from localmodel.kinds import KINDS_BY_NAME, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from localmodel.uri import parse_uri
from tests.support.agents import group_doc, node_doc
from tests.support.hfhub import Hub
from tests.support.httpfiles import HttpFiles
from tests.support.kubeapi import KubeAPI
from tests.support.s3 import S3
from tests.test_agent_hardening import _outside_address, run_cluster_agent

CLOSED = TransferSettings(attempts=1, allow_private=False)


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("169.254.169.254", True),
        ("fe80::1%eth0", True),
        ("0.0.0.0", True),
        ("::", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("10.0.0.1", False),  # in-cluster object stores (MinIO) live on private ranges: allowed
        ("192.168.1.2", False),
        ("93.184.216.34", False),
        ("not-an-address", False),
    ],
)
def test_private_address(address: str, private: bool) -> None:
    assert private_address(address) is private


async def _pull(uri: str, dest: Path, sources: SourceSettings, transfer: TransferSettings = CLOSED) -> None:
    await pull(parse_uri(uri), Destination.for_folder(dest), sources=sources, transfer=transfer)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_http_source_on_loopback_is_refused_in_one_line(
    plain_http: HttpFiles, tmp_path: Path, host: str
) -> None:
    plain_http.add("/w.bin", b"w" * 100)
    uri = plain_http.url.replace("127.0.0.1", host) + "/w.bin"
    with pytest.raises(SourceNotAllowed) as e:
        await _pull(uri, tmp_path / "m", SourceSettings(allow_private=False))
    message = str(e.value)
    assert "\n" not in message and "--allow-private-sources" in message and "loopback" in message
    assert plain_http.requests == []  # not one request reached the server
    assert not (tmp_path / "m").exists()
    # pull and standalone mode (the default) fetch it.
    await _pull(uri, tmp_path / "m", SourceSettings(), TransferSettings())
    assert (tmp_path / "m" / "w.bin").read_bytes() == b"w" * 100


async def test_hf_and_s3_endpoints_on_loopback_are_refused_before_listing(
    hf_hub: Hub, s3: S3, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"w.bin": b"x" * 10})
    with pytest.raises(SourceNotAllowed, match="--allow-private-sources"):
        await _pull(
            "hf://org/m",
            tmp_path / "a",
            SourceSettings(hf_endpoint=hf_hub.endpoint, allow_private=False),
        )
    bucket = s3.bucket("models")
    s3.client.put_object(Bucket=bucket, Key="m/w.bin", Body=b"y" * 10)
    with pytest.raises(SourceNotAllowed, match="--allow-private-sources"):
        await _pull(f"s3://{bucket}/m", tmp_path / "b", SourceSettings.from_env(allow_private=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest_asyncio.fixture
async def redirector() -> AsyncIterator[tuple[str, list[str]]]:
    """A server on every address that redirects /w.bin to the same server on 127.0.0.1."""
    hits: list[str] = []
    port = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        hits.append(request.host)
        if request.host.startswith("127.0.0.1"):
            return web.Response(body=b"metadata", headers={"ETag": '"e"'})
        raise web.HTTPFound(f"http://127.0.0.1:{port}/w.bin")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f":{port}", hits
    finally:
        await runner.cleanup()


async def test_a_redirect_to_loopback_is_refused(redirector: tuple[str, list[str]]) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address")
    port, hits = redirector
    client = HttpClient(
        ClientSettings(
            concurrency=1, read_size=1 << 16, connect_timeout=5, read_timeout=5, allow_private=False
        )
    )
    try:
        with pytest.raises(SourceNotAllowed, match=r"127\.0\.0\.1"):
            await client.request(
                "GET", f"http://{outside}{port}/w.bin", headers={}, label="src", accept=lambda r: None
            )
    finally:
        client.close()
    assert hits == [f"{outside}{port}"]  # the first hop only: the redirect's target was never reached


async def test_cluster_agent_refuses_loopback_unless_allowed(
    kube_api: KubeAPI, plain_http: HttpFiles, tmp_path: Path
) -> None:
    plain_http.add("/w.bin", os.urandom(1000))
    uri = f"{plain_http.url}/w.bin"
    cache = tmp_path / "cache"
    for obj in (group_doc("g", path=cache), node_doc("n1", [("m", uri, "1Mi")])):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    assert await run_cluster_agent(tmp_path, kube_api) == 1
    model = json.loads((cache / ".modelcache" / "state.json").read_text())["status"]["models"]["m"]
    assert model["reason"] == "SourceNotAllowed", model
    assert "--allow-private-sources" in model["message"] and "\n" not in model["message"]
    assert plain_http.requests == []
    assert await run_cluster_agent(tmp_path, kube_api, "--allow-private-sources") == 0
    n1 = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert n1["status"]["modelStatus"] == {"m": "ModelDownloaded"}
    assert (cache / "models" / storage_key(uri) / "w.bin").stat().st_size == 1000
