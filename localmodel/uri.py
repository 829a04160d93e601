"""Source model URIs: hf://, s3://, gs://, Azure Blob (and ADLS Gen2), http(s)://, file:// and plain
absolute paths.

Azure Blob URLs are recognised by their host as KServe recognises them (``_AZURE_BLOB_RE`` of
kserve/python/storage/kserve_storage/kserve_storage.py:68-71: ``ACCOUNT.blob.core.windows.net`` and
``ACCOUNT.zNN.blob.storage.azure.net``), plus ADLS Gen2's ``ACCOUNT.dfs.core.windows.net`` and
Hadoop's ``abfs[s]://FILESYSTEM@ACCOUNT.dfs.core.windows.net/PATH`` (the same data through the
account's blob endpoint). Schemes KServe reads that a node cache does not (:data:`REFUSED`) are
refused with a line naming the alternative.

A parsed :class:`SourceURI` keeps the string exactly as written (``raw``: the storage key is computed
from it) and offers :meth:`SourceURI.redacted` for anything that is logged or stored in a status, so
a signed URL's query string or a userinfo password never leaks. :func:`redact` is that one rule, for
every scheme (and for strings that did not parse, which error messages echo).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from localmodel.errors import URIError
from localmodel.text import has_control, printable

Scheme = Literal["hf", "s3", "gs", "azure", "http", "https", "file"]
SUPPORTED = ("hf", "s3", "gs", "http", "https", "file")

# What KServe's storage initializer reads that we do not, with what to use instead
# (kserve_storage.py:64-83, the dispatch at :365-419).
REFUSED = {
    "hdfs": "copy the model to S3, GCS or Azure Blob, or mount it on the nodes and use file://",
    "webhdfs": "copy the model to S3, GCS or Azure Blob, or mount it on the nodes and use file://",
    "oci": (
        "modelcars are pulled and cached by the container runtime; serve the image without the "
        "cache, or push the model folder to hf://, s3://, gs:// or Azure Blob"
    ),
    "modelscope": "use the model's Hugging Face mirror (hf://OWNER/REPO), or http(s):// for one file",
    "pvc": "the claim is already on the cluster: mount it in the predictor without a cache",
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")

_HF_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_HF_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# https://cloud.google.com/storage/docs/buckets#naming: 3-63 characters (up to 222 with dots).
_GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# https://learn.microsoft.com/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata
_AZURE_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}|\$root|\$web")


def _azure_host(kind: str) -> re.Pattern[str]:
    """ACCOUNT.KIND.core.windows.net or ACCOUNT.zNN.KIND.storage.azure.net (DNS-zone endpoints)."""
    domains = rf"{kind}\.core\.windows\.net|z[0-9]{{1,2}}\.{kind}\.storage\.azure\.net"
    return re.compile(rf"([a-z0-9]{{3,24}})\.({domains})")


_AZURE_BLOB_HOST = _azure_host("blob")
_AZURE_DFS_HOST = _azure_host("dfs")
_AZURE_FILE_HOST = _azure_host("file")


@dataclass(frozen=True)
class SourceURI:
    raw: str
    scheme: Scheme
    # hf: repo_id and revision; s3, gs: bucket and key/prefix; azure: the account's blob host, the
    # container (bucket), the blob or prefix (key) and the SAS query string (query, never shown);
    # http(s): the URL; file: the path.
    repo_id: str = ""
    revision: str | None = None
    bucket: str = ""
    key: str = ""
    url: str = ""
    path: str = ""
    host: str = ""
    query: str = ""

    @property
    def archive_suffix(self) -> str | None:
        """For http(s): the archive type the URL's path names, if any."""
        name = urlsplit(self.url).path.lower() if self.url else self.path.lower()
        return next((s for s in ARCHIVE_SUFFIXES if name.endswith(s)), None)

    def redacted(self) -> str:
        """The URI as :func:`redact` shows it: no userinfo, no query string, no control character."""
        return redact(self.raw)

    def __str__(self) -> str:
        return self.redacted()

    def with_revision(self, revision: str | None) -> SourceURI:
        if revision is None:
            return self
        if self.scheme != "hf":
            raise URIError(f"--revision applies to hf:// sources only, not {self.scheme}://")
        _check_revision(revision, self.raw)
        return SourceURI(self.raw, "hf", repo_id=self.repo_id, revision=revision)


def redact(text: str, *, limit: int = 200) -> str:
    """``text`` (a URI of any scheme, parsed or not, or a bare path) fit for a log, a status or an
    Event, by one rule for every scheme:

    - userinfo (``user:password@`` before the host) is dropped;
    - a query string becomes ``?<redacted>`` (a presigned URL's signature, an S3 ``versionId``, a
      token in a parameter) and a fragment is dropped;
    - control and bidi characters are escaped (:func:`localmodel.text.printable`), and the result is
      cut to ``limit`` characters.

    A bare absolute path has no query: it is only escaped. In ``abfs[s]://`` URIs the part before
    ``@`` is the filesystem (container), not a credential (Hadoop's ABFS syntax), and is kept.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return printable(text, limit=limit)
    rest, query, _ = rest.partition("?")
    rest = rest.split("#", 1)[0]
    authority, slash, path = rest.partition("/")
    if scheme.lower() not in ("abfs", "abfss") or authority.count("@") != 1 or ":" in authority.split("@")[0]:
        authority = authority.rsplit("@", 1)[-1]
    suffix = "?<redacted>" if query else ""
    return printable(f"{scheme.lower()}://{authority}{slash}{path}", limit=limit) + suffix


def parse_uri(text: object, *, field: str = "sourceModelUri") -> SourceURI:
    """Parse a source URI or raise URIError naming the field and the fix."""
    if not isinstance(text, str) or not text.strip():
        raise URIError(f"{field}: expected a URI such as hf://owner/model, got {text!r}")
    if text != text.strip() or has_control(text):
        raise URIError(f"{field}: '{_short(text)}' contains whitespace or control characters")
    if text.startswith("/"):
        return _file(text, text, field)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise URIError(
            f"{field}: {_short(text)!r} has no scheme; use hf://, s3://, http(s)://, file:// "
            "or an absolute path"
        )
    scheme = scheme.lower()
    if scheme in REFUSED:
        raise URIError(f"{field}: {scheme}:// sources are not supported by the node cache; {REFUSED[scheme]}")
    if scheme in ("abfs", "abfss"):
        return _abfs(text, rest, field)
    if scheme not in SUPPORTED:
        raise URIError(
            f"{field}: scheme {scheme!r} is not supported; use one of "
            + ", ".join(f"{s}://" for s in SUPPORTED)
            + " or an Azure Blob URL"
        )
    if scheme == "hf":
        return _hf(text, rest, field)
    if scheme == "s3":
        return _s3(text, rest, field)
    if scheme == "gs":
        return _gs(text, rest, field)
    if scheme == "file":
        return _file_uri(text, rest, field)
    return _http(text, field)


def _file_uri(raw: str, rest: str, field: str) -> SourceURI:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise URIError(f"{field}: {_short(raw)!r}: file URIs name an absolute path, like file:///models/x")
    decoded = unquote("/" + path)
    if has_control(decoded):
        raise URIError(f"{field}: '{_short(raw)}' names a path with control characters")
    return _file(raw, decoded, field)


def _hf(raw: str, rest: str, field: str) -> SourceURI:
    repo, colon, revision = rest.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_HF_PART.fullmatch(p) for p in parts) or ".." in repo:
        raise URIError(f"{field}: {_short(raw)!r}: expected hf://OWNER/REPO or hf://OWNER/REPO:REVISION")
    if colon:
        _check_revision(revision, raw, field)
    return SourceURI(raw, "hf", repo_id=repo, revision=revision if colon else None)


def _check_revision(revision: str, raw: str, field: str = "--revision") -> None:
    if not _HF_REVISION.fullmatch(revision) or ".." in revision:
        raise URIError(f"{field}: {_short(raw)!r}: revision {revision!r} is not a valid git ref")


def _s3(raw: str, rest: str, field: str) -> SourceURI:
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise URIError(
            f"{field}: {_short(raw)!r}: s3:// URIs carry no credentials; give them through the "
            "environment (AWS_ACCESS_KEY_ID, a profile, a role) or the cache's storage secret"
        )
    if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket:
        raise URIError(
            f"{field}: {_short(raw)!r}: bucket {bucket!r} is not a valid S3 bucket name "
            "(3-63 lowercase letters, digits, dots, hyphens)"
        )
    if any(seg == ".." for seg in key.split("/")):
        raise URIError(f"{field}: {_short(raw)!r}: the key must not contain '..'")
    return SourceURI(raw, "s3", bucket=bucket, key=key)


def _gs(raw: str, rest: str, field: str) -> SourceURI:
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise URIError(
            f"{field}: {_short(raw)!r}: gs:// URIs carry no credentials; give them through "
            "GOOGLE_APPLICATION_CREDENTIALS or the cache's storage secret"
        )
    if not _GCS_BUCKET.fullmatch(bucket) or ".." in bucket:
        raise URIError(
            f"{field}: {_short(raw)!r}: bucket {bucket!r} is not a valid GCS bucket name "
            "(3-63 lowercase letters, digits, dots, hyphens, underscores)"
        )
    if any(seg == ".." for seg in key.split("/")) or "?" in key or "#" in key:
        raise URIError(f"{field}: {_short(raw)!r}: the object name must not contain '..', '?' or '#'")
    return SourceURI(raw, "gs", bucket=bucket, key=key)


def _azure(raw: str, field: str, host: str, path: str, query: str) -> SourceURI:
    """``host`` is the account's blob host; ``path`` is ``CONTAINER[/BLOB-OR-PREFIX]``, percent-encoded."""
    container, _, key = path.partition("/")
    if not _AZURE_CONTAINER.fullmatch(container):
        raise URIError(
            f"{field}: {_short(raw)!r}: the container is not a valid Azure container name "
            "(3-63 lowercase letters, digits and single hyphens); expected "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH"
        )
    key = unquote(key)
    if any(seg == ".." for seg in key.split("/")) or has_control(key):
        raise URIError(f"{field}: {_short(raw)!r}: the blob name must not contain '..' or control characters")
    return SourceURI(raw, "azure", url=raw, host=host, bucket=container, key=key, query=query)


def _abfs(raw: str, rest: str, field: str) -> SourceURI:
    rest = rest.split("#", 1)[0]
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    filesystem, at, host = authority.partition("@")
    match = _AZURE_DFS_HOST.fullmatch(host.lower())
    if not at or match is None:
        raise URIError(
            f"{field}: {_short(raw)!r}: expected abfss://FILESYSTEM@ACCOUNT.dfs.core.windows.net/PATH"
        )
    blob_host = f"{match[1]}.{match[2].replace('dfs', 'blob', 1)}"
    return _azure(raw, field, blob_host, f"{filesystem}/{path}", query)


def _http(raw: str, field: str) -> SourceURI:
    try:
        parts = urlsplit(raw)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise URIError(f"{field}: {_short(raw)!r}: {e}") from e
    scheme = parts.scheme.lower()
    if not parts.hostname:
        raise URIError(f"{field}: {scheme}:// URIs need a host, like {scheme}://host/model.tar.gz")
    host = parts.hostname.lower()
    if scheme == "https" and parts.port is None:
        if _AZURE_BLOB_HOST.fullmatch(host):
            return _azure(raw, field, host, parts.path.lstrip("/"), parts.query)
        if dfs := _AZURE_DFS_HOST.fullmatch(host):  # ADLS Gen2: the same data as the blob endpoint
            blob_host = f"{dfs[1]}.{dfs[2].replace('dfs', 'blob', 1)}"
            return _azure(raw, field, blob_host, parts.path.lstrip("/"), parts.query)
        if parts.path.rstrip("/").endswith(".git"):
            # KServe clones these (kserve_storage.py:84, _GIT_RE); fetched as one file, it would be a page.
            raise URIError(
                f"{field}: '{redact(raw)}': git repositories are not supported by the node cache; use "
                "hf://OWNER/REPO for a Hugging Face repository, or copy the model to object storage"
            )
        if _AZURE_FILE_HOST.fullmatch(host):
            raise URIError(
                f"{field}: '{redact(raw)}': Azure Files shares are not supported by the node cache; "
                "copy the model to Azure Blob, or mount the share on the nodes and use file://"
            )
    name = parts.path.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise URIError(f"{field}: '{redact(raw)}' names no file; http(s) sources are one file or one archive")
    return SourceURI(raw, "https" if scheme == "https" else "http", url=raw)


def _file(raw: str, path: str, field: str) -> SourceURI:
    if not path.startswith("/") or any(seg == ".." for seg in path.split("/")):
        raise URIError(f"{field}: {_short(raw)!r}: expected an absolute path without '..'")
    return SourceURI(raw, "file", path=path)


def _short(text: str) -> str:
    # Error messages echo input: the one redaction rule, kept short.
    return redact(text, limit=120)
