"""No secret at any log level: the agent at DEBUG and ``modelcache pull``, against the local hub (a
gated repository, so the token is really sent) and the S3 server, with marker values for every
credential; and the one logging setup's rules (libraries that print headers held at INFO, one line
per record, secret-named values masked)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path

import pytest

from localmodel.logs import QUIET, OneLineFormatter, redact_secrets, setup_logging
from tests.support.agents import cache_doc
from tests.support.hfhub import Hub
from tests.support.s3 import S3
from tests.test_agent_process import argv, setup

MARKERS = {
    "HF_TOKEN": "hf_MARKERhftoken0123456789",
    "AWS_ACCESS_KEY_ID": "AKIAMARKERKEYID0123",
    "AWS_SECRET_ACCESS_KEY": "MARKERsecretaccesskey0123456789",
    "AWS_SESSION_TOKEN": "MARKERsessiontoken0123456789",
}
# Values that would be secrets however they are spelled: a bearer token, a session token or a
# presigned signature printed by any library.
LEAKS = re.compile(
    r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(bearer|aws4)\s+\w|x-amz-security-token['\"]?\s*[:=]\s*['\"]?\w"
    r"|x-amz-signature=\w|x-amz-credential=\w)"
)


def assert_clean(*texts: str) -> None:
    for text in texts:
        for name, value in MARKERS.items():
            assert value not in text, f"{name} leaked"
        assert not LEAKS.search(text), LEAKS.search(text)


def credentials_env(hub: Hub, s3_endpoint: str) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", AWS_ENDPOINT_URL=s3_endpoint)
    env.update(MARKERS, AWS_DEFAULT_REGION="us-east-1")
    return env


@pytest.fixture
def sources(hf_hub: Hub, s3: S3) -> tuple[str, str]:
    hf_hub.add_repo(
        "org/gated", {"w.bin": os.urandom(50_000), "config.json": b"{}"}, token=MARKERS["HF_TOKEN"]
    )
    bucket = s3.bucket(f"b-{uuid.uuid4().hex[:8]}")
    s3.client.put_object(Bucket=bucket, Key="m/w.bin", Body=os.urandom(50_000))
    s3.client.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    return "hf://org/gated", f"s3://{bucket}/m"


async def test_agent_at_debug_logs_no_secret(
    hf_hub: Hub, s3: S3, sources: tuple[str, str], tmp_path: Path
) -> None:
    hf, s3_uri = sources
    cache, docs = setup(
        tmp_path, cache_doc("hf", hf, "1Mi", ["h100"]), cache_doc("s3", s3_uri, "1Mi", ["h100"])
    )
    proc = await asyncio.create_subprocess_exec(
        *argv(cache, docs, "--once", "--log-level", "DEBUG"),
        env=credentials_env(hf_hub, s3.endpoint),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    stdout, stderr = out.decode(), err.decode()
    state = (cache / ".modelcache" / "state.json").read_text()
    assert proc.returncode == 0, stderr[-2000:]
    assert json.loads(state)["status"]["modelStatus"] == {"hf": "ModelDownloaded", "s3": "ModelDownloaded"}
    assert " DEBUG " in stderr  # the run did log at DEBUG: the check below means something
    assert_clean(stdout, stderr, state)
    for manifest in (cache / ".modelcache").rglob("*.json"):
        assert_clean(manifest.read_text())


async def test_pull_logs_no_secret(hf_hub: Hub, s3: S3, sources: tuple[str, str], tmp_path: Path) -> None:
    for uri in sources:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modelcache", "pull", uri, str(tmp_path / uuid.uuid4().hex), "--quiet",
            env=credentials_env(hf_hub, s3.endpoint),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert_clean(out.decode(), err.decode())


def test_setup_holds_header_printing_libraries_at_info() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in QUIET}
    try:
        setup_logging("DEBUG")
        assert logging.getLogger("modelcache.agent").isEnabledFor(logging.DEBUG)
        for name in (
            "botocore.endpoint",
            "botocore.auth",
            "urllib3.connectionpool",
            "httpcore2",
            "huggingface_hub",
        ):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        assert logging.getLogger("httpx").isEnabledFor(logging.INFO)  # request lines, at DEBUG only
        # Issue 21: httpx's INFO line per request (every Lease renewal) is not logged at INFO.
        setup_logging("INFO")
        assert logging.getLogger("modelcache.agent").isEnabledFor(logging.INFO)
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
        setup_logging("WARNING")
        assert not logging.getLogger("botocore").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


def test_one_line_per_record_and_secret_values_masked() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test.one-line")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("failed %s", "a\nINFO forged\u2028line\x1b[2J")
        log.warning("headers {'Authorization': 'Bearer hf_abc', 'X-Amz-Security-Token': 'FwoG'}")
        log.warning("GET /b/k?X-Amz-Credential=AKIA%2F&X-Amz-Signature=deadbeef&x=1")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING failed a\\nINFO forged\\u2028line\\x1b[2J"
    assert "hf_abc" not in lines[1] and "FwoG" not in lines[1] and "Bearer ***" in lines[1]
    assert "deadbeef" not in lines[2] and "AKIA" not in lines[2] and "x=1" in lines[2]
    assert len(lines) == 3
    assert redact_secrets("tokenizer.json ok") == "tokenizer.json ok"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer hf_abc", "hf_abc"),
        ("proxy-authorization: Basic dXNlcjpwdw==", "dXNlcjpwdw=="),
        ("{'X-Amz-Security-Token': 'FwoGZX'}", "FwoGZX"),
        ("GET /k?X-Amz-Signature=deadbeef&x=1", "deadbeef"),
        ("GET /k?X-Amz-Credential=AKIAXYZ%2F&x=1", "AKIAXYZ"),
        ("GET /c?sv=1&Signature=s1gn4ture", "s1gn4ture"),
        ("GET /k?AWSAccessKeyId=AKIAOLD&x=1", "AKIAOLD"),
        ('{"token": "cluster-secret"}', "cluster-secret"),
        ("GET /x?access_token=ya29.abc&x=1", "ya29.abc"),
        ("peer token=cluster-secret", "cluster-secret"),
    ],
)
def test_each_secret_pattern_still_masks_its_value(text: str, secret: str) -> None:
    masked = redact_secrets(text)
    assert secret not in masked and "***" in masked, masked


@pytest.mark.parametrize(
    "text",
    [
        "cannot read sec/token: No such file or directory",
        "cannot read /var/run/modelcache/peer/token: Permission denied",
        "cannot read C:\\sec\\token: No such file",
        "open /etc/x/signature: Is a directory",
        "cannot read /run/authorization: No such file",
    ],
)
def test_a_path_ending_in_a_secret_name_keeps_the_words_after_it(text: str) -> None:
    """Regression: "sec/token: No such file" printed as "sec/token: *** such file" (the path's last
    segment taken for a key and the error's first word for its value)."""
    assert redact_secrets(text) == text
