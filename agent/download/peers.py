"""Peer fill, receiving side: which peers a download may ask, how, and the pure rule that decides
which source serves each chunk of a file (:func:`plan_file`). Pure: no I/O; the engine's peer part
(:mod:`agent.download.peerfetch`) asks the peers and feeds what they answered back in here.

The listing always comes from the origin; a peer only ever gives bytes of a file the listing names,
at the listed size, and those bytes are checked exactly as the origin's are (the origin's hash, or
a sha256 from a peer's manifest whose digest the controller passed: :func:`hashes_from_manifest`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from localmodel.errors import InvalidInput
from localmodel.hosts import host_error, is_wildcard, port_number
from localmodel.manifest import HashCheck, Manifest
from localmodel.peering import Holding, manifest_digest
from localmodel.resources import DroppedPeer, ModelState

# The start of every reason a peer is dropped for bytes that are not what was asked (a hash that
# fails, a range or size that lies): the agent raises an Event (PeerDropped) for these.
BAD_BYTES = "bad bytes: "


# The hashes that let a peer's bytes in: no peer can make other bytes with the origin's sha256, git
# blob sha1 or md5 (a second preimage is out of reach for each; the collisions known for md5 and sha1
# need both files chosen, and the origin's is not the peer's to choose). A CRC32C is not among them:
# it is linear, so flipping 32 chosen bits anywhere gives any bytes the listed CRC (GCS lists only
# a CRC32C for composite objects, and gs:// checks by it): such a file comes from peers only with
# the sha256 of the controller's manifest (:func:`hashes_from_manifest`).
PEER_SAFE_HASHES = frozenset({"sha256", "sha1", "md5"})


def peer_safe(check: HashCheck | None) -> bool:
    """True when a file checked by ``check`` may take bytes from peers (:data:`PEER_SAFE_HASHES`)."""
    return check is not None and check.name in PEER_SAFE_HASHES


@dataclass(frozen=True)
class Peer:
    """One node agent to ask: its peer server ``address`` ("host:port"), node name and its state
    for the model (the controller's ``PeerRef.state``), if known. A peer listed as
    ModelDownloading is fetching the model: chunks it lacks wait for it (:func:`plan_file`)."""

    address: str
    node: str | None = None
    state: ModelState | None = None


@dataclass(frozen=True)
class PeerSettings:
    """How peers are asked, built at the entry point. ``token``: returns the cluster token now (read
    from the mounted Secret; called per request, so a rotated Secret is picked up). Timeouts and the
    low-speed bound (bytes/s over seconds, curl's --speed-limit/--speed-time) are per request: a peer
    is in the cluster, so they are tighter than the origin's, and a peer that misses one is dropped.
    ``wait_for_fetching``: seconds a chunk no peer holds waits for a peer that is fetching the model
    (listed as ModelDownloading, first seen holding this revision, or its holding grew, within that
    time) before the origin is asked; ``poll_interval``: seconds between two askings of a fetching
    peer's holding. ``max_in_flight``: requests of one download to one peer at once, below the peer
    server's default ``--peer-max-uploads`` (8) so that a peer is rarely answered busy; lowered for a
    peer that answers 503 while serving others of ours. ``max_busy``: 503 answers in a row from a
    peer serving nothing of ours before it is dropped."""

    token: Callable[[], str]
    # The token before a rotation, while still accepted (agent.peer.token.TokenFile.previous): sent
    # once more to a peer that refuses the current one (its node has not got the new Secret yet).
    previous_token: Callable[[], str | None] = lambda: None
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    low_speed_limit: int = 256 << 10
    low_speed_time: float = 10.0
    wait_for_fetching: float = 30.0
    poll_interval: float = 0.5
    max_holding_bytes: int = 16 << 20  # a holding or manifest answer longer than this is malformed
    max_in_flight: int = 4
    max_busy: int = 20


@dataclass(frozen=True)
class PeerSource:
    """What a download may take from peers: the ``peers`` to ask, nearest first (the controller's
    list, or ``--peers``), and ``manifest_sha256``, the digest of the first holder's manifest
    (:func:`localmodel.peering.manifest_digest`) that lets files the origin gives no hash for come
    from peers. An empty ``peers`` still means peer fill is on: files without an origin hash are
    hashed as they land, so that this node's manifest can serve the next ones. ``on_drop``: called
    on the event loop with each peer dropped, as it is."""

    peers: tuple[Peer, ...]
    settings: PeerSettings
    manifest_sha256: str | None = None
    # Told of each peer the download drops, when it drops it (the agent's status and Events).
    on_drop: Callable[[DroppedPeer], None] | None = None


@dataclass(frozen=True)
class FileNeed:
    """One file's chunks still to fetch: (index, start, end-exclusive) each. ``peer_ok``: its bytes
    will be checked against a hash (the origin's or the manifest's), so peers may give them."""

    path: str
    size: int
    chunks: tuple[tuple[int, int, int], ...]
    peer_ok: bool


@dataclass(frozen=True)
class PeerView:
    """What is known of one peer that is not dropped. ``holding``: its last answer of the listing's
    revision (None: holds nothing yet, or not asked yet); ``active_at``: when it last showed it is
    fetching the model (listed as ModelDownloading when the download began, first seen with a
    holding of this revision, its holding seen to grow; None: never); ``busy_until``: it answered 503
    with a Retry-After reaching then; ``in_flight``: chunks being fetched from it now, at most
    ``max_in_flight`` (None: no bound)."""

    address: str
    holding: Holding | None = None
    active_at: float | None = None
    busy_until: float = 0.0
    in_flight: int = 0
    max_in_flight: int | None = None


@dataclass(frozen=True)
class ChunkPlan:
    """Which source serves each chunk index: a peer's address, the origin, or none yet (wait)."""

    by_peer: Mapping[int, str] = field(default_factory=dict)
    origin: frozenset[int] = frozenset()
    wait: frozenset[int] = frozenset()


def plan_file(
    need: FileNeed,
    peers: Sequence[PeerView],
    *,
    revision: str | None,
    chunk_size: int,
    now: float,
    wait_for_fetching: float,
) -> ChunkPlan:
    """Which source serves each chunk of ``need``; ``peers`` nearest first, the dropped left out.

    Rules:

    - A file whose bytes will not be checked against a hash (``peer_ok`` false) comes from the
      origin, all of it.
    - A peer is usable only when its holding's revision equals the listing's (``revision``) and its
      entry for the file has the listed size; it holds a chunk when it holds the whole file, or that
      chunk index with a chunk size equal to ours (``chunk_size``).
    - A chunk a usable peer that is neither busy nor full holds goes to one of them: the one with
      the fewest chunks assigned (in flight before this plan, plus given by it), the nearest on a
      tie, so the chunks of a file spread round-robin over the peers that hold them. A peer is full
      when that count has reached its ``max_in_flight``.
    - Else the chunk waits when a peer holding it is busy (``busy_until`` after ``now``) or full, or
      a peer that has not published the model and lacks the chunk is fetching it: it showed so
      (``active_at``) within ``wait_for_fetching`` seconds of ``now`` and holds nothing yet, or
      holds this revision without the whole file at the listed size. A fetching peer is waited for
      from its first sign, not from the first growth seen: a seed that has just begun holds zero
      bytes, and bypassing it would send every node to the origin.
    - Else it comes from the origin.
    """
    if not need.peer_ok:
        return ChunkPlan(origin=frozenset(i for i, _, _ in need.chunks))
    usable = [p for p in peers if _usable(p, need, revision)]
    load = {p.address: p.in_flight for p in usable}
    fetching = any(_fetching(p, need, revision, now, wait_for_fetching) for p in peers)
    by_peer: dict[int, str] = {}
    origin: set[int] = set()
    wait: set[int] = set()
    for index, _, _ in need.chunks:
        holders = [p for p in usable if _holds(p, need.path, index, chunk_size)]
        ready = [p for p in holders if p.busy_until <= now and not _full(p, load[p.address])]
        if ready:
            best = min(ready, key=lambda p: load[p.address])  # min keeps the first (nearest) on a tie
            load[best.address] += 1
            by_peer[index] = best.address
        elif holders or fetching:
            wait.add(index)
        else:
            origin.add(index)
    return ChunkPlan(by_peer, frozenset(origin), frozenset(wait))


def _full(p: PeerView, load: int) -> bool:
    return p.max_in_flight is not None and load >= p.max_in_flight


def _usable(p: PeerView, need: FileNeed, revision: str | None) -> bool:
    if p.holding is None or p.holding.revision != revision:
        return False
    held = p.holding.files.get(need.path)
    return held is None or held.size == need.size


def _holds(p: PeerView, path: str, index: int, chunk_size: int) -> bool:
    assert p.holding is not None
    held = p.holding.files.get(path)
    if held is None:
        return False
    return held.complete or (p.holding.chunk_size == chunk_size and index in held.chunks)


def _fetching(p: PeerView, need: FileNeed, revision: str | None, now: float, window: float) -> bool:
    if p.active_at is None or now - p.active_at > window:
        return False
    if p.holding is None:
        return True  # listed as fetching, nothing held yet
    if not _usable(p, need, revision) or p.holding.published:
        return False
    held = p.holding.files.get(need.path)
    return held is None or not held.complete


def held_bytes(holding: Holding | None) -> int:
    """How much a holding holds, in bytes: to tell whether a fetching peer's holding grew."""
    if holding is None:
        return 0
    total = 0
    for f in holding.files.values():
        if f.complete:
            total += f.size
        else:
            total += sum(min(holding.chunk_size, max(0, f.size - i * holding.chunk_size)) for i in f.chunks)
    return total


def holding_fault(holding: Holding, *, storage_key: str, sizes: Mapping[str, int | None]) -> str | None:
    """Why a holding of the listing's revision cannot be true (a reason to drop the peer), or None.
    ``sizes``: the listing's path -> size. A holding of another revision is not a fault (the peer
    holds another version: it is simply not used)."""
    if holding.storage_key != storage_key:
        return f"{BAD_BYTES}its holding is of another model ({holding.storage_key})"
    for path, held in sorted(holding.files.items()):
        if path not in sizes:
            continue  # not ours to fetch: never asked for
        listed = sizes[path]
        if listed is not None and held.size != listed:
            return f"{BAD_BYTES}its holding says {path} has {held.size} bytes; the origin lists {listed}"
        count = -(-held.size // holding.chunk_size)
        if any(i >= count for i in held.chunks):
            return f"{BAD_BYTES}its holding names chunks past the end of {path}"
    return None


def hashes_from_manifest(
    manifest: Manifest, digest: str, files: Sequence[tuple[str, int | None]]
) -> dict[str, str] | None:
    """The sha256 of each listed file a peer's manifest records, when that manifest is the one the
    controller vouched for (its :func:`manifest_digest` equals ``digest``); None when it is not
    (drop the peer). ``files``: the listing's (path, size); a file is taken only when the manifest
    has the same path with the same size and a sha256."""
    if manifest_digest(manifest) != digest:
        return None
    listed = dict(files)
    return {
        e.path: e.sha256.lower()
        for e in manifest.files
        if e.sha256 and e.path in listed and listed[e.path] == e.size
    }


def dropped_for_bad_bytes(reason: str) -> bool:
    """A drop a user must hear of (an Event): the peer sent bytes or claims that were not true."""
    return reason.startswith(BAD_BYTES)


def parse_peers(text: str, *, flag: str = "--peers") -> tuple[Peer, ...]:
    """``host:port,host:port,...`` (``--peers``; blanks between commas ignored) -> peers in that
    order, each once. InvalidInput naming ``flag`` for an entry that is not HOST:PORT with a host (an
    IP address or an RFC 1123 name: not a URL, no blank, not a wildcard such as 0.0.0.0, which is
    an address to listen on, not to reach) and a port 1-65535, or for a value of commas alone."""
    out: dict[str, Peer] = {}
    fix = "write each peer as HOST:PORT, e.g. 10.0.0.7:7071"
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or port_number(port) is None:
            raise InvalidInput(f"{flag}: {item!r} is not HOST:PORT with a port 1-65535; {fix}")
        if not host:
            raise InvalidInput(f"{flag}: {item!r} has no host; {fix}")
        problem = host_error(host) or (
            f"{host} is a wildcard address (one to listen on, not to reach)" if is_wildcard(host) else None
        )
        if problem is not None:
            raise InvalidInput(f"{flag}: {item!r}: {problem}; {fix}")
        out.setdefault(item, Peer(item))
    if text.strip() and not out:
        raise InvalidInput(f"{flag}: {text!r} names no peer; {fix}, or leave the flag out")
    return tuple(out.values())


# A peer that is fetching a model serves the chunks it has made durable before it verifies the file
# (that is what lets the fill stream), so bytes that fail a hash may be ones it got from another peer.
RELAYED_NOTE = (
    " (it served them, but they may have been relayed: a peer still fetching serves chunks it has not "
    "verified yet, which may come from another peer)"
)


def blame_words(reason: str) -> str:
    """``reason`` as an operator reads it in an Event or ``modelcache status``: a drop for bytes that
    failed a file's hash (:meth:`agent.download.peerfetch.PeerFill.blame`) says the named peer may
    only have relayed them."""
    return reason + RELAYED_NOTE if reason.startswith(f"{BAD_BYTES}bytes failed ") else reason
