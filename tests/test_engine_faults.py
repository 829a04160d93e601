"""The engine against hostile, slow and odd sources: wrong ranges, short bodies and 416s, trickling
servers, file names and disks the system refuses, folders on another filesystem. Nothing unchecked
is ever published, and every failure is one line of the error tree."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import PullResult, TransferSettings
from localmodel.errors import DiskFull, DownloadError, IntegrityError, PermissionDenied, TransientError
from localmodel.uri import parse_uri
from tests.support.hfhub import Hub
from tests.support.httpfiles import HttpFiles
from tests.support.s3files import S3Files

MiB = 1 << 20


async def run(uri: str, dest: Path, sources: SourceSettings | None = None, **kw: object) -> PullResult:
    settings = {"chunk_size": MiB, "backoff_initial": 0.01, "backoff_max": 0.05, "attempts": 2, **kw}
    return await pull(
        parse_uri(uri),
        Destination.for_folder(dest),
        sources=sources or SourceSettings.from_env(),
        transfer=TransferSettings(**settings),  # type: ignore[arg-type]
    )


def hub_settings(hub: Hub) -> SourceSettings:
    return SourceSettings(hf_endpoint=hub.endpoint)


def nothing_published(dest: Path) -> bool:
    return (
        not dest.exists()
        and not (dest.parent / ".modelcache" / "pull" / "manifests" / f"{dest.name}.json").exists()
    )


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelcache",
        "pull",
        *args,
        "--quiet",
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- 206 answers checked against the range asked -----------------------------------------------


async def test_hf_range_shifted_by_4k_is_retried_then_fails_unpublished(hf_hub: Hub, tmp_path: Path) -> None:
    body = os.urandom(3 * MiB + 5)
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w.bin": body})
    hf_hub.file("org/m", "w.bin").shift = 4096
    with pytest.raises(IntegrityError) as info:
        await run("hf://org/m", tmp_path / "m", hub_settings(hf_hub))
    assert str(info.value) == (
        "hf://org/m: w.bin: the server answered bytes=0-1048575 with Content-Range "
        "bytes 4096-1052671/3145733 and Content-Length 1048576 (2 attempts); "
        "the same after a second fetch from byte 0"
    )
    assert info.value.reason == "VerificationFailed"
    # The probe, on a fresh request each time, twice per fetch; the file fetched twice.
    gets = [r for r in hf_hub.requests if r.method == "GET" and r.path.endswith("/w.bin")]
    assert [r.range for r in gets] == ["bytes=0-1048575"] * 4
    assert len({r.port for r in gets}) == 4  # each on a new connection
    assert nothing_published(tmp_path / "m")


async def test_s3_range_shifted_is_never_published(s3files: S3Files, tmp_path: Path) -> None:
    bucket = s3files.bucket("models")
    s3files.put(bucket, "m/config.json", b"{}")
    s3files.put(bucket, "m/w.bin", os.urandom(3 * MiB + 5))  # a single-part ETag: an MD5 to check
    s3files.shift(bucket, "m/w.bin", 4096)
    with pytest.raises(
        IntegrityError, match=r"^s3://models/m: w\.bin: the server answered bytes=\d+-\d+ with "
    ):
        await run("s3://models/m", tmp_path / "m")
    ranges = [r.range for r in s3files.gets("m/w.bin")]
    assert all(ranges) and len(ranges) > len(set(ranges))  # ranged, and retried
    assert nothing_published(tmp_path / "m")


async def test_http_range_shifted_is_never_published(plain_http: HttpFiles, tmp_path: Path) -> None:
    plain_http.add("/w.bin", os.urandom(3 * MiB), shift=4096)
    with pytest.raises(
        IntegrityError, match=r"w\.bin: the server answered bytes=0-1048575 with Content-Range bytes 4096-"
    ):
        await run(f"{plain_http.url}/w.bin", tmp_path / "m")
    assert plain_http.gets("/w.bin") == ["bytes=0-1048575"] * 4
    assert nothing_published(tmp_path / "m")


async def test_http_200_to_a_later_range_is_never_written_at_its_offset(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    # The probe is answered 206, later ranges get the whole file with 200: a mismatch (the whole file
    # is never written at a range's offset), retried, then the file is fetched again from byte 0,
    # where a 200 is the whole file, as from a server without ranges.
    body = os.urandom(3 * MiB)
    plain_http.add("/w.bin", body, ranges_once=True)
    result = await run(f"{plain_http.url}/w.bin", tmp_path / "m")
    assert (tmp_path / "m" / "w.bin").read_bytes() == body
    gets = plain_http.gets("/w.bin")
    assert gets[0] == gets[-1] == "bytes=0-1048575"
    assert set(gets[1:-1]) <= {"bytes=1048576-2097151", "bytes=2097152-3145727"} and len(gets) >= 4
    assert result.size_only == 1


async def test_http_without_range_support_is_still_fetched_whole(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    # A 200 to the first range (the probe) means no range support: the one answer is the whole file.
    body = os.urandom(3 * MiB)
    plain_http.add("/w.bin", body, ranges_once=True)
    plain_http.files["/w.bin"].ranged_gets = 1  # every range answered 200
    result = await run(f"{plain_http.url}/w.bin", tmp_path / "m")
    assert (tmp_path / "m" / "w.bin").read_bytes() == body
    assert plain_http.gets("/w.bin") == ["bytes=0-1048575"]
    assert result.size_only == 1 and result.size_only_names == ("w.bin",)


# -- a body shorter than listed: an integrity error, fetched once more from byte 0 -------------------


async def test_short_page_instead_of_the_file_says_both_sizes(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo(
        "org/m", {"config.json": b'{"architectures": ["X"]}', "tokenizer.json": os.urandom(200_000)}
    )
    page = tmp_path / "error.html"
    page.write_bytes(b"<html>" + b"x" * 622 + b"</html>")
    hf_hub.file("org/m", "tokenizer.json").disk = page
    with pytest.raises(IntegrityError) as info:
        await run("hf://org/m", tmp_path / "m", hub_settings(hf_hub))
    assert str(info.value) == (
        "hf://org/m: tokenizer.json: the server sent 635 of the listed 200000 bytes; "
        "the same after a second fetch from byte 0"
    )
    gets = [r.range for r in hf_hub.requests if r.method == "GET" and r.path.endswith("tokenizer.json")]
    assert gets == [None, None]
    assert nothing_published(tmp_path / "m")


async def test_short_page_instead_of_a_ranged_file(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"w.safetensors": os.urandom(3 * MiB)})
    page = tmp_path / "error.html"
    page.write_bytes(b"<html>" + b"x" * 622 + b"</html>")
    hf_hub.file("org/m", "w.safetensors").disk = page
    with pytest.raises(IntegrityError) as info:
        await run("hf://org/m", tmp_path / "m", hub_settings(hf_hub))
    assert str(info.value) == (
        "hf://org/m: w.safetensors: the server has 635 of the listed 3145728 bytes (Content-Range "
        "bytes 0-634/635); the same after a second fetch from byte 0"
    )
    gets = [r.range for r in hf_hub.requests if r.method == "GET" and r.path.endswith("w.safetensors")]
    assert gets == ["bytes=0-1048575", "bytes=0-1048575"]
    assert nothing_published(tmp_path / "m")


async def test_unframed_short_body_then_416_says_both_sizes(plain_http: HttpFiles, tmp_path: Path) -> None:
    # No Content-Length: the end of the 635 bytes looks like a cut connection, so the engine resumes;
    # the 416 then shows the server's copy is shorter than listed.
    plain_http.add("/tokenizer.json", os.urandom(200_000), body=b"p" * 635, framed=False)
    with pytest.raises(IntegrityError) as info:
        await run(f"{plain_http.url}/tokenizer.json", tmp_path / "m")
    assert str(info.value) == (
        f"{plain_http.url}/tokenizer.json: tokenizer.json: the server sent 635 of the listed 200000 bytes "
        "and refuses the rest (HTTP 416); the same after a second fetch from byte 0"
    )
    assert plain_http.gets("/tokenizer.json") == [None, "bytes=635-199999", None, "bytes=635-199999"]
    assert nothing_published(tmp_path / "m")


async def test_short_page_cli_says_it_in_one_line(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"tokenizer.json": os.urandom(200_000)})
    page = tmp_path / "error.html"
    page.write_bytes(b"x" * 635)
    hf_hub.file("org/m", "tokenizer.json").disk = page
    code, out, err = await cli("hf://org/m", str(tmp_path / "m"), env={"HF_ENDPOINT": hf_hub.endpoint})
    assert code == 1 and out == ""
    assert err == (
        "modelcache pull: hf://org/m: tokenizer.json: the server sent 635 of the listed 200000 bytes; "
        "the same after a second fetch from byte 0; partial download kept in "
        f"{tmp_path / '.modelcache' / 'pull' / 'staging' / 'm'}; run the same command to resume\n"
    )


# -- the low-speed limit -------------------------------------------------------------------------


async def test_a_trickling_server_is_cut_off_and_retried_on_a_new_connection(
    hf_hub: Hub, tmp_path: Path
) -> None:
    hf_hub.add_repo("org/m", {"config.json": b"c" * 200})
    hf_hub.file("org/m", "config.json").rate = 1  # one byte a second
    with pytest.raises(TransientError) as info:
        await run("hf://org/m", tmp_path / "m", hub_settings(hf_hub), low_speed_limit=100, low_speed_time=1.0)
    assert re.fullmatch(
        r"hf://org/m: config\.json: slower than 100 B/s for 1 s \(after 2 attempts over \d+ s\)",
        str(info.value),
    ), str(info.value)
    gets = [r for r in hf_hub.requests if r.method == "GET" and r.path.endswith("config.json")]
    assert len(gets) == 2 and gets[0].port != gets[1].port
    assert nothing_published(tmp_path / "m")


async def test_the_bandwidth_cap_is_not_counted_as_slow(hf_hub: Hub, tmp_path: Path) -> None:
    body = os.urandom(300_000)
    hf_hub.add_repo("org/m", {"w.bin": body})
    # Capped at 100 kB/s by our own limiter, under a 200 kB/s low-speed limit: not the server's fault.
    await run(
        "hf://org/m",
        tmp_path / "m",
        hub_settings(hf_hub),
        max_bandwidth=100_000,
        low_speed_limit=200_000,
        low_speed_time=0.5,
    )
    assert (tmp_path / "m" / "w.bin").read_bytes() == body


def test_low_speed_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.pull_cli import build_parser
    from modelcache.cli import main

    args = build_parser().parse_args(["file:///x", "d", "--low-speed-limit", "2Ki", "--low-speed-time", "5"])
    assert (args.low_speed_limit, args.low_speed_time) == (2048, 5.0)
    defaults = build_parser().parse_args(["file:///x", "d"])
    assert (defaults.low_speed_limit, defaults.low_speed_time) == (1024, 30.0)
    assert main(["pull", "file:///x", str(tmp_path / "d"), "--low-speed-time", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "modelcache pull: --low-speed-time: '0' must be a positive number of seconds\n"


# -- OSErrors: one line naming the file, in the error tree --------------------------------------


async def test_a_300_character_name_is_one_line_exit_1(hf_hub: Hub, tmp_path: Path) -> None:
    name = "n" * 300 + ".json"
    hf_hub.add_repo("org/m", {"config.json": b"{}", name: b"{}"})
    code, out, err = await cli("hf://org/m", str(tmp_path / "m"), env={"HF_ENDPOINT": hf_hub.endpoint})
    assert code == 1 and out == ""
    staging = tmp_path / ".modelcache" / "pull" / "staging" / "m"
    assert err == (
        f"modelcache pull: hf://org/m: {name}: File name too long; partial download kept in {staging}; "
        "run the same command to resume\n"
    )
    assert nothing_published(tmp_path / "m")


@contextlib.contextmanager
def mounted(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


async def test_disk_full_is_diskfull_naming_the_file(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"w.bin": os.urandom(2 * MiB)})
    with mounted(tmp_path / "small", "size=1m") as small:
        with pytest.raises(DiskFull, match=r"^hf://org/m: w\.bin: no space left on DEST's filesystem"):
            await run("hf://org/m", small / "m", hub_settings(hf_hub))
        assert nothing_published(small / "m")


async def test_read_only_destination_is_permission_denied(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"w.bin": b"w"})
    with (
        mounted(tmp_path / "ro", "size=1m,ro") as ro,
        pytest.raises(PermissionDenied, match=r"the filesystem refused the write \(Read-only file system\)"),
    ):
        await run("hf://org/m", ro / "m", hub_settings(hf_hub))


# -- file:// from another filesystem ----------------------------------------------------------------


async def test_file_source_on_another_filesystem_is_copied(tmp_path: Path) -> None:
    files = {"config.json": b'{"a": 1}', "w/model.safetensors": os.urandom(3 * MiB + 11), "empty": b""}
    with mounted(tmp_path / "src", "size=16m") as src:
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        result = await run(f"file://{src}", tmp_path / "m")
    got = {
        p.relative_to(tmp_path / "m").as_posix(): p.read_bytes()
        for p in (tmp_path / "m").rglob("*")
        if p.is_file()
    }
    assert got == files
    assert result.bytes_transferred == sum(map(len, files.values()))
    manifest = Destination.for_folder(tmp_path / "m").published()
    assert manifest is not None
    assert {e.path: e.sha256 for e in manifest.files} == {
        p: hashlib.sha256(d).hexdigest() for p, d in files.items()
    }


async def test_a_vanished_local_file_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    from agent.download.engine import Transfer
    from agent.download.listing import Listing, RemoteFile
    from agent.download.pull import http_client

    listing = Listing(
        source=f"file://{src}",
        revision=None,
        files=(RemoteFile(path="a.bin", size=1, local_path=str(src / "gone.bin")),),
    )
    settings = TransferSettings()
    client = http_client(settings)
    try:
        transfer = Transfer(
            listing,
            Destination.for_folder(tmp_path / "m"),
            uri=f"file://{src}",
            storage_key="k",
            client=client,
            settings=settings,
        )
        with pytest.raises(DownloadError, match=r"a\.bin vanished during the copy"):
            await transfer.run()
    finally:
        client.close()
