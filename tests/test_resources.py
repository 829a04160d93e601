import copy
from typing import Any

import pytest

from localmodel.errors import SpecError
from localmodel.resources import (
    LocalModelCache,
    LocalModelNode,
    LocalModelNodeGroup,
    ModelState,
    NodeState,
)
from localmodel.selectors import NodeSelector

CACHE: dict[str, Any] = {
    # KServe's documented example (website docs, "Model Storage: LocalModelCache")
    "apiVersion": "serving.kserve.io/v1alpha1",
    "kind": "LocalModelCache",
    "metadata": {"name": "meta-llama3-8b-instruct"},
    "spec": {
        "sourceModelUri": "hf://meta-llama/meta-llama-3-8b-instruct",
        "modelSize": "10Gi",
        "nodeGroups": ["workers"],
    },
}
GROUP: dict[str, Any] = {
    "apiVersion": "serving.kserve.io/v1alpha1",
    "kind": "LocalModelNodeGroup",
    "metadata": {"name": "workers"},
    "spec": {
        "storageLimit": "1.7T",
        "persistentVolumeClaimSpec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1700G"}},
            "storageClassName": "local-storage",
            "volumeMode": "Filesystem",
            "volumeName": "models",
        },
        "persistentVolumeSpec": {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "capacity": {"storage": "1700G"},
            "local": {"path": "/models"},
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "local-storage",
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "nvidia.com/gpu-product",
                                    "operator": "In",
                                    "values": ["NVIDIA-A100-SXM4-80GB"],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    },
}


def test_kserve_cache_round_trips_unchanged() -> None:
    cache = LocalModelCache.from_json(CACHE)
    assert cache.spec.node_groups == ("workers",)
    assert cache.spec.model_size.bytes == 10 * 2**30
    assert cache.spec.storage_key == "c277d78a31bc6624"
    assert cache.to_json() == CACHE


def test_kserve_group_round_trips_and_exposes_path_and_selector() -> None:
    group = LocalModelNodeGroup.from_json(GROUP)
    assert group.spec.cache_path == "/models"
    assert group.spec.storage_limit.bytes == 1_700_000_000_000
    assert group.spec.node_selector is not None
    assert group.spec.node_selector.matches("n1", {"nvidia.com/gpu-product": "NVIDIA-A100-SXM4-80GB"})
    assert not group.spec.node_selector.matches("n2", {"nvidia.com/gpu-product": "H100"})
    assert group.to_json() == GROUP


@pytest.mark.parametrize("alias", ["gpu1", ["gpu1", "gpu2"]])
def test_node_group_alias_is_normalised(alias: str | list[str]) -> None:
    doc = copy.deepcopy(CACHE)
    del doc["spec"]["nodeGroups"]
    doc["spec"]["nodeGroup"] = alias
    cache = LocalModelCache.from_json(doc)
    expected = [alias] if isinstance(alias, str) else alias
    assert cache.spec.node_groups == tuple(expected)
    out = cache.to_json()["spec"]
    assert out["nodeGroups"] == expected and "nodeGroup" not in out


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda s: s.pop("sourceModelUri"), "spec.sourceModelUri", "is required"),
        (lambda s: s.update(sourceModelUri="webhdfs://nn/m"), "spec.sourceModelUri", "not supported"),
        (lambda s: s.update(modelSize="10Gbytes"), "spec.modelSize", "not a Kubernetes quantity"),
        (lambda s: s.update(modelSize="0"), "spec.modelSize", "greater than zero"),
        (lambda s: s.pop("modelSize"), "spec.modelSize", "is required"),
        (lambda s: s.update(nodeGroups=[]), "spec.nodeGroups", "at least one"),
        (lambda s: s.pop("nodeGroups"), "spec.nodeGroups", "at least one"),
        (lambda s: s.update(nodeGroups=["a", "a"]), "spec.nodeGroups", "twice"),
        (lambda s: s.update(nodeGroups=[3]), "spec.nodeGroups[0]", "node group name"),
        (lambda s: s.update(nodeGroup="x"), "spec.nodeGroup", "not both"),
        (
            lambda s: s.update(storage={"parameters": {"a": 1}}),
            "spec.storage.parameters.a",
            "string",
        ),
    ],
)
def test_cache_errors_name_the_field(mutate: Any, field: str, message: str) -> None:
    doc = copy.deepcopy(CACHE)
    mutate(doc["spec"])
    with pytest.raises(SpecError) as info:
        LocalModelCache.from_json(doc)
    assert info.value.field == field
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s.update(storageLimit="0"), "spec.storageLimit"),
        (lambda s: s.update(storageLimit="lots"), "spec.storageLimit"),
        (
            lambda s: s["persistentVolumeSpec"].update(local={"path": "relative"}),
            "spec.persistentVolumeSpec.local.path",
        ),
        (
            lambda s: s["persistentVolumeSpec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
                "matchExpressions"
            ][0].update(operator="Near"),
            "spec.persistentVolumeSpec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].operator",
        ),
    ],
)
def test_group_errors_name_the_field(mutate: Any, field: str) -> None:
    doc = copy.deepcopy(GROUP)
    mutate(doc["spec"])
    with pytest.raises(SpecError) as info:
        LocalModelNodeGroup.from_json(doc)
    assert info.value.field == field


def test_status_parsing_and_enums() -> None:
    doc = copy.deepcopy(CACHE)
    doc["status"] = {
        "nodeStatus": {"n1": "NodeDownloaded", "n2": "NodeDownloading"},
        "copies": {"available": 1, "total": 2},
    }
    cache = LocalModelCache.from_json(doc)
    assert cache.status.node_status == {"n1": NodeState.DOWNLOADED, "n2": NodeState.DOWNLOADING}
    assert cache.to_json()["status"]["copies"] == {"available": 1, "total": 2, "failed": 0}
    doc["status"]["nodeStatus"]["n3"] = "Downloaded"
    with pytest.raises(SpecError) as info:
        LocalModelCache.from_json(doc)
    assert info.value.field == "status.nodeStatus.n3"


def test_local_model_node_round_trip() -> None:
    doc: dict[str, Any] = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LocalModelNode",
        "metadata": {"name": "node-1"},
        "spec": {
            "localModels": [
                {
                    "sourceModelUri": "hf://a/b",
                    "modelName": "b",
                    "nodeGroup": "g",
                    "modelSize": "1Gi",
                }
            ]
        },
        "status": {
            "modelStatus": {"b": "ModelDownloading"},
            "models": {"b": {"state": "ModelDownloading", "bytesDone": 5, "bytesTotal": 10}},
            "capacity": {"limit": "10Gi", "used": "1Gi", "available": "9Gi"},
        },
    }
    node = LocalModelNode.from_json(doc)
    assert node.local_models[0].storage_key == node.to_json()["spec"]["localModels"][0]["storageKey"]
    assert node.status.models["b"].bytes_done == 5
    assert node.status.model_status["b"] is ModelState.DOWNLOADING
    again = LocalModelNode.from_json(node.to_json())
    assert again == node
    doc["spec"]["localModels"].append(dict(doc["spec"]["localModels"][0]))
    with pytest.raises(SpecError, match="twice"):
        LocalModelNode.from_json(doc)


def test_wrong_kind_and_version() -> None:
    with pytest.raises(SpecError) as info:
        LocalModelCache.from_json(dict(CACHE, kind="LocalModelNode"))
    assert info.value.field == "kind"
    with pytest.raises(SpecError) as info:
        LocalModelCache.from_json(dict(CACHE, apiVersion="serving.kserve.io/v1beta1"))
    assert info.value.field == "apiVersion"


def _sel(*exprs: dict[str, Any], fields: list[dict[str, Any]] | None = None) -> NodeSelector:
    term: dict[str, Any] = {"matchExpressions": list(exprs)}
    if fields:
        term["matchFields"] = fields
    return NodeSelector.from_json({"nodeSelectorTerms": [term]})


@pytest.mark.parametrize(
    ("expr", "labels", "expected"),
    [
        ({"key": "gpu", "operator": "In", "values": ["a100", "h100"]}, {"gpu": "h100"}, True),
        ({"key": "gpu", "operator": "In", "values": ["a100"]}, {"gpu": "h100"}, False),
        ({"key": "gpu", "operator": "In", "values": ["a100"]}, {}, False),
        ({"key": "gpu", "operator": "NotIn", "values": ["a100"]}, {"gpu": "h100"}, True),
        ({"key": "gpu", "operator": "NotIn", "values": ["a100"]}, {}, True),
        ({"key": "gpu", "operator": "Exists"}, {"gpu": ""}, True),
        ({"key": "gpu", "operator": "Exists"}, {}, False),
        ({"key": "gpu", "operator": "DoesNotExist"}, {}, True),
        ({"key": "gpu", "operator": "DoesNotExist"}, {"gpu": "x"}, False),
        ({"key": "count", "operator": "Gt", "values": ["4"]}, {"count": "8"}, True),
        ({"key": "count", "operator": "Gt", "values": ["8"]}, {"count": "8"}, False),
        ({"key": "count", "operator": "Lt", "values": ["8"]}, {"count": "4"}, True),
        ({"key": "count", "operator": "Lt", "values": ["8"]}, {"count": "many"}, False),
        ({"key": "count", "operator": "Gt", "values": ["1"]}, {}, False),
    ],
)
def test_selector_operators(expr: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert _sel(expr).matches("node", labels) is expected


def test_selector_terms_are_ored_and_fields_match_name() -> None:
    sel = NodeSelector.from_json(
        {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": "a", "operator": "Exists"},
                        {"key": "b", "operator": "Exists"},
                    ]
                },
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
            ]
        }
    )
    assert sel.matches("x", {"a": "1", "b": "1"})
    assert not sel.matches("x", {"a": "1"})  # expressions in one term are ANDed
    assert sel.matches("special", {})
    assert not NodeSelector.from_json({"nodeSelectorTerms": [{}]}).matches("x", {"a": "1"})


@pytest.mark.parametrize(
    "expr",
    [
        {"key": "a", "operator": "In", "values": []},
        {"key": "a", "operator": "Exists", "values": ["x"]},
        {"key": "a", "operator": "Gt", "values": ["x"]},
        {"key": "a", "operator": "Gt", "values": ["1", "2"]},
        {"operator": "Exists"},
    ],
)
def test_selector_rejects_invalid(expr: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        _sel(expr)
