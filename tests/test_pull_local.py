"""`modelcache pull` from local folders and archives: layout, atomic publish, up-to-date, safety."""

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from agent.download.unpack import unpack
from localmodel.errors import UnsafePath
from localmodel.manifest import Manifest
from modelcache.cli import main
from tests.support.hfhub import Hub


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
    manifest = Manifest.read(tmp_path / "out" / ".modelcache" / "pull" / "manifests" / "model.json")
    assert {f.path: f.sha256 for f in manifest.files} == {
        p: hashlib.sha256(b).hexdigest() for p, b in _tree(src).items()
    }
    # Nothing but the model itself in the destination folder; staging is gone.
    assert not (tmp_path / "out" / ".modelcache" / "pull" / "staging" / "model").exists()

    assert main(["pull", f"file://{src}", str(dest), "--quiet"]) == 0
    again = capsys.readouterr().out
    assert " bytes, 0 transferred)" in again and "up to date" in again


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
        (["pull", "oci://registry/model:v1", "/tmp/x"], "oci:// sources are not supported"),
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


# -- never delete what is not ours (13 §0) -------------------------------------------------------


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_folder_of_the_users_files_is_refused_then_replaced_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _model(tmp_path)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("years of work")
    (dest / "sub").mkdir()
    (dest / "sub" / "data.csv").write_text("1,2")
    err = _one_line_exit_2(["pull", str(src), str(dest), "--quiet"], capsys)
    assert f"{dest} holds a folder of 2 entries that modelcache did not publish" in err
    assert "--force" in err and "new or empty folder" in err
    assert (dest / "thesis.tex").read_text() == "years of work"
    assert (dest / "sub" / "data.csv").read_text() == "1,2"
    assert not (tmp_path / ".modelcache" / "pull" / "staging" / "mine").exists()  # nothing staged either

    assert main(["pull", str(src), str(dest), "--quiet", "--force"]) == 0
    assert _tree(dest) == _tree(src)


def test_a_regular_file_and_a_link_as_dest_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _model(tmp_path)
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    err = _one_line_exit_2(["pull", str(src), str(file), "--quiet"], capsys)
    assert "holds a file of 7 bytes" in err
    assert file.read_text() == "keep me"
    target = tmp_path / "target"
    target.mkdir()
    (target / "x").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    err = _one_line_exit_2(["pull", str(src), str(link), "--quiet"], capsys)
    assert "holds a symbolic link" in err
    assert link.is_symlink() and (target / "x").read_text() == "x"


@pytest.mark.parametrize("where", ["", "   ", "/", "~", "cache", "cache/models", "cache/.modelcache"])
def test_folders_that_are_never_a_models_are_usage_errors(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _model(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "important.txt").write_text("keep")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("keep")
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / ".modelcache" / "manifests").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    dest = {"~": str(home), "cache": str(tmp_path / "cache")}.get(where, where)
    if where.startswith("cache/"):
        dest = str(tmp_path / where)
    err = _one_line_exit_2(["pull", str(src), dest, "--quiet"], capsys)
    assert "DEST:" in err
    assert (work / "important.txt").read_text() == "keep"
    assert (home / ".bashrc").read_text() == "keep"
    assert (tmp_path / "cache" / "models").is_dir() and (tmp_path / "cache" / ".modelcache").is_dir()


def test_an_empty_folder_is_filled_and_ours_is_updated(tmp_path: Path) -> None:
    src = _model(tmp_path)
    dest = tmp_path / "empty"
    dest.mkdir()
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    assert _tree(dest) == _tree(src)
    (src / "config.json").write_text('{"a": 22}')
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    assert (dest / "config.json").read_text() == '{"a": 22}'


def test_published_model_is_read_only_on_disk(tmp_path: Path) -> None:
    src = _model(tmp_path)
    dest = tmp_path / "out" / "model"
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    for path in [dest, *dest.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o555 if path.is_dir() else 0o444), (path, oct(mode))
    # Replaced by a new revision and deleted through our own code all the same.
    (src / "nested" / "new.txt").write_text("new")
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    assert (dest / "nested" / "new.txt").read_text() == "new"
    assert not list((tmp_path / "out" / ".modelcache" / "trash").iterdir())


def test_a_dest_named_models_can_be_pulled_again(tmp_path: Path) -> None:
    src = _model(tmp_path)
    dest = tmp_path / "work" / "models"
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0
    assert main(["pull", str(src), str(dest), "--quiet"]) == 0  # .modelcache/pull beside it is ours
    assert _tree(dest) == _tree(src)


async def test_a_full_disk_is_exit_1_with_one_line(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/big", {"config.json": b"{}", "w.bin": os.urandom(3 << 20)})
    small = tmp_path / "small"
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.decode().strip()}")
    try:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "modelcache"),
            "pull",
            "hf://org/big",
            str(small / "model"),
            "--quiet",
            stderr=asyncio.subprocess.PIPE,
        )
        _, raw = await asyncio.wait_for(proc.communicate(), 60)
        err = raw.decode()
        assert proc.returncode == 1
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "no space left" in err
        assert f"DEST's filesystem ({small})" in err and "the cache's" not in err  # 13 §13
        assert not (small / "model").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)
