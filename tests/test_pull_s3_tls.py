"""S3 behind a private certificate authority: the download client trusts the CA bundle boto3 uses
(``AWS_CA_BUNDLE``, or the profile's ``ca_bundle``), so a configuration that lists also downloads."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.download.environment import aws_ca_bundle
from agent.download.pull import pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination
from agent.download.transfer import TransferSettings
from localmodel.uri import parse_uri
from tests.support.s3files import S3Files, aws_env
from tests.support.tls import make_cert

FILES = {"llm/config.json": b'{"a": 1}', "llm/model.safetensors": b"w" * 100}


@pytest_asyncio.fixture
async def s3_tls(tmp_path: Path) -> AsyncIterator[tuple[S3Files, Path]]:
    certs = tmp_path / "certs"
    make_cert(certs)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    server = S3Files(tmp_path / "s3")
    await server.start(ssl_context=context)
    server.bucket("bkt")
    for key, body in FILES.items():
        server.put("bkt", key, body)
    try:
        yield server, certs / "tls.crt"
    finally:
        await server.close()
        shutil.rmtree(tmp_path / "s3", ignore_errors=True)


def clean_aws_env(monkeypatch: pytest.MonkeyPatch, server: S3Files, tmp_path: Path) -> None:
    for k, v in aws_env(server.endpoint).items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


async def test_aws_ca_bundle_is_trusted_by_pull(
    s3_tls: tuple[S3Files, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, bundle = s3_tls
    clean_aws_env(monkeypatch, server, tmp_path)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    dest = tmp_path / "m"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "modelcache", "pull", "s3://bkt/llm", str(dest), "--quiet"),
        env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "2 files" in out.decode()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {k.split("/")[1]: v for k, v in FILES.items()}
    assert sorted(r.key for r in server.requests if r.method == "GET" and r.key) == sorted(FILES)


async def test_the_profiles_ca_bundle_is_read_as_boto3_reads_it(
    s3_tls: tuple[S3Files, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, bundle = s3_tls
    clean_aws_env(monkeypatch, server, tmp_path)
    assert aws_ca_bundle() is None
    config = tmp_path / "aws-config"
    config.write_text(f"[profile private]\nca_bundle = {bundle}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "private")
    assert aws_ca_bundle() == str(bundle)
    result = await pull(
        parse_uri("s3://bkt/llm"),
        Destination.for_folder(tmp_path / "m"),
        sources=SourceSettings.from_env(),
        transfer=TransferSettings(ca_bundle=aws_ca_bundle()),
    )
    assert result.files == 2 and (tmp_path / "m" / "model.safetensors").read_bytes() == b"w" * 100
