"""Unpack a downloaded archive into the staging folder, refusing any member that would land
outside it (absolute names, '..', links pointing out, devices) and any archive that would unpack
past its cap. One bad member fails the whole download: nothing is published, nothing is written
outside the folder, and a refused or failed extraction is removed (its space given back).

The cap is the smallest of: the declared modelSize (``limit``, or :data:`unpack_limit` set by
:func:`agent.download.pull.pull`), the free space of the staging filesystem, and
:data:`MAX_RATIO` times the archive's size (a zip bomb of 4 MB that unpacks to 4 GiB has a ratio
of 1000:1; real model archives compress weights little, 2-5:1). The sizes the archive declares are
checked before the first byte is written, and bytes are counted as they are written, since declared
sizes can lie.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from localmodel.errors import DiskFull, DownloadError, IntegrityError, SourceNotFound, UnsafePath
from localmodel.manifest import is_safe_relative_path
from localmodel.quantity import readable
from localmodel.text import has_control, printable

MAX_RATIO = 200  # unpacked bytes per archive byte, for the whole archive
unpack_limit: ContextVar[int | None] = ContextVar("unpack_limit", default=None)
_BLOCK = 1 << 20
# What the archive readers raise for a damaged, encrypted or unsupported archive.
_INVALID = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
    RuntimeError,
    NotImplementedError,
)


@dataclass
class _Budget:
    """How many bytes may still be written, and which limit is the tightest (for the message)."""

    source: str
    cap: int
    why: str  # "free" | "declared" | "ratio"
    limits: str  # the tightest limit with its numbers, for the message
    written: int = 0

    def check(self, total: int, *, declared: bool) -> None:
        if total <= self.cap:
            return
        what = "declares" if declared else "unpacks to more than"
        message = f"{self.source}: the archive {what} {readable(total)}, more than {self.limits}"
        if self.why == "free":
            raise DiskFull(message)
        raise IntegrityError(message)

    def take(self, n: int) -> None:
        self.written += n
        self.check(self.written, declared=False)


def unpack(archive: Path, into: Path, *, archive_type: str, source: str, limit: int | None = None) -> None:
    """Extract ``archive`` (.zip, or a tar of any compression) into ``into``.

    Raises UnsafePath, IntegrityError (over the declared size or the ratio), DiskFull (over the free
    space, or ENOSPC), DownloadError (not a valid archive). ``into`` is removed on any failure.
    """
    into.mkdir(parents=True, exist_ok=True)
    if limit is None:
        limit = unpack_limit.get()
    budget = _budget(archive, into, source=source, limit=limit)
    try:
        if archive_type == ".zip":
            _unzip(archive, into, source, budget)
        else:
            _untar(archive, into, source, budget)
    except BaseException as e:
        _remove(into)
        if isinstance(e, _INVALID):
            raise DownloadError(f"{source}: not a valid {archive_type} archive: {_why_invalid(e)}") from e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(
                f"{source}: no space left while unpacking ({readable(budget.written)} written)"
            ) from e
        raise


def _budget(archive: Path, into: Path, *, source: str, limit: int | None) -> _Budget:
    free = shutil.disk_usage(into).free
    size = archive.stat().st_size
    caps = [
        (free, "free", f"the {readable(free)} free on the cache's filesystem"),
        (
            size * MAX_RATIO,
            "ratio",
            f"{MAX_RATIO} times the archive's {readable(size)} ({readable(size * MAX_RATIO)})",
        ),
    ]
    if limit is not None:
        caps.append((limit, "declared", f"the declared modelSize {readable(limit)}"))
    cap, why, text = min(caps, key=lambda c: c[0])
    return _Budget(source, cap, why, text)


def _copy(src: IO[bytes], dst: Path, budget: _Budget) -> None:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISDIR(os.lstat(dst).st_mode):
            dst.unlink()  # a later member of the same name wins, as in tar; never written through
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while block := src.read(_BLOCK):
            budget.take(len(block))
            out.write(block)


def _why_invalid(e: BaseException) -> str:
    """One line for an archive that does not open: tarfile lists each compression it tried on a
    line of its own."""
    text = str(e)
    if isinstance(e, tarfile.ReadError) and "could not be opened successfully" in text:
        return "its content is none of gzip, bzip2, xz or tar"
    return printable(text.splitlines()[0] if text else type(e).__name__)


def _check_name(name: str, source: str) -> None:
    """UnsafePath for a member name with a control or bidi character (a newline would forge a log
    line, an override would show another name): the rule names from hf, s3 and http obey
    (:func:`agent.download.listing.checked_path`)."""
    if has_control(name):
        raise UnsafePath(
            f"{source}: refusing archive member '{printable(name)}': it holds control or "
            "bidirectional characters"
        )


def _no_files(source: str) -> SourceNotFound:
    return SourceNotFound(f"{source}: the archive holds no files; a model needs at least one")


def _untar(archive: Path, into: Path, source: str, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            _check_member(m, source)
        if not any(m.isfile() for m in members):
            raise _no_files(source)  # after the checks: an unsafe member is the graver fault
        budget.check(sum(m.size for m in members if m.isfile()), declared=True)
        for m in members:
            # The 'data' filter re-checks all of the above inside tarfile itself (defence in depth).
            try:
                checked = tarfile.data_filter(m, str(into))
            except tarfile.FilterError as e:
                raise UnsafePath(f"{source}: archive refused: {e}") from e
            if checked is None:
                continue
            if checked.isfile():
                # Regular files are copied here, counting bytes; tarfile makes folders and links.
                dst = into / checked.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(checked)
                if src is None:
                    raise DownloadError(f"{source}: archive member {m.name[:200]!r} has no data")
                with src:
                    _copy(src, dst, budget)
                dst.chmod(checked.mode & 0o755 if checked.mode is not None else 0o644)
            else:
                tar.extract(checked, into, filter="data")


def _check_member(m: tarfile.TarInfo, source: str) -> None:
    """UnsafePath for a tar member that would land or link outside the model's folder, or is not a
    file, a folder or a link."""
    _check_name(m.name, source)
    if m.issym() or m.islnk():
        _check_name(m.linkname, source)
    name = m.name.removeprefix("./")
    if not is_safe_relative_path(name.rstrip("/")) and name not in ("", "."):
        raise UnsafePath(f"{source}: archive member {m.name[:200]!r} would land outside the model's folder")
    if m.issym() or m.islnk():
        target = (Path(name).parent / m.linkname) if m.issym() else Path(m.linkname)
        if m.linkname.startswith("/") or not is_safe_relative_path(_normalise(target.as_posix())):
            raise UnsafePath(f"{source}: archive member {m.name[:200]!r} links outside the model's folder")
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafePath(f"{source}: archive member {m.name[:200]!r} is a device or a fifo")


def _unzip(archive: Path, into: Path, source: str, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        for info in infos:
            _check_name(info.filename, source)
            name = info.filename.rstrip("/")
            if not is_safe_relative_path(name):
                raise UnsafePath(
                    f"{source}: archive member {info.filename[:200]!r} would land outside the model's folder"
                )
        if all(info.is_dir() for info in infos):
            raise _no_files(source)
        budget.check(sum(i.file_size for i in infos if not i.is_dir()), declared=True)
        for info in infos:
            dst = into / info.filename.rstrip("/")
            if info.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src:
                _copy(src, dst, budget)


def _remove(path: Path) -> None:
    """Give the space of a failed extraction back (the folder is ours: staging/<key>/files)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)


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
