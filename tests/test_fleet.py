"""Fleets of node agents on one machine (issue 18's Tests), every component a process: the Kubernetes
API emulator, ``modelcache controller``, N ``modelcache agent`` processes with their own node names,
cache folders and ports (tests/support/fleet.py), and the origin (the local Hugging Face hub, or S3
files) counting the bytes it sends.

- Today's behaviour (origin mode, no peer port): every node ends byte-identical to the source, and
  the origin sends every file once per node.
- Peer fill (agents with ``--peer-addr`` and one cluster token; the controller's peer lists and
  ``--origin-seeds``): every node ends byte-identical and the origin sends every file exactly once for
  the whole fleet (N = 3; N = 6 with ``MODELCACHE_FLEET_HEAVY=1``), hub and S3; a peer whose copy
  was tampered with on its disk is dropped and named and the node still ends correct; a peer killed
  mid-transfer leaves the rest to the origin; a node whose token differs is refused (401, nothing
  served) and fills from the origin. These skip, naming why, where the agent has no ``--peer-addr``.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from localmodel.kinds import LOCAL_MODEL_CACHE
from localmodel.layout import storage_key
from localmodel.peering import Holding, bearer, holding_path
from tests.support.agents import eventually
from tests.support.fleet import Fleet, FleetSettings, identical, peer_fill_missing
from tests.support.hfhub import Hub, Link
from tests.support.kubeapi import KubeAPI
from tests.support.s3files import S3Files

MiB = 1 << 20
BIG = "model.safetensors"
HEAVY = os.environ.get("MODELCACHE_FLEET_HEAVY") == "1"
SIX = pytest.param(
    6,
    marks=[
        pytest.mark.slow,
        pytest.mark.skipif(not HEAVY, reason="set MODELCACHE_FLEET_HEAVY=1 (six agent processes)"),
    ],
)


@dataclass
class Origin:
    """The source of a fleet's model: its URI, its files (relative path -> the file), and the body
    bytes the origin has sent per relative path since the last ``reset``."""

    uri: str
    files: dict[str, Path]
    served: Callable[[], Counter[str]]
    reset: Callable[[], None]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


def model_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    contents = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
        "tokenizer.json": os.urandom(200_000),
        BIG: os.urandom(16 * MiB),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in contents}


@pytest.fixture
def hf_origin(hf_hub: Hub, tmp_path: Path) -> Origin:
    files = model_files(tmp_path / "source")
    hf_hub.add_repo("org/fleet", dict(files))

    def served() -> Counter[str]:
        return Counter({k.removeprefix("org/fleet/"): v for k, v in hf_hub.bytes_sent.items()})

    return Origin("hf://org/fleet", files, served, hf_hub.reset_counts)


@pytest.fixture
def s3_origin(s3files: S3Files, tmp_path: Path) -> Origin:
    files = model_files(tmp_path / "source")
    s3files.bucket("fleet")
    for name, path in files.items():
        s3files.put("fleet", f"model/{name}", path.read_bytes(), sha256=name == BIG)

    def served() -> Counter[str]:
        return Counter({k.removeprefix("model/"): v for k, v in s3_bytes(s3files, files).items()})

    return Origin("s3://fleet/model", files, served, s3files.requests.clear)


@pytest.fixture(params=["hf", "s3"])
def origin(request: pytest.FixtureRequest) -> Origin:
    """The same model at the local hub or at S3 files (the issue: "the same with S3 as the origin")."""
    got: Origin = request.getfixturevalue(f"{request.param}_origin")
    return got


def s3_bytes(server: S3Files, files: dict[str, Path]) -> Counter[str]:
    """Body bytes of the GETs of each key, from the server's request log (a whole object when no
    range was asked). The server sends every range it answers whole (sendfile)."""
    out: Counter[str] = Counter()
    for r in server.requests:
        name = r.key.removeprefix("model/")
        if r.method != "GET" or name not in files:
            continue
        size = files[name].stat().st_size
        if r.range is None:
            out[r.key] += size
            continue
        a, _, b = r.range.removeprefix("bytes=").partition("-")
        out[r.key] += min(int(b) if b else size - 1, size - 1) - int(a) + 1
    return out


@pytest.fixture
def peer_fill() -> None:
    reason = peer_fill_missing()
    if reason is not None:
        pytest.skip(reason)


def names(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


async def check_copies(fleet: Fleet, origin: Origin, nodes: list[str]) -> None:
    for node in nodes:
        assert identical(fleet.agents[node].copy(origin.uri), origin.files) == [], node


# -- the origin's counts and link ---------------------------------------------------------------


async def test_the_hub_counts_body_bytes_per_file_and_paces_every_body_through_one_link(
    hf_hub: Hub, tmp_path: Path
) -> None:
    files = model_files(tmp_path / "source")
    hf_hub.add_repo("org/fleet", dict(files))
    size = files[BIG].stat().st_size
    url = f"{hf_hub.endpoint}/org/fleet/resolve/main/{BIG}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        # Unpaced (sendfile): a whole body and a range, counted once sent; HEAD and 404 send none.
        async with http.get(url) as r:
            assert len(await r.read()) == size
        async with http.get(url, headers={"Range": "bytes=100-199"}) as r:
            assert r.status == 206 and len(await r.read()) == 100
        async with http.head(url) as r:
            assert r.status == 200
        async with http.get(f"{hf_hub.endpoint}/org/fleet/resolve/main/nothing") as r:
            assert r.status == 404
        assert hf_hub.bytes_sent == Counter({f"org/fleet/{BIG}": size + 100})
        assert hf_hub.total_bytes_sent == size + 100

        # Paced: two bodies at once share the link; it has sent their bytes no sooner than their
        # bytes' time at its rate (the link's own clock, not the wall's).
        hf_hub.reset_counts()
        hf_hub.link = Link(64 * MiB)
        start = asyncio.get_running_loop().time()

        async def body(rng: str) -> bytes:
            async with http.get(url, headers={"Range": rng}) as r:
                return await r.read()

        first, second = await asyncio.gather(body("bytes=0-8388607"), body(f"bytes={8 * MiB}-"))
        assert first + second == files[BIG].read_bytes()
        assert hf_hub.bytes_sent == Counter({f"org/fleet/{BIG}": size})
        assert hf_hub.link.free_at >= start + size / (64 * MiB)
        assert hf_hub.requests and all(r.range for r in hf_hub.requests)


# -- today: every node from the origin ----------------------------------------------------------


async def test_origin_mode_every_node_byte_identical_and_the_origin_sends_each_file_per_node(
    origin: Origin, kube_api: KubeAPI, tmp_path: Path
) -> None:
    nodes = names(3)
    async with Fleet(tmp_path / "fleet", kube_api) as fleet:
        await fleet.start(nodes)
        origin.reset()
        await fleet.add_cache("m", origin.uri, "100Mi")
        await fleet.wait_downloaded("m", timeout=180)
        await check_copies(fleet, origin, nodes)
        sizes = {name: p.stat().st_size for name, p in origin.files.items()}
        assert origin.served() == Counter({name: 3 * size for name, size in sizes.items()})
        codes = await fleet.stop()
    assert set(codes.values()) == {0}, codes


# -- peer fill ----------------------------------------------------------------------------------


def peer_settings() -> FleetSettings:
    return FleetSettings(peer_fill=True, origin_seeds=1)


@pytest.mark.parametrize("n", [3, SIX])
@pytest.mark.usefixtures("peer_fill")
async def test_peer_fill_the_origin_sends_each_file_once(
    n: int, origin: Origin, kube_api: KubeAPI, tmp_path: Path
) -> None:
    nodes = names(n)
    async with Fleet(tmp_path / "fleet", kube_api, peer_settings()) as fleet:
        await fleet.start(nodes)
        origin.reset()
        await fleet.add_cache("m", origin.uri, "100Mi")
        await fleet.wait_downloaded("m", timeout=60 + 30 * n)
        await check_copies(fleet, origin, nodes)
        sizes = Counter({name: p.stat().st_size for name, p in origin.files.items()})
        assert origin.served() == sizes
        # Each node says where its bytes came from, and the cache sums the origin's for the cluster.
        progress = {node: await fleet.progress(node, "m") for node in nodes}
        from_origin = {node: p.bytes_from_origin if p else None for node, p in progress.items()}
        assert sum(b or 0 for b in from_origin.values()) == origin.size, from_origin
        for node, p in progress.items():
            assert p is not None and (p.bytes_from_origin or 0) + (p.bytes_from_peers or 0) >= origin.size
            assert p.peers_dropped == (), (node, p.peers_dropped)

        async def cluster_origin_bytes() -> int | None:
            status = (await kube_api.store.get(LOCAL_MODEL_CACHE, "m")).get("status") or {}
            got = status.get("originBytes")
            return got if got == origin.size else None

        await eventually(cluster_origin_bytes, timeout=30, what="the cache's status.originBytes")
        codes = await fleet.stop()
    assert set(codes.values()) == {0}, codes


@pytest.mark.usefixtures("peer_fill")
async def test_peer_fill_a_peer_serving_tampered_bytes_is_dropped_named_and_the_node_ends_right(
    hf_hub: Hub, kube_api: KubeAPI, tmp_path: Path
) -> None:
    files = model_files(tmp_path / "source")
    hf_hub.add_repo("org/fleet", dict(files))
    uri = "hf://org/fleet"
    async with Fleet(tmp_path / "fleet", kube_api, peer_settings()) as fleet:
        await fleet.start(["node-0"])
        await fleet.add_cache("m", uri, "100Mi")
        await fleet.wait_downloaded("m", timeout=120)
        # node-0's disk rots under its published copy: it now serves other bytes of the same size.
        held = fleet.agents["node-0"].copy(uri) / BIG
        mode = held.stat().st_mode
        held.chmod(0o644)
        with held.open("r+b") as fh:
            fh.seek(8 * MiB)
            byte = fh.read(1)
            fh.seek(8 * MiB)
            fh.write(bytes([byte[0] ^ 0xFF]))
        held.chmod(mode)
        hf_hub.reset_counts()

        await fleet.add_node("node-1")
        await fleet.wait_downloaded("m", ["node-1"], timeout=120)
        assert identical(fleet.agents["node-1"].copy(uri), files) == []
        assert hf_hub.bytes_sent[f"org/fleet/{BIG}"] >= files[BIG].stat().st_size  # refetched
        progress = await fleet.progress("node-1", "m")
        assert progress is not None
        peer = fleet.agents["node-0"].peer
        dropped = {d.address: d.reason for d in progress.peers_dropped}
        assert peer in dropped and BIG in dropped[peer], progress.peers_dropped
        events = await kube_api.events(reason="PeerDropped")
        assert any(peer in str(e.get("message")) or "node-0" in str(e.get("message")) for e in events), events


@pytest.mark.usefixtures("peer_fill")
async def test_peer_fill_a_peer_killed_mid_transfer_leaves_the_rest_to_the_origin(
    hf_hub: Hub, kube_api: KubeAPI, tmp_path: Path
) -> None:
    files = model_files(tmp_path / "source")
    size = files[BIG].stat().st_size
    hf_hub.add_repo("org/fleet", dict(files))
    uri = "hf://org/fleet"
    async with Fleet(tmp_path / "fleet", kube_api, peer_settings()) as fleet:
        await fleet.start([])
        # node-0 uploads at 2 MiB/s and node-1 asks on two connections: node-1's fill from node-0
        # takes seconds, so the kill lands mid-file (and no upload is refused as over the limit).
        await fleet.add_node(
            "node-0", agent_args=["--peer-max-upload-rate", "2MiB/s", "--peer-max-uploads", "64"]
        )
        await fleet.add_cache("m", uri, "100Mi")
        await fleet.wait_downloaded("m", ["node-0"], timeout=120)
        hf_hub.reset_counts()
        await fleet.add_node("node-1", agent_args=["--concurrency", "2"])

        # Past two connections' worth of chunks in flight: at least one chunk is whole at node-1.
        async def some_bytes() -> bool:
            p = await fleet.progress("node-1", "m")
            return p is not None and p.bytes_done >= 3 * MiB

        await eventually(some_bytes, timeout=60, what="3 MiB at node-1")
        assert hf_hub.bytes_sent[f"org/fleet/{BIG}"] == 0, "node-1 asked the origin while node-0 served"
        await fleet.kill("node-0")
        assert not fleet.agents["node-1"].copy(uri).exists(), "node-1 finished before the kill"
        await fleet.wait_downloaded("m", ["node-1"], timeout=120)
        assert identical(fleet.agents["node-1"].copy(uri), files) == []
        # The chunks node-0 gave were kept; the origin sent the rest of the file, not all of it.
        assert 0 < hf_hub.bytes_sent[f"org/fleet/{BIG}"] < size
        progress = await fleet.progress("node-1", "m")
        assert progress is not None and (progress.bytes_from_peers or 0) > 0
        assert fleet.agents["node-0"].peer in {d.address for d in progress.peers_dropped}


@pytest.mark.usefixtures("peer_fill")
async def test_peer_fill_a_node_with_another_token_is_refused_and_fills_from_the_origin(
    hf_hub: Hub, kube_api: KubeAPI, tmp_path: Path
) -> None:
    files = model_files(tmp_path / "source")
    hf_hub.add_repo("org/fleet", dict(files))
    uri = "hf://org/fleet"
    other = "f" * 64
    async with Fleet(tmp_path / "fleet", kube_api, peer_settings()) as fleet:
        await fleet.start(["node-0"])
        await fleet.add_cache("m", uri, "100Mi")
        await fleet.wait_downloaded("m", timeout=120)
        hf_hub.reset_counts()
        await fleet.add_node("node-1", token=other)
        await fleet.wait_downloaded("m", ["node-1"], timeout=120)
        assert identical(fleet.agents["node-1"].copy(uri), files) == []
        # Refused by node-0: every byte came from the origin, once.
        sizes = Counter({f"org/fleet/{name}": p.stat().st_size for name, p in files.items()})
        assert hf_hub.bytes_sent == sizes
        progress = await fleet.progress("node-1", "m")
        assert progress is not None
        peer = fleet.agents["node-0"].peer
        assert peer in {d.address for d in progress.peers_dropped}, progress.peers_dropped
        # node-0 answers a wrong token 401 and shows nothing; its own token gets its holding.
        path = holding_path(storage_key(uri))
        url = f"http://{peer}{path}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(url, headers=bearer(other)) as r:
                body = await r.text()
                assert r.status == 401
                assert BIG not in body and "tokenizer" not in body
            async with http.get(url) as r:
                assert r.status == 401
            async with http.get(url, headers=bearer(fleet.token)) as r:
                assert r.status == 200
                assert Holding.from_json(await r.json()).published is True
        logs = fleet.tails(chars=1 << 30)
        assert fleet.token not in logs and other not in logs
