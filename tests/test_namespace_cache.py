"""KServe's LocalModelNamespaceCache (v0.18+), the pure parts: its typed view and key, the
LocalModelNode entries KServe writes for it, placement and capacity beside a cluster cache of the
same model, which cache an InferenceService or a pod uses, the pod and cache admission, its serving
volumes, its Events and metrics, and our CRD against KServe's.

KServe's rules cited (tag v0.20.0):
- status key ``<namespace>/<modelName>``: pkg/apis/serving/v1alpha1/local_model_node_types.go:41-49;
- entries matched by namespace and modelName: pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:650;
- finalizer ``localmodelnamespacecache.kserve.io/finalizer``: reconcilers/utils.go:53;
- namespace cache first, then cluster caches: pkg/apis/serving/v1beta1/inference_service_defaults.go:504-546;
- serving claim ``<cache>-<group>`` in its namespace, PV ``<cache>-<group>-<namespace>``, no owner on
  the PV: reconcilers/utils.go:385-391, 603-626.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent.standalone import StandaloneSource
from controller.admission import place_pod, validate_cache
from controller.cli import load_standalone
from controller.metrics import ControllerMetrics
from controller.plan import plan
from controller.reconcile import Controller, Settings
from controller.serving import serving_demands, volume_name, volume_ref, volume_writes
from controller.snapshot import Options, ServingDemand, Snapshot, listing
from controller.status import isvc_caches
from controller.views import InferenceService, Pod
from localmodel.documents import load_documents
from localmodel.errors import SpecError
from localmodel.events import event_body
from localmodel.kinds import EVENT, LOCAL_MODEL_CACHE, LOCAL_MODEL_NAMESPACE_CACHE, LOCAL_MODEL_NODE
from localmodel.layout import storage_key
from localmodel.placement import admit, layout
from localmodel.resources import (
    FINALIZER,
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    NAMESPACE_CACHE_FINALIZER,
    Copies,
    LocalModelCache,
    LocalModelNamespaceCache,
    LocalModelNode,
    LocalModelNodeGroup,
    Node,
    cache_key,
    parse_cache,
    split_key,
)
from localmodel.state.memory import MemoryState

ROOT = Path(__file__).resolve().parent.parent
KSERVE_CRDS = Path(__file__).parent / "data" / "kserve-crds"
T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-02T00:00:00Z"
URI = "hf://org/llama"
OTHER = "hf://org/other"


def cache_json(
    name: str, uri: str, size: str, *, namespace: str | None = None, created: str = T0
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created, "uid": f"uid-{namespace}-{name}"}
    if namespace is not None:
        meta["namespace"] = namespace
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelCache" if namespace is None else "LocalModelNamespaceCache",
        "metadata": meta,
        "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": ["g"]},
    }


def cache(
    name: str, uri: str, size: str, *, namespace: str | None = None, created: str = T0
) -> LocalModelCache:
    return parse_cache(cache_json(name, uri, size, namespace=namespace, created=created))


def group(limit: str = "10Gi") -> LocalModelNodeGroup:
    return LocalModelNodeGroup.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNodeGroup",
            "metadata": {"name": "g"},
            "spec": {
                "storageLimit": limit,
                "persistentVolumeSpec": {
                    "hostPath": {"path": "/models"},
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["g"]}]}
                            ]
                        }
                    },
                },
            },
        }
    )


def node(name: str = "n1", **labels: str) -> Node:
    return Node(name, {"gpu": "g", **labels})


# -- the typed view and its key ----------------------------------------------------------------


def test_a_namespace_cache_parses_with_its_key_finalizer_and_kind() -> None:
    c = cache("llama", URI, "1Gi", namespace="team-a")
    assert isinstance(c, LocalModelNamespaceCache)
    assert (c.key, c.namespace, c.finalizer, c.kind) == (
        "team-a/llama",
        "team-a",
        NAMESPACE_CACHE_FINALIZER,
        LOCAL_MODEL_NAMESPACE_CACHE,
    )
    assert c.to_json()["kind"] == "LocalModelNamespaceCache"
    assert parse_cache(c.to_json()) == c
    plain = cache("llama", URI, "1Gi")
    assert (plain.key, plain.namespace, plain.finalizer, plain.kind) == (
        "llama",
        None,
        FINALIZER,
        LOCAL_MODEL_CACHE,
    )
    # A document without a namespace is in "default", as kubectl apply puts it.
    raw = cache_json("llama", URI, "1Gi", namespace="x")
    del raw["metadata"]["namespace"]
    assert LocalModelNamespaceCache.from_json(raw).key == "default/llama"
    # Each kind's parser refuses the other's objects, naming the field.
    with pytest.raises(SpecError, match="kind"):
        LocalModelCache.from_json(cache_json("llama", URI, "1Gi", namespace="x"))
    assert (cache_key("a", "ns"), cache_key("a"), split_key("ns/a"), split_key("a")) == (
        "ns/a",
        "a",
        ("ns", "a"),
        (None, "a"),
    )


def test_a_node_lists_a_namespace_cache_and_a_cluster_cache_of_one_name() -> None:
    path = ROOT / "tests" / "data" / "crs" / "valid" / "localmodelnode-namespace-and-cluster-cache.yaml"
    lmn = LocalModelNode.from_json(yaml.safe_load(path.read_text()))
    assert [m.status_key for m in lmn.local_models] == [
        "meta-llama3-8b-instruct",
        "team-a/meta-llama3-8b-instruct",
    ]
    assert listing([lmn]) == {
        "meta-llama3-8b-instruct": {"node-1"},
        "team-a/meta-llama3-8b-instruct": {"node-1"},
    }
    twice = lmn.to_json()
    twice["spec"]["localModels"].append(dict(twice["spec"]["localModels"][1]))
    with pytest.raises(SpecError, match="twice in one namespace") as info:
        LocalModelNode.from_json(twice)
    assert info.value.field == "spec.localModels"


# -- placement and capacity --------------------------------------------------------------------


def test_namespace_caches_take_group_capacity_and_one_model_is_charged_once() -> None:
    shared = cache("llama", URI, "4Gi")
    mine = cache("llama", URI, "5Gi", namespace="team-a", created=T1)  # the same model, declared larger
    other = cache("llama", OTHER, "2Gi", namespace="team-b", created=T1)
    too_big = cache("big", "hf://org/big", "1Gi", namespace="team-c", created="2026-01-03T00:00:00Z")
    placed = admit([shared, mine, other, too_big], [group("8Gi")])
    # 4Gi for the model, 1Gi more for its larger declaration in team-a, 2Gi for team-b's: 7Gi of 8Gi.
    assert placed.admitted == {"g": ("llama", "team-a/llama", "team-b/llama", "team-c/big")}
    assert placed.usage["g"].used == 8 * 2**30
    later = cache("big", "hf://org/big", "2Gi", namespace="c", created="2026-01-04T00:00:00Z")
    refused = admit([shared, mine, other, later], [group("8Gi")])
    assert [(r.cache, r.reason) for r in refused.refused] == [("c/big", "InsufficientStorage")]

    wanted = layout([shared, mine, other], [group()], [node()]).wanted["n1"]
    assert {k: (m.model_name, m.namespace, m.status_key) for k, m in wanted.items()} == {
        "llama": ("llama", None, "llama"),
        "team-a/llama": ("llama", "team-a", "team-a/llama"),
        "team-b/llama": ("llama", "team-b", "team-b/llama"),
    }


def test_the_plan_writes_entries_status_finalizers_and_events_per_namespace_cache() -> None:
    mine = cache("llama", URI, "1Gi", namespace="team-a")
    plain = cache("llama", URI, "1Gi")
    caches = {c.key: c for c in (mine, plain)}
    lmn = LocalModelNode.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNode",
            "metadata": {"name": "n1"},
            "spec": {
                "localModels": [
                    {"sourceModelUri": URI, "modelName": "llama", "nodeGroup": "g"},
                    {"sourceModelUri": URI, "modelName": "llama", "namespace": "team-a", "nodeGroup": "g"},
                ]
            },
            # What KServe's agent reported: team-a's copy failed, the cluster cache's is there.
            "status": {"modelStatus": {"llama": "ModelDownloaded", "team-a/llama": "ModelDownloadError"}},
        }
    )
    s = Snapshot(caches=caches, groups={"g": group()}, nodes={"n1": node()}, local_model_nodes={"n1": lmn})
    result = plan(s, Options(now=T1))
    assert result.node_status == {
        "llama": {"n1": "NodeDownloaded"},
        "team-a/llama": {"n1": "NodeDownloadError"},
    }
    writes = {(w.kind, w.namespace, w.name): w for w in result.statuses}
    team_a = writes[("LocalModelNamespaceCache", "team-a", "llama")]
    assert team_a.key == "team-a/llama"
    assert team_a.patch["copies"] == {"available": 0, "total": 1, "failed": 1}
    assert writes[("LocalModelCache", None, "llama")].patch["copies"] == {
        "available": 1,
        "total": 1,
        "failed": 0,
    }
    # Neither has its finalizer yet: each gets its own kind's (the key says which).
    assert {(f.cache, f.add) for f in result.finalizers} == {("llama", True), ("team-a/llama", True)}
    failed = [e for e in result.events if e.reason == "CopyFailed"]
    assert [(e.kind, e.namespace, e.name) for e in failed] == [
        ("LocalModelNamespaceCache", "team-a", "llama")
    ]
    # The node keeps both entries, told apart by namespace (ours carry modelSize and storageKey too).
    (write,) = result.nodes
    assert [(m.model_name, m.namespace, m.status_key) for m in write.models] == [
        ("llama", None, "llama"),
        ("llama", "team-a", "team-a/llama"),
    ]


# -- which cache is used -----------------------------------------------------------------------


def test_an_inference_service_prefers_its_namespace_s_cache() -> None:
    caches = {
        c.key: c
        for c in (
            cache("llama", URI, "1Gi"),
            cache("mine", URI, "1Gi", namespace="team-a"),
            cache("theirs", URI, "1Gi", namespace="team-b"),
        )
    }

    def isvc(namespace: str, labels: dict[str, str] | None = None) -> InferenceService:
        return InferenceService.from_json(
            {
                "metadata": {"name": "s", "namespace": namespace, "labels": labels or {}},
                "spec": {"predictor": {"model": {"storageUri": URI + "/sub"}}},
            }
        )

    assert isvc_caches(isvc("team-a"), caches) == {"team-a/mine"}
    assert isvc_caches(isvc("team-c"), caches) == {"llama"}  # no cache of its own: the cluster's
    labelled = isvc("team-b", {LOCALMODEL_LABEL: "theirs", LOCALMODEL_NAMESPACE_LABEL: "team-b"})
    assert labelled.named == "team-b/theirs"
    assert isvc_caches(labelled, caches) == {"team-b/theirs"}
    # Labels naming another namespace's cache (KServe's reconciler ignores them): not its cache.
    foreign = isvc("team-c", {LOCALMODEL_LABEL: "theirs", LOCALMODEL_NAMESPACE_LABEL: "team-b"})
    assert isvc_caches(foreign, caches) == {"llama"}


def test_a_pod_names_a_namespace_cache_by_kserve_s_two_labels() -> None:
    def pod_of(labels: dict[str, str], **annotations: str) -> Pod:
        return Pod.from_json(
            {"metadata": {"name": "p", "namespace": "team-a", "labels": labels, "annotations": annotations}}
        )

    both = {LOCALMODEL_LABEL: "llama", LOCALMODEL_NAMESPACE_LABEL: "team-a"}
    assert pod_of(both).cache == "team-a/llama"
    assert pod_of({LOCALMODEL_LABEL: "llama"}).cache == "llama"
    assert pod_of(both, **{"serving.kserve.io/disable-localmodel": "true"}).cache is None


# -- admission ---------------------------------------------------------------------------------


def _pod(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }


def test_pod_webhook_serves_a_namespace_cache_in_its_namespace_only() -> None:
    mine = cache("llama", URI, "1Gi", namespace="team-a")
    labels = {LOCALMODEL_LABEL: "llama", LOCALMODEL_NAMESPACE_LABEL: "team-a"}
    ready = [node(**{f"modelcache.io/model.{storage_key(URI)}": "ready"})]
    verdict = place_pod(
        _pod("team-a", labels), cache=mine, group=group(), ready_nodes=ready, namespace="team-a"
    )
    assert verdict.allowed, verdict.message
    assert verdict.patch[0]["path"] == "/spec/affinity"
    elsewhere = place_pod(
        _pod("team-b", labels), cache=mine, group=group(), ready_nodes=ready, namespace="team-b"
    )
    assert not elsewhere.allowed
    assert elsewhere.message == (
        "LocalModelNamespaceCache 'team-a/llama' serves namespace 'team-a' only; this pod is in 'team-b' "
        "(use a LocalModelCache, or a LocalModelNamespaceCache of this namespace)"
    )
    # What our webhook used to say of every such pod ("LocalModelCache 'x' does not exist") is said
    # only when the namespace cache is truly missing, naming it.
    missing = place_pod(_pod("team-a", labels), cache=None, group=group(), namespace="team-a")
    assert missing.message == "LocalModelNamespaceCache 'team-a/llama' does not exist"
    not_yet = place_pod(
        _pod("team-a", labels), cache=mine, group=group(), ready_nodes=[node()], namespace="team-a"
    )
    assert not not_yet.allowed
    assert "holds LocalModelNamespaceCache 'team-a/llama' downloaded yet" in not_yet.message


def test_cache_webhook_judges_a_namespace_cache_as_a_cluster_cache() -> None:
    existing = [cache("llama", URI, "4Gi"), cache("first", OTHER, "1Gi", namespace="team-a")]
    groups = [group("8Gi")]

    def review(obj: dict[str, Any]) -> tuple[bool, str]:
        v = validate_cache("CREATE", obj, None, caches=existing, groups=groups)
        return v.allowed, v.message

    # Beside a cluster cache of the same model: KServe's way to give a namespace its own copy.
    assert review(cache_json("mine", URI, "4Gi", namespace="team-b")) == (True, "")
    # The same URI twice in one namespace is refused, as among cluster caches; another namespace may.
    allowed, message = review(cache_json("second", OTHER, "1Gi", namespace="team-a"))
    assert not allowed
    assert message.startswith("LocalModelNamespaceCache 'team-a/first' already caches")
    assert review(cache_json("second", OTHER, "1Gi", namespace="team-c")) == (True, "")
    # Capacity: the same admission as the controller's, every kind of cache counted.
    allowed, message = review(cache_json("huge", "hf://org/huge", "4Gi", namespace="team-b"))
    assert not allowed
    assert message == "no listed node group can admit it: needs 4Gi, group g has 3Gi of 8Gi free"
    missing = cache_json("x", "hf://org/x", "1Gi", namespace="team-b")
    missing["spec"]["nodeGroups"] = ["nope"]
    assert review(missing) == (False, "node group 'nope' does not exist (node groups: g)")


# -- serving volumes ---------------------------------------------------------------------------


def test_serving_volumes_of_a_namespace_cache_are_in_its_namespace_and_win_its_claim_name() -> None:
    plain = cache("llama", URI, "1Gi")
    mine = cache("llama", OTHER, "1Gi", namespace="team-a", created=T1)
    caches = {c.key: c for c in (plain, mine)}
    admitted = admit(caches.values(), [group()]).admitted
    labels = {LOCALMODEL_LABEL: "llama", LOCALMODEL_NAMESPACE_LABEL: "team-a"}
    pods = [
        Pod.from_json(_pod("team-a", labels)),
        Pod.from_json(_pod("team-b", {LOCALMODEL_LABEL: "llama"})),
        # A pod of team-a mounting llama-g: the claim there is team-a's cache's.
        Pod.from_json(
            {
                "metadata": {"name": "q", "namespace": "team-a"},
                "spec": {"volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": "llama-g"}}]},
            }
        ),
    ]
    demands = serving_demands(pods, caches)
    assert demands == {
        ServingDemand("team-a/llama", None, "team-a"),
        ServingDemand("team-a/llama", "g", "team-a"),
        ServingDemand("llama", None, "team-b"),
    }
    # The cluster cache asked for in team-a too (an old pod): the namespace cache keeps the name there.
    demands |= {ServingDemand("llama", None, "team-a"), ServingDemand("team-a/llama", None, "team-c")}
    s = Snapshot(caches=caches, groups={"g": group()}, nodes={}, serving=frozenset(demands))
    writes = volume_writes(s, admitted)
    # PV names are KServe's <cache>-<group>-<namespace>, made unique where a namespace has a "-".
    assert [(w.kind, w.action, w.name, w.namespace) for w in writes] == [
        ("PersistentVolume", "create", volume_name("llama", "g", "team-b"), None),
        ("PersistentVolumeClaim", "create", "llama-g", "team-b"),
        ("PersistentVolume", "create", volume_name("llama", "g", "team-a"), None),
        ("PersistentVolumeClaim", "create", "llama-g", "team-a"),
    ]
    pv, pvc = writes[2].body, writes[3].body
    assert pv is not None and pvc is not None
    assert pv["spec"]["hostPath"]["path"] == f"/models/models/{storage_key(OTHER)}"
    assert "ownerReferences" not in pv["metadata"]  # no namespaced owner for a cluster-scoped PV
    assert pvc["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNamespaceCache",
            "name": "llama",
            "uid": "uid-team-a-llama",
            "blockOwnerDeletion": False,
        }
    ]
    ref = volume_ref(pv)
    assert ref is not None and (ref.cache, ref.namespace) == ("team-a/llama", "team-a")
    # Once the namespace cache is gone, the controller deletes its PV itself (no owner collects it).
    gone = Snapshot(
        caches={"llama": plain},
        groups={"g": group()},
        nodes={},
        volumes={volume_name("llama", "g", "team-a"): ref},
    )
    assert [(w.kind, w.action, w.name) for w in volume_writes(gone, admit([plain], [group()]).admitted)] == [
        ("PersistentVolume", "delete", volume_name("llama", "g", "team-a"))
    ]


# -- Events and metrics ------------------------------------------------------------------------


def test_a_namespace_cache_s_event_names_its_namespace() -> None:
    body = event_body(
        involved=LOCAL_MODEL_NAMESPACE_CACHE,
        name="llama",
        uid="u",
        reason="Placed",
        message="m",
        type_="Normal",
        component="c",
        now=T0,
        namespace="team-a",
    )
    assert body["metadata"]["namespace"] == "team-a"
    assert body["involvedObject"]["namespace"] == "team-a"
    cluster = event_body(
        involved=LOCAL_MODEL_CACHE, name="llama", uid="u", reason="Placed", message="m", type_="Normal",
        component="c", now=T0,
    )  # fmt: skip
    assert "namespace" not in cluster["involvedObject"]


def test_copies_metric_tells_namespaces_apart() -> None:
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry)
    metrics.set_copies({("llama", "g"): Copies(1, 2, 0), ("team-a/llama", "g"): Copies(2, 2, 0)})

    def value(namespace: str) -> float | None:
        labels = {"cache": "llama", "namespace": namespace, "group": "g", "state": "available"}
        return registry.get_sample_value("modelcache_controller_copies", labels)

    assert (value(""), value("team-a")) == (1.0, 2.0)
    metrics.set_copies({("llama", "g"): Copies(1, 2, 0)})
    assert (value(""), value("team-a")) == (1.0, None)


# -- our CRDs against KServe's -----------------------------------------------------------------


def _paths(schema: dict[str, Any], path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {path: schema.get("type")}
    for key, sub in (schema.get("properties") or {}).items():
        out.update(_paths(sub, f"{path}.{key}"))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out.update(_paths(schema[key], f"{path}[]"))
    return out


def _schema(path: Path) -> dict[str, Any]:
    (version,) = yaml.safe_load(path.read_text())["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_our_namespace_cache_crd_keeps_every_field_of_kserve_s() -> None:
    ours = _paths(_schema(ROOT / "manifests" / "crds" / "localmodelnamespacecaches.yaml"))
    theirs = _paths(_schema(KSERVE_CRDS / "serving.kserve.io_localmodelnamespacecaches.yaml"))
    assert {p: t for p, t in theirs.items() if ours.get(p, "missing") != t} == {}
    crd = yaml.safe_load((ROOT / "manifests" / "crds" / "localmodelnamespacecaches.yaml").read_text())
    kserve = yaml.safe_load((KSERVE_CRDS / "serving.kserve.io_localmodelnamespacecaches.yaml").read_text())
    assert crd["metadata"]["name"] == kserve["metadata"]["name"]
    assert crd["spec"]["scope"] == kserve["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == kserve["spec"]["names"]["kind"]
    node_status = _schema(ROOT / "manifests" / "crds" / "localmodelnamespacecaches.yaml")["properties"][
        "status"
    ]
    enum = node_status["properties"]["nodeStatus"]["additionalProperties"]["enum"]
    assert "" in enum  # KServe's enum accepts it: an object KServe stored stays valid under ours


def test_our_localmodelnode_crd_takes_entries_of_one_model_name() -> None:
    """KServe's localModels is an atomic list: a list-map keyed by modelName alone (ours before)
    refuses a namespace cache's entry beside a cluster cache's of the same name."""
    spec = _schema(ROOT / "manifests" / "crds" / "localmodelnodes.yaml")["properties"]["spec"]
    local_models = spec["properties"]["localModels"]
    assert local_models.get("x-kubernetes-list-type", "atomic") == "atomic"
    assert "x-kubernetes-list-map-keys" not in local_models
    kserve = _schema(KSERVE_CRDS / "serving.kserve.io_localmodelnodes.yaml")["properties"]["spec"]
    assert "x-kubernetes-list-type" not in kserve["properties"]["localModels"]


# -- the embedded state: documents of kind LocalModelNamespaceCache ------------------------------


def _documents(path: Path, *, node: bool = True) -> Path:
    """A Node (``node``: the controller's documents have one, the agent's its labels instead), a
    group, a cluster cache and two namespace caches of one name."""
    node_doc = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"gpu": "g"}}}
    docs = [
        *([node_doc] if node else []),
        group().to_json(),
        cache_json("llama", URI, "1Gi"),
        cache_json("llama", URI, "1Gi", namespace="team-a"),
        cache_json("llama", OTHER, "1Gi", namespace="team-b"),
    ]
    for d in docs:
        d["metadata"].pop("uid", None)
        d["metadata"].pop("creationTimestamp", None)
    path.write_text(yaml.safe_dump_all(docs))
    return path


async def test_controller_over_documents_places_namespace_caches(tmp_path: Path) -> None:
    state = MemoryState()
    await load_standalone(state, _documents(tmp_path / "docs.yaml"), initial=True)
    controller = Controller(state, Settings(standalone=True))
    await controller.run(once=True)
    lmn = await state.get(LOCAL_MODEL_NODE, "n1")
    assert [(m["modelName"], m.get("namespace")) for m in lmn["spec"]["localModels"]] == [
        ("llama", None),
        ("llama", "team-a"),
        ("llama", "team-b"),
    ]
    team_a = await state.get(LOCAL_MODEL_NAMESPACE_CACHE, "llama", namespace="team-a")
    assert team_a["metadata"]["finalizers"] == [NAMESPACE_CACHE_FINALIZER]
    assert team_a["status"]["nodeStatus"] == {"n1": "NodeDownloadPending"}
    assert team_a["status"]["copies"] == {"available": 0, "total": 1, "failed": 0}
    events = (await state.list(EVENT, namespace="team-b")).items
    assert {(e["reason"], e["involvedObject"]["kind"], e["involvedObject"]["name"]) for e in events} >= {
        ("Admitted", "LocalModelNamespaceCache", "llama"),
        ("Placed", "LocalModelNamespaceCache", "llama"),
    }


async def test_agent_standalone_places_namespace_caches(tmp_path: Path) -> None:
    state = MemoryState()
    docs = _documents(tmp_path / "docs.yaml", node=False)
    source = StandaloneSource(docs, node_name="n1", labels={"gpu": "g"}, state=state)
    assert await source.load()
    lmn = LocalModelNode.from_json(await state.get(LOCAL_MODEL_NODE, "n1"))
    assert [m.status_key for m in lmn.local_models] == ["llama", "team-a/llama", "team-b/llama"]
    assert [c["metadata"]["namespace"] for c in (await state.list(LOCAL_MODEL_NAMESPACE_CACHE)).items] == [
        "team-a",
        "team-b",
    ]


def test_documents_tell_namespace_caches_apart_by_namespace(tmp_path: Path) -> None:
    docs = [cache_json("llama", URI, "1Gi", namespace="a"), cache_json("llama", URI, "1Gi", namespace="b")]
    path = tmp_path / "docs.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert [d.name for d in load_documents(path)] == ["a/llama", "b/llama"]
    path.write_text(yaml.safe_dump_all([docs[0], docs[0]]))
    with pytest.raises(SpecError, match="LocalModelNamespaceCache 'a/llama' is defined twice"):
        load_documents(path)


async def test_embedded_state_applies_and_prunes_namespaced_documents_by_namespace() -> None:
    state = MemoryState()
    a, b = cache_json("llama", URI, "1Gi", namespace="a"), cache_json("llama", OTHER, "1Gi", namespace="b")
    await state.apply(LOCAL_MODEL_NAMESPACE_CACHE, [a, b], prune=True)
    stored = (await state.list(LOCAL_MODEL_NAMESPACE_CACHE)).items
    assert sorted((o["metadata"]["namespace"], o["spec"]["sourceModelUri"]) for o in stored) == [
        ("a", URI),
        ("b", OTHER),
    ]
    await state.apply(LOCAL_MODEL_NAMESPACE_CACHE, [b], prune=True)  # a's document is gone
    stored = (await state.list(LOCAL_MODEL_NAMESPACE_CACHE)).items
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in stored] == [("b", "llama")]
