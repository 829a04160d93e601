"""Sources: each turns a URI into a :class:`Listing`. The one place third-party errors of the
listing libraries (huggingface_hub, botocore) are mapped into the project's error tree.

- hf: huggingface_hub resolves the revision to a commit sha (pinned for the whole download, so a
  push meanwhile cannot mix revisions) and lists the tree with sizes and LFS sha256. Files are then
  fetched from ``/{repo}/resolve/{sha}/{path}`` by the engine.
- s3: boto3 lists every object under the prefix (paginated) and presigns a GET per object, so the
  engine fetches S3 like any HTTP server, with ranges, and boto3 does credentials and signing.
- http(s): one HEAD for the size and the ETag; archives are fetched then unpacked.
- file: a folder (or a file) on a local or mounted filesystem.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.download.client import HttpClient, Response
from agent.download.listing import Listing, RemoteFile, check_unique, checked_path
from localmodel.errors import AccessDenied, DownloadError, SourceNotFound, TransientError
from localmodel.uri import SourceURI

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class SourceSettings:
    """Read from the environment at the entry point (:meth:`from_env`), passed in everywhere else."""

    hf_endpoint: str = HF_DEFAULT_ENDPOINT
    hf_token: str | None = None
    s3_endpoint: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SourceSettings:
        env = os.environ if env is None else env
        return cls(
            hf_endpoint=(env.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/"),
            hf_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None,
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        )


async def list_source(uri: SourceURI, *, settings: SourceSettings, client: HttpClient) -> Listing:
    if uri.scheme == "hf":
        return await asyncio.to_thread(_list_hf, uri, settings)
    if uri.scheme == "s3":
        return await asyncio.to_thread(_list_s3, uri, settings)
    if uri.scheme == "file":
        return await asyncio.to_thread(_list_file, uri)
    return await _list_http(uri, client)


# -- Hugging Face ---------------------------------------------------------------------------------


def _list_hf(uri: SourceURI, settings: SourceSettings) -> Listing:
    from httpx2 import HTTPError  # what huggingface_hub's client raises for connection errors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    source = uri.redacted()
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token or False)
    revision = uri.revision or "main"
    try:
        info = api.model_info(uri.repo_id, revision=revision)
        sha = info.sha
        if not sha:
            raise SourceNotFound(f"{source}: the hub did not say which commit {revision!r} is")
        tree = list(api.list_repo_tree(uri.repo_id, revision=sha, recursive=True, expand=False))
    except GatedRepoError as e:
        raise AccessDenied(
            f"access denied to {uri.repo_id}: the repository is gated; accept its terms on the "
            "hub and set HF_TOKEN (or the cache's storage secret)"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceNotFound(f"{source}: revision {revision!r} not found in {uri.repo_id}") from e
    except RepositoryNotFoundError as e:
        # The hub answers 401/404 alike for private repos without a token.
        hint = "" if settings.hf_token else " (or private: set HF_TOKEN)"
        raise AccessDenied(f"access denied to {uri.repo_id}: not found{hint}") from e
    except HfHubHTTPError as e:
        raise _http_status_error(source, _status(e), _retry_after(e)) from e
    except (OSError, HTTPError) as e:  # connection errors and timeouts of the hub's HTTP client
        raise TransientError(f"{source}: cannot reach {settings.hf_endpoint}: {type(e).__name__}") from e
    headers = {"Authorization": f"Bearer {settings.hf_token}"} if settings.hf_token else {}
    files = []
    for entry in tree:
        if not isinstance(entry, RepoFile):
            continue
        path = checked_path(entry.path, source=source)
        url = f"{settings.hf_endpoint}/{uri.repo_id}/resolve/{sha}/{_quote(path)}"
        lfs = entry.lfs
        files.append(
            RemoteFile(
                path=path,
                size=int(entry.size),
                sha256=lfs.sha256 if lfs is not None else None,
                git_sha1=None if lfs is not None else entry.blob_id,
                url=url,
                headers=headers,
            )
        )
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    return Listing(source=source, revision=sha, files=result)


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _status(e: Any) -> int:
    response = getattr(e, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _retry_after(e: Any) -> float | None:
    response = getattr(e, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _http_status_error(source: str, status: int, retry_after: float | None = None) -> DownloadError:
    if status in (401, 403):
        return AccessDenied(f"{source}: access denied (HTTP {status}); check the credentials")
    if status == 404:
        return SourceNotFound(f"{source}: not found (HTTP 404)")
    if status in (408, 429) or status >= 500 or status == 0:
        return TransientError(f"{source}: HTTP {status or 'error'}", retry_after=retry_after)
    return DownloadError(f"{source}: HTTP {status}")


# -- S3 -------------------------------------------------------------------------------------------


def _list_s3(uri: SourceURI, settings: SourceSettings) -> Listing:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    source = uri.redacted()
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        config=Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 5}),
    )
    prefix = uri.key
    objects: list[dict[str, Any]] = []
    try:
        if prefix and not prefix.endswith("/"):
            # A single object, or a "folder" named without its trailing slash.
            try:
                head = client.head_object(Bucket=uri.bucket, Key=prefix, ChecksumMode="ENABLED")
                objects.append({"Key": prefix, "Size": head["ContentLength"], **head})
                base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
            except ClientError as e:
                if _s3_code(e) not in ("404", "NoSuchKey", "NotFound"):
                    raise
                prefix += "/"
        if not objects:
            base = prefix
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=prefix):
                objects.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
            if not objects:
                raise SourceNotFound(f"{source}: no objects under this prefix")
        _fetch_s3_checksums(client, uri.bucket or "", objects)
        files = []
        for obj in objects:
            path = checked_path(obj["Key"][len(base) :], source=source)
            etag = str(obj.get("ETag", "")).strip('"')
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": uri.bucket, "Key": obj["Key"]}, ExpiresIn=6 * 3600
            )
            files.append(
                RemoteFile(
                    path=path,
                    size=int(obj["Size"]),
                    sha256=_s3_sha256(obj),
                    md5=etag if len(etag) == 32 and "-" not in etag else None,
                    url=url,
                    ranges=True,
                )
            )
    except NoCredentialsError as e:
        raise AccessDenied(f"{source}: no AWS credentials found (environment, config or role)") from e
    except ClientError as e:
        code = _s3_code(e)
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise AccessDenied(f"{source}: access denied ({code})") from e
        if code in ("NoSuchBucket", "404", "NoSuchKey"):
            raise SourceNotFound(f"{source}: {code}") from e
        raise TransientError(f"{source}: S3 error {code}") from e
    except BotoCoreError as e:
        raise TransientError(f"{source}: cannot reach S3: {type(e).__name__}") from e
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    etags = hashlib.sha256("".join(f"{o['Key']}:{o.get('ETag', '')};" for o in objects).encode())
    return Listing(source=source, revision=etags.hexdigest()[:16], files=result)


def _s3_code(e: Any) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _fetch_s3_checksums(client: Any, bucket: str, objects: list[dict[str, Any]]) -> None:
    """A listing names an object's checksum algorithm, never its value: one HeadObject each for the
    objects stored with a full-object SHA256, so they are verified by it (in parallel: a model may
    have hundreds of files)."""
    wanted = [
        o
        for o in objects
        if "ChecksumSHA256" not in o
        and "SHA256" in (o.get("ChecksumAlgorithm") or ())
        and o.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    ]
    if not wanted:
        return
    from concurrent.futures import ThreadPoolExecutor

    def head(obj: dict[str, Any]) -> None:
        answer = client.head_object(Bucket=bucket, Key=obj["Key"], ChecksumMode="ENABLED")
        for field in ("ChecksumSHA256", "ChecksumType"):
            if field in answer:
                obj[field] = answer[field]

    with ThreadPoolExecutor(max_workers=min(16, len(wanted))) as pool:
        list(pool.map(head, wanted))  # list(): re-raise the first ClientError here


def _s3_sha256(obj: Mapping[str, Any]) -> str | None:
    # A full-object SHA256 (base64) is only usable when it is not a composite of parts ("-N").
    value = obj.get("ChecksumSHA256")
    if not isinstance(value, str) or "-" in value or obj.get("ChecksumType") == "COMPOSITE":
        return None
    import base64
    import binascii

    try:
        return base64.b64decode(value).hex()
    except (binascii.Error, ValueError):
        return None


# -- HTTP(S) --------------------------------------------------------------------------------------


async def _list_http(uri: SourceURI, client: HttpClient) -> Listing:
    source = uri.redacted()
    name = uri.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    checked_path(name, source=source)
    seen: list[Response] = []

    def accept(response: Response) -> None:
        if response.status >= 400 and response.status != 405:  # 405: no HEAD; the GET will tell
            raise _http_status_error(source, response.status)
        seen.append(response)

    await client.request("HEAD", uri.url, headers={}, label=source, accept=accept)
    (response,) = seen
    size = response.content_length if response.status < 400 else None
    etag = response.headers.get("ETag", "")
    file = RemoteFile(path=name, size=size, url=uri.url)
    revision = hashlib.sha256(f"{etag}:{size}".encode()).hexdigest()[:16] if etag else None
    return Listing(source=source, revision=revision, files=(file,), archive=uri.archive_suffix)


# -- local ----------------------------------------------------------------------------------------


def _list_file(uri: SourceURI) -> Listing:
    root = Path(uri.path)
    source = uri.redacted()
    if root.is_file():
        checked_path(root.name, source=source)
        return Listing(
            source=source,
            revision=None,
            files=(RemoteFile(path=root.name, size=root.stat().st_size, local_path=str(root)),),
        )
    if not root.is_dir():
        raise SourceNotFound(f"{source}: no such file or folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root.resolve()):
                    raise _unsafe(source, rel)
            files.append(
                RemoteFile(
                    path=checked_path(rel, source=source),
                    size=full.stat().st_size,
                    local_path=str(full),
                )
            )
    if not files:
        raise SourceNotFound(f"{source}: the folder is empty")
    return Listing(source=source, revision=None, files=tuple(files))


def _unsafe(source: str, rel: str) -> DownloadError:
    from localmodel.errors import UnsafePath

    return UnsafePath(f"{source}: {rel!r} is a symlink that points outside the source folder")
