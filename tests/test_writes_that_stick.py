"""Writes that cannot stick (issue 16 §2): what the controller learns from each answer
(localmodel.sticking), how it treats a kind without a /status subresource, and how Events repeat
(localmodel.events.EventLog, after client-go's tools/record/events_cache.go). Run in process
against the Kubernetes API emulator in CRD mode: KServe v0.20's CRDs (tests/data/kserve-crds/),
which prune our fields, and our own (manifests/crds/), which must keep every one of them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from controller.reconcile import Controller
from localmodel.errors import NotFound
from localmodel.events import EventLog, event_body, record_event
from localmodel.kinds import EVENT, LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, LOCAL_MODEL_NODE_GROUP, NODE
from localmodel.quantity import Quantity
from localmodel.state.kube import KubeState
from localmodel.sticking import ANY, Sticking, dropped, merged, strip
from tests.support.agents import eventually, group_doc, node_doc, running_agent
from tests.support.hfhub import Hub
from tests.support.kubeapi import KubeAPI, load_crds
from tests.test_controller_reconcile import cache, group, node

ROOT = Path(__file__).resolve().parents[1]
KSERVE_CRDS = ROOT / "tests" / "data" / "kserve-crds"
OUR_CRDS = ROOT / "manifests" / "crds"


# -- the pure part ----------------------------------------------------------------------------------


def test_dropped_names_what_the_server_did_not_keep() -> None:
    sent = {
        "localModels": [{"modelName": "a", "modelSize": "1Gi"}, {"modelName": "b", "modelSize": "2Gi"}],
        "gone": None,  # a deletion is no field
    }
    kept = {"localModels": [{"modelName": "a"}, {"modelName": "b"}]}
    assert dropped(sent, kept) == {("localModels", ANY, "modelSize")}
    assert dropped({"conditions": [], "copies": {"total": 1}}, {"copies": {"total": 1}}) == {("conditions",)}
    assert dropped(kept, kept) == frozenset()
    # Lists of other lengths say nothing about their items.
    assert dropped({"l": [{"x": 1}]}, {"l": []}) == frozenset()


def test_strip_removes_those_paths_everywhere() -> None:
    value = {
        "localModels": [{"modelName": "a", "modelSize": "1Gi"}, {"modelName": "b", "modelSize": "2Gi"}],
        "conditions": [{"type": "Admitted"}],
        "copies": {"total": 1},
    }
    paths = frozenset({("localModels", ANY, "modelSize"), ("conditions",)})
    assert strip(value, paths) == {
        "localModels": [{"modelName": "a"}, {"modelName": "b"}],
        "copies": {"total": 1},
    }
    models: Any = value["localModels"]
    assert models[0]["modelSize"] == "1Gi", "a copy: the value is left alone"
    assert strip(value, frozenset()) is value
    assert merged({"a": 1, "m": {"x": 1}}, {"a": None, "m": {"y": 2}}) == {"m": {"x": 1, "y": 2}}


def test_sticking_remembers_what_was_meant_while_the_rest_is_kept() -> None:
    s = Sticking()
    patch = {"copies": {"total": 1}, "conditions": [{"type": "Admitted", "status": "True"}]}
    stored = {"copies": {"total": 1}}
    assert s.learn("C", "m", patch, stored) == {("conditions",)}
    assert s.learn("C", "m", patch, stored) == frozenset(), "learnt once"
    meant = {**stored, **patch}
    assert s.take("C", "m", stored) == meant
    # A change only in what does not stick is futile (and remembered as meant) ...
    other = {"conditions": [{"type": "Admitted", "status": "False"}]}
    assert s.futile("C", "m", other)
    assert s.take("C", "m", stored) == {**stored, **other}
    # ... a change in what sticks is not.
    assert not s.futile("C", "m", {"copies": {"total": 2}})
    # Someone else changed it: the stored object is what a reader sees, the meaning forgotten.
    assert s.take("C", "m", {"copies": {"total": 3}}) == {"copies": {"total": 3}}
    assert s.take("C", "m", stored) == stored
    # Nothing is known of other kinds, nor of objects never read.
    assert not s.futile("D", "m", patch) and not s.futile("C", "x", patch)
    everything = Sticking()
    assert everything.learn("C", "m", patch, {**stored, **patch}) == frozenset()
    assert everything.take("C", "m", stored) is stored


def test_event_log_repeats_as_client_go_does() -> None:
    log = EventLog(size=2)

    def body(reason: str, message: str = "fits", at: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
        return event_body(
            involved=LOCAL_MODEL_CACHE,
            name="m",
            uid="u1",
            reason=reason,
            message=message,
            type_="Normal",
            component="c",
            now=at,
        )

    first = body("Admitted")
    assert log.correlate(first) == (first, None)
    again, patch = log.correlate(body("Admitted", at="2026-01-01T00:05:00Z"))
    assert again["metadata"]["name"] == first["metadata"]["name"]
    assert (again["count"], again["firstTimestamp"]) == (2, "2026-01-01T00:00:00Z")
    assert patch == {"count": 2, "lastTimestamp": "2026-01-01T00:05:00Z", "message": "fits"}
    # Another message or reason is another Event (client-go's getEventKey includes both).
    assert log.correlate(body("Admitted", "other"))[1] is None
    assert log.correlate(body("Placed"))[1] is None
    # The least recently used entry went past the size: that Event starts again.
    assert log.correlate(body("Admitted"))[1] is None


# -- against the emulator ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def kserve() -> AsyncIterator[tuple[KubeAPI, KubeState]]:
    async for pair in _cluster(KSERVE_CRDS):
        yield pair


@pytest_asyncio.fixture
async def ours() -> AsyncIterator[tuple[KubeAPI, KubeState]]:
    async for pair in _cluster(OUR_CRDS):
        yield pair


async def _cluster(crds: Path) -> AsyncIterator[tuple[KubeAPI, KubeState]]:
    api = KubeAPI(crds=load_crds(crds))
    await api.start()
    kube = KubeState.for_url(api.url, watch_timeout=5)
    try:
        await api.create(group("g", "100Gi"))
        await api.create(cache("m", "1Gi", ["g"]))
        await api.create(cache("big", "200Gi", ["g"]))  # refused: a Warning Event
        await api.store.create(NODE, node("n1", "g"))
        yield api, kube
    finally:
        await kube.close()
        await api.close()


async def _passes(controller: Controller, n: int) -> None:
    await controller.load()
    for _ in range(n):
        await controller.reconcile(full=True)


async def test_under_kserves_crds_one_pass_writes_and_the_next_ones_do_not(
    kserve: tuple[KubeAPI, KubeState], caplog: pytest.LogCaptureFixture
) -> None:
    api, kube = kserve
    controller = Controller(kube)
    with caplog.at_level(logging.INFO, logger="modelcache.controller"):
        await _passes(controller, 1)
        first = sum(api.write_counts().values())
        assert ("patch", "localmodelnodegroups/status", "g") in api.write_counts()  # answered 404
        await _passes(controller, 3)  # each load lists again: what was pruned comes back pruned
    later = {k: n for k, n in api.write_counts().items() if n > 1}
    assert sum(api.write_counts().values()) == first, f"written again: {later}"
    assert len(await api.events(reason="InsufficientStorage", name="big")) == 1
    assert [e.get("count") for e in await api.events(name="m", reason="Admitted")] == [1]
    told = [r.getMessage() for r in caplog.records if "status subresource" in r.getMessage()]
    assert told == [
        "localmodelnodegroups: the installed CRD has no status subresource (KServe's?); their status "
        "is not written (tried again in 3600s)"
    ]
    learnt = " ".join(r.getMessage() for r in caplog.records if "does not keep" in r.getMessage())
    assert "localModels.*.modelSize" in learnt and "conditions" in learnt
    # What KServe's schema keeps is written: the node lists the model, the cache has its nodes.
    lmn = await kube.get(LOCAL_MODEL_NODE, "n1")
    assert lmn["spec"]["localModels"] == [
        {"modelName": "m", "nodeGroup": "g", "sourceModelUri": "hf://org/m"}
    ]
    m = await kube.get(LOCAL_MODEL_CACHE, "m")
    assert m["status"] == {
        "copies": {"available": 0, "failed": 0, "total": 1},
        "nodeStatus": {"n1": "NodeDownloadPending"},
    }

    # A real change still goes out once: the agent reports the model downloaded.
    await api.store.patch_status(LOCAL_MODEL_NODE, "n1", {"modelStatus": {"m": "ModelDownloaded"}})
    before = api.write_counts()
    await _passes(controller, 2)
    new = api.write_counts() - before
    assert new[("patch", "localmodelcaches/status", "m")] == 1
    assert (await kube.get(LOCAL_MODEL_CACHE, "m"))["status"]["copies"]["available"] == 1
    assert [e.get("count", 1) for e in await api.events(name="m", reason="AllCopiesReady")] == [1]

    # A change only in what KServe's schema drops (the entry's modelSize, the Admitted message's
    # numbers) is not sent at all.
    await api.store.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"modelSize": "2Gi"}})
    before = api.write_counts()
    await _passes(controller, 2)
    assert api.write_counts() - before == {}
    meant = controller.view.lmns["n1"].local_models[0]
    assert (meant.model_name, meant.model_size.bytes if meant.model_size else None) == ("m", 2 << 30)


async def test_group_status_is_tried_again_after_the_retry(kserve: tuple[KubeAPI, KubeState]) -> None:
    api, kube = kserve
    controller = Controller(kube)
    controller.settings.status_retry = 0.0  # every pass looks again
    await _passes(controller, 2)
    assert api.write_counts()[("patch", "localmodelnodegroups/status", "g")] == 2


async def test_our_crds_keep_every_field_the_controller_writes(ours: tuple[KubeAPI, KubeState]) -> None:
    """manifests/crds in pruning mode: the fields we rely on stick, nothing is learnt as dropped, and
    the controller converges all the same."""
    api, kube = ours
    controller = Controller(kube)
    await _passes(controller, 1)
    first = sum(api.write_counts().values())
    await _passes(controller, 2)
    assert sum(api.write_counts().values()) == first
    for kind in ("LocalModelNode", "LocalModelCache", "LocalModelNodeGroup"):
        assert controller._sticking.paths(kind) == frozenset(), kind
    (entry,) = (await kube.get(LOCAL_MODEL_NODE, "n1"))["spec"]["localModels"]
    assert entry["modelSize"] == "1Gi"
    m = (await kube.get(LOCAL_MODEL_CACHE, "m"))["status"]
    assert {(c["type"], c["nodeGroup"], c["status"]) for c in m["conditions"]} == {
        ("Admitted", "g", "True"),
        ("Ready", "g", "False"),
    }
    assert m["observedGeneration"] == 1
    big = (await kube.get(LOCAL_MODEL_CACHE, "big"))["status"]
    assert [c["reason"] for c in big["conditions"] if c["type"] == "Admitted"] == ["InsufficientStorage"]
    g = (await kube.get(LOCAL_MODEL_NODE_GROUP, "g"))["status"]
    assert g == {"used": "1Gi", "available": "99Gi", "nodes": 1, "observedGeneration": 1}


async def test_a_repeated_event_is_one_object_with_its_count(ours: tuple[KubeAPI, KubeState]) -> None:
    api, kube = ours
    log = EventLog()

    def body(at: str) -> dict[str, Any]:
        return event_body(
            involved=LOCAL_MODEL_NODE,
            name="n1",
            uid=None,
            reason="CopyFailed",
            message="x",
            type_="Warning",
            component="c",
            now=at,
        )

    for at in ("2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"):
        await record_event(kube, log, body(at))
    (event,) = await api.events(reason="CopyFailed")
    assert (event["count"], event["firstTimestamp"], event["lastTimestamp"]) == (
        3,
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:02:00Z",
    )
    # Expired meanwhile (the API server's event TTL): created again, counting from one.
    await kube.delete(EVENT, event["metadata"]["name"], namespace="default")
    await record_event(kube, log, body("2026-01-01T02:00:00Z"))
    (again,) = await api.events(reason="CopyFailed")
    assert again["count"] == 1 and again["metadata"]["name"] != event["metadata"]["name"]
    with pytest.raises(NotFound):
        await kube.get(EVENT, event["metadata"]["name"], namespace="default")


async def test_the_agent_writes_no_status_change_that_cannot_stick(tmp_path: Path, hf_hub: Hub) -> None:
    """Under KServe's LocalModelNode CRD (status: modelStatus only) the agent's converged status is
    not written again; a change in what the schema drops (the group's storageLimit grew: the
    capacity it reports) is not written at all; a change in modelStatus is, once."""
    api = KubeAPI(crds=load_crds(KSERVE_CRDS))
    await api.start()
    cache_dir = tmp_path / "cache"
    hf_hub.add_repo("org/a", {"w.bin": os.urandom(20 << 10)})
    await api.create(group_doc("g", limit="40Ki", path=cache_dir))
    await api.create(node_doc("n1", [("a", "hf://org/a", "32Ki")]))
    state = KubeState.for_url(api.url, watch_timeout=30)
    status = ("patch", "localmodelnodes/status", "n1")
    settled = {"a": "ModelDownloaded"}

    async def model_status() -> dict[str, str]:
        lmn = await api.store.get(LOCAL_MODEL_NODE, "n1")
        return dict((lmn.get("status") or {}).get("modelStatus") or {})

    try:
        async with running_agent(state, cache_dir, store=api.store) as run:
            await eventually(lambda: _is(model_status(), settled), what="a downloaded")
            await asyncio.sleep(1.0)  # 20 status intervals
            converged = api.write_counts()[status]
            await asyncio.sleep(1.0)
            assert api.write_counts()[status] == converged
            assert run.agent.writer.sticking.paths("LocalModelNode") >= {("capacity",), ("conditions",)}

            await api.store.patch(LOCAL_MODEL_NODE_GROUP, "g", {"spec": {"storageLimit": "50Ki"}})
            await eventually(
                lambda: (run.agent.node_status().capacity.limit or Quantity.from_bytes(0)).bytes == 50 << 10,
                what="the new limit",
            )
            await asyncio.sleep(1.0)
            assert api.write_counts()[status] == converged
            assert await model_status() == settled

            await api.store.patch(LOCAL_MODEL_NODE, "n1", {"spec": {"localModels": []}})
            await eventually(lambda: _is(model_status(), {}), what="a out of the spec")
            await asyncio.sleep(1.0)
            assert api.write_counts()[status] == converged + 1
    finally:
        await state.close()
        await api.close()


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)
