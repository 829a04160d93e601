"""Cache and group status, with their Events, pure: from the node states a plan leaves to the status
the controller writes on each LocalModelCache and LocalModelNodeGroup.

- One status write per object, only when the fields the controller owns differ; condition
  transition times change only when a condition's status changes, so an unchanged cluster plans no
  write at all.
- Events are derived from the difference between the stored status and the new one, so a replayed
  reconcile does not repeat them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Literal

from controller.serving import SERVING, ServingProblem
from controller.snapshot import Event, Snapshot, StatusWrite, model_state
from controller.views import InferenceService
from localmodel.placement import GroupUsage, Layout, Refusal, human
from localmodel.quantity import Quantity
from localmodel.resources import (
    Condition,
    Copies,
    InferenceServiceRef,
    LocalModelCache,
    LocalModelCacheStatus,
    LocalModelNodeGroup,
    ModelState,
    NodeState,
)

ADMITTED = "Admitted"
READY = "Ready"
# --admission warn: a cache admitted over its group's storageLimit says so, per group, with a
# condition (True while it is over) and a Warning Event when that starts.
STORAGE_OVERCOMMITTED = "StorageOvercommitted"
OVERCOMMITTED = "OverCommitted"  # the condition's reason and the Event's

_MODEL_TO_NODE = {
    ModelState.PENDING: NodeState.DOWNLOAD_PENDING,
    ModelState.DOWNLOADING: NodeState.DOWNLOADING,
    ModelState.DOWNLOADED: NodeState.DOWNLOADED,
    ModelState.ERROR: NodeState.DOWNLOAD_ERROR,
}


def node_states(
    snapshot: Snapshot, placed: Layout, cache: LocalModelCache, listed: set[str]
) -> dict[str, NodeState]:
    states: dict[str, NodeState] = {}
    for n in placed.holders.get(cache.key, ()):
        if n in snapshot.not_ready:
            states[n] = NodeState.NOT_READY
        elif n not in listed:
            states[n] = NodeState.DOWNLOAD_PENDING  # waiting for a rollout slot
        else:
            state = model_state(snapshot.local_model_nodes.get(n), cache.key)
            states[n] = NodeState.DOWNLOAD_PENDING if state is None else _MODEL_TO_NODE[state]
    return states


ConditionArgs = tuple[bool, str, str]  # ok, reason, message


def group_conditions(
    g: str,
    refusal: Refusal | None,
    usage: GroupUsage | None,
    members: tuple[str, ...],
    states: Mapping[str, NodeState],
) -> tuple[ConditionArgs, ConditionArgs]:
    """The cache's Admitted and Ready conditions for node group ``g``: refused (both say why), or
    admitted (its usage) and Ready when every member holds it (else Downloading, or DownloadError
    when one failed; NoNodes when the group selects none)."""
    if refusal is not None:
        return (False, refusal.reason, refusal.message), (False, refusal.reason, refusal.message)
    assert usage is not None  # admission refuses a cache for every group it keeps no usage of
    admitted = (
        True,
        ADMITTED,
        f"admitted to node group {g}: {human(usage.used)} of {human(usage.limit)} per node in use",
    )
    ready = sum(1 for n in members if states.get(n) is NodeState.DOWNLOADED)
    errors = sum(1 for n in members if states.get(n) is NodeState.DOWNLOAD_ERROR)
    if not members:
        return admitted, (False, "NoNodes", f"node group {g} selects no nodes")
    if ready == len(members):
        return admitted, (True, "Downloaded", f"{ready} of {len(members)} nodes hold it")
    if errors:
        return admitted, (False, "DownloadError", f"{ready} of {len(members)} nodes hold it, {errors} failed")
    return admitted, (False, "Downloading", f"{ready} of {len(members)} nodes hold it")


def cache_status(
    snapshot: Snapshot,
    placed: Layout,
    cache: LocalModelCache,
    states: Mapping[str, NodeState],
    now: str,
    problems: Iterable[ServingProblem] = (),
    *,
    origin_bytes: int | None = None,
) -> tuple[StatusWrite | None, list[Event]]:
    """The cache's status after this plan (:func:`status_write`) and the Events its changes make:
    Admitted/Warning per group whose admission changed, Placed for new holders, CopyFailed per node
    that newly failed, AllCopiesReady, and one Warning per changed serving problem. A group that
    admitted it over its storageLimit (:attr:`localmodel.placement.Admission.overcommitted`) adds
    a StorageOvercommitted condition, and an OverCommitted Warning when it becomes so.
    ``origin_bytes``: its status.originBytes (:func:`controller.peers.origin_bytes`)."""
    old_conditions = {(c.type, c.node_group): c for c in cache.status.conditions}
    conditions, events = _group_conditions(placed, cache, states, old_conditions, now)
    events += _copy_events(snapshot, cache, states)
    served, served_events = _serving_conditions(cache, problems, old_conditions, now)
    conditions += served
    events += served_events
    refs = snapshot.inference_services.get(cache.key, ())
    llm = snapshot.llm_inference_services.get(cache.key, ())
    write = status_write(cache, states, tuple(conditions), refs, llm_refs=llm, origin_bytes=origin_bytes)
    return write, events


_OldConditions = Mapping[tuple[str, str | None], Condition]


def _condition(
    old_conditions: _OldConditions,
    now: str,
    ctype: str,
    group: str | None,
    ok: bool,
    reason: str,
    message: str,
) -> Condition:
    """The condition, its transition time kept from the old one of that type and group while its
    status is unchanged (``now`` otherwise)."""
    status = "True" if ok else "False"
    before = old_conditions.get((ctype, group))
    since = before.last_transition_time if before is not None and before.status == status else None
    return Condition(ctype, status, reason, message, since or now, group)


def _event(cache: LocalModelCache, kind: Literal["Normal", "Warning"], reason: str, message: str) -> Event:
    return Event(
        cache.kind.kind,  # type: ignore[arg-type]  # one of the two cache kinds
        cache.name,
        cache.metadata.uid,
        kind,
        reason,
        message,
        cache.namespace,
    )


def _group_conditions(
    placed: Layout,
    cache: LocalModelCache,
    states: Mapping[str, NodeState],
    old_conditions: _OldConditions,
    now: str,
) -> tuple[list[Condition], list[Event]]:
    """Per group the cache lists: Admitted and Ready (:func:`group_conditions`), StorageOvercommitted
    where admitted over its storageLimit; Events for an admission that changed and for a group that
    became overcommitted."""
    refusals = {r.group: r for r in placed.admission.refused if r.cache == cache.key}
    over = {r.group: r for r in placed.admission.overcommitted if r.cache == cache.key}
    usage = placed.admission.usage
    conditions: list[Condition] = []
    events: list[Event] = []
    for g in dict.fromkeys(cache.spec.node_groups):
        admitted_args, ready_args = group_conditions(
            g, refusals.get(g), usage.get(g), placed.members.get(g, ()), states
        )
        admitted = _condition(old_conditions, now, ADMITTED, g, *admitted_args)
        ready_c = _condition(old_conditions, now, READY, g, *ready_args)
        before = old_conditions.get((ADMITTED, g))
        if before is None or (before.status, before.reason) != (admitted.status, admitted.reason):
            if admitted.status == "True":
                events.append(_event(cache, "Normal", ADMITTED, admitted.message))
            else:
                events.append(_event(cache, "Warning", admitted.reason, admitted.message))
        conditions += [admitted, ready_c]
        if (o := over.get(g)) is not None:
            message = (
                f"admitted over the storageLimit of node group {g} (--admission warn): {o.message}; "
                "its nodes may run out of disk"
            )
            flagged = _condition(old_conditions, now, STORAGE_OVERCOMMITTED, g, True, OVERCOMMITTED, message)
            before = old_conditions.get((STORAGE_OVERCOMMITTED, g))
            if before is None or before.status != "True":
                events.append(_event(cache, "Warning", OVERCOMMITTED, message))
            conditions.append(flagged)
    return conditions, events


def _copy_events(snapshot: Snapshot, cache: LocalModelCache, states: Mapping[str, NodeState]) -> list[Event]:
    """Placed for new holders, CopyFailed per node that newly failed, AllCopiesReady when every copy
    became available."""
    old = cache.status
    available = sum(1 for s in states.values() if s is NodeState.DOWNLOADED)
    total = len(states)
    events: list[Event] = []
    new_holders = sorted(set(states) - set(old.node_status))
    if new_holders:
        shown = ", ".join(new_holders[:5]) + (
            f" (+{len(new_holders) - 5} more)" if len(new_holders) > 5 else ""
        )
        events.append(_event(cache, "Normal", "Placed", f"placed on {len(new_holders)} node(s): {shown}"))
    for n, s in sorted(states.items()):
        if s is NodeState.DOWNLOAD_ERROR and old.node_status.get(n) is not NodeState.DOWNLOAD_ERROR:
            detail = _error_detail(snapshot, n, cache)
            events.append(_event(cache, "Warning", "CopyFailed", f"copy on node {n} failed{detail}"))
    if total and available == total and not (old.copies.total and old.copies.available == old.copies.total):
        events.append(_event(cache, "Normal", "AllCopiesReady", f"all {total} node(s) hold the model"))
    return events


def _serving_conditions(
    cache: LocalModelCache, problems: Iterable[ServingProblem], old_conditions: _OldConditions, now: str
) -> tuple[list[Condition], list[Event]]:
    """A Serving=False condition per problem, and a Warning for each that changed."""
    conditions: list[Condition] = []
    events: list[Event] = []
    for problem in problems:
        served = _condition(
            old_conditions, now, SERVING, problem.group, False, problem.reason, problem.message
        )
        before = old_conditions.get((SERVING, problem.group))
        if before is None or (before.status, before.reason, before.message) != (
            served.status,
            served.reason,
            served.message,
        ):
            events.append(_event(cache, "Warning", problem.reason, problem.message))
        conditions.append(served)
    return conditions, events


def status_write(
    cache: LocalModelCache,
    states: Mapping[str, NodeState],
    conditions: tuple[Condition, ...],
    refs: tuple[InferenceServiceRef, ...],
    *,
    llm_refs: tuple[InferenceServiceRef, ...] = (),
    origin_bytes: int | None = None,
) -> StatusWrite | None:
    """The merge patch that makes the cache's status the one of these node states, conditions,
    InferenceServices and LLMInferenceServices (``llm_refs``) and bytes from the origin
    (``origin_bytes``, None: absent), or None when it is that already."""
    old = cache.status
    available = sum(1 for s in states.values() if s is NodeState.DOWNLOADED)
    failed = sum(1 for s in states.values() if s is NodeState.DOWNLOAD_ERROR)
    total = len(states)
    new_json: dict[str, Any] = {
        "nodeStatus": {n: s.value for n, s in sorted(states.items())},
        "copies": {"available": available, "total": total, "failed": failed},
        "inferenceServices": [{"name": r.name, "namespace": r.namespace} for r in refs],
        "llmInferenceServices": [{"name": r.name, "namespace": r.namespace} for r in llm_refs],
        "conditions": [c.to_json() for c in conditions],
        "observedGeneration": cache.metadata.generation,
    }
    old_json = old.to_json()
    current = {
        "nodeStatus": old_json.get("nodeStatus", {}),
        "copies": old_json.get("copies"),
        "inferenceServices": old_json.get("inferenceServices") or [],
        "llmInferenceServices": old_json.get("llmInferenceServices") or [],
        "conditions": old_json.get("conditions", []),
        "observedGeneration": old.observed_generation,
    }
    if origin_bytes is not None or old.origin_bytes is not None:  # peer fill's; absent without it
        new_json["originBytes"] = origin_bytes
        current["originBytes"] = old.origin_bytes
    if current == new_json:
        return None
    patch = dict(new_json)
    # A merge patch merges maps: prune the entries of nodes that no longer hold the model.
    patch["nodeStatus"] = {**dict.fromkeys(old.node_status), **new_json["nodeStatus"]}
    if not refs:
        patch["inferenceServices"] = None  # absent when none, as KServe writes it
    if not llm_refs:
        patch["llmInferenceServices"] = None
    typed = LocalModelCacheStatus(
        node_status=dict(sorted(states.items())),
        copies=Copies(available=available, total=total, failed=failed),
        inference_services=tuple(InferenceServiceRef(r.name, r.namespace) for r in refs),
        llm_inference_services=tuple(llm_refs),
        observed_generation=cache.metadata.generation,
        conditions=conditions,
        origin_bytes=origin_bytes,
    )
    return StatusWrite(
        cache.kind.kind,  # type: ignore[arg-type]  # one of the two cache kinds
        cache.name,
        patch,
        typed,
        cache.namespace,
    )


def _error_detail(snapshot: Snapshot, node: str, cache: LocalModelCache) -> str:
    lmn = snapshot.local_model_nodes.get(node)
    # The agent keys its progress by the status key (modelStatus' key); older agents by storage key.
    models = {} if lmn is None else lmn.status.models
    progress = models.get(cache.key) or models.get(cache.spec.storage_key)
    if progress is None or not (progress.reason or progress.message):
        return ""
    return ": " + ": ".join(x for x in (progress.reason, progress.message) if x)


def group_status(group: LocalModelNodeGroup, placed: Layout) -> StatusWrite | None:
    usage = placed.admission.usage[group.name]
    new = {
        "used": Quantity.from_bytes(usage.used).to_json(),
        "available": Quantity.from_bytes(usage.available).to_json(),
        "nodes": len(placed.members.get(group.name, ())),
        "observedGeneration": group.metadata.generation,
    }
    st = group.status
    current = {
        "used": st.used.to_json() if st.used is not None else None,
        "available": st.available.to_json() if st.available is not None else None,
        "nodes": st.nodes,
        "observedGeneration": st.observed_generation,
    }
    # Quantities compare by value: "1Gi" stored by someone else equals 1073741824.
    same = (
        st.used == Quantity.from_bytes(usage.used)
        and st.available == Quantity.from_bytes(usage.available)
        and current["nodes"] == new["nodes"]
        and current["observedGeneration"] == new["observedGeneration"]
    )
    return None if same else StatusWrite("LocalModelNodeGroup", group.name, new)


def isvc_caches(isvc: InferenceService, caches: Mapping[str, LocalModelCache]) -> frozenset[str]:
    """The caches (keys) an InferenceService uses: the one KServe's webhook names in its
    ``internal.serving.kserve.io/localmodel`` label (with ``…/localmodel-namespace``: that
    namespace's LocalModelNamespaceCache), and those whose ``sourceModelUri`` covers a predictor's
    ``storageUri`` (the same URI, or a path below it, as KServe matches them): a
    LocalModelNamespaceCache of the InferenceService's own namespace when one covers it, else the
    cluster caches (KServe prefers the namespace cache, and never uses another namespace's:
    pkg/apis/serving/v1beta1/inference_service_defaults.go:504-546 at KServe v0.20)."""
    out: set[str] = set()
    named = caches.get(isvc.named) if isvc.named is not None else None
    if named is not None and named.namespace in (None, isvc.namespace):
        out.add(named.key)  # another namespace's cache is never its (KServe ignores such labels)
    for uri in isvc.storage_uris:
        own: set[str] = set()
        cluster: set[str] = set()
        for c in caches.values():
            base = c.spec.source_model_uri.rstrip("/")
            if uri == c.spec.source_model_uri or uri.startswith(base + "/"):
                if c.namespace is None:
                    cluster.add(c.key)
                elif c.namespace == isvc.namespace:
                    own.add(c.key)
        out |= own or cluster
    return frozenset(out)


def copies_by_group(
    node_status: Mapping[str, Mapping[str, NodeState]],
    caches: Mapping[str, LocalModelCache],
    groups: AbstractSet[str],
    placed: Layout,
) -> dict[str, dict[str, Copies] | None]:
    """Copies per cache and node group (the metrics' ``(cache, group)`` series) from a plan's node
    states: for each cache in ``node_status``, its groups that exist (``groups``: their names), with
    no copies where the group refused it; None for a cache that is gone."""
    out: dict[str, dict[str, Copies] | None] = {}
    for c, states in node_status.items():
        cache = caches.get(c)
        if cache is None:
            out[c] = None
            continue
        admitted = set(placed.admission.groups_of(c))
        per_group: dict[str, Copies] = {}
        for g in dict.fromkeys(cache.spec.node_groups):
            if g not in groups:
                continue  # no such group (the cache's Ready condition says so)
            if g not in admitted:
                per_group[g] = Copies()  # refused: no node of the group must hold it
                continue
            held = [states[n] for n in placed.members.get(g, ()) if n in states]
            per_group[g] = Copies(
                available=sum(1 for s in held if s is NodeState.DOWNLOADED),
                total=len(held),
                failed=sum(1 for s in held if s is NodeState.DOWNLOAD_ERROR),
            )
        out[c] = per_group
    return out
