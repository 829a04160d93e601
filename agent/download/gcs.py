"""Google Cloud Storage (``gs://BUCKET/PREFIX``) as a :class:`~agent.download.listing.Listing`.

google-cloud-storage lists the objects (paginated) with their size, generation, md5Hash and crc32c;
the engine then fetches each object through its own client from the JSON API's media URL
(``{endpoint}/download/storage/v1/b/BUCKET/o/NAME?alt=media&generation=N``) with ranges, so an
object replaced during the download answers 404 rather than mixing two generations. Each file is
verified by its crc32c, as google-cloud-storage and gcloud verify downloads (``checksum="auto"``:
CRC32C where google-crc32c's C extension is built, several times cheaper than MD5 on the node's
CPU); by its md5Hash where that extension is missing (the pure-Python CRC32C is far slower) or GCS
gives no crc32c. An object listed with neither (emulators, gateways) takes them from the
``x-goog-hash`` header of its media answer (one 1-byte ranged GET at listing time: GCS sends the
whole object's hashes with every media answer); with none there either, it is checked by size only,
and the summary says so.

Credentials as KServe takes them (kserve_storage.py:909-921, ``_download_gcs``): Application Default
Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's, the metadata server), and anonymous
access (public buckets) when there are none; ``STORAGE_EMULATOR_HOST`` points at an emulator, which
takes no credentials (as google-cloud-storage does). The bearer token travels in a header the engine
never logs; :class:`BearerHeaders` refreshes it before it expires (Google's tokens last an hour).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from agent.download.listing import (
    Listing,
    RemoteFile,
    check_unique,
    checked_path,
    folder_marker,
    paged,
    parent_folders,
)
from localmodel.errors import AccessDenied, DownloadError, SourceNotFound, TransientError
from localmodel.uri import SourceURI

GCS_DEFAULT_ENDPOINT = "https://storage.googleapis.com"
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


@dataclass(frozen=True)
class GcsSettings:
    """How to reach GCS, built at the entry point (:meth:`from_env`) or, later, per cache.

    ``credentials_file``: a credentials JSON (service account key, workload identity federation
    config) or None for Application Default Credentials; ``anonymous``: no credentials at all (also
    what a missing ADC falls back to); ``endpoint``: the API's base URL (an emulator's)."""

    endpoint: str = GCS_DEFAULT_ENDPOINT
    credentials_file: str | None = field(default=None, repr=False)
    anonymous: bool = False
    emulator: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GcsSettings:
        # google-cloud-storage's own rule (client.py, _get_storage_emulator_override): a host without
        # a scheme is http.
        host = (env.get("STORAGE_EMULATOR_HOST") or "").strip().rstrip("/")
        if host and "://" not in host:
            host = f"http://{host}"
        return cls(
            endpoint=host or GCS_DEFAULT_ENDPOINT,
            credentials_file=env.get("GOOGLE_APPLICATION_CREDENTIALS") or None,
            emulator=bool(host),
        )


class BearerHeaders(Mapping[str, str]):
    """``{"Authorization": "Bearer TOKEN"}`` whose token is refreshed when it is about to expire,
    shared by every file of a listing (the engine copies the headers at each request, on its event
    loop: a refresh, about once an hour, holds the loop for at most ``timeout`` seconds). A refresh
    that fails is AccessDenied (refused) or TransientError (no answer), never a traceback."""

    def __init__(self, credentials: Any, timeout: float) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._lock = threading.Lock()

    def _value(self) -> str:
        with self._lock:
            if not self._credentials.valid:
                import google.auth.exceptions
                import google.auth.transport.requests

                request = google.auth.transport.requests.Request()

                def bounded(*args: Any, **kwargs: Any) -> Any:
                    return request(*args, **{**kwargs, "timeout": self._timeout})

                try:
                    self._credentials.refresh(bounded)
                except google.auth.exceptions.RefreshError as e:
                    raise AccessDenied("gs://: the Google credentials could not be refreshed") from e
                except google.auth.exceptions.TransportError as e:
                    raise TransientError(
                        f"gs://: cannot refresh the Google credentials: no answer within {self._timeout:g} s"
                    ) from e
            return f"Bearer {self._credentials.token}"

    def __getitem__(self, key: str) -> str:
        if key != "Authorization":
            raise KeyError(key)
        return self._value()

    def __iter__(self) -> Iterator[str]:
        return iter(("Authorization",))

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "BearerHeaders(<redacted>)"


def credentials(settings: GcsSettings) -> Any | None:
    """The credentials to use, or None for anonymous access. A credentials file that is missing or
    does not parse is AccessDenied naming the setting (never its content)."""
    if settings.anonymous or settings.emulator:
        return None
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        if settings.credentials_file:
            creds = _from_file(settings.credentials_file)
        else:
            creds, _ = google.auth.default(scopes=[READ_ONLY_SCOPE])
    except (DefaultCredentialsError, OSError, ValueError) as e:
        if settings.credentials_file:
            raise AccessDenied(
                f"GOOGLE_APPLICATION_CREDENTIALS: '{settings.credentials_file}' is not a usable "
                "credentials file"
            ) from e
        return None  # as KServe: no credentials found means anonymous access (public buckets)
    return creds


def _from_file(path: str) -> Any:
    """A credentials file by its ``type``: a service account key or gcloud's user credentials by
    their own loaders; other types (workload identity federation...) by google-auth's generic one."""
    import json

    import google.auth

    with open(path, encoding="utf-8") as fh:
        info = json.load(fh)
    kind = info.get("type") if isinstance(info, dict) else None
    if kind == "service_account":
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_info(info, scopes=[READ_ONLY_SCOPE])
    if kind == "authorized_user":
        from google.oauth2 import credentials

        return credentials.Credentials.from_authorized_user_info(info, scopes=[READ_ONLY_SCOPE])
    creds, _ = google.auth.load_credentials_from_file(path, scopes=[READ_ONLY_SCOPE])
    return creds


def list_gcs(
    uri: SourceURI,
    settings: GcsSettings,
    *,
    connect_timeout: float,
    read_timeout: float,
    deadline: float = 120.0,
) -> Listing:
    """The objects of ``gs://BUCKET/KEY``: the one object KEY names, else every object under
    ``KEY/`` (folder markers dropped: ``name/`` and ``name_$folder$`` objects, and empty objects
    named like a folder that has objects). Raises AccessDenied (401/403, naming the bucket),
    SourceNotFound (no bucket, nothing under the prefix), TransientError (timeouts, 429, 5xx, a
    listing unfinished after ``deadline`` seconds), DownloadError (pages that repeat or never end:
    :func:`~agent.download.listing.paged`)."""
    import google.auth.exceptions
    import requests.exceptions
    from google.api_core import exceptions as api
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    source = uri.redacted()
    creds = credentials(settings)
    client = storage.Client(
        project="<none>",  # listing needs no project; without one the client would look it up
        credentials=creds if creds is not None else AnonymousCredentials(),
        client_options={"api_endpoint": settings.endpoint},
    )
    timeout = (connect_timeout, read_timeout)
    ends = time.monotonic() + deadline
    try:
        found, base = _find_blobs(client, uri.bucket, uri.key, timeout, source, deadline)
        # An object listed without a hash (emulators, gateways): the one its media answers carry.
        hashes = {
            b.name: _media_hashes(client._http, _media_url(settings, uri, b), timeout, source, ends)
            for b in found
            if not (b.crc32c or b.md5_hash)
        }
    except api.NotFound as e:
        raise SourceNotFound(f"{source}: bucket {uri.bucket} not found (HTTP 404)") from e
    except (api.Unauthorized, api.Forbidden) as e:
        hint = "set GOOGLE_APPLICATION_CREDENTIALS" if creds is None else "check the credentials' roles"
        raise AccessDenied(f"{source}: access denied to bucket {uri.bucket} (HTTP {e.code}); {hint}") from e
    except (api.TooManyRequests, api.ServerError, api.RetryError) as e:
        raise TransientError(f"{source}: GCS error {getattr(e, 'code', '') or type(e).__name__}") from e
    except api.GoogleAPICallError as e:
        raise DownloadError(f"{source}: GCS error {e.code}") from e
    except google.auth.exceptions.RefreshError as e:
        raise AccessDenied(f"{source}: the Google credentials could not be refreshed") from e
    except google.auth.exceptions.InvalidOperation as e:
        # google-auth's session answers a 401 by refreshing the credentials, which anonymous ones
        # refuse: GCS's answer to an anonymous caller on a private bucket.
        raise AccessDenied(
            f"{source}: access denied to bucket {uri.bucket} (HTTP 401, anonymous caller); "
            "set GOOGLE_APPLICATION_CREDENTIALS"
        ) from e
    except requests.exceptions.ConnectTimeout as e:
        raise TransientError(
            f"{source}: cannot reach {settings.endpoint}: no connection within {connect_timeout:g} s"
        ) from e
    except requests.exceptions.Timeout as e:
        raise TransientError(
            f"{source}: cannot reach {settings.endpoint}: no answer within {read_timeout:g} s"
        ) from e
    except (requests.exceptions.RequestException, google.auth.exceptions.TransportError) as e:
        raise TransientError(f"{source}: cannot reach {settings.endpoint}: {type(e).__name__}") from e
    headers: Mapping[str, str] = BearerHeaders(creds, read_timeout) if creds is not None else {}
    result = _remote_files(found, base, hashes, settings, uri, headers)
    generations = hashlib.sha256("".join(f"{b.name}:{b.generation};" for b in found).encode())
    return Listing(source=source, revision=generations.hexdigest()[:16], files=result)


def _remote_files(
    found: list[Any],
    base: str,
    hashes: Mapping[str, tuple[str | None, str | None]],
    settings: GcsSettings,
    uri: SourceURI,
    headers: Mapping[str, str],
) -> tuple[RemoteFile, ...]:
    """The engine's files of the listed blobs, sorted by path, checked by crc32c where
    google-crc32c's C extension is there (as google-cloud-storage checks), else by md5Hash."""
    import google_crc32c

    source = uri.redacted()
    fast_crc32c = google_crc32c.implementation == "c"
    files = []
    for blob in found:
        path = checked_path(blob.name[len(base) :], source=source)
        listed_crc32c, listed_md5 = hashes.get(blob.name, (blob.crc32c, blob.md5_hash))
        crc32c = _b64_hex(listed_crc32c) if fast_crc32c else None
        files.append(
            RemoteFile(
                path=path,
                size=int(blob.size or 0),
                md5=None if crc32c else _b64_hex(listed_md5),
                crc32c=crc32c,
                url=_media_url(settings, uri, blob),
                headers=headers,
                ranges=True,
            )
        )
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    return result


def _find_blobs(
    client: Any, bucket: str, prefix: str, timeout: tuple[float, float], source: str, deadline: float
) -> tuple[list[Any], str]:
    """(the objects to fetch, the name prefix their paths are relative to): the one object ``prefix``
    names, else every object under ``prefix/`` less the folder markers (listed within ``deadline``
    seconds); SourceNotFound when there is none."""
    base = prefix
    if prefix and not prefix.endswith("/"):
        blob = client.bucket(bucket).get_blob(prefix, timeout=timeout, retry=None)
        if blob is not None and int(blob.size or 0) > 0:
            return [blob], prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        prefix = base = prefix + "/"
    pages = client.list_blobs(bucket, prefix=prefix, timeout=timeout, retry=None)
    found = _drop_folder_markers(
        paged(pages.pages, lambda: pages.next_page_token, source=source, seconds=deadline)
    )
    if not found:
        raise SourceNotFound(f"{source}: no objects under this prefix")
    return found, base


def _media_url(settings: GcsSettings, uri: SourceURI, blob: Any) -> str:
    """The JSON API's media URL of ``blob`` at its listed generation."""
    return (
        f"{settings.endpoint}/download/storage/v1/b/{quote(uri.bucket, safe='')}/o/"
        f"{quote(blob.name, safe='')}?alt=media&generation={blob.generation}"
    )


def _media_hashes(
    session: Any, url: str, timeout: tuple[float, float], source: str, ends: float
) -> tuple[str | None, str | None]:
    """(crc32c, md5) in base64, as the ``x-goog-hash`` header of the object's media answer gives them
    (``crc32c=...,md5=...``, in one header or two), for an object listed without either: GCS sends
    the whole object's hashes with every media answer, a one-byte range included. (None, None) when
    the answer has none or is not a success (the download reports what is wrong); TransientError
    once the listing's time (``ends``, ``time.monotonic()``) is spent."""
    if time.monotonic() > ends:
        raise TransientError(f"{source}: no whole listing within the listing deadline")
    with session.get(url, headers={"Range": "bytes=0-0"}, timeout=timeout, stream=True) as answer:
        if answer.status_code not in (200, 206):
            return None, None
        found = dict(
            part.strip().partition("=")[::2] for part in answer.headers.get("x-goog-hash", "").split(",")
        )
    return found.get("crc32c") or None, found.get("md5") or None


def _drop_folder_markers(blobs: list[Any]) -> list[Any]:
    folders = parent_folders(b.name for b in blobs)
    return [b for b in blobs if not folder_marker(b.name, int(b.size or 0), folders)]


def _b64_hex(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None
