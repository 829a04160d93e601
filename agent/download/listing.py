"""What a source says a model is: a pinned revision and a list of files with sizes and checksums.

Every source turns a URI into a :class:`Listing`; the transfer engine fetches whatever the listing
names, the same way for all of them (HTTP GETs with ranges, or a local copy). Paths from a remote are
checked here, once, before anything touches the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeVar

from localmodel.errors import DownloadError, SourceNotFound, TransientError, UnsafePath
from localmodel.manifest import FileEntry, is_safe_relative_path
from localmodel.text import has_control, printable

T = TypeVar("T")

# No model has this many files (the largest on the hub hold a few thousand); a listing past it is a
# server that pages without end, stopped before the deadline would.
MAX_LISTED = 1_000_000
# Empty pages cost a request each: a server may send a few (GCS after deleted objects), never this many.
MAX_PAGES = 10_000


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative POSIX path inside the model folder, checked safe
    size: int | None  # None only when the source does not say (a plain HTTP file)
    sha256: str | None = None
    git_sha1: str | None = None  # git blob sha1 (Hugging Face, non-LFS files)
    md5: str | None = None  # S3 single-part ETag, GCS md5Hash, Azure Content-MD5 (hex)
    crc32c: str | None = None  # GCS crc32c (hex), checked only where no md5 is known
    url: str | None = field(default=None, repr=False)  # may carry a signature: never logged
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may carry a token
    local_path: str | None = None  # file:// sources
    ranges: bool = False  # the source always honours Range (S3): fan out at once, no probe first
    # An S3 multipart ETag ("<md5 of the parts' md5s>-<parts>", lowercase) and the object's key: no
    # hash of the content, but a file's own can be computed and compared once the part size is known
    # (one HeadObject PartNumber=1, asked only when adopting: agent.download.adoption).
    multipart_etag: str | None = None
    s3_key: str | None = None

    def entry(self, *, sha256: str | None = None) -> FileEntry:
        return FileEntry(
            self.path, self.size or 0, sha256 or self.sha256, self.git_sha1, self.md5, self.crc32c
        )


@dataclass(frozen=True)
class Listing:
    source: str  # the URI, redacted
    revision: str | None  # the commit (hf), or a digest of the objects' ETags (s3, http)
    files: tuple[RemoteFile, ...]
    archive: str | None = None  # ".tar.gz", ... when the one file is to be unpacked

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def parent_folders(names: Iterable[str]) -> set[str]:
    """Every folder that holds one of ``names`` (``a/b/c``: ``a`` and ``a/b``)."""
    return {n.rsplit("/", i)[0] for n in names for i in range(1, n.count("/") + 1)}


def folder_marker(name: str, size: int, folders: AbstractSet[str]) -> bool:
    """An object store's entry that stands for a folder, not a file: ``name/``, ``name_$folder$``,
    or an empty object named like a folder that has objects (``folders``: :func:`parent_folders`)."""
    return name.endswith("/") or name.endswith("_$folder$") or (size == 0 and name in folders)


def checked_path(path: str, *, source: str) -> str:
    """The path, if it stays inside the model's folder and prints as what it is; UnsafePath (failing
    the download) if not: absolute, ``..`` or empty parts, or a control or bidi character
    (:func:`localmodel.text.has_control`: a newline in a name would forge a log line, an override
    would show another name). Messages quote the name escaped (:func:`localmodel.text.printable`)."""
    if has_control(path):
        raise UnsafePath(
            f"{source}: refusing remote path '{printable(path)}': it holds control or "
            "bidirectional characters"
        )
    if not is_safe_relative_path(path):
        raise UnsafePath(
            f"{source}: refusing remote path '{printable(path)}': absolute, '..' or empty parts would "
            "write outside the model's folder"
        )
    return path


def check_not_empty(listing: Listing) -> None:
    """A model that is one empty file is a folder marker or an upload that failed, never weights:
    SourceNotFound rather than publishing it (S3 tools store folders as empty objects). A source
    with no file at all (an empty hf repo, an empty prefix or folder) is SourceNotFound too, for
    every source; an archive's members are checked when it is unpacked."""
    if not listing.files:
        raise SourceNotFound(f"{listing.source}: the source holds no files; a model needs at least one")
    if len(listing.files) == 1 and listing.files[0].size == 0:
        raise SourceNotFound(
            f"{listing.source}: the source is a single empty file "
            f"('{printable(listing.files[0].path)}'); refusing to publish it as a model"
        )


def check_unique(files: tuple[RemoteFile, ...], *, source: str) -> None:
    """Two entries for one path, or a file that is also a folder, cannot both be laid out."""
    paths = {f.path for f in files}
    if len(paths) != len(files):
        raise UnsafePath(f"{source}: the listing names a file twice")
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                folder = printable("/".join(parts[:i]))
                raise UnsafePath(f"{source}: '{printable(f.path)}' needs '{folder}' to be a folder")


def paged(
    pages: Iterable[Iterable[T]],
    next_token: Callable[[], object],
    *,
    source: str,
    seconds: float,
    max_entries: int = MAX_LISTED,
    max_pages: int = MAX_PAGES,
) -> list[T]:
    """Every entry of a paginated listing, which must end: ``pages`` yields each page's entries,
    ``next_token()`` is the continuation token the last page gave (None or "" at the end). A token
    the server gave before would loop forever (the protocols of GCS, Azure Blob and S3 never repeat
    one: botocore refuses it the same way): DownloadError "the listing of SOURCE repeats page token
    ...". More than ``max_entries`` entries or ``max_pages`` pages is DownloadError too; a listing
    still unfinished after ``seconds`` is TransientError, so that a thread the caller's own deadline
    abandoned stops asking."""
    deadline = time.monotonic() + seconds
    seen: set[str] = set()
    found: list[T] = []
    for count, page in enumerate(pages, start=1):
        found.extend(page)
        token = next_token()
        if token:
            if str(token) in seen:
                raise DownloadError(
                    f"the listing of {source} repeats page token '{printable(str(token)[:64])}'; "
                    "the server is not following the protocol"
                )
            seen.add(str(token))
        if len(found) > max_entries or count > max_pages:
            raise DownloadError(
                f"the listing of {source} goes past {max_entries:,} entries or {max_pages:,} pages; "
                "no model has that many files (the server is not following the protocol)"
            )
        if time.monotonic() > deadline:
            raise TransientError(f"{source}: no whole listing within {seconds:g} s ({count} pages)")
    return found
