"""The Kubernetes API emulator's CRD mode (tests/support/kubeapi.py), driven through the project's
own client (:class:`~localmodel.state.kube.KubeState`, lightkube's HTTP client) and lightkube's
typed client for PUT: pruning by the installed CRD's schema, ``/status`` of a CRD without a status
subresource, the write log and counts, and Events.

The CRDs are KServe v0.20's own (tests/data/kserve-crds/) and small ones written here for the rules
KServe's do not exercise (preserve-unknown-fields, embedded resources).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_global_resource

from localmodel.errors import Conflict, NotFound
from localmodel.events import event_body
from localmodel.kinds import (
    EVENT,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    ResourceKind,
)
from localmodel.state.kube import KubeState
from tests.support.kubeapi import EVENTS_V1, KubeAPI, load_crds, prune
from tests.test_controller_reconcile import cache, group

KSERVE_CRDS = Path(__file__).parent / "data" / "kserve-crds"


@pytest_asyncio.fixture
async def kserve() -> AsyncIterator[tuple[KubeAPI, KubeState]]:
    api = KubeAPI(crds=load_crds(KSERVE_CRDS))
    await api.start()
    state = KubeState.for_url(api.url, component="crd-test")
    try:
        yield api, state
    finally:
        await state.close()
        await api.close()


def test_kserve_crds_are_read_with_their_subresources() -> None:
    api = KubeAPI(crds=load_crds(KSERVE_CRDS))
    installed = {c.kind.kind: c for c in api.crds.values()}
    assert sorted(installed) == [
        "LocalModelCache",
        "LocalModelNamespaceCache",
        "LocalModelNode",
        "LocalModelNodeGroup",
    ]
    assert installed["LocalModelCache"].kind.has_status
    assert installed["LocalModelNode"].kind.has_status
    assert not installed["LocalModelNodeGroup"].kind.has_status  # KServe's has no subresources
    assert installed["LocalModelNamespaceCache"].kind.namespaced


# -- pruning: the algorithm alone -------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "known": {"type": "string"},
                "list": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"a": {"type": "string"}}},
                },
                "map": {
                    "type": "object",
                    "additionalProperties": {"type": "object", "properties": {"b": {}}},
                },
                "open": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"inner": {"type": "object", "properties": {"c": {"type": "string"}}}},
                },
                "template": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {}},
                "bare": {"type": "object"},
            },
        },
    },
}


def test_prune_follows_the_api_servers_rules() -> None:
    obj: dict[str, Any] = {
        "apiVersion": "x/v1",
        "kind": "X",
        "metadata": {"name": "a", "labels": {"l": "1"}, "unknownMeta": 1},
        "spec": {
            "known": "k",
            "unknown": "u",
            "list": [{"a": "1", "z": 2}],
            "map": {"any-key": {"b": 1, "z": 2}},
            "open": {"anything": [1], "inner": {"c": "c", "z": 3}},
            "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"z": 1}},
            "bare": {"z": 1},
        },
        "status": {"gone": True},
    }
    assert prune(obj, SCHEMA, root=True) == {
        "apiVersion": "x/v1",
        "kind": "X",
        "metadata": {"name": "a", "labels": {"l": "1"}, "unknownMeta": 1},  # never pruned here
        "spec": {
            "known": "k",
            "list": [{"a": "1"}],
            "map": {"any-key": {"b": 1}},
            "open": {"anything": [1], "inner": {"c": "c"}},  # known fields still pruned inside
            "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
            "bare": {},
        },
    }
    assert obj["spec"]["unknown"] == "u"  # a copy: the input is left as it was


# -- pruning through the API ----------------------------------------------------------------------


async def test_create_prunes_unknown_fields_and_drops_status_with_a_status_subresource(
    kserve: tuple[KubeAPI, KubeState],
) -> None:
    api, state = kserve
    body = cache("m", "1Gi", ["g"])
    body["metadata"]["labels"] = {"team": "a"}
    body["spec"]["nodeGroup"] = "g"  # ours, not KServe's
    body["status"] = {"copies": {"total": 1}}
    stored = await state.create(LOCAL_MODEL_CACHE, body)
    assert stored["spec"] == {"sourceModelUri": "hf://org/m", "modelSize": "1Gi", "nodeGroups": ["g"]}
    assert "status" not in stored
    assert stored["metadata"]["labels"] == {"team": "a"}
    assert (await api.store.get(LOCAL_MODEL_CACHE, "m"))["spec"] == stored["spec"]

    # KServe's group CRD has no status subresource: status is written with the object.
    g = group("g", "10Gi")
    g["status"] = {"used": "1Gi", "conditions": [{"type": "Ready", "status": "True"}]}
    stored = await state.create(LOCAL_MODEL_NODE_GROUP, g)
    assert stored["status"] == {"used": "1Gi"}


async def test_a_patch_of_only_pruned_fields_stores_nothing(kserve: tuple[KubeAPI, KubeState]) -> None:
    api, state = kserve
    await api.create(cache("m", "1Gi", ["g"]))
    before = await state.get(LOCAL_MODEL_CACHE, "m")
    answer = await state.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"nodeGroup": "g"}})
    assert answer["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert "nodeGroup" not in answer["spec"]
    answer = await state.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"nodeGroups": ["g", "h"]}})
    assert answer["spec"]["nodeGroups"] == ["g", "h"]
    assert answer["metadata"]["generation"] == 2
    assert api.write_counts(changed=False) == {("patch", "localmodelcaches", "m"): 1}
    assert api.write_counts(changed=True) == {("patch", "localmodelcaches", "m"): 1}
    # A stale resourceVersion is still a conflict, even when nothing would change.
    with pytest.raises(Conflict):
        await state.patch(LOCAL_MODEL_CACHE, "m", {"spec": {"nodeGroup": "g"}}, resource_version="1")


async def test_status_is_pruned_by_the_schema_and_kept_where_it_names_fields(
    kserve: tuple[KubeAPI, KubeState],
) -> None:
    api, state = kserve
    await api.create(cache("m", "1Gi", ["g"]))
    status = {
        "copies": {"available": 1, "total": 1},
        "nodeStatus": {"n1": "NodeDownloaded"},  # a map of any key: additionalProperties
        "conditions": [{"type": "Ready", "status": "True"}],
        "observedGeneration": 1,
    }
    answer = await state.patch_status(LOCAL_MODEL_CACHE, "m", status)
    assert answer["status"] == {
        "copies": {"available": 1, "total": 1},
        "nodeStatus": {"n1": "NodeDownloaded"},
    }
    rv = answer["metadata"]["resourceVersion"]
    again = await state.patch_status(LOCAL_MODEL_CACHE, "m", status)
    assert again["metadata"]["resourceVersion"] == rv  # the same status again: nothing stored
    assert api.write_counts() == {("patch", "localmodelcaches/status", "m"): 2}
    assert api.write_counts(changed=True) == {("patch", "localmodelcaches/status", "m"): 1}
    # The main endpoint cannot change status; /status cannot change spec.
    await state.patch(LOCAL_MODEL_CACHE, "m", {"status": {"copies": {"total": 9}}})
    await state.patch_status(LOCAL_MODEL_CACHE, "m", {"copies": {"total": 1}})
    stored = await api.store.get(LOCAL_MODEL_CACHE, "m")
    assert stored["status"]["copies"]["total"] == 1


async def test_node_spec_items_lose_our_fields(kserve: tuple[KubeAPI, KubeState]) -> None:
    _, state = kserve
    item = {"modelName": "m", "sourceModelUri": "hf://org/m", "nodeGroup": "g", "modelSize": "1Gi"}
    body = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "metadata": {"name": "n1"},
        "spec": {"localModels": [item]},
    }
    stored = await state.create(LOCAL_MODEL_NODE, body)
    assert stored["spec"]["localModels"] == [
        {"modelName": "m", "sourceModelUri": "hf://org/m", "nodeGroup": "g"}
    ]
    answer = await state.patch_status(
        LOCAL_MODEL_NODE, "n1", {"modelStatus": {"m": "ModelDownloaded"}, "models": {"m": {"state": "Ready"}}}
    )
    assert answer["status"] == {"modelStatus": {"m": "ModelDownloaded"}}


async def test_status_of_a_crd_without_the_subresource_is_not_found(
    kserve: tuple[KubeAPI, KubeState],
) -> None:
    api, state = kserve
    await api.create(group("g", "10Gi"))
    with pytest.raises(NotFound):
        await state.patch_status(LOCAL_MODEL_NODE_GROUP, "g", {"used": "1Gi"})
    with pytest.raises(NotFound):
        await state.patch_status(LOCAL_MODEL_NODE_GROUP, "missing", {"used": "1Gi"})
    assert api.write_counts() == {
        ("patch", "localmodelnodegroups/status", "g"): 1,
        ("patch", "localmodelnodegroups/status", "missing"): 1,
    }
    # ... and the main endpoint writes status instead, as any other field: the generation moves.
    before = await state.get(LOCAL_MODEL_NODE_GROUP, "g")
    answer = await state.patch(LOCAL_MODEL_NODE_GROUP, "g", {"status": {"used": "1Gi", "nodes": 3}})
    assert answer["status"] == {"used": "1Gi"}
    assert answer["metadata"]["generation"] == before["metadata"]["generation"] + 1


async def test_a_kind_only_a_crd_names_is_served(kserve: tuple[KubeAPI, KubeState]) -> None:
    _, state = kserve
    namespace_cache = ResourceKind(
        "serving.kserve.io", "v1alpha1", "LocalModelNamespaceCache", "localmodelnamespacecaches", True
    )
    body = cache("m", "1Gi", ["g"])
    body["kind"] = "LocalModelNamespaceCache"
    body["metadata"]["namespace"] = "team"
    body["spec"]["extra"] = 1
    stored = await state.create(namespace_cache, body)
    assert "extra" not in stored["spec"]
    assert [o["metadata"]["name"] for o in (await state.list(namespace_cache, namespace="team")).items] == [
        "m"
    ]
    await state.patch_status(namespace_cache, "m", {"copies": {"total": 2}}, namespace="team")
    assert (await state.get(namespace_cache, "m", namespace="team"))["status"] == {"copies": {"total": 2}}


async def test_without_crds_nothing_is_pruned(kube_api: KubeAPI) -> None:
    state = KubeState.for_url(kube_api.url, component="crd-test")
    try:
        body = cache("m", "1Gi", ["g"])
        body["spec"]["nodeGroup"] = "g"
        assert (await state.create(LOCAL_MODEL_CACHE, body))["spec"]["nodeGroup"] == "g"
        answer = await state.patch_status(LOCAL_MODEL_CACHE, "m", {"conditions": []})
        assert answer["status"] == {"conditions": []}
    finally:
        await state.close()


# -- PUT, with lightkube's own client ----------------------------------------------------------------


async def test_put_is_pruned_and_needs_a_resource_version(kserve: tuple[KubeAPI, KubeState]) -> None:
    api, _ = kserve
    await api.create(cache("m", "1Gi", ["g"]))
    Cache = create_global_resource("serving.kserve.io", "v1alpha1", "LocalModelCache", "localmodelcaches")
    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
    )
    client = AsyncClient(config, field_manager="crd-test")
    try:
        current = await client.get(Cache, "m")
        body = current.to_dict()  # type: ignore[no-untyped-call]  # lightkube's generic resource is untyped
        body["spec"]["nodeGroups"] = ["h"]
        body["spec"]["nodeGroup"] = "h"
        body["metadata"]["labels"] = {"a": "b"}
        replaced = await client.replace(Cache.from_dict(body))
        assert replaced.spec == {"sourceModelUri": "hf://org/m", "modelSize": "1Gi", "nodeGroups": ["h"]}
        assert replaced.metadata is not None and replaced.metadata.labels == {"a": "b"}
        body["metadata"].pop("resourceVersion")
        with pytest.raises(ApiError) as e:
            await client.replace(Cache.from_dict(body))
        assert e.value.status.code == 422
    finally:
        await client.close()
    assert api.write_counts() == {("update", "localmodelcaches", "m"): 2}


# -- Events ---------------------------------------------------------------------------------------


async def test_events_are_stored_and_counted(kserve: tuple[KubeAPI, KubeState]) -> None:
    api, state = kserve

    for reason in ("Admitted", "Admitted", "Placed"):
        body = event_body(
            involved=LOCAL_MODEL_CACHE,
            name="m",
            uid=None,
            reason=reason,
            message="x",
            type_="Normal",
            component="crd-test",
            now="2026-01-01T00:00:00Z",
        )
        await state.create(EVENT, body)
    assert len(await api.events(reason="Admitted", name="m")) == 2
    assert len(await api.events(name="m")) == 3
    assert await api.events(name="other") == []
    # A repeat as Kubernetes records it: the one Event's count and lastTimestamp move.
    first = (await api.events(reason="Placed"))[0]
    await state.patch(
        EVENT,
        first["metadata"]["name"],
        {"count": 2, "lastTimestamp": "2026-01-01T00:01:00Z"},
        namespace="default",
    )
    assert [e["count"] for e in await api.events(reason="Placed")] == [2]
    assert api.write_counts()[("create", "events", first["metadata"]["name"])] == 1
    assert api.write_counts()[("patch", "events", first["metadata"]["name"])] == 1


async def test_events_k8s_io_is_a_view_of_the_same_events(kserve: tuple[KubeAPI, KubeState]) -> None:
    api, state = kserve
    body = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "m.1", "namespace": "default"},
        "regarding": {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LocalModelCache", "name": "m"},
        "reason": "Admitted",
        "note": "fits",
        "type": "Normal",
        "action": "Admit",
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "modelcache.io/controller",
        "reportingInstance": "ctl-0",
    }
    created = await state.create(EVENTS_V1, body)
    assert created["apiVersion"] == "events.k8s.io/v1" and created["note"] == "fits"
    # The series of a repeat, as events.k8s.io keeps it, written through the new API ...
    series = {"series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"}}
    await state.patch(EVENTS_V1, "m.1", series, namespace="default")
    # ... and read through the old one: one object, the core/v1 field names.
    [core] = await api.events(reason="Admitted", name="m")
    assert core["apiVersion"] == "v1"
    assert (core["message"], core["reportingComponent"], core["series"]["count"]) == (
        "fits",
        body["reportingController"],
        2,
    )
    assert (await state.get(EVENT, "m.1", namespace="default"))["involvedObject"]["name"] == "m"
    listed = await state.list(EVENTS_V1, namespace="default")
    assert [e["regarding"]["name"] for e in listed.items] == ["m"]
    assert api.write_counts() == {("create", "events", "m.1"): 1, ("patch", "events", "m.1"): 1}
