"""A cluster's worth of node agents on one machine, every component the process it is in a cluster.

:class:`Fleet` runs, against a Kubernetes API emulator (tests/support/kubeapi.py) the caller owns:
``modelcache controller`` (one process, no leader election, its ``/readyz`` on a free loopback port)
and one ``modelcache agent`` process per node, each with its own node name, Node object (labelled
into the fleet's node group), cache folder, health port and log file. With peer fill
(:attr:`FleetSettings.peer_fill`) each agent also serves peers on its own ``127.0.0.1`` port
(``--peer-addr``, advertised as is), and all of them read one shared token file
(``--peer-token-file``), unless a node is given a token of its own; the controller gets
``--origin-seeds`` when one is set. The origin (the local hub, S3 files) is the caller's: its endpoint
and credentials go in :attr:`FleetSettings.env`.

The node group has no hostPath: every agent has its own ``--cache-dir`` on one machine, and an agent
refuses a group whose PV path differs from its folder.

Peer fill exists only where the agent has ``--peer-addr`` (issue 18): :func:`peer_fill_missing` says
so by asking ``modelcache agent --help``, for tests to skip on and the benchmark to report.

Every wait is bounded and fails naming what it waited for, with the tails of the processes' logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp

from localmodel.errors import NotFound
from localmodel.kinds import KINDS_BY_NAME, LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, NODE
from localmodel.layout import storage_key
from localmodel.resources import LocalModelNodeStatus, ModelProgress, ModelState
from tests.support.agents import cache_doc, group_doc
from tests.support.agents import stop as stop_process
from tests.support.kubeapi import KubeAPI, kubeconfig

MODELCACHE = (sys.executable, "-m", "modelcache")
GROUP_LABEL = "modelcache-fleet"  # the Node label the fleet's node group selects on


@functools.cache
def _help(command: str) -> str:
    done = subprocess.run([*MODELCACHE, command, "--help"], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def peer_fill_missing() -> str | None:
    """None when this checkout's agent serves peers (``modelcache agent --help`` names
    ``--peer-addr``); otherwise why a peer-fill run cannot happen yet, in one line."""
    if "--peer-addr" in _help("agent"):
        return None
    return "peer fill not built yet: `modelcache agent --help` has no --peer-addr (issue 18, P1-P3)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class FleetSettings:
    """How the fleet's processes run. ``env``: added to every process's environment (the origin's
    endpoint and credentials). ``origin_seeds``: the controller's ``--origin-seeds`` (peer fill only;
    None: its default). ``agent_args``/``controller_args``: more flags for every agent/the
    controller. Seconds: ``status_interval`` (each agent's ``--status-interval``), ``ready_timeout``
    (the bound on each process coming up)."""

    peer_fill: bool = False
    origin_seeds: int | None = None
    chunk_size: str = "1Mi"
    status_interval: float = 0.2
    group: str = "fleet"
    group_limit: str = "100Gi"
    env: Mapping[str, str] = field(default_factory=dict)
    agent_args: tuple[str, ...] = ()
    controller_args: tuple[str, ...] = ()
    ready_timeout: float = 60.0


@dataclass
class FleetAgent:
    """One node: its agent process, folder, log and addresses (``peer``: where it serves peers, as it
    advertises it; None without peer fill)."""

    node: str
    cache: Path
    log: Path
    health: str
    peer: str | None = None
    token_file: Path | None = None
    proc: asyncio.subprocess.Process | None = None

    def copy(self, uri: str) -> Path:
        """Where this node publishes the model of ``uri``."""
        return self.cache / "models" / storage_key(uri)

    def staging(self, uri: str) -> Path:
        return self.cache / ".modelcache" / "staging" / storage_key(uri)


class Fleet:
    """The controller and the agents of one test or benchmark run, under ``work`` (kubeconfig,
    token, logs, one folder per node). Use as ``async with Fleet(...) as fleet:``; leaving stops
    every process it started (SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self, work: Path, api: KubeAPI, settings: FleetSettings | None = None) -> None:
        self.work = work
        self.api = api
        self.settings = settings or FleetSettings()
        self.agents: dict[str, FleetAgent] = {}
        self.controller: asyncio.subprocess.Process | None = None
        self.token = secrets.token_hex(32)
        self.token_file = work / "peer-token"
        self.logs = work / "logs"
        self._kubeconfig = work / "kubeconfig"
        self._started = False

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- starting ------------------------------------------------------------------------------

    async def start(self, nodes: Iterable[str]) -> None:
        """The node group, the controller, and one agent per name in ``nodes``, each up (its
        ``/readyz`` 200, its peer port open) before this returns."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(self.token + "\n")
        kubeconfig(self._kubeconfig, self.api.url)
        s = self.settings
        group = group_doc(s.group, limit=s.group_limit, label=GROUP_LABEL)
        await self.api.store.create(KINDS_BY_NAME["LocalModelNodeGroup"], group)
        port = free_port()
        args = ["--kubeconfig", str(self._kubeconfig), "--resync", "1", "--no-leader-elect"]
        args += ["--metrics-addr", f"127.0.0.1:{port}", *s.controller_args]
        if s.peer_fill and s.origin_seeds is not None:
            args += ["--origin-seeds", str(s.origin_seeds)]
        self.controller = await self._spawn("controller", args, self.logs / "controller.log")
        self._started = True
        await self._ready("controller", self.controller, f"127.0.0.1:{port}")
        await asyncio.gather(*(self.add_node(n) for n in nodes))
        if s.peer_fill:
            await self._peers_reported(list(nodes))

    async def _peers_reported(self, nodes: list[str]) -> None:
        """Each of ``nodes`` reports its peer address in its LocalModelNode status: before that the
        controller cannot know the group has peer fill, and starts every node on the origin."""
        deadline = time.monotonic() + self.settings.ready_timeout
        left = [n for n in nodes if self.agents[n].peer is not None]
        while left:
            left = [n for n in left if (await self.status(n)).peer_address != self.agents[n].peer]
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no status.peerAddress from {left}\n{self.tails()}")
            for n in left:
                proc = self.agents[n].proc
                assert proc is not None
                self._alive(n, proc)
            await asyncio.sleep(0.1)

    async def add_node(
        self, node: str, *, token: str | None = None, agent_args: Iterable[str] = ()
    ) -> FleetAgent:
        """A Node object in the fleet's group and its agent, up. ``token``: this agent's own peer
        token (a file of its own) instead of the fleet's."""
        s = self.settings
        labels = {GROUP_LABEL: s.group, "kubernetes.io/hostname": node}
        await self.api.store.create(
            NODE, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": labels}}
        )
        folder = self.work / "nodes" / node
        agent = FleetAgent(node, folder / "cache", self.logs / f"{node}.log", f"127.0.0.1:{free_port()}")
        args = [
            "--node-name", node, "--cache-dir", str(agent.cache), "--kubeconfig", str(self._kubeconfig),
            "--health-addr", agent.health, "--metrics-addr", "off", "--resync", "1",
            "--status-interval", str(s.status_interval), "--chunk-size", s.chunk_size,
            "--eviction-grace", "0",
            "--allow-private-sources",  # the origin is on 127.0.0.1
        ]  # fmt: skip
        if s.peer_fill:
            agent.peer = f"127.0.0.1:{free_port()}"
            agent.token_file = self.token_file
            if token is not None:
                agent.token_file = folder / "peer-token"
                folder.mkdir(parents=True, exist_ok=True)
                agent.token_file.write_text(token + "\n")
            args += ["--peer-addr", agent.peer, "--peer-token-file", str(agent.token_file)]
        args += [*s.agent_args, *agent_args]
        self.agents[node] = agent
        agent.proc = await self._spawn("agent", args, agent.log)
        await self._ready(node, agent.proc, agent.health)
        if agent.peer is not None:
            await self._port_open(node, agent.proc, agent.peer)
        return agent

    async def _spawn(self, command: str, args: list[str], log: Path) -> asyncio.subprocess.Process:
        env = {**os.environ, "HF_HUB_DISABLE_XET": "1", **self.settings.env}
        with log.open("ab") as out:  # the child keeps its own descriptor
            return await asyncio.create_subprocess_exec(
                *MODELCACHE, command, *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
            )

    async def _ready(self, name: str, proc: asyncio.subprocess.Process, addr: str) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() < deadline:
                self._alive(name, proc)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"http://{addr}/readyz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{name}: /readyz not 200 within {self.settings.ready_timeout}s\n{self.tails()}")

    async def _port_open(self, name: str, proc: asyncio.subprocess.Process, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        deadline = time.monotonic() + self.settings.ready_timeout
        while time.monotonic() < deadline:
            self._alive(name, proc)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise AssertionError(f"{name}: peer port {addr} not open within the bound\n{self.tails()}")

    def _alive(self, name: str, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}\n{self.tails()}")

    # -- the work ------------------------------------------------------------------------------

    async def add_cache(self, name: str, uri: str, size: str) -> None:
        """A LocalModelCache of ``uri`` for the fleet's group: the controller places it on every
        node of the group."""
        await self.api.store.create(LOCAL_MODEL_CACHE, cache_doc(name, uri, size, [self.settings.group]))

    async def status(self, node: str) -> LocalModelNodeStatus:
        """The node's LocalModelNode status (empty before the controller made the object)."""
        try:
            obj = await self.api.store.get(LOCAL_MODEL_NODE, node)
        except NotFound:  # until the controller creates it
            return LocalModelNodeStatus()
        return LocalModelNodeStatus.from_json(obj.get("status") or {})

    async def progress(self, node: str, cache: str) -> ModelProgress | None:
        return (await self.status(node)).models.get(cache)

    async def wait_downloaded(
        self, cache: str, nodes: Iterable[str] | None = None, *, timeout: float = 120.0
    ) -> dict[str, float]:
        """Wait until every node of ``nodes`` (default: all) reports ``cache`` ModelDownloaded;
        the seconds since the call at which each was first seen so (polled every 0.1 s). A node
        that reports ModelDownloadError, or an agent that exits, fails at once."""
        wanted = list(nodes) if nodes is not None else list(self.agents)
        start = time.monotonic()
        done: dict[str, float] = {}
        states: dict[str, ModelState | None] = {}
        while time.monotonic() - start < timeout:
            for node in wanted:
                if node in done:
                    continue
                proc = self.agents[node].proc
                assert proc is not None
                self._alive(node, proc)
                st = await self.status(node)
                states[node] = st.model_status.get(cache)
                if states[node] is ModelState.DOWNLOADED:
                    done[node] = time.monotonic() - start
                elif states[node] is ModelState.ERROR:
                    raise AssertionError(f"{node}: {cache} failed: {st.models.get(cache)}\n{self.tails()}")
            if len(done) == len(wanted):
                return done
            await asyncio.sleep(0.1)
        raise AssertionError(f"{cache} not downloaded within {timeout}s: {states}\n{self.tails()}")

    async def kill(self, node: str) -> None:
        """SIGKILL the node's agent (a node lost mid-transfer)."""
        proc = self.agents[node].proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    # -- stopping ------------------------------------------------------------------------------

    async def stop(self) -> dict[str, int | None]:
        """Stop every process (SIGTERM, SIGKILL after 10 s); their exit codes by name."""
        procs = {name: a.proc for name, a in self.agents.items() if a.proc is not None}
        if self.controller is not None:
            procs["controller"] = self.controller
        codes = await asyncio.gather(*(stop_process(p) for p in procs.values()))
        return dict(zip(procs, codes, strict=True))

    def tails(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of every log, for a failure's message."""
        if not self.logs.is_dir():
            return ""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.logs.iterdir())
        )


def identical(copy: Path, source: Mapping[str, Path]) -> list[str]:
    """The relative paths of ``source`` (relative path -> file) whose bytes ``copy`` does not hold
    exactly (missing or different); empty when the copy is byte-identical."""
    wrong = []
    for rel, src in sorted(source.items()):
        got = copy / rel
        if not got.is_file() or got.stat().st_size != src.stat().st_size or not _same(got, src):
            wrong.append(rel)
    return wrong


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True
