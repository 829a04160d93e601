"""The manifest of a published model: what the agent wrote, what the runtime checks before serving.

Stored as JSON at ``<cache-dir>/.modelcache/manifests/<storage key>.json`` (see layout.py)::

    {"format": 1, "sourceModelUri": "...", "storageKey": "...", "revision": "<commit or etag>",
     "publishedAt": "2026-11-24T12:00:00Z",
     "files": [{"path": "config.json", "size": 123, "sha256": "...", "sha1": null, "md5": null}, ...]}

A folder adopted from another writer (KServe's agent: :mod:`agent.adopt`) may hold entries the
source does not list; ``"extras": [".cache", "notes.txt"]`` names them (relative paths, a folder
covering what is below it): kept, reported, never ours to delete or replace. Absent when empty.

Paths are relative, POSIX, and never absolute or with ``..`` (checked on read as on write). ``md5``
and ``crc32c`` are optional (manifests written before they were added still read). Which of the
hashes a file is checked with is :func:`hash_check`'s rule (:func:`entry_check` for an entry), the
same for the download engine, the agent's re-verify and ``modelcache serve --verify``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from localmodel.errors import SpecError
from localmodel.layout import FORMAT_VERSION


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str | None = None
    sha1: str | None = None  # git blob sha1: the sha1 of b"blob <size>\0" + content
    md5: str | None = None  # S3 single-part ETag, GCS md5Hash, Azure Content-MD5 (hex)
    crc32c: str | None = None  # GCS crc32c (8 hex digits, big-endian)


class _Crc32c:
    """CRC32C (Castagnoli) with hashlib's interface, by google-crc32c (its C extension where built)."""

    def __init__(self) -> None:
        import google_crc32c

        self._c = google_crc32c.Checksum()

    def update(self, data: bytes | memoryview) -> None:
        # The C extension takes read-only bytes only ("y#"), not a view of a read-only mapping.
        self._c.update(data if isinstance(data, bytes) else bytes(data))

    def hexdigest(self) -> str:
        return bytes(self._c.digest()).hex()


# The hashes a file may be checked by, strongest first (:func:`hash_check`'s order).
HASH_NAMES = ("sha256", "sha1", "md5", "crc32c")


@dataclass(frozen=True)
class HashCheck:
    """How one file's content is checked: ``name`` is "sha256", "sha1" (git blob), "md5" or
    "crc32c"."""

    name: str
    expected: str  # lowercase hex

    def new(self, size: int) -> Any:
        """A fresh hash object for a file of ``size`` bytes (the git blob header comes first)."""
        if self.name == "sha256":
            return hashlib.sha256()
        if self.name == "sha1":
            return hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
        if self.name == "crc32c":
            return _Crc32c()
        return hashlib.md5(usedforsecurity=False)


def hash_check(
    sha256: str | None, sha1: str | None, md5: str | None, crc32c: str | None = None
) -> HashCheck | None:
    """The strongest hash known for a file: sha256, else the git blob sha1 (Hugging Face's non-LFS
    files), else md5 (an S3 single-part ETag, an Azure blob's Content-MD5, a GCS md5Hash), else
    crc32c (GCS objects: the source gives it alone, see agent/download/gcs.py); None when there is
    none (checked by size only)."""
    for name, value in (("sha256", sha256), ("sha1", sha1), ("md5", md5), ("crc32c", crc32c)):
        if value:
            return HashCheck(name, value.lower())
    return None


def entry_check(entry: FileEntry) -> HashCheck | None:
    """:func:`hash_check` of a manifest entry."""
    return hash_check(entry.sha256, entry.sha1, entry.md5, entry.crc32c)


@dataclass(frozen=True)
class Manifest:
    source_model_uri: str
    storage_key: str
    revision: str | None
    files: tuple[FileEntry, ...]
    published_at: str | None = None
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Entries of an adopted folder the source does not list (see the module docstring): not ours.
    extras: tuple[str, ...] = ()
    # An adopted folder's files, path -> how each was checked before it was kept or placed
    # (agent.download.adoption: a hash name, "s3-multipart-etag", "source-bytes", "fetched").
    checked_by: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return (
            {
                "format": self.format,
                "sourceModelUri": self.source_model_uri,
                "storageKey": self.storage_key,
                "revision": self.revision,
                "publishedAt": self.published_at,
                "files": [
                    {"path": f.path, "size": f.size, "sha256": f.sha256, "sha1": f.sha1}
                    | ({"md5": f.md5} if f.md5 else {})
                    | ({"crc32c": f.crc32c} if f.crc32c else {})
                    for f in self.files
                ],
            }
            | ({"extras": list(self.extras)} if self.extras else {})
            | ({"checkedBy": dict(self.checked_by)} if self.checked_by else {})
        )

    @classmethod
    def from_json(cls, data: Any, *, where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise SpecError("not a JSON object", where=where)
        fmt = data.get("format")
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise SpecError(
                f"format {fmt!r} is not one this version understands (≤ {FORMAT_VERSION}); "
                "upgrade modelcache",
                field="format",
                where=where,
            )
        files = []
        for i, raw in enumerate(data.get("files") or []):
            if not isinstance(raw, dict):
                raise SpecError("not an object", field=f"files[{i}]", where=where)
            path = raw.get("path")
            size = raw.get("size")
            if not isinstance(path, str) or not is_safe_relative_path(path):
                raise SpecError(f"unsafe path {path!r}", field=f"files[{i}].path", where=where)
            if not isinstance(size, int) or size < 0:
                raise SpecError(f"bad size {size!r}", field=f"files[{i}].size", where=where)
            hashes = []
            for name in HASH_NAMES:
                value = raw.get(name) or None
                if value is not None and not (isinstance(value, str) and _is_hex(value)):
                    raise SpecError(f"bad {name} {value!r}", field=f"files[{i}].{name}", where=where)
                hashes.append(value)
            files.append(FileEntry(path, size, *hashes))
        extras = data.get("extras") or []
        if not isinstance(extras, list) or not all(
            isinstance(x, str) and is_safe_relative_path(x) for x in extras
        ):
            raise SpecError("not a list of safe relative paths", field="extras", where=where)
        checked_by = data.get("checkedBy") or {}
        if not isinstance(checked_by, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in checked_by.items()
        ):
            raise SpecError("not an object of paths to words", field="checkedBy", where=where)
        return cls(
            source_model_uri=str(data.get("sourceModelUri", "")),
            storage_key=str(data.get("storageKey", "")),
            revision=data.get("revision"),
            files=tuple(files),
            published_at=data.get("publishedAt"),
            format=fmt,
            extras=tuple(extras),
            checked_by=dict(checked_by),
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SpecError(f"cannot read manifest: {e}", where=str(path)) from e
        return cls.from_json(data, where=str(path))


def _is_hex(value: str) -> bool:
    return bool(value) and all(c in "0123456789abcdefABCDEF" for c in value)


def is_safe_relative_path(path: str) -> bool:
    """True for a relative POSIX path that stays inside its folder (no '..', not absolute, no '\\')."""
    if not path or "\\" in path or "\x00" in path:
        return False
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith("/"):
        return False
    return all(part not in ("..", ".", "") for part in path.split("/"))
