"""Sources against hostile and odd remotes: endpoints that accept and never answer (every listing wait
bounded, retried, then one line naming the endpoint), S3 folder markers, a model that is one empty
file, names with control characters (refused, quoted escaped), file sources outside the allowed
prefixes, and the Hugging Face token from a file."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.download.listing import Listing, folder_marker, parent_folders
from agent.download.pull import http_client, pull
from agent.download.source_settings import SourceSettings, hf_token_from_env
from agent.download.sources import list_source
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.errors import (
    DownloadError,
    InvalidInput,
    SourceNotAllowed,
    SourceNotFound,
    TransientError,
    UnsafePath,
)
from localmodel.uri import parse_uri
from tests.support.hfhub import Hub
from tests.support.s3 import S3
from tests.support.silent import SilentServer

QUICK = {"connect_timeout": 0.5, "read_timeout": 0.5, "list_attempts": 3, "list_backoff": 0.01}
HANG_GUARD = 60  # seconds: only so a regression fails instead of hanging the suite


async def listing(uri: str, settings: SourceSettings, **transfer: float) -> Listing:
    client = http_client(TransferSettings(**transfer))  # type: ignore[arg-type]
    try:
        return await asyncio.wait_for(
            list_source(parse_uri(uri), settings=settings, client=client), HANG_GUARD
        )
    finally:
        client.close()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert not any(c in text for c in "\n\r\x1b\u2028\u2029\u202e"), text
    return text


# -- every listing wait is bounded ----------------------------------------------------------------


async def test_hub_that_never_answers_fails_after_the_retries_naming_the_endpoint() -> None:
    with SilentServer() as silent:
        settings = SourceSettings(hf_endpoint=silent.endpoint, **QUICK)  # type: ignore[arg-type]
        with pytest.raises(TransientError) as info:
            await listing("hf://org/m", settings)
        assert re.fullmatch(
            f"hf://org/m: cannot reach {silent.endpoint}: no answer within 0.5 s "
            r"\(after 3 attempts over \d+ s\)",
            one_line(info.value),
        ), one_line(info.value)
        assert silent.accepted >= 3  # each attempt asked again


async def test_s3_that_never_answers_fails_after_the_retries_naming_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in {
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    with SilentServer() as silent:
        settings = SourceSettings(s3_endpoint=silent.endpoint, **QUICK)  # type: ignore[arg-type]
        with pytest.raises(TransientError) as info:
            await listing("s3://bkt/models/llama", settings)
        assert re.fullmatch(
            f"s3://bkt/models/llama: cannot reach {silent.endpoint}: no answer within 0.5 s "
            r"\(after 3 attempts over \d+ s\)",
            one_line(info.value),
        ), one_line(info.value)
        assert silent.accepted >= 3


async def test_http_head_that_never_answers_fails_after_the_retries_naming_the_endpoint() -> None:
    with SilentServer() as silent:
        settings = SourceSettings(**QUICK)  # type: ignore[arg-type]
        with pytest.raises(TransientError) as info:
            await listing(
                f"{silent.endpoint}/m.tar.gz?sig=SECRET", settings, read_timeout=0.5, connect_timeout=0.5
            )
        assert re.fullmatch(
            re.escape(f"{silent.endpoint}/m.tar.gz?<redacted>: cannot reach {silent.endpoint}: ")
            + r"no answer within 0.5 s \(after 3 attempts over \d+ s\)",
            one_line(info.value),
        ), one_line(info.value)
        assert silent.accepted >= 3


# -- S3 folder markers; never a model of one empty file ---------------------------------------------


async def test_s3_folder_marker_without_slash_is_taken_as_the_folder(s3: S3, tmp_path: Path) -> None:
    """A case from the field: `models/llama` is an empty application/x-directory object beside
    `models/llama/...`; the model is the folder's two files, not one empty file."""
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    s3.client.put_object(Bucket=bucket, Key="models/llama", Body=b"", ContentType="application/x-directory")
    config = b'{"architectures":["LlamaForCausalLM"]}'
    s3.client.put_object(Bucket=bucket, Key="models/llama/config.json", Body=config)
    s3.client.put_object(Bucket=bucket, Key="models/llama/model.safetensors", Body=b"w" * 64)
    await pull(
        parse_uri(f"s3://{bucket}/models/llama"),
        Destination.for_folder(tmp_path / "llama"),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(),
    )
    assert tree(tmp_path / "llama") == {"config.json": config, "model.safetensors": b"w" * 64}


async def test_s3_markers_inside_a_prefix_are_skipped_and_empty_files_kept(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    put = s3.client.put_object
    put(Bucket=bucket, Key="m/w.bin", Body=b"weights")
    put(Bucket=bucket, Key="m/empty.txt", Body=b"", ContentType="text/plain")  # a real empty file
    put(Bucket=bucket, Key="m/sub_$folder$", Body=b"")  # Hadoop/EMR
    put(Bucket=bucket, Key="m/sub/", Body=b"")  # the AWS console
    put(Bucket=bucket, Key="m/sub", Body=b"")  # s3fs: named like the folder, no slash
    put(Bucket=bucket, Key="m/sub/x.json", Body=b"{}")
    put(Bucket=bucket, Key="m/lonely", Body=b"", ContentType="application/x-directory")  # an empty folder
    await pull(
        parse_uri(f"s3://{bucket}/m"),
        Destination.for_folder(tmp_path / "m"),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(),
    )
    assert tree(tmp_path / "m") == {"w.bin": b"weights", "empty.txt": b"", "sub/x.json": b"{}"}


async def test_a_single_empty_file_is_never_a_model(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    s3.client.put_object(Bucket=bucket, Key="models/none", Body=b"", ContentType="application/x-directory")
    s3.client.put_object(Bucket=bucket, Key="models/empty.bin", Body=b"")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), _EmptyFile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for uri in (
            f"s3://{bucket}/models/none",
            f"s3://{bucket}/models/empty.bin",
            f"http://127.0.0.1:{port}/empty.bin",
            f"file://{empty}",
        ):
            dest = tmp_path / f"dest-{uuid.uuid4().hex[:6]}"
            with pytest.raises(SourceNotFound, match="single empty file") as info:
                await pull(
                    parse_uri(uri),
                    Destination.for_folder(dest),
                    sources=SourceSettings.from_env(),
                    transfer=TransferSettings(),
                )
            assert one_line(info.value).startswith(parse_uri(uri).redacted() + ": ")
            assert not dest.exists()
    finally:
        server.shutdown()
        server.server_close()


class _EmptyFile(BaseHTTPRequestHandler):
    """An empty file, its size told (aiohttp leaves Content-Length out of a HEAD of an empty body)."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.send_header("ETag", '"e"')
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()

    def log_message(self, format: str, *args: object) -> None:
        return None


# -- names that cannot lie -------------------------------------------------------------------------

HOSTILE = [
    ("a\nINFO forged line.bin", "a\\nINFO forged line.bin"),
    ("esc\x1b[31mred.bin", "esc\\x1b[31mred.bin"),
    ("bidi\u202egnp.exe", "bidi\\u202egnp.exe"),
    ("sep\u2028x.bin", "sep\\u2028x.bin"),
    ("c1\x85x.bin", "c1\\x85x.bin"),
    ("del\x7fx.bin", "del\\x7fx.bin"),
]


@pytest.mark.parametrize(("name", "escaped"), HOSTILE)
async def test_hub_tree_entry_with_control_characters_is_refused(
    hf_hub: Hub, name: str, escaped: str
) -> None:
    hf_hub.add_repo("org/m", {"w.bin": b"weights"})
    hf_hub.add_hostile_entry("org/m", f"dir/{name}")
    with pytest.raises(UnsafePath) as info:
        await listing("hf://org/m", SourceSettings.from_env())
    assert f"'dir/{escaped}'" in one_line(info.value)


async def test_s3_key_with_control_characters_is_refused(s3: S3) -> None:
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    s3.client.put_object(Bucket=bucket, Key="m/w.bin", Body=b"weights")
    s3.client.put_object(Bucket=bucket, Key="m/x\u202egnp.exe", Body=b"evil")
    with pytest.raises(UnsafePath) as info:
        await listing(f"s3://{bucket}/m", SourceSettings.from_env())
    assert "'x\\u202egnp.exe'" in one_line(info.value)


@pytest.mark.parametrize(
    ("path", "escaped"),
    [("a%0Ab.bin", "a\\nb.bin"), ("a%1B%5B2Jb.bin", "a\\x1b[2Jb.bin"), ("a%E2%80%AEb.bin", "a\\u202eb.bin")],
)
async def test_http_url_path_with_control_characters_is_refused(path: str, escaped: str) -> None:
    # Refused before any request: no server needed (the port is closed).
    with pytest.raises(UnsafePath) as info:
        await listing(f"http://127.0.0.1:9/{path}", SourceSettings(**QUICK))  # type: ignore[arg-type]
    assert f"'{escaped}'" in one_line(info.value)


async def test_http_url_path_with_an_encoded_slash_is_refused() -> None:
    with pytest.raises(UnsafePath, match="holds a '/'"):
        await listing("http://127.0.0.1:9/a%2F..%2Fb.bin", SourceSettings(**QUICK))  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "escaped"), HOSTILE[:4])
async def test_file_name_with_control_characters_is_refused(tmp_path: Path, name: str, escaped: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights")
    (src / name).write_bytes(b"evil")
    with pytest.raises(UnsafePath) as info:
        await listing(f"file://{src}", SourceSettings())
    assert f"'{escaped}'" in one_line(info.value)


# -- file sources under the allowed prefixes --------------------------------------------------------


async def test_file_sources_only_under_the_allowed_prefixes(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "models", tmp_path / "secrets"
    (allowed / "m").mkdir(parents=True)
    outside.mkdir()
    (allowed / "m" / "w.bin").write_bytes(b"weights")
    (outside / "key").write_bytes(b"SECRET")
    inside = SourceSettings(file_prefixes=(str(allowed),))

    ok = await listing(f"file://{allowed / 'm'}", inside)
    assert [(f.path, f.local_path) for f in ok.files] == [("w.bin", str(allowed / "m" / "w.bin"))]

    with pytest.raises(SourceNotAllowed, match="--allow-file-sources") as info:
        await listing(f"file://{outside}", inside)
    assert "allowed: " + str(allowed) in one_line(info.value)
    with pytest.raises(SourceNotAllowed, match=r"allowed: none"):
        await listing(f"file://{allowed / 'm'}", SourceSettings(file_prefixes=()))

    # A link inside the allowed folder to a folder outside it: its real path decides.
    (allowed / "link").symlink_to(outside)
    with pytest.raises(SourceNotAllowed):
        await listing(f"file://{allowed / 'link'}", inside)
    (allowed / "one").symlink_to(outside / "key")
    with pytest.raises(SourceNotAllowed):
        await listing(f"file://{allowed / 'one'}", inside)
    # A prefix that merely starts the same (models-other) is not inside "models".
    (tmp_path / "models-other").mkdir()
    (tmp_path / "models-other" / "w").write_bytes(b"x")
    with pytest.raises(SourceNotAllowed):
        await listing(f"file://{tmp_path / 'models-other'}", inside)


async def test_file_source_that_is_a_link_to_an_allowed_folder_is_read_at_its_real_path(
    tmp_path: Path,
) -> None:
    allowed = tmp_path / "models"
    (allowed / "m").mkdir(parents=True)
    (allowed / "m" / "w.bin").write_bytes(b"weights")
    (tmp_path / "alias").symlink_to(allowed / "m")
    result = await listing(f"file://{tmp_path / 'alias'}", SourceSettings(file_prefixes=(str(allowed),)))
    assert [f.local_path for f in result.files] == [str(allowed / "m" / "w.bin")]


# -- the Hugging Face token from a file -------------------------------------------------------------


def test_hf_token_as_huggingface_hub_finds_it(tmp_path: Path) -> None:
    secret = tmp_path / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text("  hf_FROMFILE\n")
    assert hf_token_from_env({"HF_TOKEN_PATH": str(secret), "HOME": str(tmp_path)}) == "hf_FROMFILE"
    # The environment variable wins, as in huggingface_hub.
    assert hf_token_from_env({"HF_TOKEN": "hf_ENV", "HF_TOKEN_PATH": str(secret)}) == "hf_ENV"
    assert hf_token_from_env({"HUGGING_FACE_HUB_TOKEN": "hf_OLD", "HF_TOKEN_PATH": str(secret)}) == "hf_OLD"
    # The default file: $HF_HOME/token, HF_HOME defaulting to $XDG_CACHE_HOME/huggingface.
    (tmp_path / "hfhome").mkdir()
    (tmp_path / "hfhome" / "token").write_text("hf_HOME")
    assert hf_token_from_env({"HF_HOME": str(tmp_path / "hfhome")}) == "hf_HOME"
    (tmp_path / "xdg" / "huggingface").mkdir(parents=True)
    (tmp_path / "xdg" / "huggingface" / "token").write_text("hf_XDG")
    assert hf_token_from_env({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == "hf_XDG"
    # Missing (an optional Secret not mounted) or empty: no token.
    assert hf_token_from_env({"HF_TOKEN_PATH": str(tmp_path / "absent"), "HOME": str(tmp_path)}) is None
    (tmp_path / "blank").write_text("\n")
    assert hf_token_from_env({"HF_TOKEN_PATH": str(tmp_path / "blank")}) is None
    # Named explicitly but unreadable: a usage error naming the variable, without the token.
    with pytest.raises(InvalidInput, match="HF_TOKEN_PATH: cannot read"):
        hf_token_from_env({"HF_TOKEN_PATH": str(tmp_path / "secret")})  # a folder


async def test_hf_token_file_opens_a_gated_repo(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/gated", {"w.bin": b"weights"}, token="hf_GATED")
    token = tmp_path / "token"
    token.write_text("hf_GATED\n")
    settings = SourceSettings.from_env({"HF_ENDPOINT": hf_hub.endpoint, "HF_TOKEN_PATH": str(token)})
    await pull(
        parse_uri("hf://org/gated"),
        Destination.for_folder(tmp_path / "m"),
        sources=settings,
        transfer=TransferSettings(),
    )
    assert tree(tmp_path / "m") == {"w.bin": b"weights"}
    with pytest.raises(DownloadError, match="access denied"):
        await listing(
            "hf://org/gated",
            SourceSettings.from_env({"HF_ENDPOINT": hf_hub.endpoint, "HOME": str(tmp_path / "none")}),
        )


def test_escaping_keeps_ordinary_names(tmp_path: Path) -> None:
    from localmodel.text import printable

    assert printable("models/llama-3.1/tokenizer.json") == "models/llama-3.1/tokenizer.json"
    assert printable("日本語/モデル.bin") == "日本語/モデル.bin"
    assert printable("a\tb\r\nc\x00") == "a\\tb\\r\\nc\\x00"
    assert printable("x" * 300, limit=10) == "xxxxxxx..."


def test_folder_markers_are_told_from_files_by_one_rule() -> None:
    names = ["m/config.json", "m/sub/w.bin", "m/sub", "m/empty", "m/x_$folder$", "m/dir/"]
    folders = parent_folders(names)
    assert folders == {"m", "m/sub", "m/dir"}  # "m/dir/" is a folder's own marker
    sizes = {"m/config.json": 10, "m/sub/w.bin": 0, "m/sub": 0, "m/empty": 0, "m/x_$folder$": 0, "m/dir/": 0}
    files = [n for n in names if not folder_marker(n, sizes[n], folders)]
    # An empty object is a file unless a folder of that name holds objects.
    assert files == ["m/config.json", "m/sub/w.bin", "m/empty"]
    assert not folder_marker("m/sub", 5, folders)  # not empty: a file, whatever its name
