"""`modelcache pull` from local folders and archives: layout, atomic publish, up-to-date, safety."""

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from agent.download.unpack import unpack
from localmodel.errors import UnsafePath
from localmodel.manifest import Manifest
from modelcache.cli import main


def _model(root: Path) -> Path:
    src = root / "src" / "model"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "nested" / "deeper" / "w.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    (src / "empty.txt").write_bytes(b"")
    return src


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pull_copies_layout_then_is_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _model(tmp_path)
    dest = tmp_path / "out" / "model"
    assert main(["pull", f"file://{src}", str(dest), "--quiet"]) == 0
    assert _tree(dest) == _tree(src)
    out = capsys.readouterr().out
    # A folder gives no hash: checked by size, never called "verified", and each file's sha256 as
    # copied is recorded, so a later re-verify detects a flipped byte.
    assert "3 files" in out and "verified" not in out
    assert "3 checked by size only (config.json, empty.txt, nested/deeper/w.bin)" in out
    manifest = Manifest.read(tmp_path / "out" / ".modelcache" / "pull" / "model.json")
    assert {f.path: f.sha256 for f in manifest.files} == {
        p: hashlib.sha256(b).hexdigest() for p, b in _tree(src).items()
    }
    # Nothing but the model itself in the destination folder; staging is gone.
    assert not (tmp_path / "out" / ".modelcache" / "pull" / "model").exists()

    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    again = capsys.readouterr().out
    assert "(0 transferred)" in again and "up to date" in again


def test_a_file_removed_at_the_source_is_not_kept(tmp_path: Path) -> None:
    src = _model(tmp_path)
    dest = tmp_path / "out" / "model"
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    (src / "config.json").unlink()
    (src / "new.txt").write_text("new")
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    assert _tree(dest) == _tree(src)
    assert not (dest / "config.json").exists()


def test_symlink_escaping_the_source_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _model(tmp_path)
    (tmp_path / "secret").write_text("secret")
    (src / "link").symlink_to(tmp_path / "secret")
    dest = tmp_path / "out" / "model"
    assert main(["pull", str(src), str(dest), "--quiet"]) == 1
    assert "symlink" in capsys.readouterr().err
    assert not dest.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull", "gs://bucket/model", "/tmp/x"], "scheme 'gs' is not supported"),
        (["pull", "hf://only-name", "/tmp/x"], "hf://OWNER/REPO"),
        (["pull", "s3://bucket/m", "/tmp/x", "--revision", "v1"], "hf:// sources only"),
        (["pull", "/tmp/a", "/tmp/x", "--max-bandwidth", "fast"], "--max-bandwidth"),
        (["pull", "/tmp/a", "/tmp/x", "--concurrency", "0"], "--concurrency"),
        (["pull", "/tmp/a"], "required"),
        (["pull", "/tmp/a", "/tmp/x", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_source_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", str(tmp_path / "nope"), str(tmp_path / "out"), "--quiet"]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> None:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)


def _member(name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    return m


@pytest.mark.parametrize(
    "members",
    [
        [_member("ok.txt"), _member("../evil.txt")],
        [_member("/etc/evil.txt")],
        [_member("a/../../evil.txt")],
        [_member("link", kind=tarfile.SYMTYPE, link="/etc/passwd")],
        [_member("d/link", kind=tarfile.SYMTYPE, link="../../outside")],
        [_member("hard", kind=tarfile.LNKTYPE, link="../outside")],
        [_member("dev", kind=tarfile.CHRTYPE)],
    ],
)
def test_hostile_tar_members_are_refused_and_nothing_escapes(
    tmp_path: Path, members: list[tarfile.TarInfo]
) -> None:
    archive = tmp_path / "m.tar.gz"
    _tar(archive, members)
    into = tmp_path / "stage" / "files"
    with pytest.raises(UnsafePath):
        unpack(archive, into, archive_type=".tar.gz", source="http://h/m.tar.gz")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "stage" / "evil.txt").exists()


def test_good_tar_with_inner_symlink_unpacks(tmp_path: Path) -> None:
    archive = tmp_path / "m.tar.gz"
    _tar(archive, [_member("model/w.bin"), _member("model/alias.bin", kind=tarfile.SYMTYPE, link="w.bin")])
    into = tmp_path / "files"
    unpack(archive, into, archive_type=".tar.gz", source="x")
    assert (into / "model" / "w.bin").read_bytes() == b"x"
    assert (into / "model" / "alias.bin").read_bytes() == b"x"


@pytest.mark.parametrize("name", ["../evil.txt", "/abs.txt", "a/../../evil.txt"])
def test_hostile_zip_names_are_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok.txt", "ok")
        z.writestr(name, "evil")
    with pytest.raises(UnsafePath):
        unpack(archive, tmp_path / "files", archive_type=".zip", source="x")
    assert not (tmp_path / "files" / "ok.txt").exists()
