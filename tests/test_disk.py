"""The agent's cache folder: lock, format version, scan (trust, interrupted publish, trash), delete."""

from pathlib import Path

import pytest

from agent.disk import CacheDir, CacheLocked
from agent.download.staging import write_atomic
from localmodel.errors import InvalidInput
from localmodel.layout import storage_key
from localmodel.manifest import FileEntry, Manifest


def publish_fake(cache: CacheDir, uri: str, files: dict[str, bytes]) -> str:
    key = storage_key(uri)
    dest = cache.destination(key)
    staged = dest.staging / "files"
    for path, body in files.items():
        (staged / path).parent.mkdir(parents=True, exist_ok=True)
        (staged / path).write_bytes(body)
    from agent.download.staging import publish

    publish(dest, Manifest(uri, key, "rev", tuple(FileEntry(p, len(b)) for p, b in files.items())))
    return key


def test_second_agent_is_refused_by_the_lock(tmp_path: Path) -> None:
    first = CacheDir(tmp_path)
    first.open()
    with pytest.raises(CacheLocked, match="in use by another modelcache agent"):
        CacheDir(tmp_path).open()
    first.close()
    again = CacheDir(tmp_path)
    again.open()
    again.close()


def test_newer_format_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path)
    cache.open()
    key = publish_fake(cache, "hf://a/b", {"w.bin": b"x" * 10})
    cache.close()
    (tmp_path / ".modelcache" / "format").write_text("99\n")
    with pytest.raises(InvalidInput, match="format '99'"):
        CacheDir(tmp_path).open()
    assert (tmp_path / "models" / key / "w.bin").read_bytes() == b"x" * 10


def test_scan_trusts_matching_manifests_only(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path)
    cache.open()
    good = publish_fake(cache, "hf://a/good", {"w.bin": b"x" * 10, "d/c.json": b"{}"})
    bad = publish_fake(cache, "hf://a/bad", {"w.bin": b"y" * 10})
    (tmp_path / "models" / bad / "w.bin").write_bytes(b"short")
    (tmp_path / "models" / "0123456789abcdef").mkdir()  # a folder without a manifest
    (tmp_path / "models" / "not-a-key").mkdir()  # not ours: ignored, never deleted
    scan = cache.scan()
    assert set(scan.published) == {good} and scan.published[good].size == 12
    assert scan.untrusted == ("0123456789abcdef", bad)
    assert scan.free > 0
    cache.delete(bad)
    assert not (tmp_path / "models" / bad).exists()
    assert (tmp_path / "models" / "not-a-key").exists()
    cache.close()


def test_scan_finishes_an_interrupted_publish_and_empties_trash(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path)
    cache.open()
    key = storage_key("hf://a/b")
    dest = cache.destination(key)
    (dest.staging / "files").mkdir(parents=True)
    (dest.staging / "files" / "w.bin").write_bytes(b"z" * 5)
    manifest = Manifest("hf://a/b", key, "rev", (FileEntry("w.bin", 5),))
    import json

    # The crash came after the manifest was staged, before the rename.
    write_atomic(dest.staging / "manifest.json", json.dumps(manifest.to_json()).encode())
    (tmp_path / ".modelcache" / "trash" / "old.1234").mkdir(parents=True)
    scan = cache.scan()
    assert set(scan.published) == {key}
    assert (tmp_path / "models" / key / "w.bin").read_bytes() == b"z" * 5
    assert not list((tmp_path / ".modelcache" / "trash").iterdir())
    cache.close()
