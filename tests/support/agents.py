"""Helpers for the agent's tests: documents to seed a cluster state with, and an agent run in-process
against either backend (the embedded state, or the Kubernetes API emulator over HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from agent.download.source_settings import SourceSettings
from agent.download.transfer import TransferSettings
from agent.loop import Agent, AgentSettings
from agent.metrics import AgentMetrics
from localmodel.kinds import JSON, LOCAL_MODEL_NODE, LOCAL_MODEL_NODE_GROUP
from localmodel.layout import storage_key
from localmodel.state.base import ClusterState
from localmodel.state.kube import KubeState
from localmodel.state.memory import MemoryState
from tests.support.kubeapi import KubeAPI


def group_doc(name: str, *, limit: str = "1Gi", path: Path | None = None, label: str = "gpu") -> JSON:
    spec: JSON = {
        "storageLimit": limit,
        "persistentVolumeSpec": {
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": label, "operator": "In", "values": [name]}]}
                    ]
                }
            }
        },
    }
    if path is not None:
        spec["persistentVolumeSpec"]["hostPath"] = {"path": str(path)}
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": name},
        "spec": spec,
    }


def node_doc(name: str, models: Sequence[tuple[str, str, str | None]], *, group: str = "g") -> JSON:
    """``models``: (modelName, sourceModelUri, modelSize or None)."""
    local = []
    for model_name, uri, size in models:
        entry: JSON = {"sourceModelUri": uri, "modelName": model_name, "nodeGroup": group}
        if size is not None:
            entry["modelSize"] = size
        local.append(entry)
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "metadata": {"name": name},
        "spec": {"localModels": local},
    }


def cache_doc(name: str, uri: str, size: str, groups: list[str]) -> JSON:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": name},
        "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": groups},
    }


@dataclass
class Cluster:
    """``state`` is what the agent talks to; ``store`` is where tests read and write directly."""

    state: ClusterState
    store: MemoryState
    kind: str


@pytest_asyncio.fixture(params=["memory", "kube"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    if request.param == "memory":
        memory = MemoryState()
        yield Cluster(memory, memory, "memory")
        return
    api = KubeAPI()
    await api.start()
    state = KubeState.for_url(api.url, watch_timeout=5)
    try:
        yield Cluster(state, api.store, "kube")
    finally:
        await state.close()
        await api.close()


@dataclass
class Running:
    agent: Agent
    registry: CollectorRegistry
    stop: asyncio.Event
    task: asyncio.Task[int]
    cache_dir: Path
    store: MemoryState | None = None
    node: str = "n1"
    seen: list[JSON] = field(default_factory=list)

    def model_dir(self, uri: str) -> Path:
        return self.cache_dir / "models" / storage_key(uri)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    async def status(self) -> JSON:
        assert self.store is not None
        obj = await self.store.get(LOCAL_MODEL_NODE, self.node)
        return dict(obj.get("status") or {})

    async def finish(self) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, 30)


async def eventually(check: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def fast_settings(cache_dir: Path, *, node: str = "n1", **kw: Any) -> AgentSettings:
    base: dict[str, Any] = {
        "node_name": node,
        "cache_dir": cache_dir,
        "resync": 0.5,
        "status_interval": 0.05,
        "retry_base": 0.3,
        "retry_cap": 1.0,
        "transfer": TransferSettings(chunk_size=1 << 20, backoff_initial=0.01, backoff_max=0.05),
        "sources": SourceSettings.from_env(),
    }
    base.update(kw)
    return AgentSettings(**base)


@contextlib.asynccontextmanager
async def running_agent(
    state: ClusterState, cache_dir: Path, *, store: MemoryState | None = None, **kw: Any
) -> AsyncIterator[Running]:
    registry = CollectorRegistry()
    source_error = kw.pop("source_error", lambda: None)
    refused = kw.pop("refused", lambda: ())
    agent = Agent(
        state=state,
        settings=fast_settings(cache_dir, **kw),
        metrics=AgentMetrics(registry),
        source_error=source_error,
        refused=refused,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    run = Running(agent, registry, stop, task, cache_dir, store, node=agent.settings.node_name)
    try:
        yield run
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


async def seed(store: MemoryState, *objs: JSON) -> None:
    from localmodel.kinds import KINDS_BY_NAME

    for obj in objs:
        await store.create(KINDS_BY_NAME[obj["kind"]], obj)


__all__ = [
    "LOCAL_MODEL_NODE",
    "LOCAL_MODEL_NODE_GROUP",
    "Cluster",
    "Running",
    "cache_doc",
    "cluster",
    "eventually",
    "fast_settings",
    "group_doc",
    "node_doc",
    "running_agent",
    "seed",
]


async def stop(proc: asyncio.subprocess.Process) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s; its exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode
