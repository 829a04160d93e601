"""The controller's pure decision: tables for the rules, properties for the invariants.

``settle`` applies a plan to its inputs the way the cluster would (node specs, statuses,
finalizers), so tests can walk a rollout step by step without any server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.admission import PodAsk, pod_ask
from controller.plan import plan
from controller.reconcile import backoff
from controller.rollout import models_in_use
from controller.serving import serving_demands, volume_ref
from controller.snapshot import RETAINED_ANNOTATION, Options, Plan, Scope, ServingDemand, Snapshot
from controller.status import copies_by_group, isvc_caches
from controller.views import InferenceService, Pod, node_ready
from localmodel.mergepatch import merge_patch
from localmodel.placement import Layout, layout, place_node
from localmodel.resources import (
    FINALIZER,
    Copies,
    LocalModelCache,
    LocalModelNode,
    LocalModelNodeGroup,
    LocalModelNodeStatus,
    ModelState,
    Node,
    NodeState,
    ObjectMeta,
)

T0 = "2026-01-01T00:00:00Z"


def cache(
    name: str,
    size: str,
    groups: list[str],
    created: str = T0,
    *,
    deleting: bool = False,
    finalizers: tuple[str, ...] = (FINALIZER,),
) -> LocalModelCache:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created, "uid": f"uid-{name}", "generation": 1}
    if deleting:
        meta["deletionTimestamp"] = "2026-02-01T00:00:00Z"
    if finalizers:
        meta["finalizers"] = list(finalizers)
    return LocalModelCache.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": meta,
            "spec": {"sourceModelUri": f"hf://org/{name}", "modelSize": size, "nodeGroups": groups},
        }
    )


def group(name: str, limit: str, gpu: str | None = None) -> LocalModelNodeGroup:
    spec: dict[str, Any] = {"storageLimit": limit, "persistentVolumeSpec": {"hostPath": {"path": "/models"}}}
    spec["persistentVolumeSpec"]["nodeAffinity"] = {
        "required": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": [gpu or name]}]}
            ]
        }
    }
    return LocalModelNodeGroup.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelNodeGroup",
            "metadata": {"name": name, "generation": 1},
            "spec": spec,
        }
    )


def node(name: str, gpu: str) -> Node:
    return Node(name, {"gpu": gpu}, uid=f"uid-{name}")


def snap(
    caches: list[LocalModelCache],
    groups: list[LocalModelNodeGroup],
    nodes: list[Node],
    lmns: list[LocalModelNode] = (),  # type: ignore[assignment]
    **kw: Any,
) -> Snapshot:
    return Snapshot(
        caches={c.name: c for c in caches},
        groups={g.name: g for g in groups},
        nodes={n.name: n for n in nodes},
        local_model_nodes={m.name: m for m in lmns},
        **kw,
    )


def settle(s: Snapshot, p: Plan) -> Snapshot:
    """The inputs after the plan's writes (what the next reconcile would read)."""
    lmns = dict(s.local_model_nodes)
    for w in p.nodes:
        if w.action == "delete":
            lmns.pop(w.name, None)
            continue
        old = lmns.get(w.name)
        annotations = {RETAINED_ANNOTATION: ",".join(w.retained)} if w.retained else {}
        meta = ObjectMeta(w.name, annotations=annotations)
        lmns[w.name] = LocalModelNode(meta, w.models, old.status if old else LocalModelNodeStatus())
    caches = dict(s.caches)
    for sw in p.statuses:
        if sw.kind == "LocalModelCache":
            c = caches[sw.name]
            raw = c.to_json()
            raw["status"] = merge_patch(raw.get("status") or {}, dict(sw.patch))
            caches[sw.name] = LocalModelCache.from_json(raw)
    groups = dict(s.groups)
    for sw in p.statuses:
        if sw.kind == "LocalModelNodeGroup":
            raw = groups[sw.name].to_json()
            raw["status"] = merge_patch(raw.get("status") or {}, dict(sw.patch))
            groups[sw.name] = LocalModelNodeGroup.from_json(raw)
    for f in p.finalizers:
        c = caches[f.cache]
        if f.add:
            fins = (*c.metadata.finalizers, FINALIZER)
        else:
            fins = tuple(x for x in c.metadata.finalizers if x != FINALIZER)
        if not fins and c.metadata.deletion_timestamp:
            del caches[f.cache]
        else:
            caches[f.cache] = dataclasses.replace(
                c, metadata=dataclasses.replace(c.metadata, finalizers=fins)
            )
    node_models = dict(s.node_models)
    for lw in p.labels:
        now = set(node_models.get(lw.node, frozenset()))
        now |= {k for k, ready in lw.labels.items() if ready}
        now -= {k for k, ready in lw.labels.items() if not ready}
        node_models[lw.node] = frozenset(now)
    volumes, claims = dict(s.volumes), dict(s.claims)
    for vw in p.volumes:
        if vw.action == "delete":
            volumes.pop(vw.name, None) if vw.namespace is None else claims.pop((vw.namespace, vw.name), None)
            continue
        ref = volume_ref(dict(vw.body or {}))
        assert ref is not None
        if vw.namespace is None:
            volumes[vw.name] = ref
        else:
            claims[(vw.namespace, vw.name)] = ref
    return dataclasses.replace(
        s,
        caches=caches,
        groups=groups,
        local_model_nodes=lmns,
        node_models=node_models,
        volumes=volumes,
        claims=claims,
    )


def report(s: Snapshot, states: Mapping[str, Mapping[str, ModelState]]) -> Snapshot:
    """Agents report: node -> modelName -> state (as KServe keys modelStatus)."""
    lmns = dict(s.local_model_nodes)
    for n, ms in states.items():
        old = lmns[n]
        merged = {**old.status.model_status, **ms}
        lmns[n] = dataclasses.replace(old, status=LocalModelNodeStatus(model_status=merged))
    return dataclasses.replace(s, local_model_nodes=lmns)


def spec_of(s: Snapshot, n: str) -> list[str]:
    lmn = s.local_model_nodes.get(n)
    return [m.model_name for m in lmn.local_models] if lmn else []


def key(name: str) -> str:
    return cache(name, "1Gi", ["g"]).spec.storage_key


def conditions(c: LocalModelCache) -> dict[tuple[str, str | None], tuple[str, str, str]]:
    return {(x.type, x.node_group): (x.status, x.reason, x.message) for x in c.status.conditions}


# -- admission, placement, status ------------------------------------------------------------------


def test_two_groups_and_a_cache_that_fits_only_one() -> None:
    s = snap(
        [
            cache("small", "60Gi", ["a100", "h100"]),
            cache("big", "140Gi", ["a100", "h100"], "2026-01-02T00:00:00Z"),
        ],
        [group("a100", "500Gi"), group("h100", "150Gi")],
        [node("a1", "a100"), node("a2", "a100"), node("h1", "h100")],
    )
    p = plan(s, Options(now=T0))
    s2 = settle(s, p)
    assert spec_of(s2, "a1") == spec_of(s2, "a2") == ["big", "small"]
    assert spec_of(s2, "h1") == ["small"]
    big = s2.caches["big"]
    assert conditions(big)[("Admitted", "h100")] == (
        "False",
        "InsufficientStorage",
        "needs 140Gi, group h100 has 90Gi of 150Gi free",
    )
    assert conditions(big)[("Admitted", "a100")][:2] == ("True", "Admitted")
    assert conditions(big)[("Ready", "a100")] == ("False", "Downloading", "0 of 2 nodes hold it")
    assert big.status.node_status == {"a1": NodeState.DOWNLOAD_PENDING, "a2": NodeState.DOWNLOAD_PENDING}
    assert (big.status.copies.total, big.status.copies.available) == (2, 0)
    assert big.status.observed_generation == 1
    h100 = s2.groups["h100"].status
    assert (str(h100.used), str(h100.available), h100.nodes) == ("60Gi", "90Gi", 1)
    reasons = {(e.name, e.reason, e.type) for e in p.events}
    assert ("big", "InsufficientStorage", "Warning") in reasons
    assert ("big", "Admitted", "Normal") in reasons and ("big", "Placed", "Normal") in reasons
    # LocalModelNodes own a reference to their Node (garbage-collected with it).
    assert {w.name: w.node_uid for w in p.nodes} == {"a1": "uid-a1", "a2": "uid-a2", "h1": "uid-h1"}
    # Level-triggered and quiet: the same inputs again plan nothing, and emit no Event again.
    again = plan(s2, Options(now="2026-03-03T00:00:00Z"))
    assert again.empty and again.events == ()


def test_missing_group_is_reported_and_the_rest_still_placed() -> None:
    s = snap([cache("m", "1Gi", ["gone", "g"])], [group("g", "10Gi")], [node("n", "g")])
    s2 = settle(s, p := plan(s, Options(now=T0)))
    assert conditions(s2.caches["m"])[("Admitted", "gone")][:2] == ("False", "NodeGroupNotFound")
    assert "does not exist" in conditions(s2.caches["m"])[("Admitted", "gone")][2]
    assert spec_of(s2, "n") == ["m"]
    assert any(e.reason == "NodeGroupNotFound" and e.type == "Warning" for e in p.events)


def test_status_follows_the_agents_and_all_copies_ready_is_said_once() -> None:
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], [node("n1", "g"), node("n2", "g")])
    s = settle(s, plan(s, Options(now=T0)))
    s = report(s, {"n1": {"m": ModelState.DOWNLOADED}, "n2": {"m": ModelState.DOWNLOADING}})
    s = settle(s, p := plan(s, Options(now=T0)))
    assert s.caches["m"].status.node_status == {"n1": NodeState.DOWNLOADED, "n2": NodeState.DOWNLOADING}
    assert not any(e.reason == "AllCopiesReady" for e in p.events)
    s = report(s, {"n2": {"m": ModelState.DOWNLOADED}})
    s = settle(s, p := plan(s, Options(now="2026-01-05T00:00:00Z")))
    assert [e.reason for e in p.events] == ["AllCopiesReady"]
    c = s.caches["m"]
    assert (c.status.copies.available, c.status.copies.total) == (2, 2)
    ready = next(x for x in c.status.conditions if x.type == "Ready")
    assert (ready.status, ready.last_transition_time) == ("True", "2026-01-05T00:00:00Z")
    assert not plan(s, Options(now="2026-01-09T00:00:00Z")).events


def test_a_failed_copy_is_an_event_once_and_counts_as_failed() -> None:
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], [node("n1", "g")])
    s = settle(s, plan(s))
    s = report(s, {"n1": {"m": ModelState.ERROR}})
    s = settle(s, p := plan(s))
    assert [(e.reason, e.type) for e in p.events] == [("CopyFailed", "Warning")]
    assert s.caches["m"].status.copies.failed == 1
    assert conditions(s.caches["m"])[("Ready", "g")][:2] == ("False", "DownloadError")
    assert not plan(s).events


def test_deleted_nodes_are_pruned_from_node_status_and_lose_their_local_model_node() -> None:
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], [node("n1", "g"), node("n2", "g")])
    s = settle(s, plan(s))
    s = dataclasses.replace(s, nodes={"n1": s.nodes["n1"]})
    p = plan(s)
    assert [(w.name, w.action) for w in p.nodes] == [("n2", "delete")]
    (write,) = [w for w in p.statuses if w.kind == "LocalModelCache"]
    assert write.patch["nodeStatus"] == {"n1": "NodeDownloadPending", "n2": None}
    assert settle(s, p).caches["m"].status.copies.total == 1


def test_not_ready_nodes() -> None:
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], [node("n1", "g")], not_ready=frozenset({"n1"}))
    s = settle(s, plan(s))
    assert s.caches["m"].status.node_status == {"n1": NodeState.NOT_READY}
    assert node_ready({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}) is False
    assert node_ready({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}) is True
    assert node_ready({"metadata": {"name": "standalone"}}) is True


# -- removal ---------------------------------------------------------------------------------------


def test_node_leaving_a_group_and_group_dropped_from_a_cache_lose_the_model() -> None:
    groups = [group("a100", "100Gi"), group("h100", "100Gi")]
    s = snap(
        [cache("m", "1Gi", ["a100", "h100"])],
        groups,
        [node("a1", "a100"), node("a2", "a100"), node("h1", "h100")],
    )
    s = settle(s, plan(s))
    assert spec_of(s, "a2") == ["m"] and spec_of(s, "h1") == ["m"]
    # a2 is relabelled out of a100; the cache drops h100.
    s = dataclasses.replace(s, nodes={**s.nodes, "a2": node("a2", "none")})
    s = dataclasses.replace(
        s, caches={"m": dataclasses.replace(cache("m", "1Gi", ["a100"]), status=s.caches["m"].status)}
    )
    s = settle(s, plan(s))
    assert spec_of(s, "a1") == ["m"] and spec_of(s, "a2") == [] and spec_of(s, "h1") == []
    assert set(s.caches["m"].status.node_status) == {"a1"}


def test_a_model_a_running_pod_uses_is_kept_and_marked_until_the_pod_is_gone() -> None:
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], [node("n1", "g")])
    s = settle(s, plan(s))
    s = dataclasses.replace(s, nodes={"n1": node("n1", "other")}, in_use={"n1": frozenset({"m"})})
    p = plan(s)
    s = settle(s, p)
    assert spec_of(s, "n1") == ["m"]
    assert s.local_model_nodes["n1"].metadata.annotations == {RETAINED_ANNOTATION: "m"}
    assert [e.reason for e in p.events if e.reason == "RetainedInUse"] == ["RetainedInUse"]
    assert not plan(s).events  # said once
    s = settle(s, plan(dataclasses.replace(s, in_use={})))
    assert spec_of(s, "n1") == [] and s.local_model_nodes["n1"].metadata.annotations == {}


# -- finalizer -------------------------------------------------------------------------------------


def test_finalizer_added_then_removed_once_no_node_lists_the_model() -> None:
    s = snap([cache("m", "1Gi", ["g"], finalizers=())], [group("g", "10Gi")], [node("n1", "g")])
    p = plan(s)
    assert [(f.cache, f.add) for f in p.finalizers] == [("m", True)]
    s = settle(s, p)
    deleting = cache("m", "1Gi", ["g"], deleting=True)
    s = dataclasses.replace(s, caches={"m": deleting}, in_use={"n1": frozenset({"m"})})
    p = plan(s)
    assert p.finalizers == ()  # a pod still uses it
    s = settle(s, p)
    assert spec_of(s, "n1") == ["m"]
    s = dataclasses.replace(s, in_use={})
    p = plan(s)
    assert [(f.cache, f.add) for f in p.finalizers] == [("m", False)]
    s = settle(s, p)
    assert "m" not in s.caches and spec_of(s, "n1") == []


def test_deleting_a_cache_whose_group_is_gone_is_never_blocked() -> None:
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], [node("n1", "g")])
    s = settle(s, plan(s))
    s = dataclasses.replace(s, groups={}, caches={"m": cache("m", "1Gi", ["g"], deleting=True)})
    s = settle(s, plan(s))
    assert s.caches == {} and spec_of(s, "n1") == []


# -- pacing ----------------------------------------------------------------------------------------


def test_pacing_twenty_nodes_three_at_a_time() -> None:
    nodes = [node(f"n{i:02}", "g") for i in range(20)]
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], nodes)
    opts = Options(max_concurrent_downloads=3)
    s = settle(s, plan(s, opts))
    listed = [n.name for n in nodes if spec_of(s, n.name)]
    assert listed == ["n00", "n01", "n02"]
    status = s.caches["m"].status.node_status
    assert sum(1 for v in status.values() if v is NodeState.DOWNLOAD_PENDING) == 20
    # Two finish, one fails: three new slots (a failure holds none).
    s = report(
        s,
        {
            "n00": {"m": ModelState.DOWNLOADED},
            "n01": {"m": ModelState.DOWNLOADED},
            "n02": {"m": ModelState.ERROR},
        },
    )
    s = settle(s, plan(s, opts))
    assert [n.name for n in nodes if spec_of(s, n.name)] == [f"n{i:02}" for i in range(6)]
    rounds = 0
    while s.caches["m"].status.copies.available + s.caches["m"].status.copies.failed < 20:
        s = report(
            s,
            {n: {"m": ModelState.DOWNLOADED} for n in s.local_model_nodes if spec_of(s, n) and n != "n02"},
        )
        s = settle(s, plan(s, opts))
        rounds += 1
    assert rounds == 6  # n03-n05 finish, then 14 more nodes three per round (5), then the last report
    assert s.caches["m"].status.copies.available == 19


def test_no_limit_lists_every_node_at_once() -> None:
    nodes = [node(f"n{i}", "g") for i in range(10)]
    s = snap([cache("m", "1Gi", ["g"])], [group("g", "10Gi")], nodes)
    s = settle(s, plan(s, Options(max_concurrent_downloads=0)))
    assert all(spec_of(s, n.name) == ["m"] for n in nodes)


# -- pods ------------------------------------------------------------------------------------------


def test_models_in_use_reads_labels_annotations_claims_and_host_paths() -> None:
    caches = [cache("m", "1Gi", ["g"]), cache("x", "1Gi", ["g"])]
    groups = [group("g", "10Gi")]

    def pod(name: str, node: str | None = "n1", phase: str = "Running", **extra: Any) -> dict[str, Any]:
        meta = {"name": name, "namespace": "ns", **extra.pop("meta", {})}
        return {"metadata": meta, "spec": {"nodeName": node, **extra}, "status": {"phase": phase}}

    pods = [
        pod("by-label", meta={"labels": {"internal.serving.kserve.io/localmodel": "m"}}),
        pod("by-claim", node="n2", volumes=[{"name": "v", "persistentVolumeClaim": {"claimName": "x-g"}}]),
        pod(
            "by-path", node="n3", volumes=[{"name": "v", "hostPath": {"path": f"/models/models/{key('x')}/"}}]
        ),
        pod("by-annotation", node="n4", meta={"annotations": {"modelcache.io/model": "m"}}),
        pod(
            "finished",
            node="n5",
            phase="Succeeded",
            meta={"labels": {"internal.serving.kserve.io/localmodel": "m"}},
        ),
        pod("unscheduled", node=None, meta={"labels": {"internal.serving.kserve.io/localmodel": "m"}}),
        pod("root-only", node="n6", volumes=[{"name": "v", "hostPath": {"path": "/models"}}]),
    ]
    assert models_in_use([Pod.from_json(p) for p in pods], caches, groups) == {
        "n1": frozenset({"m"}),
        "n2": frozenset({"x"}),
        "n3": frozenset({"x"}),
        "n4": frozenset({"m"}),
    }


def test_a_pod_that_disables_the_local_model_names_no_cache_in_any_plan_path() -> None:
    """``serving.kserve.io/disable-localmodel: "true"`` (any case) turns off the cache a pod names for
    the retention and serving paths too, as for admission: one rule (``named_cache``). A mount of
    the cache's claim is still a use."""
    caches = [cache("m", "1Gi", ["g"])]
    groups = [group("g", "10Gi")]
    off = {"serving.kserve.io/disable-localmodel": "True", "modelcache.io/model": "m"}
    labelled = {"internal.serving.kserve.io/localmodel": "m"}

    def pod(name: str, annotations: dict[str, str], **spec: Any) -> Pod:
        meta = {"name": name, "namespace": "ns", "labels": labelled, "annotations": annotations}
        return Pod.from_json({"metadata": meta, "spec": {"nodeName": "n1", **spec}})

    disabled = pod("disabled", off)
    mounting = pod(
        "disabled-but-mounting", off, volumes=[{"name": "v", "persistentVolumeClaim": {"claimName": "m-g"}}]
    )
    enabled = pod("enabled", {"serving.kserve.io/disable-localmodel": "false"})
    assert (disabled.cache, disabled.group, enabled.cache) == (None, None, "m")
    assert models_in_use([disabled], caches, groups) == {}
    assert serving_demands([disabled], {c.name: c for c in caches}) == set()
    assert models_in_use([mounting], caches, groups) == {"n1": frozenset({"m"})}
    assert serving_demands([mounting], {c.name: c for c in caches}) == {ServingDemand("m", "g", "ns")}
    assert models_in_use([enabled], caches, groups) == {"n1": frozenset({"m"})}
    assert serving_demands([enabled], {c.name: c for c in caches}) == {ServingDemand("m", None, "ns")}
    # The webhook reads the same rule.
    raw = {"metadata": {"name": "p", "labels": labelled, "annotations": off}}
    assert pod_ask(raw) == PodAsk(None, None)


def test_copies_by_group_counts_each_group_s_members_and_none_where_refused() -> None:
    """The metrics' copies per (cache, group), from a plan's node states: a group that refused the
    cache has none, a group that does not exist is left out, a cache that is gone is None."""
    s = snap(
        [cache("m", "60Gi", ["a100", "h100", "gone"])],
        [group("a100", "500Gi"), group("h100", "50Gi")],
        [node("a1", "a100"), node("a2", "a100"), node("h1", "h100")],
    )
    s = settle(s, plan(s))
    s = report(s, {"a1": {"m": ModelState.DOWNLOADED}, "a2": {"m": ModelState.ERROR}})
    placed = layout(s.caches.values(), s.groups.values(), s.nodes.values())
    states = plan(s, placed=placed).node_status
    assert copies_by_group({**states, "deleted": {}}, s.caches, s.groups.keys(), placed) == {
        "m": {"a100": Copies(available=1, total=2, failed=1), "h100": Copies()},
        "deleted": None,
    }


def test_backoff_doubles_to_the_cap_with_at_most_a_fifth_off() -> None:
    for failures, base, cap, full in [(1, 2.0, 30.0, 2.0), (3, 2.0, 30.0, 8.0), (9, 2.0, 30.0, 30.0)]:
        delay = backoff(failures, base, cap)
        assert 0.8 * full <= delay <= full


# -- properties ------------------------------------------------------------------------------------

GROUPS = ("a", "b", "c")


@st.composite
def clusters(draw: st.DrawFn) -> Snapshot:
    groups = [group(g, f"{draw(st.integers(1, 6))}Gi") for g in GROUPS if draw(st.booleans()) or g == "a"]
    n_caches = draw(st.integers(0, 6))
    caches = [
        cache(
            f"c{i}",
            f"{draw(st.integers(1, 4))}Gi",
            draw(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=3, unique=True)),
            f"2026-01-0{draw(st.integers(1, 9))}T00:00:00Z",
        )
        for i in range(n_caches)
    ]
    nodes = [node(f"n{i}", draw(st.sampled_from((*GROUPS, "none")))) for i in range(draw(st.integers(0, 8)))]
    return snap(caches, groups, nodes)


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_layout_is_place_node_for_every_node(s: Snapshot) -> None:
    placed: Layout = layout(s.caches.values(), s.groups.values(), s.nodes.values())
    for n in s.nodes.values():
        expected = place_node(n, s.caches.values(), s.groups.values())
        assert tuple(placed.wanted.get(n.name, {}).values()) == expected.models
        assert placed.node_groups.get(n.name, ()) == expected.groups


@settings(max_examples=60, deadline=None)
@given(clusters(), st.integers(0, 3), st.randoms(use_true_random=False))
def test_rollouts_converge_within_the_pacing_limit(s: Snapshot, limit: int, rnd: Any) -> None:
    opts = Options(max_concurrent_downloads=limit)
    for _ in range(40):
        p = plan(s, opts)
        s = settle(s, p)
        # Never more than `limit` nodes fetching one model at once.
        for c in s.caches.values():
            fetching = [
                n
                for n, lmn in s.local_model_nodes.items()
                if c.name in spec_of(s, n)
                and lmn.status.model_status.get(c.name) not in (ModelState.DOWNLOADED, ModelState.ERROR)
            ]
            assert limit == 0 or len(fetching) <= limit
        # Agents finish some of what they were given.
        done = {
            n: {m.model_name: ModelState.DOWNLOADED for m in lmn.local_models if rnd.random() < 0.7}
            for n, lmn in s.local_model_nodes.items()
        }
        s = report(s, done)
        if p.empty and all(c.status.copies.available == c.status.copies.total for c in s.caches.values()):
            break
    final = plan(s, opts)
    assert final.empty, final
    placed = layout(s.caches.values(), s.groups.values(), s.nodes.values())
    for n in s.nodes:
        assert spec_of(s, n) == list(placed.wanted.get(n, {}))


@settings(max_examples=40, deadline=None)
@given(clusters(), st.data())
def test_an_incremental_plan_agrees_with_a_full_one(s: Snapshot, data: st.DataObject) -> None:
    opts = Options(max_concurrent_downloads=2)
    s = settle(s, plan(s, opts))
    if not s.local_model_nodes:
        return
    n = data.draw(st.sampled_from(sorted(s.local_model_nodes)))
    s = report(s, {n: {m.model_name: ModelState.DOWNLOADED for m in s.local_model_nodes[n].local_models}})
    placed = layout(s.caches.values(), s.groups.values(), s.nodes.values())
    # What the controller passes for an agent's report: the node, or only the models it reported.
    by_node = Scope(nodes=frozenset({n}))
    by_model = Scope(caches=frozenset(m.model_name for m in s.local_model_nodes[n].local_models))
    scope = data.draw(st.sampled_from((by_node, by_model)))
    scoped = settle(s, plan(s, opts, placed=placed, scope=scope))
    full = settle(s, plan(s, opts, placed=placed))
    assert {k: spec_of(scoped, k) for k in s.nodes} == {k: spec_of(full, k) for k in s.nodes}
    assert {c: x.status for c, x in scoped.caches.items()} == {c: x.status for c, x in full.caches.items()}


def test_which_caches_an_inference_service_uses() -> None:
    caches = {c.name: c for c in (cache("llama", "1Gi", ["g"]), cache("llama-2", "1Gi", ["g"]))}
    caches["s3"] = LocalModelCache.from_json(
        {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "LocalModelCache",
            "metadata": {"name": "s3"},
            "spec": {"sourceModelUri": "s3://bucket/models/", "modelSize": "1Gi", "nodeGroups": ["g"]},
        }
    )

    def uses(predictor: dict[str, Any], labels: dict[str, str] | None = None) -> set[str]:
        isvc = {"metadata": {"labels": labels or {}}, "spec": {"predictor": predictor}}
        return set(isvc_caches(InferenceService.from_json(isvc), caches))

    assert uses({"model": {"storageUri": "hf://org/llama"}}) == {"llama"}
    assert uses({"model": {"storageUri": "hf://org/llama/lora"}}) == {"llama"}  # a path below it
    assert uses({"model": {"storageUri": "hf://org/llama-2"}}) == {"llama-2"}  # not a path below llama
    assert uses({"sklearn": {"storageUri": "s3://bucket/models/iris"}}) == {"s3"}  # older framework form
    assert uses({"model": {"storageUri": "s3://bucket/models-old/x"}}) == set()
    assert uses({}, {"internal.serving.kserve.io/localmodel": "llama-2"}) == {"llama-2"}
    assert uses({}, {"internal.serving.kserve.io/localmodel": "gone"}) == set()  # no such cache
    assert uses({"model": {"storageUri": 7}}) == set()  # not a string: ignored, not a crash
