"""Bytes that are already on the node: a ``file://`` source's file copied into the staging folder
without following any link on either side, in the kernel where it can, under the client's byte-rate
cap; and a file the new revision did not change hard-linked from the published copy."""

from __future__ import annotations

import errno
import io
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from agent.download.listing import RemoteFile
from agent.download.ratelimit import RateLimiter
from agent.download.staging import Destination, LinkRefused, link_below, open_below
from agent.download.transfer import MiB, unchanged
from localmodel.errors import DownloadError, UnsafePath, from_os_error
from localmodel.manifest import FileEntry

_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def open_source(local_path: str, source: str, rel: str) -> io.BufferedReader:
    """The file a ``file://`` listing named, opened for reading without following any link.

    ``local_path`` is the real path the listing checked against the allowed folders (every link
    resolved), so no part of it may be a link now: each folder from ``/`` down is opened with
    O_NOFOLLOW relative to its parent, then the file. A link swapped in since the listing (to copy
    a file outside the allowed folders) is :class:`UnsafePath`, never followed; so is anything but
    a regular file. Raises the OSError of the open otherwise."""
    path = Path(local_path)
    try:
        fd = open_below(path, os.O_RDONLY | os.O_NONBLOCK, below=Path("/"))
    except LinkRefused:
        raise UnsafePath(
            f"{source}: {rel}: a folder or the file on its path ({local_path}) became a symbolic link "
            "after the listing; not followed"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{source}: {rel} is no longer a regular file ({local_path}); not read")
    os.set_blocking(fd, True)
    return open(fd, "rb")


def copy_local(
    f: RemoteFile,
    target: Path,
    *,
    source: str,
    root: Path,
    limiter: RateLimiter | None,
    advance: Callable[[int], None],
) -> None:
    """Copy with ``copy_file_range`` (in the kernel, reflinked where the filesystem can), or
    with plain reads and writes where it cannot: across filesystems (EXDEV on kernels since
    5.19), or where the call is missing or refused (ENOSYS, EINVAL, EOPNOTSUPP). ``target`` is opened
    below ``root`` without following links; ``limiter``: the client's byte-rate cap; ``advance``:
    told of each step's bytes."""
    assert f.local_path is not None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with (
            open_source(f.local_path, source, f.path) as src,
            open(open_below(target, flags, below=root, make_parents=True), "wb") as dst,
        ):
            in_kernel = hasattr(os, "copy_file_range")
            buf: memoryview | None = None
            # --max-bandwidth holds for local copies too: small steps, each paid for.
            step = 64 * MiB if limiter is None else limiter.step
            while True:
                if in_kernel:
                    try:
                        n = os.copy_file_range(src.fileno(), dst.fileno(), step)
                    except OSError as e:
                        if e.errno not in _NO_COPY_RANGE:
                            raise
                        in_kernel = False  # the offsets stand where the kernel left them
                        continue
                else:
                    buf = buf if buf is not None else memoryview(bytearray(min(MiB, step)))
                    n = src.readinto(buf)
                    if n:
                        dst.write(buf[:n])
                if not n:
                    break
                if limiter is not None and (wait := limiter.delay(n)) > 0:
                    time.sleep(wait)  # at most a step's worth: a 20th of a second
                advance(n)
            dst.flush()
            os.fdatasync(dst.fileno())
    except FileNotFoundError as e:
        if not Path(f.local_path).exists():
            raise DownloadError(f"{source}: {f.path} vanished during the copy") from e
        raise from_os_error(e, f"{source}: {f.path}") from e
    except OSError as e:
        raise from_os_error(e, f"{source}: {f.path}") from e


def reuse(f: RemoteFile, old: FileEntry, target: Path, dest: Destination) -> bool:
    """Hard-link the published copy of a file the new revision did not change (same path, size
    and source checksum) to ``target``. The caller still verifies it, so a damaged old copy is never
    kept. False when it is changed or cannot be linked."""
    if not unchanged(f, old):
        return False
    try:
        # Neither end through a link: the published copy must be a file of ours, not a link to
        # one elsewhere, and the staged name a file of the staging folder.
        return link_below(dest.final / f.path, target, src_below=dest.final, dst_below=dest.root)
    except (OSError, LinkRefused):
        return False  # gone meanwhile, a link, or a filesystem without hard links: fetch it
