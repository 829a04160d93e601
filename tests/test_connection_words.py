"""A connection that fails is said in words, with what was retried: "connection refused by
127.0.0.1:9 (after 4 attempts over 6 s)", "cannot resolve host …", for every source kind."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.download.wording import connection_words


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


def pull(uri: str, dest: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", uri, str(dest), "--quiet"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["http", "hf", "s3"])
def test_a_refused_connection_is_said_in_words_with_the_retries(tmp_path: Path, kind: str) -> None:
    port = closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    uri, env = {
        "http": (f"{endpoint}/m.bin", {}),
        "hf": ("hf://org/m", {"HF_ENDPOINT": endpoint}),
        "s3": (
            "s3://bucket/m",
            {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        ),
    }[kind]
    r = pull(uri, tmp_path / "m", env)
    assert r.returncode == 1, r.stderr
    assert re.fullmatch(
        rf"modelcache pull: \S+: connection refused by 127\.0\.0\.1:{port} \(after 4 attempts over \d+ s\)\n",
        r.stderr,
    ), r.stderr
    assert "Error" not in r.stderr


def test_an_unknown_host_is_said_in_words(tmp_path: Path) -> None:
    r = pull("hf://org/m", tmp_path / "m", {"HF_ENDPOINT": "http://no-such-host.invalid"})
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("modelcache pull: hf://org/m: cannot resolve host no-such-host.invalid ("), (
        r.stderr
    )
    assert re.search(r"\(after 4 attempts over \d+ s\)\n$", r.stderr), r.stderr


def test_connection_words_find_the_os_error_along_the_causes() -> None:
    def chained(inner: BaseException, outer: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:
            return e

    refused = chained(ConnectionRefusedError(111, "Connection refused"), RuntimeError("ConnectError"))
    assert connection_words(refused, "http://127.0.0.1:9") == "connection refused by 127.0.0.1:9"
    unknown = RuntimeError(socket.gaierror(-2, "Name or service not known"))  # wrapped as an argument
    assert connection_words(unknown, "https://hub.example") == (
        "cannot resolve host hub.example (Name or service not known)"
    )
    assert connection_words(ValueError("odd"), "s3.example:443") == "ValueError from s3.example:443: odd"
