"""The controller (a real ``modelcache controller`` process) and the shared watch the agents use,
under API-server faults injected at the HTTP level by the Kubernetes API emulator, per client: the
API unreachable (connections cut), writes answered 500, a paused leader, another writer rewriting a
LocalModelNode's spec, 410 storms and 429s with Retry-After.

Bounds are generous (the machine is shared): every wait polls with a deadline, and the counts
asserted are upper bounds that a slower machine only lowers. Measured figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.leader import LEASE_NAME
from controller.snapshot import RETAINED_ANNOTATION
from localmodel.errors import NotFound, Unavailable
from localmodel.kinds import (
    EVENT,
    LEASE,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    POD,
)
from localmodel.state.base import WatchEvent, watch
from localmodel.state.kube import (
    MAX_RETRY_AFTER,
    MAX_RETRYING,
    TOO_MANY_ATTEMPTS,
    KubeState,
    parse_retry_after,
)
from tests.support.agents import eventually, stop
from tests.support.kubeapi import KubeAPI, client, every, kubeconfig, path, watches, writes
from tests.test_controller_reconcile import cache, group, node
from tests.test_e2e import spawn

WRITES = ("POST", "PATCH", "PUT", "DELETE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def controller(
    api: KubeAPI, tmp_path: Path, *args: str, pod: str = "ctl", log: str = "controller.log"
) -> AsyncIterator[asyncio.subprocess.Process]:
    config = kubeconfig(tmp_path / "kubeconfig", api.url)
    env = dict(os.environ, POD_NAME=pod)
    proc = await spawn(
        "controller", "--kubeconfig", str(config), "--log-level", "INFO", *args,
        env=env, log=tmp_path / log,
    )  # fmt: skip
    try:
        yield proc
    except BaseException:
        print((tmp_path / log).read_text()[-4000:])
        raise
    finally:
        await stop(proc)


async def two_groups(api: KubeAPI) -> None:
    store = api.store
    await store.create(LOCAL_MODEL_NODE_GROUP, group("a100", "500Gi"))
    await store.create(LOCAL_MODEL_NODE_GROUP, group("h100", "100Gi"))
    for n, gpu in (("a1", "a100"), ("a2", "a100"), ("h1", "h100")):
        await store.create(NODE, node(n, gpu))


async def models_on(api: KubeAPI, name: str) -> list[str] | None:
    try:
        lmn = await api.store.get(LOCAL_MODEL_NODE, name)
    except NotFound:
        return None
    return [m["modelName"] for m in lmn["spec"].get("localModels") or []]


def pod_using(model: str, node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "server",
            "namespace": "team",
            "labels": {"internal.serving.kserve.io/localmodel": model},
        },
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running"},
    }


def writes_of(api: KubeAPI, pid: int, *, since: float = 0.0) -> list[str]:
    return [f"{c.method} {c.path_qs}" for c in api.calls_by(f"pid {pid})", since=since) if c.method in WRITES]


# -- 1. a watch restarted after an error that is not 410 ----------------------------------------


async def test_deletions_during_an_outage_are_acted_on(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    store = kube_api.store
    await store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    async with controller(kube_api, tmp_path, "--no-leader-elect", "--metrics-addr", "off") as proc:
        await eventually(lambda: models_on(kube_api, "h1"), timeout=60, what="h1 to list m")
        await store.create(POD, pod_using("m", "h1"))
        await asyncio.sleep(1)  # the pod reaches the controller before the node changes
        await store.patch(NODE, "h1", {"metadata": {"labels": {"gpu": "none"}}})

        async def retained() -> bool:
            lmn = await store.get(LOCAL_MODEL_NODE, "h1")
            return (lmn["metadata"].get("annotations") or {}).get(RETAINED_ANNOTATION) == "m"

        await eventually(retained, timeout=60, what="m retained on h1 for the pod")
        assert await models_on(kube_api, "a1") == []

        # The API is unreachable for this controller for 8 s; meanwhile the pod and a1's
        # LocalModelNode are deleted.
        kube_api.inject(client(f"pid {proc.pid})"), refuse=True, seconds=8)
        await asyncio.sleep(1)
        await store.delete(POD, "server", namespace="team")
        await store.delete(LOCAL_MODEL_NODE, "a1")
        await asyncio.sleep(7)
        healed = time.monotonic()

        async def converged() -> bool:
            lmn = await store.get(LOCAL_MODEL_NODE, "h1")
            released = RETAINED_ANNOTATION not in (lmn["metadata"].get("annotations") or {})
            return released and not lmn["spec"].get("localModels") and await models_on(kube_api, "a1") == []

        await eventually(converged, timeout=90, what="h1 released and a1 made again")
        print(f"\n[item 1] converged {time.monotonic() - healed:.1f} s after the API came back")
        assert proc.returncode is None


# -- 2. a failed reconcile is retried on a timer ------------------------------------------------


async def test_failed_writes_are_retried_without_another_event(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    store = kube_api.store
    await store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    async with controller(kube_api, tmp_path, "--no-leader-elect", "--metrics-addr", "off") as proc:

        async def placed() -> bool:
            obj = await store.get(LOCAL_MODEL_CACHE, "m")
            return bool(obj["metadata"].get("finalizers")) and await models_on(kube_api, "h1") == ["m"]

        await eventually(placed, timeout=60, what="m placed on h1 with our finalizer")
        await asyncio.sleep(1)
        fault = kube_api.inject(every(client(f"pid {proc.pid})"), writes("PATCH")), status=500, seconds=8)
        await store.delete(LOCAL_MODEL_CACHE, "m")
        await eventually(lambda: fault.hits > 0, timeout=30, what="the controller's PATCH to fail")
        await asyncio.sleep(max(0.0, (fault.until or 0) - time.monotonic()))
        healed = time.monotonic()

        async def gone() -> bool:
            try:
                await store.get(LOCAL_MODEL_CACHE, "m")
            except NotFound:
                return await models_on(kube_api, "h1") == []
            return False

        # Nothing else changes in the cluster: only the controller's own timer can get it there.
        await eventually(gone, timeout=90, what="the finalizer removed and h1 emptied")
        print(f"\n[item 2] {fault.hits} PATCHes failed; converged {time.monotonic() - healed:.1f} s after")


async def test_a_failing_first_reconcile_is_retried_not_fatal(kube_api: KubeAPI, tmp_path: Path) -> None:
    # The API server fails every write from the start (the first, full reconcile included; it once
    # ended the process with "cannot reach the API server"): the process stays, and converges once
    # the API heals.
    await two_groups(kube_api)
    store = kube_api.store
    await store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    fault = kube_api.inject(writes(), status=503, seconds=6)
    async with controller(kube_api, tmp_path, "--no-leader-elect", "--metrics-addr", "off") as proc:
        await eventually(lambda: fault.hits > 0, timeout=60, what="the first reconcile's writes to fail")
        await eventually(lambda: models_on(kube_api, "h1"), timeout=90, what="m placed once the API heals")
        assert proc.returncode is None


# -- 3. a paused leader writes nothing after losing the Lease ------------------------------------


async def _readyz(port: int) -> dict[str, Any] | None:
    with contextlib.suppress(aiohttp.ClientError, OSError):
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
            body: dict[str, Any] = json.loads(await r.text())
            body["status"] = r.status
            return body
    return None


@pytest.mark.slow  # about 40 s: real pauses and storms
async def test_a_paused_leader_writes_nothing_once_it_resumes(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    store = kube_api.store
    await store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    ports = {"a": _free_port(), "b": _free_port()}

    async def holder() -> str:
        try:
            lease = await store.get(LEASE, LEASE_NAME, namespace="default")
        except NotFound:
            return ""
        return str((lease.get("spec") or {}).get("holderIdentity") or "")

    async with controller(
        kube_api, tmp_path, "--metrics-addr", f"127.0.0.1:{ports['a']}", pod="ctl-a", log="a.log"
    ) as a:
        await eventually(lambda: _has_prefix(holder(), "ctl-a_"), timeout=60, what="a to lead")
        await eventually(lambda: models_on(kube_api, "h1"), timeout=60, what="h1 to list m")
        async with controller(
            kube_api, tmp_path, "--metrics-addr", f"127.0.0.1:{ports['b']}", pod="ctl-b", log="b.log"
        ) as b:
            standby = await eventually(lambda: _readyz(ports["b"]), timeout=60, what="b's /readyz")
            assert standby["role"] == "standby"
            leader = await eventually(lambda: _readyz(ports["a"]), timeout=60, what="a's /readyz")
            assert (leader["status"], leader["role"]) == (200, "leader")

            # a is paused in the middle of a reconcile: its writes are slow (2 s each), a new cache
            # starts one, and a stops while its first write is in flight.
            slow = kube_api.inject(every(client(f"pid {a.pid})"), writes()), delay=2)
            await store.create(LOCAL_MODEL_CACHE, cache("n", "10Gi", ["a100", "h100"]))
            await eventually(lambda: slow.hits > 0, timeout=60, what="a to start writing")
            a.send_signal(signal.SIGSTOP)
            paused = time.monotonic()
            kube_api.heal(slow)
            try:
                await eventually(lambda: _has_prefix(holder(), "ctl-b_"), timeout=60, what="b to take over")
                took = time.monotonic() - paused
                await asyncio.sleep(max(0.0, 25 - (time.monotonic() - paused)))
            finally:
                a.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            code = await asyncio.wait_for(a.wait(), 60)
            late = writes_of(kube_api, a.pid, since=resumed)
            print(f"\n[item 3] b led {took:.1f} s after a paused; a exited {code}; a's writes after: {late}")
            assert late == []
            assert code == 1  # lost the Lease: exits to be restarted as a candidate
            await eventually(
                lambda: _on_all(kube_api, ["a1", "a2", "h1"], "n"), timeout=60, what="b places n"
            )
            assert b.returncode is None
            now_leader = await eventually(
                lambda: _status_is(_readyz(ports["b"]), "leader"), timeout=30, what="b's /readyz: leader"
            )
            assert now_leader["status"] == 200


async def _has_prefix(value: Any, prefix: str) -> bool:
    return str(await value).startswith(prefix)


async def _status_is(body: Any, role: str) -> Any:
    got = await body
    return got if got is not None and got.get("role") == role else None


async def _exists(api: KubeAPI, name: str) -> bool:
    return await models_on(api, name) is not None


async def _on_all(api: KubeAPI, names: list[str], model: str) -> bool:
    for name in names:
        if model not in (await models_on(api, name) or []):
            return False
    return True


# -- 4. another writer keeps rewriting a LocalModelNode's spec ----------------------------------


async def test_another_writer_rewriting_a_spec_is_named(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    store = kube_api.store
    await store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    # KServe's localmodel controller, left running, writes as controller-runtime's "manager".
    other = KubeState.for_url(kube_api.url, component="manager")
    try:
        async with controller(kube_api, tmp_path, "--no-leader-elect", "--metrics-addr", "off"):
            await eventually(lambda: models_on(kube_api, "h1"), timeout=60, what="h1 to list m")
            rewrites = 0

            async def contested() -> dict[str, Any] | None:
                nonlocal rewrites
                if await models_on(kube_api, "h1") == ["m"]:
                    await other.patch(LOCAL_MODEL_NODE, "h1", {"spec": {"localModels": []}})
                    rewrites += 1
                lmn = await store.get(LOCAL_MODEL_NODE, "h1")
                conditions = (lmn.get("status") or {}).get("conditions") or []
                found = [c for c in conditions if c.get("type") == "SpecContested"]
                return found[0] if found else None

            condition = await eventually(contested, timeout=90, what="a SpecContested condition")
            assert condition["status"] == "True"
            assert "'manager'" in condition["message"]

            async def contest_events() -> list[dict[str, Any]]:
                return [
                    e
                    for e in (await store.list(EVENT)).items
                    if e.get("reason") == "SpecContested" and e["involvedObject"]["name"] == "h1"
                ]

            # The Event follows the condition's write: read once it is there, not in between.
            events = await eventually(contest_events, timeout=30, what="the SpecContested Event")
            assert len(events) == 1
            assert events[0]["type"] == "Warning"
            assert events[0]["involvedObject"]["kind"] == "LocalModelNode"
            assert "'manager'" in events[0]["message"]
            print(f"\n[item 4] condition and Event after {rewrites} rewrites by the other writer")
    finally:
        await other.close()


# -- 5. manners: 410 storms, Retry-After, readiness ---------------------------------------------


@pytest.mark.slow  # about 40 s: real pauses and storms
async def test_a_410_storm_backs_off_per_watch(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    store = kube_api.store
    async with controller(kube_api, tmp_path, "--no-leader-elect", "--metrics-addr", "off") as proc:
        await eventually(lambda: _exists(kube_api, "h1"), timeout=60, what="h1's LocalModelNode")
        await asyncio.sleep(1)
        me = client(f"pid {proc.pid})")
        storm = 20.0
        started = time.monotonic()
        kube_api.inject(every(me, watches()), expire_watch=True, seconds=storm)
        await asyncio.sleep(storm)
        lists = [
            c
            for c in kube_api.calls_by(f"pid {proc.pid})", since=started)
            if c.method == "GET" and not c.watch and c.path_qs.split("?")[0].endswith("/localmodelnodes")
        ]
        print(f"\n[item 5] LocalModelNode re-lists in a {storm:g} s 410 storm: {len(lists)}")
        # Flat re-lists every ~0.75 s would be ~27; doubling from 2 s (jittered) gives 4 to 7.
        assert 1 <= len(lists) <= 9
        # After the storm the watches work again: a change is acted on.
        await store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
        await eventually(lambda: _on_all(kube_api, ["h1"], "m"), timeout=90, what="m placed after the storm")


async def test_shared_watch_reports_deletions_after_an_outage_and_backs_off(kube_api: KubeAPI) -> None:
    """What the agents run: watch() from localmodel.state.base over the HTTP client."""
    store = kube_api.store
    for n in ("n1", "n2", "n3"):
        await store.create(NODE, node(n, "x"))
    state = KubeState.for_url(kube_api.url, watch_timeout=30)
    seen: list[tuple[str, str]] = []

    async def consume() -> None:
        async for event in watch(state, NODE, retry_delay=0.5, max_delay=4):
            seen.append((event.type, event.object["metadata"]["name"]))

    task = asyncio.create_task(consume())
    try:
        await eventually(lambda: len(seen) == 3, what="the first list")
        kube_api.inject(client("modelcache/"), refuse=True, seconds=3)
        await store.delete(NODE, "n2")
        await store.create(NODE, node("n4", "x"))
        await eventually(lambda: ("DELETED", "n2") in seen, timeout=30, what="n2 reported DELETED")
        assert ("ADDED", "n4") in seen
        assert seen.count(("ADDED", "n1")) == 1  # not reported as new again

        # A 410 storm: re-lists back off (0.5 s doubling to 4 s, jittered), instead of every 0.5 s.
        started = time.monotonic()
        kube_api.inject(watches(), expire_watch=True, seconds=12)
        await asyncio.sleep(12)
        lists = [
            c
            for c in kube_api.calls
            if c.at >= started and not c.watch and c.path_qs.startswith("/api/v1/nodes")
        ]
        print(f"\n[item 5] shared watch: {len(lists)} re-lists in a 12 s 410 storm")
        assert 2 <= len(lists) <= 8  # flat every 0.25-0.5 s would be 24 or more
        await store.delete(NODE, "n3")
        await eventually(lambda: ("DELETED", "n3") in seen, timeout=30, what="the watch back after the storm")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await state.close()


async def test_retry_after_is_honoured(kube_api: KubeAPI) -> None:
    await kube_api.store.create(NODE, node("n1", "x"))
    state = KubeState.for_url(kube_api.url)
    try:
        kube_api.inject(client("modelcache/"), status=429, retry_after=2, times=2)
        obj = await state.get(NODE, "n1")
        assert obj["metadata"]["name"] == "n1"
        gets = [c for c in kube_api.calls if c.path_qs == "/api/v1/nodes/n1"]
        assert [c.status for c in gets] == [429, 429, 200]
        assert gets[1].at - gets[0].at >= 1.9 and gets[2].at - gets[1].at >= 1.9

        # The shared watch: a 429 on its list waits the Retry-After asked, longer than its backoff.
        kube_api.calls.clear()
        kube_api.inject(
            every(client("modelcache/"), lambda r: not r.query.get("watch")),
            status=429,
            retry_after=3,
            times=5,
        )
        events: list[WatchEvent] = []

        async def consume() -> None:
            async for event in watch(state, NODE, retry_delay=0.1, max_delay=10):
                events.append(event)

        task = asyncio.create_task(consume())
        try:
            await eventually(lambda: events, timeout=60, what="the list after the 429s")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lists = [c for c in kube_api.calls if c.path_qs.startswith("/api/v1/nodes") and not c.watch]
        # tenacity inside the client waits 3 s between its five tries, then watch() waits 3 s too
        assert [c.status for c in lists[:6]] == [429, 429, 429, 429, 429, 200]
        gaps = [b.at - a.at for a, b in itertools.pairwise(lists[:6])]
        assert min(gaps) >= 2.9, gaps
    finally:
        await state.close()


async def test_readyz_follows_the_api_server(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    port = _free_port()
    args = ("--no-leader-elect", "--metrics-addr", f"127.0.0.1:{port}", "--ready-window", "3")
    async with controller(kube_api, tmp_path, *args) as proc:

        async def answering(code: int) -> dict[str, Any] | None:
            body = await _readyz(port)
            if body is not None and body["status"] != code:
                return None if body["status"] in (200, 503) else body  # anything else: stop, say it
            return body

        # 503 until the API server first answers, then 200.
        ready = await eventually(lambda: answering(200), timeout=60, what="/readyz 200")
        assert (ready["role"], ready["ready"]) == ("single", True)
        # Long enough for a loaded machine to see it: readiness goes after 3 s without an answer.
        kube_api.inject(client(f"pid {proc.pid})"), refuse=True, seconds=25)
        down = await eventually(lambda: answering(503), timeout=25, what="/readyz 503")
        assert down["ready"] is False and "API server" in down["reason"]
        await eventually(lambda: answering(200), timeout=60, what="/readyz 200 again")
        assert proc.returncode is None


@pytest.mark.parametrize("flag", ["0", "-1", "x"])
def test_ready_window_must_be_positive(flag: str) -> None:
    import subprocess

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelcache",
            "controller",
            "--standalone",
            "/nonexistent",
            "--ready-window",
            flag,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--ready-window" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("role", "ago", "fenced", "ready"),
    [
        ("standalone", None, False, True),
        ("single", None, False, False),  # not answered yet
        ("single", 2.0, False, True),
        ("single", 31.0, False, False),
        ("standby", 2.0, True, True),  # a standby holds no Lease: nothing to fence
        ("leader", 2.0, False, True),
        ("leader", 2.0, True, False),
        ("leader", 31.0, False, False),
    ],
)
def test_readiness_rules(role: Any, ago: float | None, fenced: bool, ready: bool) -> None:
    from controller.metrics import readiness

    got = readiness(role=role, api_seconds_ago=ago, window=30, fenced=fenced)
    assert (got.ready, got.role) == (ready, role)
    assert got.to_json()["ready"] is ready


def test_other_writer_is_the_latest_spec_manager_but_us() -> None:
    from controller.reconcile import FIELD_MANAGER
    from controller.view import other_writer

    def entry(manager: str, time_: str, fields: dict[str, Any], sub: str | None = None) -> dict[str, Any]:
        e = {"manager": manager, "operation": "Update", "time": time_, "fieldsV1": fields}
        return {**e, "subresource": sub} if sub else e

    obj = {
        "metadata": {
            "managedFields": [
                entry(FIELD_MANAGER, "2026-01-01T00:00:09Z", {"f:spec": {}}),
                entry("kubectl-edit", "2026-01-01T00:00:01Z", {"f:spec": {}}),
                entry("manager", "2026-01-01T00:00:05Z", {"f:spec": {}}),
                entry("modelcache", "2026-01-01T00:00:08Z", {"f:status": {}}, sub="status"),
                entry("labeller", "2026-01-01T00:00:07Z", {"f:metadata": {}}),
            ]
        }
    }
    assert other_writer(obj, FIELD_MANAGER) == "manager"
    assert other_writer({"metadata": {}}, FIELD_MANAGER) == "an unknown writer"


# -- the attacks on issue 21 ------------------------------------------------------------------------


async def _holder(api: KubeAPI) -> str:
    try:
        lease = await api.store.get(LEASE, LEASE_NAME, namespace="default")
    except NotFound:
        return ""
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def _not_lease(c: Any) -> bool:
    return "leases" not in c.path_qs


@pytest.mark.slow  # about 30 s
async def test_a_429_retry_after_the_lease_deadline_is_fenced(kube_api: KubeAPI, tmp_path: Path) -> None:
    """A write that gets 429 while the leader cannot renew is not retried past the renew deadline
    (10 s): every attempt passes the fence, not only the first."""
    await two_groups(kube_api)
    async with controller(kube_api, tmp_path, "--metrics-addr", "off", pod="ctl-a") as a:
        await eventually(lambda: _has_prefix(_holder(kube_api), "ctl-a_"), timeout=60, what="a to lead")
        await asyncio.sleep(2)
        me = client(f"pid {a.pid})")
        kube_api.inject(every(me, path("leases")), refuse=True)
        cut = time.monotonic()  # a's last renewal started before this
        await asyncio.sleep(4)
        throttled = kube_api.inject(
            every(me, writes(), lambda r: "leases" not in r.path), status=429, retry_after=9, times=1
        )
        await kube_api.store.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
        await eventually(lambda: throttled.hits > 0, timeout=30, what="a's write to get 429")
        code = await asyncio.wait_for(a.wait(), 60)
        late = [
            f"{c.method} {c.path_qs} +{c.at - cut:.1f}s"
            for c in kube_api.calls_by(f"pid {a.pid})", since=cut + 10)
            if c.method in WRITES and _not_lease(c)
        ]
        print(f"\n[fence/429] a exited {code}; a's writes past its deadline: {late}")
        assert late == []
        assert code == 1


@pytest.mark.slow  # about 30 s
async def test_a_replica_with_a_clock_ahead_does_not_take_a_healthy_lease(
    kube_api: KubeAPI, tmp_path: Path
) -> None:
    await two_groups(kube_api)
    async with controller(kube_api, tmp_path, "--metrics-addr", "off", pod="ctl-a") as a:
        await eventually(lambda: _has_prefix(_holder(kube_api), "ctl-a_"), timeout=60, what="a to lead")
        config = kubeconfig(tmp_path / "kubeconfig", kube_api.url)
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, POD_NAME="ctl-b", SKEW="30", PYTHONPATH=root)
        out = (tmp_path / "b.log").open("wb")
        b = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(root) / "tests/support/skewed.py"), "controller",
            "--kubeconfig", str(config), "--metrics-addr", "off",
            env=env, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=root,
        )  # fmt: skip
        out.close()
        try:
            await eventually(
                lambda: any("leases" in c.path_qs for c in kube_api.calls_by(f"pid {b.pid})")),
                timeout=60,
                what="b to read the Lease",
            )
            for i in range(10):
                await kube_api.store.create(LOCAL_MODEL_CACHE, cache(f"m{i}", "1Gi", ["a100"]))
                await asyncio.sleep(1)
            b_writes = writes_of(kube_api, b.pid)
            print(f"\n[skew] holder {await _holder(kube_api)}; b's writes: {b_writes[:5]}")
            assert (await _holder(kube_api)).startswith("ctl-a_")
            assert b_writes == []
            assert a.returncode is None and b.returncode is None
        finally:
            await stop(b)


async def test_a_leader_whose_renewals_hang_exits_1(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    async with controller(kube_api, tmp_path, "--metrics-addr", "off", pod="ctl-a") as a:
        await eventually(lambda: _has_prefix(_holder(kube_api), "ctl-a_"), timeout=60, what="a to lead")
        await asyncio.sleep(1)
        # The API server takes a's renewals and never answers them (the fault ends; they stay hung).
        hung = kube_api.inject(every(client(f"pid {a.pid})"), path("leases")), delay=3600, seconds=3)
        code = await asyncio.wait_for(a.wait(), 60)
        print(f"\n[hung renewals] {hung.hits} hung; a exited {code}")
        assert hung.hits >= 1 and code == 1


async def test_a_hung_request_times_out_and_counts_against_readiness(kube_api: KubeAPI) -> None:
    await kube_api.store.create(NODE, node("n1", "x"))
    state = KubeState.for_url(kube_api.url, request_timeout=1.0, watch_timeout=1, watch_grace=1.0)
    try:
        await state.get(NODE, "n1")
        kube_api.inject(every(path("/nodes"), lambda r: r.query.get("watch") is None), delay=3600, seconds=3)
        sent = time.monotonic()
        with pytest.raises(Unavailable, match="no answer in time"):
            await state.list(NODE)
        # Other requests answer, but the list has not: readiness dates from when it was sent (the
        # timeout alone is a second later than that).
        with contextlib.suppress(NotFound):
            await state.get(LEASE, LEASE_NAME, namespace="default")
        assert state.last_answer is not None and state.last_answer < sent + 0.9
        await asyncio.sleep(3)  # the fault ends
        assert [n["metadata"]["name"] for n in (await state.list(NODE)).items] == ["n1"]
        assert state.last_answer is not None and state.last_answer > sent

        # A watch the server accepts and never feeds ends after timeoutSeconds plus the grace.
        kube_api.inject(watches(), delay=3600, seconds=1)
        with pytest.raises(Unavailable):
            async for _ in state.watch_raw(NODE, resource_version="1"):
                pass
    finally:
        await state.close()


def test_retry_after_parsing() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 8, usegmt=True)
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(" 2.5 ", now=now) == 2.5
    assert parse_retry_after(date, now=now) == 8.0
    assert parse_retry_after(email.utils.formatdate(now - 5, usegmt=True), now=now) == 0.0
    for bad in ("-5", "nan", "inf", "soon", "", "Sun, 06 Nov 1994 08:49:37 -0000"):
        assert parse_retry_after(bad, now=now) is None, bad
    assert parse_retry_after(None, now=now) is None


@pytest.mark.slow  # about 40 s: the bound is waited out
async def test_retry_after_as_an_http_date_is_honoured_and_bounded(kube_api: KubeAPI) -> None:
    await kube_api.store.create(NODE, node("n1", "x"))
    state = KubeState.for_url(kube_api.url)
    try:
        date = email.utils.formatdate(time.time() + 4, usegmt=True)
        kube_api.inject(path("/nodes/n1"), status=429, retry_after=date, times=1)
        await state.get(NODE, "n1")
        gets = [c for c in kube_api.calls if c.path_qs == "/api/v1/nodes/n1"]
        assert [c.status for c in gets] == [429, 200]
        assert gets[1].at - gets[0].at >= 2.0  # the date has a one-second resolution

        # An absurd Retry-After is capped per wait and in all: the 429 comes back as Unavailable.
        kube_api.calls.clear()
        kube_api.inject(path("/nodes/n1"), status=429, retry_after="1e12")
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await state.get(NODE, "n1")
        spent = time.monotonic() - started
        tries = len([c for c in kube_api.calls if c.path_qs == "/api/v1/nodes/n1"])
        print(f"\n[Retry-After 1e12] gave up after {spent:.1f} s and {tries} tries")
        # Waits of MAX_RETRY_AFTER (10 s) within MAX_RETRYING (30 s): 3 or 4 tries by when the
        # first answer came, never the 5 the try count alone allows.
        assert int(MAX_RETRYING // MAX_RETRY_AFTER) <= tries <= int(MAX_RETRYING // MAX_RETRY_AFTER) + 1
        assert tries < TOO_MANY_ATTEMPTS
    finally:
        kube_api.heal()
        await state.close()


@pytest.mark.slow  # about 60 s: the 30 s request timeout is waited out
async def test_a_list_the_api_server_never_answers_is_retried(kube_api: KubeAPI, tmp_path: Path) -> None:
    await two_groups(kube_api)
    store = kube_api.store
    await store.create(LOCAL_MODEL_CACHE, cache("m0", "10Gi", ["h100"]))
    port = _free_port()
    args = ("--no-leader-elect", "--metrics-addr", f"127.0.0.1:{port}")
    async with controller(kube_api, tmp_path, *args) as proc:
        await eventually(lambda: models_on(kube_api, "h1"), timeout=60, what="h1 to list m0")
        me = client(f"pid {proc.pid})")
        # Every list for 5 s is taken and never answered; the watches are told 410 so they list.
        hung = kube_api.inject(
            every(me, lambda r: r.method == "GET" and r.query.get("watch") is None), delay=3600, seconds=5
        )
        kube_api.inject(every(me, watches()), expire_watch=True, seconds=5)
        await asyncio.sleep(5)
        assert hung.hits > 0
        await store.create(LOCAL_MODEL_CACHE, cache("m1", "10Gi", ["a100"]))
        await eventually(lambda: models_on(kube_api, "a1"), timeout=120, what="a1 to list m1")
        assert proc.returncode is None
        ready = await eventually(lambda: _readyz(port), timeout=30, what="/readyz")
        print(f"\n[hung list] {hung.hits} requests hung; /readyz after: {ready}")
