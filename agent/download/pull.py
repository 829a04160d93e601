"""Scan, plan, execute for one model: list the source, compare with what is published, fetch the rest.

The entry point both ``modelcache pull`` and the agent use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from agent.download.engine import ProgressSink, PullResult, Transfer, TransferSettings, same_files
from agent.download.listing import Listing
from agent.download.sources import SourceSettings, list_source
from agent.download.staging import Destination, finish_publish
from localmodel.layout import storage_key
from localmodel.uri import SourceURI


def client_session(settings: TransferSettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=settings.concurrency, limit_per_host=settings.concurrency)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    # A larger read buffer means fewer, bigger writes; memory stays concurrency x this.
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=settings.read_size, auto_decompress=False
    )


async def pull(
    uri: SourceURI,
    dest: Destination,
    *,
    sources: SourceSettings,
    transfer: TransferSettings,
    progress: ProgressSink | None = None,
    session: aiohttp.ClientSession | None = None,
    admit: Callable[[Listing], None] | None = None,
) -> PullResult:
    """Make ``dest`` hold exactly what ``uri`` holds now, verified; resumes what a crash left.

    ``admit`` sees the listing before any byte is fetched and may raise to refuse it (the agent
    checks the real size against the node's capacity there).
    """
    started = time.monotonic()
    own = session is None
    session = session or client_session(transfer)
    try:
        await asyncio.to_thread(finish_publish, dest)
        listing = await list_source(uri, settings=sources, session=session)
        published = await asyncio.to_thread(dest.published)
        if published is not None and same_files(published, listing):
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
            storage_key=storage_key(uri.raw),
            session=session,
            settings=transfer,
            progress=progress,
            previous=published,
        )
        return await run.run()
    finally:
        if own:
            await session.close()
