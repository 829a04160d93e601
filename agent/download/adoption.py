"""Adopt a model folder another writer filled (KServe's agent): list the source, check what is
there, fetch only what is missing or wrong, in place, then write our manifest. The decisions are
:mod:`agent.adopt`'s; this is the I/O around them.

In place, because running pods mount ``models/<key>`` by subPath: the folder is never renamed,
swapped or removed. A file fetched again is assembled in the staging folder (same filesystem),
verified, then renamed over the file it replaces: a reader holding the old file open keeps reading
it, one opening the path afterwards gets the new one, never a mix. Files that match keep their inode.
The manifest is written last; until then the folder stays foreign (a crash in between adopts again,
and what was already moved in place now matches). No symbolic link is followed anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.adopt import Adoption, Found, Kind, Survey, decide, named, survey
from agent.download.client import HttpClient
from agent.download.engine import Transfer
from agent.download.listing import Listing, RemoteFile
from agent.download.localcopy import open_source
from agent.download.ownership import Match, folder_match, names_key
from agent.download.pull import http_client, up_to_date
from agent.download.s3 import first_part_sizes
from agent.download.source_settings import SourceSettings
from agent.download.sources import list_source
from agent.download.staging import (
    FILE_MODE,
    Destination,
    open_below,
    remove_tree,
    rename_below,
    write_atomic,
)
from agent.download.transfer import ProgressSink, TransferSettings
from localmodel.errors import DownloadError, ForeignFolder, from_os_error
from localmodel.layout import storage_key
from localmodel.manifest import FileEntry, HashCheck, Manifest
from localmodel.quantity import readable
from localmodel.timestamps import utc_now
from localmodel.uri import SourceURI

_BLOCK = 8 << 20


@dataclass(frozen=True)
class AdoptResult:
    files: int  # in the manifest written
    bytes_total: int
    kept: int  # files found matching, left as they were (same inode)
    fetched: int  # files fetched (missing or wrong), renamed into place
    created: int  # empty files created (the source lists them; KServe skips empty S3 objects)
    bytes_kept: int
    bytes_fetched: int  # the size of the files fetched (placed from the source, this try or before)
    extras: tuple[str, ...]  # entries the source does not list: kept, never ours
    revision: str | None
    seconds: float
    verified: int  # files checked by content (kept: by a source hash, a multipart ETag or the
    # file:// source's bytes; fetched: by the source's hash)
    size_only: int  # files checked by their size alone (fetched from a source without hashes)
    up_to_date: bool = False  # adopted before, and still what the source holds: nothing checked
    # Bytes received from the source by this try; less than bytes_fetched when an earlier try,
    # failed after its transfer (a folder it could not write), left them staged.
    bytes_received: int = 0
    kept_by: Mapping[str, int] = field(default_factory=dict)  # how the kept files were checked


def needs_adoption(dest: Destination, key: str | None = None) -> bool:
    """``dest.final`` is a non-empty folder that is not plainly ours: no manifest of ours names it
    (or it names another key), or it holds entries the manifest does not name, or the manifest
    records extras (an adopted folder is only ever repaired in place). ``key``: the storage key
    the folder is at, in a cache."""
    try:
        st = os.lstat(dest.final)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    with os.scandir(dest.final) as entries:
        if not any(entries):
            return False
    manifest = dest.published()
    if manifest is None:
        return True
    if key is not None and not names_key(manifest, key):
        return True  # another model's manifest does not make the folder ours
    return bool(manifest.extras) or folder_match(dest.final, manifest) is Match.FOREIGN


def inventory(folder: Path) -> tuple[Found, ...]:
    """Every entry below ``folder`` (relative POSIX paths), links reported as links, not followed."""
    found: list[Found] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(folder / rel if rel else folder) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    found.append(Found(path, Kind.LINK))
                elif stat.S_ISDIR(st.st_mode):
                    found.append(Found(path, Kind.DIR))
                    pending.append(path)
                elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    found.append(Found(path, Kind.HARDLINKED))
                elif stat.S_ISREG(st.st_mode):
                    found.append(Found(path, Kind.FILE, st.st_size))
                else:
                    found.append(Found(path, Kind.OTHER))
    return tuple(found)


def hash_files(
    dest: Destination,
    to_hash: Mapping[str, HashCheck | None],
    unhashed: Mapping[str, RemoteFile] | None = None,
    part_sizes: Mapping[str, int] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """(path -> the hex digest of each file by its check, sha256 where None; path -> how a file of
    ``unhashed`` (those the source gives no hash for) was checked otherwise: "s3-multipart-etag"
    when its multipart ETag, computed with the part size of ``part_sizes``, is the source's, or
    "source-bytes" when its bytes are those of the ``file://`` source file). A file that cannot be
    read is left out of both (fetched again); so is, from the second, one whose check failed or
    that has no such check. Opened below the destination's root, no link followed."""
    digests: dict[str, str] = {}
    confirmed: dict[str, str] = {}
    unhashed = unhashed or {}
    part_sizes = part_sizes or {}
    for path, check in to_hash.items():
        try:
            fd = open_below(dest.final / path, os.O_RDONLY, below=dest.root)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            h = check.new(size) if check is not None else hashlib.sha256()
            f = unhashed.get(path) if check is None else None
            other = _other_check(f, part_sizes.get(path), dest, size) if f is not None else None
            while block := os.read(fd, _BLOCK):
                h.update(block)
                if other is not None:
                    other.update(block)
            digests[path] = h.hexdigest()
            if other is not None and other.matches():
                confirmed[path] = other.name
        except (OSError, DownloadError):
            continue
        finally:
            os.close(fd)
    return digests, confirmed


class _MultipartEtag:
    """S3's ETag of a multipart upload, from the bytes: md5 of the concatenated binary md5s of the
    parts, "-" and the number of parts (every part but the last ``part_size`` bytes). Not an AWS
    specification but what S3 (and moto, MinIO, Ceph) compute; a file that does not give the
    source's ETag is fetched, so a store computing it otherwise costs a fetch, never a wrong keep."""

    name = "s3-multipart-etag"

    def __init__(self, expected: str, part_size: int) -> None:
        self.expected = expected
        self.part_size = part_size
        self.digests: list[bytes] = []
        self.part = hashlib.md5(usedforsecurity=False)
        self.filled = 0

    def update(self, block: bytes) -> None:
        view = memoryview(block)
        while view:
            n = min(len(view), self.part_size - self.filled)
            self.part.update(view[:n])
            self.filled += n
            view = view[n:]
            if self.filled == self.part_size:
                self.digests.append(self.part.digest())
                self.part = hashlib.md5(usedforsecurity=False)
                self.filled = 0

    def matches(self) -> bool:
        digests = self.digests + ([self.part.digest()] if self.filled else [])
        whole = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{whole}-{len(digests)}" == self.expected


class _SameBytes:
    """The file's bytes against those of the ``file://`` source file (read as the copy reads it,
    no link followed)."""

    name = "source-bytes"

    def __init__(self, reader: io.BufferedReader, size: int) -> None:
        self.reader = reader
        self.same = os.fstat(reader.fileno()).st_size == size

    def update(self, block: bytes) -> None:
        if self.same:
            self.same = self.reader.read(len(block)) == block

    def matches(self) -> bool:
        try:
            return self.same and self.reader.read(1) == b""
        finally:
            self.reader.close()


def _other_check(
    f: RemoteFile, part_size: int | None, dest: Destination, size: int
) -> _MultipartEtag | _SameBytes | None:
    if f.multipart_etag is not None and part_size is not None:
        return _MultipartEtag(f.multipart_etag, part_size)
    if f.local_path is not None:
        return _SameBytes(open_source(f.local_path, str(dest.final), f.path), size)
    return None  # http(s) and the like: nothing to check the bytes by, so fetched again


def _unchanged(published: Manifest, listing: Listing, *, seconds: float) -> AdoptResult:
    """The result of an adoption found up to date: every published file kept, nothing fetched."""
    return AdoptResult(
        files=len(published.files),
        bytes_total=published.total_bytes,
        kept=len(published.files),
        fetched=0,
        created=0,
        bytes_kept=published.total_bytes,
        bytes_fetched=0,
        extras=published.extras,
        revision=listing.revision,
        seconds=seconds,
        verified=0,
        size_only=0,
        up_to_date=True,
    )


async def adopt(
    uri: SourceURI,
    dest: Destination,
    *,
    sources: SourceSettings,
    transfer: TransferSettings,
    progress: ProgressSink | None = None,
    client: HttpClient | None = None,
    admit: Callable[[Listing], None] | None = None,
    recheck: bool = False,
) -> AdoptResult:
    """Make ``dest.final`` (a folder someone else filled) hold what ``uri`` holds now, in place, and
    write our manifest for it (:mod:`agent.adopt`'s rules). Raises :class:`ForeignFolder` when the
    folder cannot be adopted (a link, a special file, an archive source, a layout clash: nothing
    changed), and every failure of listing or fetching as :func:`agent.download.pull.pull` does
    (the folder then stays as it was, foreign, and the next try starts again). A folder adopted
    before whose files still have the listed sizes is up to date, unless ``recheck`` (the agent
    adopts again only a folder it found damaged: every file is hashed)."""
    started = time.monotonic()
    where = f"{uri.redacted()}: {dest.final}"
    own = client is None
    client = client or http_client(transfer)
    try:
        await asyncio.to_thread(dest.check_links)
        listing = await list_source(uri, settings=sources, client=client)
        published = await asyncio.to_thread(dest.published)
        key = storage_key(uri.raw)
        fresh = published is not None and not recheck
        if fresh and published and await asyncio.to_thread(up_to_date, dest, published, listing, key):
            return _unchanged(published, listing, seconds=time.monotonic() - started)
        found = await asyncio.to_thread(inventory, dest.final)
        plan = survey(listing, found, where=str(dest.final))
        if plan.refusal is not None:
            raise ForeignFolder(plan.refusal)
        adoption, how = await _checked(uri, dest, sources, listing, plan)
        if admit is not None:
            admit(listing)
        fetched: dict[str, FileEntry] = {}
        transferred = 0
        checked_by_hash = len(adoption.keep)
        if adoption.fetch:
            run = Transfer(
                Listing(listing.source, listing.revision, adoption.fetch),
                dest,
                uri=uri.redacted(),
                storage_key=storage_key(uri.raw),
                client=client,
                settings=transfer,
                progress=progress,
                publish=False,
            )
            result = await run.run()
            transferred = result.bytes_transferred
            checked_by_hash += sum(result.hash_checked.values())
            fetched = {e.path: e for e in run.staged.files} if run.staged is not None else {}
        manifest = await asyncio.to_thread(_place, dest, listing, adoption, fetched, uri, how)
    except OSError as e:
        raise from_os_error(e, where) from e
    finally:
        if own:
            client.close()
    return AdoptResult(
        files=len(manifest.files),
        bytes_total=manifest.total_bytes,
        kept=len(adoption.keep),
        fetched=len(adoption.fetch),
        created=len(adoption.create),
        bytes_kept=adoption.kept_bytes,
        bytes_fetched=adoption.fetch_bytes,
        bytes_received=transferred,
        extras=adoption.extras,
        revision=listing.revision,
        seconds=time.monotonic() - started,
        verified=checked_by_hash,
        size_only=len(manifest.files) - checked_by_hash,
        kept_by=dict(Counter(how[e.path] for e in adoption.keep)),
    )


async def _checked(
    uri: SourceURI, dest: Destination, sources: SourceSettings, listing: Listing, plan: Survey
) -> tuple[Adoption, dict[str, str]]:
    """The adoption once the folder's files are checked, and path -> how each file kept was checked
    (the hash's name, or :func:`hash_files`' words) or "fetched"."""
    listed = {f.path: f for f in listing.files}
    unhashed = {p: listed[p] for p, check in plan.to_hash.items() if check is None}
    parts = (
        await asyncio.to_thread(first_part_sizes, uri, sources, unhashed.values())
        if uri.scheme == "s3"
        else {}
    )
    digests, confirmed = await asyncio.to_thread(hash_files, dest, plan.to_hash, unhashed, parts)
    adoption = decide(listing, plan, digests, confirmed)
    how: dict[str, str] = {}
    for e in adoption.keep:
        check = plan.to_hash.get(e.path)
        how[e.path] = check.name if check is not None else confirmed[e.path]
    how |= {f.path: "fetched" for f in adoption.fetch}
    return adoption, how


def adopted_words(uri: str, where: str, r: AdoptResult) -> str:
    """The words for an adoption of ``where`` (``models/<key>``, DEST), in the agent's Event and log
    line and ``modelcache pull --adopt``'s summary (``uri`` already redacted)."""
    if r.up_to_date:
        theirs = f"; {named(r.extras)} not ours, kept" if r.extras else ""
        return f"{uri} in {where} is up to date (adopted before{theirs})"
    by = ", ".join(f"{n} by {_HOW.get(k, k)}" for k, n in sorted(r.kept_by.items()))
    received = (
        f", {readable(r.bytes_received)} of it received by this try, the rest staged by an earlier one"
        if r.bytes_received < r.bytes_fetched
        else ""
    )
    text = (
        f"{uri} adopted in {where}: {r.kept} file(s) kept ({readable(r.bytes_kept)}"
        f"{'; checked ' + by if by else ''}), "
        f"{r.fetched} fetched ({readable(r.bytes_fetched)}{received})"
    )
    if r.created:
        text += f", {r.created} empty file(s) created"
    if r.extras:
        n = len(r.extras)
        text += (
            f"; {n} entr{'y' if n == 1 else 'ies'} the source does not list kept, never deleted: "
            f"{named(r.extras)}"
        )
    return text


_HOW = {
    "s3-multipart-etag": "S3 multipart ETag",
    "source-bytes": "comparing with the source file",
}


def _read_only(path: Path, below: Path, *, theirs: bool = False) -> None:
    """Make the file read-only; ``theirs``: a kept file, which another hard link made since it was
    surveyed would make reachable from a path not ours: ForeignFolder, nothing changed."""
    fd = open_below(path, os.O_RDONLY, below=below)  # no link followed
    try:
        if theirs and os.fstat(fd).st_nlink > 1:
            raise ForeignFolder(f"{path} has other hard links since it was checked; not adopted")
        with contextlib.suppress(OSError):
            # Best effort: a file of another owner stays as it is, still checked by the manifest.
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _place(
    dest: Destination,
    listing: Listing,
    adoption: Adoption,
    fetched: Mapping[str, FileEntry],
    uri: SourceURI,
    how: Mapping[str, str],
) -> Manifest:
    """Make the kept files read-only where we may (refused, nothing changed, for one hard-linked
    since the survey), move the fetched and created files into place (each renamed over what is
    there), then write the manifest, with ``how`` each file was checked: the folder is ours from
    then on."""
    for entry in adoption.keep:
        # Published files are read-only (staging.py); folders are left as found, so the writer
        # they came from can still manage them after a rollback.
        _read_only(dest.final / entry.path, dest.root, theirs=True)
    files_dir = dest.staging / "files"
    for f in adoption.create:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = open_below(files_dir / f.path, flags, below=dest.root, make_parents=True)
        os.close(fd)
    for path in [*(f.path for f in adoption.fetch), *(f.path for f in adoption.create)]:
        staged = files_dir / path
        _read_only(staged, dest.root)
        rename_below(staged, dest.final / path, src_below=dest.root, dst_below=dest.root)
    kept = {e.path: e for e in adoption.keep}
    created = {f.path: f.entry() for f in adoption.create}
    entries = tuple(kept.get(f.path) or fetched.get(f.path) or created[f.path] for f in listing.files)
    manifest = Manifest(
        source_model_uri=uri.redacted(),
        storage_key=storage_key(uri.raw),
        revision=listing.revision,
        files=entries,
        published_at=utc_now(),
        extras=adoption.extras,
        checked_by={f.path: how.get(f.path, "created empty") for f in listing.files},
    )
    write_atomic(dest.manifest, json.dumps(manifest.to_json(), indent=1).encode(), below=dest.root)
    remove_tree(dest.staging)
    return manifest
