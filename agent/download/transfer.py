"""What a transfer is given and what it gives back: the settings of every download of a process,
the progress sink, the result, and whether a published copy is what the source holds now
(:func:`same_files`). Pure: no I/O; the engine (:mod:`agent.download.engine`) does the work."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.download.listing import Listing, RemoteFile
from localmodel.manifest import FileEntry, Manifest
from localmodel.resources import DroppedPeer

MiB = 1 << 20


@dataclass(frozen=True)
class TransferSettings:
    concurrency: int = 16  # connections at once, all files together
    chunk_size: int = 64 * MiB  # a large file is fetched as ranges of this size
    # Each worker's receive buffer. Small enough to stay in a core's L2 cache between the receive
    # and the write: bench/pull.py measured 512 KiB ~10 % faster than 1 MiB and 2 MiB 40 % slower.
    read_size: int = 512 << 10
    max_bandwidth: float | None = None  # bytes per second, all connections together
    verify: bool = True
    attempts: int = 6  # per request, transient errors only
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    connect_timeout: float = 30.0
    read_timeout: float = 120.0
    checkpoint_interval: float = 2.0  # seconds between syncs of the resume state
    # A request slower than low_speed_limit bytes/s over low_speed_time seconds is abandoned and
    # retried on a fresh connection (curl's --speed-limit/--speed-time); 0 turns it off.
    low_speed_limit: int = 1024
    low_speed_time: float = 30.0
    # http_proxy/https_proxy/no_proxy as read at the entry point (environment.proxies_from_env)
    proxies: Mapping[str, str] = field(default_factory=dict)
    # A CA bundle trusted besides the system's, as boto3 reads it (AWS_CA_BUNDLE or the profile's
    # ca_bundle; environment.aws_ca_bundle at the entry point): presigned S3 GETs go to the same servers.
    ca_bundle: str | None = None
    # Connections to loopback, link-local and unspecified addresses (addresses.private_address): off
    # for the agent in a cluster without --allow-private-sources.
    allow_private: bool = True


class ProgressSink(Protocol):
    def start(self, *, total_bytes: int, done_bytes: int, files: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...


class NoProgress:
    def start(self, *, total_bytes: int, done_bytes: int, files: int) -> None:
        return None

    def advance(self, nbytes: int) -> None:
        return None


SIZE_ONLY_NAMES = 5  # size-only files named in a result, at most


@dataclass(frozen=True)
class PullResult:
    files: int
    bytes_total: int
    bytes_transferred: int
    seconds: float
    revision: str | None
    up_to_date: bool  # nothing was fetched: the destination already matched the source
    # How the files of this download were checked: {"sha256": n, "sha1": n, "md5": n} for those whose
    # content matched the source's hash, and the count (and first few names) of those checked by
    # their size alone (no hash from the source, or verify off). Empty for an up-to-date result.
    hash_checked: Mapping[str, int] = field(default_factory=dict)
    size_only: int = 0
    size_only_names: tuple[str, ...] = ()
    # Peer fill: bytes received from the origin and from peers (every attempt; their sum is
    # bytes_transferred), and the peers this download stopped using, with why.
    bytes_from_origin: int = 0
    bytes_from_peers: int = 0
    peers_dropped: tuple[DroppedPeer, ...] = ()

    @property
    def verified(self) -> bool:
        """Every file's content was checked against a hash the source gave."""
        return self.size_only == 0 and sum(self.hash_checked.values()) == self.files


def same_files(manifest: Manifest, listing: Listing) -> bool:
    """The published copy is what the source holds now (same revision, paths, sizes, hashes)."""
    if listing.archive is not None:
        return manifest.revision == listing.revision and manifest.revision is not None
    theirs = {(f.path, f.size, f.sha256, f.git_sha1) for f in listing.files}
    # The manifest also records sha256s we computed ourselves; compare only what the source offers.
    offered = {f.path for f in listing.files if f.sha256}
    ours = {(f.path, f.size, f.sha256 if f.path in offered else None, f.sha1) for f in manifest.files}
    return manifest.revision == listing.revision and theirs == ours


def chunks_of(size: int | None, step: int) -> list[tuple[int, int, int]]:
    """(index, start, end-exclusive) for each ``step``-byte chunk of a file of ``size`` bytes; one
    empty chunk for an empty file or one of unknown size."""
    size = size or 0
    return [(i, s, min(s + step, size)) for i, s in enumerate(range(0, size, step))] or [(0, 0, 0)]


def unchanged(f: RemoteFile, old: FileEntry) -> bool:
    """The new revision did not change a file: same size and the same source checksum (sha256, or
    git blob sha1), case aside. A file of unknown size is never taken as unchanged."""
    if f.size is None or old.size != f.size:
        return False
    return (f.sha256 is not None and f.sha256.lower() == (old.sha256 or "").lower()) or (
        f.git_sha1 is not None and f.git_sha1.lower() == (old.sha1 or "").lower()
    )


def checked_counts(methods: Mapping[str, str], *, each: int) -> tuple[dict[str, int], int, tuple[str, ...]]:
    """How the finished files were checked -> (files per hash name, files checked by size alone, the
    first :data:`SIZE_ONLY_NAMES` of those by path). ``methods``: path -> a hash name or "size";
    ``each``: how many files each one counts for."""
    hashed: dict[str, int] = {}
    size_only, named = 0, []
    for path, method in methods.items():
        if method == "size":
            size_only += each
            named.append(path)
        else:
            hashed[method] = hashed.get(method, 0) + each
    return hashed, size_only, tuple(sorted(named)[:SIZE_ONLY_NAMES])


def backoff(settings: TransferSettings, retry_state: object) -> float:
    """Seconds before a request's next attempt (tenacity's ``wait``): exponential from
    ``backoff_initial`` up to ``backoff_max``, with full jitter over its upper half, and at least a
    TransientError's ``retry_after`` (capped at ``backoff_max``)."""
    attempt = getattr(retry_state, "attempt_number", 1)
    outcome = getattr(retry_state, "outcome", None)
    error = outcome.exception() if outcome is not None else None
    base = min(settings.backoff_max, settings.backoff_initial * 2 ** (attempt - 1))
    delay = random.uniform(base / 2, base)  # noqa: S311 - jitter, not crypto
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.backoff_max))
    return delay
