"""`modelcache pull` of a 3 GiB S3 object in 64 MiB ranges, from the sendfile S3 server (s3files).

The object is a sparse file on the server's side (it costs no disk there), with random marks
straddling every chunk boundary so that a range written at the wrong offset changes the sha256. The
downloaded copy is really written (3 GiB on the disk of the test's temporary folder, removed at the
end); the tests skip when that disk has less than 8 GiB free.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localmodel.manifest import Manifest
from tests.support.s3files import S3Files

pytestmark = pytest.mark.slow

MiB = 1 << 20
GiB = 1 << 30
SIZE = 3 * GiB
CHUNK = 64 * MiB
CHUNKS = SIZE // CHUNK  # 48
MARK = 4096
KEY = "llama/model.safetensors"


@dataclass(frozen=True)
class BigObject:
    path: Path
    sha256: str
    marks: dict[int, bytes]  # offset -> bytes; zeros everywhere else


def _sha256_of(marks: dict[int, bytes]) -> str:
    """The object's sha256 from memory (reading a sparse file back is slower than hashing zeros)."""
    h, zeros, pos = hashlib.sha256(), memoryview(bytes(16 * MiB)), 0
    for offset, data in [*sorted(marks.items()), (SIZE, b"")]:
        while pos < offset:
            n = min(len(zeros), offset - pos)
            h.update(zeros[:n])
            pos += n
        h.update(data)
        pos += len(data)
    return h.hexdigest()


@pytest.fixture(scope="module")
def big_object(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigObject]:
    root = tmp_path_factory.mktemp("s3large")
    free = shutil.disk_usage(root).free
    if free < 8 * GiB:
        pytest.skip(f"needs 8 GiB free under {root} for a 3 GiB download, has {free / GiB:.1f} GiB")
    # A mark straddles every chunk boundary: a range written at the wrong offset, or not at all, shows.
    marks = {min(max(0, i * CHUNK - MARK // 2), SIZE - MARK): os.urandom(MARK) for i in range(CHUNKS + 1)}
    path = root / "model.safetensors"
    with path.open("wb") as fh:
        fh.truncate(SIZE)  # sparse: zeros that take no disk
        for offset, data in marks.items():
            fh.seek(offset)
            fh.write(data)
    try:
        yield BigObject(path, _sha256_of(marks), marks)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    """Where the pull goes; removed after the test (pytest keeps old tmp folders, 3 GiB each)."""
    yield tmp_path / "out" / "model"
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def _serve(s3files: S3Files, big: BigObject, *, small: bool = False) -> None:
    bucket = s3files.bucket("models")
    target = s3files.path(bucket, KEY)
    try:
        os.link(big.path, target)
    except OSError:
        target.symlink_to(big.path)
    s3files.describe(bucket, KEY, sha256=big.sha256)
    if small:
        s3files.put(bucket, "llama/config.json", b'{"architectures": ["LlamaForCausalLM"]}')


def _argv(uri: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "modelcache", "pull", uri, str(dest), "--quiet", "--chunk-size", "64Mi"]


def _expected_ranges(chunks: set[int]) -> set[str]:
    return {f"bytes={i * CHUNK}-{min((i + 1) * CHUNK, SIZE) - 1}" for i in chunks}


def _assert_really_written(path: Path, big: BigObject) -> None:
    st = path.stat()
    assert st.st_size == SIZE
    assert st.st_blocks * 512 >= SIZE, "the downloaded file is sparse: bytes were not written"
    with path.open("rb") as fh:
        for offset, data in big.marks.items():
            fh.seek(offset)
            assert fh.read(len(data)) == data, f"wrong bytes at {offset}"


async def test_3gib_object_in_64mi_ranges_verified_by_sha256(
    s3files: S3Files, big_object: BigObject, out: Path
) -> None:
    _serve(s3files, big_object)
    proc = await asyncio.create_subprocess_exec(
        *_argv(f"s3://models/{KEY}", out), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0, stdout
    assert f"1 file, {SIZE / 1e6:.1f} MB ({SIZE} bytes, {SIZE} transferred)" in stdout.decode()

    gets = s3files.gets(KEY)
    assert all(r.range for r in gets) and all(r.presigned for r in gets)
    assert {r.range for r in gets} == _expected_ranges(set(range(CHUNKS)))
    assert CHUNKS <= len(gets) <= CHUNKS + 2  # 48 ranged GETs (a retry or two would be tolerated)
    # The single-object listing is one HeadObject, which offered the full-object SHA256.
    assert [r.method for r in s3files.requests if r.method != "GET"] == ["HEAD"]

    published = out / "model.safetensors"
    _assert_really_written(published, big_object)
    # The engine hashed the file it wrote and matched the announced SHA256; the manifest says so.
    manifest = Manifest.read(out.parent / ".modelcache" / "pull" / "manifests" / "model.json")
    (entry,) = manifest.files
    assert (entry.path, entry.size, entry.sha256) == ("model.safetensors", SIZE, big_object.sha256)


async def test_3gib_object_sigkill_then_resume_fetches_only_missing_ranges(
    s3files: S3Files, big_object: BigObject, out: Path
) -> None:
    _serve(s3files, big_object, small=True)
    served = 20
    s3files.hold("models", KEY, after=served)  # the other ranges hang until the process is killed
    argv = _argv("s3://models/llama", out)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    progress = out.parent / ".modelcache" / "pull" / "staging" / "model" / "progress.json"
    done: set[int] = set()
    for _ in range(600):
        await asyncio.sleep(0.05)
        if progress.exists():
            done = set(
                json.loads(progress.read_text())["files"].get("model.safetensors", {}).get("chunks", [])
            )
            if len(done) >= served:
                break
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    done = set(json.loads(progress.read_text())["files"]["model.safetensors"]["chunks"])
    first = {int((r.range or "=0").split("=")[1].split("-")[0]) // CHUNK for r in s3files.gets(KEY)}
    assert len(done) == served and done <= first and not out.exists()

    s3files.release()
    s3files.requests.clear()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    assert await proc.wait() == 0

    again = [r.range for r in s3files.gets(KEY)]
    assert sorted(r or "" for r in again) == sorted(_expected_ranges(set(range(CHUNKS)) - done))
    published = out / "model.safetensors"
    _assert_really_written(published, big_object)
    assert (out / "config.json").read_bytes() == b'{"architectures": ["LlamaForCausalLM"]}'
    # A prefix listing names the checksum algorithm only; the engine asked HeadObject for the big
    # file's full-object SHA256 and verified it; the marks across every chunk boundary (checked
    # above) show each range of either run landed where it belongs.
    assert any(r.method == "HEAD" and r.key == KEY for r in s3files.requests)
