"""The engine's peer part: one download's peers asked for what they hold, each file's chunks
spread over them and the origin (:func:`agent.download.peers.plan_file`), and the peers that fail
dropped for this model with a reason.

A peer is asked over plain HTTP (``http://<address>``, :mod:`localmodel.peering`'s paths, the
cluster token as a bearer), through a client of its own: no proxy (peers are in the cluster),
private addresses allowed, no redirect followed (a peer answers for itself: a 3xx drops it), the
peer timeouts and low-speed bound of :class:`PeerSettings`, and the download byte-rate cap shared
with the origin's client. Each chunk is one ranged GET checked as the
origin's are (:class:`agent.download.body.Body`: the 206's ``Content-Range`` start, end and total,
never a byte past it) and not retried from the same peer:

- a connection error, a timeout, a stall under the low-speed bound, a 5xx (a 503 without
  ``Retry-After``), a 401/403, a range or size that is not what was asked, a body cut short, a
  malformed or lying holding, a manifest that does not match the controller's digest: the peer is
  dropped for this model (:attr:`PeerFill.dropped`) and its chunks go to another peer or the origin;
- a 404: it may have just published or dropped a chunk: its holding is asked again (three in a row
  and it is dropped);
- a 503 or 429 with ``Retry-After``: it is busy (its upload limit). While other requests of ours
  to it are in flight it is serving us fine: its bound (at most :attr:`PeerSettings.max_in_flight`
  at once) is lowered to those, and the chunk waits for one of them to end (raised again, one by
  one, as requests succeed). Busy while serving nothing of ours: its chunks wait the Retry-After (at
  most 5 s), and after :attr:`PeerSettings.max_busy` such answers in a row (none served between) it
  is dropped.

A file whose hash fails after peers gave chunks of it: every peer that did is dropped
(:meth:`PeerFill.blame`) and the file is fetched again from the origin alone. Disk errors are ours,
not the peer's: they fail the download as they would from the origin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.download.body import Body, RangeMismatch, check_of, status_error
from agent.download.client import ClientSettings, HttpClient, Response, Sink
from agent.download.listing import Listing, RemoteFile
from agent.download.peers import (
    BAD_BYTES,
    ChunkPlan,
    FileNeed,
    PeerSource,
    PeerView,
    hashes_from_manifest,
    held_bytes,
    holding_fault,
    peer_safe,
    plan_file,
)
from agent.download.ratelimit import RateLimiter
from agent.download.transfer import TransferSettings
from agent.download.wording import causes
from localmodel.errors import (
    AccessDenied,
    DiskFull,
    DownloadError,
    IntegrityError,
    PermissionDenied,
    SourceNotFound,
    SpecError,
    TransientError,
    UnsafePath,
)
from localmodel.manifest import Manifest
from localmodel.peering import Holding, bearer, file_path, holding_path, manifest_path
from localmodel.resources import DroppedPeer, ModelState

log = logging.getLogger("modelcache.download")

Chunk = tuple[int, int, int]
MAX_BUSY_WAIT = 5.0  # seconds a Retry-After from a busy peer is honoured, at most
MAX_MISSES = 3  # 404s in a row for what its holding names, before a peer is dropped
# Ours, not the peer's: these fail the download as they would from the origin.
LOCAL = (DiskFull, PermissionDenied, UnsafePath)


class Staging(Protocol):
    """Where a download's chunks go (:class:`agent.download.engine.Transfer`): ``slots`` bounds
    its requests in flight, ``open_staged`` gives a file's staged descriptor, ``record`` notes
    chunks written, ``advance`` counts bytes received."""

    slots: asyncio.Semaphore

    def open_staged(self, f: RemoteFile) -> int: ...
    def record(self, f: RemoteFile, chunks: set[int]) -> None: ...
    def advance(self, nbytes: int) -> None: ...


# Seconds a peer that refuses connections before it ever answered is asked again before it is
# dropped: agents that start together are listening within a few seconds of each other.
STARTING_GRACE = 15.0


@dataclasses.dataclass
class _Peer:
    """One peer's state in this download (mutated on the event loop only)."""

    address: str
    cap: int  # requests in flight at once (PeerSettings.max_in_flight, lowered when it is busy)
    listed_fetching: bool = False  # the controller listed it as ModelDownloading
    holding: Holding | None = None
    seen: bool = False  # a holding of this revision was seen
    active_at: float | None = None
    busy_until: float = 0.0
    busy: int = 0
    misses: int = 0
    in_flight: int = 0
    served: int = 0  # requests served since the cap was last raised
    previous_token: str | None = None  # sent instead of the current one: it refused that
    refused_since: float | None = None  # when its port first refused us, before it ever answered

    def view(self) -> PeerView:
        return PeerView(self.address, self.holding, self.active_at, self.busy_until, self.in_flight, self.cap)


class PeerFill:
    """The peers of one download (:class:`agent.download.engine.Transfer`) of the model
    ``storage_key``. ``limiter``: the download byte-rate cap, shared with the origin's client (None:
    uncapped); ``staging``: where the chunks go."""

    def __init__(
        self,
        source: PeerSource,
        storage_key: str,
        transfer: TransferSettings,
        limiter: RateLimiter | None,
        staging: Staging,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = source.settings
        self.on_drop = source.on_drop
        self.manifest_sha256 = source.manifest_sha256
        self.storage_key = storage_key
        self.chunk_size = transfer.chunk_size
        self.verify = transfer.verify
        self.staging = staging
        self.clock = clock
        self.peers: dict[str, _Peer] = {}  # nearest first, the dropped removed
        for p in source.peers:
            fetching = p.state is ModelState.DOWNLOADING
            self.peers.setdefault(p.address, _Peer(p.address, self.settings.max_in_flight, fetching))
        self.dropped: dict[str, DroppedPeer] = {}
        self.peer_bytes = 0  # every byte peers sent, bytes that failed a hash included
        self.by_file: dict[str, int] = {}  # of those, per file not yet known to be good or bad
        self.discarded = 0  # peers' bytes of files that failed their hash
        self.contributors: dict[str, set[str]] = {}  # file -> peers that gave chunks of it
        self.origin_only: set[str] = set()
        self.listing: Listing | None = None
        self.asked_at = 0.0
        self.changed: asyncio.Future[bool] | None = None  # resolved when a peer request ends
        self.client = HttpClient(
            ClientSettings(
                concurrency=transfer.concurrency,
                read_size=transfer.read_size,
                connect_timeout=self.settings.connect_timeout,
                read_timeout=self.settings.read_timeout,
                low_speed_limit=self.settings.low_speed_limit,
                low_speed_time=self.settings.low_speed_time,
                allow_private=True,
                follow_redirects=False,
            )
        )
        # One cap for every byte this process downloads, from the origin or a peer.
        self.client.limiter = limiter

    def close(self) -> None:
        self.client.close()

    # -- before the first byte -------------------------------------------------------------

    async def start(self, listing: Listing) -> Listing:
        """Ask every peer's holding; when the controller passed a manifest digest and some file has
        no hash from the origin, take the sha256s of a peer's manifest that matches it. The listing
        with those sha256s filled in (the engine checks them as the origin's)."""
        self.listing = listing
        if not self.peers or listing.archive is not None or not self.verify:
            self.peers.clear()  # an archive is unpacked, and unchecked bytes never come from a peer
            return listing
        for peer in self.peers.values():
            if peer.listed_fetching:
                peer.active_at = self.clock()  # waited for from now, even while it holds nothing yet
        await self._ask_all()
        self.asked_at = self.clock()
        # No hash a peer cannot forge bytes for (none, or a CRC32C alone): the manifest's sha256.
        unhashed = {f.path for f in listing.files if not peer_safe(check_of(f))}
        if not unhashed or self.manifest_sha256 is None:
            return listing
        hashes = await self._manifest_hashes(listing)
        files = tuple(
            dataclasses.replace(f, sha256=hashes[f.path]) if f.path in unhashed and f.path in hashes else f
            for f in listing.files
        )
        self.listing = dataclasses.replace(listing, files=files)
        return self.listing

    async def _manifest_hashes(self, listing: Listing) -> dict[str, str]:
        assert self.manifest_sha256 is not None
        wanted = [(f.path, f.size) for f in listing.files]
        for peer in list(self.peers.values()):
            if peer.holding is None or not peer.holding.published:
                continue
            try:
                data = await self._get_json(peer.address, manifest_path(self.storage_key))
                if data is None:
                    continue
                manifest = Manifest.from_json(data, where=f"peer {peer.address}'s manifest")
            except (DownloadError, SpecError, ValueError) as e:
                self._drop_for(peer.address, e, what="manifest")
                continue
            except Exception as e:  # one peer's answer never fails the model
                self._unexpected(peer.address, e, "its manifest")
                continue
            hashes = hashes_from_manifest(manifest, self.manifest_sha256, wanted)
            if hashes is None:
                self.drop(peer.address, f"{BAD_BYTES}its manifest is not the one the controller vouched for")
                continue
            return hashes
        return {}

    # -- holdings ----------------------------------------------------------------------------

    async def _ask_all(self) -> None:
        await asyncio.gather(*(self._ask(p) for p in list(self.peers.values())))

    async def _refresh(self) -> None:
        """Ask again the peers whose holding may have changed, at most once a poll interval."""
        if self.clock() - self.asked_at < self.settings.poll_interval:
            return
        self.asked_at = self.clock()
        changing = [p for p in self.peers.values() if p.holding is None or not p.holding.published]
        await asyncio.gather(*(self._ask(p) for p in changing))

    async def _ask(self, peer: _Peer) -> None:
        assert self.listing is not None
        try:
            data = await self._get_json(peer.address, holding_path(self.storage_key))
            holding = Holding.from_json(data) if data is not None else None
        except (DownloadError, SpecError, ValueError) as e:
            if self._starting(peer, e):
                return
            self._drop_for(peer.address, e, what="holding")
            if peer.previous_token is not None and peer.holding is None and peer.address in self.peers:
                await self._ask(peer)  # refused our new token: asked at once with the previous one
            return
        except Exception as e:  # one peer's answer never fails the model
            self._unexpected(peer.address, e, "its holding")
            return
        if holding is not None and holding.revision != self.listing.revision:
            # Another version of the model: of no use, and no fault; nor is it fetching ours.
            peer.holding = peer.active_at = None
            return
        if holding is not None:
            sizes = {f.path: f.size for f in self.listing.files}
            fault = holding_fault(holding, storage_key=self.storage_key, sizes=sizes)
            if fault is not None:
                self.drop(peer.address, fault)
                return
            # First seen holding this revision (zero bytes, maybe: a seed that has just begun), or
            # grown since: fetching, so what it lacks is waited for (bounded by wait_for_fetching).
            if not peer.seen or held_bytes(holding) > held_bytes(peer.holding):
                peer.active_at = self.clock()
            peer.seen = True
        peer.holding = holding

    async def _get_json(self, address: str, path: str) -> Any:
        """A peer's JSON answer at ``path``; None for a 404. DownloadError for any other status or
        an answer longer than :attr:`PeerSettings.max_holding_bytes`; ValueError for bad JSON."""
        label = f"peer {address}"
        buf = bytearray()
        found = True
        limit = self.settings.max_holding_bytes

        def sink(block: memoryview) -> None:
            if len(buf) + len(block) > limit:
                raise DownloadError(f"{label}: an answer longer than {limit} bytes")
            buf.extend(block)

        def accept(response: Response) -> Sink | None:
            nonlocal found
            if response.status == 404:
                found = False
                return None
            if response.status != 200:
                raise status_error(label, response)
            return sink

        headers = bearer(self._token(address))
        await self.client.request(
            "GET", f"http://{address}{path}", headers=headers, label=label, accept=accept
        )
        return _parse_json(bytes(buf)) if found else None

    # -- one file ------------------------------------------------------------------------------

    def usable(self, f: RemoteFile) -> bool:
        """Peers may give bytes of ``f``: some peer is left, the file has bytes and a hash no peer
        can forge bytes for (:func:`peer_safe`) to check them against, and it was not handed to
        the origin alone (:meth:`blame`)."""
        return (
            bool(self.peers)
            and bool(f.size)
            and f.local_path is None
            and peer_safe(check_of(f))
            and f.path not in self.origin_only
        )

    async def fetch(
        self, f: RemoteFile, todo: list[Chunk], origin: Callable[[Chunk], Awaitable[bool]]
    ) -> None:
        """Fetch ``todo`` of ``f``: each chunk from the source :func:`plan_file` picks, again
        elsewhere when a peer fails. ``origin(chunk)`` fetches one from the origin (its errors fail
        the download) and returns False when the origin sent the whole file instead."""
        pending = {c[0]: c for c in todo}
        running: dict[asyncio.Future[bool], tuple[Chunk, bool]] = {}
        # Holdings as of now (at most once a poll interval): a peer that came up or grew since the
        # last file counts for this one, even when no chunk of any file had to wait.
        await self._refresh()
        try:
            while pending or running:
                plan = self._plan(f, tuple(pending.values()))
                for index, address in plan.by_peer.items():
                    chunk = pending.pop(index)
                    self.peers[address].in_flight += 1  # now: the next file's plan counts it
                    running[asyncio.ensure_future(self._from_peer(f, chunk, address))] = (chunk, False)
                for index in plan.origin:
                    chunk = pending.pop(index)
                    running[asyncio.ensure_future(origin(chunk))] = (chunk, True)
                # Until a request of this file ends, or (chunks waiting) one to a peer ends anywhere
                # in the download (a full peer has room again), or the holdings are due again.
                changed = [self._change()] if pending else []
                done, _ = await asyncio.wait(
                    [*running, *changed],
                    timeout=self.settings.poll_interval if pending else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if self._settle(done.difference(changed), running, pending):
                    return  # the origin sent the whole file
                if pending:
                    await self._refresh()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _change(self) -> asyncio.Future[bool]:
        if self.changed is None or self.changed.done():
            self.changed = asyncio.get_running_loop().create_future()
        return self.changed

    def _settle(
        self,
        done: set[asyncio.Future[bool]],
        running: dict[asyncio.Future[bool], tuple[Chunk, bool]],
        pending: dict[int, Chunk],
    ) -> bool:
        """Take the finished requests: a peer's that failed puts its chunk back. True when the
        origin answered a range with the whole file (nothing else to fetch)."""
        whole = False
        for task in done:
            chunk, from_origin = running.pop(task)
            ok = task.result()  # an origin request's error fails the download here
            if not ok and from_origin:
                whole = True
            elif not ok:
                pending[chunk[0]] = chunk
        return whole

    def _plan(self, f: RemoteFile, chunks: tuple[Chunk, ...]) -> ChunkPlan:
        assert self.listing is not None and f.size is not None
        need = FileNeed(f.path, f.size, chunks, peer_ok=self.usable(f))
        return plan_file(
            need,
            [p.view() for p in self.peers.values()],
            revision=self.listing.revision,
            chunk_size=self.chunk_size,
            now=self.clock(),
            wait_for_fetching=self.settings.wait_for_fetching,
        )

    async def _from_peer(self, f: RemoteFile, chunk: Chunk, address: str) -> bool:
        """One chunk from one peer: True when it is written and recorded, False when the peer
        failed (dropped, busy or asked again); disk errors raise."""
        peer = self.peers[address]
        try:
            await self._get_chunk(f, chunk, address)
        except LOCAL:
            raise
        except DownloadError as e:
            self._failed(peer, f.path, e)
            return False
        except Exception as e:  # one peer's answer never fails the model
            self._unexpected(address, e, f"{f.path} from it")
            return False
        finally:
            peer.in_flight -= 1
            if self.changed is not None and not self.changed.done():
                self.changed.set_result(True)
        peer.busy = peer.misses = 0
        peer.served += 1
        if peer.served >= peer.cap and peer.cap < self.settings.max_in_flight:
            peer.cap, peer.served = peer.cap + 1, 0  # a window served without a 503: one more
        self.contributors.setdefault(f.path, set()).add(address)
        return True

    async def _get_chunk(self, f: RemoteFile, chunk: Chunk, address: str) -> None:
        """One ranged GET, checked and written as the origin's are (Body), not retried."""
        index, start, end = chunk
        body = Body(
            f,
            source=f"peer {address}",
            report=functools.partial(self._report, f.path),
            start=start,
            end=end,
            whole=False,
            probe=False,
        )
        body.asked_range = True
        headers = {**bearer(self._token(address)), "Range": f"bytes={start}-{end - 1}"}
        url = f"http://{address}{file_path(self.storage_key, f.path)}"
        try:
            async with self.staging.slots:
                body.fd = self.staging.open_staged(f)
                await self.client.request("GET", url, headers=headers, label=body.label, accept=_direct(body))
        finally:
            self._report(f.path, body.take_unreported())
        if body.written < end - start:
            raise TransientError(
                f"{body.label}: the answer ended after {body.written} of {end - start} bytes"
            )
        self.staging.record(f, {index})

    def _report(self, path: str, nbytes: int) -> None:
        self.peer_bytes += nbytes
        self.by_file[path] = self.by_file.get(path, 0) + nbytes
        self.staging.advance(nbytes)

    def tally(self, transferred: int) -> tuple[int, int]:
        """At the end of a download that moved ``transferred`` bytes: (bytes from the origin, bytes
        from peers). The origin's count everything it sent (what it was asked for, refetches
        included); the peers' only bytes of files that passed their hash (those in the published
        copy). A peer that refused connections all along (never up while this download ran) is
        reported dropped now, so the status names it."""
        for peer in list(self.peers.values()):
            if peer.refused_since is not None and not peer.seen:
                self.drop(peer.address, f"connection refused by {peer.address} all through the download")
        return transferred - self.peer_bytes, self.peer_bytes - self.discarded

    def _starting(self, peer: _Peer, e: Exception) -> bool:
        """True (not dropped: asked again at the next poll) while a peer that never answered yet
        refuses connections, for :data:`STARTING_GRACE` seconds: an agent still starting (the pods of
        a DaemonSet, or agents given each other in ``--peers``, start together)."""
        if peer.seen or not _refused(e):
            return False
        if peer.refused_since is None:
            peer.refused_since = self.clock()
        return self.clock() - peer.refused_since < STARTING_GRACE

    def _token(self, address: str) -> str:
        peer = self.peers.get(address)
        if peer is not None and peer.previous_token is not None:
            return peer.previous_token
        return self.settings.token()

    def _refused_new_token(self, address: str) -> bool:
        """A peer refused our current token: True (not dropped) when it is the first refusal and a
        previous token is still in its grace window, to be sent instead: that peer's kubelet has not
        brought it the rotated Secret yet (nodes get it up to about two minutes apart)."""
        peer = self.peers.get(address)
        if peer is None or peer.previous_token is not None:
            return False
        previous = self.settings.previous_token()
        if not previous or previous == self.settings.token():
            return False
        peer.previous_token = previous
        peer.holding = peer.active_at = None
        self.asked_at = 0.0  # ask its holding again at once, with the previous token
        log.info(
            "%s: peer %s refused the current token; the previous one is sent to it", self.storage_key, address
        )
        return True

    def _failed(self, peer: _Peer, path: str, e: DownloadError) -> None:
        if peer.address not in self.peers:
            return  # dropped meanwhile, by another of its chunks
        if isinstance(e, SourceNotFound) and peer.holding is not None:
            peer.misses += 1
            if peer.misses >= MAX_MISSES:
                self.drop(peer.address, f"its holding names {path}, which it answers 404 for")
                return
            files = {p: h for p, h in peer.holding.files.items() if p != path}
            peer.holding = dataclasses.replace(peer.holding, files=files)
            self.asked_at = 0.0  # ask its holding again at once
            return
        if isinstance(e, TransientError) and e.retry_after is not None:
            others = peer.in_flight - 1  # this request is still counted
            if others > 0:
                # At its upload limit while serving others of ours: ask no more at once than those.
                peer.cap, peer.served = max(1, min(peer.cap, others)), 0
                return
            peer.busy += 1
            if peer.busy > self.settings.max_busy:
                self.drop(peer.address, f"busy (HTTP 503) {peer.busy} times in a row, serving none of ours")
                return
            peer.busy_until = self.clock() + min(e.retry_after, MAX_BUSY_WAIT)
            return
        self._drop_for(peer.address, e)

    def _drop_for(self, address: str, e: Exception, *, what: str = "") -> None:
        if isinstance(e, AccessDenied) and self._refused_new_token(address):
            return
        text = str(e).removeprefix(f"peer {address}: ")
        if isinstance(e, SpecError | ValueError) and what:
            text = f"{BAD_BYTES}malformed {what}: {text}"
        elif isinstance(e, IntegrityError | RangeMismatch):
            text = f"{BAD_BYTES}{text}"
        elif isinstance(e, AccessDenied):
            text = f"{text} (the cluster token was refused)"
        self.drop(address, text)

    def _unexpected(self, address: str, e: Exception, what: str) -> None:
        """An error no rule above expects, while reading ``what`` of one peer: that peer is
        dropped, named, with the error's kind; the model goes on with the others and the origin."""
        log.debug("%s: peer %s: unexpected error reading %s", self.storage_key, address, what, exc_info=e)
        self.drop(address, f"an unexpected error reading {what} ({type(e).__name__}: {e})"[:300])

    def drop(self, address: str, reason: str) -> None:
        """Stop using a peer for this model, with a one-line reason (kept for the status)."""
        if self.peers.pop(address, None) is None:
            return
        self.dropped[address] = DroppedPeer(address, reason)
        log.warning("%s: peer %s dropped: %s", self.storage_key, address, reason)
        if self.on_drop is not None:
            self.on_drop(self.dropped[address])

    def blame(self, path: str) -> bool:
        """``path`` failed its hash: drop every peer that gave chunks of it and fetch it again from
        the origin alone. False when no peer gave any (the origin's bytes failed)."""
        givers = self.contributors.pop(path, set())
        self.discarded += self.by_file.pop(path, 0)
        if not givers:
            return False
        self.origin_only.add(path)
        assert self.listing is not None
        check = next((check_of(f) for f in self.listing.files if f.path == path), None)
        name = check.name if check is not None else "hash"
        for address in sorted(givers):
            self.drop(address, f"{BAD_BYTES}bytes failed {path}'s {name}")
        return True


def _parse_json(data: bytes) -> Any:
    """A peer's JSON answer; ValueError for anything that is not JSON, too deeply nested included
    (json raises RecursionError for ``[`` * 200000), or a number past int()'s digit limit."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # int()'s digit limit: its advice is for us
            raise ValueError("not JSON: a number thousands of digits long") from None
        raise ValueError(f"not JSON: {str(e)[:200]}") from None


def _direct(body: Body) -> Callable[[Response], Sink | None]:
    """The body's check, with a redirect refused: a peer answers for itself."""

    def accept(response: Response) -> Sink | None:
        if 300 <= response.status < 400:
            raise DownloadError(
                f"{body.label}: HTTP {response.status}, a redirect (not followed from a peer)"
            )
        return body.accept(response)

    return accept


def _refused(e: BaseException) -> bool:
    """Whether a ConnectionRefusedError is behind ``e`` (nothing listens on the peer's port yet)."""
    return any(isinstance(cause, ConnectionRefusedError) for cause in causes(e))
