"""Peer fill's wire contract, pure: what one node agent asks another for, and what it gets back.

Every agent with ``--peer-addr`` serves, over plain HTTP/1.1 on its peer port:

- ``GET /v1/models/<storage key>/holding`` → 200, JSON :class:`Holding`: what it holds of that model
  now (a published copy: every file complete; a download in progress: the files verified and the
  chunks that are durable, as its resume state records them). 404 when it holds nothing of it.
- ``GET /v1/models/<storage key>/manifest`` → 200, the published manifest's JSON
  (:meth:`localmodel.manifest.Manifest.to_json`); 404 when not published.
- ``GET /v1/models/<storage key>/files/<relative path>`` with an optional single ``Range: bytes=a-b``
  → 200 or 206 (``Content-Range``) with the bytes; 404 for a file or range it does not hold durably;
  416 for a range outside the file.

Every request carries ``Authorization: Bearer <cluster token>`` (:data:`AUTH_HEADER`); anything else
is answered 401 before a path is looked at. Paths are percent-encoded per segment
(:func:`file_path`); the server answers only for paths its manifest or resume state names.

The receiving engine trusts none of it: the listing always comes from the origin, every range is
checked against what was asked, and every file against the origin's hash (or the controller-passed
manifest digest, :func:`manifest_digest`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from localmodel.errors import SpecError
from localmodel.manifest import Manifest

AUTH_HEADER = "Authorization"
API_PREFIX = "/v1/models"
DEFAULT_PEER_PORT = 7071


def holding_path(storage_key: str) -> str:
    return f"{API_PREFIX}/{storage_key}/holding"


def manifest_path(storage_key: str) -> str:
    return f"{API_PREFIX}/{storage_key}/manifest"


def file_path(storage_key: str, relative: str) -> str:
    """The URL path of one file: each segment percent-encoded (a name may hold spaces, '#', '?')."""
    return f"{API_PREFIX}/{storage_key}/files/" + "/".join(quote(s, safe="") for s in relative.split("/"))


def bearer(token: str) -> dict[str, str]:
    return {AUTH_HEADER: f"Bearer {token}"}


@dataclass(frozen=True)
class FileHolding:
    """One file as a peer holds it: all of it (``complete``), or these chunk indexes of
    ``Holding.chunk_size`` bytes each (index i covers ``[i*chunk_size, min((i+1)*chunk_size, size))``)."""

    size: int
    complete: bool
    chunks: frozenset[int] = frozenset()

    def has(self, index: int) -> bool:
        return self.complete or index in self.chunks


@dataclass(frozen=True)
class Holding:
    """What one peer holds of one model. ``revision`` is its listing's revision (None: the source
    has none); a receiver uses a peer only when it equals its own listing's, and partial chunks only
    when ``chunk_size`` equals its own. ``published``: the whole model is published there."""

    storage_key: str
    revision: str | None
    chunk_size: int
    published: bool
    files: Mapping[str, FileHolding] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "storageKey": self.storage_key,
            "revision": self.revision,
            "chunkSize": self.chunk_size,
            "published": self.published,
            "files": {
                p: {"size": f.size, "complete": f.complete}
                | ({} if f.complete else {"chunks": sorted(f.chunks)})
                for p, f in sorted(self.files.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> Holding:
        """Raises SpecError naming the field for anything malformed (a peer's answer is input)."""
        if not isinstance(data, Mapping):
            raise SpecError("not a JSON object", where="holding")
        key = data.get("storageKey")
        revision = data.get("revision")
        chunk_size = data.get("chunkSize")
        published = data.get("published")
        files = data.get("files")
        if not isinstance(key, str):
            raise SpecError("expected a string", field="storageKey")
        if revision is not None and not isinstance(revision, str):
            raise SpecError("expected a string or null", field="revision")
        if not isinstance(chunk_size, int) or not _count(chunk_size) or chunk_size <= 0:
            raise SpecError("expected a whole number > 0", field="chunkSize")
        if not isinstance(published, bool):
            raise SpecError("expected true or false", field="published")
        if not isinstance(files, Mapping):
            raise SpecError("expected an object", field="files")
        return cls(key, revision, chunk_size, published, {str(p): _file(p, f) for p, f in files.items()})


# A peer's numbers are input: sizes and chunk indexes past any real file (2**63) are malformed, so
# no arithmetic on a holding works with thousand-digit integers.
MAX_COUNT = 1 << 63


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def _file(path: Any, raw: Any) -> FileHolding:
    where = f"files.{path}"
    if not isinstance(raw, Mapping):
        raise SpecError("expected an object", field=where)
    size, complete, chunks = raw.get("size"), raw.get("complete"), raw.get("chunks", [])
    if not isinstance(size, int) or not _count(size):
        raise SpecError("expected a whole number ≥ 0", field=f"{where}.size")
    if not isinstance(complete, bool):
        raise SpecError("expected true or false", field=f"{where}.complete")
    if not isinstance(chunks, list) or not all(_count(c) for c in chunks):
        raise SpecError("expected a list of whole numbers", field=f"{where}.chunks")
    return FileHolding(size, complete, frozenset(chunks))


def manifest_digest(manifest: Manifest) -> str:
    """sha256 (hex) of what a manifest says of its files: the sorted (path, size, sha256, sha1, md5,
    crc32c) rows as canonical JSON. Equal digests: the same files with the same hashes, whatever
    the publish time or folder."""
    rows = sorted((f.path, f.size, f.sha256, f.sha1, f.md5, f.crc32c) for f in manifest.files)
    canonical = json.dumps(
        {"storageKey": manifest.storage_key, "revision": manifest.revision, "files": rows},
        separators=(",", ":"),
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
