"""The transfer engine: one for every source.

Parallel across files and within large files (ranged GETs written with ``pwrite`` into a
preallocated file), under a global connection limit and an optional byte-rate cap (both held by the
:class:`~agent.download.client.HttpClient`, whose worker threads receive and write the bytes); retries
with exponential backoff and jitter on connection errors, timeouts, 429 and 5xx (honouring
Retry-After), never on 401/403/404. Memory is bounded by ``concurrency * read_size`` whatever the
model's size.

Integrity: every file is checked against its size, and (unless ``verify`` is off) against the
strongest checksum the source offers (sha256, else git blob sha1, else MD5, else CRC32C:
:func:`localmodel.manifest.hash_check`); a mismatch is fetched once more from scratch, then fails the
download naming the file. Every ranged answer is checked against what was asked (a 206's
``Content-Range`` start, end and total; a 200 only where the whole file stands for the request): a
mismatch is retried on a fresh request, then fails. A server that sends fewer bytes than listed
(a complete 200 with a short ``Content-Length``, a ``Content-Range`` total or a 416 showing a
shorter copy) fails the file as an integrity error, fetched once more from byte 0 first. Files the
source gives no hash for (file://, http(s)) get a sha256 computed as they land, recorded in the
manifest so a later re-verify detects a flipped byte; they count as checked by size only
(:class:`PullResult`). S3 objects without a stored checksum (multipart ETags are not hashes) are not
hashed: that would cost about a fifth of the S3 pull rate (bench/pull.py).

Scale: ``concurrency`` workers take files one at a time from the listing (no task per file); a
file's descriptor is opened when its first request holds a connection slot and closed when the file
is done, so descriptors and memory are bounded by the concurrency, not the file count; the resume
state costs per checkpoint what changed (see :class:`~agent.download.journal.Progress`).

Every OSError maps to one line naming the file: ENOSPC/EDQUOT/EFBIG to DiskFull, EACCES/EPERM/EROFS
to PermissionDenied, anything else to DownloadError with the system's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from agent.download.body import Body, Hasher, RangeMismatch, check_of, file_hash, first_error, verify_fd
from agent.download.client import HttpClient
from agent.download.journal import FileProgress, Progress, resumable
from agent.download.listing import Listing, RemoteFile
from agent.download.localcopy import copy_local, reuse
from agent.download.manifesting import manifest_of
from agent.download.peerfetch import PeerFill
from agent.download.peers import PeerSource, peer_safe
from agent.download.staging import (
    Destination,
    lstat_below,
    open_below,
    publish,
    remove_tree,
    unlink_below,
)
from agent.download.transfer import (
    NoProgress,
    ProgressSink,
    PullResult,
    TransferSettings,
    backoff,
    checked_counts,
    chunks_of,
)
from agent.download.unpack import unpack
from agent.download.wording import retried
from localmodel.errors import (
    IntegrityError,
    TransientError,
    from_os_error,
)
from localmodel.manifest import HashCheck, Manifest

# Seconds between two checkpoints at least, with peer fill (each chunk's as soon as it lands).
PROMPT_GAP = 0.1


class Transfer:
    """One download of one listing into one destination."""

    def __init__(
        self,
        listing: Listing,
        dest: Destination,
        *,
        uri: str,
        storage_key: str,
        client: HttpClient,
        settings: TransferSettings,
        progress: ProgressSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        previous: Manifest | None = None,
        publish: bool = True,
        peers: PeerSource | None = None,
    ) -> None:
        """``peers``: peer fill on (:mod:`agent.download.peerfetch`); None: the origin alone."""
        self.listing = listing
        # False: the verified files stay in the staging folder and the manifest in ``staged`` (an
        # adoption moves them into a folder in place, file by file: agent.download.adoption).
        self.publish = publish
        self.staged: Manifest | None = None
        # What is published now (another revision): files it holds unchanged are linked, not fetched.
        self.previous = {e.path: e for e in previous.files} if previous is not None else {}
        self.dest = dest
        self.uri = uri
        self.storage_key = storage_key
        self.client = client
        self.settings = settings
        self.progress = progress or NoProgress()
        self.clock = clock
        self.files_dir = dest.staging / "files"
        self.archive_dir = dest.staging / "archive"
        self.state_path = dest.staging / "progress.json"
        self.transferred = 0
        # Files begun and not finished (rewritten at each checkpoint), files finished since the last
        # checkpoint (appended to the journal), and whether anything changed since.
        self.partial: set[str] = set()
        self.finished: dict[str, FileProgress] = {}
        self.dirty = False
        self.landed = asyncio.Event()  # a chunk or a file done since the last checkpoint
        # How each finished file was checked, and the sha256 known for it (the manifest's).
        self.outcome: dict[str, tuple[str, str | None]] = {}
        self.fds: dict[str, int] = {}
        self.hashers: dict[str, Hasher] = {}  # files hashed as their finished prefix grows
        # At most `concurrency` requests of this download queued in the shared client at once, so the
        # client's workers take turns between downloads rather than serving one model's whole queue.
        self.slots = asyncio.Semaphore(settings.concurrency)
        # Only files begun or finished have an entry: memory grows with the work in flight.
        self.state = Progress(listing.revision, settings.chunk_size, {})
        # S3 objects without a stored checksum are not hashed (see the module's docstring), but
        # with peer fill on they are: the manifest's sha256 is what lets the next nodes take them.
        self.hash_unhashed = settings.verify and (peers is not None or not listing.source.startswith("s3://"))
        self.fill = None if peers is None else PeerFill(peers, storage_key, settings, client.limiter, self)

    # -- the whole download ----------------------------------------------------------------

    async def run(self) -> PullResult:
        if self.fill is None:
            return await self._run()
        try:
            # Before the resume state is read: a file's hash from a peer's manifest is part of it.
            self.listing = await self.fill.start(self.listing)
            return await self._run()
        finally:
            self.fill.close()

    async def _run(self) -> PullResult:
        started = self.clock()
        where = f"{self.listing.source}: {self.dest.final}"
        try:
            await asyncio.to_thread(self._load_state)
            if self.previous:
                await asyncio.to_thread(self._link_unchanged)
        except OSError as e:
            raise from_os_error(e, where) from e
        total = self.listing.total_bytes
        done = sum(self._durable_bytes(f) for f in self.listing.files)
        self.progress.start(total_bytes=total, done_bytes=done, files=len(self.listing.files))
        order = iter(sorted(self.listing.files, key=lambda f: -(f.size or 0)))
        try:
            async with asyncio.TaskGroup() as group:
                checkpointer = group.create_task(self._checkpoint_loop())
                workers = [
                    group.create_task(self._worker(order))
                    for _ in range(min(self.settings.concurrency, len(self.listing.files)))
                ]
                if workers:
                    await asyncio.wait(workers)
                checkpointer.cancel()
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        finally:
            try:
                self._checkpoint()
            except OSError as e:
                raise from_os_error(e, where) from e
            finally:
                self._close_fds()
        try:
            if self.listing.archive is not None:
                await asyncio.to_thread(self._unpack)
            manifest = await asyncio.to_thread(
                manifest_of,
                self.listing,
                self.files_dir,
                root=self.dest.root,
                uri=self.uri,
                storage_key=self.storage_key,
                computed={p: sha for p, (_, sha) in self.outcome.items()},
                verify=self.settings.verify,
            )
            if self.publish:
                await asyncio.to_thread(publish, self.dest, manifest)
            else:
                self.staged = manifest
        except OSError as e:
            raise from_os_error(e, where) from e
        return self._result(manifest, self.clock() - started)

    def _result(self, manifest: Manifest, seconds: float) -> PullResult:
        # An archive's members count as checked the way the archive was.
        each = len(manifest.files) if self.listing.archive is not None else 1
        hashed, size_only, named = checked_counts({p: m for p, (m, _) in self.outcome.items()}, each=each)
        origin, peers = self.fill.tally(self.transferred) if self.fill is not None else (self.transferred, 0)
        return PullResult(
            files=len(manifest.files),
            bytes_total=manifest.total_bytes,
            bytes_transferred=self.transferred,
            seconds=seconds,
            revision=self.listing.revision,
            up_to_date=False,
            hash_checked=hashed,
            size_only=size_only,
            size_only_names=named,
            bytes_from_origin=origin,
            bytes_from_peers=peers,
            peers_dropped=tuple(self.fill.dropped.values()) if self.fill is not None else (),
        )

    async def _worker(self, files: Iterator[RemoteFile]) -> None:
        """Fetch files one after the other until none is left (``next`` runs on the loop: each
        file goes to one worker)."""
        for f in files:
            label = f"{self.listing.source}: {f.path}"
            try:
                await self._fetch_and_verify(f)
            except OSError as e:
                raise from_os_error(e, label) from e

    def _target(self, f: RemoteFile) -> Path:
        base = self.archive_dir if self.listing.archive is not None else self.files_dir
        return base / f.path

    def _st(self, f: RemoteFile) -> FileProgress:
        st = self.state.files.get(f.path)
        if st is None:
            st = self.state.files[f.path] = FileProgress(f.size, f.sha256, f.git_sha1, f.md5)
        return st

    def _load_state(self) -> None:
        kept = resumable(
            Progress.load(self.state_path), self.listing, self.settings.chunk_size, self._staged_size
        )
        if kept is not None:
            self.state.files.update(kept)
        else:
            # Files of another revision are overwritten in place; stale ones must not linger.
            shutil.rmtree(self.files_dir, ignore_errors=True)
            shutil.rmtree(self.archive_dir, ignore_errors=True)
        self.partial = {p for p, st in self.state.files.items() if st.chunks and not st.verified}
        self.state.save(self.state_path)

    def _staged_size(self, f: RemoteFile) -> int | None:
        found = lstat_below(self._target(f), below=self.dest.root)
        return found.st_size if found is not None else None

    def _chunks(self, f: RemoteFile) -> list[tuple[int, int, int]]:
        return chunks_of(f.size, self.settings.chunk_size)

    def _durable_bytes(self, f: RemoteFile) -> int:
        st = self.state.files.get(f.path)
        if st is None or st.verified:
            return 0 if st is None else f.size or 0
        return sum(end - start for i, start, end in self._chunks(f) if i in st.chunks) if f.size else 0

    # -- one file ---------------------------------------------------------------------------

    async def _fetch_and_verify(self, f: RemoteFile) -> None:
        st = self._st(f)
        failures = 0  # the origin's; a file whose peers' bytes failed is fetched again uncounted
        while not st.verified:
            hasher = self._hasher(f)
            if hasher is not None:
                self.hashers[f.path] = hasher
            try:
                await self._fetch(f)
            except IntegrityError as e:
                # The server's copy is not the listed size (an error page, a truncated object):
                # once more from byte 0, then fail.
                self.hashers.pop(f.path, None)
                await asyncio.to_thread(self._sync_close, f)
                failures += 1
                if failures == 2:
                    raise IntegrityError(f"{e}; the same after a second fetch from byte 0") from e
                self._restart(f, st)
                continue
            # The file's bytes go to disk while the hash catches up, not after it.
            synced = asyncio.ensure_future(asyncio.to_thread(self._sync_close, f))
            digest_now = None
            try:
                if hasher is not None:
                    digest_now = await hasher.finish(st.chunks)
                    del self.hashers[f.path]
            finally:
                await synced
            ok, digest, method = await asyncio.to_thread(self._verify, f, digest_now)
            if not ok:
                # Peers gave some of it: they are dropped, and the origin alone fetches it again.
                failures += 0 if self.fill is not None and self.fill.blame(f.path) else 1
                if failures == 2:
                    raise IntegrityError(
                        f"{self.listing.source}: {f.path}: content does not match the source's "
                        f"checksum after a second fetch ({digest})"
                    )
                self._restart(f, st)
                continue
            st.verified, st.computed_sha256, st.checked_by = True, digest or None, method
            st.chunks = set()
            self.partial.discard(f.path)
            self.finished[f.path] = st
            self.dirty = True
            self.landed.set()
        if not st.verified:
            return
        # Kept in memory as one small tuple: the entry itself goes to the journal and is dropped.
        self.outcome[f.path] = (st.checked_by or self._method(f), st.computed_sha256)
        self.state.files.pop(f.path, None)

    def _restart(self, f: RemoteFile, st: FileProgress) -> None:
        st.chunks.clear()  # once more from scratch
        self.partial.add(f.path)
        self.dirty = True

    def _method(self, f: RemoteFile) -> str:
        """How a file is checked: the name of the source's hash, or "size"."""
        check = check_of(f) if self.settings.verify else None
        return check.name if check is not None else "size"

    def _link_unchanged(self) -> None:
        for f in self.listing.files:
            st = self.state.files.get(f.path)
            if st is None or (not st.chunks and not st.verified):
                target = self._target(f)
                old = self.previous.get(f.path)
                if old is not None and self.listing.archive is None and reuse(f, old, target, self.dest):
                    # Not recorded: after a crash the link is simply made again.
                    self._st(f).chunks = {i for i, _, _ in self._chunks(f)}

    async def _fetch(self, f: RemoteFile) -> None:
        target = self._target(f)
        st = self._st(f)
        if f.local_path is not None:
            await asyncio.to_thread(
                copy_local,
                f,
                target,
                source=self.listing.source,
                root=self.dest.root,
                limiter=self.client.limiter,
                advance=self.advance,
            )
            st.chunks = {i for i, _, _ in self._chunks(f)}
            self.partial.add(f.path)
            self.dirty = True
            return
        todo = [c for c in self._chunks(f) if c[0] not in st.chunks]
        if not todo:
            return
        if self.fill is not None and self.fill.usable(f):
            # The origin's ranges probe as the first one would (a server may send the whole file).
            probe = not f.ranges
            await self.fill.fetch(f, todo, lambda c: self._request(f, c, whole=False, probe=probe))
            return
        if f.size is None or len(self._chunks(f)) == 1:
            await self._request(f, todo[0], whole=True)
            return
        if not f.ranges:
            # The first range tells whether the server honours ranges; only then fan out.
            ranged = await self._request(f, todo[0], whole=False, probe=True)
            if not ranged:
                return  # the server sent the whole file in that one response
            todo = todo[1:]
        try:
            async with asyncio.TaskGroup() as group:
                for chunk in todo:
                    group.create_task(self._request(f, chunk, whole=False))
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None

    def open_staged(self, f: RemoteFile) -> int:
        """The file's descriptor, opened by its first request once that holds a slot (so open
        descriptors stay bounded by the concurrency), preallocated to the listed size."""
        if f.path in self.fds:
            return self.fds[f.path]
        target = self._target(f)
        try:
            # Folder by folder, no link followed (open_below): a link planted in the staging folder
            # while the agent was stopped would take these bytes to a file outside (LinkRefused).
            fd = open_below(target, os.O_WRONLY | os.O_CREAT, below=self.dest.root, make_parents=True)
            if os.fstat(fd).st_nlink > 1:
                # Linked from the published copy (_reuse) and found damaged: writing into it would
                # change the published model in place. A new file instead.
                os.close(fd)
                unlink_below(target, below=self.dest.root)
                fd = open_below(target, os.O_WRONLY | os.O_CREAT, below=self.dest.root)
        except OSError as e:
            raise from_os_error(e, f"{self.listing.source}: {f.path}") from e
        self.fds[f.path] = fd
        try:
            if f.size and os.fstat(fd).st_size != f.size:
                os.ftruncate(fd, 0)
                os.posix_fallocate(fd, 0, f.size)  # ENOSPC now, not after 90 GB
        except OSError as e:
            raise from_os_error(e, f"{self.listing.source}: {f.path}") from e
        return fd

    async def _request(
        self, f: RemoteFile, chunk: tuple[int, int, int], *, whole: bool, probe: bool = False
    ) -> bool:
        """Fetch one chunk (or, with ``whole``, the whole file); True if the server did ranges.
        ``probe``: the first range of a file whose server may not do ranges."""
        index, start, end = chunk
        body = Body(
            f,
            source=self.listing.source,
            report=self.advance,
            start=start,
            end=end,
            whole=whole,
            probe=probe,
        )
        began = time.monotonic()
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self.settings.attempts),
            wait=functools.partial(backoff, self.settings),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    headers = dict(f.headers)
                    body.pos = body.start + body.written
                    body.asked_range = not body.whole or body.written > 0
                    if body.asked_range:
                        last = f"{body.end - 1}" if f.size else ""
                        headers["Range"] = f"bytes={body.pos}-{last}"
                    try:
                        async with self.slots:
                            body.fd = self.open_staged(f)
                            await self.client.request(
                                "GET", f.url or "", headers=headers, label=body.label, accept=body.accept
                            )
                    finally:
                        self.advance(body.take_unreported())
                    expected = (body.end - body.start) if f.size is not None else None
                    if expected is not None and body.written < expected:
                        if body.framed:
                            # Ended where its own Content-Length said: not a connection cut short.
                            raise IntegrityError(
                                f"{body.label}: the server sent {body.start + body.written} of the "
                                f"listed {f.size} bytes"
                            )
                        raise TransientError(
                            f"{body.label}: connection closed after {body.written} of {expected} bytes"
                        )
        except RangeMismatch as e:
            raise IntegrityError(f"{e} ({self.settings.attempts} attempts)") from e
        except TransientError as e:
            raise retried(e, retrying.statistics.get("attempt_number", 1), time.monotonic() - began) from e
        self.record(f, {i for i, _, _ in self._chunks(f)} if (not body.ranged or whole) else {index})
        return bool(body.ranged) and not whole

    def record(self, f: RemoteFile, chunks: set[int]) -> None:
        """Chunks of ``f`` written: recorded at the next checkpoint, and hashed as the prefix grows."""
        st = self._st(f)
        st.chunks.update(chunks)
        self.partial.add(f.path)
        self.dirty = True
        self.landed.set()
        if (hasher := self.hashers.get(f.path)) is not None:
            hasher.poke(st.chunks)

    def advance(self, nbytes: int) -> None:
        if nbytes:
            self.transferred += nbytes
            self.progress.advance(nbytes)

    # -- verification -----------------------------------------------------------------------

    def _hash_for(self, f: RemoteFile) -> tuple[HashCheck | None, bool]:
        """(the source's hash check, whether to compute a sha256 of our own), per the settings."""
        if not self.settings.verify:
            return None, False
        check = check_of(f)
        if check is None:
            return None, self.hash_unhashed
        # Under peer fill, a file checked by a hash a peer can forge (GCS's CRC32C) is hashed with
        # sha256 too: the manifest's sha256 is what lets the next nodes take it from peers.
        return check, self.fill is not None and not peer_safe(check)

    def _hasher(self, f: RemoteFile) -> Hasher | None:
        # Worth it only for files fetched as several ranges; the rest are hashed after the fetch.
        if f.size is None or f.local_path is not None or len(self._chunks(f)) < 2:
            return None
        check, own = self._hash_for(f)
        if check is None and not own:
            return None
        return Hasher(file_hash(check, own, f.size), self._reader(f), self._chunks(f))

    def _reader(self, f: RemoteFile) -> Callable[[], int]:
        target, root = self._target(f), self.dest.root
        return lambda: open_below(target, os.O_RDONLY, below=root)

    def _verify(self, f: RemoteFile, digest: str | None = None) -> tuple[bool, str, str]:
        """(ok, description, method) once the file is synced and closed. The description is the
        sha256 when one is known (the source's, checked, or our own), the mismatch when not ok;
        the method names the hash checked, or "size". ``digest`` is the hash already computed
        while the file downloaded, if any."""
        fd = open_below(self._target(f), os.O_RDONLY, below=self.dest.root)
        try:
            check, own = self._hash_for(f)
            return verify_fd(f, fd, digest, check=check, own=own)
        finally:
            os.close(fd)

    # -- durability -------------------------------------------------------------------------

    def _sync_close(self, f: RemoteFile) -> None:
        fd = self.fds.pop(f.path, None)
        if fd is not None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def _snapshot(self) -> tuple[dict[str, FileProgress], dict[str, FileProgress], list[int]]:
        """What a checkpoint writes, taken on the event loop: a chunk recorded here was written
        before, so syncing the descriptors afterwards makes it durable before it is saved."""
        self.dirty = False
        partial = {}
        for p in self.partial:
            st = self.state.files.get(p)
            if st is not None:
                partial[p] = dataclasses.replace(st, chunks=set(st.chunks))
        finished, self.finished = self.finished, {}
        # .get: a file finished meanwhile is closed by _sync_close in a thread (synced first).
        fds = [fd for p in partial if (fd := self.fds.get(p)) is not None]
        return partial, finished, fds

    async def _checkpoint_loop(self) -> None:
        while True:
            if self.fill is None:
                await asyncio.sleep(self.settings.checkpoint_interval)
            else:
                # Peers get only what is checkpointed: each chunk as it lands (synced, then recorded).
                # Not wait_for: before 3.12 it loses a cancel that comes as the event is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.checkpoint_interval):
                        await self.landed.wait()
                self.landed.clear()
            if self.dirty:
                partial, finished, fds = self._snapshot()
                await asyncio.to_thread(self._sync_and_save, fds, partial, finished)
            if self.fill is not None:
                await asyncio.sleep(PROMPT_GAP)

    def _checkpoint(self) -> None:
        if self.dirty:
            partial, finished, fds = self._snapshot()
            self._sync_and_save(fds, partial, finished)

    def _sync_and_save(
        self, fds: list[int], partial: dict[str, FileProgress], finished: dict[str, FileProgress]
    ) -> None:
        """Sync the data of files with new chunks, then record those chunks (in that order)."""
        for fd in fds:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
        self.state.checkpoint(self.state_path, partial, finished)

    def _close_fds(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    # -- finishing --------------------------------------------------------------------------

    def _unpack(self) -> None:
        (f,) = self.listing.files
        lstat_below(self._target(f), below=self.dest.root)  # a link there (after its check): LinkRefused
        # Rebuilt from the archive every time: nothing left (or planted) in files/ is kept, so no
        # link there can take a member's bytes elsewhere.
        remove_tree(self.files_dir)
        unpack(
            self._target(f),
            self.files_dir,
            archive_type=self.listing.archive or "",
            source=self.listing.source,
        )
