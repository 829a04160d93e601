"""What KServe users run into (issue 16 §5), on both cluster-state backends and over real HTTPS where
a webhook decides. KServe's behaviour is cited at tag v0.20.0 (file:line) where a test depends on it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import yaml

from controller.admission import Verdict, place_pod, validate_cache
from controller.reconcile import Controller
from controller.webhook import MUTATE_CACHES, MUTATE_PODS, VALIDATE_CACHES
from localmodel.kinds import (
    INFERENCE_SERVICE,
    LLM_INFERENCE_SERVICE,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
)
from localmodel.resources import LocalModelCache, LocalModelNodeGroup
from localmodel.state.base import ClusterState
from tests import test_controller_reconcile as base
from tests.test_controller_reconcile import cache, group, setup_two_groups
from tests.test_controller_security import KEY, https, kserve_pod
from tests.test_controller_webhook import Client, cache_request, patch_of, pod_request
from tests.test_crds import to_jsonschema, validate

state = base.state  # the fixture: the embedded backend and the API emulator
__all__ = ["https"]
KSERVE_CRDS = Path(__file__).parent / "data" / "kserve-crds"


def kserve_schema(kind_plural: str) -> dict[str, Any]:
    """KServe v0.20's openAPIV3Schema of one of its localmodel CRDs (tests/data/kserve-crds)."""
    doc = yaml.safe_load((KSERVE_CRDS / f"serving.kserve.io_{kind_plural}.yaml").read_text())
    (version,) = doc["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def kserve_schema_errors(obj: dict[str, Any], plural: str = "localmodelcaches") -> list[str]:
    """What KServe's schema refuses in ``obj`` (unknown fields included, as strict apply does)."""
    checker = jsonschema.Draft7Validator(to_jsonschema(kserve_schema(plural)))
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in checker.iter_errors(obj)]


# -- a. KServe-made serving claims keep KServe's mount ---------------------------------------------


def kserve_claim(name: str, namespace: str = "team") -> dict[str, Any]:
    """A serving claim as KServe's localmodel controller makes it: no label of ours, bound to a PV
    whose spec is the node group's own, so its root is the node's /models folder
    (pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:603-624)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "10Gi"}},
            "volumeName": f"{name}-{namespace}",
        },
    }


async def test_a_kserve_made_claim_keeps_kserve_s_subpath(
    https: tuple[ClusterState, Client, Any],
) -> None:
    st, client, _ = https
    await setup_two_groups(st)
    await st.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100"]))
    await st.create(PERSISTENT_VOLUME_CLAIM, kserve_claim("m-a100"))
    await Controller(st).run(once=True)
    await st.patch_status(LOCAL_MODEL_NODE, "a1", {"modelStatus": {"m": "ModelDownloaded"}})
    await Controller(st).run(once=True)
    # The controller left KServe's claim as KServe made it.
    claim = await st.get(PERSISTENT_VOLUME_CLAIM, "m-a100", namespace="team")
    assert "labels" not in claim["metadata"]

    req = kserve_pod("m-a100")
    r = await client.review(MUTATE_PODS, req)
    assert r["allowed"] is True
    # Only the placement: KServe's subPath models/<key> into /models stays, as KServe wrote it.
    assert [op["path"] for op in patch_of(r)] == ["/spec/affinity"]
    pod = jsonpatch.apply_patch(req["object"], patch_of(r))
    model = pod["spec"]["containers"][0]["volumeMounts"][0]
    assert model["subPath"] == f"models/{KEY}"
    assert pod["spec"]["volumes"][0] == req["object"]["spec"]["volumes"][0]

    # A claim the controller has not made yet is one it will make: rewritten to the volume root.
    req = kserve_pod("m-h100")
    req["object"]["metadata"]["annotations"] = {}
    other = await client.review(MUTATE_PODS, req)
    assert other["allowed"] is True
    paths = [op["path"] for op in patch_of(other)]
    assert "/spec/containers/0/volumeMounts/0/subPath" not in paths  # m lists only a100: not its claim


# -- b. a pod that names no cache is never refused for its group -----------------------------------


async def test_a_pod_naming_only_a_missing_group_is_allowed_with_a_warning(
    https: tuple[ClusterState, Client, Any],
) -> None:
    """KServe serves such a pod uncached: an InferenceService whose node group no cache lists gets no
    localmodel label (pkg/apis/serving/v1beta1/inference_service_defaults.go:556-579)."""
    st, client, _ = https
    await setup_two_groups(st)
    await st.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100"]))
    await Controller(st).run(once=True)
    r = await client.review(MUTATE_PODS, pod_request("p", annotations={"serving.kserve.io/nodegroup": "t4"}))
    assert r["allowed"] is True and "patch" not in r and "status" not in r
    assert r["warnings"] == [
        "node group 't4' (serving.kserve.io/nodegroup) does not exist: the pod is placed and served "
        "without the cache"
    ]
    # A pod that names a cache is still refused: it would run without the model it was promised.
    for labels, notes in (
        ({"internal.serving.kserve.io/localmodel": "m"}, {"serving.kserve.io/nodegroup": "t4"}),
        ({}, {"modelcache.io/model": "nope", "serving.kserve.io/nodegroup": "a100"}),
    ):
        r = await client.review(MUTATE_PODS, pod_request("q", labels=labels, annotations=notes))
        assert r["allowed"] is False and r["status"]["code"] == 403, r
        assert "warnings" not in r


def test_a_group_that_selects_no_nodes_warns_a_pod_that_names_no_cache() -> None:
    g = LocalModelNodeGroup.from_json(group("empty", "10Gi"))
    bare = replace(g, spec=replace(g.spec, persistent_volume_spec={"hostPath": {"path": "/models"}}))
    pod = pod_request("p", annotations={"serving.kserve.io/nodegroup": "empty"})["object"]
    verdict = place_pod(pod, cache=None, group=bare)
    assert verdict.allowed and verdict.patch == ()
    assert verdict.warnings == (
        "node group 'empty' has no persistentVolumeSpec.nodeAffinity.required: it selects no nodes; "
        "the pod is placed without it",
    )
    c = LocalModelCache.from_json(cache("m", "10Gi", ["empty"]))
    named = pod_request("p", annotations={"modelcache.io/model": "m"})["object"]
    refused = place_pod(named, cache=c, group=bare)
    assert not refused.allowed and "it selects no nodes" in refused.message


# -- c. the nodeGroup alias is stored as nodeGroups ------------------------------------------------


async def test_the_alias_is_stored_as_node_groups_through_the_webhook(
    https: tuple[ClusterState, Client, Any],
) -> None:
    """KServe's InferenceService defaulter indexes ``spec.nodeGroups[0]``
    (pkg/apis/serving/v1beta1/inference_service_defaults.go:569), so the stored cache has it."""
    _, client, _ = https
    for alias, groups in (("a100", ["a100"]), (["a100", "h100"], ["a100", "h100"])):
        written = {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {"name": "m"},
            "spec": {"sourceModelUri": "hf://org/m", "modelSize": "10Gi", "nodeGroup": alias},
        }
        for operation in ("CREATE", "UPDATE"):
            r = await client.review(MUTATE_CACHES, cache_request(operation, written, written))
            assert r["allowed"] is True
            stored = jsonpatch.apply_patch(written, patch_of(r))
            assert stored["spec"] == {
                "sourceModelUri": "hf://org/m",
                "modelSize": "10Gi",
                "nodeGroups": groups,
            }
            # What is stored passes our CRD and KServe's, and our parser reads the same groups.
            assert validate(stored) == []
            assert kserve_schema_errors(stored) == []
            assert LocalModelCache.from_json(stored).spec.node_groups == tuple(groups)
    # Nothing to do, or not ours to fix (the validating webhook names the field): no patch.
    spec: dict[str, Any]
    for spec in (
        {"nodeGroups": ["a100"]},
        {"nodeGroups": ["a100"], "nodeGroup": "h100"},
        {"nodeGroup": []},
        {"nodeGroup": [""]},
        {"nodeGroup": 3},
    ):
        obj = {
            "metadata": {"name": "m"},
            "spec": {"sourceModelUri": "hf://org/m", "modelSize": "1Gi", **spec},
        }
        r = await client.review(MUTATE_CACHES, cache_request("CREATE", obj))
        assert r["allowed"] is True and "patch" not in r, spec
    r = await client.review(MUTATE_CACHES, cache_request("DELETE", written))
    assert r["allowed"] is True and "patch" not in r


# -- f. our CRDs take every object KServe's take; the webhooks refuse what we cannot serve ----------

OURS = Path(__file__).resolve().parent.parent / "manifests" / "crds"
PLURALS = {"LocalModelCache": "localmodelcaches", "LocalModelNodeGroup": "localmodelnodegroups"}
PLURALS["LocalModelNode"] = "localmodelnodes"
# Rules of ours KServe's schema lacks, each true for every object KServe's accepts: the alias rules
# hold whenever nodeGroups (required and non-empty in KServe's) is given and nodeGroup absent.
ADDITIVE_RULES = {
    ("LocalModelCache", ".spec"): {
        "(has(self.nodeGroups) && size(self.nodeGroups) > 0) != has(self.nodeGroup)",
        "!has(self.nodeGroup) || type(self.nodeGroup) == string || (type(self.nodeGroup) == list && "
        "size(self.nodeGroup) > 0 && self.nodeGroup.all(g, type(g) == string))",
    }
}
# Left to issue 16 §3 (namespace caches): the list-map key modelName refuses a KServe LocalModelNode
# that lists a namespace cache and a cluster cache of one name.
KNOWN = {("LocalModelNode", ".spec.localModels")}


def our_schema(kind: str) -> dict[str, Any]:
    doc = yaml.safe_load((OURS / f"{PLURALS[kind]}.yaml").read_text())
    (version,) = doc["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def stricter(kind: str, ours: dict[str, Any], theirs: dict[str, Any], path: str = "") -> list[str]:
    """Where ``ours`` refuses something ``theirs`` (KServe's) accepts, or drops a field it keeps."""
    found: list[str] = []
    if (kind, path) in KNOWN:
        return found
    if "type" in ours and "type" in theirs and ours["type"] != theirs["type"]:
        found.append(f"{path}: type {ours['type']} (KServe: {theirs['type']})")
    for key in ("pattern", "minLength", "maxLength", "maxItems", "minimum", "maximum", "format"):
        if key in ours and ours[key] != theirs.get(key):
            found.append(f"{path}: {key} {ours[key]!r} (KServe: {theirs.get(key)!r})")
    if ours.get("minItems", 0) > theirs.get("minItems", 0):
        found.append(f"{path}: minItems {ours['minItems']}")
    if "enum" in ours and not set(theirs.get("enum") or [object()]) <= set(ours["enum"]):
        found.append(f"{path}: enum {ours['enum']} (KServe: {theirs.get('enum')})")
    if not set(ours.get("required") or ()) <= set(theirs.get("required") or ()):
        found.append(f"{path}: required {ours['required']} (KServe: {theirs.get('required')})")
    if "x-kubernetes-list-map-keys" in ours and "x-kubernetes-list-map-keys" not in theirs:
        found.append(f"{path}: list-map keys {ours['x-kubernetes-list-map-keys']}")
    kept = {r["rule"] for r in theirs.get("x-kubernetes-validations") or ()}
    allowed = ADDITIVE_RULES.get((kind, path), set())
    for rule in ours.get("x-kubernetes-validations") or ():
        if rule["rule"] not in kept | allowed:
            found.append(f"{path}: rule {rule['rule']!r}")
    mine = ours.get("properties") or {}
    for name, sub in (theirs.get("properties") or {}).items():
        if name in mine:
            found += stricter(kind, mine[name], sub, f"{path}.{name}")
        elif not ours.get("x-kubernetes-preserve-unknown-fields"):
            found.append(f"{path}.{name}: pruned (KServe keeps it)")
    for part in ("items", "additionalProperties"):
        if isinstance(ours.get(part), dict) and isinstance(theirs.get(part), dict):
            found += stricter(kind, ours[part], theirs[part], f"{path}.{part}")
    return found


def test_our_crds_are_no_stricter_than_kserve_s_field_by_field() -> None:
    for kind, plural in PLURALS.items():
        assert stricter(kind, our_schema(kind), kserve_schema(plural)) == [], kind
    # The walk finds what it looks for: KServe's own schema with one of our old refusals put back.
    narrowed = kserve_schema("localmodelcaches")
    spec = narrowed["properties"]["spec"]["properties"]
    spec["sourceModelUri"]["pattern"] = "^[a-z0-9+.-]+://"
    spec["nodeGroups"]["items"]["minLength"] = 1
    narrowed["properties"]["status"]["properties"]["nodeStatus"]["additionalProperties"]["enum"].remove("")
    assert stricter("LocalModelCache", narrowed, kserve_schema("localmodelcaches")) == [
        ".spec.nodeGroups.items: minLength 1 (KServe: None)",
        ".spec.sourceModelUri: pattern '^[a-z0-9+.-]+://' (KServe: None)",
        ".status.nodeStatus.additionalProperties: enum ['NodeNotReady', 'NodeDownloadPending', "
        "'NodeDownloading', 'NodeDownloaded', 'NodeDownloadError'] (KServe: ['', 'NodeNotReady', "
        "'NodeDownloadPending', 'NodeDownloading', 'NodeDownloaded', 'NodeDownloadError'])",
    ]


def kserve_objects() -> list[dict[str, Any]]:
    """Objects KServe's schema accepts: those of KServe's own tests (pkg/controller/v1alpha1/
    localmodel/controller_test.go:47-70, pkg/webhook/admission/localmodelcache/
    localmodelcache_validator_test.go:63-80 and :128-135, test/e2e/modelcache/test_localmodelcache.py:
    52-101), and the edges our CRDs used to refuse: a URI without a scheme or in upper case, an empty
    group name, "" in the status enums, a cache with no spec, any volume source and path."""
    meta = {"name": "x"}
    cache_kind = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LocalModelCache", "metadata": meta}
    group_kind = {**cache_kind, "kind": "LocalModelNodeGroup"}
    node_kind = {**cache_kind, "kind": "LocalModelNode"}
    affinity = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["minikube-m02", "minikube-m03"]}
    ]}]}}  # fmt: skip
    ref = {"name": "llm-iris", "namespace": "default"}
    caches = [
        {"sourceModelUri": "s3://mybucket/mymodel", "modelSize": "123Gi", "nodeGroups": ["gpu1", "gpu2"]},
        {"sourceModelUri": "gs://testbucket/differentmodel", "modelSize": "1Gi", "nodeGroups": ["gpu1"]},
        {"sourceModelUri": "hf://Qwen/Qwen2-0.5B-Instruct", "modelSize": "251Mi", "nodeGroups": ["qwen"]},
        {"sourceModelUri": "HF://Org/M", "modelSize": 1, "nodeGroups": ["g"]},
        {"sourceModelUri": "org/model", "modelSize": "1Gi", "nodeGroups": [""]},
        {"sourceModelUri": "", "modelSize": "1Gi", "nodeGroups": ["g"], "storage": {"key": ""}},
    ]
    statuses = [
        {"inferenceServices": [{"name": "sklearn-iris", "namespace": "default"}], "copies": {"available": 1}},
        {"llmInferenceServices": [ref], "nodeStatus": {"n1": "", "n2": "NodeDownloaded"}},
        {"copies": {"available": -1, "total": 0, "failed": 0}},
    ]
    groups = [
        {"storageLimit": "1Gi", "persistentVolumeSpec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "standard", "capacity": {"storage": "1Gi"},
            "local": {"path": "/models"}, "persistentVolumeReclaimPolicy": "Delete", "nodeAffinity": affinity,
        }, "persistentVolumeClaimSpec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "standard",
        }},
        *({"storageLimit": "1Ti", "persistentVolumeSpec": pv, "persistentVolumeClaimSpec": {}} for pv in (
            {"hostPath": {"path": "/models", "type": "Directory"}},
            {"nfs": {"server": "nfs", "path": "/"}},
            {"hostPath": {"path": "/"}},
            {"hostPath": {"path": ""}},
            {"hostPath": {"path": "/a"}, "local": {"path": "/a"}},
        )),
    ]  # fmt: skip
    nodes: list[dict[str, Any]] = [
        {"spec": {"localModels": [{"modelName": "iris", "sourceModelUri": "s3://mybucket/mymodel"}]},
         "status": {"modelStatus": {"iris": "", "other": "ModelDownloaded"}}},
        {"spec": {"localModels": [{"modelName": "", "sourceModelUri": ""}]}},
    ]  # fmt: skip
    return [
        *({**cache_kind, "spec": spec} for spec in caches),
        *({**cache_kind, "spec": caches[0], "status": status} for status in statuses),
        dict(cache_kind),
        *({**group_kind, "spec": spec} for spec in groups),
        *({**node_kind, **node} for node in nodes),
    ]


def test_every_object_kserve_s_schema_accepts_ours_accepts() -> None:
    for obj in kserve_objects():
        plural = PLURALS[obj["kind"]]
        assert kserve_schema_errors(obj, plural) == [], obj  # KServe's CRD takes it
        assert validate(obj) == [], obj  # so does ours, CEL rules included
        assert validate(obj, old=obj) == [], obj


def test_the_cache_webhook_refuses_what_the_schema_now_takes_naming_the_field() -> None:
    groups = [LocalModelNodeGroup.from_json(group("g", "100Gi"))]

    def verdict(spec: dict[str, Any] | None) -> Verdict:
        obj: dict[str, Any] = {"metadata": {"name": "x"}}
        if spec is not None:
            obj["spec"] = spec
        return validate_cache("CREATE", obj, None, caches=[], groups=groups)

    cases = [
        ({"sourceModelUri": "org/model", "modelSize": "1Gi", "nodeGroups": ["g"]}, "spec.sourceModelUri: "),
        ({"sourceModelUri": "", "modelSize": "1Gi", "nodeGroups": ["g"]}, "spec.sourceModelUri: "),
        ({"sourceModelUri": "hf://org/m", "modelSize": "1Gi", "nodeGroups": [""]}, "spec.nodeGroups[0]: "),
        (None, "spec: "),
    ]
    for spec, field in cases:
        v = verdict(spec)
        assert not v.allowed and v.code == 422, (spec, v)
        assert v.message.startswith(field) and "\n" not in v.message, v.message
    assert "has no scheme; use hf://" in verdict(cases[0][0]).message
    # A scheme in upper case is a scheme: served, as KServe's storage initializer reads it.
    assert verdict({"sourceModelUri": "HF://org/m", "modelSize": "1Gi", "nodeGroups": ["g"]}).allowed


# -- d. LLMInferenceServices: in the cache's status, and keeping it from deletion ------------------


def service(
    kind: str, name: str, namespace: str, cache_name: str | None, group: str | None = None
) -> dict[str, Any]:
    """An InferenceService or LLMInferenceService as KServe's webhook leaves it for a cached model:
    labelled with the cache's name (pkg/apis/serving/v1beta1/inference_service_defaults.go:586;
    LLMInferenceServices likewise, pkg/apis/serving/v1alpha2/llm_inference_service_defaults.go)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if cache_name is not None:
        meta["labels"] = {"internal.serving.kserve.io/localmodel": cache_name}
    if group is not None:
        meta["annotations"] = {"serving.kserve.io/nodegroup": group}
    if kind == "LLMInferenceService":
        spec: dict[str, Any] = {"model": {"uri": "hf://org/m"}}
        version = "serving.kserve.io/v1alpha2"
    else:
        spec = {"predictor": {"model": {"storageUri": "hf://org/m"}}}
        version = "serving.kserve.io/v1beta1"
    return {"apiVersion": version, "kind": kind, "metadata": meta, "spec": spec}


async def test_llm_inference_services_are_listed_in_the_cache_status(state: ClusterState) -> None:
    """KServe lists the LLMInferenceServices labelled with the cache's name
    (pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:505-523, 564-565), absent when none."""
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100"]))
    await state.create(LLM_INFERENCE_SERVICE, service("LLMInferenceService", "chat", "team", "m"))
    await state.create(LLM_INFERENCE_SERVICE, service("LLMInferenceService", "base", "lab", "m"))
    await state.create(LLM_INFERENCE_SERVICE, service("LLMInferenceService", "other", "lab", None))
    await Controller(state).run(once=True)
    stored = await state.get(LOCAL_MODEL_CACHE, "m")
    assert stored["status"]["llmInferenceServices"] == [
        {"name": "base", "namespace": "lab"},
        {"name": "chat", "namespace": "team"},
    ]
    assert "inferenceServices" not in stored["status"]
    assert validate(stored) == []
    kserve_part = {**stored, "status": {"llmInferenceServices": stored["status"]["llmInferenceServices"]}}
    assert kserve_schema_errors(kserve_part) == []  # the field as KServe's CRD declares it
    parsed = LocalModelCache.from_json(stored).status.llm_inference_services
    assert [(r.namespace, r.name) for r in parsed] == [("lab", "base"), ("team", "chat")]
    await state.delete(LLM_INFERENCE_SERVICE, "chat", namespace="team")
    await state.delete(LLM_INFERENCE_SERVICE, "base", namespace="lab")
    await Controller(state).run(once=True)
    assert "llmInferenceServices" not in (await state.get(LOCAL_MODEL_CACHE, "m"))["status"]


async def test_a_cache_in_use_is_kept_from_deletion(https: tuple[ClusterState, Client, Any]) -> None:
    """As KServe's webhook does (pkg/webhook/admission/localmodelcache/localmodelcache_validator.go:
    96-140): refused while an InferenceService or LLMInferenceService labelled with its name exists."""
    st, client, _ = https
    obj = cache("m", "10Gi", ["a100"])

    async def delete() -> dict[str, Any]:
        req = cache_request("DELETE", obj, obj)
        req["object"] = None  # as the API server sends a DELETE
        return await client.review(VALIDATE_CACHES, req)

    assert (await delete())["allowed"] is True
    await st.create(LLM_INFERENCE_SERVICE, service("LLMInferenceService", "chat", "team", "m"))
    await st.create(INFERENCE_SERVICE, service("InferenceService", "other", "team", "x"))
    r = await delete()
    assert r["allowed"] is False and r["status"]["code"] == 403
    assert r["status"]["message"].startswith(
        "LocalModelCache 'm' is being used by LLMInferenceService team/chat; delete those first"
    )
    await st.create(INFERENCE_SERVICE, service("InferenceService", "isvc", "lab", "m"))
    r = await delete()
    assert r["status"]["message"].startswith(
        "LocalModelCache 'm' is being used by InferenceService lab/isvc and 1 more; "
    )
    await st.delete(INFERENCE_SERVICE, "isvc", namespace="lab")
    await st.delete(LLM_INFERENCE_SERVICE, "chat", namespace="team")
    assert (await delete())["allowed"] is True


async def test_deletion_counts_only_the_users_of_that_cache(https: tuple[ClusterState, Client, Any]) -> None:
    """A service labelled with a name and ``localmodel-namespace`` uses that namespace's cache: it
    keeps the LocalModelNamespaceCache of its namespace (KServe's
    local_model_namespace_cache_validation.go:99-136 at v0.20), never the cluster cache of that name,
    nor another namespace's cache of that name."""
    st, client, _ = https
    cluster = cache("llama", "10Gi", ["a100"])
    spaced = {**cache("llama", "10Gi", ["a100"]), "kind": "LocalModelNamespaceCache"}
    spaced["metadata"] = {**spaced["metadata"], "namespace": "team-a"}

    async def delete(obj: dict[str, Any]) -> dict[str, Any]:
        req = cache_request("DELETE", obj, obj)
        req["object"] = None
        if obj["kind"] == "LocalModelNamespaceCache":
            req["kind"] = {**req["kind"], "kind": "LocalModelNamespaceCache"}
            req["resource"] = {**req["resource"], "resource": "localmodelnamespacecaches"}
            req["namespace"] = obj["metadata"]["namespace"]
        return await client.review(VALIDATE_CACHES, req)

    isvc = service("InferenceService", "isvc1", "team-a", "llama")
    isvc["metadata"]["labels"]["internal.serving.kserve.io/localmodel-namespace"] = "team-a"
    await st.create(INFERENCE_SERVICE, isvc)
    assert (await delete(cluster))["allowed"] is True
    r = await delete(spaced)
    assert r["allowed"] is False and r["status"]["code"] == 403
    assert r["status"]["message"].startswith(
        "LocalModelNamespaceCache team-a/llama is being used by InferenceService team-a/isvc1; "
    )
    other = {**spaced, "metadata": {**spaced["metadata"], "namespace": "team-b"}}
    assert (await delete(other))["allowed"] is True
    # A plain label (no namespace label) names the cluster cache, whatever namespace the service is in.
    await st.create(LLM_INFERENCE_SERVICE, service("LLMInferenceService", "chat", "team-a", "llama"))
    r = await delete(cluster)
    assert r["status"]["message"].startswith(
        "LocalModelCache 'llama' is being used by LLMInferenceService team-a/chat; "
    )
    r = await delete(spaced)
    assert r["status"]["message"].startswith(
        "LocalModelNamespaceCache team-a/llama is being used by InferenceService"
    )
    await st.delete(INFERENCE_SERVICE, "isvc1", namespace="team-a")
    assert (await delete(spaced))["allowed"] is True


# -- e. the serving claim is made when a labelled service appears, before any pod -------------------


async def test_labelled_services_get_their_serving_claim_before_any_pod(state: ClusterState) -> None:
    """KServe makes the claims of the namespaces of the services labelled with the cache's name, in
    the group they annotate when the cache lists it, else the cache's first
    (pkg/controller/v1alpha1/localmodel/reconcilers/utils.go:482-540, 598-630)."""
    await setup_two_groups(state)
    await state.create(LOCAL_MODEL_CACHE, cache("m", "10Gi", ["a100", "h100"]))
    await state.create(INFERENCE_SERVICE, service("InferenceService", "isvc", "team", "m"))
    await state.create(LLM_INFERENCE_SERVICE, service("LLMInferenceService", "chat", "lab", "m", "h100"))
    # A group the cache does not list: KServe serves it uncached, no claim.
    await state.create(INFERENCE_SERVICE, service("InferenceService", "t4", "edge", "m", "t4"))
    await Controller(state).run(once=True)

    async def claims(namespace: str) -> list[str]:
        found = await state.list(PERSISTENT_VOLUME_CLAIM, namespace=namespace)
        return sorted(c["metadata"]["name"] for c in found.items)

    assert await claims("team") == ["m-a100"]
    assert await claims("lab") == ["m-h100"]
    assert await claims("edge") == []
    claim = await state.get(PERSISTENT_VOLUME_CLAIM, "m-a100", namespace="team")
    assert claim["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "modelcache-controller"}
    assert claim["spec"]["volumeName"]
    await state.get(PERSISTENT_VOLUME, claim["spec"]["volumeName"])  # its PV exists too


def test_service_demands_pure() -> None:
    from controller.demand import service_demands
    from controller.snapshot import ServingDemand
    from controller.views import InferenceService

    caches = {"m": LocalModelCache.from_json(cache("m", "10Gi", ["a100", "h100"]))}
    isvc = InferenceService.from_json(service("InferenceService", "a", "team", "m"))
    llm = InferenceService.from_llm_json(service("LLMInferenceService", "b", "lab", "m", "h100"))
    assert llm.storage_uris == ()  # matched by its label alone, as KServe does
    stray = InferenceService.from_json(service("InferenceService", "c", "edge", "m", "t4"))
    unknown = InferenceService.from_json(service("InferenceService", "d", "x", "nope"))
    plain = InferenceService.from_json(service("InferenceService", "e", "x", None))
    assert service_demands([isvc, llm, stray, unknown, plain], caches) == {
        ServingDemand("m", None, "team"),
        ServingDemand("m", "h100", "lab"),
    }
