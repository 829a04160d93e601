"""The on-disk layout of a node's cache, shared by the agent (writer) and the runtime (reader).

    <cache-dir>/
      models/<storage key>/            a published model, laid out as in the source; it exists only
                                       when complete and verified (publish is one rename)
      .modelcache/                     everything else, on the same filesystem so renames are atomic
        format                         on-disk format version (an integer); a newer one is refused
        lock                           held (flock) by the one agent working on this folder
        manifests/<storage key>.json   what was published: source, revision, every file's size/hash
        staging/<storage key>/         partial downloads and their resume state
        trash/                         models being deleted (renamed here first, then removed)
        state.json                     the agent's status, for `modelcache status` in standalone mode
        compile-cache/<storage key>/   vLLM's compile caches, written by `modelcache serve`, deleted by
                                       the agent with the model

The storage key is KServe's ``GetStorageKey``: the first 16 hex digits of sha256 of the URI string,
so a cache folder written by KServe's agent and by modelcache have the same names.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
# The shape of the agent's state file (.modelcache/state.json) that `modelcache status` reads.
STATE_FILE_VERSION = 1
STORAGE_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


def storage_key(source_model_uri: str) -> str:
    """KServe's storage key: hex(sha256(uri))[:16], on the URI string exactly as written."""
    return hashlib.sha256(source_model_uri.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CacheLayout:
    """Paths inside one cache folder; pure, touches no disk."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def hidden(self) -> Path:
        return self.root / ".modelcache"

    @property
    def format_file(self) -> Path:
        return self.hidden / "format"

    @property
    def lock_file(self) -> Path:
        return self.hidden / "lock"

    @property
    def manifests(self) -> Path:
        return self.hidden / "manifests"

    @property
    def staging(self) -> Path:
        return self.hidden / "staging"

    @property
    def trash(self) -> Path:
        return self.hidden / "trash"

    @property
    def state_file(self) -> Path:
        return self.hidden / "state.json"

    @property
    def compile_cache(self) -> Path:
        return self.hidden / "compile-cache"

    def model_dir(self, key: str) -> Path:
        return self.models / _checked(key)

    def manifest_file(self, key: str) -> Path:
        return self.manifests / f"{_checked(key)}.json"

    def staging_dir(self, key: str) -> Path:
        return self.staging / _checked(key)

    def compile_cache_dir(self, key: str) -> Path:
        return self.compile_cache / _checked(key)

    @classmethod
    def of_model_dir(cls, model_dir: Path) -> tuple[CacheLayout, str] | None:
        """The layout and key a published model folder belongs to, if it sits in one."""
        key = model_dir.name
        if STORAGE_KEY_RE.match(key) and model_dir.parent.name == "models":
            return cls(model_dir.parent.parent), key
        return None


def model_subpath(key: str) -> str:
    """``models/<key>``: a published model's folder relative to its cache folder (POSIX)."""
    return f"models/{_checked(key)}"


def node_model_folder(root: str, key: str) -> str:
    """``<root>/models/<key>``: a published model's folder on a node, as a POSIX path string (for the
    controller, which names node folders it never opens). Raises ValueError for a bad key."""
    return f"{root.rstrip('/')}/{model_subpath(key)}"


def _checked(key: str) -> str:
    # A key reaches paths; anything but 16 hex digits could climb out of the cache folder.
    if not STORAGE_KEY_RE.match(key):
        raise ValueError(f"not a storage key (16 lowercase hex digits): {key!r}")
    return key
