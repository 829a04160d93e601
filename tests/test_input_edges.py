"""Bad input at the agent's and pull's edges: a Hugging Face token that cannot be a header value, and
``--allow-file-sources`` prefixes that cannot be resolved. One line naming the setting, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.download.source_settings import hf_token_from_env
from localmodel.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("hf_ABC\n", "hf_ABC"),
        ("\r\nhf_ABC\r\n", "hf_ABC"),
        ("hf_A\nBC\n", "hf_ABC"),
        ("  hf_ABC\t", "hf_ABC"),
    ],
)
def test_hf_token_file_is_cleaned_as_huggingface_hub_does(tmp_path: Path, text: str, token: str) -> None:
    from huggingface_hub.utils._auth import _clean_token

    secret = tmp_path / "token"
    secret.write_text(text)
    assert hf_token_from_env({"HF_TOKEN_PATH": str(secret)}) == token == _clean_token(text)


@pytest.mark.parametrize("inner", ["\x00", "\t", " ", "\x1b[2J", "\u00e9", "\x7f"])
def test_hf_token_with_inner_control_characters_is_one_line_naming_the_file(
    tmp_path: Path, inner: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "token"
    secret.write_text(f"hf_SECRETPART{inner}MORESECRET\n")
    with pytest.raises(InvalidInput, match="HF_TOKEN_PATH") as caught:
        hf_token_from_env({"HF_TOKEN_PATH": str(secret)})
    assert "SECRETPART" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InvalidInput, match=r"^HF_TOKEN: ") as from_env:
        hf_token_from_env({"HF_TOKEN": f"hf_SECRETPART{inner}X"})
    assert "SECRETPART" not in str(from_env.value)
    # The whole command: one line on stderr, exit 2, no traceback, no token.
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "modelcache", "pull", "hf://org/m", str(tmp_path / "out"), "--quiet"],
        env={**os.environ, "HF_TOKEN_PATH": str(secret), "HF_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "HF_TOKEN_PATH" in proc.stderr, proc.stderr
    assert "SECRETPART" not in proc.stderr and "Traceback" not in proc.stderr
    assert not cache.exists()


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelcache", "agent", "--node-name", "n1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_allow_file_sources_that_cannot_be_resolved_is_one_line_exit_2(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    cases = [(str(loop), "a loop of symbolic links")]
    try:
        Path("/proc/1/root").resolve()
    except PermissionError:
        cases.append(("/proc/1/root", "Permission denied"))
    for prefix, why in cases:
        r = _agent("--cache-dir", str(tmp_path / "cache"), "--kubeconfig", str(tmp_path / "none"),
                   "--allow-file-sources", prefix)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "--allow-file-sources" in r.stderr and why in r.stderr, r.stderr


async def test_file_source_through_a_loop_of_links_is_one_line(tmp_path: Path) -> None:
    from agent.download.pull import pull
    from agent.download.source_settings import SourceSettings
    from agent.download.staging import Destination
    from agent.download.transfer import TransferSettings
    from localmodel.errors import SourceNotFound, UnsafePath
    from localmodel.uri import parse_uri

    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    # pull and standalone (any folder): the loop is no file; cluster mode: resolved to be checked.
    for prefixes, error in ((None, SourceNotFound), ((str(tmp_path),), UnsafePath)):
        with pytest.raises(error, match="loop of symbolic links" if prefixes else "no such file"):
            await pull(
                parse_uri(f"file://{loop}"),
                Destination.for_folder(tmp_path / "out" / "m"),
                sources=SourceSettings(file_prefixes=prefixes),
                transfer=TransferSettings(),
            )
