"""The resume state of one download (``progress.json`` and its journal ``done.jsonl`` in the staging
folder; see :mod:`agent.download.staging` for the folder): which chunks of which files are durable,
which files are finished and how they were checked."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.download.listing import Listing, RemoteFile
from agent.download.staging import write_atomic

PROGRESS_VERSION = 2  # 1: every file in progress.json, no journal (still read)


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
            header = path.read_bytes()
            try:
                journal = cls.journal_path(path).open("rb")
            except FileNotFoundError:
                return cls.parse(header, None)
            with journal:  # read line by line: a journal of 100,000 files is not held twice
                return cls.parse(header, journal)
        except OSError:
            return None

    @classmethod
    def parse(cls, header: bytes, journal: Iterable[bytes] | None) -> Progress | None:
        """The state from the bytes of ``progress.json`` and the lines of ``done.jsonl`` (None: no
        journal); None when unreadable. For a reader that opens the files its own way (the peer
        server follows no link: agent.peer.holdings)."""
        try:
            data = json.loads(header)
            if data.get("version") not in (1, PROGRESS_VERSION):
                return None
            files = {p: FileProgress.from_json(f) for p, f in data["files"].items()}
            if data["version"] == PROGRESS_VERSION and journal is not None:
                for line in journal:
                    if not line.endswith(b"\n"):
                        break  # torn by a crash mid-append
                    record = json.loads(line)
                    files[record["path"]] = FileProgress.from_json(record)
            return cls(revision=data["revision"], chunk_size=int(data["chunkSize"]), files=files)
        except (ValueError, KeyError, TypeError, AttributeError):
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
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            fd = os.open(self.journal_path(path), flags, 0o644)
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


def resumable(
    old: Progress | None, listing: Listing, chunk_size: int, staged_size: Callable[[RemoteFile], int | None]
) -> dict[str, FileProgress] | None:
    """What a saved state still holds for ``listing``: its files begun or finished whose identity
    (size and hashes) is the listing's and whose staged file (``staged_size``: its size, None when
    missing) has the listed size. None when there is no state, or it is of another revision or
    chunk size: start over."""
    if old is None or old.revision != listing.revision or old.chunk_size != chunk_size:
        return None
    out = {}
    for f in listing.files:
        kept = old.files.get(f.path)
        if kept is None or kept.identity() != (f.size, f.sha256, f.git_sha1, f.md5):
            continue
        size = staged_size(f)
        if size is None:
            continue
        if not (f.size is not None and size == f.size):
            kept.chunks.clear()
            kept.verified = False
        if kept.chunks or kept.verified:
            out[f.path] = kept
    return out
