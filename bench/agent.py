"""Benchmark: the node agent, against `modelcache pull` on the same data, in the same run.

    .venv/bin/python bench/agent.py [--gib 1.5] [--idle-models 50] [--idle-seconds 20]

1. Throughput: three models of ``--gib``/3 GiB each, served by a local Hugging Face-compatible hub
   (its own process). Anchor: `modelcache pull` of the three, one after the other (each at full
   connection concurrency). Then the agent in standalone mode caches the same three at once
   (`--max-concurrent-downloads 3 --once`). Prints both rates and the ratio (target >= 0.9).
2. Idle: an agent holding ``--idle-models`` published models (filled first through the agent from
   file:// sources), restarted: its start-up rescan time (from its log), time to /readyz, RSS and
   CPU over ``--idle-seconds`` of idling (targets: RSS < 80 MB, CPU < 1 % of a core, rescan < 1 s).
   Anchor for the RSS: a bare interpreter that imports the same libraries and sleeps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MC = str(Path(PY).parent / "modelcache")
MiB = 1 << 20

HUB = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.support.hfhub import Hub
async def main():
    hub = Hub()
    for src in sorted(Path({src!r}).iterdir()):
        hub.add_repo("bench/" + src.name, {{p.name: p for p in sorted(src.iterdir())}})
    await hub.start()
    print(hub.endpoint, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

GROUP = """apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelNodeGroup
metadata: {{name: bench}}
spec:
  storageLimit: 1Ti
  persistentVolumeSpec:
    hostPath: {{path: {cache}}}
    nodeAffinity:
      required:
        nodeSelectorTerms:
        - matchExpressions:
          - {{key: bench, operator: Exists}}
"""

CACHE = """---
apiVersion: serving.kserve.io/v1alpha1
kind: LocalModelCache
metadata: {{name: {name}}}
spec: {{sourceModelUri: "{uri}", modelSize: {size}, nodeGroups: [bench]}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_random(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with path.open("wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= len(block)


def build_models(src: Path, gib: float) -> int:
    each = int(gib * 1024 * MiB) // 3
    for i in range(3):
        d = src / f"m{i + 1}"
        if (d / "model.safetensors").exists() and (d / "model.safetensors").stat().st_size == each:
            continue
        d.mkdir(parents=True, exist_ok=True)
        write_random(d / "model.safetensors", each)
        (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return 3 * (each + len('{"architectures": ["LlamaForCausalLM"]}'))


def agent_argv(cache: Path, docs: Path, *extra: str) -> list[str]:
    return [
        MC, "agent", "--node-name", "bench", "--cache-dir", str(cache), "--standalone", str(docs),
        "--node-labels", "bench=yes", "--metrics-addr", "off", *extra,
    ]  # fmt: skip


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        argv, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def throughput(work: Path, gib: float) -> None:
    src = work / "src"
    total = build_models(src, gib)
    hub = subprocess.Popen([PY, "-c", HUB.format(root=str(ROOT), src=str(src))], stdout=subprocess.PIPE)
    try:
        assert hub.stdout is not None
        env = {"HF_ENDPOINT": hub.stdout.readline().decode().strip(), "HF_HUB_DISABLE_XET": "1"}
        out = work / "pull"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        pull_s = sum(
            timed([MC, "pull", f"hf://bench/m{i}", str(out / f"m{i}"), "--quiet"], env) for i in (1, 2, 3)
        )
        shutil.rmtree(out, ignore_errors=True)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        docs = work / "three.yaml"
        docs.write_text(
            GROUP.format(cache=cache)
            + "".join(CACHE.format(name=f"m{i}", uri=f"hf://bench/m{i}", size="1Gi") for i in (1, 2, 3))
        )
        agent_s = timed(
            agent_argv(cache, docs, "--once", "--health-addr", "off", "--max-concurrent-downloads", "3"), env
        )
        shutil.rmtree(cache, ignore_errors=True)
    finally:
        hub.kill()
    mb = total / 1e6
    print(f"data: 3 models, {mb:.0f} MB in all")
    print(f"  modelcache pull, one after the other : {pull_s:6.2f} s  {mb / pull_s:7.0f} MB/s")
    print(f"  modelcache agent, 3 at once (--once) : {agent_s:6.2f} s  {mb / agent_s:7.0f} MB/s")
    print(f"  agent / pull throughput              : {pull_s / agent_s:.2f} (target >= 0.90)")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(work: Path, n: int, seconds: float) -> None:
    src = work / "small"
    cache = work / "idle-cache"
    shutil.rmtree(cache, ignore_errors=True)
    docs = work / "fifty.yaml"
    text = GROUP.format(cache=cache)
    for i in range(n):
        d = src / f"s{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "model.safetensors").exists():
            (d / "model.safetensors").write_bytes(os.urandom(256 * 1024))
            (d / "config.json").write_text("{}")
        text += CACHE.format(name=f"s{i:03d}", uri=f"file://{d}", size="1Mi")
    docs.write_text(text)
    timed(agent_argv(cache, docs, "--once", "--health-addr", "off"), {})
    port = free_port()
    log = work / "idle.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(agent_argv(cache, docs, "--health-addr", f"127.0.0.1:{port}"), stderr=fh)
    try:
        ready_s = None
        while time.perf_counter() - start < 30:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        ready_s = time.perf_counter() - start
                        break
            except OSError:
                time.sleep(0.02)
        time.sleep(3)  # past the first status write
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(seconds)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
        rss = rss_mib(proc.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            status = json.load(r)["status"]
    finally:
        proc.terminate()
        proc.wait()
    scan = re.search(r"published model\(s\).* in ([0-9.]+)s", log.read_text())
    bare = subprocess.Popen(
        [
            PY,
            "-c",
            "import asyncio, aiohttp, prometheus_client, yaml, huggingface_hub, boto3, time; time.sleep(30)",
        ]
    )
    time.sleep(4)
    bare_rss = rss_mib(bare.pid)
    bare.kill()
    print(f"idle agent holding {n} models ({status.get('summary')}):")
    print(f"  start-up rescan (from its log)       : {scan.group(1) if scan else '?'} s (target < 1 s)")
    print(
        f"  process start to /readyz 200         : {ready_s:.2f} s" if ready_s else "  /readyz: never ready"
    )
    print(f"  RSS while idle                       : {rss:.0f} MiB (target < 80 MB); bare interpreter "
          f"with the same imports: {bare_rss:.0f} MiB")  # fmt: skip
    print(f"  CPU while idle, {seconds:.0f} s               : {100 * cpu:.2f} % of a core (target < 1 %)")
    shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.5)
    p.add_argument("--idle-models", type=int, default=50)
    p.add_argument("--idle-seconds", type=float, default=20)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/modelcache-bench-agent"))
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.skip_throughput:
        throughput(args.workdir, args.gib)
    idle(args.workdir, args.idle_models, args.idle_seconds)


if __name__ == "__main__":
    main()
