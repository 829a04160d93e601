"""The agent's cache folder: lock, format version, scan (trust, interrupted publish, trash), delete."""

from pathlib import Path

import pytest

from agent.disk import CacheDir, CacheLocked, CacheUnsafe
from agent.download.staging import LinkRefused, write_atomic
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
    assert scan.untrusted == (bad,)  # ours (its manifest names it), damaged
    assert scan.foreign == ("0123456789abcdef",)  # no manifest of ours: someone else's
    assert scan.free > 0
    assert cache.delete(bad) is True
    assert not (tmp_path / "models" / bad).exists()
    (tmp_path / "models" / "0123456789abcdef" / "theirs.bin").write_bytes(b"keep")
    assert cache.delete("0123456789abcdef") is False
    assert (tmp_path / "models" / "0123456789abcdef" / "theirs.bin").read_bytes() == b"keep"
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


def test_published_folders_are_read_only_and_still_deleted(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path)
    cache.open()
    key = publish_fake(cache, "hf://a/ro", {"w.bin": b"x" * 10, "d/c.json": b"{}"})
    folder = tmp_path / "models" / key
    assert folder.stat().st_mode & 0o777 == 0o555
    assert (folder / "d").stat().st_mode & 0o777 == 0o555
    assert (folder / "w.bin").stat().st_mode & 0o777 == 0o444
    assert (folder / "d" / "c.json").stat().st_mode & 0o777 == 0o444
    assert cache.delete(key) is True
    assert not folder.exists() and not list((tmp_path / ".modelcache" / "trash").iterdir())
    cache.close()


@pytest.mark.parametrize("where", ["trash", "staging", "manifests", "models", ".modelcache"])
def test_a_layout_folder_that_is_a_link_refuses_the_start(where: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "precious.txt").write_text("keep")
    cache_dir = tmp_path / "cache"
    place = cache_dir / where if where in ("models", ".modelcache") else cache_dir / ".modelcache" / where
    place.parent.mkdir(parents=True, exist_ok=True)
    place.symlink_to(victim)
    with pytest.raises(CacheUnsafe, match=f"{place} is a symbolic link"):
        CacheDir(cache_dir).open()
    assert (victim / "sub" / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in victim.iterdir()) == ["sub"]


def test_links_inside_the_layout_are_listed_never_followed_nor_deleted(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "precious.txt").write_text("keep")
    (victim / "precious.json").write_text("{}")
    cache_dir = tmp_path / "cache"
    cache = CacheDir(cache_dir)
    cache.open()
    key = storage_key("hf://a/linked")
    (cache_dir / ".modelcache" / "staging" / key).symlink_to(victim)
    (cache_dir / ".modelcache" / "trash" / "x").symlink_to(victim)
    (cache_dir / "models" / key).symlink_to(victim)
    other = storage_key("hf://a/other")
    (cache_dir / "models" / other).mkdir()
    (cache_dir / ".modelcache" / "manifests" / f"{other}.json").symlink_to(victim / "precious.json")
    scan = cache.scan()
    assert scan.links == (
        f".modelcache/manifests/{other}.json",
        f".modelcache/staging/{key}",
        ".modelcache/trash/x",
        f"models/{key}",
    )
    assert key not in scan.published and key not in scan.staged and other not in scan.published
    with pytest.raises(LinkRefused):
        cache.delete(key)
    with pytest.raises(LinkRefused):
        cache.delete(other)
    assert (victim / "sub" / "precious.txt").read_text() == "keep"
    assert (victim / "precious.json").read_text() == "{}"
    cache.close()


@pytest.mark.parametrize("inner", ["files", "progress.json"])
def test_a_link_inside_a_staging_folder_is_refused(inner: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    cache = CacheDir(tmp_path / "cache")
    cache.open()
    dest = cache.destination(storage_key("hf://a/b"))
    dest.staging.mkdir(parents=True)
    (dest.staging / inner).symlink_to(victim if inner == "files" else victim / "precious.txt")
    with pytest.raises(LinkRefused, match=f"{dest.staging / inner} is a symbolic link"):
        dest.check_links()
    with pytest.raises(LinkRefused):
        cache.delete(storage_key("hf://a/b"))
    assert (victim / "precious.txt").read_text() == "keep"
    cache.close()
