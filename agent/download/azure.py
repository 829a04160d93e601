"""Azure Blob Storage (and ADLS Gen2 through its blob endpoint) as a
:class:`~agent.download.listing.Listing`.

``https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH[?SAS]`` (and the other forms
:mod:`localmodel.uri` accepts): azure-storage-blob lists the blobs (paginated, 5,000 a page) with
their size, ETag and Content-MD5; the engine fetches each blob through its own client with ranges,
from a URL that carries a read-only SAS (``sp=r``), so no key or token is in any header. Each blob is
verified by its Content-MD5 where it has one (Put Blob sets it; blobs uploaded in blocks may not).

Credentials as KServe takes them (kserve_storage.py:1141-1150, 1365-1393): a service principal
(``AZ_CLIENT_ID``/``AZ_CLIENT_SECRET``/``AZ_TENANT_ID``, or the ``AZURE_*`` names azure-identity
reads; a client id alone is a workload or managed identity), else the account key
``AZURE_STORAGE_ACCESS_KEY``, else a SAS in the URL, else anonymous access (public containers).
With a principal the files' SAS is a user delegation SAS; with the key, a service SAS; both last
:data:`SAS_HOURS` hours. The SAS never leaves the URL, which is never logged (only
:meth:`SourceURI.redacted`).

``AZURE_STORAGE_BLOB_ENDPOINT`` (ours, for emulators such as Azurite, like ``AWS_ENDPOINT_URL``)
replaces ``https://ACCOUNT.blob.core.windows.net`` with another account URL
(``http://127.0.0.1:10000/devstoreaccount1``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from agent.download.listing import Listing, RemoteFile, check_unique, checked_path, paged, parent_folders
from localmodel.errors import AccessDenied, DownloadError, SourceNotFound, TransientError
from localmodel.uri import SourceURI

SAS_HOURS = 12


@dataclass(frozen=True)
class AzureSettings:
    """How to reach Azure Blob, built at the entry point (:meth:`from_env`) or, later, per cache.
    Secrets are never in the repr."""

    access_key: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    tenant_id: str | None = None
    endpoint: str | None = None  # an account URL replacing https://ACCOUNT.blob.core.windows.net

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AzureSettings:
        # KServe maps AZ_* onto the AZURE_* names azure-identity reads (kserve_storage.py:1365-1377).
        def pick(name: str) -> str | None:
            return env.get(f"AZ_{name}") or env.get(f"AZURE_{name}") or None

        return cls(
            access_key=env.get("AZURE_STORAGE_ACCESS_KEY") or None,
            client_id=pick("CLIENT_ID"),
            client_secret=pick("CLIENT_SECRET"),
            tenant_id=pick("TENANT_ID"),
            endpoint=(env.get("AZURE_STORAGE_BLOB_ENDPOINT") or "").rstrip("/") or None,
        )


def _token_credential(settings: AzureSettings) -> Any | None:
    if not settings.client_id:
        return None
    if settings.client_secret and settings.tenant_id:
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(settings.tenant_id, settings.client_id, settings.client_secret)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(
        managed_identity_client_id=settings.client_id, workload_identity_client_id=settings.client_id
    )


def list_azure(
    uri: SourceURI,
    settings: AzureSettings,
    *,
    connect_timeout: float,
    read_timeout: float,
    deadline: float = 120.0,
) -> Listing:
    """The blobs of the URI: the one blob its path names, else every blob under ``PATH/`` (folder
    markers dropped: ADLS Gen2 directories, ``name/`` blobs, empty blobs named like a folder that
    has blobs). Raises AccessDenied (naming the container and account), SourceNotFound (no
    container, nothing under the prefix), TransientError (timeouts, 429, 5xx, a listing unfinished
    after ``deadline`` seconds), DownloadError (pages that repeat or never end:
    :func:`~agent.download.listing.paged`)."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.storage.blob import BlobServiceClient

    source = uri.redacted()
    account = uri.host.split(".", 1)[0]
    account_url = settings.endpoint or f"https://{uri.host}"
    token = _token_credential(settings)
    credential: Any = token or settings.access_key or None
    sas = uri.query if credential is None else ""
    where = f"container {uri.bucket} of account {account}"
    service = BlobServiceClient(
        account_url + (f"?{sas}" if sas else ""),
        credential=credential,
        connection_timeout=connect_timeout,
        read_timeout=read_timeout,
        retry_total=1,  # list_source retries the whole listing on top
    )
    container = service.get_container_client(uri.bucket)
    try:
        found, base = _find_blobs(container, uri.key, source, where, deadline)
        sas_query = sas or _sign(service, settings, uri.bucket, token is not None, account)
    except (ClientAuthenticationError, HttpResponseError, ServiceRequestError, ServiceResponseError) as e:
        raise _azure_error(e, source, where, account_url) from e
    files = []
    for blob in found:
        path = checked_path(blob.name[len(base) :], source=source)
        url = f"{account_url}/{uri.bucket}/{quote(blob.name, safe='/')}"
        md5 = getattr(blob.content_settings, "content_md5", None)
        files.append(
            RemoteFile(
                path=path,
                size=int(blob.size or 0),
                md5=bytes(md5).hex() if md5 else None,
                url=f"{url}?{sas_query}" if sas_query else url,
                ranges=True,
            )
        )
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    etags = hashlib.sha256("".join(f"{b.name}:{b.etag};" for b in found).encode())
    return Listing(source=source, revision=etags.hexdigest()[:16], files=result)


def _find_blobs(
    container: Any, prefix: str, source: str, where: str, deadline: float
) -> tuple[list[Any], str]:
    """(the blobs to fetch, the name prefix their paths are relative to): the one blob ``prefix``
    names, else every blob under ``prefix/`` less the folder markers (listed within ``deadline``
    seconds); SourceNotFound when there is none."""
    from azure.core.exceptions import ResourceNotFoundError

    base = prefix
    if prefix and not prefix.endswith("/"):
        try:
            props = container.get_blob_client(prefix).get_blob_properties()
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise
            props = None
        if props is not None and not _is_folder(props, set()):
            return [props], prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        prefix = base = prefix + "/"
    pages = container.list_blobs(name_starts_with=prefix or None, include=["metadata"]).by_page()
    blobs = paged(pages, lambda: pages.continuation_token, source=source, seconds=deadline)
    folders = parent_folders(b.name for b in blobs)
    found = [b for b in blobs if not _is_folder(b, folders)]
    if not found:
        raise SourceNotFound(f"{source}: no blobs under this prefix in {where}")
    return found, base


def _azure_error(error: Exception, source: str, where: str, account_url: str) -> DownloadError:
    """An Azure SDK error in the project's tree (raised ``from`` it by the caller)."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

    if isinstance(error, ClientAuthenticationError):
        status = getattr(error, "status_code", None)
        # azure-identity's errors (no status): the principal was refused or is not available here.
        code = getattr(error, "error_code", None) or (f"HTTP {status}" if status else "credentials refused")
        return AccessDenied(f"{source}: access denied to {where} ({code}); check the credentials")
    if isinstance(error, ResourceNotFoundError):
        code = getattr(error, "error_code", None) or "HTTP 404"
        return SourceNotFound(f"{source}: {code} ({where})")
    if isinstance(error, HttpResponseError):
        status = int(getattr(error, "status_code", 0) or 0)
        code = getattr(error, "error_code", None) or f"HTTP {status}"
        if status in (401, 403):
            return AccessDenied(f"{source}: access denied to {where} ({code}); check the credentials")
        if status == 404:
            return SourceNotFound(f"{source}: {code} ({where})")
        if status in (408, 429) or status >= 500:
            return TransientError(f"{source}: Azure error {code}")
        return DownloadError(f"{source}: Azure error {code}")
    return TransientError(f"{source}: cannot reach {account_url}: {type(error).__name__}")


def _is_folder(blob: Any, folders: set[str]) -> bool:
    metadata = {k.lower(): v for k, v in (blob.metadata or {}).items()}
    if metadata.get("hdi_isfolder", "").lower() == "true":
        return True  # an ADLS Gen2 directory
    return bool(blob.name.endswith("/") or (int(blob.size or 0) == 0 and blob.name in folders))


def _sign(service: Any, settings: AzureSettings, container: str, delegated: bool, account: str) -> str:
    """A read-only container SAS for the engine's GETs: a user delegation SAS under a principal,
    a service SAS under the account key; "" for anonymous access."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    now = datetime.now(UTC)
    expiry = now + timedelta(hours=SAS_HOURS)
    start = now - timedelta(minutes=5)  # clock skew between the node and Azure
    permission = ContainerSasPermissions(read=True)
    if delegated:
        key = service.get_user_delegation_key(start, expiry)
        return str(
            generate_container_sas(
                account, container, user_delegation_key=key, permission=permission, expiry=expiry, start=start
            )
        )
    if settings.access_key:
        return str(
            generate_container_sas(
                account,
                container,
                account_key=settings.access_key,
                permission=permission,
                expiry=expiry,
                start=start,
            )
        )
    return ""
