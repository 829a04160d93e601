"""Unpack a downloaded archive into the staging folder, refusing any member that would land
outside it (absolute names, '..', links pointing out, devices). One bad member fails the whole
download: nothing is published, and nothing is written outside the folder.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from localmodel.errors import DownloadError, UnsafePath
from localmodel.manifest import is_safe_relative_path


def unpack(archive: Path, into: Path, *, archive_type: str, source: str) -> None:
    into.mkdir(parents=True, exist_ok=True)
    try:
        if archive_type == ".zip":
            _unzip(archive, into, source)
        else:
            _untar(archive, into, source)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DownloadError(f"{source}: not a valid {archive_type} archive: {e}") from e


def _untar(archive: Path, into: Path, source: str) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            name = m.name.removeprefix("./")
            if not is_safe_relative_path(name.rstrip("/")) and name not in ("", "."):
                raise UnsafePath(
                    f"{source}: archive member {m.name[:200]!r} would land outside the model's folder"
                )
            if m.issym() or m.islnk():
                target = (Path(name).parent / m.linkname) if m.issym() else Path(m.linkname)
                if m.linkname.startswith("/") or not is_safe_relative_path(_normalise(target.as_posix())):
                    raise UnsafePath(
                        f"{source}: archive member {m.name[:200]!r} links outside the model's folder"
                    )
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafePath(f"{source}: archive member {m.name[:200]!r} is a device or a fifo")
        # The 'data' filter re-checks all of the above inside tarfile itself (defence in depth).
        try:
            tar.extractall(into, members=members, filter="data")
        except tarfile.FilterError as e:
            raise UnsafePath(f"{source}: archive refused: {e}") from e


def _unzip(archive: Path, into: Path, source: str) -> None:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            name = info.filename.rstrip("/")
            if not is_safe_relative_path(name):
                raise UnsafePath(
                    f"{source}: archive member {info.filename[:200]!r} would land outside the model's folder"
                )
        z.extractall(into)  # noqa: S202 - every name checked above


def _normalise(path: str) -> str:
    """Collapse '..' lexically; a result that still starts with '..' escapes."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return "../escape"
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts) or "."
