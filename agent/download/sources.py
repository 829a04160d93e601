"""Sources: each turns a URI into a :class:`Listing`, with a module per kind; this one picks the
kind, bounds and retries the listing, and lists http(s) sources itself. Each kind's module is the
one place its library's errors are mapped into the project's error tree. Settings:
:mod:`agent.download.source_settings`.

- hf: :mod:`agent.download.hf` (huggingface_hub resolves the revision to a commit sha and lists
  the tree; files are fetched from ``/{repo}/resolve/{sha}/{path}``).
- s3: :mod:`agent.download.s3` (boto3 lists and presigns a GET per object; folder markers are not
  files of the model).
- gs: :mod:`agent.download.gcs` (google-cloud-storage lists; the engine fetches the JSON API's
  media URLs with ranges, verified by crc32c, or md5Hash without google-crc32c's C extension).
- Azure Blob and ADLS Gen2: :mod:`agent.download.azure` (azure-storage-blob lists and signs a
  read-only SAS; verified by Content-MD5 where the blob has one).
- http(s): one HEAD for the size and the ETag; archives are fetched then unpacked.
- file: :mod:`agent.download.filesystem` (a folder or a file on a local or mounted filesystem,
  under the allowed prefixes).

Every wait is bounded: the hub's and S3's clients get :attr:`SourceSettings.connect_timeout` and
:attr:`SourceSettings.read_timeout`, the HEAD the engine's client's own; a listing that fails with a
:class:`~localmodel.errors.TransientError` (a timeout, a refused connection, 429, 5xx) is tried
:attr:`SourceSettings.list_attempts` times with jittered exponential backoff, then fails with one
line naming the endpoint ("cannot reach http://host:port: no answer within 30 s").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote, urlsplit

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from agent.download.azure import list_azure
from agent.download.client import HttpClient, Response
from agent.download.filesystem import list_file
from agent.download.gcs import list_gcs
from agent.download.hf import list_hf
from agent.download.http_status import http_status_error
from agent.download.listing import Listing, RemoteFile, check_not_empty, checked_path
from agent.download.s3 import list_s3
from agent.download.source_settings import SourceSettings, check_source_endpoint, no_answer
from agent.download.wording import retried
from localmodel.errors import (
    TransientError,
    UnsafePath,
)
from localmodel.text import printable
from localmodel.uri import SourceURI

log = logging.getLogger("modelcache.download")


async def list_source(uri: SourceURI, *, settings: SourceSettings, client: HttpClient) -> Listing:
    """The source's listing, tried up to ``settings.list_attempts`` times on TransientError.

    Raises the DownloadError of the last attempt; SourceNotFound for a model that is one empty file.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(settings.list_attempts),
        wait=_backoff(settings),
        before_sleep=_log_retry(uri),
        reraise=True,
    )
    listing: Listing | None = None
    started = time.monotonic()
    try:
        async for attempt in retrying:
            with attempt:
                listing = await _list_once(uri, settings, client)
    except TransientError as e:
        raise retried(e, retrying.statistics.get("attempt_number", 1), time.monotonic() - started) from e
    assert listing is not None
    check_not_empty(listing)
    return listing


async def _list_once(uri: SourceURI, settings: SourceSettings, client: HttpClient) -> Listing:
    if uri.scheme == "file":
        return await asyncio.to_thread(list_file, uri, settings)
    if uri.scheme == "hf":
        endpoint, listed = settings.hf_endpoint, _in_daemon_thread(list_hf, uri, settings)
    elif uri.scheme == "s3":
        endpoint, listed = settings.s3_endpoint or "S3", _in_daemon_thread(list_s3, uri, settings)
    elif uri.scheme == "gs":
        # The SDKs connect by themselves: their endpoint is checked as the hub's and S3's are.
        endpoint = settings.gcs.endpoint
        await asyncio.to_thread(check_source_endpoint, endpoint, settings, uri.redacted())
        listed = _in_daemon_thread(_list_gcs, uri, settings)
    elif uri.scheme == "azure":
        endpoint = settings.azure.endpoint or f"https://{uri.host}"
        await asyncio.to_thread(check_source_endpoint, endpoint, settings, uri.redacted())
        listed = _in_daemon_thread(_list_azure, uri, settings)
    else:
        endpoint, listed = uri.redacted(), asyncio.ensure_future(_list_http(uri, client))
    try:
        return await asyncio.wait_for(listed, settings.list_deadline)
    except TimeoutError:
        raise no_answer(
            uri.redacted(), endpoint, settings.list_deadline, "no whole listing (answers too slow)"
        ) from None


def _list_gcs(uri: SourceURI, settings: SourceSettings) -> Listing:
    return list_gcs(
        uri,
        settings.gcs,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        deadline=settings.list_deadline,
    )


def _list_azure(uri: SourceURI, settings: SourceSettings) -> Listing:
    return list_azure(
        uri,
        settings.azure,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        deadline=settings.list_deadline,
    )


def _in_daemon_thread(
    fn: Callable[[SourceURI, SourceSettings], Listing], uri: SourceURI, settings: SourceSettings
) -> asyncio.Future[Listing]:
    """Run a blocking listing in a thread of its own that a deadline may abandon: huggingface_hub's
    and botocore's timeouts bound each read, not an answer trickled a byte at a time, and a thread of
    the default executor would be joined at exit (a ``pull`` that never ends). The abandoned thread
    ends when its server closes the connection or the process exits."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Listing] = loop.create_future()

    def settle(result: Listing | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(Listing, result))

    def work() -> None:
        result: Listing | None = None
        error: BaseException | None = None
        try:
            result = fn(uri, settings)
        except BaseException as e:  # handed to the awaiting task, raised there
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: the caller gave up long ago
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="modelcache-list", daemon=True).start()
    return future


def _backoff(settings: SourceSettings) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        base = min(30.0, settings.list_backoff * 2 ** (state.attempt_number - 1))
        delay = random.uniform(base / 2, base)  # noqa: S311 - jitter, not crypto
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, TransientError) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, 30.0))
        return delay

    return wait


def _log_retry(uri: SourceURI) -> Callable[[RetryCallState], None]:
    # INFO: the agent shows it; `pull` (no logging set up) keeps stderr to the one final line.
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        attempt = state.attempt_number + 1
        log.info("listing %s failed (%s); attempt %d in %.1f s", uri, error, attempt, wait)

    return before_sleep


# -- HTTP(S) --------------------------------------------------------------------------------------


async def _list_http(uri: SourceURI, client: HttpClient) -> Listing:
    source = uri.redacted()
    parts = urlsplit(uri.url)
    origin = f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    encoded = parts.path.rstrip("/").rsplit("/", 1)[-1]
    name = unquote(encoded)
    if "/" in name:
        raise UnsafePath(f"{source}: refusing file name '{printable(name)}': it holds a '/'")
    checked_path(name, source=source)
    seen: list[Response] = []

    def accept(response: Response) -> None:
        if response.status >= 400 and response.status != 405:  # 405: no HEAD; the GET will tell
            raise http_status_error(source, response.status)
        seen.append(response)

    try:
        await client.request("HEAD", uri.url, headers={}, label=source, accept=accept)
    except TransientError as e:
        # The engine's client bounds the connect and every read; it says "timed out" for both.
        if isinstance(e.__cause__, TimeoutError):
            raise no_answer(source, origin, max(client.connect_timeout, client.read_timeout)) from e
        raise
    (response,) = seen
    size = response.content_length if response.status < 400 else None
    etag = response.headers.get("ETag", "")
    file = RemoteFile(path=name, size=size, url=uri.url)
    revision = hashlib.sha256(f"{etag}:{size}".encode()).hexdigest()[:16] if etag else None
    return Listing(source=source, revision=revision, files=(file,), archive=uri.archive_suffix)
