"""The node's cache folder: lock it, check its format, scan what it holds, delete what is unwanted.

Thin I/O around :mod:`localmodel.layout`. Nothing here deletes outside ``<cache-dir>/models`` and
``<cache-dir>/.modelcache``: every path is built from a validated storage key. Nothing is deleted
that a manifest of ours does not name (a ``models/<key>`` folder without one is someone else's, for
instance KServe's agent's: reported as foreign, never deleted), and no symbolic link below the cache
folder is followed or deleted through: the folders of the layout behind a link refuse the start
(:class:`CacheUnsafe`), a link at a model's path is reported and that model left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.download.ownership import names_key
from agent.download.staging import (
    Destination,
    LinkRefused,
    check_tree,
    finish_publish,
    refuse_links,
    remove_published,
    remove_tree,
    write_atomic,
)
from localmodel.errors import DownloadError, InvalidInput, ModelcacheError
from localmodel.layout import FORMAT_VERSION, STORAGE_KEY_RE, CacheLayout
from localmodel.manifest import Manifest, entry_check
from localmodel.uri import parse_uri

log = logging.getLogger("modelcache.agent")


class CacheLocked(ModelcacheError):
    """Another agent process holds this cache folder."""


class CompileCacheKept(LinkRefused):
    """The model was deleted, its compile cache not: a link on the way to it (never followed)."""

    def __init__(self, message: str, *, removed: bool) -> None:
        super().__init__(message)
        self.removed = removed  # what delete() would have returned: False when models/<key> was kept


class CacheUnsafe(ModelcacheError):
    """A folder of the cache's layout is a symbolic link: the agent does not start on it."""


@dataclass(frozen=True)
class Published:
    key: str
    manifest: Manifest
    size: int  # bytes on disk per the manifest (sizes checked at scan)


@dataclass(frozen=True)
class Scan:
    published: dict[str, Published]
    staged: dict[str, int]  # key -> bytes staged so far
    untrusted: tuple[str, ...]  # keys whose folder does not match the manifest that names it
    free: int
    foreign: tuple[str, ...] = ()  # keys whose folder no manifest of ours names: never deleted
    links: tuple[str, ...] = ()  # paths (relative to the cache folder) that are links: not followed


class CacheDir:
    def __init__(self, root: Path) -> None:
        self.layout = CacheLayout(root)
        self._lock_fd: int | None = None

    def destination(self, key: str) -> Destination:
        return Destination.in_cache(self.layout, key)

    def open(self) -> None:
        """Create the hidden folders, take the lock, check the on-disk format version.

        Raises :class:`CacheUnsafe` when one of those folders (or the lock, the format file) is a
        symbolic link, :class:`CacheLocked` when another agent holds the folder."""
        layout = self.layout
        folders = (layout.models, layout.manifests, layout.staging, layout.trash, layout.compile_cache)
        for d in (*folders, layout.lock_file):
            try:
                refuse_links(d, below=layout.root)
                refuse_links(layout.format_file, below=layout.root)
            except LinkRefused as e:
                raise CacheUnsafe(
                    f"{e}; the agent does not start on a cache folder with links in it"
                ) from None
            if d not in (layout.lock_file, layout.compile_cache):  # the runtime makes compile-cache
                d.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLocked(
                f"{layout.root} is in use by another modelcache agent (lock {layout.lock_file}); "
                "run one agent per cache folder"
            ) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if layout.format_file.exists():
            text = layout.format_file.read_text().strip()
            version = int(text) if text.isdigit() else -1
            if version > FORMAT_VERSION or version < 1:
                self.close()
                raise InvalidInput(
                    f"{layout.root} has on-disk format {text!r}, which this modelcache (format "
                    f"{FORMAT_VERSION}) does not know; upgrade modelcache. Nothing was changed."
                )
        else:
            write_atomic(layout.format_file, f"{FORMAT_VERSION}\n".encode())

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def scan(self, *, verify: bool = False) -> Scan:
        """Finish interrupted publishes, empty the trash, then report what is here.

        A published folder is trusted when its manifest exists and every file has the manifest's
        size (``verify`` also re-hashes each file by the hash its manifest entry records); with a
        manifest that does not match it is untrusted (ours: fetched again or deleted); without any
        manifest it is foreign (never deleted). Links found in ``models/``, ``staging/``, ``trash/``
        and ``manifests/`` are listed, not followed.
        """
        layout = self.layout
        links = [
            f"{folder.relative_to(layout.root)}/{name}"
            for folder in (
                layout.models,
                layout.staging,
                layout.trash,
                layout.manifests,
                layout.compile_cache,
            )
            for name in _links(folder)
        ]
        for pending in _subdirs(layout.staging):
            if STORAGE_KEY_RE.match(pending.name):
                try:
                    finish_publish(self.destination(pending.name))
                except (DownloadError, OSError) as e:
                    # Left as it is: a link on the way, or someone's folder where it would land.
                    log.warning("staging/%s: the interrupted publish is not finished: %s", pending.name, e)
        for leftover in _subdirs(layout.trash):
            remove_tree(leftover)
        published: dict[str, Published] = {}
        untrusted: list[str] = []
        foreign: list[str] = []
        for folder in _subdirs(layout.models):
            key = folder.name
            if not STORAGE_KEY_RE.match(key):
                continue  # not ours: never touched
            dest = self.destination(key)
            try:
                dest.check_links()
            except LinkRefused:
                continue  # listed in links above
            if not dest.manifest.is_file() or not dest.owned():
                foreign.append(key)  # no manifest, or files it does not name: someone's, never deleted
                continue
            manifest = self._trusted(key, verify=verify)
            if manifest is None:
                untrusted.append(key)
            else:
                published[key] = Published(key, manifest, manifest.total_bytes)
        staged = {d.name: _tree_bytes(d) for d in _subdirs(layout.staging) if STORAGE_KEY_RE.match(d.name)}
        return Scan(
            published,
            staged,
            tuple(sorted(untrusted)),
            self.free_bytes(),
            foreign=tuple(sorted(foreign)),
            links=tuple(sorted(links)),
        )

    def _trusted(self, key: str, *, verify: bool) -> Manifest | None:
        dest = self.destination(key)
        manifest = dest.published()
        if manifest is None or not names_key(manifest, key):
            return None  # another model's manifest (a pull into the wrong folder) is not this one's
        try:
            # A link in a published model was planted (only an archive's own members link, inside it):
            # untrusted, so it is fetched again or deleted, never served or hashed through the link.
            check_tree(dest.final, inner_links=_from_archive(manifest))
        except LinkRefused as e:
            log.warning("models/%s: %s; not trusted", key, e)
            return None
        for entry in manifest.files:
            path = dest.final / entry.path
            try:
                if path.stat().st_size != entry.size:
                    return None
            except OSError:
                return None
            # Every hash the manifest knows (sha256, git blob sha1, md5, crc32c: entry_check's rule); a
            # file with none (published with --no-verify) is checked by its size alone.
            check = entry_check(entry) if verify else None
            if check is not None:
                h = check.new(entry.size)
                try:
                    with path.open("rb") as fh:
                        while block := fh.read(8 << 20):
                            h.update(block)
                except OSError:
                    return None
                if h.hexdigest() != check.expected:
                    return None
        return manifest

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.layout.root).free

    def staged_bytes(self, key: str) -> int:
        """Bytes allocated in a model's staging folder (preallocated files count whole)."""
        return _tree_bytes(self.layout.staging_dir(key))

    def folder_bytes(self, key: str) -> int:
        """Bytes allocated in ``models/<key>`` (a folder to adopt: what it holds needs no new room)."""
        return _tree_bytes(self.layout.model_dir(key))

    def staged_keys(self) -> list[str]:
        return [d.name for d in _subdirs(self.layout.staging) if STORAGE_KEY_RE.match(d.name)]

    def delete(self, key: str) -> bool:
        """Remove a model (published and staged) by storage key, and the runtime's compile cache
        kept beside it (``modelcache serve`` writes it there). False when ``models/<key>`` was kept
        because no manifest of ours names it. Raises LinkRefused for a link on the way to the model,
        :class:`CompileCacheKept` (the model itself removed) for one on the way to its compile cache."""
        removed = remove_published(self.destination(key))
        compile_cache = self.layout.compile_cache_dir(key)
        try:
            refuse_links(compile_cache, below=self.layout.root)
        except LinkRefused as e:
            raise CompileCacheKept(f"{e}; the model itself was deleted", removed=removed) from None
        remove_tree(compile_cache)
        return removed


def _links(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                # Allocated bytes, not apparent size: preallocated files count as what they hold.
                # lstat: a link planted there counts as itself, not as what it points at.
                total += (Path(dirpath) / name).lstat().st_blocks * 512
    return total


def _from_archive(manifest: Manifest) -> bool:
    """The model was unpacked from an archive (its URI names one): its members may link inside it."""
    try:
        return parse_uri(manifest.source_model_uri).archive_suffix is not None
    except ModelcacheError:
        return False
