"""Peer fill in the agent, receiving side: the peers its LocalModelNode's spec lists for a model (or
``--peers``) give the bytes; the status says where they came from, names the peers dropped and the
published manifest's digest; a peer that sent bad bytes is an Event naming its node; the flags'
bad input is one line (exit 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.cli import peer_fill
from agent.download.peers import RELAYED_NOTE, Peer, PeerSettings, parse_peers
from agent.download.staging import Destination
from agent.peerfill import peer_source
from localmodel.errors import DownloadError, InvalidInput
from localmodel.kinds import EVENT
from localmodel.layout import storage_key
from localmodel.peering import manifest_digest
from localmodel.resources import LocalModelInfo, ModelState, PeerRef
from tests.support.agents import Cluster, eventually, group_doc, node_doc, running_agent, seed
from tests.support.hfhub import Hub
from tests.support.peer import TestPeer

MiB = 1 << 20
TOKEN = "cluster-token"
URI = "hf://org/m"


def fill() -> PeerSettings:
    return PeerSettings(token=lambda: TOKEN, low_speed_limit=1024, low_speed_time=1.0, poll_interval=0.05)


def node_with_peers(cache: Path, peers: list[tuple[str, TestPeer]]) -> dict[str, Any]:
    doc = node_doc("n1", [("m", URI, "64Mi")])
    doc["spec"]["localModels"][0]["peers"] = [
        {"node": node, "address": p.address, "state": "ModelDownloaded"} for node, p in peers
    ]
    return doc


async def downloaded(run: Any) -> dict[str, Any] | None:
    st = await run.status()
    return st["models"]["m"] if (st.get("modelStatus") or {}).get("m") == "ModelDownloaded" else None


async def test_the_agent_takes_a_model_from_the_peers_its_spec_lists(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    weights, config = os.urandom(3 * MiB + 1), b"{}"
    rev = hf_hub.add_repo("org/m", {"config.json": config, "w.bin": weights})
    peer = TestPeer(storage_key(URI), rev, MiB)
    peer.hold("config.json", config)
    peer.hold("w.bin", weights)
    await peer.start()
    try:
        cache = tmp_path / "cache"
        await seed(cluster.store, group_doc("g", path=cache), node_with_peers(cache, [("n2", peer)]))
        async with running_agent(cluster.state, cache, store=cluster.store, peer_fill=fill()) as run:
            model = await eventually(lambda: downloaded(run), what="the model downloaded")
            published = Destination.for_folder(run.model_dir(URI)).published()
            total = len(weights) + len(config)
            assert (run.model_dir(URI) / "w.bin").read_bytes() == weights
            assert (model["bytesFromPeers"], model["bytesFromOrigin"]) == (total, 0)
            assert published is not None and model["manifestSha256"] == manifest_digest(published)
            assert "peersDropped" not in model
            assert run.metric("modelcache_download_bytes_total", {"source": "peer"}) == total
            assert run.metric("modelcache_download_bytes_total", {"source": "origin"}) == 0
        assert hf_hub.count("GET", "/resolve/") == 0
    finally:
        await peer.close()


async def test_a_peer_with_bad_bytes_is_dropped_named_in_the_status_and_an_event(
    cluster: Cluster, hf_hub: Hub, tmp_path: Path
) -> None:
    weights = os.urandom(2 * MiB)
    rev = hf_hub.add_repo("org/m", {"w.bin": weights})
    bad = TestPeer(storage_key(URI), rev, MiB, mode="tamper")
    bad.hold("w.bin", weights)
    await bad.start()
    try:
        cache = tmp_path / "cache"
        await seed(cluster.store, group_doc("g", path=cache), node_with_peers(cache, [("n2", bad)]))
        async with running_agent(cluster.state, cache, store=cluster.store, peer_fill=fill()) as run:
            model = await eventually(lambda: downloaded(run), what="the model downloaded")
            assert (run.model_dir(URI) / "w.bin").read_bytes() == weights
            reason = "bad bytes: bytes failed w.bin's sha256"
            assert model["peersDropped"] == [{"address": bad.address, "reason": reason}]
            assert model["bytesFromOrigin"] == len(weights)
            assert run.metric("modelcache_peers_dropped_total", {"kind": "bad_bytes"}) == 1

            async def event() -> list[str]:
                return [
                    e["message"]
                    for e in (await cluster.store.list(EVENT)).items
                    if e["reason"] == "PeerDropped"
                ]

            messages = await eventually(event, what="a PeerDropped Event")
            # The node named served the bytes; the message says it may only have relayed them.
            assert messages == [f"m: peer node n2 ({bad.address}) dropped: {reason}{RELAYED_NOTE}"]
    finally:
        await bad.close()


async def test_standalone_peers_are_asked_without_a_spec_list(hf_hub: Hub, tmp_path: Path) -> None:
    from localmodel.state.memory import MemoryState

    weights = os.urandom(MiB + 7)
    rev = hf_hub.add_repo("org/m", {"w.bin": weights})
    peer = TestPeer(storage_key(URI), rev, MiB)
    peer.hold("w.bin", weights)
    await peer.start()
    try:
        store = MemoryState()
        cache = tmp_path / "cache"
        await seed(store, group_doc("g", path=cache), node_doc("n1", [("m", URI, "64Mi")]))
        peers = (Peer(peer.address),)
        async with running_agent(store, cache, store=store, peer_fill=fill(), peers=peers) as run:
            model = await eventually(lambda: downloaded(run), what="the model downloaded")
            assert model["bytesFromPeers"] == len(weights) and model["bytesFromOrigin"] == 0
    finally:
        await peer.close()


# -- the flags ------------------------------------------------------------------------------


def test_peers_flag_is_checked_in_one_line() -> None:
    assert parse_peers(" 10.0.0.7:7071, node-b:7071,,10.0.0.7:7071") == (
        Peer("10.0.0.7:7071"),
        Peer("node-b:7071"),
    )
    with pytest.raises(InvalidInput, match=r"^--peers: 'node-b' is not HOST:PORT"):
        parse_peers("node-b")
    with pytest.raises(InvalidInput, match=r"^--peers: ':7071' has no host"):
        parse_peers(":7071")
    with pytest.raises(InvalidInput, match=r"^--peers: '127.0.0.1:99999' is not HOST:PORT with a port 1-"):
        parse_peers("127.0.0.1:99999")
    for wildcard in ("0.0.0.0:8081", "[::]:8081"):
        with pytest.raises(InvalidInput, match=r"is a wildcard address \(one to listen on, not to reach\)"):
            parse_peers(wildcard)
    with pytest.raises(InvalidInput, match=r"^--peers: ' , ,' names no peer"):
        parse_peers(" , ,")
    assert parse_peers("") == ()
    with pytest.raises(InvalidInput, match=r"^--peers needs --peer-token-file"):
        peer_fill(None, "10.0.0.7:7071")
    assert peer_fill(None, "") is None


def test_the_token_file_is_read_again_when_replaced_and_bad_ones_are_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    with pytest.raises(InvalidInput, match=r"^--peer-token-file: cannot read .*token: No such file"):
        peer_fill(token, "")
    token.write_text("\n")
    with pytest.raises(InvalidInput, match=r"^--peer-token-file: .*token is empty"):
        peer_fill(token, "")
    # In a cluster the Secret may come later: no exit, and no token sent until it holds one.
    waiting = peer_fill(token, "", standalone=False)
    assert waiting is not None
    with pytest.raises(DownloadError, match=r"^no peer token yet"):
        waiting.token()
    token.write_text("first\n")
    settings = peer_fill(token, "a:1")
    assert settings is not None and settings.token() == "first"
    # kubelet's rotation: a new file swapped in under the same name.
    (tmp_path / "new").write_text("second")
    os.replace(tmp_path / "new", token)
    assert settings.token() == "second"
    assert waiting.token() == "second"


def test_the_controllers_peer_states_reach_the_download() -> None:
    # A seed listed ModelDownloading must reach the planner as such: it is waited for from the
    # start, before its holding shows a byte (agent.download.peers.plan_file).
    info = LocalModelInfo(
        source_model_uri=URI,
        model_name="m",
        peers=(
            PeerRef("n2", "10.0.0.2:7071", ModelState.DOWNLOADED),
            PeerRef("n3", "10.0.0.3:7071", ModelState.DOWNLOADING),
        ),
    )
    source = peer_source(PeerSettings(token=lambda: "t"), (Peer("10.9.9.9:7071"),), info, lambda d: None)
    assert source is not None
    assert source.peers == (
        Peer("10.0.0.2:7071", "n2", ModelState.DOWNLOADED),
        Peer("10.0.0.3:7071", "n3", ModelState.DOWNLOADING),
    )
