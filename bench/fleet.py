"""Benchmark: a fleet of N node agents filling one model, from the origin alone or from each other.

    .venv/bin/python bench/fleet.py [--quick] [--mode origin|peers|both] [--gib 2] [--nodes 2,4,8]
                                    [--origin-rate 100MB/s] [--origin-seeds 1] [--chunk-size 16Mi]

One machine, every component a process as in a cluster (tests/support/fleet.py): the Kubernetes API
emulator, ``modelcache controller`` and N ``modelcache agent`` processes with their own cache folders
on loopback. The origin is the local Hugging Face hub, every file body paced through one shared link
of ``--origin-rate`` (default 100 MB/s, standing for the WAN link to a real hub) and counted.

A ``--gib`` model (default 2 GiB: shards of at most 512 MiB and a config.json) is cached by N = 2, 4,
8 nodes (``--nodes``) in each mode:

- ``origin``: today's behaviour, every node fetches every byte from the origin;
- ``peers``: peer fill (issue 18): each agent serves peers (``--peer-addr``, one
  ``--peer-token-file``), the controller starts ``--origin-seeds`` nodes on the origin and lets the
  others fill from them. Reported as skipped where the agent has no ``--peer-addr`` yet.

In the same run and mode, one node alone first: its time is the anchor. Per N and mode one line::

    fleet: mode=<origin|peers> n=<N> origin_ratio=<origin bytes / model bytes> time_ratio=<time for all N / time for one alone>

then where the time went (first and last node done, the floor: the model's bytes at the origin's
rate, bytes by source from the nodes' status; each node's download start and end, from its log;
the CPU seconds of the agents, the controller and this process (the hub and the API emulator)
against the machine's cores over the run: near 100% means the run was CPU-bound). Targets for peers: origin_ratio <= 1.05 for any N,
time_ratio <= 1.3. ``--quick``: a 256 MiB model, N = 3 only (a check of a minute or two).

Time is from the LocalModelCache's creation (every process already up) to the last node seen
ModelDownloaded in its LocalModelNode status (polled every 0.1 s; agents write status every 0.1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support is not an installed package

from localmodel.errors import InvalidInput  # noqa: E402
from localmodel.quantity import parse_rate, parse_size  # noqa: E402
from tests.support.fleet import Fleet, FleetSettings, peer_fill_missing  # noqa: E402
from tests.support.hfhub import Hub  # noqa: E402
from tests.support.kubeapi import KubeAPI  # noqa: E402

MiB = 1 << 20
SHARD = 512 * MiB
REPO = "bench/fleet"
URI = f"hf://{REPO}"


@dataclass(frozen=True)
class Run:
    mode: str
    n: int
    seconds: float  # until the last node held the model
    first: float  # until the first did
    origin_bytes: int  # file body bytes the hub sent
    from_origin: int | None  # the nodes' own account (status.models[].bytesFromOrigin), summed
    from_peers: int | None
    timeline: dict[str, tuple[float | None, float | None]]  # node -> download start, end (s from creation)
    cpu: dict[str, float]  # "agents", "controller", "bench" (hub and API emulator) -> CPU seconds


LOGGED = re.compile(r"^(\S+ \S+) INFO modelcache\.agent: (DownloadStarted|DownloadCompleted): ")


def timeline(log: Path, since: float) -> tuple[float | None, float | None]:
    """When the agent logged the download's start and end, in seconds after ``since`` (epoch)."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if m := LOGGED.match(line):
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.setdefault(m.group(2), when - since)
    return found.get("DownloadStarted"), found.get("DownloadCompleted")


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU seconds of a live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_model(folder: Path, size: int) -> dict[str, Path]:
    """Random shards of at most SHARD bytes summing to ``size``, and a config.json; reused when a
    previous run left the same sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    shards = max(1, -(-size // SHARD))
    for i in range(shards):
        path = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        want = min(SHARD, size - i * SHARD)
        if not path.exists() or path.stat().st_size != want:
            block = os.urandom(16 * MiB)
            with path.open("wb") as fh:
                left = want
                while left > 0:
                    fh.write(block[: min(left, len(block))])
                    left -= len(block)
        files[path.name] = path
    for stale in folder.glob("model-*.safetensors"):
        if stale.name not in files:
            stale.unlink()
    config = folder / "config.json"
    config.write_text('{"architectures": ["LlamaForCausalLM"]}')
    files[config.name] = config
    return files


async def one_run(hub: Hub, work: Path, mode: str, n: int, model_bytes: int, args: argparse.Namespace) -> Run:
    api = KubeAPI()
    await api.start()
    folder = work / f"run-{mode}-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = FleetSettings(
        peer_fill=mode == "peers",
        origin_seeds=args.origin_seeds,
        chunk_size=args.chunk_size,
        status_interval=0.1,
        env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1"},
    )
    # Bound: every node from the origin one after the other, three times over, and a few minutes.
    bound = 3 * n * model_bytes / args.origin_rate + 300
    try:
        async with Fleet(folder, api, settings) as fleet:
            await fleet.start([f"node-{i}" for i in range(n)])
            hub.reset_counts()
            procs = [a.proc.pid for a in fleet.agents.values() if a.proc is not None]
            ctl = fleet.controller.pid if fleet.controller is not None else None
            cpu0 = (sum(cpu_seconds(p) for p in procs), cpu_seconds(ctl), time.process_time())
            created = time.time()
            await fleet.add_cache("fleet", URI, f"{model_bytes // MiB + 64}Mi")
            done = await fleet.wait_downloaded("fleet", timeout=bound)
            cpu = {
                "agents": sum(cpu_seconds(p) for p in procs) - cpu0[0],
                "controller": cpu_seconds(ctl) - cpu0[1],
                "bench": time.process_time() - cpu0[2],
            }
            progress = [await fleet.progress(node, "fleet") for node in fleet.agents]
            times = {node: timeline(a.log, created) for node, a in fleet.agents.items()}
            codes = await fleet.stop()
            if set(codes.values()) != {0}:
                print(f"  (exit codes {codes})", file=sys.stderr)
    finally:
        await api.close()
        shutil.rmtree(folder, ignore_errors=True)
    origin = [p.bytes_from_origin for p in progress if p is not None]
    peers = [p.bytes_from_peers for p in progress if p is not None]
    return Run(
        mode,
        n,
        max(done.values()),
        min(done.values()),
        hub.total_bytes_sent,
        None if None in origin else sum(b or 0 for b in origin),
        None if None in peers else sum(b or 0 for b in peers),
        times,
        cpu,
    )


def report(run: Run, alone: Run, model_bytes: int, rate: float) -> None:
    print(
        f"fleet: mode={run.mode} n={run.n} origin_ratio={run.origin_bytes / model_bytes:.2f} "
        f"time_ratio={run.seconds / alone.seconds:.2f}",
        flush=True,
    )
    mb = 1e6
    by_source = (
        "not reported"
        if run.from_origin is None
        else f"{run.from_origin / mb:.0f} MB from the origin, {(run.from_peers or 0) / mb:.0f} MB from peers"
    )
    print(
        f"  all {run.n} done {run.seconds:.1f} s (first {run.first:.1f} s); one alone {alone.seconds:.1f} s; "
        f"floor {model_bytes / rate:.1f} s (model at the origin's rate), {run.n}x that "
        f"{run.n * model_bytes / rate:.1f} s; the hub sent {run.origin_bytes / mb:.0f} MB; nodes' status: "
        f"{by_source}",
        flush=True,
    )
    print("  " + where_the_time_went(run), flush=True)


def where_the_time_went(run: Run) -> str:
    """Each node's download (start-end, s from the cache's creation) and the CPU the run used."""

    def at(t: float | None) -> str:
        return "?" if t is None else f"{t:.1f}"

    nodes = ", ".join(f"{n} {at(a)}-{at(b)}" for n, (a, b) in sorted(run.timeline.items()))
    total = sum(run.cpu.values())
    cores = os.cpu_count() or 1
    share = total / (cores * run.seconds) if run.seconds else 0.0
    parts = ", ".join(f"{k} {v:.1f}" for k, v in run.cpu.items())
    return (
        f"downloads (s): {nodes}; CPU s: {parts} = {total:.1f} over {run.seconds:.1f} s on {cores} "
        f"cores ({share:.0%} of the machine)"
    )


async def bench(args: argparse.Namespace) -> None:
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_bytes_wanted = int(args.gib * 1024) * MiB
    files = build_model(work / "source", model_bytes_wanted)
    model_bytes = sum(p.stat().st_size for p in files.values())
    hub = Hub(link_rate=args.origin_rate)
    hub.add_repo(REPO, dict(files))
    await hub.start()
    print(
        f"fleet: a {model_bytes / MiB:.0f} MiB model ({len(files)} files), origin paced at "
        f"{args.origin_rate / 1e6:.0f} MB/s, chunks of {args.chunk_size}, N = {args.nodes}",
        flush=True,
    )
    try:
        for mode in args.modes:
            missing = peer_fill_missing() if mode == "peers" else None
            if missing is not None:
                print(f"fleet: mode={mode} skipped: {missing}", flush=True)
                continue
            alone = await one_run(hub, work, mode, 1, model_bytes, args)
            print(f"  {mode}: one node alone {alone.seconds:.1f} s; {where_the_time_went(alone)}", flush=True)
            for n in args.nodes:
                report(
                    await one_run(hub, work, mode, n, model_bytes, args), alone, model_bytes, args.origin_rate
                )
    finally:
        await hub.close()
    if "peers" in args.modes:
        print("targets (peers): origin_ratio <= 1.05 for any N; time_ratio <= 1.30")


def _checked(parse: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def check(text: str) -> float | int:
        try:
            return parse(text)
        except InvalidInput as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return check


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a 256 MiB model, N = 3 only")
    p.add_argument("--mode", choices=("origin", "peers", "both"), default="both")
    p.add_argument("--gib", type=float, default=2.0, help="the model's size in GiB (2)")
    p.add_argument("--nodes", default="2,4,8", help="fleet sizes, comma-separated (2,4,8)")
    p.add_argument(
        "--origin-rate", type=_checked(parse_rate), default=100e6, help="the origin's link (100MB/s)"
    )
    p.add_argument("--chunk-size", default="16Mi", help="every agent's --chunk-size (16Mi)")
    p.add_argument("--origin-seeds", type=int, default=1, help="peers mode: the controller's --origin-seeds")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/modelcache-bench-fleet"))
    args = p.parse_args()
    try:
        parse_size(args.chunk_size)  # refused here in one line rather than by every agent
    except InvalidInput as e:
        p.error(str(e))
    if args.quick:
        args.gib, args.nodes = 0.25, "3"
    args.nodes = [int(n) for n in args.nodes.split(",")]
    args.modes = ["origin", "peers"] if args.mode == "both" else [args.mode]
    # The emulator's watch streams are cut when a run's processes stop: aiohttp logs each as an error.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
