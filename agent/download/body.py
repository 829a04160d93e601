"""One request's bytes on their way to disk, and the hashing of a file as its chunks land.

:class:`Body` checks each answer against the range asked (a 206's ``Content-Range`` start, end and
total, RFC 9110 §14.4; a 200 only where the whole file stands for the request) and writes each block
with ``pwrite`` at its offset, never past the asked range or the listed size. :class:`Hasher` hashes
a file's finished prefix in a thread while the rest downloads. Used by :mod:`agent.download.engine`.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.download.client import Response
from agent.download.http_status import http_status_error, retry_after_seconds
from agent.download.listing import RemoteFile
from agent.download.transfer import MiB
from localmodel.errors import DiskFull, DownloadError, IntegrityError, TransientError, from_os_error
from localmodel.manifest import HashCheck, hash_check

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RangeMismatch(TransientError):
    """A response that is not the range asked for: retried on a fresh request, then an
    IntegrityError naming the file."""


class Body:
    """One chunk's bytes as they arrive: the response checked against what was asked, each block
    ``pwrite`` at its offset and never past the asked range or the listed size. ``accept`` and
    ``write`` run in the client's worker thread; the event loop reads the fields once the request is
    over, and is told of progress every :data:`REPORT_EVERY` bytes."""

    REPORT_EVERY = 16 * MiB

    def __init__(
        self,
        f: RemoteFile,
        *,
        source: str,
        report: Callable[[int], None],
        start: int,
        end: int,
        whole: bool,
        probe: bool,
    ) -> None:
        """``source``: the listing's label; ``report``: called on the event loop with bytes written."""
        self.loop = asyncio.get_running_loop()
        self.report = report
        self.label = f"{source}: {f.path}"
        self.path = f.path
        self.limit = f.size
        self.fd = -1
        self.start, self.end, self.whole, self.probe = start, end, whole, probe
        self.pos = start  # where the next byte goes
        self.bound = sys.maxsize  # no byte is written at or past this offset
        self.written = 0  # bytes of this chunk on disk, over every attempt
        self.asked_range = False
        self.ranged: bool | None = None  # unknown until the first answer
        self.framed = False  # the answer's length was its Content-Length (a short one is complete)
        self.unreported = 0
        self.lock = threading.Lock()

    def accept(self, response: Response) -> Callable[[memoryview], None]:
        status = response.status
        if status == 416 and self.asked_range:
            raise self._refused(response.headers.get("Content-Range") or "")
        if status >= 400:
            raise status_error(self.label, response)
        length = response.content_length
        if status == 206:
            self._check_range(response.headers.get("Content-Range") or "", length)
            self.ranged = True
            self.framed = False
        elif status == 200:
            if self.asked_range:
                if self.probe and self.ranged is None:
                    self.ranged = False  # no range support: this response is the whole file
                    self.end = self.limit or 0
                    self.written = self.pos = self.start = 0  # from byte 0, whichever range was asked
                elif self.whole or (self.probe and self.ranged is False):
                    # Resuming from a server that ignores ranges: the file starts over at byte 0.
                    self.written = self.pos = self.start = 0
                else:
                    raise RangeMismatch(
                        f"{self.label}: the server answered bytes={self.pos}-{self.end - 1} with the "
                        "whole file (HTTP 200)"
                    )
            self.bound = self.limit if self.limit is not None else sys.maxsize
            self.framed = length is not None
        return self.write

    def _check_range(self, value: str, length: int | None) -> None:
        """A 206 must be the range asked: start, end (when asked), and the listed total."""
        asked = f"bytes={self.pos}-{self.end - 1 if self.limit is not None else ''}"
        match = _CONTENT_RANGE.fullmatch(value.strip())
        if not self.asked_range or match is None:
            raise RangeMismatch(f"{self.label}: the server answered {asked} with Content-Range {value!r}")
        first, last, total = int(match[1]), int(match[2]), match[3]
        if self.limit is not None and total != "*" and int(total) != self.limit:
            raise IntegrityError(
                f"{self.label}: the server has {total} of the listed {self.limit} bytes "
                f"(Content-Range {value.strip()})"
            )
        end_ok = last == self.end - 1 if self.limit is not None else (total == "*" or last == int(total) - 1)
        if first != self.pos or not end_ok or (length is not None and length != last - first + 1):
            raise RangeMismatch(
                f"{self.label}: the server answered {asked} with Content-Range {value.strip()}"
                + (f" and Content-Length {length}" if length is not None else "")
            )
        self.bound = last + 1

    def _refused(self, content_range: str) -> IntegrityError:
        """A 416, in words: what its ``Content-Range: bytes */SIZE`` (RFC 9110 §14.4) says the
        server's copy is, against the listed size."""
        if self.whole or self.ranged is False:
            return IntegrityError(
                f"{self.label}: the server sent {self.pos} of the listed {self.limit} bytes and "
                "refuses the rest (HTTP 416)"
            )
        size = content_range.strip().removeprefix("bytes */")
        if not size.isdigit():
            why = "and gives no size of its copy"
        elif int(size) == self.limit:
            why = f"though it says its copy has the listed {size} bytes: its range support is broken"
        elif self.limit is not None and int(size) < self.limit:
            why = f"its copy has {size} bytes, fewer than listed"
        else:
            why = f"its copy has {size} bytes, more than listed"
        return IntegrityError(
            f"{self.label}: the server refuses bytes {self.pos}-{self.end - 1} of the listed "
            f"{self.limit} bytes (HTTP 416), {why}"
        )

    def write(self, data: memoryview) -> None:
        n = len(data)
        if self.pos + n > self.bound:
            if self.bound == self.limit:
                raise IntegrityError(f"{self.label}: the server sent more than the listed {self.limit} bytes")
            raise IntegrityError(f"{self.label}: the server sent more than the range it announced")
        try:
            os.pwrite(self.fd, data, self.pos)
        except OSError as e:
            raise from_os_error(e, self.label) from e
        self.pos += n
        self.written += n
        with self.lock:
            self.unreported += n
            if self.unreported >= self.REPORT_EVERY:
                self.loop.call_soon_threadsafe(self.report, self.unreported)
                self.unreported = 0

    def take_unreported(self) -> int:
        with self.lock:
            n, self.unreported = self.unreported, 0
        return n


class Hasher:
    """Hashes a file's contiguous prefix of finished chunks in a thread while the rest downloads,
    so verifying a large file costs little after its last byte arrives. Chunks finished by an
    earlier run (resume) are hashed first, from disk."""

    def __init__(self, h: Any, opener: Callable[[], int], chunks: list[tuple[int, int, int]]) -> None:
        self.h = h
        self.opener = opener  # a read-only descriptor of the staged file, reached without links
        self.chunks = chunks
        self.next = 0  # index into chunks of the first one not hashed yet
        self.task: asyncio.Future[None] | None = None

    def poke(self, done: set[int]) -> None:
        if (self.task is None or self.task.done()) and self._ready(done):
            self.task = asyncio.ensure_future(asyncio.to_thread(self._run, done))

    def _ready(self, done: set[int]) -> bool:
        return self.next < len(self.chunks) and self.chunks[self.next][0] in done

    def _run(self, done: set[int]) -> None:
        # Reads only chunks whose bytes were all written: other ranges may be written meanwhile.
        with open(self.opener(), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            while self._ready(done):
                _, start, end = self.chunks[self.next]
                if end > size:
                    return  # shorter than expected: the size check reports it
                hash_file(self.h, fh.fileno(), start, end)
                self.next += 1

    async def finish(self, done: set[int]) -> str | None:
        """The digest once every chunk is hashed, or None when some chunk is missing."""
        if self.task is not None:
            await self.task
        await asyncio.to_thread(self._run, done)
        return self.h.hexdigest() if self.next == len(self.chunks) else None


def hash_file(h: Any, fd: int, start: int, end: int) -> None:
    """Hash bytes ``start:end`` of an open file from the page cache through short-lived read-only
    mappings: no copy of every byte into a buffer (about 15 % less CPU per hash than reading), and
    at most one window mapped at a time, so the process's resident memory stays small."""
    window = 16 * MiB
    for offset in range(start, end, window):
        skew = offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
        length = min(window, end - offset)
        mapped = mmap.mmap(fd, length + skew, offset=offset - skew, access=mmap.ACCESS_READ)
        with mapped, memoryview(mapped) as view:
            h.update(view[skew:])


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        hash_file(h, fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    return h.hexdigest()


def status_error(label: str, response: Response) -> DownloadError:
    return http_status_error(label, response.status, retry_after_seconds(response.headers.get("Retry-After")))


def check_of(f: RemoteFile) -> HashCheck | None:
    return hash_check(f.sha256, f.git_sha1, f.md5, f.crc32c)


def verify_fd(
    f: RemoteFile, fd: int, digest: str | None, *, check: HashCheck | None, own: bool
) -> tuple[bool, str, str]:
    """(ok, description, method) of the open file ``fd`` against ``f``: its listed size, then
    ``check`` (the source's hash), or, with ``own``, a sha256 of our own (described, not compared).
    ``digest``: the hash already computed while the file downloaded, if any."""
    size = os.fstat(fd).st_size
    if f.size is not None and size != f.size:
        return False, f"size {size}, expected {f.size}", "size"
    if check is None and not own:
        return True, "", "size"
    if digest is None:
        h = check.new(size) if check is not None else hashlib.sha256()
        hash_file(h, fd, 0, size)
        digest = h.hexdigest()
    if check is None:
        return True, digest, "size"  # ours, recorded for a later re-verify: nothing to compare
    if digest != check.expected:
        return False, f"{check.name} {digest}, expected {check.expected}", check.name
    return True, digest if check.name == "sha256" else "", check.name


def first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling error of a task group: a download error over a cancellation."""
    flat: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            flat.append(e)

    walk(eg)
    for kind in (DiskFull, IntegrityError, DownloadError, Exception):
        for e in flat:
            if isinstance(e, kind):
                return e
    return flat[0]
