"""What this node can give its peers of one model, read from its cache folder; and one file request
resolved to an open file and a byte range, or refused.

Two places hold a model's bytes (:mod:`localmodel.layout`, :mod:`agent.download.staging`):

- the published copy, ``models/<key>`` with ``.modelcache/manifests/<key>.json``: every file the
  manifest names is complete and was verified before publish;
- a download in progress, ``.modelcache/staging/<key>``: its resume state
  (:class:`agent.download.journal.Progress`) names the files verified (complete) and, per file
  begun, the chunks whose bytes were synced before they were recorded (durable). Nothing else of the
  staging folder is given: a chunk being written is not recorded yet.

Rules (:func:`choose`, pure):

- A download in progress of another revision than the published copy is what the agent is working
  toward (the spec changed): its holding is given. Otherwise the published copy, when there is one;
  otherwise the download in progress. An archive's download (``staging/<key>/archive``) gives
  nothing: its members exist only once unpacked (receivers fetch archives from the origin).
- Only paths the manifest or the resume state names, and only safe relative ones
  (:func:`localmodel.manifest.is_safe_relative_path`), are ever opened; a request for anything else
  is "not held" (404), the same answer as for a path that does not exist, so nothing is told of
  what else the folder holds.
- Files are opened with :func:`agent.download.staging.open_below` below ``models/`` or the staging
  folder: no symbolic link on the way is followed. The open file must be a regular file of the size
  the manifest or the resume state gives (a staged file is preallocated to it), else "not held".
- A range must lie inside the file (else 416) and, for a file in progress, inside durable chunks
  (else 404: it may be held later).

The parsed manifest and resume state are kept while their files stay the same (device, inode, size,
modification time), so a model of 100,000 files is not parsed again for each range asked.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from agent.download.journal import Progress
from agent.download.staging import LinkRefused, lstat_below, open_below
from localmodel.errors import SpecError
from localmodel.layout import STORAGE_KEY_RE, CacheLayout
from localmodel.manifest import Manifest, is_safe_relative_path
from localmodel.peering import FileHolding, Holding

# A manifest or resume state larger than this is not read (a 100,000-file manifest is ~20 MB).
MAX_STATE_BYTES = 256 << 20
CACHED_MODELS = 32


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of a file of ``size`` bytes; ``partial``: asked by a Range header."""

    start: int
    end: int
    size: int
    partial: bool


class Unsatisfiable(Exception):
    """A Range header this server does not satisfy (416): outside the file, several ranges, or
    malformed. ``size`` goes in ``Content-Range: bytes */<size>``."""

    def __init__(self, size: int, why: str) -> None:
        super().__init__(why)
        self.size = size


def parse_range(header: str | None, size: int) -> ByteRange:
    """The bytes a ``Range`` header asks of a file of ``size`` bytes (RFC 9110 §14.1.2): none, one
    ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` (the last n). An end past the file is cut to it.
    Raises :class:`Unsatisfiable` for several ranges, another unit, a malformed one, a start at or
    past the end, or any range of an empty file."""
    if header is None:
        return ByteRange(0, size, size, partial=False)
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise Unsatisfiable(size, "one range of bytes only")
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last) or not all(p.isdigit() and p.isascii() for p in (first, last) if p):
        raise Unsatisfiable(size, "a malformed range")
    if not first:  # the last n bytes
        n = _number(last)
        if n == 0 or size == 0:
            raise Unsatisfiable(size, "an empty range")
        return ByteRange(max(0, size - n), size, size, partial=True)
    start = _number(first)
    end = min(size, _number(last) + 1) if last else size
    if start >= size or end <= start:
        raise Unsatisfiable(size, "a range outside the file")
    return ByteRange(start, end, size, partial=True)


def _number(digits: str) -> int:
    """ASCII digits -> int, any beyond 18 significant ones read as 10**18 (past the end of any
    file): never int()'s digit limit (a ValueError, an HTTP 500) for ``bytes=0-99...9``."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 18 else 10**18


def covered(held: FileHolding, chunk_size: int, start: int, end: int) -> bool:
    """True when bytes ``[start, end)`` lie in what ``held`` holds (all of it, or durable chunks of
    ``chunk_size`` bytes, chunk i covering ``[i*chunk_size, (i+1)*chunk_size)``)."""
    if held.complete:
        return True
    if end <= start:
        return False
    return all(i in held.chunks for i in range(start // chunk_size, (end - 1) // chunk_size + 1))


@dataclass(frozen=True)
class View:
    """One model's holding, and where its files are: ``folder`` (below ``below``, which no link on
    the way to a file may be followed past)."""

    holding: Holding
    folder: Path
    below: Path


def choose(
    key: str,
    *,
    published: Manifest | None,
    progress: Progress | None,
    archive: bool,
    chunk_size: int,
    layout: CacheLayout,
) -> View | None:
    """The holding given for ``key`` (the module's rules): from the published manifest, or from the
    resume state of a download in progress (``archive``: an archive's, which gives nothing).
    ``chunk_size``: the chunk size announced for a published copy (its files are all complete).
    None when nothing of the model is held."""
    staged = None if archive or progress is None else _from_progress(key, progress)
    if published is not None and not (staged is not None and staged.revision != published.revision):
        files = {
            f.path: FileHolding(f.size, complete=True)
            for f in published.files
            if is_safe_relative_path(f.path)
        }
        holding = Holding(key, published.revision, chunk_size, published=True, files=files)
        return View(holding, layout.model_dir(key), layout.models)
    if staged is not None:
        return View(staged, layout.staging_dir(key) / "files", layout.staging)
    return None


def _from_progress(key: str, progress: Progress) -> Holding:
    files: dict[str, FileHolding] = {}
    for path, f in progress.files.items():
        if f.size is None or not is_safe_relative_path(path):
            continue
        if f.verified:
            files[path] = FileHolding(f.size, complete=True)
        elif f.chunks:
            files[path] = FileHolding(f.size, complete=False, chunks=frozenset(f.chunks))
    return Holding(key, progress.revision, progress.chunk_size, published=False, files=files)


@dataclass(frozen=True)
class Opened:
    """A file request resolved: read ``range`` from ``fd`` (the caller closes it)."""

    fd: int
    range: ByteRange


class Holdings:
    """What one cache folder holds, for the peer server (thread-safe: requests are resolved in
    worker threads). ``chunk_size``: announced for published copies."""

    def __init__(self, cache_dir: Path, *, chunk_size: int) -> None:
        self.layout = CacheLayout(cache_dir)
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[tuple[object, ...], View | None]] = OrderedDict()

    def view(self, key: str) -> View | None:
        """``key``'s holding and folder, or None when nothing of it is held (or ``key`` is not a
        storage key)."""
        if not STORAGE_KEY_RE.match(key):
            return None
        layout = self.layout
        staging = layout.staging_dir(key)
        paths = (
            (layout.manifest_file(key), layout.hidden),
            (layout.model_dir(key), layout.models),
            (staging / "progress.json", layout.staging),
            (staging / "done.jsonl", layout.staging),
            (staging / "archive", layout.staging),
        )
        signature = tuple(_identity(path, below) for path, below in paths)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == signature:
                self._cache.move_to_end(key)
                return hit[1]
        manifest_id, folder_id, progress_id, _, archive_id = signature
        published = None
        if manifest_id is not None and folder_id is not None and folder_id[0] == "dir":
            published = _read_manifest(layout.manifest_file(key), layout.hidden)
        progress = None if progress_id is None else _read_progress(staging, layout.staging)
        found = choose(
            key,
            published=published,
            progress=progress,
            archive=archive_id is not None,
            chunk_size=self.chunk_size,
            layout=layout,
        )
        with self._lock:
            self._cache[key] = (signature, found)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHED_MODELS:
                self._cache.popitem(last=False)
        return found

    def manifest(self, key: str) -> Manifest | None:
        """The published manifest of ``key`` (what names its files only: no adopted extras), or None
        when ``key`` is not published or a download of another revision is under way."""
        found = self.view(key)
        if found is None or not found.holding.published:
            return None
        manifest = _read_manifest(self.layout.manifest_file(key), self.layout.hidden)
        return None if manifest is None else replace(manifest, extras=(), checked_by={})

    def open(self, key: str, relative: str, range_header: str | None) -> Opened | None:
        """The open file and the bytes to send for ``relative`` of ``key``; None when not held (the
        module's rules). Raises :class:`Unsatisfiable` (416) for a range the file cannot satisfy."""
        found = self.view(key)
        if found is None or not is_safe_relative_path(relative):
            return None
        held = found.holding.files.get(relative)
        if held is None:
            return None
        wanted = parse_range(range_header, held.size)
        if not covered(held, found.holding.chunk_size, wanted.start, wanted.end):
            return None
        try:
            fd = open_below(found.folder / relative, os.O_RDONLY | os.O_NONBLOCK, below=found.below)
        except (LinkRefused, OSError):
            return None  # gone (published or deleted meanwhile), or a link planted: not held
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != held.size:
            os.close(fd)
            return None
        return Opened(fd, wanted)


def _identity(path: Path, below: Path) -> tuple[object, ...] | None:
    try:
        st = lstat_below(path, below=below)
    except (LinkRefused, OSError):
        return ("refused",)
    if st is None:
        return None
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    return (kind, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_below(path: Path, below: Path) -> bytes | None:
    try:
        fd = open_below(path, os.O_RDONLY | os.O_NONBLOCK, below=below)
    except (LinkRefused, OSError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(MAX_STATE_BYTES + 1)
    return data if len(data) <= MAX_STATE_BYTES else None


def _read_manifest(path: Path, below: Path) -> Manifest | None:
    data = _read_below(path, below)
    if data is None:
        return None
    try:
        return Manifest.from_json(json.loads(data), where=str(path))
    except (ValueError, SpecError):
        return None  # unreadable or from a newer format: not given


def _read_progress(staging: Path, below: Path) -> Progress | None:
    header = _read_below(staging / "progress.json", below)
    if header is None:
        return None
    try:
        fd = open_below(staging / "done.jsonl", os.O_RDONLY | os.O_NONBLOCK, below=below)
    except FileNotFoundError:
        return Progress.parse(header, None)
    except (LinkRefused, OSError):
        return None
    with os.fdopen(fd, "rb") as journal:
        if not stat.S_ISREG(os.fstat(journal.fileno()).st_mode):
            return None
        try:
            return Progress.parse(header, journal)
        except OSError:
            return None
