"""Archives may not unpack past their cap (13 §5a): the declared modelSize, the free space and a
compression-ratio limit; declared sizes are checked before writing and bytes are counted while
writing; a refused extraction gives its space back. Zip and tar, through `pull` and `unpack`."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from agent.download.unpack import MAX_RATIO, unpack
from localmodel.errors import DiskFull, DownloadError, IntegrityError
from localmodel.uri import parse_uri
from tests.test_pull_s3_http import Files, http_files, run, targz

__all__ = ["http_files"]  # the fixture, used by name

MiB = 1 << 20


def zip_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z,
        z.open("zeros.bin", "w", force_zip64=True) as out,
    ):
        block = bytes(MiB)
        for _ in range(size // MiB):
            out.write(block)
    return buf.getvalue()


async def capped(uri: str, dest: Path, max_bytes: int) -> object:
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(chunk_size=MiB, backoff_initial=0.01),
        max_bytes=max_bytes,
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


async def test_zip_bomb_is_refused_before_writing(http_files: Files, tmp_path: Path) -> None:
    bomb = zip_bomb(200 * MiB)
    assert len(bomb) * MAX_RATIO < 200 * MiB  # about 200 KB: a ratio near 1000:1
    http_files.bodies["/m.zip"] = bomb
    dest = tmp_path / "out" / "m"
    with pytest.raises(IntegrityError) as info:
        await run(f"{http_files.url}/m.zip", dest)
    message = str(info.value)
    assert "declares 200.0 MiB, more than 200 times the archive's " in message
    assert "\n" not in message
    assert not dest.exists()
    staged = tmp_path / "out" / ".modelcache" / "pull" / "staging" / "m"
    assert not (staged / "files").exists()  # nothing unpacked is left


async def test_declared_model_size_caps_the_archive(http_files: Files, tmp_path: Path) -> None:
    members = {"w.bin": os.urandom(300 * 1024)}
    http_files.bodies["/m.tar.gz"] = targz(members)
    with pytest.raises(
        IntegrityError, match=r"declares 300\.0 KiB, more than the declared modelSize 100\.0 KiB"
    ):
        await capped(f"{http_files.url}/m.tar.gz", tmp_path / "a", 100 * 1024)
    assert not (tmp_path / "a").exists()
    await capped(f"{http_files.url}/m.tar.gz", tmp_path / "b", 400 * 1024)
    assert (tmp_path / "b" / "w.bin").read_bytes() == members["w.bin"]


def test_tar_whose_header_lies_writes_only_what_it_declares(tmp_path: Path) -> None:
    # The header says 100 bytes and 8 MiB of data follow it: the reader honours the header and the
    # byte count keeps what is written to it; the rest never lands.
    data = os.urandom(8 * MiB)
    info = tarfile.TarInfo("w.bin")
    info.size = 100
    archive = tmp_path / "lying.tar"
    archive.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(1024))
    into = tmp_path / "into"
    unpack(archive, into, archive_type=".tar", source="s", limit=1024)
    assert [p.name for p in into.iterdir()] == ["w.bin"]
    assert (into / "w.bin").read_bytes() == data[:100]


def test_tar_bomb_is_refused_before_writing(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 100 * MiB
        tar.addfile(info, io.BytesIO(bytes(100 * MiB)))
    into = tmp_path / "into"
    with pytest.raises(IntegrityError, match=r"declares 100\.0 MiB, more than 200 times the archive's"):
        unpack(archive, into, archive_type=".tar.gz", source="s")
    assert not into.exists()


def test_truncated_tar_is_invalid_and_leaves_nothing(tmp_path: Path) -> None:
    info = tarfile.TarInfo("w.bin")
    info.size = 4 << 30  # 4 GiB declared, a few bytes present
    archive = tmp_path / "huge.tar"
    archive.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 512 + bytes(1024))
    into = tmp_path / "into"
    with pytest.raises(DownloadError, match=r"not a valid \.tar archive: unexpected end of data"):
        unpack(archive, into, archive_type=".tar", source="s")
    assert not into.exists()


def test_zip_whose_directory_lies_about_the_size_is_refused(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.bin", data)
    raw = bytearray(buf.getvalue())
    # Both the local header and the central directory say 100 bytes: the CRC then fails.
    local = raw.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, 100)
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 100)
    archive = tmp_path / "lying.zip"
    archive.write_bytes(bytes(raw))
    into = tmp_path / "into"
    with pytest.raises(DownloadError, match=r"not a valid \.zip archive"):
        unpack(archive, into, archive_type=".zip", source="s")
    assert not into.exists()


def test_archive_over_the_free_space_is_disk_full_and_gives_the_space_back(
    small_fs: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(targz({"w.bin": os.urandom(6 * MiB)}))
    with pytest.raises(DiskFull, match="free on the cache's filesystem"):
        unpack(archive, small_fs / "files", archive_type=".tar.gz", source="s")
    assert not (small_fs / "files").exists()
    assert shutil.disk_usage(small_fs).used < MiB
