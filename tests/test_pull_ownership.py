"""What makes a folder "ours" (13 §1, §2, §12): a manifest of ours AND exactly its files; a DEST in a
cache is exactly models/<key of the URI>; --force never deletes a cache, another pull or the source."""

import os
from pathlib import Path

import pytest

from agent.disk import CacheDir
from agent.download.ownership import Match, folder_match
from localmodel.layout import CacheLayout, storage_key
from localmodel.manifest import Manifest
from modelcache.cli import main


def _src(root: Path, name: str, data: bytes) -> Path:
    src = root / name
    src.mkdir(parents=True)
    (src / "f.bin").write_bytes(data)
    return src


def _manifest(dest: Path) -> Path:
    hidden = dest.parent / ".modelcache" / "pull"
    found = [
        p for p in (hidden / f"{dest.name}.json", hidden / "manifests" / f"{dest.name}.json") if p.is_file()
    ]
    assert len(found) == 1
    return found[0]


def _exit_2_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_left_over_manifest_does_not_make_a_new_folder_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _src(tmp_path, "h", b"x" * 100)
    other = _src(tmp_path, "h2", b"y" * 50)
    proj = tmp_path / "proj"
    assert main(["pull", str(src / "f.bin"), str(proj), "--quiet"]) == 0
    for p in (proj / "f.bin", proj):
        p.chmod(0o755)
    (proj / "f.bin").unlink()
    proj.rmdir()
    proj.mkdir()
    (proj / "thesis.tex").write_text("x")
    err = _exit_2_one_line(["pull", str(src), str(proj), "--quiet"], capsys)
    assert "did not publish" in err and "--force" in err
    _exit_2_one_line(["pull", str(other / "f.bin"), str(proj), "--quiet"], capsys)
    assert sorted(os.listdir(proj)) == ["thesis.tex"]


def test_a_missing_file_or_another_uri_is_fetched_not_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _src(tmp_path, "h", b"x" * 100)
    other = _src(tmp_path, "h2", b"z" * 100)  # same name and size, other bytes
    dest = tmp_path / "out"
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    dest.chmod(0o755)
    (dest / "f.bin").unlink()
    assert folder_match(dest, Manifest.read(_manifest(dest))) is Match.SHORT
    capsys.readouterr()
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert (dest / "f.bin").read_bytes() == b"x" * 100
    assert main(["pull", str(other), str(dest), "--quiet"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert (dest / "f.bin").read_bytes() == b"z" * 100
    assert Manifest.read(_manifest(dest)).storage_key == storage_key(str(other))


def _cache(root: Path) -> CacheLayout:
    layout = CacheLayout(root / "cache")
    for d in (layout.models, layout.manifests):
        d.mkdir(parents=True)
    layout.format_file.write_text("1\n")
    return layout


def test_a_dest_in_a_cache_must_be_the_uris_own_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _src(tmp_path, "h", b"x" * 10)
    layout = _cache(tmp_path)
    other_key = storage_key("hf://someone/else")
    right = layout.models / storage_key(str(src))
    for dest in (layout.models / other_key, layout.models / "newfolder", right / "sub"):
        err = _exit_2_one_line(["pull", str(src), str(dest), "--quiet"], capsys)
        assert str(right) in err
        assert not os.path.lexists(dest)
    assert main(["pull", str(src), str(right), "--quiet"]) == 0


def test_the_agents_scan_refuses_extra_files_and_another_models_manifest(tmp_path: Path) -> None:
    layout = _cache(tmp_path)
    src = _src(tmp_path, "h", b"x" * 10)
    key = storage_key(str(src))
    assert main(["pull", str(src), str(layout.models / key), "--quiet"]) == 0
    cache = CacheDir(layout.root)
    assert set(cache.scan().published) == {key}
    # Another model's manifest moved to this key's name: untrusted, not served as this model.
    manifest = layout.manifest_file(key)
    other = layout.manifest_file(storage_key("hf://a/b"))
    manifest.rename(other)
    (layout.models / key).rename(layout.models / other.stem)
    assert cache.scan().untrusted == (other.stem,)
    other.rename(manifest)
    (layout.models / other.stem).rename(layout.models / key)
    # A file the manifest does not name: someone's, foreign (never deleted).
    (layout.models / key).chmod(0o755)
    (layout.models / key / "extra.txt").write_text("mine")
    scan = cache.scan()
    assert scan.foreign == (key,) and not scan.published
    assert not cache.delete(key) and (layout.models / key / "extra.txt").exists()


def test_force_never_deletes_a_cache_another_pull_or_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _src(tmp_path, "h", b"x" * 10)
    parent = tmp_path / "parent"
    _cache(parent)
    err = _exit_2_one_line(["pull", str(src), str(parent), "--quiet", "--force"], capsys)
    assert "even with --force" in err
    assert (parent / "cache" / ".modelcache" / "format").exists()
    pulls = tmp_path / "pulls"
    assert main(["pull", str(src), str(pulls / "m"), "--quiet"]) == 0
    _exit_2_one_line(["pull", str(src), str(pulls), "--quiet", "--force"], capsys)
    assert (pulls / "m" / "f.bin").exists()
    err = _exit_2_one_line(["pull", str(src), str(src / "inner"), "--quiet", "--force"], capsys)
    assert "overlap" in err
    err = _exit_2_one_line(["pull", str(src), str(tmp_path), "--quiet", "--force"], capsys)
    assert (src / "f.bin").exists()


def test_staging_manifests_and_locks_have_their_own_names_and_the_old_layout_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _src(tmp_path, "h", b"x" * 10)
    out = tmp_path / "out"
    assert main(["pull", str(src), str(out / "d"), "--quiet"]) == 0
    assert main(["pull", str(src), str(out / "d.json"), "--quiet"]) == 0
    pull = out / ".modelcache" / "pull"
    assert sorted(os.listdir(pull / "manifests")) == ["d.json", "d.json.json"]
    assert sorted(os.listdir(pull / "locks")) == ["d.json.lock", "d.lock"]
    # A model published by an earlier version (flat pull/<name>.json) is still ours, up to date.
    (pull / "manifests" / "d.json").rename(pull / "d.json")
    capsys.readouterr()
    assert main(["pull", str(src), str(out / "d"), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out
