"""S3 sources: boto3 lists every object under the prefix (paginated) and presigns a GET per object,
so the engine fetches S3 like any HTTP server, with ranges, and boto3 does credentials and signing.
Folder markers (an empty object or ``application/x-directory`` named like the folder, with or
without a slash, and ``_$folder$`` objects, as S3 consoles, s3fs and Hadoop write them) are not
files of the model. The one place botocore's errors are mapped into the project's tree."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.download.environment import aws_ca_bundle
from agent.download.listing import (
    Listing,
    RemoteFile,
    check_unique,
    checked_path,
    folder_marker,
    paged,
    parent_folders,
)
from agent.download.source_settings import SourceSettings, check_source_endpoint, no_answer
from agent.download.wording import connection_words
from localmodel.errors import AccessDenied, DownloadError, SourceNotFound, TransientError
from localmodel.text import printable
from localmodel.uri import SourceURI

_MULTIPART = re.compile(r"[0-9a-fA-F]{32}-[1-9][0-9]{0,4}")


def first_part_sizes(uri: SourceURI, settings: SourceSettings, files: Iterable[RemoteFile]) -> dict[str, int]:
    """path -> the size of part 1 of each multipart object (``ContentLength`` of HeadObject with
    ``PartNumber=1``; every part but the last has that size, as S3 requires of a multipart upload),
    for the files whose ETag is a multipart one. A file whose HEAD fails, or whose ``PartsCount``
    is not the ETag's, is left out: it cannot be checked, so it is fetched, never kept unchecked.
    Raises as :func:`list_s3` does for a client that cannot be made."""
    wanted = [f for f in files if f.multipart_etag and f.s3_key]
    if not wanted:
        return {}
    from botocore.exceptions import BotoCoreError, ClientError

    client, _ = _client(settings, uri.redacted())

    def head(f: RemoteFile) -> tuple[str, int] | None:
        try:
            answer = client.head_object(Bucket=uri.bucket, Key=f.s3_key, PartNumber=1)
        except (BotoCoreError, ClientError):
            return None
        parts = int(str(f.multipart_etag).rsplit("-", 1)[1])
        if int(answer.get("PartsCount") or 0) != parts or int(answer.get("ContentLength") or 0) <= 0:
            return None
        return f.path, int(answer["ContentLength"])

    return dict(x for x in _parallel(head, wanted) if x is not None)


def _client(settings: SourceSettings, source: str) -> tuple[Any, str]:
    """An S3 client of its own and its endpoint (checked), or AccessDenied for an AWS configuration
    that is not usable, DownloadError for a CA bundle that is not a file. ``settings.s3`` (a
    cache's own credentials) wins over the environment field by field."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    own = settings.s3
    config = Config(
        signature_version=UNSIGNED if own.anonymous else "s3v4",
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # botocore's own retries cover throttling between the many HeadObjects; list_source
        # retries the whole listing on top, so each layer stays short.
        retries={"mode": "standard", "max_attempts": 2},
        s3={
            k: v
            for k, v in (
                ("addressing_style", own.addressing_style),
                ("use_accelerate_endpoint", own.accelerate),
            )
            if v
        },
    )
    bundle = own.ca_bundle or aws_ca_bundle()
    if not own.verify:
        # The cache's Secret turned verification off (S3_VERIFY_SSL=0, as KServe allows): said once
        # in its settings, not once per request by urllib3.
        import warnings

        from urllib3.exceptions import InsecureRequestWarning

        warnings.simplefilter("ignore", InsecureRequestWarning)
    try:
        # A session of its own: boto3's default one is made once per process and would keep the AWS
        # environment and profile of that moment.
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=own.endpoint_url or settings.s3_endpoint,
            region_name=own.region,
            aws_access_key_id=own.access_key_id,
            aws_secret_access_key=own.secret_access_key,
            verify=(own.ca_bundle or None) if own.verify else False,
            config=config,
        )
    except BotoCoreError as e:
        # A profile that does not exist, a config file that does not parse, a bad region: the AWS
        # configuration, which no retry mends. botocore's text names the setting, never a secret.
        raise AccessDenied(f"{source}: the AWS configuration is not usable: {e}") from e
    except ValueError:
        # botocore's "Invalid endpoint: <url>" repeats the endpoint, which may come from a Secret:
        # neither its text nor the exception itself goes on (no chained traceback holds it).
        raise AccessDenied(
            f"{source}: the S3 endpoint is not a URL botocore can use (the cache's Secret, "
            "S3_ENDPOINT or AWS_ENDPOINT_URL); give one such as https://s3.example.com:9000"
        ) from None
    endpoint = str(client.meta.endpoint_url)
    check_source_endpoint(endpoint, settings, source)
    if own.verify and endpoint.startswith("https:") and bundle and not Path(bundle).is_file():
        # botocore says only "SSLError" for a bundle it cannot find.
        raise DownloadError(
            f"{source}: the CA bundle {printable(bundle)} (the cache's AWS_CA_BUNDLE / ca_bundle, "
            "AWS_CA_BUNDLE or the AWS profile's ca_bundle) does not exist or is not a file in the "
            "agent's container; point it at a PEM file or unset it"
        )
    return client, endpoint


def list_s3(uri: SourceURI, settings: SourceSettings) -> Listing:
    """Every object under the URI's prefix (or the one object it names), presigned for 6 hours."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        NoCredentialsError,
        PaginationError,
        ReadTimeoutError,
    )

    source = uri.redacted()
    client, endpoint = _client(settings, source)
    try:
        objects, base = _find_objects(client, uri.bucket, uri.key, source, settings.list_deadline)
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
                    multipart_etag=etag.lower() if _MULTIPART.fullmatch(etag) else None,
                    s3_key=obj["Key"],
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
    except PaginationError as e:
        # botocore's own check: "The same next token was received twice".
        raise DownloadError(
            f"the listing of {source} repeats page token; the server is not following the protocol"
        ) from e
    except ConnectTimeoutError as e:
        raise no_answer(source, endpoint, settings.connect_timeout, "no connection") from e
    except ReadTimeoutError as e:
        raise no_answer(source, endpoint, settings.read_timeout) from e
    except BotoCoreError as e:
        raise TransientError(f"{source}: {connection_words(e, endpoint)}") from e
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    etags = hashlib.sha256("".join(f"{o['Key']}:{o.get('ETag', '')};" for o in objects).encode())
    return Listing(source=source, revision=etags.hexdigest()[:16], files=result)


def _find_objects(
    client: Any, bucket: str, prefix: str, source: str, deadline: float
) -> tuple[list[dict[str, Any]], str]:
    """(the objects to fetch, the key prefix their paths are relative to): the one object ``prefix``
    names, else every object under ``prefix/`` less the folder markers (listed within ``deadline``
    seconds; botocore refuses a repeated page token itself); SourceNotFound when there is none."""
    if prefix and not prefix.endswith("/"):
        # A single object, or a "folder" named without its trailing slash: then, or when the
        # object is a folder marker with objects under it, the prefix.
        head = _head(client, bucket, prefix)
        if head is not None and _is_folder_marker(head):
            head = None if _has_objects(client, bucket, prefix + "/") else head
        if head is not None:
            base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
            return [{"Key": prefix, "Size": head["ContentLength"], **head}], base
        prefix += "/"
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    contents = (page.get("Contents", []) for page in pages)
    objects: list[dict[str, Any]] = paged(contents, lambda: None, source=source, seconds=deadline)
    objects = _drop_folder_markers(client, bucket, objects)
    if not objects:
        raise SourceNotFound(f"{source}: no objects under this prefix")
    return objects, prefix


# Content types S3 tools give the empty objects that stand for folders (s3fs, the AWS console's
# "Create folder" writes an empty "key/"; older tools and some storage GUIs "application/x-directory").
_DIRECTORY_TYPES = ("application/x-directory", "httpd/unix-directory")


def _is_folder_marker(head: Mapping[str, Any]) -> bool:
    return int(head.get("ContentLength") or 0) == 0 or _directory_type(head)


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return dict(client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))
    except ClientError as e:
        if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _has_objects(client: Any, bucket: str, prefix: str) -> bool:
    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(page.get("KeyCount") or page.get("Contents"))


def _drop_folder_markers(client: Any, bucket: str, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects of a prefix listing that are files: not ``key/`` or ``key_$folder$`` markers, not
    empty objects named like a folder that has objects in it, and not empty objects of a directory
    content type (one HeadObject each for the empty objects left: a listing gives no content type)."""
    folders = parent_folders(o["Key"] for o in objects)
    kept = [o for o in objects if not folder_marker(o["Key"], int(o.get("Size") or 0), folders)]
    empty = [o for o in kept if int(o.get("Size") or 0) == 0]
    heads = _parallel(lambda o: _head(client, bucket, o["Key"]), empty)
    markers = {o["Key"] for o, h in zip(empty, heads, strict=True) if h is not None and _directory_type(h)}
    return [o for o in kept if o["Key"] not in markers]


def _directory_type(head: Mapping[str, Any]) -> bool:
    return str(head.get("ContentType") or "").split(";", 1)[0].strip().lower() in _DIRECTORY_TYPES


T = TypeVar("T")
R = TypeVar("R")


def _parallel(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` in up to 16 threads (a model may have hundreds of objects to HEAD);
    the first exception is raised here."""
    items = list(items)
    if not items:
        return []
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        return list(pool.map(fn, items))


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

    def head(obj: dict[str, Any]) -> None:
        answer = client.head_object(Bucket=bucket, Key=obj["Key"], ChecksumMode="ENABLED")
        for field in ("ChecksumSHA256", "ChecksumType"):
            if field in answer:
                obj[field] = answer[field]

    _parallel(head, wanted)


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
