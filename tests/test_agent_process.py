"""The agent as a process, the way a DaemonSet runs it: SIGKILL mid-download then restart (resumes
only what was not durable), SIGTERM (prompt exit, resumable state), a second agent on the same
folder (refused by the lock), a disk that fills up (a file-size quota set for the agent process:
clear error, nothing published, nothing else lost), its HTTP endpoints and ``modelcache status``."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from localmodel.kinds import EVENT, KINDS_BY_NAME, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from tests.support.agents import cache_doc, eventually, group_doc, node_doc
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(tmp_path: Path, *caches: dict[str, Any], limit: str = "1Gi") -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    docs = tmp_path / "docs.yaml"
    docs.write_text(yaml.safe_dump_all([group_doc("h100", limit=limit, path=cache), *caches]))
    return cache, docs


def argv(cache: Path, docs: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modelcache",
        "agent",
        "--node-name",
        "box",
        "--cache-dir",
        str(cache),
        "--standalone",
        str(docs),
        "--node-labels",
        "gpu=h100",
        "--metrics-addr",
        "off",
        "--health-addr",
        "off",
        "--chunk-size",
        "1Mi",
        "--concurrency",
        "4",
        "--status-interval",
        "0.2",
        *extra,
    ]


def env(hub: Hub) -> dict[str, str]:
    return dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1")


async def wait_chunks(progress: Path, path: str, n: int) -> None:
    def enough() -> bool:
        try:
            return len(json.loads(progress.read_text())["files"][path]["chunks"]) >= n
        except (OSError, ValueError, KeyError):
            return False

    await eventually(enough, timeout=30, what=f"{n} durable chunks")


async def test_sigkill_mid_download_then_restart_resumes_only_the_rest(hf_hub: Hub, tmp_path: Path) -> None:
    big = os.urandom(24 * MiB)
    hf_hub.add_repo("org/m", {"big.safetensors": big, "config.json": b"{}"})
    # The last chunk is held: the kill always lands mid-file, however fast the machine.
    hf_hub.file("org/m", "big.safetensors").hold_from = 23 * MiB
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "30Mi", ["h100"]))
    key = storage_key("hf://org/m")
    progress = cache / ".modelcache" / "staging" / key / "progress.json"
    proc = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    await wait_chunks(progress, "big.safetensors", 4)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    done = set(json.loads(progress.read_text())["files"]["big.safetensors"]["chunks"])
    assert 4 <= len(done) < 24 and not (cache / "models" / key).exists()

    hf_hub.file("org/m", "big.safetensors").hold_from = None
    hf_hub.requests.clear()
    proc = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert (cache / "models" / key / "big.safetensors").read_bytes() == big
    fetched = [r.range for r in hf_hub.requests if r.method == "GET" and "big.safetensors" in r.path]
    starts = {int(r.split("=")[1].split("-")[0]) // MiB for r in fetched if r}
    assert starts == set(range(24)) - done
    state = json.loads((cache / ".modelcache" / "state.json").read_text())
    assert state["status"]["modelStatus"] == {"m": "ModelDownloaded"}


async def test_sigterm_stops_promptly_and_leaves_resumable_state(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"big.safetensors": os.urandom(16 * MiB)})
    hf_hub.file("org/m", "big.safetensors").hold_from = 15 * MiB  # mid-file at SIGTERM, always
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "30Mi", ["h100"]))
    key = storage_key("hf://org/m")
    progress = cache / ".modelcache" / "staging" / key / "progress.json"
    proc = await asyncio.create_subprocess_exec(*argv(cache, docs), env=env(hf_hub))
    await wait_chunks(progress, "big.safetensors", 2)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert progress.exists() and not (cache / "models" / key).exists()
    state = json.loads((cache / ".modelcache" / "state.json").read_text())
    assert state["status"]["modelStatus"]["m"] in ("ModelDownloadPending", "ModelDownloading")
    hf_hub.file("org/m", "big.safetensors").hold_from = None
    proc = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    assert await asyncio.wait_for(proc.wait(), 60) == 0  # a new agent takes the folder and finishes


async def test_a_second_agent_process_is_refused_by_the_lock(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"big.safetensors": os.urandom(8 * MiB)})
    hf_hub.file("org/m", "big.safetensors").rate = 1 * MiB
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "30Mi", ["h100"]))
    first = await asyncio.create_subprocess_exec(*argv(cache, docs), env=env(hf_hub))
    try:
        await eventually(lambda: (cache / ".modelcache" / "state.json").exists(), timeout=20, what="first up")
        second = await asyncio.create_subprocess_exec(
            *argv(cache, docs), env=env(hf_hub), stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(second.communicate(), 20)
        assert second.returncode == 1
        assert "in use by another modelcache agent" in err.decode()
        assert first.returncode is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        await first.wait()


def _file_size_quota(limit: int) -> None:
    # The agent's own quota: writes past it fail with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


async def test_disk_full_mid_download_fails_cleanly_and_loses_nothing(hf_hub: Hub, tmp_path: Path) -> None:
    small = os.urandom(1 * MiB)
    hf_hub.add_repo("org/small", {"w.bin": small})
    hf_hub.add_repo("org/big", {"w.bin": os.urandom(6 * MiB)})
    cache, docs = setup(tmp_path, cache_doc("small", "hf://org/small", "2Mi", ["h100"]))
    proc = await asyncio.create_subprocess_exec(*argv(cache, docs, "--once"), env=env(hf_hub))
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    cache, docs = setup(
        tmp_path,
        cache_doc("small", "hf://org/small", "2Mi", ["h100"]),
        cache_doc("big", "hf://org/big", "8Mi", ["h100"]),
    )
    proc = await asyncio.create_subprocess_exec(
        *argv(cache, docs, "--once"),
        env=env(hf_hub),
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: _file_size_quota(4 * MiB),
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "DiskFull" in err.decode() or "no space left" in err.decode()
    state = json.loads((cache / ".modelcache" / "state.json").read_text())
    big = state["status"]["models"]["big"]
    assert big["state"] == "ModelDownloadError" and big["reason"] == "DiskFull"
    assert "no space left" in big["message"]
    assert not (cache / "models" / storage_key("hf://org/big")).exists()
    assert not (cache / ".modelcache" / "staging" / storage_key("hf://org/big")).exists()  # space given back
    assert (cache / "models" / storage_key("hf://org/small") / "w.bin").read_bytes() == small


async def test_endpoints_and_status_command(hf_hub: Hub, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"w.bin": os.urandom(100_000), "config.json": b"{}"})
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "1Mi", ["h100"]))
    health, metrics = free_port(), free_port()
    args = argv(cache, docs)
    args[args.index("--health-addr") + 1] = f"127.0.0.1:{health}"
    args[args.index("--metrics-addr") + 1] = f"127.0.0.1:{metrics}"
    proc = await asyncio.create_subprocess_exec(*args, env=env(hf_hub))
    try:
        async with aiohttp.ClientSession() as http:

            async def get(port: int, path: str) -> tuple[int, str]:
                try:
                    async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                        return r.status, await r.text()
                except aiohttp.ClientError:
                    return 0, ""

            await eventually(lambda: get(health, "/healthz"), what="healthz")

            async def downloaded() -> str | None:
                code, body = await get(health, "/status")
                ok = code == 200 and json.loads(body)["status"].get("modelStatus") == {"m": "ModelDownloaded"}
                return body if ok else None

            await eventually(downloaded, what="the model in /status")
            assert (await get(health, "/readyz"))[0] == 200
            code, text = await get(metrics, "/metrics")
            assert code == 200
            assert "modelcache_models_cached 1.0" in text
            assert "modelcache_downloads_completed_total 1.0" in text
            assert 'modelcache_download_duration_seconds_bucket{le="14400.0"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    out = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelcache",
        "status",
        "--cache-dir",
        str(cache),
        stdout=asyncio.subprocess.PIPE,
    )
    table = (await out.communicate())[0].decode()
    assert out.returncode == 0
    assert "ModelDownloaded" in table and storage_key("hf://org/m") in table and "100%" in table
    out = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modelcache",
        "status",
        "--cache-dir",
        str(cache),
        "--output",
        "json",
        stdout=asyncio.subprocess.PIPE,
    )
    data = json.loads((await out.communicate())[0])
    assert data["status"]["models"]["m"]["bytesTotal"] == 100_002


async def test_kube_mode_watches_only_its_own_node(hf_hub: Hub, kube_api: KubeAPI, tmp_path: Path) -> None:
    hf_hub.add_repo("org/m", {"w.bin": os.urandom(10_000)})
    cache = tmp_path / "cache"
    for obj in (
        group_doc("g", path=cache),
        node_doc("n1", [("m", "hf://org/m", "1Mi")]),
        node_doc("n2", [("other", "hf://org/other", "1Mi")]),
    ):
        await kube_api.store.create(KINDS_BY_NAME[obj["kind"]], obj)
    config = tmp_path / "kubeconfig"
    config.write_text(
        f"""
apiVersion: v1
kind: Config
current-context: test
clusters: [{{name: c, cluster: {{server: "{kube_api.url}"}}}}]
users: [{{name: u, user: {{token: agent-token}}}}]
contexts: [{{name: test, context: {{cluster: c, user: u}}}}]
"""
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "agent", "--node-name", "n1", "--cache-dir", str(cache),
        "--kubeconfig", str(config), "--health-addr", "off", "--metrics-addr", "off", "--once",
        "--allow-private-sources",  # the test hub is on 127.0.0.1
        env=env(hf_hub),
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    n1 = await kube_api.store.get(LOCAL_MODEL_NODE, "n1")
    assert n1["status"]["modelStatus"] == {"m": "ModelDownloaded"}
    assert "status" not in await kube_api.store.get(LOCAL_MODEL_NODE, "n2")
    node_reads = [p for m, p in kube_api.requests if m == "GET" and "/localmodelnodes" in p]
    assert node_reads and all(
        "fieldSelector=metadata.name%3Dn1" in p or p.endswith("/n1") for p in node_reads
    )
    events = (await kube_api.store.list(EVENT, namespace="default")).items
    assert {e["reason"] for e in events} >= {"DownloadStarted", "DownloadCompleted"}


async def test_once_on_a_cache_that_holds_everything_leaves_the_true_status(
    hf_hub: Hub, tmp_path: Path
) -> None:
    """Nothing to fetch: the agent ends at once, while its status loop's first write (taken before
    the node's models were known) is still on its way. That older write must not land last."""
    hf_hub.add_repo("org/m", {"config.json": b"{}", "w.bin": os.urandom(100_000)})
    cache, docs = setup(tmp_path, cache_doc("m", "hf://org/m", "1Mi", ["h100"]))
    for _ in range(3):
        extra = ("--once", "--health-addr", "127.0.0.1:0", "--status-interval", "2")  # as scripts/quickstart
        proc = await asyncio.create_subprocess_exec(*argv(cache, docs, *extra), env=env(hf_hub))
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        state = json.loads((cache / ".modelcache" / "state.json").read_text())
        assert state["status"]["modelStatus"] == {"m": "ModelDownloaded"}
        assert state["status"]["summary"] == "1/1 downloaded"
