"""The controller's Prometheus metrics (controller/metrics.py): counted by a controller over the
embedded state with a fresh registry, and served at /metrics by `modelcache controller`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from controller import cli
from controller.metrics import ControllerMetrics, MetricsServer
from controller.reconcile import Controller
from localmodel.errors import ClusterStateError, InvalidInput
from localmodel.kinds import EVENT, JSON, LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, ResourceKind
from localmodel.resources import Copies
from localmodel.state.memory import MemoryState
from tests.test_controller_reconcile import cache, eventually, setup_two_groups, write_docs


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def copies(
    registry: CollectorRegistry, cache_name: str, group: str, namespace: str = ""
) -> tuple[float | None, ...]:
    """(available, total, failed) of one cache in one group (``namespace``: a
    LocalModelNamespaceCache's); None where there is no series."""
    return tuple(
        value(
            registry,
            "modelcache_controller_copies",
            cache=cache_name,
            namespace=namespace,
            group=group,
            state=s,
        )
        for s in ("available", "total", "failed")
    )


async def until(cond: Callable[[], bool]) -> None:
    async def check() -> bool:
        return cond()

    await eventually(check)


def copy_series(registry: CollectorRegistry) -> set[tuple[str, str]]:
    return {
        (s.labels["cache"], s.labels["group"])
        for m in registry.collect()
        if m.name == "modelcache_controller_copies"
        for s in m.samples
    }


async def test_one_reconcile_counts_copies_per_cache_and_group() -> None:
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry)
    state = MemoryState()
    await setup_two_groups(state)  # a100: a1, a2 (500Gi); h100: h1 (100Gi)
    await state.create(LOCAL_MODEL_CACHE, cache("small", "60Gi", ["a100", "h100"]))
    await state.create(LOCAL_MODEL_CACHE, cache("big", "140Gi", ["a100", "h100"]))
    await Controller(state, metrics=metrics).run(once=True)

    assert copies(registry, "big", "a100") == (0, 2, 0)
    assert copies(registry, "big", "h100") == (0, 0, 0)  # refused there: no node must hold it
    assert copies(registry, "small", "a100") == (0, 2, 0)
    assert copies(registry, "small", "h100") == (0, 1, 0)
    assert value(registry, "modelcache_controller_reconciles_total", kind="full") == 1
    assert value(registry, "modelcache_controller_reconciles_total", kind="incremental") == 0
    assert value(registry, "modelcache_controller_reconcile_duration_seconds_count") == 1
    assert value(registry, "modelcache_controller_writes_total", kind="LocalModelNode") == 3
    # two finalizers, two cache statuses; two group statuses; Events
    assert value(registry, "modelcache_controller_writes_total", kind="LocalModelCache") == 4
    assert value(registry, "modelcache_controller_writes_total", kind="LocalModelNodeGroup") == 2
    assert (value(registry, "modelcache_controller_writes_total", kind="Event") or 0) >= 3
    assert value(registry, "modelcache_controller_write_errors_total") == 0
    assert value(registry, "modelcache_controller_is_leader") == 0  # the CLI sets it, not the loop

    # An unchanged cluster: a second controller writes nothing and reports the same copies.
    again = CollectorRegistry()
    await Controller(state, metrics=ControllerMetrics(again)).run(once=True)
    assert copies(again, "small", "h100") == (0, 1, 0)
    assert not [m for m in again.collect() if m.name == "modelcache_controller_writes" and m.samples]


async def test_copies_follow_agents_and_series_of_gone_caches_and_groups_go() -> None:
    registry = CollectorRegistry()
    state = MemoryState()
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("small", "60Gi", ["a100", "h100"]))
    await state.create(LOCAL_MODEL_CACHE, cache("other", "10Gi", ["a100"]))
    controller = Controller(state, metrics=ControllerMetrics(registry))
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(resync=30, retry_delay=0.05, stop=stop))
    try:
        await until(lambda: copies(registry, "small", "a100") == (0, 2, 0))
        # Agents report: a1 holds it, a2 failed, h1 holds it. Incremental reconciles count them.
        await state.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"small": "ModelDownloaded"}})
        await state.patch_status(LOCAL_MODEL_NODE, "a2", {"modelStatus": {"small": "ModelDownloadError"}})
        await state.patch_status(LOCAL_MODEL_NODE, "h1", {"modelStatus": {"small": "ModelDownloaded"}})
        await until(
            lambda: (
                copies(registry, "small", "a100") == (1, 2, 1)
                and copies(registry, "small", "h100") == (1, 1, 0)
            )
        )
        assert (value(registry, "modelcache_controller_reconciles_total", kind="incremental") or 0) >= 1
        assert copies(registry, "other", "a100") == (0, 2, 0)  # untouched by those passes

        # The cache drops h100, then "other" is deleted: their series go.
        await state.patch(LOCAL_MODEL_CACHE, "small", {"spec": {"nodeGroups": ["a100"]}})
        await until(lambda: copy_series(registry) == {("small", "a100"), ("other", "a100")})
        await state.delete(LOCAL_MODEL_CACHE, "other")
        await until(lambda: copy_series(registry) == {("small", "a100")})
        assert value(registry, "modelcache_controller_write_errors_total") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class _NoEvents(MemoryState):
    async def create(self, kind: ResourceKind, obj: JSON, **kw: Any) -> JSON:
        if kind is EVENT:
            raise ClusterStateError("events are refused here")
        return await super().create(kind, obj, **kw)


async def test_failed_writes_are_counted() -> None:
    registry = CollectorRegistry()
    state = _NoEvents()
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("small", "60Gi", ["a100"]))
    await Controller(state, metrics=ControllerMetrics(registry)).run(once=True)  # Events are best effort
    assert (value(registry, "modelcache_controller_write_errors_total") or 0) >= 1
    assert value(registry, "modelcache_controller_writes_total", kind="Event") is None
    assert value(registry, "modelcache_controller_writes_total", kind="LocalModelNode") == 3  # h1: empty


def test_set_copies_replaces_the_picture() -> None:
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry)
    metrics.set_copies({("m", "g1"): Copies(1, 2, 0), ("m", "g2"): Copies(0, 1, 1)})
    assert copies(registry, "m", "g2") == (0, 1, 1)
    metrics.set_copies({("m", "g1"): Copies(2, 2, 0)})
    assert copies(registry, "m", "g1") == (2, 2, 0)
    assert copies(registry, "m", "g2") == (None, None, None)
    metrics.set_copies({})
    assert copy_series(registry) == set()


def test_cli_metrics_flags(tmp_path: Path) -> None:
    write_docs(tmp_path / "docs")
    args = ["--standalone", str(tmp_path / "docs")]
    with pytest.raises(InvalidInput, match="--once does not serve metrics"):
        cli.main([*args, "--once", "--metrics-addr", "127.0.0.1:0"])
    with pytest.raises(InvalidInput, match="--metrics-addr"):
        cli.main([*args, "--metrics-addr", "nonsense"])
    with pytest.raises(InvalidInput, match="--metrics-addr"):
        cli.main([*args, "--metrics-addr", "127.0.0.1:70000"])
    assert cli.main([*args, "--once", "--metrics-addr", "off"]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cli_serves_metrics(tmp_path: Path) -> None:
    write_docs(tmp_path / "docs")  # big (140Gi) on a100 (a1) and h100 (h1, too small: refused)
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelcache", "controller", "--standalone", str(tmp_path / "docs"),
        "--metrics-addr", f"127.0.0.1:{port}", "--log-level", "WARNING",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    text = ""
    try:
        async with aiohttp.ClientSession() as http:

            async def scraped() -> bool:
                nonlocal text
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                        assert r.status == 200
                        assert r.headers["Content-Type"].startswith("text/plain")
                        text = await r.text()
                if proc.returncode is not None:
                    raise AssertionError("the controller exited")
                return 'modelcache_controller_reconciles_total{kind="full"} 1.0' in text

            await eventually(scraped, timeout=8)
        lines = set(text.splitlines())
        assert "modelcache_controller_is_leader 1.0" in lines
        assert (
            'modelcache_controller_copies{cache="big",group="a100",namespace="",state="total"} 1.0' in lines
        )
        assert (
            'modelcache_controller_copies{cache="big",group="a100",namespace="",state="available"} 0.0'
            in lines
        )
        assert (
            'modelcache_controller_copies{cache="big",group="h100",namespace="",state="total"} 0.0' in lines
        )
        assert "modelcache_controller_write_errors_total 0.0" in lines
        inf = 'modelcache_controller_reconcile_duration_seconds_bucket{le="+Inf"}'
        assert any(x.startswith(inf) for x in lines)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()[-2000:]


async def test_is_leader_while_the_controller_runs() -> None:
    """`_go` runs only while this replica leads: 1 meanwhile, 0 and no copies after."""
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry)
    state = MemoryState()
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("small", "60Gi", ["a100"]))
    seen: list[float | None] = []

    class Watched(Controller):
        async def run(self, **kw: Any) -> None:
            seen.append(value(registry, "modelcache_controller_is_leader"))
            await super().run(**kw)
            seen.append(value(registry, "modelcache_controller_is_leader"))

    assert await cli._go(Watched(state, metrics=metrics), cli.ControllerSettings(once=True), state) == 0
    assert seen == [1, 1]
    assert value(registry, "modelcache_controller_is_leader") == 0
    assert copy_series(registry) == set()  # a standby keeps no stale picture


async def test_a_slow_client_is_cut_off() -> None:
    """Partial headers, then silence: the server closes the connection (aiohttp's own default would
    keep it an hour). The wait is bounded far above the limit under test."""
    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0", header_timeout=1.0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        async with asyncio.timeout(31):
            assert await reader.read() == b""
        writer.close()
    finally:
        await server.stop()
