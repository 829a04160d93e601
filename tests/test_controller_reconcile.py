"""The controller's loop against both cluster-state backends: the embedded one, and the Kubernetes
API over HTTP (the emulator in tests/support/kubeapi.py). Changes go in through the backend, the
controller sees them through its watches, and the tests wait for the state it converges to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio

from controller import cli
from controller.leader import LeaderElector
from controller.reconcile import Controller, Settings
from controller.snapshot import RETAINED_ANNOTATION
from localmodel.errors import InvalidInput, NotFound, SpecError
from localmodel.kinds import (
    EVENT,
    INFERENCE_SERVICE,
    LEASE,
    LLM_INFERENCE_SERVICE,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    POD,
    ResourceKind,
)
from localmodel.resources import FINALIZER
from localmodel.state.base import ClusterState, ObjectList
from localmodel.state.kube import KubeState
from localmodel.state.memory import MemoryState
from modelcache.cli import main as modelcache_main
from tests.support.kubeapi import KubeAPI


@pytest_asyncio.fixture(params=["memory", "kube"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[ClusterState]:
    if request.param == "memory":
        yield MemoryState()  # its watch skips other kinds without spinning (localmodel/state/memory.py)
        return
    api = KubeAPI()
    api.store = MemoryState()  # the emulator's storage needs the same watch fix
    await api.start()
    kube = KubeState.for_url(api.url, watch_timeout=5)
    try:
        yield kube
    finally:
        await kube.close()
        api.expire_watches()  # ends the server's open watch streams now, not at their timeout
        await api.close()


def group(name: str, limit: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNodeGroup",
        "metadata": {"name": name},
        "spec": {
            "storageLimit": limit,
            "persistentVolumeSpec": {
                "hostPath": {"path": "/models"},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": [name]}]}
                        ]
                    }
                },
            },
        },
    }


def cache(name: str, size: str, groups: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": name},
        "spec": {"sourceModelUri": f"hf://org/{name}", "modelSize": size, "nodeGroups": groups},
    }


def node(name: str, gpu: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"gpu": gpu}}}


async def models_on(state: ClusterState, name: str) -> list[str] | None:
    try:
        lmn = await state.get(LOCAL_MODEL_NODE, name)
    except NotFound:
        return None
    return [m["modelName"] for m in lmn["spec"].get("localModels") or []]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the controller did not converge")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(state: ClusterState, **settings: Any) -> AsyncIterator[Controller]:
    controller = Controller(state, Settings(**settings))
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(resync=30, retry_delay=0.05, stop=stop))
    try:
        await eventually(lambda: _true(controller.reconciles > 0 or task.done()))
        yield controller
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _true(value: bool) -> bool:
    return value


async def setup_two_groups(state: ClusterState) -> None:
    await state.create(LOCAL_MODEL_NODE_GROUP, group("a100", "500Gi"))
    await state.create(LOCAL_MODEL_NODE_GROUP, group("h100", "100Gi"))
    for n, gpu in (("a1", "a100"), ("a2", "a100"), ("h1", "h100")):
        await state.create(NODE, node(n, gpu))


async def test_a_cache_on_two_groups_that_fits_only_one(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("small", "60Gi", ["a100", "h100"]))
    await state.create(LOCAL_MODEL_CACHE, cache("big", "140Gi", ["a100", "h100"]))
    await Controller(state).run(once=True)

    assert await models_on(state, "a1") == ["big", "small"]
    assert await models_on(state, "h1") == ["small"]
    lmn = await state.get(LOCAL_MODEL_NODE, "a1")
    a1 = await state.get(NODE, "a1")
    assert lmn["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "a1", "uid": a1["metadata"]["uid"]}
    ]
    big = await state.get(LOCAL_MODEL_CACHE, "big")
    assert big["metadata"]["finalizers"] == [FINALIZER]
    assert big["status"]["nodeStatus"] == {"a1": "NodeDownloadPending", "a2": "NodeDownloadPending"}
    assert big["status"]["copies"] == {"available": 0, "total": 2, "failed": 0}
    refused = next(
        c for c in big["status"]["conditions"] if c["type"] == "Admitted" and c["nodeGroup"] == "h100"
    )
    assert (refused["status"], refused["reason"]) == ("False", "InsufficientStorage")
    # Created in the same second: admitted by name, so "big" was weighed first on an empty h100.
    assert refused["message"] == "needs 140Gi, group h100 has 100Gi of 100Gi free"
    h100 = await state.get(LOCAL_MODEL_NODE_GROUP, "h100")
    assert h100["status"] == {"used": "60Gi", "available": "40Gi", "nodes": 1, "observedGeneration": 1}
    events = (await state.list(EVENT, namespace="default")).items
    said = {(e["involvedObject"]["name"], e["reason"], e["type"]) for e in events}
    assert ("big", "InsufficientStorage", "Warning") in said and ("small", "Placed", "Normal") in said
    assert all(e["involvedObject"]["kind"] == "LocalModelCache" for e in events)

    # Agents report; a second pass writes the statuses once, and a third writes nothing at all.
    for n in ("a1", "a2"):  # modelStatus is keyed by modelName, as KServe's agent writes it
        await state.patch_status(LOCAL_MODEL_NODE, n, {"modelStatus": {"big": "ModelDownloaded"}})
    await Controller(state).run(once=True)
    big = await state.get(LOCAL_MODEL_CACHE, "big")
    assert big["status"]["copies"] == {"available": 2, "total": 2, "failed": 0}
    before = {
        k.kind: await state.list(k) for k in (LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, LOCAL_MODEL_NODE_GROUP)
    }
    n_events = len((await state.list(EVENT, namespace="default")).items)
    await Controller(state).run(once=True)
    for kind_name, listing in before.items():
        kind = {LOCAL_MODEL_CACHE.kind: LOCAL_MODEL_CACHE}.get(kind_name) or (
            LOCAL_MODEL_NODE if kind_name == LOCAL_MODEL_NODE.kind else LOCAL_MODEL_NODE_GROUP
        )
        after = await state.list(kind)
        assert [o["metadata"]["resourceVersion"] for o in after.items] == [
            o["metadata"]["resourceVersion"] for o in listing.items
        ]
    assert len((await state.list(EVENT, namespace="default")).items) == n_events


async def test_node_leaves_group_group_dropped_node_deleted(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100", "h100"]))
    async with running(state):
        await eventually(lambda: _all_have(state, ["a1", "a2", "h1"], ["m"]))
        # a2 leaves a100
        await state.patch(NODE, "a2", {"metadata": {"labels": {"gpu": "none"}}})
        await eventually(lambda: _has(state, "a2", []))
        # the cache drops h100
        await state.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"nodeGroups": ["a100"]}})
        await eventually(lambda: _has(state, "h1", []))
        assert await models_on(state, "a1") == ["m"]
        # a1 is deleted: its LocalModelNode goes, and so does its nodeStatus entry
        await state.delete(NODE, "a1")
        await eventually(lambda: _has(state, "a1", None))

        async def pruned() -> bool:
            status = (await state.get(LOCAL_MODEL_CACHE, "m")).get("status") or {}
            return status.get("nodeStatus") == {} or "nodeStatus" not in status

        await eventually(pruned)


async def test_cache_deleted_while_its_group_is_gone(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    async with running(state):
        await eventually(lambda: _has(state, "h1", ["m"]))

        async def finalized() -> bool:
            fins = (await state.get(LOCAL_MODEL_CACHE, "m"))["metadata"].get("finalizers")
            return bool(fins == [FINALIZER])

        await eventually(finalized)
        await state.delete(LOCAL_MODEL_NODE_GROUP, "h100")
        await state.delete(LOCAL_MODEL_CACHE, "m")

        async def gone() -> bool:
            try:
                await state.get(LOCAL_MODEL_CACHE, "m")
            except NotFound:
                return True
            return False

        await eventually(gone)
        assert await models_on(state, "h1") == []


async def test_a_model_in_use_stays_until_the_pod_is_gone(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    async with running(state):
        await eventually(lambda: _has(state, "h1", ["m"]))
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "server",
                "namespace": "team",
                "labels": {"internal.serving.kserve.io/localmodel": "m"},
            },
            "spec": {"nodeName": "h1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running"},
        }
        await state.create(POD, pod)
        await asyncio.sleep(0.2)  # let the watch deliver the pod before the node changes
        await state.patch(NODE, "h1", {"metadata": {"labels": {"gpu": "none"}}})

        async def retained() -> bool:
            lmn = await state.get(LOCAL_MODEL_NODE, "h1")
            return bool(lmn["metadata"].get("annotations", {}).get(RETAINED_ANNOTATION) == "m")

        await eventually(retained)
        assert await models_on(state, "h1") == ["m"]
        await state.delete(POD, "server", namespace="team")
        await eventually(lambda: _has(state, "h1", []))
        lmn = await state.get(LOCAL_MODEL_NODE, "h1")
        assert RETAINED_ANNOTATION not in (lmn["metadata"].get("annotations") or {})


async def test_pacing_twenty_nodes_three_at_a_time(state: ClusterState) -> None:
    await state.create(LOCAL_MODEL_NODE_GROUP, group("g", "100Gi"))
    names = [f"n{i:02}" for i in range(20)]
    for n in names:
        await state.create(NODE, node(n, "g"))
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["g"]))
    most = 0
    async with running(state, max_concurrent_downloads=3):
        done: set[str] = set()
        for _ in range(200):
            listed = {n for n in names if (await models_on(state, n)) == ["m"]}
            fetching = listed - done
            most = max(most, len(fetching))
            assert len(fetching) <= 3
            if len(done) == 20:
                break
            # Agents finish whatever they were given.
            for n in sorted(fetching):
                await state.patch_status(LOCAL_MODEL_NODE, n, {"modelStatus": {"m": "ModelDownloaded"}})
                done.add(n)
            await asyncio.sleep(0.05)
        assert len(done) == 20 and most == 3

        async def all_copies() -> bool:
            status = (await state.get(LOCAL_MODEL_CACHE, "m")).get("status") or {}
            return status.get("copies") == {"available": 20, "total": 20, "failed": 0}

        await eventually(all_copies)
        events = (await state.list(EVENT, namespace="default")).items
        assert [e["reason"] for e in events].count("AllCopiesReady") == 1


async def test_leader_election(state: ClusterState) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    mono = [1000.0]
    a = LeaderElector(state, identity="a", lease_duration=15, clock=lambda: now[0])
    # b's wall clock is an hour ahead: expiry is timed on b's own monotonic clock, so it does not matter
    b = LeaderElector(state, identity="b", lease_duration=15, clock=lambda: now[0] + timedelta(hours=1))
    a.monotonic = b.monotonic = lambda: mono[0]
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    now[0] += timedelta(seconds=10)
    mono[0] += 10
    assert await a.try_acquire_or_renew()  # renewed
    mono[0] += 1
    assert not await b.try_acquire_or_renew()  # b sees the renewal now
    now[0] += timedelta(seconds=10)
    mono[0] += 10
    assert not await b.try_acquire_or_renew()  # 10 s since b saw the record change: still a's
    mono[0] += 6
    assert await b.try_acquire_or_renew()  # a stopped renewing: b takes over
    assert not await a.try_acquire_or_renew()
    lease = await state.get(LEASE, "modelcache-controller", namespace="default")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    await b.release()
    assert await a.try_acquire_or_renew()  # released: no need to wait for expiry

    async def work(stop: asyncio.Event) -> int:
        return 7

    c = LeaderElector(state, identity="c", renew_every=0.01)
    await a.release()
    assert await c.run_while_leader(work) == 7


async def test_a_re_created_node_gets_its_local_model_node_back(state: ClusterState) -> None:
    """The Node deleted and created again under the same name (a new uid) while the controller did
    not see it go (stopped here; a watch outage on a cluster): the LocalModelNode's owner reference
    follows the new uid (a garbage collector would delete it otherwise), its spec kept; other owner
    references are left as they are."""
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
    async with running(state):
        await eventually(lambda: _has(state, "h1", ["m"]))
    first = (await state.get(NODE, "h1"))["metadata"]["uid"]
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "cm-1"}
    lmn = await state.get(LOCAL_MODEL_NODE, "h1")
    refs = [*lmn["metadata"]["ownerReferences"], foreign]
    await state.patch(LOCAL_MODEL_NODE, "h1", {"metadata": {"ownerReferences": refs}})
    await state.delete(NODE, "h1")
    await state.create(NODE, node("h1", "h100"))
    second = (await state.get(NODE, "h1"))["metadata"]["uid"]
    assert second != first

    async def repointed() -> bool:
        owners = (await state.get(LOCAL_MODEL_NODE, "h1"))["metadata"].get("ownerReferences")
        return bool(owners == [{"apiVersion": "v1", "kind": "Node", "name": "h1", "uid": second}, foreign])

    async with running(state):
        await eventually(repointed)
    assert await models_on(state, "h1") == ["m"]


async def test_a_stale_renew_time_is_not_expiry_for_a_new_candidate(state: ClusterState) -> None:
    """client-go's observedTime: a candidate that first sees a Lease whose renewTime is long past
    (by its clock) still waits the lease duration from then, on its own monotonic clock."""
    mono = [0.0]
    a = LeaderElector(state, identity="a", lease_duration=15, clock=lambda: datetime(2020, 1, 1, tzinfo=UTC))
    b = LeaderElector(state, identity="b", lease_duration=15)
    a.monotonic = b.monotonic = lambda: mono[0]
    assert await a.try_acquire_or_renew()
    mono[0] += 14
    assert not await b.try_acquire_or_renew()  # renewTime six years old for b: not expired
    mono[0] += 14
    assert not await b.try_acquire_or_renew()  # 14 s since b first saw the record
    mono[0] += 2
    assert await b.try_acquire_or_renew()


async def _has(state: ClusterState, name: str, models: list[str] | None) -> bool:
    return await models_on(state, name) == models


async def _all_have(state: ClusterState, names: list[str], models: list[str]) -> bool:
    return all([await models_on(state, n) == models for n in names])


# -- the command -----------------------------------------------------------------------------------


def write_docs(folder: Path) -> None:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "groups.yaml").write_text(yaml.safe_dump_all([group("a100", "500Gi"), group("h100", "100Gi")]))
    (folder / "caches.yaml").write_text(yaml.safe_dump_all([cache("big", "140Gi", ["a100", "h100"])]))
    nodes = {"apiVersion": "v1", "kind": "List", "items": [node("a1", "a100"), node("h1", "h100")]}
    (folder / "nodes.yaml").write_text(yaml.safe_dump(nodes))


def test_cli_once_prints_every_object_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_docs(tmp_path / "docs")
    assert (
        modelcache_main(["controller", "--standalone", str(tmp_path / "docs"), "--once", "--output", "json"])
        == 0
    )
    objs = json.loads(capsys.readouterr().out)
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("LocalModelCache", "big"),
        ("LocalModelNodeGroup", "a100"),
        ("LocalModelNodeGroup", "h100"),
        ("LocalModelNode", "a1"),
        ("LocalModelNode", "h1"),
    ]
    big, a100, _, a1, h1 = objs
    assert big["status"]["nodeStatus"] == {"a1": "NodeDownloadPending"}
    assert {(c["type"], c["nodeGroup"], c["status"]) for c in big["status"]["conditions"]} >= {
        ("Admitted", "a100", "True"),
        ("Admitted", "h100", "False"),
    }
    assert a100["status"]["used"] == "140Gi"
    assert [m["modelName"] for m in a1["spec"]["localModels"]] == ["big"]
    assert h1["spec"]["localModels"] == []


def test_cli_settings_read_the_flags_and_pod_name_once(state: ClusterState) -> None:
    """The flags and $POD_NAME become one frozen ControllerSettings at the entry point; the leader
    identity starts with the pod's name, else the host's."""
    args = cli._parser().parse_args(["--max-concurrent-node-downloads", "3", "--metrics-addr", "off"])
    settings = cli.ControllerSettings.from_args(args, {"POD_NAME": "ctl-a"})
    assert (settings.max_concurrent_downloads, settings.metrics_addr, settings.pod_name) == (3, None, "ctl-a")
    assert settings.reconcile().max_concurrent_downloads == 3
    assert cli.ControllerSettings.from_args(args, {}).pod_name is None
    assert LeaderElector(state, pod_name=settings.pod_name).identity.startswith("ctl-a_")
    assert LeaderElector(state).identity.startswith(socket.gethostname() + "_")


def test_cli_yaml_output_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    write_docs(tmp_path / "docs")
    args = ["--standalone", str(tmp_path / "docs"), "--once", "--output", "yaml"]
    assert cli.main([*args, "--max-concurrent-node-downloads", "1"]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds.count("LocalModelNode") == 2
    with pytest.raises(InvalidInput):
        cli.main(["--bogus"])
    with pytest.raises(InvalidInput):
        cli.main(["--standalone", str(tmp_path), "--output", "json"])  # --output needs --once
    with pytest.raises(InvalidInput):
        cli.main([*args, "--max-concurrent-node-downloads", "-1"])
    (tmp_path / "docs" / "bad.yaml").write_text(
        "apiVersion: serving.kserve.io/v1alpha1\nkind: LocalModelCache\n"
    )
    with pytest.raises(SpecError):
        cli.main(args)
    assert modelcache_main(["controller", *args]) == 2
    assert "bad.yaml" in capsys.readouterr().err


async def test_embedded_watch_waits_while_other_kinds_change() -> None:
    """A watch of one kind must sleep, not spin, after writes of other kinds (the controller has
    five watches on one event loop); see MemoryState.watch in localmodel/state/memory.py."""
    state = MemoryState()
    seen: list[str] = []

    async def watch_nodes() -> None:
        async for event in state.watch_raw(NODE, resource_version="0"):
            seen.append(event.object["metadata"]["name"])

    task = asyncio.create_task(watch_nodes())
    await state.create(LOCAL_MODEL_NODE_GROUP, group("g", "1Gi"))
    await asyncio.sleep(0.01)  # with a spinning watch this never returns
    await state.create(NODE, node("n1", "g"))
    await eventually(lambda: _true(seen == ["n1"]), timeout=2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def isvc(name: str, namespace: str, uri: str | None = None, label: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if label:
        meta["labels"] = {"internal.serving.kserve.io/localmodel": label}
    predictor = {"model": {"modelFormat": {"name": "huggingface"}, "storageUri": uri}} if uri else {}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": meta,
        "spec": {"predictor": predictor},
    }


async def test_cache_status_lists_the_inference_services_that_use_it(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("llama", "10Gi", ["h100"]))  # hf://org/llama
    await state.create(INFERENCE_SERVICE, isvc("chat", "team-a", uri="hf://org/llama"))
    await state.create(INFERENCE_SERVICE, isvc("sub", "team-b", uri="hf://org/llama/adapter"))
    await state.create(INFERENCE_SERVICE, isvc("labelled", "team-a", label="llama"))
    await state.create(INFERENCE_SERVICE, isvc("other", "team-a", uri="hf://org/llama-2"))

    async def listed(expected: list[dict[str, str]]) -> bool:
        st = (await state.get(LOCAL_MODEL_CACHE, "llama")).get("status") or {}
        return bool(st.get("inferenceServices", []) == expected)

    async with running(state):
        await eventually(
            lambda: listed(
                [
                    {"name": "chat", "namespace": "team-a"},
                    {"name": "labelled", "namespace": "team-a"},
                    {"name": "sub", "namespace": "team-b"},
                ]
            )
        )
        await state.delete(INFERENCE_SERVICE, "chat", namespace="team-a")
        await state.patch(INFERENCE_SERVICE, "labelled", {"metadata": {"labels": None}}, namespace="team-a")
        await eventually(lambda: listed([{"name": "sub", "namespace": "team-b"}]))
        # A cache made after the InferenceService that uses it lists it too.
        await state.create(LOCAL_MODEL_CACHE, cache("llama-2", "10Gi", ["h100"]))

        async def other_listed() -> bool:
            st = (await state.get(LOCAL_MODEL_CACHE, "llama-2")).get("status") or {}
            return bool(st.get("inferenceServices") == [{"name": "other", "namespace": "team-a"}])

        await eventually(other_listed)
        await state.delete(INFERENCE_SERVICE, "sub", namespace="team-b")
        await eventually(lambda: listed([]))
        st = (await state.get(LOCAL_MODEL_CACHE, "llama"))["status"]
        assert "inferenceServices" not in st  # absent when none, as KServe writes it


class DeletesBeforeTheWatch:
    """The cluster, where another client deletes one object between the controller's first list of
    its kind (load) and the next (its watch's): the interleaving a loaded machine made now and then
    (the test above), made certain."""

    def __init__(self, state: ClusterState, kind: ResourceKind, name: str, namespace: str) -> None:
        self.state, self.kind, self.name, self.namespace = state, kind, name, namespace
        self.lists = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.state, attr)

    async def list(self, kind: ResourceKind, **kw: Any) -> ObjectList:
        if kind is self.kind:
            self.lists += 1
            if self.lists == 2:
                await self.state.delete(kind, self.name, namespace=self.namespace)
        return await self.state.list(kind, **kw)


async def test_a_deletion_between_the_first_list_and_the_watch_is_seen(state: ClusterState) -> None:
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("llama", "10Gi", ["h100"]))
    await state.create(INFERENCE_SERVICE, isvc("chat", "team-a", uri="hf://org/llama"))
    await state.create(INFERENCE_SERVICE, isvc("sub", "team-b", uri="hf://org/llama/adapter"))
    racing = DeletesBeforeTheWatch(state, INFERENCE_SERVICE, "chat", "team-a")

    async def listed() -> list[dict[str, str]]:
        st = (await state.get(LOCAL_MODEL_CACHE, "llama")).get("status") or {}
        return list(st.get("inferenceServices", []))

    # resync=30 s in running(): only the watch's first list can tell the controller that chat went.
    async with running(cast(ClusterState, racing)):
        await eventually(lambda: _true(racing.lists >= 2))
        await eventually(lambda: _is(listed(), [{"name": "sub", "namespace": "team-b"}]))


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_cluster_without_kserve_is_reconciled_all_the_same(caplog: pytest.LogCaptureFixture) -> None:
    api = KubeAPI(without=frozenset({INFERENCE_SERVICE, LLM_INFERENCE_SERVICE}))
    api.store = MemoryState()
    await api.start()
    kube = KubeState.for_url(api.url, watch_timeout=5)
    try:
        await setup_two_groups(kube)
        await kube.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["h100"]))
        with caplog.at_level("INFO", logger="modelcache.controller"):
            async with running(kube):
                await eventually(lambda: _has(kube, "h1", ["m"]))
                await asyncio.sleep(0.3)  # the watch of the missing API is not retried in a loop
        for plural in ("inferenceservices", "llminferenceservices"):
            missing = [r for r in caplog.records if r.getMessage().startswith(f"{plural}: not served")]
            assert len(missing) == 1 and missing[0].levelname == "INFO"
            assert sum(1 for _, path in api.requests if f"/{plural}" in path) <= 3
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
    finally:
        await kube.close()
        api.expire_watches()
        await api.close()


def test_dry_run_prints_node_labels_and_serving_volumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    write_docs(tmp_path / "docs")
    served = cache("big", "140Gi", ["a100", "h100"])
    served["metadata"]["annotations"] = {"modelcache.io/serving-namespaces": "team"}
    (tmp_path / "docs" / "caches.yaml").write_text(yaml.safe_dump(served))
    lmn = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "metadata": {"name": "a1"},
        "spec": {"localModels": [{"sourceModelUri": "hf://org/big", "modelName": "big"}]},
        "status": {"modelStatus": {"big": "ModelDownloaded"}},
    }
    (tmp_path / "docs" / "node-status.yaml").write_text(yaml.safe_dump(lmn))
    assert cli.main(["--standalone", str(tmp_path / "docs"), "--once", "--output", "json"]) == 0
    objs = json.loads(capsys.readouterr().out)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert [k for k in kinds if k[0] not in ("LocalModelCache", "LocalModelNodeGroup", "LocalModelNode")] == [
        ("Node", "a1"),  # labelled ready; h1 holds nothing and is not printed
        ("PersistentVolume", "big-a100-team"),
        ("PersistentVolumeClaim", "big-a100"),
    ]
    a1 = next(o for o in objs if o["kind"] == "Node")
    assert [v for k, v in a1["metadata"]["labels"].items() if k.startswith("modelcache.io/model.")] == [
        "ready"
    ]
    big = next(o for o in objs if o["kind"] == "LocalModelCache")
    assert big["status"]["nodeStatus"] == {"a1": "NodeDownloaded"}


def test_cli_once_keeps_the_documents_creation_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Admission goes oldest first: a document's metadata.creationTimestamp (quoted as kubectl
    writes it, or unquoted, which YAML makes a datetime) is kept, so a dry run of a real cluster's
    objects refuses what the live controller refuses; one without it is created now."""
    import yaml

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "groups.yaml").write_text(yaml.safe_dump(group("a100", "10Gi")))
    (docs / "nodes.yaml").write_text(yaml.safe_dump(node("a1", "a100")))
    newer = cache("a", "8Gi", ["a100"])
    newer["metadata"]["creationTimestamp"] = "2025-03-01T10:00:00+01:00"
    older = cache("b", "8Gi", ["a100"])
    text = yaml.safe_dump_all([newer, older])
    text += "---\n" + yaml.safe_dump(cache("c", "1Gi", ["a100"]))
    (docs / "caches.yaml").write_text(
        text.replace("  name: b\n", "  name: b\n  creationTimestamp: 2024-06-01T00:00:00Z\n")
    )
    assert modelcache_main(["controller", "--standalone", str(docs), "--once", "--output", "json"]) == 0
    objs = {
        o["metadata"]["name"]: o
        for o in json.loads(capsys.readouterr().out)
        if o["kind"] == "LocalModelCache"
    }
    assert objs["a"]["metadata"]["creationTimestamp"] == "2025-03-01T09:00:00Z"
    assert objs["b"]["metadata"]["creationTimestamp"] == "2024-06-01T00:00:00Z"
    assert objs["c"]["metadata"]["creationTimestamp"] > "2026"  # none given: now

    def admitted(name: str) -> str:
        return str(next(c["status"] for c in objs[name]["status"]["conditions"] if c["type"] == "Admitted"))

    assert (admitted("b"), admitted("a")) == ("True", "False")


def test_cli_refuses_a_bad_creation_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    bad = cache("a", "8Gi", ["a100"])
    bad["metadata"]["creationTimestamp"] = "last tuesday"
    (tmp_path / "caches.yaml").write_text(yaml.safe_dump(bad))
    assert modelcache_main(["controller", "--standalone", str(tmp_path), "--once"]) == 2
    err = capsys.readouterr().err
    assert "metadata.creationTimestamp" in err and "RFC 3339" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
