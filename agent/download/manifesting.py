"""The manifest of a download once its files are staged and checked: what the engine
(:mod:`agent.download.engine`) publishes. Reads the staged files' sizes (and, for an archive's
members, their sha256); writes nothing."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

from agent.download.body import sha256_of
from agent.download.listing import Listing
from agent.download.staging import check_tree, lstat_below
from localmodel.manifest import FileEntry, Manifest
from localmodel.timestamps import utc_now


def manifest_of(
    listing: Listing,
    files_dir: Path,
    *,
    root: Path,
    uri: str,
    storage_key: str,
    computed: Mapping[str, str | None],
    verify: bool,
) -> Manifest:
    """The manifest of the files staged in ``files_dir`` (below ``root``: no link followed) for
    ``listing``. ``computed``: path -> the sha256 the engine computed for a file the source gave
    none for. An archive's members (unpacked into ``files_dir``) get a sha256 of our own when
    ``verify`` is on. OSError (FileNotFoundError for a staged file missing) for the caller to map."""
    if listing.archive is not None:
        # An archive's members have no hash from the source: ours, for a later re-verify.
        # Its members' links were checked by the unpack and are again at publish (check_tree).
        check_tree(files_dir, inner_links=True)
        entries = tuple(
            FileEntry(
                p.relative_to(files_dir).as_posix(),
                p.stat().st_size,
                sha256_of(p) if verify else None,
            )
            for p in sorted(files_dir.rglob("*"))
            if p.is_file()
        )
    else:
        entries = tuple(
            FileEntry(
                f.path,
                _staged_size(files_dir / f.path, root),
                f.sha256 or computed.get(f.path),
                f.git_sha1,
                f.md5,
                f.crc32c,
            )
            for f in listing.files
        )
    return Manifest(
        source_model_uri=uri,
        storage_key=storage_key,
        revision=listing.revision,
        files=entries,
        published_at=utc_now(),
    )


def _staged_size(path: Path, root: Path) -> int:
    st = lstat_below(path, below=root)
    if st is None:
        raise FileNotFoundError(errno.ENOENT, "staged file missing", str(path))
    return st.st_size
