"""What KServe users run into (issue 16 §5), on both cluster-state backends and over real HTTPS where
a webhook decides. KServe's behaviour is cited at tag v0.20.0 (file:line) where a test depends on it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import yaml

from controller.admission import place_pod
from controller.reconcile import Controller
from controller.webhook import MUTATE_CACHES, MUTATE_PODS
from localmodel.kinds import LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE, PERSISTENT_VOLUME_CLAIM
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
