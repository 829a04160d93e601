"""Sources: each turns a URI into a :class:`Listing`. The one place third-party errors of the
listing libraries (huggingface_hub, botocore) are mapped into the project's error tree.

- hf: huggingface_hub resolves the revision to a commit sha (pinned for the whole download, so a
  push meanwhile cannot mix revisions) and lists the tree with sizes and LFS sha256. Files are then
  fetched from ``/{repo}/resolve/{sha}/{path}`` by the engine.
- s3: boto3 lists every object under the prefix (paginated) and presigns a GET per object, so the
  engine fetches S3 like any HTTP server, with ranges, and boto3 does credentials and signing.
  Folder markers (an empty object or ``application/x-directory`` named like the folder, with or
  without a slash, and ``_$folder$`` objects, as S3 consoles, s3fs and Hadoop write them) are not
  files of the model.
- gs: :mod:`agent.download.gcs` (google-cloud-storage lists; the engine fetches the JSON API's
  media URLs with ranges, verified by crc32c, or md5Hash without google-crc32c's C extension).
- Azure Blob and ADLS Gen2: :mod:`agent.download.azure` (azure-storage-blob lists and signs a
  read-only SAS; verified by Content-MD5 where the blob has one).
- http(s): one HEAD for the size and the ETag; archives are fetched then unpacked.
- file: a folder (or a file) on a local or mounted filesystem, under the allowed prefixes.

Every wait is bounded: the hub's and S3's clients get :attr:`SourceSettings.connect_timeout` and
:attr:`SourceSettings.read_timeout`, the HEAD the engine's client's own; a listing that fails with a
:class:`~localmodel.errors.TransientError` (a timeout, a refused connection, 429, 5xx) is tried
:attr:`SourceSettings.list_attempts` times with jittered exponential backoff, then fails with one
line naming the endpoint ("cannot reach http://host:port: no answer within 30 s").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from agent.download.azure import AzureSettings, list_azure
from agent.download.client import (
    HttpClient,
    PrivateAddress,
    Response,
    aws_ca_bundle,
    check_endpoint,
    connection_words,
    retried,
)
from agent.download.gcs import GcsSettings, list_gcs
from agent.download.http_status import http_status_error, retry_after_seconds
from agent.download.listing import Listing, RemoteFile, check_not_empty, check_unique, checked_path
from localmodel.errors import (
    AccessDenied,
    DownloadError,
    InvalidInput,
    SourceNotAllowed,
    SourceNotFound,
    TransientError,
    UnsafePath,
)
from localmodel.text import printable
from localmodel.uri import SourceURI

HF_DEFAULT_ENDPOINT = "https://huggingface.co"

log = logging.getLogger("modelcache.download")


@dataclass(frozen=True)
class SourceSettings:
    """Read from the environment at the entry point (:meth:`from_env`), passed in everywhere else.

    Timeouts are in seconds, per connection attempt (``connect_timeout``) and per wait for the next
    bytes of an answer (``read_timeout``), for every listing and metadata request. ``file_prefixes``:
    the folders ``file://`` sources may be read from (real paths, symlinks resolved); ``None`` allows
    any (``pull`` and the standalone agent: the user's own machine), ``()`` none (the agent in a
    cluster without ``--allow-file-sources``).
    """

    hf_endpoint: str = HF_DEFAULT_ENDPOINT
    hf_token: str | None = None
    s3_endpoint: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    list_attempts: int = 4
    list_backoff: float = 1.0  # the first wait between listing attempts; doubles, capped at 30 s
    list_deadline: float = 120.0  # one whole listing attempt (hf, s3, http HEAD), however it trickles
    file_prefixes: tuple[str, ...] | None = None
    gcs: GcsSettings = dataclasses.field(default_factory=GcsSettings)
    azure: AzureSettings = dataclasses.field(default_factory=AzureSettings)
    # Off: the hub's and S3's endpoints must not resolve to a loopback, link-local or unspecified
    # address (client.check_endpoint; the agent in a cluster without --allow-private-sources).
    allow_private: bool = True

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        file_prefixes: tuple[str, ...] | None = None,
        allow_private: bool = True,
    ) -> SourceSettings:
        env = os.environ if env is None else env
        return cls(
            allow_private=allow_private,
            hf_endpoint=(env.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/"),
            hf_token=hf_token_from_env(env),
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            file_prefixes=file_prefixes,
            gcs=GcsSettings.from_env(env),
            azure=AzureSettings.from_env(env),
        )


def hf_token_from_env(env: Mapping[str, str]) -> str | None:
    """The Hugging Face token as huggingface_hub finds it (``utils/_auth.py::get_token``): ``HF_TOKEN``,
    then ``HUGGING_FACE_HUB_TOKEN``, then the file ``HF_TOKEN_PATH`` names (default
    ``$HF_HOME/token``, ``HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface`` or
    ``~/.cache/huggingface``): a mounted Secret keeps the token out of ``/proc/<pid>/environ``.

    Cleaned as huggingface_hub's ``_clean_token`` does (every CR and LF dropped, surrounding
    whitespace stripped); an empty value or a missing file is no token. What is left must be
    printable ASCII without spaces (a header value; tokens are): anything else is InvalidInput
    naming where it came from, never the token. A file that ``HF_TOKEN_PATH`` names explicitly and
    that exists but cannot be read is InvalidInput."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if value := _clean_token(env.get(name) or ""):
            return _checked_token(value, name)
    explicit = env.get("HF_TOKEN_PATH")
    if explicit:
        path = Path(os.path.expandvars(explicit)).expanduser()
    else:
        cache = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME") or "~") / ".cache")
        home = Path(os.path.expandvars(env.get("HF_HOME") or cache / "huggingface")).expanduser()
        path = home / "token"
    try:
        token = _clean_token(path.read_text())
    except FileNotFoundError:
        return None  # as huggingface_hub: an optional Secret that is not there means no token
    except (OSError, UnicodeDecodeError) as e:
        if explicit:
            raise InvalidInput(
                f"HF_TOKEN_PATH: cannot read '{printable(explicit)}': {getattr(e, 'strerror', None) or e}"
            ) from None
        return None
    where = f"HF_TOKEN_PATH ('{printable(explicit)}')" if explicit else f"the token file {path}"
    return _checked_token(token, where) if token else None


def _clean_token(text: str) -> str:
    """huggingface_hub's ``_clean_token``: CR and LF removed wherever they are, then stripped."""
    return text.replace("\r", "").replace("\n", "").strip()


def _checked_token(token: str, where: str) -> str:
    """The token, if every character is printable ASCII other than a space (what an Authorization
    header can carry, as every Hugging Face token is); InvalidInput naming ``where``, never the token."""
    if all("!" <= c <= "~" for c in token):
        return token
    raise InvalidInput(
        f"{where}: the Hugging Face token holds a control character, a space or a non-ASCII "
        "character; write the token alone (one line) into the Secret"
    )


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
        return await asyncio.to_thread(_list_file, uri, settings)
    if uri.scheme == "hf":
        endpoint, listed = settings.hf_endpoint, _in_daemon_thread(_list_hf, uri, settings)
    elif uri.scheme == "s3":
        endpoint, listed = settings.s3_endpoint or "S3", _in_daemon_thread(_list_s3, uri, settings)
    elif uri.scheme == "gs":
        # The SDKs connect by themselves: their endpoint is checked as the hub's and S3's are.
        endpoint = settings.gcs.endpoint
        await asyncio.to_thread(_check_endpoint, endpoint, settings, uri.redacted())
        listed = _in_daemon_thread(_list_gcs, uri, settings)
    elif uri.scheme == "azure":
        endpoint = settings.azure.endpoint or f"https://{uri.host}"
        await asyncio.to_thread(_check_endpoint, endpoint, settings, uri.redacted())
        listed = _in_daemon_thread(_list_azure, uri, settings)
    else:
        endpoint, listed = uri.redacted(), asyncio.ensure_future(_list_http(uri, client))
    try:
        return await asyncio.wait_for(listed, settings.list_deadline)
    except TimeoutError:
        raise _no_answer(
            uri.redacted(), endpoint, settings.list_deadline, "no whole listing (answers too slow)"
        ) from None


def _list_gcs(uri: SourceURI, settings: SourceSettings) -> Listing:
    return list_gcs(
        uri, settings.gcs, connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout
    )


def _list_azure(uri: SourceURI, settings: SourceSettings) -> Listing:
    return list_azure(
        uri, settings.azure, connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout
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


def _no_answer(source: str, endpoint: str, seconds: float, what: str = "no answer") -> TransientError:
    return TransientError(f"{source}: cannot reach {endpoint}: {what} within {seconds:g} s")


# -- Hugging Face ---------------------------------------------------------------------------------


def _list_hf(uri: SourceURI, settings: SourceSettings) -> Listing:
    from httpx2 import ConnectTimeout, HTTPError, TimeoutException
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    _bound_hf_client(settings)
    source = uri.redacted()
    _check_endpoint(settings.hf_endpoint, settings, source)
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token or False)
    revision = uri.revision or "main"
    try:
        # model_info passes its own timeout (None: none at all) over the client's: give it ours.
        info = api.model_info(uri.repo_id, revision=revision, timeout=settings.read_timeout)
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
        raise http_status_error(source, _status(e), _retry_after(e)) from e
    except ConnectTimeout as e:
        raise _no_answer(source, settings.hf_endpoint, settings.connect_timeout, "no connection") from e
    except TimeoutException as e:
        raise _no_answer(source, settings.hf_endpoint, settings.read_timeout) from e
    except (OSError, HTTPError) as e:  # connection errors of the hub's HTTP client
        raise TransientError(f"{source}: {connection_words(e, settings.hf_endpoint)}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a body that is not the API's JSON
        raise _not_the_hub(settings.hf_endpoint) from e
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


_hf_lock = threading.Lock()
_hf_timeouts: tuple[float, float] | None = None


def _bound_hf_client(settings: SourceSettings) -> None:
    """Give huggingface_hub's shared HTTP client our timeouts, through its supported hook
    (``huggingface_hub.set_client_factory``): its default client waits forever (``timeout=None``),
    and ``list_repo_tree`` takes no timeout of its own. Set once per distinct pair of timeouts:
    setting a factory closes the shared client, which a listing in another thread may be using."""
    global _hf_timeouts
    wanted = (settings.connect_timeout, settings.read_timeout)
    with _hf_lock:
        if _hf_timeouts == wanted:
            return
        import httpx2
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import default_client_factory

        def factory() -> httpx2.Client:
            client = default_client_factory()  # its event hooks and redirect handling, kept
            client.timeout = httpx2.Timeout(settings.read_timeout, connect=settings.connect_timeout)
            client.event_hooks.setdefault("response", []).append(_note_answer)
            return client

        set_client_factory(factory)
        _hf_timeouts = wanted


def _check_endpoint(endpoint: str, settings: SourceSettings, source: str) -> None:
    """The listing client connects on its own: its endpoint is checked by name before it does."""
    try:
        check_endpoint(endpoint, allow_private=settings.allow_private)
    except PrivateAddress as e:
        raise SourceNotAllowed(f"{source}: {e}") from e


_hf_answer = threading.local()  # the last answer's (status, content type) in this listing thread


def _note_answer(response: Any) -> None:
    _hf_answer.last = (response.status_code, response.headers.get("content-type", "no content type"))


def _not_the_hub(endpoint: str) -> DownloadError:
    """The hub answered, but not with its JSON API: a portal or login page, a proxy's error page."""
    status, kind = getattr(_hf_answer, "last", (200, "not JSON"))
    return DownloadError(
        f"the hub at {endpoint} answered with something that is not its JSON API (HTTP {status}, "
        f"{printable(str(kind).split(';')[0], limit=60)}); check HF_ENDPOINT or the proxy"
    )


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _status(e: Any) -> int:
    response = getattr(e, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _retry_after(e: Any) -> float | None:
    response = getattr(e, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    return retry_after_seconds(value)


# -- S3 -------------------------------------------------------------------------------------------


def _list_s3(uri: SourceURI, settings: SourceSettings) -> Listing:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    source = uri.redacted()
    try:
        # A session of its own: boto3's default one is made once per process and would keep the AWS
        # environment and profile of that moment.
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            config=Config(
                signature_version="s3v4",
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                # botocore's own retries cover throttling between the many HeadObjects; list_source
                # retries the whole listing on top, so each layer stays short.
                retries={"mode": "standard", "max_attempts": 2},
            ),
        )
    except BotoCoreError as e:
        # A profile that does not exist, a config file that does not parse, a bad region: the AWS
        # configuration, which no retry mends. botocore's text names the setting, never a secret.
        raise AccessDenied(f"{source}: the AWS configuration is not usable: {e}") from e
    endpoint = str(client.meta.endpoint_url)
    _check_endpoint(endpoint, settings, source)
    bundle = aws_ca_bundle()
    if endpoint.startswith("https:") and bundle and not Path(bundle).is_file():
        # botocore says only "SSLError" for a bundle it cannot find.
        raise DownloadError(
            f"{source}: the CA bundle {printable(bundle)} (AWS_CA_BUNDLE or the AWS profile's "
            "ca_bundle) does not exist or is not a file; point it at a PEM file or unset it"
        )
    prefix = uri.key
    objects: list[dict[str, Any]] = []
    try:
        if prefix and not prefix.endswith("/"):
            # A single object, or a "folder" named without its trailing slash: then, or when the
            # object is a folder marker with objects under it, the prefix.
            head = _head(client, uri.bucket, prefix)
            if head is not None and _is_folder_marker(head):
                head = None if _has_objects(client, uri.bucket, prefix + "/") else head
            if head is not None:
                objects.append({"Key": prefix, "Size": head["ContentLength"], **head})
                base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
            else:
                prefix += "/"
        if not objects:
            base = prefix
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=prefix):
                objects.extend(page.get("Contents", []))
            objects = _drop_folder_markers(client, uri.bucket, objects)
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
    except ConnectTimeoutError as e:
        raise _no_answer(source, endpoint, settings.connect_timeout, "no connection") from e
    except ReadTimeoutError as e:
        raise _no_answer(source, endpoint, settings.read_timeout) from e
    except BotoCoreError as e:
        raise TransientError(f"{source}: {connection_words(e, endpoint)}") from e
    result = tuple(sorted(files, key=lambda f: f.path))
    check_unique(result, source=source)
    etags = hashlib.sha256("".join(f"{o['Key']}:{o.get('ETag', '')};" for o in objects).encode())
    return Listing(source=source, revision=etags.hexdigest()[:16], files=result)


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
    keys = sorted(o["Key"] for o in objects)
    folders = {k.rsplit("/", i)[0] for k in keys for i in range(1, k.count("/") + 1)}
    kept = [
        o
        for o in objects
        if not o["Key"].endswith("/")
        and not o["Key"].endswith("_$folder$")
        and not (int(o.get("Size") or 0) == 0 and o["Key"] in folders)
    ]
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
            raise _no_answer(source, origin, max(client.connect_timeout, client.read_timeout)) from e
        raise
    (response,) = seen
    size = response.content_length if response.status < 400 else None
    etag = response.headers.get("ETag", "")
    file = RemoteFile(path=name, size=size, url=uri.url)
    revision = hashlib.sha256(f"{etag}:{size}".encode()).hexdigest()[:16] if etag else None
    return Listing(source=source, revision=revision, files=(file,), archive=uri.archive_suffix)


# -- local ----------------------------------------------------------------------------------------


def _list_file(uri: SourceURI, settings: SourceSettings) -> Listing:
    root = Path(uri.path)
    source = uri.redacted()
    allowed = _allowed_prefixes(settings, source)
    if allowed is not None:
        _check_allowed(_resolved(root, source), allowed, source)
    if root.is_file():
        checked_path(root.name, source=source)
        size = _regular_size(_resolved(root, source), root.name, source, cluster=allowed is not None)
        return Listing(
            source=source,
            revision=None,
            files=(RemoteFile(path=root.name, size=size, local_path=str(_resolved(root, source))),),
        )
    if not root.is_dir():
        if root.exists():
            _regular_size(_resolved(root, source), root.name, source, cluster=allowed is not None)
        raise SourceNotFound(f"{source}: no such file or folder")
    real_root = _resolved(root, source)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = checked_path(full.relative_to(root).as_posix(), source=source)
            real = _resolved(full, source)
            if full.is_symlink() and not real.is_relative_to(real_root):
                raise _unsafe(source, rel)
            if allowed is not None:
                _check_allowed(real, allowed, source)
            # The real path is what is copied: a link swapped after this check cannot redirect it.
            size = _regular_size(real, rel, source, cluster=allowed is not None)
            files.append(RemoteFile(path=rel, size=size, local_path=str(real)))
    if not files:
        raise SourceNotFound(f"{source}: the folder is empty")
    return Listing(source=source, revision=None, files=tuple(files))


def _regular_size(real: Path, rel: str, source: str, *, cluster: bool) -> int:
    """The size of a file a ``file://`` source lists, or UnsafePath naming it: only regular files
    are copied (a FIFO, socket or device would block or never end the copy); in a cluster
    (``cluster``: ``--allow-file-sources`` set) a file with more than one hard link is refused too,
    since a hard link below an allowed folder can name a file outside it."""
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a special file"
        )
        raise UnsafePath(
            f"{source}: {printable(rel)} is {kind}, not a regular file or folder; only regular files "
            "are copied: remove it from the source"
        )
    if cluster and st.st_nlink > 1:
        raise UnsafePath(
            f"{source}: {printable(rel)} has {st.st_nlink} hard links; in a cluster a file with more "
            "than one may be a file outside --allow-file-sources: copy it instead of linking it"
        )
    return st.st_size


def _allowed_prefixes(settings: SourceSettings, source: str) -> tuple[Path, ...] | None:
    if settings.file_prefixes is None:
        return None
    return tuple(_resolved(Path(p), source) for p in settings.file_prefixes)


def _resolved(path: Path, source: str) -> Path:
    """``path`` with every link resolved; a loop of links or a folder that cannot be entered is
    one line (UnsafePath, AccessDenied, SourceNotFound), not a traceback."""
    try:
        return path.resolve()
    except RuntimeError:
        raise UnsafePath(f"{source}: '{printable(str(path))}' is a loop of symbolic links") from None
    except PermissionError as e:
        raise AccessDenied(f"{source}: cannot resolve '{printable(str(path))}': {e.strerror}") from None
    except OSError as e:
        raise SourceNotFound(f"{source}: cannot resolve '{printable(str(path))}': {e.strerror}") from None


def _check_allowed(real: Path, allowed: tuple[Path, ...], source: str) -> None:
    """SourceNotAllowed unless ``real`` (symlinks resolved) is one of ``allowed`` or under one."""
    if any(real.is_relative_to(prefix) for prefix in allowed):
        return
    where = ", ".join(printable(str(p)) for p in allowed) if allowed else "none"
    raise SourceNotAllowed(
        f"{source}: '{printable(str(real))}' is outside the folders file sources may be read from "
        f"(allowed: {where}); the agent reads it only with --allow-file-sources PREFIX"
    )


def _unsafe(source: str, rel: str) -> DownloadError:
    return UnsafePath(f"{source}: '{printable(rel)}' is a symlink that points outside the source folder")
