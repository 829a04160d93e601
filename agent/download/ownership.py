"""Whether a published folder is still the one its manifest describes (pure but for one walk).

A manifest of ours beside a folder is not enough to call the folder ours: after ``rm -rf DEST;
mkdir DEST`` the old manifest still names it. The rule, shared by ``modelcache pull`` and the
agent's scan:

- ``FOREIGN``: the folder holds an entry the manifest does not name (a file, a link, a folder that
  leads to no listed file): someone's files, never replaced or deleted without ``--force``;
- ``SHORT``: only the manifest's files are there, but some are missing or have another size: ours,
  fetched again;
- ``INTACT``: exactly the manifest's files, each with its size.

An adopted folder's ``extras`` (:attr:`localmodel.manifest.Manifest.extras`: entries the source
does not list, found there when the folder was adopted, a folder covering what is below it) are
skipped, neither ours nor foreign; a symbolic link at one is still foreign.
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path

from localmodel.errors import ModelcacheError
from localmodel.layout import storage_key
from localmodel.manifest import Manifest
from localmodel.uri import parse_uri


class Match(enum.Enum):
    INTACT = "intact"
    SHORT = "short"
    FOREIGN = "foreign"


def folder_match(folder: Path, manifest: Manifest) -> Match:
    """How ``folder`` compares with ``manifest`` (see the module docstring). Links are never
    followed: a link anywhere is an entry the manifest does not name, except, in a model unpacked
    from an archive, a listed member that links to a file inside the folder. An unreadable folder is
    ``FOREIGN`` (nothing is assumed ours that could not be looked at)."""
    sizes = {f.path: f.size for f in manifest.files}
    extras = set(manifest.extras)
    inner_links = _from_archive(manifest)
    real = Path(os.path.realpath(folder))
    dirs = {"/".join(p.split("/")[:i]) for p in sizes for i in range(1, p.count("/") + 1)}
    seen: dict[str, int] = {}
    pending = [""]
    try:
        while pending:
            rel = pending.pop()
            with os.scandir(folder / rel if rel else folder) as it:
                for entry in it:
                    path = f"{rel}/{entry.name}" if rel else entry.name
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode) and path in dirs:
                        pending.append(path)
                    elif stat.S_ISREG(st.st_mode) and path in sizes:
                        seen[path] = st.st_size
                    elif path in extras and not stat.S_ISLNK(st.st_mode):
                        continue  # theirs, recorded at adoption: never looked into
                    elif stat.S_ISLNK(st.st_mode) and path in sizes and inner_links:
                        # An archive's own member linking inside the model (listed by its target's
                        # size): a link out of the folder is not ours.
                        target = Path(os.path.realpath(folder / path))
                        if not target.is_relative_to(real) or not target.is_file():
                            return Match.FOREIGN
                        seen[path] = target.stat().st_size
                    else:
                        return Match.FOREIGN
    except OSError:
        return Match.FOREIGN
    return Match.INTACT if seen == sizes else Match.SHORT


def _from_archive(manifest: Manifest) -> bool:
    try:
        return parse_uri(manifest.source_model_uri).archive_suffix is not None
    except ModelcacheError:
        return False


def names_key(manifest: Manifest, key: str) -> bool:
    """The manifest was written for ``models/<key>``: its ``storageKey`` is ``key`` and its
    ``sourceModelUri`` hashes to it (KServe's rule, :func:`localmodel.layout.storage_key`). A URI
    stored redacted (a query string or userinfo dropped, cut to 200 characters:
    :func:`localmodel.uri.redact`) cannot be hashed back; only its ``storageKey`` is compared."""
    if manifest.storage_key != key:
        return False
    src = manifest.source_model_uri
    redacted = "?<redacted>" in src or len(src) >= 200 or "\\" in src
    return redacted or storage_key(src) == key
