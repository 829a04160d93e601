"""The manifest of a published model: what the agent wrote, what the runtime checks before serving.

Stored as JSON at ``<cache-dir>/.modelcache/manifests/<storage key>.json`` (see layout.py)::

    {"format": 1, "sourceModelUri": "...", "storageKey": "...", "revision": "<commit or etag>",
     "publishedAt": "2026-11-24T12:00:00Z",
     "files": [{"path": "config.json", "size": 123, "sha256": "...", "sha1": null}, ...]}

Paths are relative, POSIX, and never absolute or with ``..`` (checked on read as on write).
"""

from __future__ import annotations

import json
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
    sha1: str | None = None


@dataclass(frozen=True)
class Manifest:
    source_model_uri: str
    storage_key: str
    revision: str | None
    files: tuple[FileEntry, ...]
    published_at: str | None = None
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "sourceModelUri": self.source_model_uri,
            "storageKey": self.storage_key,
            "revision": self.revision,
            "publishedAt": self.published_at,
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "sha1": f.sha1} for f in self.files
            ],
        }

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
            files.append(FileEntry(path, size, raw.get("sha256"), raw.get("sha1")))
        return cls(
            source_model_uri=str(data.get("sourceModelUri", "")),
            storage_key=str(data.get("storageKey", "")),
            revision=data.get("revision"),
            files=tuple(files),
            published_at=data.get("publishedAt"),
            format=fmt,
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SpecError(f"cannot read manifest: {e}", where=str(path)) from e
        return cls.from_json(data, where=str(path))


def is_safe_relative_path(path: str) -> bool:
    """True for a relative POSIX path that stays inside its folder (no '..', not absolute, no '\\')."""
    if not path or "\\" in path or "\x00" in path:
        return False
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith("/"):
        return False
    return all(part not in ("..", ".", "") for part in path.split("/"))
