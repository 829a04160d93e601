"""The agent process as deployed: ``file://`` sources in cluster mode only under
``--allow-file-sources``, ``/status`` for loopback clients only (probes open to all), no core dumps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from agent.http import is_loopback
from localmodel.kinds import KINDS_BY_NAME, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from tests.support.agents import cache_doc, eventually, group_doc, node_doc
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI, kubeconfig
from tests.test_agent_process import argv, env, free_port, setup


async def run_cluster_agent(tmp_path: Path, kube_api: KubeAPI, *extra: str) -> int:
    cache = tmp_path / "cache"
    config = kubeconfig(tmp_path / "kubeconfig", kube_api.url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "agent", "--node-name", "n1", "--cache-dir", str(cache),
        "--kubeconfig", str(config), "--health-addr", "off", "--metrics-addr", "off", "--once",
        "--retry-min", "3600", *extra,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert "Traceback" not in err.decode()
    return proc.returncode if proc.returncode is not None else -1


@pytest.mark.parametrize("as_path", [False, True])
async def test_cluster_mode_reads_file_sources_only_under_allowed_prefixes(
    kube_api: KubeAPI, tmp_path: Path, as_path: bool
) -> None:
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (models / "m" / "w.bin").write_bytes(b"weights")
    uri = str(models / "m") if as_path else f"file://{models / 'm'}"
    cache = tmp_path / "cache"
    for obj in (group_doc("g", path=cache), node_doc("n1", [("m", uri, "1Mi")])):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)

    assert await run_cluster_agent(tmp_path, kube_api) == 1
    n1 = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert n1["status"]["modelStatus"] == {"m": "ModelDownloadError"}
    model = json.loads((cache / ".modelcache" / "state.json").read_text())["status"]["models"]["m"]
    assert model["reason"] == "SourceNotAllowed"
    assert "--allow-file-sources" in model["message"] and "\n" not in model["message"]
    assert not (cache / "models" / storage_key(uri)).exists()  # nothing copied

    # Another prefix does not allow it; the model's folder (comma list) does.
    assert await run_cluster_agent(tmp_path, kube_api, "--allow-file-sources", f"{tmp_path}/other") == 1
    assert await run_cluster_agent(tmp_path, kube_api, "--allow-file-sources", f"/nowhere,{models}") == 0
    n1 = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert n1["status"]["modelStatus"] == {"m": "ModelDownloaded"}
    assert (cache / "models" / storage_key(uri) / "w.bin").read_bytes() == b"weights"


async def test_cluster_mode_refuses_a_link_out_of_the_allowed_prefix(
    kube_api: KubeAPI, tmp_path: Path
) -> None:
    models, secrets = tmp_path / "models", tmp_path / "secrets"
    (models / "m").mkdir(parents=True)
    secrets.mkdir()
    (secrets / "key").write_bytes(b"SECRET")
    (models / "m" / "w.bin").write_bytes(b"weights")
    (models / "m" / "key").symlink_to(secrets / "key")  # inside the model folder, pointing out
    (models / "out").symlink_to(secrets)  # the model folder itself a link out
    cache = tmp_path / "cache"
    uris = {"m": f"file://{models / 'm'}", "out": f"file://{models / 'out'}"}
    for obj in (group_doc("g", path=cache), node_doc("n1", [(n, u, "1Mi") for n, u in uris.items()])):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    assert await run_cluster_agent(tmp_path, kube_api, "--allow-file-sources", str(models)) == 1
    state = json.loads((cache / ".modelcache" / "state.json").read_text())["status"]["models"]
    assert state["m"]["reason"] == "UnsafePath"
    assert state["out"]["reason"] == "SourceNotAllowed"
    published = (
        [p for p in (cache / "models").rglob("*") if p.is_file()] if (cache / "models").exists() else []
    )
    assert published == []


async def test_allow_file_sources_must_name_absolute_folders(tmp_path: Path) -> None:
    for bad, message in (("relative/dir", "not an absolute path"), ("/", "every file of the node")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "modelcache", "agent", "--node-name", "n1", "--cache-dir", str(tmp_path),
            "--kubeconfig", str(tmp_path / "none"), "--allow-file-sources", bad,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2
        assert message in err.decode() and len(err.decode().strip().splitlines()) == 1


def _outside_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    candidates = []
    with contextlib.suppress(OSError):
        candidates.append(socket.gethostbyname(socket.gethostname()))
    for probe in ("192.0.2.1", "10.255.255.254", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.connect((probe, 9))  # no packet is sent: this picks the outgoing interface
            candidates.append(str(s.getsockname()[0]))
    return next((a for a in candidates if not a.startswith("127.") and a != "0.0.0.0"), None)


async def test_status_for_loopback_only_probes_for_all_and_no_core_dumps(hf_hub: Hub, tmp_path: Path) -> None:
    outside = _outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    hf_hub.add_repo("org/m", {"w.bin": os.urandom(10_000)})
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "1Mi", ["h100"]))
    port = free_port()
    args = argv(cache, docs)
    args[args.index("--health-addr") + 1] = f"0.0.0.0:{port}"
    proc = await asyncio.create_subprocess_exec(*args, env=env(hf_hub))
    try:
        async with aiohttp.ClientSession() as http:

            async def get(host: str, path: str) -> tuple[int, str]:
                try:
                    async with http.get(f"http://{host}:{port}{path}") as r:
                        return r.status, await r.text()
                except aiohttp.ClientError:
                    return 0, ""

            await eventually(lambda: _ok(get("127.0.0.1", "/healthz")), what="healthz")
            assert (await get(outside, "/healthz"))[0] == 200
            assert (await get(outside, "/readyz"))[0] in (200, 503)
            code, body = await get(outside, "/status")
            assert code == 403 and "loopback" in body and "hf://" not in body
            code, body = await get("127.0.0.1", "/status")
            assert code == 200 and json.loads(body)["node"] == "box"
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def _ok(call: object) -> bool | None:
    code, _ = await call  # type: ignore[misc]
    return True if code == 200 else None


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        (None, False),
        ("", False),
        ("localhost", False),
    ],
)
def test_is_loopback(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


def test_disable_core_dumps_sets_the_limit_and_not_dumpable() -> None:
    import subprocess

    code = (
        "import ctypes, resource; from agent.cli import disable_core_dumps; disable_core_dumps(); "
        "print(resource.getrlimit(resource.RLIMIT_CORE), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )  # 3: PR_GET_DUMPABLE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["(0,", "0)", "0"]
