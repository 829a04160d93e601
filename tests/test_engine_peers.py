"""Peer fill, receiving side: the engine takes chunks from peers that speak the protocol
(tests/support/peer.py) and the rest from the origin (the local hub, S3, plain HTTP); a peer that
fails, lies or sends bad bytes is dropped with a reason and its chunks come from elsewhere; nothing
unchecked is published. The planner's rules are checked apart, pure."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from agent.download.peers import (
    ChunkPlan,
    FileNeed,
    Peer,
    PeerSettings,
    PeerSource,
    PeerView,
    dropped_for_bad_bytes,
    plan_file,
)
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import PullResult, TransferSettings
from localmodel.layout import storage_key
from localmodel.manifest import Manifest
from localmodel.peering import FileHolding, Holding, manifest_digest
from localmodel.uri import parse_uri
from tests.support.hfhub import Hub
from tests.support.httpfiles import HttpFiles
from tests.support.peer import TestPeer, running
from tests.support.s3files import S3Files

MiB = 1 << 20
TOKEN = "cluster-token"
WEIGHTS = os.urandom(4 * MiB + 5)  # five chunks of 1 MiB, the last one 5 bytes
CONFIG = b'{"a": 1}'  # small: the hub lists its git blob sha1, no sha256


def peer_settings(**kw: float) -> PeerSettings:
    options = {
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "low_speed_limit": 1024,
        "low_speed_time": 1.0,
        "wait_for_fetching": 0.3,
        "poll_interval": 0.05,
        **kw,
    }
    return PeerSettings(token=lambda: TOKEN, **options)  # type: ignore[arg-type]


async def fetch(
    uri: str,
    dest: Path,
    peers: list[TestPeer],
    *,
    sources: SourceSettings | None = None,
    manifest_sha256: str | None = None,
    **kw: float,
) -> PullResult:
    source = PeerSource(
        tuple(Peer(p.address, f"node-{i}") for i, p in enumerate(peers)),
        peer_settings(**kw),
        manifest_sha256,
    )
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=sources or SourceSettings.from_env(),
        transfer=TransferSettings(chunk_size=MiB, backoff_initial=0.01, backoff_max=0.05, attempts=2),
        peers=source,
    )


def hf_model(hub: Hub, **files: bytes) -> tuple[str, str]:
    """(uri, revision) of a repo holding the model's files."""
    contents = files or {"config.json": CONFIG, "w.bin": WEIGHTS}
    return "hf://org/m", hub.add_repo("org/m", contents)


def full_peer(revision: str, *, key: str = "hf://org/m", **kw: object) -> TestPeer:
    peer = TestPeer(storage_key(key), revision, MiB, **kw)  # type: ignore[arg-type]
    peer.hold("config.json", CONFIG)
    peer.hold("w.bin", WEIGHTS)
    return peer


def origin_gets(hub: Hub, path: str) -> list[str | None]:
    return [
        r.range for r in hub.requests if r.method == "GET" and r.path.endswith(f"/resolve/{_rev(hub)}/{path}")
    ]


def _rev(hub: Hub) -> str:
    return hub.repos["org/m"].refs["main"]


def same_model(dest: Path) -> bool:
    return (dest / "w.bin").read_bytes() == WEIGHTS and (dest / "config.json").read_bytes() == CONFIG


def chunk_range(i: int) -> str:
    return f"bytes={i * MiB}-{min((i + 1) * MiB, len(WEIGHTS)) - 1}"


# -- the engine with good peers ----------------------------------------------------------------


async def test_every_byte_comes_from_peers_that_hold_the_model_spread_over_them(
    hf_hub: Hub, tmp_path: Path
) -> None:
    uri, rev = hf_model(hf_hub)
    near, far = full_peer(rev), full_peer(rev)
    async with running(near, far):
        result = await fetch(uri, tmp_path / "m", [near, far])
    assert same_model(tmp_path / "m")
    assert origin_gets(hf_hub, "w.bin") == [] and origin_gets(hf_hub, "config.json") == []
    assert (result.bytes_from_peers, result.bytes_from_origin) == (len(WEIGHTS) + len(CONFIG), 0)
    assert result.peers_dropped == () and result.verified
    # Five chunks over two peers, round-robin from the nearest; config.json (planned next) to the
    # one with fewer in flight.
    assert sorted(near.served("w.bin")) == sorted(chunk_range(i) for i in (0, 2, 4))
    assert sorted(far.served("w.bin")) == sorted(chunk_range(i) for i in (1, 3))
    assert far.served("config.json") == [f"bytes=0-{len(CONFIG) - 1}"] and near.served("config.json") == []


async def test_a_peer_with_some_chunks_gives_those_and_the_origin_the_rest(
    hf_hub: Hub, tmp_path: Path
) -> None:
    uri, rev = hf_model(hf_hub)
    peer = TestPeer(storage_key(uri), rev, MiB, published=False)
    peer.hold("w.bin", WEIGHTS, chunks={0, 2})
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer], wait_for_fetching=0.2)
    assert same_model(tmp_path / "m")
    assert sorted(peer.served("w.bin")) == [chunk_range(0), chunk_range(2)]
    assert sorted(r or "" for r in origin_gets(hf_hub, "w.bin")) == sorted(chunk_range(i) for i in (1, 3, 4))
    assert len(origin_gets(hf_hub, "config.json")) == 1
    assert result.bytes_from_peers == 2 * MiB
    assert result.bytes_from_origin == len(WEIGHTS) + len(CONFIG) - 2 * MiB
    assert result.peers_dropped == ()


async def test_chunks_stream_from_a_peer_that_is_still_fetching(hf_hub: Hub, tmp_path: Path) -> None:
    uri, rev = hf_model(hf_hub)
    peer = TestPeer(storage_key(uri), rev, MiB, published=False)
    peer.hold("w.bin", WEIGHTS, chunks={0})

    async def lands() -> None:
        for i in range(1, 5):
            await asyncio.sleep(0.2)
            peer.hold("w.bin", WEIGHTS, chunks={*range(i + 1)})
        peer.hold("config.json", CONFIG)

    async with running(peer):
        landing = asyncio.ensure_future(lands())
        result = await fetch(uri, tmp_path / "m", [peer], wait_for_fetching=30.0)
        await landing
    assert same_model(tmp_path / "m")
    assert origin_gets(hf_hub, "w.bin") == [] and origin_gets(hf_hub, "config.json") == []
    assert result.bytes_from_peers == len(WEIGHTS) + len(CONFIG) and result.bytes_from_origin == 0


async def test_a_busy_peer_is_waited_for_not_dropped(hf_hub: Hub, tmp_path: Path) -> None:
    uri, rev = hf_model(hf_hub)
    peer = full_peer(rev, mode="busy", busy_left=2)
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer])
    assert same_model(tmp_path / "m") and result.peers_dropped == ()
    assert origin_gets(hf_hub, "w.bin") == [] and result.bytes_from_origin == 0


async def test_a_peer_of_another_revision_is_not_used_nor_dropped(hf_hub: Hub, tmp_path: Path) -> None:
    uri, _ = hf_model(hf_hub)
    peer = full_peer("0" * 40)
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer])
    assert same_model(tmp_path / "m") and result.peers_dropped == ()
    assert peer.requests == [] and result.bytes_from_peers == 0


# -- hostile and broken peers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "words", "bad_bytes"),
    [
        ("tamper", "bad bytes: bytes failed ", True),
        ("lie_size", "bad bytes: its holding says config.json has 9 bytes; the origin lists 8", True),
        ("lie_total", "bad bytes: ", True),
        ("wrong_range", "bad bytes: w.bin: the server answered bytes=", True),
        ("trickle", "w.bin: ", False),
        ("error500", "HTTP 500", False),
        ("die", "w.bin: ", False),
        ("missing", "which it answers 404 for", False),
        ("redirect", "HTTP 302", False),
    ],
)
async def test_a_hostile_peer_is_dropped_named_and_its_chunks_come_from_the_origin(
    hf_hub: Hub, tmp_path: Path, mode: str, words: str, bad_bytes: bool
) -> None:
    uri, rev = hf_model(hf_hub)
    peer = full_peer(rev, mode=mode)
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer])
    assert same_model(tmp_path / "m") and result.verified
    ((dropped),) = result.peers_dropped
    assert dropped.address == peer.address
    assert words in dropped.reason, dropped.reason
    assert dropped_for_bad_bytes(dropped.reason) is bad_bytes
    assert TOKEN not in dropped.reason
    # What the peer did not give whole came from the origin.
    assert result.bytes_from_origin >= len(WEIGHTS) + len(CONFIG) - result.bytes_from_peers


async def test_a_peer_that_refuses_our_token_is_dropped_before_any_byte(hf_hub: Hub, tmp_path: Path) -> None:
    uri, rev = hf_model(hf_hub)
    peer = full_peer(rev, token="another-token")
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer])
    assert same_model(tmp_path / "m")
    ((dropped),) = result.peers_dropped
    assert dropped.reason == (
        "access denied (HTTP 401); check the credentials (the cluster token was refused)"
    )
    assert peer.requests == [] and peer.unauthorized == 1 and result.bytes_from_peers == 0


async def test_bad_bytes_drop_every_peer_that_gave_chunks_of_the_file(hf_hub: Hub, tmp_path: Path) -> None:
    uri, rev = hf_model(hf_hub, **{"w.bin": WEIGHTS})
    good = TestPeer(storage_key(uri), rev, MiB)
    good.hold("w.bin", WEIGHTS)
    bad = TestPeer(storage_key(uri), rev, MiB, mode="tamper")
    bad.hold("w.bin", WEIGHTS)
    async with running(good, bad):
        result = await fetch(uri, tmp_path / "m", [good, bad])
    assert (tmp_path / "m" / "w.bin").read_bytes() == WEIGHTS
    reasons = {d.address: d.reason for d in result.peers_dropped}
    assert reasons == {a: "bad bytes: bytes failed w.bin's sha256" for a in (good.address, bad.address)}
    # Fetched again from the origin alone, all of it.
    assert sorted(r or "" for r in origin_gets(hf_hub, "w.bin")) == sorted(chunk_range(i) for i in range(5))


async def test_an_unreachable_peer_is_dropped(hf_hub: Hub, tmp_path: Path) -> None:
    uri, rev = hf_model(hf_hub)
    gone = full_peer(rev)
    await gone.start()
    await gone.close()  # its port now refuses connections
    result = await fetch(uri, tmp_path / "m", [gone])
    assert same_model(tmp_path / "m")
    ((dropped),) = result.peers_dropped
    assert dropped.address == gone.address and not dropped_for_bad_bytes(dropped.reason)


# -- files the origin gives no hash for ------------------------------------------------------


async def seed_and_peer(
    uri: str, tmp_path: Path, sources: SourceSettings | None = None
) -> tuple[TestPeer, Manifest]:
    """The first node: from the origin alone with peer fill on; a test peer serving what it got."""
    first = tmp_path / "first"
    await fetch(uri, first, [], sources=sources)
    manifest = Destination.for_folder(first).published()
    assert manifest is not None
    peer = TestPeer(manifest.storage_key, manifest.revision, MiB, manifest=manifest.to_json())
    for entry in manifest.files:
        peer.hold(entry.path, (first / entry.path).read_bytes())
    return peer, manifest


async def test_a_file_without_an_origin_hash_comes_from_a_peer_whose_manifest_matches(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    plain_http.add("/m.bin", data)
    uri = f"{plain_http.url}/m.bin"
    peer, manifest = await seed_and_peer(uri, tmp_path)
    assert manifest.files[0].sha256 == hashlib.sha256(data).hexdigest()
    before = len(plain_http.gets("/m.bin"))
    async with running(peer):
        result = await fetch(uri, tmp_path / "second", [peer], manifest_sha256=manifest_digest(manifest))
    assert (tmp_path / "second" / "m.bin").read_bytes() == data
    assert len(plain_http.gets("/m.bin")) == before  # not a byte from the origin
    assert result.bytes_from_peers == len(data) and result.hash_checked == {"sha256": 1}


async def test_a_peer_whose_manifest_is_not_the_vouched_one_is_dropped(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    plain_http.add("/m.bin", data)
    uri = f"{plain_http.url}/m.bin"
    peer, manifest = await seed_and_peer(uri, tmp_path)
    assert peer.manifest is not None
    peer.manifest["files"][0]["sha256"] = "0" * 64  # it lies about the hash
    async with running(peer):
        result = await fetch(uri, tmp_path / "second", [peer], manifest_sha256=manifest_digest(manifest))
    assert (tmp_path / "second" / "m.bin").read_bytes() == data
    assert [(d.address, d.reason) for d in result.peers_dropped] == [
        (peer.address, "bad bytes: its manifest is not the one the controller vouched for")
    ]
    assert peer.served("m.bin") == [] and result.bytes_from_peers == 0


async def test_without_a_manifest_digest_a_file_without_hash_comes_from_the_origin(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    plain_http.add("/m.bin", os.urandom(MiB + 1))
    uri = f"{plain_http.url}/m.bin"
    peer, _ = await seed_and_peer(uri, tmp_path)
    async with running(peer):
        result = await fetch(uri, tmp_path / "second", [peer])
    assert peer.served("m.bin") == [] and result.bytes_from_peers == 0 and result.peers_dropped == ()


async def test_s3_origin_objects_with_and_without_checksums_come_from_peers(
    s3files: S3Files, tmp_path: Path
) -> None:
    bucket = s3files.bucket("models")
    big = os.urandom(17 * MiB)  # past the single-part limit: a multipart ETag, no hash of the content
    small = os.urandom(MiB + 3)
    s3files.put(bucket, "m/big.bin", big)
    s3files.put(bucket, "m/small.bin", small, sha256=True)
    uri = "s3://models/m"
    peer, manifest = await seed_and_peer(uri, tmp_path)
    # Peer fill on: the object without a checksum was hashed, so the next nodes can take it.
    assert {e.path: e.sha256 for e in manifest.files}["big.bin"] == hashlib.sha256(big).hexdigest()
    gets = len(s3files.gets("m/big.bin")) + len(s3files.gets("m/small.bin"))
    async with running(peer):
        result = await fetch(uri, tmp_path / "second", [peer], manifest_sha256=manifest_digest(manifest))
    assert (tmp_path / "second" / "big.bin").read_bytes() == big
    assert (tmp_path / "second" / "small.bin").read_bytes() == small
    assert len(s3files.gets("m/big.bin")) + len(s3files.gets("m/small.bin")) == gets
    assert result.bytes_from_peers == len(big) + len(small) and result.peers_dropped == ()


# -- the planner, pure -------------------------------------------------------------------------


def holding(
    *, published: bool = True, chunk_size: int = 4, revision: str = "r", **files: FileHolding
) -> Holding:
    return Holding("k", revision, chunk_size, published, files)


NEED = FileNeed("f", 16, ((0, 0, 4), (1, 4, 8), (2, 8, 12), (3, 12, 16)), peer_ok=True)


def plan(peers: list[PeerView], need: FileNeed = NEED, now: float = 100.0) -> ChunkPlan:
    return plan_file(need, peers, revision="r", chunk_size=4, now=now, wait_for_fetching=30.0)


def test_plan_spreads_chunks_round_robin_from_the_nearest() -> None:
    whole = holding(f=FileHolding(16, True))
    result = plan([PeerView("a", whole), PeerView("b", whole, in_flight=1), PeerView("c", whole)])
    assert dict(result.by_peer) == {0: "a", 1: "c", 2: "a", 3: "b"}
    assert result.origin == result.wait == frozenset()


def test_plan_sends_chunks_no_peer_holds_to_the_origin_unless_a_peer_is_fetching() -> None:
    some = holding(published=False, f=FileHolding(16, False, frozenset({1})))
    stale = plan([PeerView("a", some, grew_at=50.0)])
    assert dict(stale.by_peer) == {1: "a"} and stale.origin == {0, 2, 3} and stale.wait == frozenset()
    live = plan([PeerView("a", some, grew_at=90.0)])
    assert dict(live.by_peer) == {1: "a"} and live.wait == {0, 2, 3} and live.origin == frozenset()


def test_plan_waits_for_a_busy_holder() -> None:
    whole = holding(f=FileHolding(16, True))
    result = plan([PeerView("a", whole, busy_until=101.0)])
    assert result.wait == {0, 1, 2, 3} and not result.by_peer


def test_plan_takes_nothing_unchecked_nor_of_another_revision_size_or_chunk_size() -> None:
    whole = holding(f=FileHolding(16, True))
    assert plan([PeerView("a", whole)], FileNeed("f", 16, NEED.chunks, peer_ok=False)).origin == {0, 1, 2, 3}
    assert plan([PeerView("a", holding(revision="old", f=FileHolding(16, True)))]).origin == {0, 1, 2, 3}
    assert plan([PeerView("a", holding(f=FileHolding(17, True)))]).origin == {0, 1, 2, 3}
    # Another chunk size: its chunks mean other ranges; only a complete file is of use.
    partial = holding(chunk_size=8, published=False, f=FileHolding(16, False, frozenset({0})))
    assert plan([PeerView("a", partial)]).origin == {0, 1, 2, 3}
    assert dict(plan([PeerView("a", holding(chunk_size=8, f=FileHolding(16, True)))]).by_peer) == {
        i: "a" for i in range(4)
    }
