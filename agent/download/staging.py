"""Where a download is assembled, what survives a crash, and the atomic publish.

A download works in its own staging folder on the same filesystem as its destination::

    <staging>/files/...        the model's files, preallocated and filled in by ranged writes
    <staging>/progress.json    the revision and, per file begun and not finished, the chunks that
                               are durable (fdatasync'd before recorded)
    <staging>/done.jsonl       one line per finished file: verified, and how (see :class:`Progress`)
    <staging>/manifest.json    written just before publish; its presence means "publish in progress"

A chunk is recorded only after its bytes were synced, so after SIGKILL or power loss a restart
re-fetches exactly the chunks not recorded. Publish renames ``files/`` onto the destination (the old
copy, if any, is renamed to trash first), then moves the manifest into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmodel.errors import SpecError
from localmodel.layout import CacheLayout
from localmodel.manifest import Manifest

PROGRESS_VERSION = 2  # 1: every file in progress.json, no journal (still read)


@dataclass(frozen=True)
class Destination:
    """Where a model is published, and the hidden folders that go with it (same filesystem)."""

    final: Path
    staging: Path
    manifest: Path
    trash: Path

    @classmethod
    def in_cache(cls, layout: CacheLayout, key: str) -> Destination:
        return cls(layout.model_dir(key), layout.staging_dir(key), layout.manifest_file(key), layout.trash)

    @classmethod
    def for_folder(cls, dest: Path) -> Destination:
        """``modelcache pull URI DEST``: a cache's model folder, or any folder of the user's."""
        dest = dest.absolute()
        placed = CacheLayout.of_model_dir(dest)
        if placed is not None:
            return cls.in_cache(*placed)
        hidden = dest.parent / ".modelcache"
        return cls(dest, hidden / "pull" / dest.name, hidden / "pull" / f"{dest.name}.json", hidden / "trash")

    def published(self) -> Manifest | None:
        """The manifest of what is published, if the folder and its manifest both exist."""
        if not self.final.is_dir() or not self.manifest.is_file():
            return None
        try:
            return Manifest.read(self.manifest)
        except SpecError:
            return None  # unreadable or from a newer format: not trusted, never deleted here


@dataclass(slots=True)
class FileProgress:
    size: int | None
    sha256: str | None
    git_sha1: str | None
    md5: str | None
    chunks: set[int] = field(default_factory=set)
    verified: bool = False
    computed_sha256: str | None = None
    checked_by: str | None = None  # once verified: "sha256", "sha1" (git blob), "md5" or "size"

    def identity(self) -> tuple[Any, ...]:
        return (self.size, self.sha256, self.git_sha1, self.md5)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "sha256": self.sha256,
            "gitSha1": self.git_sha1,
            "md5": self.md5,
            "chunks": sorted(self.chunks),
            "verified": self.verified,
            "computedSha256": self.computed_sha256,
            "checkedBy": self.checked_by,
        }

    @classmethod
    def from_json(cls, f: Any) -> FileProgress:
        return cls(
            size=f["size"],
            sha256=f.get("sha256"),
            git_sha1=f.get("gitSha1"),
            md5=f.get("md5"),
            chunks=set(f.get("chunks", [])),
            verified=bool(f.get("verified")),
            computed_sha256=f.get("computedSha256"),
            checked_by=f.get("checkedBy"),
        )


@dataclass
class Progress:
    """The durable state of one download; mutated in memory, saved by :meth:`save` (all of it) and
    :meth:`checkpoint` (what changed).

    On disk, two files beside each other, so a checkpoint costs what changed, not the file count:

    - ``progress.json``: the revision, the chunk size, and the files begun but not finished (their
      durable chunks), rewritten atomically at each checkpoint (bounded by the concurrency);
    - ``done.jsonl``: one line per finished (verified) file, appended and synced. A torn last line
      (crash mid-append) is ignored: that file is fetched again.

    Files in neither are not begun. Format 1 (every file in ``progress.json``) is still read.
    """

    revision: str | None
    chunk_size: int
    files: dict[str, FileProgress]

    @staticmethod
    def journal_path(path: Path) -> Path:
        return path.with_name("done.jsonl")

    @classmethod
    def load(cls, path: Path) -> Progress | None:
        """The state saved at ``path`` (progress.json) and its journal; None when unreadable."""
        try:
            data = json.loads(path.read_text())
            if data.get("version") not in (1, PROGRESS_VERSION):
                return None
            files = {p: FileProgress.from_json(f) for p, f in data["files"].items()}
            if data["version"] == PROGRESS_VERSION:
                with contextlib.suppress(FileNotFoundError), cls.journal_path(path).open("rb") as journal:
                    for line in journal:
                        if not line.endswith(b"\n"):
                            break  # torn by a crash mid-append
                        record = json.loads(line)
                        files[record["path"]] = FileProgress.from_json(record)
            return cls(revision=data["revision"], chunk_size=int(data["chunkSize"]), files=files)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable progress: start over, the staging files are overwritten

    def save(self, path: Path) -> None:
        """Write the whole state: the journal of finished files, then the header with the rest."""
        done = [(p, f) for p, f in self.files.items() if f.verified]
        write_atomic(self.journal_path(path), b"".join(_journal_line(p, f) for p, f in done))
        self._save_header(path, {p: f for p, f in self.files.items() if not f.verified and f.chunks})

    def checkpoint(
        self, path: Path, partial: dict[str, FileProgress], finished: dict[str, FileProgress]
    ) -> None:
        """Append ``finished`` files to the journal (synced), then rewrite the header with
        ``partial``, the files begun and not finished: the caller synced their data first. A file in
        both (a crash between the two writes) is read back as finished."""
        if finished:
            fd = os.open(self.journal_path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, b"".join(_journal_line(p, f) for p, f in finished.items()))
                os.fdatasync(fd)
            finally:
                os.close(fd)
        self._save_header(path, partial)

    def _save_header(self, path: Path, files: dict[str, FileProgress]) -> None:
        data = {
            "version": PROGRESS_VERSION,
            "revision": self.revision,
            "chunkSize": self.chunk_size,
            "files": {p: f.to_json() for p, f in files.items()},
        }
        write_atomic(path, json.dumps(data, separators=(",", ":")).encode())


def _journal_line(path: str, f: FileProgress) -> bytes:
    record = {"path": path, **f.to_json()}
    del record["chunks"]  # a finished file has them all
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: the file holds the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(dest: Destination, manifest: Manifest) -> None:
    """Make the staged files the destination, atomically for readers of the destination path."""
    write_atomic(dest.staging / "manifest.json", json.dumps(manifest.to_json(), indent=1).encode())
    finish_publish(dest)


def finish_publish(dest: Destination) -> bool:
    """Complete a publish that a crash interrupted (or the one just begun); True if one was done."""
    staged_manifest = dest.staging / "manifest.json"
    if not staged_manifest.is_file():
        return False
    files = dest.staging / "files"
    dest.final.parent.mkdir(parents=True, exist_ok=True)
    if files.is_dir():
        if dest.final.exists():
            # The old copy goes to trash first; readers see the old folder, then the new one.
            dest.trash.mkdir(parents=True, exist_ok=True)
            old = dest.trash / f"{dest.final.name}.{uuid.uuid4().hex[:8]}"
            dest.final.replace(old)
            files.replace(dest.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            files.replace(dest.final)
        fsync_dir(dest.final.parent)
    elif not dest.final.is_dir():
        return False  # nothing staged and nothing published: the manifest is stale
    dest.manifest.parent.mkdir(parents=True, exist_ok=True)
    staged_manifest.replace(dest.manifest)
    fsync_dir(dest.manifest.parent)
    shutil.rmtree(dest.staging, ignore_errors=True)
    return True


def remove_published(dest: Destination) -> None:
    """Delete a published model: manifest first (so a crash never leaves a trusted half), then
    rename the folder into trash and remove it there."""
    with contextlib.suppress(FileNotFoundError):
        dest.manifest.unlink()
    if dest.final.exists():
        dest.trash.mkdir(parents=True, exist_ok=True)
        old = dest.trash / f"{dest.final.name}.{uuid.uuid4().hex[:8]}"
        dest.final.replace(old)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(dest.staging, ignore_errors=True)
