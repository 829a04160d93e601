"""Placement and admission: tables for the rules, properties for the invariants."""

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from localmodel.placement import (
    INSUFFICIENT_STORAGE,
    NODE_GROUP_NOT_FOUND,
    admit,
    members,
    place_node,
)
from localmodel.resources import LocalModelCache, LocalModelNodeGroup, Node

GiB = 2**30


def cache(
    name: str, size: str, groups: list[str], created: str = "2026-01-01T00:00:00Z", **meta: Any
) -> LocalModelCache:
    return LocalModelCache.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {"name": name, "creationTimestamp": created, **meta},
            "spec": {"sourceModelUri": f"hf://org/{name}", "modelSize": size, "nodeGroups": groups},
        }
    )


def group(name: str, limit: str, gpu: str | None = None) -> LocalModelNodeGroup:
    spec: dict[str, Any] = {"storageLimit": limit, "persistentVolumeSpec": {"hostPath": {"path": "/models"}}}
    if gpu:
        spec["persistentVolumeSpec"]["nodeAffinity"] = {
            "required": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": [gpu]}]}
                ]
            }
        }
    return LocalModelNodeGroup.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNodeGroup",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_cache_on_two_groups_that_fits_only_one() -> None:
    caches = [
        cache("small", "60Gi", ["a100", "h100"], "2026-01-01T00:00:00Z"),
        cache("big", "140Gi", ["a100", "h100"], "2026-01-02T00:00:00Z"),
    ]
    groups = [group("a100", "500Gi"), group("h100", "150Gi")]
    result = admit(caches, groups)
    assert result.admitted == {"a100": ("small", "big"), "h100": ("small",)}
    (refusal,) = result.refused
    assert (refusal.cache, refusal.group, refusal.reason) == ("big", "h100", INSUFFICIENT_STORAGE)
    assert refusal.message == "needs 140Gi, group h100 has 90Gi of 150Gi free"
    assert result.usage["h100"].used == 60 * GiB and result.usage["h100"].available == 90 * GiB
    assert result.groups_of("big") == ("a100",)


def test_refusal_message_has_the_numbers() -> None:
    result = admit([cache("a", "150Gi", ["g"], "1"), cache("b", "100Gi", ["g"], "2")], [group("g", "200Gi")])
    assert [r.message for r in result.refused] == ["needs 100Gi, group g has 50Gi of 200Gi free"]


def test_oldest_first_and_a_new_cache_never_pushes_out_an_old_one() -> None:
    old = cache("zz-old", "150Gi", ["g"], "2025-01-01T00:00:00Z")
    new = cache("aa-new", "150Gi", ["g"], "2026-06-01T00:00:00Z")
    assert admit([new, old], [group("g", "200Gi")]).admitted["g"] == ("zz-old",)
    # same creation time: by name
    a, b = cache("a", "150Gi", ["g"]), cache("b", "150Gi", ["g"])
    assert admit([b, a], [group("g", "200Gi")]).admitted["g"] == ("a",)


def test_missing_group_is_refused_not_fatal() -> None:
    result = admit([cache("c", "1Gi", ["gone", "g"])], [group("g", "10Gi")])
    assert result.admitted == {"g": ("c",)}
    assert [(r.group, r.reason) for r in result.refused] == [("gone", NODE_GROUP_NOT_FOUND)]


def test_deleting_cache_holds_no_capacity() -> None:
    dying = cache("dying", "150Gi", ["g"], "1", deletionTimestamp="2026-02-01T00:00:00Z")
    result = admit([dying, cache("next", "150Gi", ["g"], "2")], [group("g", "200Gi")])
    assert result.admitted["g"] == ("next",)


def test_members_and_node_placement() -> None:
    nodes = [Node("n1", {"gpu": "a100"}), Node("n2", {"gpu": "h100"}), Node("n3", {})]
    a100, h100 = group("a100", "100Gi", "a100"), group("h100", "100Gi", "h100")
    assert members(a100, nodes) == ("n1",)
    assert members(group("none", "1Gi"), nodes) == ()
    caches = [cache("m1", "10Gi", ["a100", "h100"]), cache("m2", "10Gi", ["h100"])]
    p1 = place_node(nodes[0], caches, [a100, h100])
    assert p1.groups == ("a100",)
    assert [(m.model_name, m.node_group, m.model_size.bytes if m.model_size else 0) for m in p1.models] == [
        ("m1", "a100", 10 * GiB)
    ]
    assert [m.model_name for m in place_node(nodes[1], caches, [a100, h100]).models] == ["m1", "m2"]
    assert place_node(nodes[2], caches, [a100, h100]).models == ()


sizes = st.integers(min_value=1, max_value=300)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(sizes, st.lists(st.sampled_from(["g1", "g2", "g3"]), min_size=1, max_size=3, unique=True)),
        max_size=12,
    ),
    st.lists(st.integers(min_value=1, max_value=600), min_size=3, max_size=3),
    st.randoms(use_true_random=False),
)
def test_admission_never_exceeds_limits_and_ignores_input_order(
    specs: list[tuple[int, list[str]]], limits: list[int], rnd: Any
) -> None:
    caches = [
        cache(f"c{i:02d}", f"{size}Gi", groups, f"2026-01-{1 + i % 5:02d}T00:00:00Z")
        for i, (size, groups) in enumerate(specs)
    ]
    groups = [group(f"g{j + 1}", f"{limit}Gi") for j, limit in enumerate(limits)]
    result = admit(caches, groups)
    by_name = {c.name: c for c in caches}
    for g in groups:
        total = sum(by_name[c].spec.model_size.bytes for c in result.admitted[g.name])
        assert total <= g.spec.storage_limit.bytes
        assert result.usage[g.name].used == total
    # every (cache, listed group) is either admitted or refused, exactly once
    decided = {(c, g) for g, cs in result.admitted.items() for c in cs} | {
        (r.cache, r.group) for r in result.refused
    }
    assert decided == {(c.name, g) for c in caches for g in c.spec.node_groups}
    shuffled_caches, shuffled_groups = caches[:], groups[:]
    rnd.shuffle(shuffled_caches)
    rnd.shuffle(shuffled_groups)
    again = admit(shuffled_caches, shuffled_groups)
    assert again.admitted == result.admitted and set(again.refused) == set(result.refused)
