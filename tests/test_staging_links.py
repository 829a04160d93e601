"""No link below the staging folder is followed (a resume of a staging folder someone planted links
in), and a file source swapped for a link after its listing is never read through it. Both for the
agent and `modelcache pull` (the same Destination and engine), every source."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent.download.journal import FileProgress, Progress
from agent.download.listing import Listing
from agent.download.pull import http_client, pull
from agent.download.source_settings import SourceSettings
from agent.download.sources import list_source
from agent.download.staging import Destination, check_tree
from agent.download.transfer import TransferSettings
from localmodel.errors import UnsafePath
from localmodel.layout import CacheLayout, storage_key
from localmodel.uri import parse_uri
from tests.support.httpfiles import HttpFiles

MiB = 1 << 20
SETTINGS = TransferSettings(chunk_size=MiB, backoff_initial=0.01, backoff_max=0.05, attempts=2)


async def _listing(uri: str, sources: SourceSettings) -> Listing:
    client = http_client(SETTINGS)
    try:
        return await list_source(parse_uri(uri), settings=sources, client=client)
    finally:
        client.close()


def _stage(dest: Destination, listing: Listing, path: str, data: bytes, *, verified: bool) -> None:
    """A staging folder as an interrupted download leaves it: the file's first chunk (or, verified,
    all of it) recorded as durable."""
    target = dest.staging / "files" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[:MiB] + b"\0" * (len(data) - MiB) if not verified else data)
    fp = FileProgress(len(data), None, None, None, chunks={0} if not verified else set(), verified=verified)
    Progress(listing.revision, MiB, {path: fp}).save(dest.staging / "progress.json")


@pytest.mark.parametrize(
    ("scheme", "link_at"),
    [("http", "w.bin"), ("file", "w.bin"), ("file", "sub")],
    ids=["http", "file", "folder"],
)
@pytest.mark.parametrize("verified", [False, True], ids=["partial", "verified"])
@pytest.mark.parametrize("kind", ["pull", "cache"])
async def test_a_link_planted_below_files_is_refused_and_nothing_outside_changes(
    plain_http: HttpFiles, tmp_path: Path, scheme: str, link_at: str, verified: bool, kind: str
) -> None:
    data = os.urandom(4 * MiB)
    path = "w.bin" if link_at == "w.bin" else "sub/w.bin"
    if scheme == "http":
        plain_http.add(f"/{path}", data)
        uri = f"{plain_http.url}/{path}"
    else:
        src = tmp_path / "src"
        (src / path).parent.mkdir(parents=True)
        (src / path).write_bytes(data)
        uri = f"file://{src}"
    if kind == "pull":
        dest = Destination.for_folder(tmp_path / "out" / "m")
    else:
        dest = Destination.in_cache(CacheLayout(tmp_path / "cache"), storage_key(uri))
    sources = SourceSettings()
    listing = await _listing(uri, sources)
    _stage(dest, listing, path, data, verified=verified)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "w.bin"
    victim.write_bytes(b"\0" * len(data))
    planted = dest.staging / "files" / link_at
    shutil.rmtree(planted) if planted.is_dir() else planted.unlink()
    planted.symlink_to(victim if link_at == "w.bin" else outside)

    with pytest.raises(UnsafePath, match="symbolic link"):
        await pull(parse_uri(uri), dest, sources=sources, transfer=SETTINGS)
    assert victim.read_bytes() == b"\0" * len(data)  # not a byte written through the link
    assert not os.path.lexists(dest.final) and not dest.manifest.exists()
    assert planted.is_symlink()  # reported, not deleted through either
    # Once the link is gone, the same download resumes and publishes.
    planted.unlink()
    await pull(parse_uri(uri), dest, sources=sources, transfer=SETTINGS)
    assert (dest.final / path).read_bytes() == data


async def test_file_source_swapped_for_a_link_after_listing_is_not_read(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed" / "m"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "w.bin").write_bytes(b"model" * 1000)
    (allowed / "sub" / "x.bin").write_bytes(b"sub" * 1000)
    secret = tmp_path / "secret"
    (secret / "sub").mkdir(parents=True)
    (secret / "w.bin").write_bytes(b"S" * 5000)  # same size: only the bytes differ
    (secret / "sub" / "x.bin").write_bytes(b"T" * 3000)
    sources = SourceSettings(file_prefixes=(str(tmp_path / "allowed"),))

    def swap_file(_: Listing) -> None:
        (allowed / "w.bin").unlink()
        (allowed / "w.bin").symlink_to(secret / "w.bin")

    def swap_folder(_: Listing) -> None:
        shutil.rmtree(allowed / "sub")
        (allowed / "sub").symlink_to(secret / "sub")

    for n, swap in enumerate((swap_file, swap_folder)):
        dest = Destination.for_folder(tmp_path / "out" / f"m{n}")
        with pytest.raises(UnsafePath, match="became a symbolic link after the listing"):
            await pull(parse_uri(f"file://{allowed}"), dest, sources=sources, transfer=SETTINGS, admit=swap)
        assert not os.path.lexists(dest.final)
        # restore for the next case
        for p in (allowed / "w.bin", allowed / "sub"):
            if p.is_symlink():
                p.unlink()
        (allowed / "w.bin").write_bytes(b"model" * 1000)
        (allowed / "sub").mkdir(exist_ok=True)
        (allowed / "sub" / "x.bin").write_bytes(b"sub" * 1000)
    # unswapped, it is copied
    dest = Destination.for_folder(tmp_path / "out" / "ok")
    await pull(parse_uri(f"file://{allowed}"), dest, sources=sources, transfer=SETTINGS)
    assert (dest.final / "w.bin").read_bytes() == b"model" * 1000


def test_check_tree_refuses_links_but_an_archives_inner_ones(tmp_path: Path) -> None:
    top = tmp_path / "files"
    (top / "d").mkdir(parents=True)
    (top / "w.bin").write_bytes(b"x")
    (top / "d" / "alias").symlink_to("../w.bin")
    with pytest.raises(UnsafePath):
        check_tree(top, inner_links=False)
    check_tree(top, inner_links=True)  # inside the tree: an archive may have it
    (top / "d" / "up").symlink_to("../..")  # resolves outside, though relative
    with pytest.raises(UnsafePath, match="d/up"):
        check_tree(top, inner_links=True)
    (top / "d" / "up").unlink()
    (top / "abs").symlink_to(top / "w.bin")  # absolute: would point elsewhere once renamed
    with pytest.raises(UnsafePath, match="abs"):
        check_tree(top, inner_links=True)


@pytest.mark.parametrize("archive", [False, True], ids=["files", "archive"])
def test_a_link_in_a_published_model_makes_it_untrusted_unless_an_archives_inner_one(
    tmp_path: Path, archive: bool
) -> None:
    from agent.disk import CacheDir
    from agent.download.staging import publish
    from localmodel.manifest import FileEntry, Manifest

    cache = CacheDir(tmp_path / "cache")
    cache.open()
    try:
        uri = "http://h/m.tar" if archive else "hf://org/m"
        key = storage_key(uri)
        dest = cache.destination(key)
        (dest.staging / "files").mkdir(parents=True)
        (dest.staging / "files" / "w.bin").write_bytes(b"w")
        # An archive's member that links inside the model is listed in the manifest (by its
        # target's size); from any other source a link is never published.
        (dest.staging / "files" / "inner").symlink_to("w.bin")
        entries = (FileEntry("inner", 1), FileEntry("w.bin", 1))
        if archive:
            (dest.staging / "archive").mkdir()  # what the engine unpacked from (see finish_publish)
            publish(dest, Manifest(uri, key, "rev", entries))
            assert key in cache.scan(verify=True).published
        else:
            with pytest.raises(UnsafePath):
                publish(dest, Manifest(uri, key, "rev", entries))
            (dest.staging / "files" / "inner").unlink()
            (dest.staging / "manifest.json").unlink(missing_ok=True)
            publish(dest, Manifest(uri, key, "rev", (FileEntry("w.bin", 1),)))
            assert key in cache.scan(verify=True).published
        secret = tmp_path / "secret"
        secret.write_text("s")
        dest.final.chmod(0o755)
        # A link planted later, pointing out: never trusted, never followed, never deleted through.
        (dest.final / "evil").symlink_to(secret)
        scan = cache.scan(verify=True)
        assert key not in scan.published and (key in scan.untrusted or key in scan.foreign)
        assert secret.read_text() == "s"
    finally:
        cache.close()


async def test_a_verified_archive_swapped_for_a_link_is_not_unpacked(
    plain_http: HttpFiles, tmp_path: Path
) -> None:
    import io
    import tarfile

    def tar_of(name: str, body: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
        return buf.getvalue()

    good = tar_of("w.bin", b"good" * 100)
    plain_http.add("/m.tar", good)
    uri = f"{plain_http.url}/m.tar"
    dest = Destination.for_folder(tmp_path / "out" / "m")
    sources = SourceSettings()
    listing = await _listing(uri, sources)
    archive = dest.staging / "archive" / "m.tar"
    archive.parent.mkdir(parents=True)
    fp = FileProgress(len(good), None, None, None, verified=True)
    Progress(listing.revision, MiB, {"m.tar": fp}).save(dest.staging / "progress.json")
    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_of("w.bin", b"evil" * 100))
    archive.symlink_to(evil)
    with pytest.raises(UnsafePath, match="symbolic link"):
        await pull(parse_uri(uri), dest, sources=sources, transfer=SETTINGS)
    assert not os.path.lexists(dest.final)
