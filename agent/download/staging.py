"""Where a download is assembled, what survives a crash, and the atomic publish.

A download works in its own staging folder on the same filesystem as its destination::

    <staging>/files/...        the model's files, preallocated and filled in by ranged writes
    <staging>/progress.json    the revision and, per file begun and not finished, the chunks that
                               are durable (fdatasync'd before recorded)
    <staging>/done.jsonl       one line per finished file: verified, and how (see
                               :class:`agent.download.journal.Progress`)
    <staging>/manifest.json    written just before publish; its presence means "publish in progress"

A chunk is recorded only after its bytes were synced, so after SIGKILL or power loss a restart
re-fetches exactly the chunks not recorded. Publish renames ``files/`` onto the destination (the old
copy, if any, is renamed to trash first), then moves the manifest into place.

What is published is read-only (files 0444, folders 0555). Only what a manifest of ours names is
ever replaced or deleted (:meth:`Destination.replaceable`, :meth:`Destination.owned`), and no
symbolic link below the destination's root is followed (:func:`refuse_links`): staged files are
opened folder by folder with O_NOFOLLOW (:func:`open_below`), and a tree with a link in it is never
published (:func:`check_tree`; only an archive's own members may link, inside the model).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from agent.download.ownership import Match, folder_match
from localmodel.errors import ForeignFolder, SpecError, UnsafePath
from localmodel.layout import CacheLayout
from localmodel.manifest import Manifest


@dataclass(frozen=True)
class Destination:
    """Where a model is published, and the hidden folders that go with it (same filesystem).

    ``root`` is the folder below which nothing is a symbolic link we follow: the cache folder, or
    for ``modelcache pull`` the folder DEST sits in. ``force`` lets a publish replace a DEST that
    modelcache did not publish (``modelcache pull --force``); the agent never sets it.
    """

    final: Path
    staging: Path
    manifest: Path
    trash: Path
    root: Path
    force: bool = False

    @classmethod
    def in_cache(cls, layout: CacheLayout, key: str) -> Destination:
        return cls(
            layout.model_dir(key),
            layout.staging_dir(key),
            layout.manifest_file(key),
            layout.trash,
            layout.root,
        )

    @classmethod
    def for_folder(cls, dest: Path, *, force: bool = False) -> Destination:
        """``modelcache pull URI DEST``: a cache's model folder, or any folder of the user's."""
        dest = dest.absolute()
        placed = CacheLayout.of_model_dir(dest)
        if placed is not None:
            return replace(cls.in_cache(*placed), force=force)
        staging, manifest = pull_paths(dest)
        return cls(dest, staging, manifest, dest.parent / ".modelcache" / "trash", dest.parent, force)

    def published(self) -> Manifest | None:
        """The manifest of what is published, if the folder and its manifest both exist."""
        if not self.final.is_dir() or not self.manifest.is_file():
            return None
        try:
            return Manifest.read(self.manifest)
        except SpecError:
            return None  # unreadable or from a newer format: not trusted, never deleted here

    def check_links(self) -> None:
        """Raise :class:`LinkRefused` when a path of ours, or a folder on the way to it, is a link."""
        inner = (
            self.staging / name
            for name in ("files", "archive", "progress.json", "done.jsonl", "manifest.json")
        )
        for path in (self.final, self.staging, self.manifest, self.trash, *inner):
            refuse_links(path, below=self.root)

    def owned(self) -> bool:
        """True when a manifest of ours names the destination folder and the folder holds nothing
        the manifest does not name (:func:`agent.download.ownership.folder_match`): ours to delete
        or replace. A manifest left over beside someone's new folder does not make it ours."""
        manifest = self.published()
        return manifest is not None and folder_match(self.final, manifest) is not Match.FOREIGN

    def replaceable(self) -> bool:
        """A publish may take the destination's place: nothing there, an empty folder, ours, or
        ``force``. Anything else is someone's files and is never deleted."""
        if self.force or not os.path.lexists(self.final) or self.owned():
            return True
        if not _is_real_dir(self.final):
            return False
        with os.scandir(self.final) as entries:  # closed at once: any() stops at the first
            return not any(entries)

    def refuse_foreign(self) -> None:
        """Raise :class:`ForeignFolder` (naming what is there) unless :meth:`replaceable`."""
        if not self.replaceable():
            why = (
                f"files the manifest at {self.manifest} does not name"
                if self.manifest.is_file()
                else f"no manifest at {self.manifest}"
            )
            raise ForeignFolder(
                f"{self.final} holds {describe(self.final)} that modelcache did not publish ({why}); "
                "it is never replaced: move it away, or choose a new or empty folder"
            )


PULL_NAMESPACES = ("staging", "manifests", "locks")


def pull_paths(dest: Path) -> tuple[Path, Path]:
    """The staging folder and manifest of ``modelcache pull``'s DEST (not in a cache), in the
    ``.modelcache/pull/`` folder beside it: ``staging/<name>`` and ``manifests/<name>.json`` (its
    lock: ``locks/<name>.lock``), distinct namespaces, so DEST ``d.json``'s staging and DEST ``d``'s
    manifest never share a path. The flat layout of earlier versions (``pull/<name>``,
    ``pull/<name>.json``) is read where it exists: a staged download resumes, a published model
    stays ours; its folder is told from the other names by its type."""
    pull = dest.parent / ".modelcache" / "pull"
    staging, manifest = pull / "staging" / dest.name, pull / "manifests" / f"{dest.name}.json"
    old_staging, old_manifest = pull / dest.name, pull / f"{dest.name}.json"
    if dest.name not in PULL_NAMESPACES and _is_real_dir(old_staging) and not os.path.lexists(staging):
        staging = old_staging
    if _is_real_file(old_manifest) and not os.path.lexists(manifest):
        manifest = old_manifest
    return staging, manifest


def _is_real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class LinkRefused(UnsafePath):
    """A symbolic link where modelcache keeps its folders: never followed, never deleted through."""


def refuse_links(path: Path, *, below: Path) -> None:
    """Raise :class:`LinkRefused` if ``path`` or any folder between ``below`` (excluded: the admin may
    place the cache folder behind a link) and it is a symbolic link. The check stops at the first
    part that does not exist: there is nothing there to follow."""
    try:
        parts = path.relative_to(below).parts
    except ValueError:
        raise LinkRefused(f"{path} is outside {below}") from None
    current = below
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISLNK(st.st_mode):
            raise LinkRefused(
                f"{current} is a symbolic link; modelcache never follows or deletes through a link in "
                "its folders: remove the link"
            )


def _link_refused(path: Path) -> LinkRefused:
    return LinkRefused(
        f"{path} is a symbolic link; modelcache never follows or writes through a link in its "
        "folders: remove the link"
    )


def _open_dir_below(below: Path, parts: tuple[str, ...], *, make: bool) -> int:
    """A descriptor of ``below/parts...``, each part opened relative to the one before with
    O_NOFOLLOW (created first with ``make``): a link at any part is :class:`LinkRefused`, and a
    link swapped in after a check cannot redirect the open (the kernel resolves no link). O_PATH:
    a folder that may be searched but not listed (0711) is passed as a plain path would be."""
    walk = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(below, walk)
    current = below
    try:
        for part in parts:
            current = current / part
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nxt = os.open(part, walk | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link_at(fd, part):
                    raise _link_refused(current) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _split(path: Path, below: Path) -> tuple[tuple[str, ...], str]:
    try:
        parts = path.relative_to(below).parts
    except ValueError:
        raise LinkRefused(f"{path} is outside {below}") from None
    if not parts:
        raise LinkRefused(f"{path} is the folder {below} itself, not a file below it")
    return parts[:-1], parts[-1]


def open_below(path: Path, flags: int, mode: int = 0o644, *, below: Path, make_parents: bool = False) -> int:
    """``os.open(path, flags)`` without following a symbolic link at ``path`` or at any folder between
    ``below`` (the caller's trusted folder, itself possibly behind a link the admin placed) and it.

    Each folder is opened relative to its parent's descriptor with O_NOFOLLOW, then the file with
    O_NOFOLLOW: a link planted anywhere below ``below`` raises :class:`LinkRefused` (UnsafePath), and
    one planted after a check cannot redirect the open. ``make_parents`` creates missing folders
    (0755) on the way. Other failures raise the OSError of the step (the path in its filename).
    """
    folders, name = _split(path, below)
    dfd = _open_dir_below(below, folders, make=make_parents)
    try:
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP and _is_link_at(dfd, name):
                raise _link_refused(path) from None
            e.filename = str(path)
            raise
    finally:
        os.close(dfd)


def lstat_below(path: Path, *, below: Path) -> os.stat_result | None:
    """The ``lstat`` of ``path`` reached as :func:`open_below` reaches it; None when it does not exist.
    Raises :class:`LinkRefused` when it or a folder on the way is a symbolic link."""
    folders, name = _split(path, below)
    try:
        dfd = _open_dir_below(below, folders, make=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(dfd)
    if stat.S_ISLNK(st.st_mode):
        raise _link_refused(path)
    return st


def unlink_below(path: Path, *, below: Path) -> None:
    """Remove the file ``path`` (a link itself included, never its target) if it exists, reached as
    :func:`open_below` reaches it."""
    folders, name = _split(path, below)
    try:
        dfd = _open_dir_below(below, folders, make=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)


def link_below(src: Path, dst: Path, *, src_below: Path, dst_below: Path) -> bool:
    """Hard-link the regular file ``src`` at ``dst`` (replacing what is there), neither reached through
    a link (:func:`open_below`'s rule); False when ``src`` is not a regular file. Raises
    :class:`LinkRefused` or the OSError of the link."""
    sfolders, sname = _split(src, src_below)
    dfolders, dname = _split(dst, dst_below)
    sfd = _open_dir_below(src_below, sfolders, make=False)
    try:
        if not stat.S_ISREG(os.stat(sname, dir_fd=sfd, follow_symlinks=False).st_mode):
            return False
        dfd = _open_dir_below(dst_below, dfolders, make=True)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dname, dir_fd=dfd)
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return True


def check_tree(top: Path, *, inner_links: bool) -> None:
    """Raise :class:`LinkRefused` for a symbolic link anywhere below ``top``, except, with
    ``inner_links`` (an archive's members, which tar's ``data`` filter let through), a relative link
    whose target, resolved now, is inside ``top``. Downloaded files are never links: a link in a
    tree to be published was planted, and would publish (and make the runtime read) a file outside."""
    real_top = top.resolve()
    for root, dirnames, filenames in os.walk(top):  # does not descend into links
        for name in dirnames + filenames:
            path = Path(root) / name
            if not path.is_symlink():
                continue
            if inner_links and not path.readlink().is_absolute():
                with contextlib.suppress(OSError, RuntimeError):
                    if path.resolve(strict=True).is_relative_to(real_top):
                        continue
            raise _link_refused(path)


def describe(path: Path) -> str:
    """What is at ``path``, in a few words: 'a file', 'a symbolic link', 'a folder of 3 entries'."""
    try:
        st = os.lstat(path)
    except OSError:
        return "nothing"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        try:
            n = sum(1 for _ in os.scandir(path))
        except OSError:
            return "a folder"
        return f"a folder of {n} entr{'y' if n == 1 else 'ies'}"
    if stat.S_ISREG(st.st_mode):
        return f"a file of {st.st_size} bytes"
    return "a special file"


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def write_atomic(path: Path, data: bytes, *, below: Path | None = None) -> None:
    """Write, fsync, rename: the file holds the old content or the new, never a mix.

    Never writes through a link: ``path`` itself must not be one (a rename would replace the link,
    but a link where we keep state is reported, not silently undone), nor, with ``below``, any
    folder between ``below`` and it. Raises :class:`LinkRefused` or the OSError of the write.
    """
    refuse_links(path, below=below if below is not None else path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Published models are read-only on disk: a tenant's writable mount of a model folder cannot change
# a byte of it. Our own removal and replacement make a folder writable again first.
FILE_MODE = 0o444
DIR_MODE = 0o555
OWNER_WRITABLE = 0o700  # a folder of ours made writable again, for our own removal only


def chmod_nofollow(path: Path, mode: int) -> None:
    """chmod a folder (or file) without following a link put in its place after it was checked:
    ELOOP instead. Files of a staging folder use a plain chmod after lstat (one syscall, not
    three, per file of a 100,000-file model; the staging folder is the agent's alone)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def seal(top: Path) -> None:
    """Make every file under ``top`` 0444 and every folder 0555 (links are left alone: chmod would
    follow them). ``top`` itself is sealed by the caller once it is in place (renaming a folder to
    another parent needs write permission on it)."""
    for root, dirnames, filenames in os.walk(top, topdown=False):
        dirpath = Path(root)
        for name in filenames:
            if stat.S_ISREG((dirpath / name).lstat().st_mode):
                (dirpath / name).chmod(FILE_MODE)
        for name in dirnames:
            if stat.S_ISDIR((dirpath / name).lstat().st_mode):
                chmod_nofollow(dirpath / name, DIR_MODE)


def remove_tree(path: Path) -> None:
    """Delete a folder (or file) of ours, read-only or not; never through a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    for root, _, _ in os.walk(path):  # does not descend into links
        with contextlib.suppress(OSError):
            chmod_nofollow(Path(root), OWNER_WRITABLE)
    shutil.rmtree(path, ignore_errors=True)


def publish(dest: Destination, manifest: Manifest) -> None:
    """Make the staged files the destination, atomically for readers of the destination path."""
    dest.check_links()
    write_atomic(dest.staging / "manifest.json", json.dumps(manifest.to_json(), indent=1).encode())
    finish_publish(dest)


def finish_publish(dest: Destination) -> bool:
    """Complete a publish that a crash interrupted (or the one just begun); True if one was done.

    Raises :class:`LinkRefused` for a link on the way or in the staged tree (:func:`check_tree`:
    the model is not published), :class:`ForeignFolder` when the destination
    holds files that are not ours (never replaced), and the OSError of a failed rename.
    """
    dest.check_links()
    staged_manifest = dest.staging / "manifest.json"
    if not staged_manifest.is_file():
        return False
    files = dest.staging / "files"
    dest.final.parent.mkdir(parents=True, exist_ok=True)
    if _is_real_dir(files):
        # Nothing downloaded is a link; an archive's members may be, inside the model (check_tree).
        check_tree(files, inner_links=_is_real_dir(dest.staging / "archive"))
        seal(files)
        if os.path.lexists(dest.final):
            dest.refuse_foreign()
            # The old copy goes to trash first; readers see the old folder, then the new one.
            dest.trash.mkdir(parents=True, exist_ok=True)
            old = dest.trash / f"{dest.final.name}.{uuid.uuid4().hex[:8]}"
            current = dest.published()
            if current is not None and current.extras:
                # An adopted folder keeps entries that are not ours: only ever repaired in place.
                raise ForeignFolder(
                    f"{dest.final} holds entries modelcache does not own ({', '.join(current.extras[:3])}"
                    f"{', ...' if len(current.extras) > 3 else ''}); it is updated in place, never replaced"
                )
            if _is_real_dir(dest.final):
                # Moving a folder to another parent writes its '..': it must be writable.
                chmod_nofollow(dest.final, OWNER_WRITABLE)
            dest.final.replace(old)
            files.replace(dest.final)
            remove_tree(old)
        else:
            files.replace(dest.final)
        fsync_dir(dest.final.parent)
    elif not _is_real_dir(dest.final):
        return False  # nothing staged and nothing published: the manifest is stale
    chmod_nofollow(dest.final, DIR_MODE)
    dest.manifest.parent.mkdir(parents=True, exist_ok=True)
    staged_manifest.replace(dest.manifest)
    fsync_dir(dest.manifest.parent)
    remove_tree(dest.staging)
    return True


def remove_published(dest: Destination) -> bool:
    """Delete a published model and its staging; False when the folder was kept because no manifest
    of ours names it (someone else's files: reported by the caller, never deleted).

    The folder is renamed into trash before the manifest goes, so a crash leaves either the whole
    model with its manifest, or a manifest without a folder (not trusted, replaced by the next
    publish), never a folder of ours without its manifest. Raises :class:`LinkRefused`.
    """
    dest.check_links()
    kept = False
    published = dest.published()
    if published is not None and published.extras and dest.owned():
        # An adopted folder holding entries that are not ours (agent.adopt): our files go, one by
        # one, the folder stays while theirs are in it. The manifest last: a crash leaves it naming
        # files that are gone (untrusted), and the next delete finishes.
        kept = not remove_files_in_place(dest, published)
    elif os.path.lexists(dest.final):
        if dest.owned():
            dest.trash.mkdir(parents=True, exist_ok=True)
            old = dest.trash / f"{dest.final.name}.{uuid.uuid4().hex[:8]}"
            chmod_nofollow(dest.final, OWNER_WRITABLE)
            dest.final.replace(old)
            remove_tree(old)
        else:
            kept = True
    with contextlib.suppress(FileNotFoundError):
        dest.manifest.unlink()
    remove_tree(dest.staging)
    return not kept


def remove_files_in_place(dest: Destination, manifest: Manifest) -> bool:
    """Delete the files ``manifest`` names from ``dest.final`` (no link followed), then the folders
    on the way to them that are left empty, the model's folder too when nothing else is in it.
    True when the folder itself is gone. Raises :class:`LinkRefused` or the OSError of a step."""
    dirs: set[str] = set()
    for entry in manifest.files:
        unlink_below(dest.final / entry.path, below=dest.root)
        parts = entry.path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for rel in sorted(dirs, key=lambda d: -d.count("/")):
        _rmdir_if_empty(dest.final / rel, dest.root)
    _rmdir_if_empty(dest.final, dest.root)
    return not os.path.lexists(dest.final)


def _rmdir_if_empty(path: Path, below: Path) -> None:
    folders, name = _split(path, below)
    dfd = _open_dir_below(below, folders, make=False)
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
            os.rmdir(name, dir_fd=dfd)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise
    finally:
        os.close(dfd)


def rename_below(src: Path, dst: Path, *, src_below: Path, dst_below: Path) -> None:
    """Rename the file ``src`` onto ``dst`` (atomic for readers of ``dst``: they see the old file or
    the new one), neither reached through a link (:func:`open_below`'s rule); folders on the way to
    ``dst`` are made (0755). Raises :class:`LinkRefused` or the OSError of the rename."""
    sfolders, sname = _split(src, src_below)
    dfolders, dname = _split(dst, dst_below)
    sfd = _open_dir_below(src_below, sfolders, make=False)
    try:
        dfd = _open_dir_below(dst_below, dfolders, make=True)
        try:
            if _is_link_at(dfd, dname):
                raise _link_refused(dst)
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
