"""What a source holds, refused in one line for every source (13 §6, §7, §8, §10): archive members
with control or bidi characters, a model with no files, a hub that does not answer with its API, an
archive that is not one."""

import asyncio
import io
import sys
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from agent.download.unpack import unpack
from localmodel.errors import SourceNotFound, UnsafePath
from tests.support.hfhub import Hub


def _tar(path: Path, names: list[str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


@pytest.mark.parametrize("name", ["evil\nINFO fake.txt", "gpj.\u202etxt", "ok/\x1b[2Jx"])
def test_archive_members_with_control_or_bidi_characters_are_unsafe(tmp_path: Path, name: str) -> None:
    _tar(tmp_path / "a.tar.gz", ["good.txt", name])
    with pytest.raises(UnsafePath, match="control or bidirectional"):
        unpack(tmp_path / "a.tar.gz", tmp_path / "files", archive_type=".tar.gz", source="s")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("good.txt", b"x")
        z.writestr(name, b"x")
    with pytest.raises(UnsafePath, match="control or bidirectional"):
        unpack(tmp_path / "a.zip", tmp_path / "files", archive_type=".zip", source="s")
    assert not (tmp_path / "files").exists()


def test_an_archive_without_files_is_not_a_model(tmp_path: Path) -> None:
    _tar(tmp_path / "empty.tar.gz", [])
    with pytest.raises(SourceNotFound, match="holds no files"):
        unpack(tmp_path / "empty.tar.gz", tmp_path / "files", archive_type=".tar.gz", source="s")
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    with pytest.raises(SourceNotFound, match="holds no files"):
        unpack(tmp_path / "empty.zip", tmp_path / "files", archive_type=".zip", source="s")


async def _exit_1_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Exit 1 with one line on stderr; in a process of its own, as a user runs it (the servers of
    this test answer from this process's loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", *argv, stderr=asyncio.subprocess.PIPE
    )
    _, raw = await asyncio.wait_for(proc.communicate(), 120)
    err = raw.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


async def test_an_empty_hf_repo_or_folder_is_not_found(
    hf_hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_hub.add_repo("org/empty", {})
    err = await _exit_1_one_line(["pull", "hf://org/empty", str(tmp_path / "d"), "--quiet"], capsys)
    assert "holds no files" in err and not (tmp_path / "d").exists()
    (tmp_path / "src").mkdir()
    err = await _exit_1_one_line(["pull", str(tmp_path / "src"), str(tmp_path / "e"), "--quiet"], capsys)
    assert "empty" in err and not (tmp_path / "e").exists()


@pytest_asyncio.fixture
async def portal(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A server answering 200 with an HTML page to everything (a captive portal, a login page); with
    a 12-byte text file named like an archive."""

    async def page(request: web.Request) -> web.Response:
        if request.path.endswith(".tar.gz"):
            return web.Response(body=b"hello world\n", content_type="application/octet-stream")
        return web.Response(text="<html>sign in</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield url
    await runner.cleanup()


async def test_a_hub_answering_html_is_named(
    portal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = await _exit_1_one_line(["pull", "hf://org/model", str(tmp_path / "d"), "--quiet"], capsys)
    assert (
        f"the hub at {portal} answered with something that is not its JSON API (HTTP 200, text/html)" in err
    )
    assert "check HF_ENDPOINT or the proxy" in err


async def test_a_file_that_is_not_an_archive_is_one_line(
    portal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = await _exit_1_one_line(
        ["pull", f"{portal}/notarchive.tar.gz", str(tmp_path / "d"), "--quiet"], capsys
    )
    assert "not a valid .tar.gz archive: its content is none of gzip, bzip2, xz or tar" in err
