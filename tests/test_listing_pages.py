"""Every listing ends: a server that repeats a page token, or pages without end, is refused with one
line naming the source (issue 19's attack on gs:// and Azure, and the same kind on hf and s3)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from agent.download.azure import AzureSettings, list_azure
from agent.download.gcs import GcsSettings, list_gcs
from agent.download.hf import list_hf
from agent.download.listing import paged
from agent.download.source_settings import SourceSettings
from localmodel.errors import DownloadError, TransientError
from localmodel.uri import parse_uri
from tests.support.pagers import Pager


@pytest.fixture
def pager(request: pytest.FixtureRequest) -> Iterator[Pager]:
    server = Pager(request.param)
    yield server
    server.close()


LOOP = pytest.mark.parametrize("pager", ["loop"], indirect=True)
ENDLESS = pytest.mark.parametrize("pager", ["endless"], indirect=True)


@LOOP
def test_gcs_repeated_page_token_is_refused(pager: Pager) -> None:
    settings = GcsSettings(endpoint=pager.endpoint, emulator=True)
    with pytest.raises(DownloadError) as caught:
        list_gcs(parse_uri("gs://bkt/m"), settings, connect_timeout=5, read_timeout=5)
    assert type(caught.value) is DownloadError  # not transient: never retried
    assert str(caught.value) == (
        "the listing of gs://bkt/m repeats page token 'T0'; the server is not following the protocol"
    )
    pages = [a for a in pager.asked if "/o?" in a]
    assert len(pages) == 2 and pages[1].startswith("GET /storage/v1/b/bkt/o?pageToken=T0&"), pager.asked


@ENDLESS
def test_gcs_endless_pages_end_at_the_deadline(pager: Pager) -> None:
    settings = GcsSettings(endpoint=pager.endpoint, emulator=True)
    with pytest.raises(TransientError, match=r"^gs://bkt/m: no whole listing within 1 s \(\d+ pages\)$"):
        list_gcs(parse_uri("gs://bkt/m"), settings, connect_timeout=5, read_timeout=5, deadline=1.0)
    assert len([a for a in pager.asked if "/o?pageToken=" in a]) > 2, pager.asked


@LOOP
def test_azure_repeated_marker_is_refused(pager: Pager) -> None:
    settings = AzureSettings(endpoint=f"{pager.endpoint}/acct")
    uri = parse_uri("https://acct.blob.core.windows.net/cont/m")
    with pytest.raises(DownloadError) as caught:
        list_azure(uri, settings, connect_timeout=5, read_timeout=5)
    assert type(caught.value) is DownloadError
    assert str(caught.value) == (
        f"the listing of {uri.redacted()} repeats page token 'T0'; the server is not following the protocol"
    )


@ENDLESS
def test_azure_endless_markers_end_at_the_deadline(pager: Pager) -> None:
    settings = AzureSettings(endpoint=f"{pager.endpoint}/acct")
    uri = parse_uri("https://acct.blob.core.windows.net/cont/m")
    with pytest.raises(TransientError, match=r"no whole listing within 1 s"):
        list_azure(uri, settings, connect_timeout=5, read_timeout=5, deadline=1.0)


@LOOP
def test_hf_repeated_next_link_is_refused(pager: Pager) -> None:
    settings = SourceSettings(hf_endpoint=pager.endpoint, read_timeout=5, connect_timeout=5)
    with pytest.raises(DownloadError) as caught:
        list_hf(parse_uri("hf://o/m"), settings)
    assert type(caught.value) is DownloadError
    assert str(caught.value).startswith("the listing of hf://o/m repeats page link '")
    assert str(caught.value).endswith("cursor=T0'; the server is not following the protocol")


@ENDLESS
def test_hf_endless_links_end_at_the_deadline(pager: Pager) -> None:
    settings = SourceSettings(
        hf_endpoint=pager.endpoint, read_timeout=5, connect_timeout=5, list_deadline=1.0
    )
    with pytest.raises(TransientError, match=r"^hf://o/m: no whole listing within 1 s$"):
        list_hf(parse_uri("hf://o/m"), settings)


def test_paged_caps_pages_and_entries() -> None:
    tokens = count()
    with pytest.raises(DownloadError, match=r"goes past 1,000,000 entries or 3 pages"):
        paged(([1] for _ in count()), lambda: next(tokens), source="s3://b/p", seconds=60, max_pages=3)
    with pytest.raises(DownloadError, match=r"goes past 5 entries"):
        paged(([1, 2] for _ in count()), lambda: next(tokens), source="s3://b/p", seconds=60, max_entries=5)
    assert paged(iter([[1], [2, 3], []]), lambda: None, source="x", seconds=60) == [1, 2, 3]


@LOOP
def test_pull_of_a_looping_gcs_listing_fails_in_one_line(pager: Pager, tmp_path: Path) -> None:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": pager.endpoint}
    argv = [sys.executable, "-m", "modelcache", "pull", "gs://bkt/m", str(tmp_path / "dst"), "--quiet"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "modelcache pull: the listing of gs://bkt/m repeats page token 'T0'; the server is not "
        "following the protocol"
    ]
    assert len([a for a in pager.asked if "/o?" in a]) == 2, pager.asked  # once: not transient


@LOOP
def test_pull_of_a_looping_azure_listing_prints_only_its_own_line(pager: Pager, tmp_path: Path) -> None:
    """azure-storage-blob logs a WARNING of its own (``Unexpected return type <class 'str'> from
    ContentDecodePolicy...``) for the bodiless 404 the server answers the blob's properties with:
    pull's stderr is still its one line."""
    env = {**os.environ, "AZURE_STORAGE_BLOB_ENDPOINT": f"{pager.endpoint}/acct"}
    uri = "https://acct.blob.core.windows.net/cont/m"
    argv = [sys.executable, "-m", "modelcache", "pull", uri, str(tmp_path / "dst"), "--quiet"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"modelcache pull: the listing of {uri} repeats page token 'T0'; the server is not following "
        "the protocol"
    ]


def test_pull_prints_a_library_s_error_record_as_its_own_one_line(tmp_path: Path) -> None:
    """What a library logs at ERROR in a command without logging of its own reaches stderr in the
    command's words, escaped to one line, never bare."""
    code = (
        "import logging, sys\n"
        "from modelcache.cli import main\n"
        "import agent.pull_cli as p\n"
        "p.main = lambda argv: (logging.getLogger('azure.core').error('bad\\nline'), 0)[1]\n"
        "sys.exit(main(['pull', 'x', 'y']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert done.stderr.splitlines() == ["modelcache pull: bad\\nline"]
