"""Peer fill, receiving side: the engine takes chunks from peers that speak the protocol
(tests/support/peer.py) and the rest from the origin (the local hub, S3, plain HTTP); a peer that
fails, lies or sends bad bytes is dropped with a reason and its chunks come from elsewhere; nothing
unchecked is published. The planner's rules are checked apart, pure."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
from pathlib import Path

import pytest

from agent.download.client import ClientSettings, HttpClient
from agent.download.engine import Transfer
from agent.download.listing import Listing
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
from agent.peer.holdings import Holdings
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import Manifest
from localmodel.peering import FileHolding, Holding, manifest_digest
from localmodel.resources import ModelState
from localmodel.uri import parse_uri
from tests.support.hfhub import Hub, Link
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
    dest: Path | Destination,
    peers: list[TestPeer],
    *,
    sources: SourceSettings | None = None,
    manifest_sha256: str | None = None,
    state: ModelState | None = None,
    transfer: TransferSettings | None = None,
    **kw: float,
) -> PullResult:
    """Pull ``uri`` with peer fill, the peers listed in ``state`` (the controller's PeerRef.state)."""
    source = PeerSource(
        tuple(Peer(p.address, f"node-{i}", state) for i, p in enumerate(peers)),
        peer_settings(**kw),
        manifest_sha256,
    )
    return await pull(
        parse_uri(uri),
        dest if isinstance(dest, Destination) else Destination.for_folder(dest),
        sources=sources or SourceSettings.from_env(),
        transfer=transfer
        or TransferSettings(chunk_size=MiB, backoff_initial=0.01, backoff_max=0.05, attempts=2),
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


async def landing(peer: TestPeer, *, every: float = 0.2) -> None:
    """The peer fetches the model: once its holding was asked, w.bin's chunks land one by one, then
    config.json."""
    for _ in range(200):
        if peer.holding_asked:
            break
        await asyncio.sleep(0.05)
    for i in range(5):
        await asyncio.sleep(every)
        peer.hold("w.bin", WEIGHTS, chunks={*range(i + 1)})
    peer.hold("config.json", CONFIG)


async def test_a_seed_first_seen_holding_zero_bytes_is_waited_for_not_bypassed(
    hf_hub: Hub, tmp_path: Path
) -> None:
    # A seed that has just begun: its holding names w.bin with no chunk yet (zero bytes), and the
    # controller's list gives no state (--peers). First seen is a sign of fetching: no growth was
    # seen yet, and before, every chunk went to the origin.
    uri, rev = hf_model(hf_hub)
    peer = TestPeer(storage_key(uri), rev, MiB, published=False)
    peer.hold("w.bin", WEIGHTS, chunks=set())
    async with running(peer):
        lands = asyncio.ensure_future(landing(peer))
        result = await fetch(uri, tmp_path / "m", [peer], wait_for_fetching=30.0)
        await lands
    assert same_model(tmp_path / "m") and result.peers_dropped == ()
    assert origin_gets(hf_hub, "w.bin") == [] and origin_gets(hf_hub, "config.json") == []
    assert result.bytes_from_peers == len(WEIGHTS) + len(CONFIG) and result.bytes_from_origin == 0


async def test_a_peer_listed_as_downloading_is_waited_for_before_it_holds_anything(
    hf_hub: Hub, tmp_path: Path
) -> None:
    # Listed ModelDownloading by the controller, its holding still 404 (no resume state yet).
    uri, rev = hf_model(hf_hub)
    peer = TestPeer(storage_key(uri), rev, MiB, published=False)
    async with running(peer):
        lands = asyncio.ensure_future(landing(peer))
        result = await fetch(
            uri, tmp_path / "m", [peer], state=ModelState.DOWNLOADING, wait_for_fetching=30.0
        )
        await lands
    assert same_model(tmp_path / "m") and result.peers_dropped == ()
    assert origin_gets(hf_hub, "w.bin") == [] and origin_gets(hf_hub, "config.json") == []
    assert result.bytes_from_peers == len(WEIGHTS) + len(CONFIG)


@pytest.mark.parametrize("holds", ["nothing", "zero bytes"])
async def test_a_fetching_peer_that_never_grows_is_waited_for_only_up_to_the_bound(
    hf_hub: Hub, tmp_path: Path, holds: str
) -> None:
    uri, rev = hf_model(hf_hub)
    peer = TestPeer(storage_key(uri), rev, MiB, published=False)
    if holds == "zero bytes":
        peer.hold("w.bin", WEIGHTS, chunks=set())
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer], state=ModelState.DOWNLOADING, wait_for_fetching=0.3)
    assert same_model(tmp_path / "m") and result.peers_dropped == ()
    assert result.bytes_from_origin == len(WEIGHTS) + len(CONFIG) and result.bytes_from_peers == 0


async def test_a_capped_peer_serving_our_other_requests_is_never_dropped_as_busy(
    hf_hub: Hub, tmp_path: Path
) -> None:
    # One upload at a time (its --peer-max-uploads), we ask up to four at once: the others are
    # answered 503 while it serves one of ours. Before, each 503 counted towards max_busy (here 1).
    uri, rev = hf_model(hf_hub)
    peer = full_peer(rev, mode="capped", max_uploads=1, upload_delay=0.1)
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer], max_busy=1, max_in_flight=4)
    assert same_model(tmp_path / "m") and result.peers_dropped == ()
    assert peer.refused > 0  # it was at its cap
    assert origin_gets(hf_hub, "w.bin") == [] and result.bytes_from_origin == 0


async def test_with_peer_fill_each_chunk_is_given_to_peers_as_it_lands_not_at_the_checkpoint(
    hf_hub: Hub, tmp_path: Path
) -> None:
    # The origin holds back w.bin from chunk 3 on; what landed before must be in the holding the
    # peer server gives (agent.peer.holdings) although the periodic checkpoint is an hour away.
    uri, rev = hf_model(hf_hub)
    held = hf_hub.repos["org/m"].commits[rev]["w.bin"]
    held.hold_from = 3 * MiB
    layout = CacheLayout(tmp_path / "cache")
    key = storage_key(uri)
    transfer = TransferSettings(chunk_size=MiB, checkpoint_interval=3600.0, attempts=2)
    pulling = asyncio.ensure_future(fetch(uri, Destination.in_cache(layout, key), [], transfer=transfer))
    holdings = Holdings(layout.root, chunk_size=MiB)
    try:
        seen = None
        for _ in range(200):  # 20 s at most
            await asyncio.sleep(0.1)
            view = await asyncio.to_thread(holdings.view, key)
            files = view.holding.files if view is not None else {}
            if "w.bin" in files and files["w.bin"].chunks == {0, 1, 2} and "config.json" in files:
                seen = files
                break
        assert seen is not None, "the chunks that landed were not given before the checkpoint"
        assert seen["config.json"].complete and not seen["w.bin"].complete
    finally:
        held.hold_from = None
    result = await pulling
    assert result.verified and (layout.model_dir(key) / "w.bin").read_bytes() == WEIGHTS


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


async def test_a_peer_not_listening_yet_is_asked_again_not_dropped(hf_hub: Hub, tmp_path: Path) -> None:
    """Agents that start together: a peer's port refuses connections for a moment. It is asked again
    at each poll (STARTING_GRACE) and, once it answers, gives what it holds; it is never dropped."""
    files = {f"w{i}.bin": os.urandom(MiB) for i in range(6)}
    uri, rev = hf_model(hf_hub, **files)
    hf_hub.link = Link(1 << 20)  # the origin at 1 MiB/s: 6 s for the whole model alone
    peer = TestPeer(storage_key(uri), rev, MiB)
    for name, data in files.items():
        peer.hold(name, data)
    with socket.socket() as s:  # a port nothing listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"

    async def late() -> None:
        await asyncio.sleep(1.0)
        await peer.start(port)

    starting = asyncio.ensure_future(late())
    try:
        result = await pull(
            parse_uri(uri),
            Destination.for_folder(tmp_path / "m"),
            sources=SourceSettings.from_env(),
            transfer=TransferSettings(chunk_size=MiB, concurrency=1, backoff_initial=0.01, backoff_max=0.05),
            peers=PeerSource((Peer(address, "node-1"),), peer_settings()),
        )
    finally:
        await starting
        await peer.close()
    assert all((tmp_path / "m" / n).read_bytes() == d for n, d in files.items())
    assert result.peers_dropped == ()
    assert result.bytes_from_peers >= MiB and result.bytes_from_origin < result.bytes_total


async def test_a_peer_that_has_not_got_the_rotated_token_yet_is_sent_the_previous_one(
    hf_hub: Hub, tmp_path: Path
) -> None:
    """Kubelets bring a rotated Secret to nodes minutes apart: this node reads the new token, the
    peer still accepts only the old one, which is sent to it (once refused), and no peer is dropped."""
    uri, rev = hf_model(hf_hub)
    peer = full_peer(rev, token="old-token")
    rotated = dataclasses.replace(
        peer_settings(), token=lambda: "new-token", previous_token=lambda: "old-token"
    )
    async with running(peer):
        source = PeerSource((Peer(peer.address, "node-0"),), rotated)  # its port is known once it runs
        result = await pull(
            parse_uri(uri),
            Destination.for_folder(tmp_path / "m"),
            sources=SourceSettings.from_env(),
            transfer=TransferSettings(chunk_size=MiB, backoff_initial=0.01, backoff_max=0.05, attempts=2),
            peers=source,
        )
    assert same_model(tmp_path / "m")
    assert result.peers_dropped == () and peer.unauthorized >= 1
    assert result.bytes_from_peers == result.bytes_total and result.bytes_from_origin == 0
    # Without a previous token in its grace window, the refusal drops the peer as before.
    neither = dataclasses.replace(peer_settings(), token=lambda: "new-token")
    async with running(peer):
        again = await pull(
            parse_uri(uri),
            Destination.for_folder(tmp_path / "n"),
            sources=SourceSettings.from_env(),
            transfer=TransferSettings(chunk_size=MiB, backoff_initial=0.01, backoff_max=0.05, attempts=2),
            peers=PeerSource((Peer(peer.address, "node-0"),), neither),
        )
    assert [d.address for d in again.peers_dropped] == [peer.address] and again.bytes_from_peers == 0


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
    # The peers' bytes of w.bin were thrown away: none of the published copy came from a peer, and
    # the origin's count is everything it sent (the other files and all of w.bin).
    assert (result.bytes_from_peers, result.bytes_from_origin) == (0, result.bytes_total)
    assert result.bytes_transferred == result.bytes_total + len(WEIGHTS)


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
    stale = plan([PeerView("a", some, active_at=50.0)])
    assert dict(stale.by_peer) == {1: "a"} and stale.origin == {0, 2, 3} and stale.wait == frozenset()
    live = plan([PeerView("a", some, active_at=90.0)])
    assert dict(live.by_peer) == {1: "a"} and live.wait == {0, 2, 3} and live.origin == frozenset()


def test_plan_waits_for_a_peer_that_showed_it_is_fetching_within_the_bound() -> None:
    # Listed as fetching (or first seen) at active_at, holding nothing yet or zero bytes.
    empty = holding(published=False, f=FileHolding(16, False, frozenset()))
    for held in (None, empty, holding(published=False)):
        assert plan([PeerView("a", held, active_at=95.0)]).wait == {0, 1, 2, 3}
        assert plan([PeerView("a", held, active_at=60.0)]).origin == {0, 1, 2, 3}
        assert plan([PeerView("a", held)]).origin == {0, 1, 2, 3}  # never showed it
    # A published holding, or one of another revision or size, is not fetching this file.
    for other in (
        holding(f=FileHolding(16, False, frozenset())),
        holding(published=False, revision="old"),
        holding(published=False, f=FileHolding(17, False, frozenset())),
    ):
        assert plan([PeerView("a", other, active_at=95.0)]).origin == {0, 1, 2, 3}


def test_plan_gives_a_full_peer_no_more_and_waits_rather_than_ask_the_origin() -> None:
    whole = holding(f=FileHolding(16, True))
    result = plan([PeerView("a", whole, in_flight=2, max_in_flight=2), PeerView("b", whole, max_in_flight=1)])
    assert dict(result.by_peer) == {0: "b"} and result.wait == {1, 2, 3} and result.origin == frozenset()
    # Room for two more: two chunks, the rest wait.
    result = plan([PeerView("a", whole, in_flight=1, max_in_flight=3)])
    assert dict(result.by_peer) == {0: "a", 1: "a"} and result.wait == {2, 3}


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


async def test_the_prompt_checkpoint_ends_when_cancelled_as_a_chunk_lands(tmp_path: Path) -> None:
    # The download's end cancels the checkpoint loop; its last chunk may have set "landed" in the
    # same step. asyncio.wait_for (before 3.12) returned the event's result and lost the cancel:
    # the loop ran on and the download never ended.
    listing = Listing("hf://org/m", "r", ())
    client = HttpClient(
        ClientSettings(concurrency=1, read_size=1 << 16, connect_timeout=1.0, read_timeout=1.0)
    )
    transfer = Transfer(
        listing,
        Destination.for_folder(tmp_path / "m"),
        uri="hf://org/m",
        storage_key=storage_key("hf://org/m"),
        client=client,
        settings=TransferSettings(checkpoint_interval=3600.0),
        peers=PeerSource((), peer_settings()),
    )
    try:
        loop = asyncio.ensure_future(transfer._checkpoint_loop())
        await asyncio.sleep(0.01)  # waiting for a chunk to land
        transfer.landed.set()
        loop.cancel()
        await asyncio.wait([loop], timeout=10)
        assert loop.cancelled(), "the checkpoint loop ran on after it was cancelled"
    finally:
        loop.cancel()  # again, should it have run on
        client.close()
