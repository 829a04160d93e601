"""Scan, plan, execute for one model: list the source, compare with what is published, fetch the rest.

The entry point both ``modelcache pull`` and the agent use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from agent.download.client import ClientSettings, HttpClient
from agent.download.engine import Transfer
from agent.download.listing import Listing
from agent.download.ownership import Match, folder_match
from agent.download.peers import PeerSource
from agent.download.source_settings import SourceSettings
from agent.download.sources import list_source
from agent.download.staging import Destination, LinkRefused, finish_publish, remove_tree
from agent.download.transfer import ProgressSink, PullResult, TransferSettings, same_files
from agent.download.unpack import unpack_limit
from localmodel.errors import (
    AccessDenied,
    DiskFull,
    DownloadError,
    SourceNotAllowed,
    SourceNotFound,
    UnsafePath,
    from_os_error,
)
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import Manifest
from localmodel.uri import SourceURI


def http_client(settings: TransferSettings) -> HttpClient:
    """The client for every download of a process: its connection limit and byte-rate cap are global."""
    return HttpClient(
        ClientSettings(
            concurrency=settings.concurrency,
            read_size=settings.read_size,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_bandwidth=settings.max_bandwidth,
            proxies=settings.proxies,
            low_speed_limit=settings.low_speed_limit,
            low_speed_time=settings.low_speed_time,
            ca_bundle=settings.ca_bundle,
            allow_private=settings.allow_private,
        )
    )


async def pull(
    uri: SourceURI,
    dest: Destination,
    *,
    sources: SourceSettings,
    transfer: TransferSettings,
    progress: ProgressSink | None = None,
    client: HttpClient | None = None,
    admit: Callable[[Listing], None] | None = None,
    max_bytes: int | None = None,
    peers: PeerSource | None = None,
) -> PullResult:
    """Make ``dest`` hold exactly what ``uri`` holds now, verified; resumes what a crash left.

    ``admit`` sees the listing before any byte is fetched and may raise to refuse it (the agent
    checks the real size against the node's capacity there). ``max_bytes`` caps what an archive
    source may unpack to (the declared modelSize), besides the free space and the ratio limit.
    ``peers``: peer fill on, with these peers to ask before the origin (:mod:`agent.download.peers`);
    the listing still comes from the origin, and every byte is checked the same way.

    Every failure is a :class:`DownloadError`: an OSError from any step (the disk filling while the
    resume state is written, a publish into a read-only folder) is mapped here, once, into
    ``DiskFull``, ``PermissionDenied`` or ``DownloadError`` with its one-line text. A destination
    that is someone else's files (:class:`ForeignFolder`) or behind a link (``LinkRefused``) is
    refused before anything is fetched.
    """
    try:
        return await _pull(
            uri,
            dest,
            sources=sources,
            transfer=transfer,
            progress=progress,
            client=client,
            admit=admit,
            max_bytes=max_bytes,
            peers=peers,
        )
    except OSError as e:
        raise _on_dest_filesystem(from_os_error(e), dest) from e
    except DiskFull as e:
        mapped = _on_dest_filesystem(e, dest)
        if mapped is e:
            raise
        raise mapped from e


def _on_dest_filesystem(e: DownloadError, dest: Destination) -> DownloadError:
    """A full disk under ``modelcache pull DEST`` (not in a cache) is DEST's filesystem, not "the
    cache's" that the shared wording (engine, unpack, :func:`from_os_error`) says."""
    if not isinstance(e, DiskFull) or CacheLayout.of_model_dir(dest.final) is not None:
        return e
    text = str(e).replace("the cache's filesystem", f"DEST's filesystem ({dest.final.parent})")
    return DiskFull(text) if text != str(e) else e


# Failures no later run of the same command gets past: what was staged for them is only dead weight.
FINAL = (AccessDenied, SourceNotFound, SourceNotAllowed, UnsafePath)


def after_failure(dest: Destination, error: BaseException) -> Path | None:
    """What becomes of ``dest``'s staging after a pull failed with ``error`` (or was interrupted):
    the staging folder when it is kept for a resume, None when there is none or it was dropped.

    Dropped when the failure is final (:data:`FINAL`: access denied, not found, a source not
    allowed, an unsafe path in the source): the same command would fail the same way. Kept otherwise
    (a network error, a full disk, an interrupt), since the next run resumes from it. Nothing is
    deleted through a link (a planted link is itself the ``UnsafePath``) or when the staging is not
    a plain folder of ours."""
    if isinstance(error, FINAL) and not isinstance(error, LinkRefused):
        try:
            dest.check_links()
        except LinkRefused:
            return None
        with contextlib.suppress(OSError):
            remove_tree(dest.staging)
        return None
    return dest.staging if dest.staging.is_dir() and not dest.staging.is_symlink() else None


def up_to_date(dest: Destination, published: Manifest, listing: Listing, key: str) -> bool:
    """Nothing to fetch: the manifest is for the same source (its storage key is ``key``, the key of
    the URI asked for), lists what the source holds now (:func:`same_files`), and the folder holds
    exactly those files with their sizes (:func:`folder_match`). A file deleted from the folder or
    another URI with the same file names is fetched, never reported "up to date"."""
    return (
        published.storage_key == key
        and same_files(published, listing)
        and folder_match(dest.final, published) is Match.INTACT
    )


async def _pull(
    uri: SourceURI,
    dest: Destination,
    *,
    sources: SourceSettings,
    transfer: TransferSettings,
    progress: ProgressSink | None,
    client: HttpClient | None,
    admit: Callable[[Listing], None] | None,
    max_bytes: int | None,
    peers: PeerSource | None,
) -> PullResult:
    started = time.monotonic()
    own = client is None
    client = client or http_client(transfer)
    try:
        await asyncio.to_thread(dest.check_links)
        await asyncio.to_thread(finish_publish, dest)
        await asyncio.to_thread(dest.refuse_foreign)  # before a byte is fetched, not at publish
        listing = await list_source(uri, settings=sources, client=client)
        published = await asyncio.to_thread(dest.published)
        key = storage_key(uri.raw)
        if published is not None and await asyncio.to_thread(up_to_date, dest, published, listing, key):
            return PullResult(
                files=len(published.files),
                bytes_total=published.total_bytes,
                bytes_transferred=0,
                seconds=time.monotonic() - started,
                revision=listing.revision,
                up_to_date=True,
            )
        if admit is not None:
            admit(listing)
        run = Transfer(
            listing,
            dest,
            uri=uri.redacted(),  # the manifest is a state file: no signed query in it
            storage_key=key,
            client=client,
            settings=transfer,
            progress=progress,
            previous=published,
            peers=peers,
        )
        # The engine unpacks in a thread: the limit travels in the context (asyncio.to_thread copies it).
        token = unpack_limit.set(max_bytes)
        try:
            return await run.run()
        finally:
            unpack_limit.reset(token)
    finally:
        if own:
            client.close()
