"""Peer fill against what the attack on issue 18 found: a peer's answers that are not JSON, nested
past the parser's recursion limit, or hold numbers past int()'s digit limit (each: that peer dropped,
named, the model still published from the origin); the untrusted numbers of any HTTP answer (a
Content-Range, a Content-Length, a Retry-After) read without int()'s ValueError."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
from aiohttp import web

from agent.download.http_status import decimal, retry_after_seconds
from agent.download.peers import (
    RELAYED_NOTE,
    Peer,
    PeerSettings,
    PeerSource,
    blame_words,
    dropped_for_bad_bytes,
)
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import PullResult, TransferSettings
from localmodel.layout import storage_key
from localmodel.manifest import Manifest
from localmodel.peering import Holding, manifest_digest
from localmodel.uri import parse_uri
from tests.support.gcs import FilesGcs
from tests.support.hfhub import Hub
from tests.support.peer import TestPeer, running

MiB = 1 << 20
TOKEN = "cluster-token"
WEIGHTS = os.urandom(2 * MiB + 5)
CONFIG = b'{"a": 1}'


def settings() -> PeerSettings:
    return PeerSettings(
        token=lambda: TOKEN,
        connect_timeout=2.0,
        read_timeout=5.0,
        low_speed_limit=1024,
        low_speed_time=1.0,
        wait_for_fetching=0.3,
        poll_interval=0.05,
    )


async def fetch(uri: str, dest: Path, peers: list[TestPeer], **kw: Any) -> PullResult:
    source = PeerSource(tuple(Peer(p.address) for p in peers), settings(), **kw)
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(chunk_size=MiB, backoff_initial=0.01, backoff_max=0.05, attempts=2),
        peers=source,
    )


def model(hub: Hub) -> tuple[str, str]:
    return "hf://org/m", hub.add_repo("org/m", {"config.json": CONFIG, "w.bin": WEIGHTS})


def same_model(dest: Path) -> bool:
    return (dest / "w.bin").read_bytes() == WEIGHTS and (dest / "config.json").read_bytes() == CONFIG


class RawHoldingPeer(TestPeer):
    """Answers its holding with ``raw`` (any text, as a hostile peer may)."""

    raw: str = ""

    async def _holding(self, request: web.Request) -> web.Response:
        return web.Response(text=self.raw, content_type="application/json")


class HeaderPeer(TestPeer):
    """Serves bytes as a good peer, with ``headers`` set on every file answer over its own."""

    extra: dict[str, str] = {}  # replaced per test, never mutated

    async def _send(
        self, request: web.Request, data: bytes, start: int, end: int, *, ranged: bool
    ) -> web.StreamResponse:
        body = data[start : end + 1]
        headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}", **self.extra}
        self.sent += len(body)
        return web.Response(status=206, body=body, headers=headers)


# -- a peer's JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("[" * 200_000, "bad bytes: malformed holding: not JSON: nested too deeply"),
        ('{"storageKey":' + '{"a":' * 100_000, "bad bytes: malformed holding: not JSON: nested too deeply"),
        (
            '{"storageKey":"k","revision":null,"chunkSize":' + "9" * 5000 + "}",
            "bad bytes: malformed holding: not JSON: a number thousands",
        ),
        ("{not json", "bad bytes: malformed holding: not JSON"),
        ("[]", "bad bytes: malformed holding: "),
    ],
)
async def test_a_holding_that_cannot_be_parsed_drops_that_peer_not_the_model(
    hf_hub: Hub, tmp_path: Path, raw: str, words: str
) -> None:
    """Regression: ``"[" * 200000`` raised RecursionError out of json.loads and failed the whole
    download ("download failed unexpectedly"), the peer not named."""
    uri, rev = model(hf_hub)
    bad = RawHoldingPeer(storage_key(uri), rev, MiB)
    bad.raw = raw
    bad.hold("w.bin", WEIGHTS)
    async with running(bad):
        result = await fetch(uri, tmp_path / "m", [bad])
    assert same_model(tmp_path / "m") and result.verified
    ((dropped),) = result.peers_dropped
    assert dropped.address == bad.address
    assert dropped.reason.startswith(words), dropped.reason
    assert len(dropped.reason) < 400 and result.bytes_from_peers == 0


def test_holding_numbers_past_any_file_are_malformed() -> None:
    base: dict[str, Any] = {
        "storageKey": "k",
        "revision": None,
        "chunkSize": 1 << 20,
        "published": True,
        "files": {},
    }
    for field, bad in (
        ("chunkSize", 1 << 63),
        ("files", {"a": {"size": 1 << 63, "complete": True}}),
        ("files", {"a": {"size": 5, "complete": False, "chunks": [1 << 64]}}),
    ):
        with pytest.raises(ValueError, match="expected"):
            Holding.from_json({**base, field: bad})
    assert Holding.from_json({**base, "chunkSize": (1 << 63) - 1}).chunk_size == (1 << 63) - 1


# -- an answer's numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Content-Range", "bytes 0-" + "9" * 5000 + "/" + "9" * 5000),
        ("Content-Range", "bytes \u0660-1048575/2097157"),  # an Arabic-Indic zero: a digit to \d
    ],
)
async def test_a_content_range_past_int_s_digit_limit_drops_the_peer_as_lying(
    hf_hub: Hub, tmp_path: Path, header: str, value: str
) -> None:
    """Regression: int() of a 5,000-digit Content-Range raised ValueError in the client's worker
    thread, and the whole download failed."""
    uri, rev = model(hf_hub)
    peer = HeaderPeer(storage_key(uri), rev, MiB)
    peer.extra = {header: value}
    peer.hold("w.bin", WEIGHTS)
    async with running(peer):
        result = await fetch(uri, tmp_path / "m", [peer])
    assert same_model(tmp_path / "m")
    ((dropped),) = result.peers_dropped
    assert dropped.address == peer.address and dropped_for_bad_bytes(dropped.reason), dropped.reason
    assert "Content-Range" in dropped.reason and result.bytes_from_peers == 0


def test_untrusted_decimals_are_read_without_int_s_digit_limit() -> None:
    assert decimal("1048576") == 1048576
    assert decimal(" 007 ") == 7
    assert decimal("0" * 5000 + "12") == 12  # leading zeros are not significant
    for bad in ("9" * 5000, "9" * 19, "-1", "1.5", "", "\u0661\u0662", "1e3", "+1", None):
        assert decimal(bad) is None, bad


def test_retry_after_is_delay_seconds_or_absent() -> None:
    assert retry_after_seconds("3") == 3.0
    # Negative, not-a-number, infinite, huge: read as absent (a peer's nan once made it wait
    # forever: nan compares false with every deadline).
    for bad in ("-5", "nan", "inf", "9" * 5000, "1e400", "Wed, 21 Oct 2015 07:28:00 GMT", None):
        assert retry_after_seconds(bad) is None, bad


# -- a hash a peer can forge bytes for ------------------------------------------------------------


def crc32c(data: bytes) -> int:
    return int.from_bytes(google_crc32c.Checksum(data).digest(), "big")


def forge_same_crc32c(data: bytes, *, at: int) -> bytes:
    """``data`` with its first 64 bytes replaced, and 32 bits from offset ``at`` flipped so that its
    CRC32C is unchanged, as the attacker did: CRC is linear over GF(2), so the 32 one-bit flips'
    effects on it span the space, and a 32x32 system gives which to flip."""
    target = crc32c(data)
    forged = bytearray(data)
    forged[:64] = b"PWNED-BY-A-HOSTILE-PEER!".ljust(64, b"!")
    base = crc32c(bytes(forged))
    basis: list[tuple[int, int]] = []  # (effect on the CRC, the flips giving it), reduced
    for bit in range(32):
        probe = bytearray(forged)
        probe[at + bit // 8] ^= 1 << (bit % 8)
        vec, combo = crc32c(bytes(probe)) ^ base, 1 << bit
        for bv, bc in basis:
            if vec ^ bv < vec:
                vec, combo = vec ^ bv, combo ^ bc
        if vec:
            basis.append((vec, combo))
            basis.sort(reverse=True)
    want, flips = base ^ target, 0
    for bv, bc in basis:
        if want ^ bv < want:
            want, flips = want ^ bv, flips ^ bc
    assert want == 0
    for bit in range(32):
        if flips >> bit & 1:
            forged[at + bit // 8] ^= 1 << (bit % 8)
    assert crc32c(bytes(forged)) == target and bytes(forged) != data
    return bytes(forged)


async def gcs_seed(gcs: FilesGcs, tmp_path: Path) -> tuple[str, bytes, Manifest]:
    """A gs:// model (listed with a CRC32C alone) and the manifest of a first node that fetched it
    from the origin with peer fill on."""
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    gcs.bucket(bucket)
    data = os.urandom(3 * MiB + 7)
    gcs.put(bucket, "m/w.bin", data)
    uri = f"gs://{bucket}/m"
    await fetch(uri, tmp_path / "first", [])
    manifest = Destination.for_folder(tmp_path / "first").published()
    assert manifest is not None
    return uri, data, manifest


def gcs_media_gets(gcs: FilesGcs) -> int:
    return sum(1 for r in gcs.server.requests if r.method == "GET" and "alt=media" in r.path)


async def test_a_file_with_only_a_crc32c_never_takes_a_peer_s_bytes_on_that_crc(
    gcs: FilesGcs, tmp_path: Path
) -> None:
    """Regression: a hostile peer got bytes with the origin's CRC32C published for a gs:// model.
    Without the controller's manifest digest, a CRC32C-only file comes from the origin alone."""
    uri, data, manifest = await gcs_seed(gcs, tmp_path)
    (entry,) = manifest.files
    assert entry.crc32c and entry.md5 is None  # gs:// lists a CRC32C alone here
    forged = forge_same_crc32c(data, at=100)
    evil = TestPeer(manifest.storage_key, manifest.revision, MiB)
    evil.hold("w.bin", forged)
    async with running(evil):
        result = await fetch(uri, tmp_path / "second", [evil])
    assert (tmp_path / "second" / "w.bin").read_bytes() == data
    assert evil.served("w.bin") == [] and result.bytes_from_peers == 0


async def test_a_crc32c_file_is_hashed_as_it_lands_and_comes_from_peers_by_the_manifest_sha256(
    gcs: FilesGcs, tmp_path: Path
) -> None:
    uri, data, manifest = await gcs_seed(gcs, tmp_path)
    (entry,) = manifest.files
    # Peer fill on: the first node records a sha256 of its own beside the origin's CRC32C.
    assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.crc32c
    good = TestPeer(manifest.storage_key, manifest.revision, MiB, manifest=manifest.to_json())
    good.hold("w.bin", data)
    before = gcs_media_gets(gcs)
    async with running(good):
        result = await fetch(uri, tmp_path / "second", [good], manifest_sha256=manifest_digest(manifest))
    assert (tmp_path / "second" / "w.bin").read_bytes() == data
    assert gcs_media_gets(gcs) == before and result.bytes_from_peers == len(data)
    assert result.hash_checked == {"sha256": 1}


async def test_forged_crc32c_bytes_fail_the_manifest_sha256_and_drop_the_peer(
    gcs: FilesGcs, tmp_path: Path
) -> None:
    uri, data, manifest = await gcs_seed(gcs, tmp_path)
    evil = TestPeer(manifest.storage_key, manifest.revision, MiB, manifest=manifest.to_json())
    evil.hold("w.bin", forge_same_crc32c(data, at=100))
    async with running(evil):
        result = await fetch(uri, tmp_path / "second", [evil], manifest_sha256=manifest_digest(manifest))
    assert (tmp_path / "second" / "w.bin").read_bytes() == data
    assert [(d.address, d.reason) for d in result.peers_dropped] == [
        (evil.address, "bad bytes: bytes failed w.bin's sha256")
    ]


def test_a_hash_failure_s_blame_says_the_bytes_may_have_been_relayed() -> None:
    """The node named served the bytes that failed; a fetching peer serves chunks it has not
    verified, so it may only have relayed another peer's: the words say so. Other drops stay."""
    failed = "bad bytes: bytes failed w.bin's sha256"
    assert blame_words(failed) == failed + RELAYED_NOTE and "relayed" in RELAYED_NOTE
    for other in ("bad bytes: its holding names chunks past the end of w.bin", "HTTP 500"):
        assert blame_words(other) == other
