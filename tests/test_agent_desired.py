"""The agent's pure decisions: the desired set from a LocalModelNode (or, standalone, from documents
and the node's labels), --node-labels parsing, and the retry schedule."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.desired import desired, parse_labels, retry_delay, standalone_node
from localmodel.errors import SpecError
from localmodel.layout import storage_key
from localmodel.resources import LocalModelCache, LocalModelNode, LocalModelNodeGroup
from tests.support.agents import cache_doc, group_doc, node_doc


def groups(*docs: dict[str, Any]) -> dict[str, LocalModelNodeGroup]:
    return {d["metadata"]["name"]: LocalModelNodeGroup.from_json(d) for d in docs}


def test_no_node_object_means_unknown_not_empty() -> None:
    d = desired(None, {}, cache_dir=Path("/c"))
    assert d.known is False and d.models == ()


def test_models_one_per_storage_key_with_every_name_kept() -> None:
    node = LocalModelNode.from_json(
        node_doc("n", [("a", "hf://o/m", "1Gi"), ("a-again", "hf://o/m", "1Gi"), ("b", "s3://b/x", None)])
    )
    d = desired(node, groups(group_doc("g", limit="10Gi", path=Path("/c"))), cache_dir=Path("/c"))
    assert d.known
    assert [m.storage_key for m in d.models] == sorted([storage_key("hf://o/m"), storage_key("s3://b/x")])
    assert d.aliases[storage_key("hf://o/m")] == ("a", "a-again")
    assert d.limit == 10 << 30


def test_limits_of_the_node_groups_add_up() -> None:
    doc = node_doc("n", [("a", "hf://o/a", "1Gi")], group="g1")
    doc["spec"]["localModels"].append({"sourceModelUri": "hf://o/b", "modelName": "b", "nodeGroup": "g2"})
    node = LocalModelNode.from_json(doc)
    d = desired(
        node, groups(group_doc("g1", limit="1Gi"), group_doc("g2", limit="2Gi")), cache_dir=Path("/c")
    )
    assert d.limit == 3 << 30


def test_group_path_other_than_cache_dir_names_both_and_the_fix() -> None:
    node = LocalModelNode.from_json(node_doc("n", [("a", "hf://o/a", "1Gi")]))
    with pytest.raises(SpecError) as e:
        desired(node, groups(group_doc("g", path=Path("/mnt/nvme/models"))), cache_dir=Path("/var/cache"))
    msg = str(e.value)
    assert "LocalModelNodeGroup g" in msg and "/mnt/nvme/models" in msg and "--cache-dir /var/cache" in msg


def test_standalone_node_uses_the_shared_placement() -> None:
    h100 = group_doc("h100", limit="100Gi")
    a100 = group_doc("a100", limit="100Gi")
    caches = [
        LocalModelCache.from_json(cache_doc("llama", "hf://meta/llama", "60Gi", ["h100", "a100"])),
        LocalModelCache.from_json(cache_doc("mistral", "hf://mistral/m", "60Gi", ["h100"])),  # does not fit
        LocalModelCache.from_json(cache_doc("qwen", "hf://qwen/q", "10Gi", ["a100"])),
    ]
    gs = [LocalModelNodeGroup.from_json(h100), LocalModelNodeGroup.from_json(a100)]
    node = standalone_node(node_name="box", labels={"gpu": "h100"}, caches=caches, groups=gs)
    parsed = LocalModelNode.from_json(node)
    assert [(m.model_name, m.node_group) for m in parsed.local_models] == [("llama", "h100")]
    other = standalone_node(node_name="box", labels={"gpu": "a100"}, caches=caches, groups=gs)
    assert sorted(m["modelName"] for m in other["spec"]["localModels"]) == ["llama", "qwen"]
    assert standalone_node(node_name="box", labels={}, caches=caches, groups=gs)["spec"]["localModels"] == []


@pytest.mark.parametrize(
    ("operator", "values", "labels", "member"),
    [
        ("In", ["8"], {"gpus": "8"}, True),
        ("NotIn", ["8"], {"gpus": "8"}, False),
        ("NotIn", ["8"], {}, True),
        ("Exists", None, {"gpus": "1"}, True),
        ("DoesNotExist", None, {"gpus": "1"}, False),
        ("Gt", ["4"], {"gpus": "8"}, True),
        ("Gt", ["8"], {"gpus": "8"}, False),
        ("Lt", ["9"], {"gpus": "8"}, True),
        ("Lt", ["4"], {"gpus": "x"}, False),
    ],
)
def test_membership_operators(
    operator: str, values: list[str] | None, labels: dict[str, Any], member: bool
) -> None:
    g = group_doc("g", limit="10Gi")
    expr: dict[str, Any] = {"key": "gpus", "operator": operator}
    if values is not None:
        expr["values"] = values
    g["spec"]["persistentVolumeSpec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] = [
        {"matchExpressions": [expr]}
    ]
    caches = [LocalModelCache.from_json(cache_doc("m", "hf://o/m", "1Gi", ["g"]))]
    node = standalone_node(
        node_name="n", labels=labels, caches=caches, groups=[LocalModelNodeGroup.from_json(g)]
    )
    assert bool(node["spec"]["localModels"]) is member


def test_parse_labels() -> None:
    assert parse_labels("gpu=h100, zone=a,empty=") == {"gpu": "h100", "zone": "a", "empty": ""}
    assert parse_labels("") == {}
    with pytest.raises(SpecError, match=r"--node-labels.*'gpu' is not key=value"):
        parse_labels("gpu")


@given(st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_retry_delay_grows_within_bounds(failures: int, seed: int) -> None:
    rng = random.Random(seed)
    d = retry_delay(failures, base=300, cap=3600, rng=rng)
    assert 0.8 * min(3600, 300 * 2 ** (failures - 1)) <= d <= 3600
    assert d >= 240  # minutes, never every second


def test_retry_delay_doubles_to_an_hour() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, base=300, cap=3600, rng=rng) for n in range(1, 8)]
    assert delays[0] < delays[2] < delays[4]
    assert all(d <= 3600 for d in delays) and delays[-1] >= 0.8 * 3600
