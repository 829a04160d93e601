"""Adoption: what to keep, fetch and leave alone in a model folder another writer filled. Pure.

KServe's node agent fills ``<root>/models/<key>/`` (the same storage key as ours,
``GetStorageKey``: pkg/apis/serving/v1alpha1/local_model_cache_types.go:29-32 in KServe v0.20.0)
through a download Job running the storage initializer with the folder as its destination
(pkg/controller/v1alpha1/localmodelnode/controller.go:148-158: subPath ``models/<key>`` mounted at
``/mnt/models``, the URI and that path as its arguments). What it leaves there, besides the model's
files (python/storage/kserve_storage/kserve_storage.py in KServe v0.20.0):

- ``hf://``: ``snapshot_download(local_dir=...)`` (kserve_storage.py:661-666, huggingface_hub
  0.32.4 per its uv.lock) also writes ``.cache/huggingface/.gitignore`` and, per file,
  ``.cache/huggingface/download/<path>.metadata`` and ``<path>.lock`` (huggingface_hub
  _local_folder.py:187-224, 414-436): entries the listing does not name, kept as extras;
- ``s3://``: empty objects are skipped (kserve_storage.py:534), so a listed file of 0 bytes may be
  missing: it is created empty, nothing fetched;
- an archive is unpacked and removed (kserve_storage.py:1336-1353): its members cannot be checked
  against a listing that names the archive alone, so such a folder is not adopted.

There is no marker of completeness: a folder is checked file by file against the source's listing.

Rules (:func:`survey`, then :func:`decide` once the files to hash are hashed):

- a symbolic link, a special file or a regular file with other hard links (``st_nlink`` > 1: its
  inode is reachable from a path that is not this folder's) anywhere in the folder refuses the
  adoption (nothing is followed, nothing changes; the folder stays someone else's, as before
  adoption existed);
- a listed file that is a folder there, or whose folder is a file there, refuses it too (theirs
  would have to be removed to lay ours out);
- a listed file present with the listed size is hashed: by the strongest hash the source gives
  (:func:`localmodel.manifest.hash_check`), kept when it matches, fetched again when not; where the
  source gives none it is kept only when its bytes were checked otherwise (``confirmed``: an S3
  multipart ETag computed from the file, or the bytes of a ``file://`` source compared), else it is
  fetched again: a size alone never stands for content. Its sha256 is recorded so a later re-verify
  notices a change;
- a listed file missing, of another size, or of a size the source does not say, is fetched (a
  missing empty file is created);
- anything else in the folder is an extra: recorded by its topmost path (a folder covering what is
  below it), kept, reported, never deleted.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from agent.download.listing import Listing, RemoteFile
from localmodel.manifest import FileEntry, HashCheck, hash_check
from localmodel.text import printable

EXAMPLES = 3  # extras named in a message, at most


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"
    OTHER = "other"  # a socket, a FIFO, a device
    # A regular file with other hard links: the same inode is reachable from a path that is not
    # this folder's (outside it, or another model's), so checking, keeping and making it read-only
    # would change a file that is not ours.
    HARDLINKED = "hardlinked"


@dataclass(frozen=True)
class Found:
    """One entry of the folder, by its relative POSIX path (links are not followed)."""

    path: str
    kind: Kind
    size: int = 0  # bytes, for a file


@dataclass(frozen=True)
class Survey:
    """What the folder holds against the listing, before any hash: ``refusal`` (why it is not
    adopted) or the files to hash (path -> the source's check, None: a sha256 to record), the files
    to fetch and to create empty, and the extras."""

    refusal: str | None
    to_hash: Mapping[str, HashCheck | None]
    fetch: tuple[str, ...]
    create: tuple[str, ...]
    extras: tuple[str, ...]


@dataclass(frozen=True)
class Adoption:
    """The decision: ``keep`` the entries (with the sha256 recorded), ``fetch`` these files of the
    listing, ``create`` these empty ones, leave ``extras`` alone."""

    keep: tuple[FileEntry, ...]
    fetch: tuple[RemoteFile, ...]
    create: tuple[RemoteFile, ...]
    extras: tuple[str, ...]

    @property
    def kept_bytes(self) -> int:
        return sum(e.size for e in self.keep)

    @property
    def fetch_bytes(self) -> int:
        return sum(f.size or 0 for f in self.fetch)


def _check(f: RemoteFile) -> HashCheck | None:
    return hash_check(f.sha256, f.git_sha1, f.md5, f.crc32c)


def survey(listing: Listing, found: tuple[Found, ...], *, where: str) -> Survey:
    """Compare the folder's entries (``found``, every one below it) with ``listing``; ``where``
    names the folder in a refusal."""
    refusal = _refusal(listing, found, where)
    if refusal is not None:
        return Survey(refusal, {}, (), (), ())
    there = {e.path: e for e in found}
    listed = {f.path: f for f in listing.files}
    to_hash: dict[str, HashCheck | None] = {}
    fetch: list[str] = []
    create: list[str] = []
    for f in listing.files:
        entry = there.get(f.path)
        if entry is None and f.size == 0:
            create.append(f.path)
        elif entry is None or f.size is None or entry.size != f.size:
            fetch.append(f.path)
        else:
            to_hash[f.path] = _check(f)
    leading = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    extras: list[str] = []
    for e in sorted(found, key=lambda e: e.path):
        if e.path in listed or e.path in leading:
            continue
        if any(e.path.startswith(x + "/") for x in extras):
            continue  # below an extra folder: covered by it
        extras.append(e.path)
    return Survey(None, to_hash, tuple(fetch), tuple(create), tuple(extras))


def _refusal(listing: Listing, found: tuple[Found, ...], where: str) -> str | None:
    if listing.archive is not None:
        return (
            f"{where} was filled from an archive ({listing.archive}), unpacked and removed by whoever "
            "wrote it: its files cannot be checked against the source without fetching the archive "
            "whole; not adopted (move the folder away to have it fetched)"
        )
    odd = [e for e in found if e.kind in (Kind.LINK, Kind.OTHER, Kind.HARDLINKED)]
    if odd:
        what = {
            Kind.LINK: "a symbolic link",
            Kind.OTHER: "a special file",
            Kind.HARDLINKED: "a file with other hard links",
        }[odd[0].kind]
        return (
            f"{where} holds {what} ({printable(odd[0].path)}); modelcache never adopts a folder with "
            "links or special files in it: remove it, or move the folder away"
        )
    kinds = {e.path: e.kind for e in found}
    for f in listing.files:
        parts = f.path.split("/")
        folders = ("/".join(parts[:i]) for i in range(1, len(parts)))
        in_the_way = [p for p in folders if kinds.get(p) is Kind.FILE]
        if kinds.get(f.path) is Kind.DIR or in_the_way:
            return (
                f"{where}: the source's file {printable(f.path)} cannot be laid out: "
                f"{printable(in_the_way[0] if in_the_way else f.path)} is a "
                f"{'file' if in_the_way else 'folder'} there; not adopted (theirs is never removed)"
            )
    return None


def decide(
    listing: Listing,
    plan: Survey,
    digests: Mapping[str, str],
    confirmed: Mapping[str, str] | None = None,
) -> Adoption:
    """The adoption, once every file of ``plan.to_hash`` was hashed (``digests``: path -> lowercase
    hex of the check it was given, or of sha256 where none). A file whose digest is missing (it
    could not be read) is fetched; so is one without a source hash unless ``confirmed`` (path -> how
    its bytes were checked) names it."""
    keep: list[FileEntry] = []
    fetch = set(plan.fetch)
    confirmed = confirmed or {}
    for path, check in plan.to_hash.items():
        digest = digests.get(path)
        if digest is None or (check.expected != digest if check is not None else path not in confirmed):
            fetch.add(path)
            continue
        f = next(x for x in listing.files if x.path == path)
        keep.append(f.entry(sha256=None if check is not None else digest))
    return Adoption(
        keep=tuple(sorted(keep, key=lambda e: e.path)),
        fetch=tuple(f for f in listing.files if f.path in fetch),
        create=tuple(f for f in listing.files if f.path in set(plan.create)),
        extras=plan.extras,
    )


def named(paths: tuple[str, ...]) -> str:
    """A few paths for a message: 'a, b, c and 4 more', each escaped (:func:`printable`: a newline
    in a name would forge a line of the Event or the summary)."""
    shown = ", ".join(printable(p) for p in paths[:EXAMPLES])
    return shown + (f" and {len(paths) - EXAMPLES} more" if len(paths) > EXAMPLES else "")
