"""``modelcache pull URI DEST``: one model, downloaded whole, verified, resumable."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from agent.download.adoption import adopt, adopted_words, needs_adoption
from agent.download.environment import aws_ca_bundle, proxies_from_env
from agent.download.pull import after_failure, pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination, describe, refuse_links
from agent.download.transfer import PullResult, TransferSettings
from agent.transfer_flags import add_transfer_flags, transfer_settings
from localmodel.cliargs import UsageParser
from localmodel.errors import DownloadError, ForeignFolder, InvalidInput, ModelcacheError, from_os_error
from localmodel.folders import cache_path_error, unreachable
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import HASH_NAMES
from localmodel.text import printable
from localmodel.uri import SourceURI, parse_uri

UNITS = (
    "Units: the progress bar and the summary count decimal units, 1 MB = 1,000,000 bytes, rates in "
    "MB/s (the summary also gives exact bytes). Flags take Kubernetes quantities: 50M or 50MB/s is "
    "50,000,000 bytes/s, 50Mi or 50MiB/s is 52,428,800; k or K (kB, KB) is 1,000, Ki is 1,024."
)


def megabytes(n: float) -> str:
    """Bytes in decimal megabytes, the one unit of pull's output ("191.0 MB")."""
    return f"{n / 1e6:.1f} MB"


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="modelcache pull", description="Download a whole model into DEST, verified.", epilog=UNITS
    )
    p.add_argument(
        "uri",
        metavar="URI",
        help=(
            "hf://OWNER/REPO[:REV], s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH (Azure Blob; ADLS Gen2 as "
            "abfs(s)://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH), http(s)://..., "
            "file:///PATH or a plain /PATH"
        ),
    )
    p.add_argument("dest", metavar="DEST", help="the folder to create (published atomically)")
    p.add_argument("--revision", help="hf:// only: branch, tag or commit (overrides :REV in the URI)")
    add_transfer_flags(p, "pull")
    p.add_argument("--no-verify", action="store_true", help="skip checksums (sizes are still checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; only the summary line")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a DEST that modelcache did not publish (its files are lost)",
    )
    p.add_argument(
        "--adopt",
        action="store_true",
        help="DEST holds the model written by another tool (KServe's storage initializer): check its "
        "files against the source, keep those that match, fetch the rest in place, keep the others",
    )
    p.add_argument(
        "--lock-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for another writer of DEST (or the cache's agent) to finish (default 30)",
    )
    return p


class LockBusy(ModelcacheError):
    """Another process writes the same destination (or the agent owns the cache folder)."""


def _is_cache(folder: Path) -> bool:
    """A modelcache cache folder: the agent's format file or manifests folder in its hidden folder
    (a pull's own hidden folder beside a DEST holds only pull/ and trash/)."""
    hidden = folder / ".modelcache"
    return (hidden / "format").is_file() or (hidden / "manifests").is_dir()


def check_dest(raw: str, *, home: Path, key: str | None = None) -> Path:
    """DEST as given -> the absolute folder to publish, or InvalidInput for a folder that is never a
    model's: empty, ``/``, the home folder, a cache folder itself or its ``models/``/``.modelcache``.
    Anywhere below a cache's ``models/``, DEST must be exactly ``models/<key>`` (``key``: the storage
    key of the URI pulled, so the agent finds the model under the name it computes; deeper folders
    are inside a published, read-only model). Pure but for looking at what is there."""
    if not raw.strip():
        raise InvalidInput("DEST: empty; name the folder to create, e.g. ./my-model")
    dest = Path(os.path.normpath(Path(raw).absolute()))
    real = dest.resolve()
    if dest == Path("/") or real == Path("/"):
        raise InvalidInput("DEST: / is the root folder; name a new or empty folder for the model")
    if real == home.resolve():
        raise InvalidInput(f"DEST: {dest} is your home folder; name a new or empty folder for the model")
    for folder in (dest, dest.parent):
        # A cache folder's marks (the agent's format file, the manifests); a pull's own hidden
        # folder beside a DEST holds only pull/ and trash/, and a DEST may be named "models".
        hidden = folder / ".modelcache"
        is_cache = (hidden / "format").is_file() or (hidden / "manifests").is_dir()
        if is_cache and (folder == dest or dest.name in ("models", ".modelcache")):
            raise InvalidInput(
                f"DEST: {dest} is part of a modelcache cache folder; pull into "
                f"{folder / 'models'}/<storage key> or a new folder"
            )
    if ".modelcache" in dest.parts:
        raise InvalidInput(f"DEST: {dest} is inside modelcache's hidden folder; name another folder")
    for cache in dest.parents:
        models = cache / "models"
        if dest.is_relative_to(models) and _is_cache(cache):
            right = models / key if key is not None else None
            if dest != right:
                where = f"this URI's folder there is {right}" if right else "name models/<storage key>"
                raise InvalidInput(
                    f"DEST: {dest} is inside the modelcache cache {cache}, where a model's folder is "
                    f"models/<storage key of its URI>; {where}, or pull into a new folder"
                )
    return dest


def check_replace(dest: Path, uri: SourceURI, *, force: bool) -> None:
    """InvalidInput when publishing at ``dest`` would delete what is never ours, ``--force`` or
    not: a modelcache cache or another pull's model anywhere inside it (a ``.modelcache`` folder
    below it), or the ``file://`` source itself (DEST inside its source, or the source inside
    DEST). Walks DEST without following links."""
    if uri.scheme == "file":
        source = Path(os.path.normpath(uri.path))
        for a, b in ((dest, source), (dest.resolve(), source.resolve())):
            if a.is_relative_to(b) or b.is_relative_to(a):
                raise InvalidInput(
                    f"DEST: {dest} and the source {source} overlap; the publish would replace the "
                    "files it copies: name a folder outside the source"
                )
    if not force or not dest.is_dir() or dest.is_symlink():
        return  # without --force only a folder of ours (its manifest's files alone) is replaced
    for root, dirs, _ in os.walk(dest):
        if ".modelcache" in dirs:
            raise InvalidInput(
                f"DEST: {dest} holds a modelcache cache or another pull's model "
                f"({Path(root) / '.modelcache'}); it is never replaced, even with --force: "
                "name another folder"
            )


def folder_error(path: Path) -> str | None:
    """Why files cannot be written under ``path`` (created if missing), or None when they can.

    Looks at ``path`` or, when it does not exist yet, the nearest folder above it that does: a file
    there, a read-only filesystem (statvfs ST_RDONLY) or a folder this user may not write
    (access(2) W_OK|X_OK) is an answer naming that path and the fix."""
    at = path
    try:
        while not at.exists() and at.parent != at:
            if at.is_symlink():
                return f"{at} is a link to nothing; remove it or name another folder"
            at = at.parent
        if not at.is_dir():
            return f"{at} is a file, not a folder; name a folder (it is created if missing)"
    except OSError as e:  # a folder above it this user may not search (EACCES), an I/O error
        return unreachable(path, e)
    try:
        read_only = bool(os.statvfs(at).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{at} is on a read-only filesystem; mount it read-write or name another folder"
    if not os.access(at, os.W_OK | os.X_OK):
        return (
            f"{at} is not writable by this user (uid {os.getuid()}); fix its owner or mode, "
            "or name another folder"
        )
    return None


@contextlib.contextmanager
def writer_lock(dest: Destination, *, wait: float) -> Iterator[None]:
    """Hold the lock of DEST for the whole pull: the cache's ``.modelcache/lock`` (the agent's
    flock) when DEST is a cache's model folder, else ``<hidden>/pull/locks/<name>.lock``. Waits at most
    ``wait`` seconds, then raises :class:`LockBusy` naming the holder's pid."""
    placed = CacheLayout.of_model_dir(dest.final)
    pull = dest.final.parent / ".modelcache" / "pull"
    path = placed[0].lock_file if placed is not None else pull / "locks" / f"{dest.final.name}.lock"
    refuse_links(path, below=dest.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").split()
                    who = f"process {holder[0]}" if holder and holder[0].isdigit() else "another process"
                    raise LockBusy(
                        f"{dest.final} is in use by {who}, another modelcache pull or the cache's agent "
                        f"(lock {path}, still held after {wait:g} s); run again when it has finished, "
                        "or raise --lock-wait"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} modelcache pull\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking a lock file races its next taker)


class _Bar:
    """A tqdm bar on a terminal; nothing otherwise (logs get the summary line only)."""

    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self.bar: Any = None

    def start(self, *, total_bytes: int, done_bytes: int, files: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,  # decimal, as the summary's MB/s and --max-bandwidth's MB/s
                desc=count_files(files),
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                "[{elapsed}<{remaining}, {rate_fmt}]",
                file=self.stream,
                dynamic_ncols=True,
            )

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def checked(result: PullResult, *, verify: bool) -> str:
    """How the files were checked, for the summary: "verified" only when every file's content
    matched a hash the source gave; otherwise the size-only files are counted and named."""
    if not verify:
        return "sizes checked"
    by = "/".join(sorted(result.hash_checked, key=HASH_NAMES.index))
    if result.verified:
        return f"verified by {by}"
    more = "…" if result.size_only > len(result.size_only_names) else ""
    size_only = f"{result.size_only} checked by size only ({', '.join(result.size_only_names)}{more})"
    hashed = sum(result.hash_checked.values())
    if not hashed:
        return f"{size_only}: the source gives no hash for {'it' if result.size_only == 1 else 'them'}"
    return f"{count_files(hashed)} verified by {by}, {size_only}"


def count_files(n: int) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} file" if n == 1 else f"{n} files"


def _failed(dest: Destination, e: BaseException, what: str) -> int:
    """The one line for a failed or interrupted pull, naming the staging kept for a resume (a final
    failure drops it: :func:`agent.download.pull.after_failure`). Exit 1."""
    kept = after_failure(dest, e)
    where = f"; partial download kept in {kept}; run the same command to resume" if kept else ""
    sys.stderr.write(f"modelcache pull: {what}{where}\n")
    return 1


def mount_point_error(final: Path) -> str | None:
    """Why DEST cannot be published to because it is a mount point (an existing folder on another
    filesystem than its parent, or ``os.path.ismount``), or None. A pull stages beside DEST, on the
    parent's filesystem, and publishes by renaming the staged folder onto DEST: the kernel refuses
    that for a mount point (EBUSY), so the pull could never succeed. Checked before any staging."""
    try:
        if final.is_symlink() or not final.is_dir():
            return None
        other = final.stat().st_dev != final.parent.stat().st_dev
    except OSError:
        return None
    if not (other or os.path.ismount(final)):
        return None
    return (
        f"{final} is a mount point; a pull publishes by renaming its staged copy onto DEST, which a "
        f"mount point cannot take; pull into a folder inside it, e.g. {final / 'model'}"
    )


def _check_dest_folder(final: Path) -> None:
    """Raises InvalidInput (naming DEST) for a DEST that is a system folder (outside the user's home,
    also through a link), whose parent or itself (a folder there) cannot be written, or that is a
    mount point."""
    # The agent's rule for its cache folder (never a system folder, also through a link), but for
    # the user's own home, where root's is /root.
    home = Path.home().resolve()
    for candidate in (final, final.resolve()):
        if candidate.is_relative_to(home):
            continue
        if (problem := cache_path_error(str(candidate), cluster=False)) is not None:
            raise InvalidInput(f"DEST: {problem}")
    # DEST itself too where it exists: a read-only or unwritable folder fails the publish only after
    # the whole download, and no later run could get past it.
    mine = final.is_dir() and not final.is_symlink()  # else the replaceable check says what is there
    if (problem := folder_error(final.parent) or (folder_error(final) if mine else None)) is not None:
        raise InvalidInput(f"DEST: {problem}")
    if (problem := mount_point_error(final)) is not None:
        raise InvalidInput(f"DEST: {problem}")


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    uri = parse_uri(args.uri, field="URI").with_revision(args.revision)
    settings = transfer_settings(
        args,
        verify=not args.no_verify,
        proxies=proxies_from_env(),
        # Only S3 sources need boto3's CA bundle; resolving it imports botocore (~0.1 s).
        ca_bundle=aws_ca_bundle() if uri.scheme == "s3" else None,
    )
    if args.lock_wait < 0:
        raise InvalidInput(f"--lock-wait: {args.lock_wait:g} must be zero or more seconds")
    try:
        final = _checked_dest(args, uri)
    except OSError as e:  # DEST, or a folder above it, this user may not look at
        raise InvalidInput(f"DEST: {unreachable(args.dest, e)}") from None
    if args.adopt and args.force:
        raise InvalidInput(
            "--adopt and --force: choose one (--adopt keeps DEST's files, --force replaces them)"
        )
    dest = Destination.for_folder(final, force=args.force)
    bar = _Bar(sys.stderr, enabled=not args.quiet and sys.stderr.isatty())
    try:
        with writer_lock(dest, wait=args.lock_wait):
            placed = CacheLayout.of_model_dir(dest.final)
            if args.adopt and needs_adoption(dest, placed[1] if placed else None):
                return _adopt(uri, dest, args.dest, settings, bar)
            if not dest.replaceable() and args.adopt:
                # Only a folder is adopted: whatever else is there (a link is never followed), --adopt
                # was passed already, so the hint below would send the user round in a circle.
                raise InvalidInput(
                    f"DEST: {dest.final} is {describe(dest.final)}, not a folder; --adopt adopts only "
                    "a folder (a symbolic link is never followed): name the folder itself, or a new "
                    "or empty folder"
                )
            if not dest.replaceable():
                raise InvalidInput(
                    f"DEST: {dest.final} holds {describe(dest.final)} that modelcache did not publish; "
                    "pass --adopt to check and keep its files, --force to replace them, or name a new "
                    "or empty folder"
                )
            dest.check_links()
            # Failures are told while the lock is held: a staging that is dropped is nobody else's.
            try:
                result = asyncio.run(
                    pull(uri, dest, sources=SourceSettings.from_env(), transfer=settings, progress=bar)
                )
            except DownloadError as e:
                bar.close()
                return _failed(dest, e, str(e))
            except KeyboardInterrupt as e:
                bar.close()
                _failed(dest, e, "interrupted")
                return 130
    except OSError as e:
        raise from_os_error(e) from e
    finally:
        bar.close()
    rate = result.bytes_transferred / result.seconds / 1e6 if result.seconds > 0 else 0.0
    state = "up to date" if result.up_to_date else checked(result, verify=settings.verify)
    print(
        f"{uri.redacted()} -> {args.dest}: {count_files(result.files)}, {megabytes(result.bytes_total)} "
        f"({result.bytes_total} bytes, {result.bytes_transferred} transferred) in {result.seconds:.2f} s, "
        f"{rate:.1f} MB/s, {state}" + (f", revision {result.revision}" if result.revision else "")
    )
    return 0


def _checked_dest(args: argparse.Namespace, uri: SourceURI) -> Path:
    """DEST, checked before anything is locked or written (InvalidInput naming the fix); raises the
    OSError of a folder this user may not look at."""
    final = check_dest(args.dest, home=Path.home(), key=storage_key(uri.raw))
    check_replace(final, uri, force=args.force)
    _check_dest_folder(final)
    return final


def _adopt(uri: SourceURI, dest: Destination, shown: str, settings: TransferSettings, bar: _Bar) -> int:
    """``--adopt``: DEST's files checked against the source, kept where they match, the rest fetched
    in place (:mod:`agent.download.adoption`); one summary line. A DEST that cannot be adopted (a
    link or a special file in it, an archive source) is bad input: exit 2, nothing changed."""
    try:
        result = asyncio.run(
            adopt(uri, dest, sources=SourceSettings.from_env(), transfer=settings, progress=bar)
        )
    except ForeignFolder as e:
        raise InvalidInput(f"DEST: {e}") from None
    except DownloadError as e:
        bar.close()
        return _failed(dest, e, str(e))
    except KeyboardInterrupt as e:
        bar.close()
        _failed(dest, e, "interrupted")
        return 130
    bar.close()
    print(adopted_words(uri.redacted(), printable(shown), result))
    return 0
