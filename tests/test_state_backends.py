"""The ClusterState interface behaves the same on both backends: the embedded one, and the
Kubernetes API over HTTP (against the emulator in tests/support/kubeapi.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from localmodel.errors import AlreadyExists, Conflict, Gone, InvalidName, NotFound
from localmodel.kinds import EVENT, LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, NODE, SECRET
from localmodel.state.base import ClusterState, ObjectList, Selector, WatchEvent, update_status, watch
from localmodel.state.kube import KubeState
from localmodel.state.memory import MemoryState
from tests.support.kubeapi import KubeAPI


@dataclass
class Backend:
    state: ClusterState
    expire: Callable[[], None]
    lists: Callable[[], int]  # list calls so far: proves a relist happened


class CountingMemoryState(MemoryState):
    lists = 0

    async def list(self, *args: Any, **kw: Any) -> Any:
        self.lists += 1
        return await super().list(*args, **kw)


@pytest_asyncio.fixture(params=["memory", "kube"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = CountingMemoryState()
        yield Backend(memory, memory.compact, lambda: memory.lists)
        return
    api = KubeAPI()
    await api.start()
    state = KubeState.for_url(api.url, watch_timeout=5)
    try:
        yield Backend(
            state,
            api.expire_watches,
            lambda: sum(1 for m, p in api.requests if m == "GET" and "watch=" not in p and "/nodes" in p),
        )
    finally:
        await state.close()
        await api.close()


def cache(name: str, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"sourceModelUri": f"hf://org/{name}", "modelSize": "1Gi", "nodeGroups": ["g"]},
    }


async def test_create_get_list_with_selectors(backend: Backend) -> None:
    s = backend.state
    created = await s.create(LOCAL_MODEL_CACHE, cache("a", tier="gold"))
    assert created["kind"] == "LocalModelCache" and created["metadata"]["resourceVersion"]
    await s.create(LOCAL_MODEL_CACHE, cache("b", tier="silver"))
    got = await s.get(LOCAL_MODEL_CACHE, "a")
    assert got["spec"]["sourceModelUri"] == "hf://org/a" and got["apiVersion"] == "serving.kserve.io/v1alpha1"

    def names(lst: ObjectList) -> list[str]:
        return [o["metadata"]["name"] for o in lst.items]

    assert names(await s.list(LOCAL_MODEL_CACHE)) == ["a", "b"]
    assert names(await s.list(LOCAL_MODEL_CACHE, selector=Selector(labels={"tier": "silver"}))) == ["b"]
    assert names(await s.list(LOCAL_MODEL_CACHE, selector=Selector(fields={"metadata.name": "a"}))) == ["a"]
    with pytest.raises(AlreadyExists):
        await s.create(LOCAL_MODEL_CACHE, cache("a"))
    with pytest.raises(NotFound):
        await s.get(LOCAL_MODEL_CACHE, "nope")


async def test_patch_merges_and_stale_version_conflicts(backend: Backend) -> None:
    s = backend.state
    v1 = await s.create(LOCAL_MODEL_CACHE, cache("a"))
    v2 = await s.patch(
        LOCAL_MODEL_CACHE, "a", {"spec": {"modelSize": "2Gi"}, "metadata": {"labels": {"x": "y"}}}
    )
    assert v2["spec"]["modelSize"] == "2Gi" and v2["spec"]["nodeGroups"] == ["g"]
    assert v2["metadata"]["labels"]["x"] == "y"
    assert v2["metadata"]["resourceVersion"] != v1["metadata"]["resourceVersion"]
    assert v2["metadata"]["generation"] == 2
    with pytest.raises(Conflict):
        await s.patch(
            LOCAL_MODEL_CACHE,
            "a",
            {"spec": {"modelSize": "3Gi"}},
            resource_version=v1["metadata"]["resourceVersion"],
        )
    v3 = await s.patch(
        LOCAL_MODEL_CACHE,
        "a",
        {"metadata": {"labels": {"x": None}}},
        resource_version=v2["metadata"]["resourceVersion"],
    )
    assert "x" not in (v3["metadata"].get("labels") or {})
    with pytest.raises(NotFound):
        await s.patch(LOCAL_MODEL_CACHE, "nope", {"spec": {}})


async def test_status_is_its_own_subresource(backend: Backend) -> None:
    s = backend.state
    await s.create(LOCAL_MODEL_CACHE, cache("a"))
    after = await s.patch(LOCAL_MODEL_CACHE, "a", {"status": {"copies": {"total": 9}}})
    assert "status" not in after  # the main endpoint ignores status
    st = await s.patch_status(
        LOCAL_MODEL_CACHE, "a", {"copies": {"total": 2}, "nodeStatus": {"n1": "NodeDownloaded"}}
    )
    assert st["status"]["copies"] == {"total": 2} and st["spec"]["modelSize"] == "1Gi"
    st = await s.patch_status(LOCAL_MODEL_CACHE, "a", {"nodeStatus": {"n1": None}})
    assert st["status"].get("nodeStatus", {}) == {}
    assert st["metadata"]["generation"] == 1  # status writes do not bump generation


async def test_update_status_retries_after_a_concurrent_write(backend: Backend) -> None:
    s = backend.state
    await s.create(LOCAL_MODEL_CACHE, cache("a"))
    calls = []

    async def compute(obj: dict[str, Any]) -> dict[str, Any]:
        calls.append(obj["metadata"]["resourceVersion"])
        if len(calls) == 1:  # someone else writes between our read and our write
            await s.patch_status(LOCAL_MODEL_CACHE, "a", {"copies": {"failed": 1}})
        return {"copies": {"total": (obj.get("status", {}).get("copies", {}).get("failed", 0)) + 10}}

    result = await update_status(s, LOCAL_MODEL_CACHE, "a", compute)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert result is not None and result["status"]["copies"] == {"failed": 1, "total": 11}
    assert await update_status(s, LOCAL_MODEL_CACHE, "a", lambda obj: None) is None


async def test_delete_with_finalizers(backend: Backend) -> None:
    s = backend.state
    obj = cache("a")
    obj["metadata"]["finalizers"] = ["localmodel.kserve.io/finalizer"]
    await s.create(LOCAL_MODEL_CACHE, obj)
    await s.delete(LOCAL_MODEL_CACHE, "a")
    marked = await s.get(LOCAL_MODEL_CACHE, "a")
    assert marked["metadata"]["deletionTimestamp"]
    await s.patch(LOCAL_MODEL_CACHE, "a", {"metadata": {"finalizers": None}})
    with pytest.raises(NotFound):
        await s.get(LOCAL_MODEL_CACHE, "a")
    with pytest.raises(NotFound):
        await s.delete(LOCAL_MODEL_CACHE, "a")


async def collect(agen: AsyncIterator[WatchEvent], n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    async for event in agen:
        out.append((event.type, event.object["metadata"]["name"]))
        if len(out) == n:
            break
    return out


async def test_watch_lists_then_streams(backend: Backend) -> None:
    s = backend.state
    await s.create(NODE, {"metadata": {"name": "n1"}})
    stream = watch(s, NODE)
    first = await asyncio.wait_for(collect(stream, 1), 5)
    assert first == [("ADDED", "n1")]
    await s.create(NODE, {"metadata": {"name": "n2"}})
    await s.patch(NODE, "n1", {"metadata": {"labels": {"gpu": "h100"}}})
    await s.delete(NODE, "n2")
    assert await asyncio.wait_for(collect(stream, 3), 5) == [
        ("ADDED", "n2"),
        ("MODIFIED", "n1"),
        ("DELETED", "n2"),
    ]
    await stream.aclose()


async def test_watch_reports_its_first_list_against_what_the_caller_holds(backend: Backend) -> None:
    s = backend.state
    await s.create(NODE, {"metadata": {"name": "n1"}})
    await s.create(NODE, {"metadata": {"name": "n2"}})
    held = (await s.list(NODE)).items  # the caller's own list, before its watch starts
    await s.delete(NODE, "n2")
    await s.create(NODE, {"metadata": {"name": "n3"}})
    stream = watch(s, NODE, known=held)
    events = await asyncio.wait_for(collect(stream, 3), 5)
    assert sorted(events) == [("ADDED", "n3"), ("DELETED", "n2"), ("MODIFIED", "n1")]
    await stream.aclose()


async def test_watch_with_field_selector_sees_only_its_object(backend: Backend) -> None:
    s = backend.state
    stream = watch(s, LOCAL_MODEL_NODE, selector=Selector(fields={"metadata.name": "mine"}))
    await s.create(LOCAL_MODEL_NODE, {"metadata": {"name": "other"}, "spec": {"localModels": []}})
    await s.create(LOCAL_MODEL_NODE, {"metadata": {"name": "mine"}, "spec": {"localModels": []}})
    assert await asyncio.wait_for(collect(stream, 1), 5) == [("ADDED", "mine")]
    await stream.aclose()


async def test_watch_raw_from_an_expired_version_is_gone_and_watch_recovers(backend: Backend) -> None:
    s = backend.state
    await s.create(NODE, {"metadata": {"name": "n1"}})
    await s.create(NODE, {"metadata": {"name": "n2"}})
    old = (await s.list(NODE)).resource_version
    await s.delete(NODE, "n2")
    backend.expire()
    with pytest.raises(Gone):
        async for _ in s.watch_raw(NODE, resource_version=old):
            pass
    # watch() relists on Gone, and reports what changed meanwhile, deletions included.
    stream = watch(s, NODE, retry_delay=0.01)
    assert await asyncio.wait_for(collect(stream, 1), 5) == [("ADDED", "n1")]
    lists = backend.lists()
    backend.expire()
    await s.create(NODE, {"metadata": {"name": "n3"}})
    await s.delete(NODE, "n1")
    events = await asyncio.wait_for(collect(stream, 2), 5)
    assert sorted(events) == [("ADDED", "n3"), ("DELETED", "n1")]
    assert backend.lists() > lists
    await stream.aclose()


async def test_events_are_namespaced_objects(backend: Backend) -> None:
    s = backend.state
    event = {
        "metadata": {"name": "node-1.abc", "namespace": "default"},
        "involvedObject": {
            "kind": "LocalModelNode",
            "name": "node-1",
            "apiVersion": "serving.kserve.io/v1alpha1",
        },
        "reason": "DownloadStarted",
        "message": "started",
        "type": "Normal",
    }
    await s.create(EVENT, event)
    listed = await s.list(EVENT, namespace="default")
    assert [e["reason"] for e in listed.items] == ["DownloadStarted"]


async def test_kube_backend_from_a_kubeconfig_sends_its_token(kube_api: KubeAPI, tmp_path: Any) -> None:
    seen: list[str] = []
    from aiohttp import web
    from aiohttp.typedefs import Handler

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        return await handler(request)

    kube_api.middlewares.append(record)
    config = tmp_path / "kubeconfig"
    config.write_text(
        f"""
apiVersion: v1
kind: Config
current-context: test
clusters: [{{name: c, cluster: {{server: "{kube_api.url}"}}}}]
users: [{{name: u, user: {{token: tok-123}}}}]
contexts: [{{name: test, context: {{cluster: c, user: u}}}}]
"""
    )
    state = KubeState.from_environment(kubeconfig=str(config))
    try:
        await state.create(NODE, {"metadata": {"name": "n1"}})
        assert (await state.get(NODE, "n1"))["metadata"]["name"] == "n1"
    finally:
        await state.close()
    assert seen and all(h == "Bearer tok-123" for h in seen)
    with pytest.raises(Exception, match="cannot load a Kubernetes configuration"):
        KubeState.from_environment(kubeconfig=str(tmp_path / "missing"))


class LossyState(MemoryState):
    """A server whose watch streams lose every deletion (what a restarted or proxied stream can do)."""

    def watch_raw(self, kind: Any, **kw: Any) -> AsyncIterator[WatchEvent]:
        async def stream() -> AsyncIterator[WatchEvent]:
            async for event in super(LossyState, self).watch_raw(kind, **kw):
                if event.type != "DELETED":
                    yield event

        return stream()


async def test_periodic_relist_reports_what_the_stream_lost() -> None:
    state = LossyState()
    for n in ("n1", "n2"):
        await state.create(NODE, {"metadata": {"name": n}})
    seen: list[tuple[str, str]] = []

    async def consume() -> None:
        async for event in watch(state, NODE, relist_every=0.3):
            seen.append((event.type, event.object["metadata"]["name"]))

    task = asyncio.create_task(consume())
    try:
        await _until(lambda: len(seen) == 2)
        await state.create(NODE, {"metadata": {"name": "n3"}})
        await state.delete(NODE, "n1")
        await _until(lambda: ("DELETED", "n1") in seen)
        assert ("ADDED", "n3") in seen  # from the stream; the relist only adds what it lost
        assert seen.count(("DELETED", "n1")) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_clone_copies_json_and_shares_nothing_mutable() -> None:
    from localmodel.mergepatch import clone

    original: dict[str, Any] = {"a": [{"b": 1}, [2, {"c": None}]], "d": {"e": "f"}, "g": 1.5}
    copied = clone(original)
    assert copied == original
    copied["a"][0]["b"] = 9
    copied["a"][1][1]["c"] = 1
    copied["d"]["e"] = "x"
    assert original == {"a": [{"b": 1}, [2, {"c": None}]], "d": {"e": "f"}, "g": 1.5}


async def test_embedded_store_answers_are_the_callers_own() -> None:
    """Stored objects are shared with the history: a caller changing what it got or gave changes
    nothing stored."""
    state = MemoryState()
    body: dict[str, Any] = {"metadata": {"name": "n1"}, "spec": {"localModels": [{"modelName": "m"}]}}
    created = await state.create(LOCAL_MODEL_NODE, body)
    body["spec"]["localModels"][0]["modelName"] = "changed"
    created["spec"]["localModels"].append({"modelName": "x"})
    patched = await state.patch(LOCAL_MODEL_NODE, "n1", {"metadata": {"labels": {"a": "b"}}})
    patched["spec"]["localModels"].clear()
    patched["metadata"]["labels"]["a"] = "c"
    stored = await state.get(LOCAL_MODEL_NODE, "n1")
    assert stored["spec"] == {"localModels": [{"modelName": "m"}]}
    assert stored["metadata"]["labels"] == {"a": "b"}
    events = [e async for e in _first(state.watch_raw(LOCAL_MODEL_NODE, resource_version="0"), 2)]
    assert [e.object["spec"] for e in events] == [{"localModels": [{"modelName": "m"}]}] * 2
    assert "labels" not in events[0].object["metadata"]  # the history kept the first version


async def _first(stream: AsyncIterator[WatchEvent], n: int) -> AsyncIterator[WatchEvent]:
    got = 0
    async for event in stream:
        yield event
        got += 1
        if got == n:
            return


BAD_NAMES = ["..", ".", "", "a/b", "../../default/secrets/tok", "x%2F..%2Fy"]


async def test_a_name_never_changes_the_api_path() -> None:
    """A name or namespace that is no path segment is refused (InvalidName) before any request, by
    both backends alike; any other character is quoted, so a name cannot add a query either."""
    api = KubeAPI()
    await api.start()
    kube = KubeState.for_url(api.url, watch_timeout=5)
    memory = MemoryState()
    try:
        for state in (kube, memory):
            await state.create(SECRET, {"metadata": {"name": "tok", "namespace": "default"}})
            before = len(api.requests)
            for bad in BAD_NAMES:
                with pytest.raises(InvalidName):
                    await state.get(SECRET, bad, namespace="jobs")
                with pytest.raises(InvalidName):
                    await state.get(SECRET, "tok", namespace=bad or "..")
                with pytest.raises(InvalidName):
                    await state.patch(SECRET, bad, {"metadata": {"labels": {"a": "b"}}}, namespace="jobs")
                with pytest.raises(InvalidName):
                    await state.patch_status(LOCAL_MODEL_NODE, bad, {"a": 1})
                with pytest.raises(InvalidName):
                    await state.delete(SECRET, bad, namespace="default")
                with pytest.raises(InvalidName):
                    await state.create(SECRET, {"metadata": {"name": "x", "namespace": bad or ".."}})
            assert api.requests[before:] == []
            # Not a watch of the collection, nor a list: the object of that (impossible) name.
            with pytest.raises(NotFound):
                await state.get(SECRET, "tok?watch=true", namespace="default")
        assert api.requests[-1] == ("GET", "/api/v1/namespaces/default/secrets/tok%3Fwatch%3Dtrue")
        assert (await kube.get(SECRET, "tok", namespace="default"))["metadata"]["name"] == "tok"
    finally:
        await kube.close()
        await api.close()
