"""A small Google Cloud Storage server on 127.0.0.1 that serves objects from files in a folder.

gcp-storage-emulator (tests/support/gcs.py) reads a whole object from its store for every request,
ranged or not, so parallel ranged GETs cost it what they never cost GCS. This one speaks the JSON
API as google-cloud-storage (``Blob.download_to_filename``, ``transfer_manager``) and the gs://
source use it, and sends object bytes with ``sendfile`` from the requested offset:

    GET /storage/v1/b/{bucket}                      bucket metadata
    GET /storage/v1/b/{bucket}/o                    objects.list: ``prefix``, ``delimiter``
                                                    (``prefixes``), ``maxResults`` (at most 1000),
                                                    ``pageToken``/``nextPageToken``, ``startOffset``,
                                                    ``endOffset``; other selectors are refused (400)
    GET /storage/v1/b/{bucket}/o/{name}             objects.get (metadata)
    GET /download/storage/v1/b/{bucket}/o/{name}?alt=media   media download (also without the
                                                    ``/download`` prefix): ``Range: bytes=a-b``
                                                    answered 206 with Content-Range, 416 past the
                                                    end; ``generation`` checked (404 when it is not
                                                    the object's, as GCS); ``x-goog-hash`` with the
                                                    object's crc32c and md5, as GCS sends it

Objects are the files under ``root/{bucket}/``; the name is the path below the bucket's folder
(names with ``/`` are folders; a name in the request path is percent-encoded, ``%2F`` included).
Object metadata as GCS gives it: ``size``, ``generation`` (the file's mtime in microseconds, as
GCS's generations are), ``md5Hash`` and ``crc32c`` (base64, big-endian CRC32C), ``etag``,
``mediaLink``. The hashes are recorded when an object is first seen (or put) and kept while the
file's size and mtime stay; a file rewritten (new mtime) is a new generation with new hashes, as an
overwrite on GCS. :meth:`GcsFiles.corrupt` flips a bit and keeps the recorded metadata: the stored
bytes no longer match what GCS says of them.

Errors in the JSON API's shape (``{"error": {"code", "message", "errors": [{"reason", ...}]}}``):
404 for a missing bucket or object. Access: buckets are public unless :meth:`GcsFiles.grant`
names a bearer token for them; then a request without ``Authorization`` is 401 (anonymous caller)
and one with another token 403, as GCS answers. Tokens are not OAuth-validated: a test's token
server issues them. Writes are not implemented: tests put files in the folder (:meth:`put`).

It runs on an event loop in a thread of its own (:meth:`start`/:meth:`close`), so synchronous code
(google-cloud-storage, ``list_gcs``) and async tests can both call it. Run standalone for
benchmarks: ``python -m tests.support.gcsfiles --root DIR`` prints the endpoint and serves until
killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import google_crc32c
from aiohttp import hdrs, web

from tests.support.loopthread import LoopThread
from tests.support.s3files import _ObjectResponse

MAX_RESULTS = 1000  # objects.list's page size limit
_READ = 4 << 20
# objects.list parameters that change which objects are listed and are not implemented here.
_UNSUPPORTED = ("matchGlob", "versions", "softDeleted", "includeFoldersAsPrefixes")


@dataclass(frozen=True)
class Meta:
    stamp: tuple[int, int]  # (size, mtime_ns) the metadata was recorded for
    generation: int
    md5: str  # base64, as GCS gives md5Hash
    crc32c: str  # base64 of the big-endian CRC32C, as GCS gives crc32c


@dataclass
class Request:
    method: str
    path: str  # the raw request path
    range: str | None
    authorization: bool


class GcsFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.endpoint = ""
        self.requests: list[Request] = []
        self.record = True
        # False: object resources (listings, metadata) carry no md5Hash or crc32c, as some emulators
        # and gateways give them; media answers still carry x-goog-hash.
        self.listed_hashes = True
        self._meta: dict[tuple[str, str], Meta] = {}
        self._grants: dict[str, str] = {}
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._thread: LoopThread | None = None

    # -- content ----------------------------------------------------------------------------

    def bucket(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return name

    def path(self, bucket: str, name: str) -> Path:
        path = self._file(bucket, name)
        assert path is not None, name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def put(self, bucket: str, name: str, data: bytes) -> None:
        path = self.path(bucket, name)
        path.write_bytes(data)
        self.meta(bucket, name, path)

    def corrupt(self, bucket: str, name: str, offset: int) -> None:
        """Flip the low bit of the byte at ``offset``, keeping the object's recorded metadata."""
        path = self.path(bucket, name)
        meta = self.meta(bucket, name, path)
        with path.open("r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([byte ^ 0x01]))
        st = path.stat()
        with self._lock:
            self._meta[(bucket, name)] = Meta(
                (st.st_size, st.st_mtime_ns), meta.generation, meta.md5, meta.crc32c
            )

    def grant(self, bucket: str, token: str) -> None:
        """Make a bucket private: only ``Authorization: Bearer <token>`` may read it."""
        self._grants[bucket] = token

    def revoke_all(self) -> None:
        self._grants.clear()

    def media_gets(self, name: str) -> list[str | None]:
        """The Range header of each media download of an object, in order (None: whole)."""
        tail = "/o/" + quote(name, safe="")
        return [
            r.range
            for r in self.requests
            if r.path.startswith("/download/") and r.path.split("?", 1)[0].endswith(tail)
        ]

    def meta(self, bucket: str, name: str, path: Path) -> Meta:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            meta = self._meta.get((bucket, name))
        if meta is not None and meta.stamp == stamp:
            return meta
        md5 = hashlib.md5(usedforsecurity=False)
        crc = google_crc32c.Checksum()
        with path.open("rb") as fh:
            while block := fh.read(_READ):
                md5.update(block)
                crc.update(block)
        meta = Meta(
            stamp,
            st.st_mtime_ns // 1000,
            base64.b64encode(md5.digest()).decode(),
            base64.b64encode(crc.digest()).decode(),
        )
        with self._lock:
            self._meta[(bucket, name)] = meta
        return meta

    # -- serving ----------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on an event loop in a daemon thread; returns once the port is bound."""
        self._thread = LoopThread("gcsfiles")
        self._thread.run(self._start(host, port))

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._stop())
            self._thread.stop()

    async def _start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://{host}:{bound}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        if self.record:
            self.requests.append(
                Request(request.method, request.raw_path, request.headers.get(hdrs.RANGE), bool(auth))
            )
        raw = request.raw_path.split("?", 1)[0]
        media = raw.startswith("/download/")
        parts = raw.removeprefix("/download").split("/")
        # ['', 'storage', 'v1', 'b', BUCKET, 'o', NAME]
        if len(parts) < 5 or parts[1:4] != ["storage", "v1", "b"]:
            raise _error(404, "notFound", f"Not Found: {raw}")
        bucket = unquote(parts[4])
        folder = self.root / bucket
        if not _safe_name(bucket) or not folder.is_dir():
            raise _error(404, "notFound", "The specified bucket does not exist.")
        self._check_access(bucket, auth, "objects.get" if len(parts) > 6 else "objects.list")
        if len(parts) == 5:
            return web.json_response(_bucket_resource(bucket, folder))
        if parts[5] != "o":
            raise _error(404, "notFound", f"Not Found: {raw}")
        if len(parts) == 6 or (len(parts) == 7 and parts[6] == ""):
            return await asyncio.to_thread(self._list, request, bucket, folder)
        name = unquote("/".join(parts[6:]))
        path = self._file(bucket, name)
        if path is None or not path.is_file():
            raise _error(404, "notFound", f"No such object: {bucket}/{name}")
        meta = await asyncio.to_thread(self.meta, bucket, name, path)
        wanted = request.query.get("generation")
        if wanted is not None and wanted != str(meta.generation):
            raise _error(404, "notFound", f"No such object: {bucket}/{name}#{wanted}")
        if not media and request.query.get("alt") != "media":
            return web.json_response(self._resource(request, bucket, name, meta))
        headers = {
            "x-goog-hash": f"crc32c={meta.crc32c},md5={meta.md5}",
            "x-goog-generation": str(meta.generation),
            "x-goog-metageneration": "1",
            "x-goog-stored-content-length": str(meta.stamp[0]),
            "x-goog-stored-content-encoding": "identity",
            "x-goog-storage-class": "STANDARD",
            "Content-Type": "application/octet-stream",
        }
        return _ObjectResponse(path, etag=_etag(meta), headers=headers)

    def _check_access(self, bucket: str, auth: str, permission: str) -> None:
        token = self._grants.get(bucket)
        if token is None:
            return
        if not auth:
            raise _error(
                401,
                "required",
                f"Anonymous caller does not have storage.{permission} access to the Google Cloud "
                f"Storage bucket. Permission 'storage.{permission}' denied on resource (or it may "
                "not exist).",
            )
        if auth != f"Bearer {token}":
            raise _error(
                403,
                "forbidden",
                f"The caller does not have storage.{permission} access to the Google Cloud Storage "
                f"bucket. Permission 'storage.{permission}' denied on resource (or it may not exist).",
            )

    def _list(self, request: web.Request, bucket: str, folder: Path) -> web.Response:
        q = request.query
        for name in _UNSUPPORTED:
            if name in q:
                raise _error(400, "invalid", f"gcsfiles does not implement objects.list {name}")
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        try:
            limit = max(1, min(MAX_RESULTS, int(q.get("maxResults", MAX_RESULTS))))
        except ValueError:
            raise _error(400, "invalid", "Invalid value for maxResults") from None
        after = ""
        if token := q.get("pageToken"):
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
            except (binascii.Error, ValueError):
                raise _error(400, "invalid", "Invalid pageToken") from None
        start, end = q.get("startOffset", ""), q.get("endOffset")
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for name, path in self._names(folder, prefix):
            if name <= after or name < start or (end is not None and name >= end):
                continue
            if delimiter and delimiter in name[len(prefix) :]:
                common = name[: name.index(delimiter, len(prefix)) + len(delimiter)]
                if common <= after or (prefixes and prefixes[-1] == common):
                    continue
                if len(items) + len(prefixes) >= limit:
                    truncated = True
                    break
                prefixes.append(common)
                last = common
                continue
            if len(items) + len(prefixes) >= limit:
                truncated = True
                break
            items.append(self._resource(request, bucket, name, self.meta(bucket, name, path)))
            last = name
        body: dict[str, Any] = {"kind": "storage#objects"}
        if truncated:
            body["nextPageToken"] = base64.urlsafe_b64encode(last.encode()).decode()
        if prefixes:
            body["prefixes"] = prefixes
        if items:
            body["items"] = items
        return web.Response(text=json.dumps(body), content_type="application/json")

    def _names(self, folder: Path, prefix: str) -> list[tuple[str, Path]]:
        """(name, file) under the bucket's folder whose name starts with ``prefix``, in the order
        of the names' UTF-8 bytes (as GCS lists)."""
        start = folder / prefix.rsplit("/", 1)[0] if "/" in prefix else folder
        found: list[tuple[bytes, str, Path]] = []
        if start.is_dir():
            for dirpath, _, filenames in os.walk(start):
                for filename in filenames:
                    path = Path(dirpath) / filename
                    name = path.relative_to(folder).as_posix()
                    if name.startswith(prefix):
                        found.append((name.encode(), name, path))
        found.sort()
        return [(name, path) for _, name, path in found]

    def _resource(self, request: web.Request, bucket: str, name: str, meta: Meta) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}"
        quoted = quote(name, safe="")
        stamp = datetime.fromtimestamp(meta.generation / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{meta.generation}",
            "selfLink": f"{base}/storage/v1/b/{bucket}/o/{quoted}",
            "mediaLink": (
                f"{base}/download/storage/v1/b/{bucket}/o/{quoted}?generation={meta.generation}&alt=media"
            ),
            "name": name,
            "bucket": bucket,
            "generation": str(meta.generation),
            "metageneration": "1",
            "contentType": "application/octet-stream",
            "storageClass": "STANDARD",
            "size": str(meta.stamp[0]),
            **({"md5Hash": meta.md5, "crc32c": meta.crc32c} if self.listed_hashes else {}),
            "etag": _etag(meta),
            "timeCreated": stamp,
            "updated": stamp,
            "timeStorageClassUpdated": stamp,
        }

    def _file(self, bucket: str, name: str) -> Path | None:
        if not _safe_name(bucket) or not name or name.endswith("/"):
            return None
        if any(p in ("", ".", "..") for p in name.split("/")):
            return None
        return self.root / bucket / name


def _etag(meta: Meta) -> str:
    # GCS's object etag is an opaque string per generation and metageneration.
    return base64.b64encode(f"{meta.generation}/1".encode()).decode()


def _bucket_resource(name: str, folder: Path) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(folder.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "kind": "storage#bucket",
        "id": name,
        "name": name,
        "projectNumber": "0",
        "metageneration": "1",
        "location": "US",
        "storageClass": "STANDARD",
        "etag": "CAE=",
        "timeCreated": stamp,
        "updated": stamp,
    }


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and not name.startswith(".")


def _error(status: int, reason: str, message: str) -> web.HTTPException:
    """An error in the JSON API's shape."""
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
    error = web.HTTPException(text=json.dumps(body), content_type="application/json")
    error.set_status(status)
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the folders under ROOT as GCS buckets.")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = GcsFiles(args.root)
    server.record = False  # a long-running benchmark server keeps no request log
    server.start(args.host, args.port)
    print(server.endpoint, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
