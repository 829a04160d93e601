"""A small S3-compatible server on 127.0.0.1 that serves objects from files in a folder, with sendfile.

moto (tests/support/s3.py) reads a whole object for every ranged GET and keeps it in memory, so it
cannot serve a multi-GB object; s3rver (Node) takes a core of its own. This one speaks the real S3
REST protocol (path-style addressing) for what the download engine, boto3, the CRT client and s5cmd
use, and sends object bytes with ``sendfile`` (aiohttp's ``FileResponse``):

    GET  /                                   ListBuckets
    HEAD /{bucket}                           HeadBucket
    GET  /{bucket}?location                  GetBucketLocation
    GET  /{bucket}?list-type=2&prefix=...    ListObjectsV2: ``max-keys`` (at most 1000), ``prefix``,
                                             ``delimiter``, ``start-after``, ``continuation-token``,
                                             ``encoding-type=url``; ListObjects (v1, ``marker``) too
    HEAD /{bucket}/{key}                     HeadObject
    GET  /{bucket}/{key}                     GetObject, ``Range: bytes=a-b`` answered 206 with
                                             Content-Range; ``If-Match`` checked against the ETag

Objects are the files under ``root/{bucket}/``; the key is the path below the bucket's folder (a
sparse file made with ``truncate`` serves a multi-GB object that costs no disk). Metadata:

- ETag: the MD5 of the content for files up to :data:`MD5_LIMIT` (as S3 gives for a single-part
  upload); for larger files a multipart-style ``"<hex>-<parts>"`` derived from size and mtime, which
  is not an MD5 of anything (as S3 gives for a multipart upload: clients do not verify it).
- A full-object SHA256 only where a test registers one (:meth:`S3Files.put` with ``sha256=True``,
  or :meth:`S3Files.describe`): HeadObject and GetObject then send ``x-amz-checksum-sha256`` and
  ``x-amz-checksum-type: FULL_OBJECT`` when asked with ``x-amz-checksum-mode: ENABLED`` (not on a
  ranged GET, as S3), and listings
  carry ``<ChecksumAlgorithm>SHA256</ChecksumAlgorithm>`` (real S3 never puts the value in a listing).

Authentication: a request must carry an ``Authorization`` header (SigV4, or SigV2) or a presigned
query (SigV4 ``X-Amz-Signature`` with ``X-Amz-Date``/``X-Amz-Expires``, or SigV2 ``Signature`` with
``Expires``); an expired presigned URL is refused with 403, an anonymous request too.
**Signatures are not verified**: any key id and secret are accepted. Writes (PUT, multipart uploads,
DELETE) are not implemented: tests put files in the folder (:meth:`S3Files.put`, :meth:`S3Files.path`).

Faults: :meth:`S3Files.shift` answers ranged GETs of a key with the same length from another offset
(206, its Content-Range saying so). ``start(ssl_context=...)`` serves over TLS.

Every request is recorded (method, bucket, key, range, presigned or not). :meth:`S3Files.hold` makes
GETs of one key beyond the first N wait until :meth:`S3Files.release`, so a test can kill a client
at a known point. Run standalone for benchmarks: ``python -m tests.support.s3files --root DIR``
prints the endpoint and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import pytest
import pytest_asyncio
from aiohttp import hdrs, web
from multidict import CIMultiDict

MiB = 1 << 20
MD5_LIMIT = 16 * MiB
PART_SIZE = 8 * MiB  # for the multipart-style ETag's part count
NS = "http://s3.amazonaws.com/doc/2006-03-01/"
REGION = "us-east-1"


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    range: str | None
    presigned: bool
    query: dict[str, str]


@dataclass
class _Meta:
    stamp: tuple[int, int]  # (size, mtime_ns) the cached values were computed for
    etag: str


@dataclass
class _Hold:
    after: int
    served: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)


class S3Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[Request] = []
        self.endpoint = ""
        self._sha256: dict[tuple[str, str], str] = {}  # base64, as S3 sends it
        self._etags: dict[tuple[str, str], _Meta] = {}
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._shifts: dict[tuple[str, str], int] = {}
        self._runner: web.AppRunner | None = None

    # -- content ----------------------------------------------------------------------------

    def bucket(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return name

    def path(self, bucket: str, key: str) -> Path:
        """Where the object lives; parents are created, so a test can write or ``truncate`` it."""
        path = self._file(bucket, key, create=True)
        assert path is not None, key
        return path

    def put(self, bucket: str, key: str, body: bytes, *, sha256: bool = False) -> None:
        self.path(bucket, key).write_bytes(body)
        if sha256:
            self.describe(bucket, key, sha256=hashlib.sha256(body).hexdigest())

    def describe(self, bucket: str, key: str, *, sha256: str) -> None:
        """Announce a full-object SHA256 (hex) for an object, as if uploaded with ChecksumSHA256."""
        self._sha256[(bucket, key)] = base64.b64encode(bytes.fromhex(sha256)).decode()

    def hold(self, bucket: str, key: str, *, after: int) -> None:
        """GETs of this key beyond the first ``after`` wait until :meth:`release`."""
        self._holds[(bucket, key)] = _Hold(after)

    def shift(self, bucket: str, key: str, by: int) -> None:
        """Answer ranged GETs of this key from ``by`` bytes further on: same length, wrong bytes."""
        self._shifts[(bucket, key)] = by

    def release(self) -> None:
        for hold in self._holds.values():
            hold.gate.set()
        self._holds.clear()

    def gets(self, key: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.key == key]

    # -- serving ----------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        app = web.Application()
        app.router.add_route("GET", "/", self._list_buckets)
        app.router.add_route("*", "/{bucket}", self._bucket)
        app.router.add_route("*", "/{bucket}/", self._bucket)
        app.router.add_route("*", "/{bucket}/{key:.+}", self._object)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024, ssl_context=ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"{'https' if ssl_context else 'http'}://{host}:{port}"

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request, bucket: str, key: str = "") -> None:
        query = dict(request.query)
        v4, v2 = "X-Amz-Signature" in query, "Signature" in query and "AWSAccessKeyId" in query
        self.requests.append(
            Request(request.method, bucket, key, request.headers.get(hdrs.RANGE), v4 or v2, query)
        )
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        if not (v4 or v2 or auth.startswith(("AWS4-HMAC-SHA256 ", "AWS "))):
            raise _error(request, 403, "AccessDenied", "Anonymous access is not allowed here", key=key)
        try:
            if v4:
                signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                expired = (datetime.now(UTC) - signed).total_seconds() > int(query["X-Amz-Expires"])
            else:
                expired = v2 and int(query.get("Expires", "0")) < datetime.now(UTC).timestamp()
        except (KeyError, ValueError):
            raise _error(request, 400, "AuthorizationQueryParametersError", "Bad presign", key=key) from None
        if expired:
            raise _error(request, 403, "AccessDenied", "Request has expired", key=key)

    async def _list_buckets(self, request: web.Request) -> web.Response:
        self._record(request, "")
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        buckets = "".join(
            f"<Bucket><Name>{escape(n)}</Name><CreationDate>{_iso(self.root / n)}</CreationDate></Bucket>"
            for n in names
        )
        return _xml(
            f'<ListAllMyBucketsResult xmlns="{NS}"><Owner><ID>owner</ID><DisplayName>owner</DisplayName>'
            f"</Owner><Buckets>{buckets}</Buckets></ListAllMyBucketsResult>"
        )

    async def _bucket(self, request: web.Request) -> web.Response:
        name = request.match_info["bucket"]
        self._record(request, name)
        folder = self.root / name
        if not _safe_name(name) or not folder.is_dir():
            raise _error(request, 404, "NoSuchBucket", "The specified bucket does not exist", bucket=name)
        if request.method == "HEAD":
            return web.Response(headers={"x-amz-bucket-region": REGION})
        if request.method != "GET":
            raise _error(request, 501, "NotImplemented", "Only reads are implemented", bucket=name)
        if "location" in request.query:
            return _xml(f'<LocationConstraint xmlns="{NS}"></LocationConstraint>')
        return await asyncio.to_thread(self._list_objects, request, name, folder)

    def _list_objects(self, request: web.Request, bucket: str, folder: Path) -> web.Response:
        q = request.query
        v2 = q.get("list-type") == "2"
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        encode = q.get("encoding-type") == "url"
        try:
            max_keys = max(0, min(1000, int(q.get("max-keys", "1000"))))
        except ValueError:
            raise _error(request, 400, "InvalidArgument", "max-keys is not a number", bucket=bucket) from None
        if v2:
            token = q.get("continuation-token")
            after = _untoken(token) if token else q.get("start-after", "")
            if after is None:
                raise _error(request, 400, "InvalidArgument", "The continuation token is not valid", bucket)
        else:
            after = q.get("marker", "")

        def enc(text: str) -> str:
            return escape(quote(text, safe="/~") if encode else text)

        contents: list[str] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for key, path in self._keys(folder, prefix):
            if key <= after:
                continue
            if delimiter and delimiter in key[len(prefix) :]:
                common = key[: key.index(delimiter, len(prefix)) + len(delimiter)]
                if common <= after or (prefixes and prefixes[-1] == common):
                    continue
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                prefixes.append(common)
                last = common
                continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            st = path.stat()
            checksum = ""
            if (bucket, key) in self._sha256:
                checksum = (
                    "<ChecksumAlgorithm>SHA256</ChecksumAlgorithm><ChecksumType>FULL_OBJECT</ChecksumType>"
                )
            contents.append(
                f"<Contents><Key>{enc(key)}</Key><LastModified>{_iso(path)}</LastModified>"
                f"<ETag>&quot;{self._etag(bucket, key, path)}&quot;</ETag>{checksum}<Size>{st.st_size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
            last = key
        body = [f'<ListBucketResult xmlns="{NS}"><Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix>']
        if delimiter:
            body.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if encode:
            body.append("<EncodingType>url</EncodingType>")
        body.append(f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{str(truncated).lower()}</IsTruncated>")
        if v2:
            body.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
            if "continuation-token" in q:
                body.append(f"<ContinuationToken>{escape(q['continuation-token'])}</ContinuationToken>")
            if "start-after" in q:
                body.append(f"<StartAfter>{enc(q['start-after'])}</StartAfter>")
            if truncated:
                body.append(f"<NextContinuationToken>{_token(last)}</NextContinuationToken>")
        else:
            body.append(f"<Marker>{enc(after)}</Marker>")
            if truncated:
                body.append(f"<NextMarker>{enc(last)}</NextMarker>")
        body += contents
        body += [f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>" for p in prefixes]
        body.append("</ListBucketResult>")
        return _xml("".join(body))

    def _keys(self, folder: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        """(key, file) under the bucket's folder whose key starts with ``prefix``, in key order."""
        # Walk only the folder the prefix points into; sort by the UTF-8 bytes of the key, as S3 does.
        start = folder / prefix.rsplit("/", 1)[0] if "/" in prefix else folder
        found: list[tuple[bytes, str, Path]] = []
        if start.is_dir():
            for dirpath, _, filenames in os.walk(start):
                for name in filenames:
                    path = Path(dirpath) / name
                    key = path.relative_to(folder).as_posix()
                    if key.startswith(prefix) and not name.startswith(".s3files-"):
                        found.append((key.encode(), key, path))
        found.sort()
        for _, key, path in found:
            yield key, path

    def _file(self, bucket: str, key: str, *, create: bool = False) -> Path | None:
        if not _safe_name(bucket) or not key or key.endswith("/"):
            return None
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        path = self.root / bucket / key
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _etag(self, bucket: str, key: str, path: Path) -> str:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        meta = self._etags.get((bucket, key))
        if meta is None or meta.stamp != stamp:
            if st.st_size <= MD5_LIMIT:
                etag = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            else:
                seed = hashlib.md5(f"{key}:{stamp}".encode(), usedforsecurity=False).hexdigest()
                etag = f"{seed}-{-(-st.st_size // PART_SIZE)}"
            meta = _Meta(stamp, etag)
            self._etags[(bucket, key)] = meta
        return meta.etag

    async def _object(self, request: web.Request) -> web.StreamResponse:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        self._record(request, bucket, key)
        if not _safe_name(bucket) or not (self.root / bucket).is_dir():
            raise _error(request, 404, "NoSuchBucket", "The specified bucket does not exist", bucket, key)
        if request.method not in ("GET", "HEAD"):
            raise _error(request, 501, "NotImplemented", "Only reads are implemented", bucket, key)
        path = self._file(bucket, key)
        if path is None or not path.is_file():
            raise _error(request, 404, "NoSuchKey", "The specified key does not exist.", bucket, key)
        etag = await asyncio.to_thread(self._etag, bucket, key, path)
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", "x-amz-request-id": "s3files"}
        sha = self._sha256.get((bucket, key))
        asked = request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
        # As S3 does: a full-object checksum is sent for a whole object, never with a range.
        if sha and asked and (request.method == "HEAD" or hdrs.RANGE not in request.headers):
            headers |= {"x-amz-checksum-sha256": sha, "x-amz-checksum-type": "FULL_OBJECT"}
        wanted = request.headers.get(hdrs.IF_MATCH)
        if wanted is not None and wanted.strip() not in ("*", f'"{etag}"', etag):
            raise _error(request, 412, "PreconditionFailed", "At least one precondition failed", bucket, key)
        if request.method == "HEAD":
            size = path.stat().st_size
            headers |= {"Content-Length": str(size), "Last-Modified": _http_date(path)}
            return web.Response(headers=headers)
        hold = self._holds.get((bucket, key))
        if hold is not None:
            hold.served += 1
            if hold.served > hold.after:
                await hold.gate.wait()
        by = self._shifts.get((bucket, key))
        rng = request.headers.get(hdrs.RANGE, "")
        if by and rng.startswith("bytes="):
            return await asyncio.to_thread(_shifted, path, rng, by, headers)
        return _ObjectResponse(path, etag=f'"{etag}"', headers=headers)


class _ObjectResponse(web.FileResponse):
    """FileResponse (Range, 206, Content-Range, sendfile) with the object's S3 ETag, and without
    aiohttp's own conditional requests (its ETag is not the object's) or its ``.gz`` sibling lookup
    (a key ``x`` must never be answered with the bytes of a key ``x.gz``)."""

    _DROP = frozenset(
        h.lower()
        for h in (
            hdrs.IF_MATCH,
            hdrs.IF_NONE_MATCH,
            hdrs.IF_RANGE,
            hdrs.IF_MODIFIED_SINCE,
            hdrs.IF_UNMODIFIED_SINCE,
            hdrs.ACCEPT_ENCODING,
        )
    )

    def __init__(self, path: Path, *, etag: str, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._s3_etag = etag

    async def prepare(self, request: web.BaseRequest) -> Any:
        kept = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in self._DROP)
        return await super().prepare(request.clone(headers=kept))

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self._headers[hdrs.ETAG] = self._s3_etag


def _shifted(path: Path, rng: str, by: int, headers: dict[str, str]) -> web.Response:
    size = path.stat().st_size
    a, _, b = rng[len("bytes=") :].partition("-")
    length = (int(b) if b else size - 1) - int(a) + 1
    start = min(int(a) + by, size - length)
    with path.open("rb") as fh:
        fh.seek(start)
        body = fh.read(length)
    headers = headers | {"Content-Range": f"bytes {start}-{start + length - 1}/{size}"}
    return web.Response(status=206, body=body, headers=headers)


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and not name.startswith(".")


def _xml(body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=f'<?xml version="1.0" encoding="UTF-8"?>\n{body}'.encode(),
        content_type="application/xml",
    )


def _error(
    request: web.Request, status: int, code: str, message: str, bucket: str = "", key: str = ""
) -> web.HTTPException:
    """An S3 error document (aiohttp sends no body for a HEAD, as S3)."""
    text = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message>"
        + (f"<BucketName>{escape(bucket)}</BucketName>" if bucket else "")
        + (f"<Key>{escape(key)}</Key>" if key else "")
        + "<RequestId>s3files</RequestId></Error>"
    )
    error = web.HTTPException(text=text, content_type="application/xml")
    error.set_status(status)
    return error


def _token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _untoken(token: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError):
        return None


def _iso(path: Path) -> str:
    stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _http_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS environment that points boto3 (and the engine) at a local endpoint."""
    return {
        "AWS_ACCESS_KEY_ID": "s3files",
        "AWS_SECRET_ACCESS_KEY": "s3filesSECRETkey",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }


@pytest_asyncio.fixture
async def s3files(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[S3Files]:
    """A fresh server over an empty folder, and the AWS environment pointing at it."""
    root = Path(tempfile.mkdtemp(prefix="s3files-"))
    server = S3Files(root)
    await server.start()
    for k, v in aws_env(server.endpoint).items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    try:
        yield server
    finally:
        await server.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the folders under ROOT as S3 buckets.")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def serve() -> None:
        server = S3Files(args.root)
        await server.start(args.host, args.port)
        print(server.endpoint, flush=True)
        server.requests = _Discard()
        await asyncio.Event().wait()

    asyncio.run(serve())


class _Discard(list[Request]):
    """A request log that keeps nothing (a long-running benchmark server)."""

    def append(self, item: Request) -> None:
        return None


if __name__ == "__main__":
    main()
