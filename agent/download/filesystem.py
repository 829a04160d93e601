"""``file://`` sources (and plain absolute paths): a folder, or a file, on a local or mounted
filesystem, read only under the allowed prefixes (real paths, every link resolved), regular files
only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.download.listing import Listing, RemoteFile, checked_path
from agent.download.source_settings import SourceSettings
from localmodel.errors import AccessDenied, DownloadError, SourceNotAllowed, SourceNotFound, UnsafePath
from localmodel.text import printable
from localmodel.uri import SourceURI


def list_file(uri: SourceURI, settings: SourceSettings) -> Listing:
    root = Path(uri.path)
    source = uri.redacted()
    allowed = _allowed_prefixes(settings, source)
    if allowed is not None:
        _check_allowed(_resolved(root, source), allowed, source)
    if root.is_file():
        checked_path(root.name, source=source)
        size = _regular_size(_resolved(root, source), root.name, source, cluster=allowed is not None)
        return Listing(
            source=source,
            revision=None,
            files=(RemoteFile(path=root.name, size=size, local_path=str(_resolved(root, source))),),
        )
    if not root.is_dir():
        if root.exists():
            _regular_size(_resolved(root, source), root.name, source, cluster=allowed is not None)
        raise SourceNotFound(f"{source}: no such file or folder")
    real_root = _resolved(root, source)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = checked_path(full.relative_to(root).as_posix(), source=source)
            real = _resolved(full, source)
            if full.is_symlink() and not real.is_relative_to(real_root):
                raise _unsafe(source, rel)
            if allowed is not None:
                _check_allowed(real, allowed, source)
            # The real path is what is copied: a link swapped after this check cannot redirect it.
            size = _regular_size(real, rel, source, cluster=allowed is not None)
            files.append(RemoteFile(path=rel, size=size, local_path=str(real)))
    if not files:
        raise SourceNotFound(f"{source}: the folder is empty")
    return Listing(source=source, revision=None, files=tuple(files))


def _regular_size(real: Path, rel: str, source: str, *, cluster: bool) -> int:
    """The size of a file a ``file://`` source lists, or UnsafePath naming it: only regular files
    are copied (a FIFO, socket or device would block or never end the copy); in a cluster
    (``cluster``: ``--allow-file-sources`` set) a file with more than one hard link is refused too,
    since a hard link below an allowed folder can name a file outside it."""
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a special file"
        )
        raise UnsafePath(
            f"{source}: {printable(rel)} is {kind}, not a regular file or folder; only regular files "
            "are copied: remove it from the source"
        )
    if cluster and st.st_nlink > 1:
        raise UnsafePath(
            f"{source}: {printable(rel)} has {st.st_nlink} hard links; in a cluster a file with more "
            "than one may be a file outside --allow-file-sources: copy it instead of linking it"
        )
    return st.st_size


def _allowed_prefixes(settings: SourceSettings, source: str) -> tuple[Path, ...] | None:
    if settings.file_prefixes is None:
        return None
    return tuple(_resolved(Path(p), source) for p in settings.file_prefixes)


def _resolved(path: Path, source: str) -> Path:
    """``path`` with every link resolved; a loop of links or a folder that cannot be entered is
    one line (UnsafePath, AccessDenied, SourceNotFound), not a traceback."""
    try:
        return path.resolve()
    except RuntimeError:
        raise UnsafePath(f"{source}: '{printable(str(path))}' is a loop of symbolic links") from None
    except PermissionError as e:
        raise AccessDenied(f"{source}: cannot resolve '{printable(str(path))}': {e.strerror}") from None
    except OSError as e:
        raise SourceNotFound(f"{source}: cannot resolve '{printable(str(path))}': {e.strerror}") from None


def _check_allowed(real: Path, allowed: tuple[Path, ...], source: str) -> None:
    """SourceNotAllowed unless ``real`` (symlinks resolved) is one of ``allowed`` or under one."""
    if any(real.is_relative_to(prefix) for prefix in allowed):
        return
    where = ", ".join(printable(str(p)) for p in allowed) if allowed else "none"
    raise SourceNotAllowed(
        f"{source}: '{printable(str(real))}' is outside the folders file sources may be read from "
        f"(allowed: {where}); the agent reads it only with --allow-file-sources PREFIX"
    )


def _unsafe(source: str, rel: str) -> DownloadError:
    return UnsafePath(f"{source}: '{printable(rel)}' is a symlink that points outside the source folder")
