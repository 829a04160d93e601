"""The controller's decision, pure: from frozen inputs (caches, groups, nodes, the LocalModelNodes as
they are, the pods that use models) to a frozen plan of writes. No I/O; ``controller.reconcile``
reads the cluster, runs :func:`plan` and applies what it returns.

Rules the plan keeps:

- Placement and admission come from :mod:`localmodel.placement` (the agent in standalone mode runs
  the same code, so both agree); :func:`layout` computes them once per change of caches, groups or
  nodes, and :func:`plan` reuses that while only LocalModelNodes or pods change.
- A model leaves a node's spec when the node left the group, the cache dropped the group, the group
  is gone, the cache is refused or deleted, unless a running pod on that node uses it: then it stays,
  listed in the ``RETAINED_ANNOTATION`` of the LocalModelNode, and goes once the pod is gone.
- Rollout pacing: a model is added to at most ``max_concurrent_downloads`` node specs that are still
  fetching it (pending or downloading) at any time; the other nodes that must hold it wait as
  NodeDownloadPending. A failed or NotReady node does not hold a slot, so a broken node never
  stalls a rollout. Removals are never paced.
- One status write per object, only when the fields the controller owns differ; condition
  transition times change only when a condition's status changes, so an unchanged cluster plans no
  write at all.
- Events are derived from the difference between the stored status and the new one, so a replayed
  reconcile does not repeat them.
- Serving (KServe's names): for each namespace that serves a cache from a group that admits it, a
  PersistentVolumeClaim ``<cache>-<group>`` in that namespace bound to a PersistentVolume
  :func:`volume_name` (``<cache>-<group>-<namespace>`` where unambiguous) built from a fixed
  template: that model's folder only (``<cache>/models/<key>``), ReadOnlyMany, reclaim policy
  Retain; no volume source is copied. A namespace serves a cache when a pod there names it
  (KServe's localmodel label, our annotation) or mounts that claim, when the cache's
  ``SERVING_NAMESPACES_ANNOTATION`` lists it, or once its claim exists; both go when the cache,
  the group, or the cache's use of the group goes. A claim name two caches share is the older's
  (:func:`serving_owners`); namespaces that are not names or are Kubernetes' or modelcache's are
  never served in (:func:`namespace_error`); both show as a ``SERVING`` condition on the cache and
  a Warning Event.
- Node labels: ``MODEL_LABEL_PREFIX + <storage key>`` = ``ready`` on each node whose LocalModelNode
  lists the model and reports it ModelDownloaded; removed otherwise. The scheduler reads it through
  the node affinity the pod webhook adds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

from localmodel.layout import node_model_folder
from localmodel.placement import (
    Admission,
    Refusal,
    admit,
    age_key,
    human,
)
from localmodel.quantity import Quantity
from localmodel.resources import (
    FINALIZER,
    LOCALMODEL_LABEL,
    NO_FOLDER,
    NODEGROUP_ANNOTATION,
    Condition,
    Copies,
    InferenceServiceRef,
    LocalModelCache,
    LocalModelCacheStatus,
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeGroup,
    ModelState,
    Node,
    NodeState,
)

# Our additions to KServe's names (KServe has no equivalent).
RETAINED_ANNOTATION = "modelcache.io/retained-in-use"  # on a LocalModelNode: models kept for a pod
MODEL_ANNOTATION = "modelcache.io/model"  # on a pod: the LocalModelCache it serves
# On a Node: "modelcache.io/model.<storage key>: ready" while the node holds that model, downloaded.
# The name part ("model." + 16 hex digits) keeps within a label name's 63 characters for any URI.
MODEL_LABEL_PREFIX = "modelcache.io/model."
MODEL_LABEL_VALUE = "ready"
# On a LocalModelCache: namespaces (comma-separated) to create its serving PVCs in before any pod.
SERVING_NAMESPACES_ANNOTATION = "modelcache.io/serving-namespaces"
# On the PVs and PVCs the controller creates: the selector it watches them by, and what each is for.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelcache-controller"
VOLUME_CACHE_ANNOTATION = "modelcache.io/cache"
VOLUME_GROUP_ANNOTATION = "modelcache.io/node-group"
VOLUME_NAMESPACE_ANNOTATION = "modelcache.io/namespace"
# A digest of the group's volume specs it was made from: when they change, it is made again.
VOLUME_SPEC_ANNOTATION = "modelcache.io/spec-digest"

ADMITTED = "Admitted"
READY = "Ready"
# A cache condition, present only while something keeps it from being served (nodeGroup: which group's
# claim; none: the whole cache): a claim name another cache has, one that is too long, an invalid
# serving namespace in its annotation.
SERVING = "Serving"
NAME_COLLISION = "ServingNameCollision"
NAME_TOO_LONG = "ServingNameTooLong"
INVALID_NAMESPACE = "InvalidServingNamespace"
NO_CACHE_FOLDER = "NoCacheFolder"
# Namespaces the controller never serves in: Kubernetes' own and modelcache's.
RESERVED_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
RESERVED_NAMESPACE_PREFIX = "modelcache-"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MAX_NAME = 253  # a PV's or PVC's name: a DNS subdomain (RFC 1123)
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 8

_MODEL_TO_NODE = {
    ModelState.PENDING: NodeState.DOWNLOAD_PENDING,
    ModelState.DOWNLOADING: NodeState.DOWNLOADING,
    ModelState.DOWNLOADED: NodeState.DOWNLOADED,
    ModelState.ERROR: NodeState.DOWNLOAD_ERROR,
}


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS  # 0: no limit
    now: str = "1970-01-01T00:00:00Z"  # for condition transition times


@dataclass(frozen=True, order=True)
class ServingDemand:
    cache: str
    group: str | None  # None: the cache's first node group (KServe's default)
    namespace: str


@dataclass(frozen=True)
class VolumeRef:
    """A PV or PVC the controller created: what it serves, read back from its annotations."""

    cache: str
    group: str
    namespace: str
    deleting: bool = False
    digest: str | None = None  # of the spec it was made with (None: made by an older version)
    volume: str | None = None  # a claim's spec.volumeName (None: a PV, or not bound by name)


@dataclass(frozen=True)
class Snapshot:
    """The cluster as the controller sees it, keyed by name."""

    caches: Mapping[str, LocalModelCache]
    groups: Mapping[str, LocalModelNodeGroup]
    nodes: Mapping[str, Node]
    local_model_nodes: Mapping[str, LocalModelNode] = field(default_factory=dict)
    in_use: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node -> caches pods use there
    not_ready: frozenset[str] = frozenset()  # nodes whose Ready condition is not True
    # cache -> nodes whose LocalModelNode spec lists it, when the caller keeps this index itself
    # (computed from local_model_nodes otherwise; a reconcile of one node must not walk them all).
    listed: Mapping[str, AbstractSet[str]] | None = None
    # node -> storage keys its MODEL_LABEL_PREFIX labels mark ready now (absent: none)
    node_models: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # (cache, node group or None for the cache's first, namespace) that pods ask to be served
    serving: frozenset[ServingDemand] = frozenset()
    # the serving PVs and PVCs the controller created, as they are
    volumes: Mapping[str, VolumeRef] = field(default_factory=dict)  # PV name ->
    claims: Mapping[tuple[str, str], VolumeRef] = field(default_factory=dict)  # (namespace, name) ->
    # cache -> the InferenceServices that use it (KServe's status.inferenceServices), sorted
    inference_services: Mapping[str, tuple[InferenceServiceRef, ...]] = field(default_factory=dict)
    # stored groups whose spec is refused (KServe's CRDs have no rules), name -> why: left out of
    # ``groups``, and a cache that lists one is told so
    invalid_groups: Mapping[str, str] = field(default_factory=dict)


def listing(lmns: Iterable[LocalModelNode]) -> dict[str, set[str]]:
    """cache -> nodes whose LocalModelNode spec lists it."""
    out: dict[str, set[str]] = {}
    for lmn in lmns:
        for m in lmn.local_models:
            out.setdefault(m.model_name, set()).add(lmn.name)
    return out


@dataclass(frozen=True)
class Layout:
    """Placement of the whole cluster: depends on caches, groups and nodes only."""

    admission: Admission
    members: Mapping[str, tuple[str, ...]]  # group -> member node names, sorted
    node_groups: Mapping[str, tuple[str, ...]]  # node -> its groups, sorted (only nodes in a group)
    wanted: Mapping[str, Mapping[str, LocalModelInfo]]  # node -> cache name -> what it must hold
    holders: Mapping[str, tuple[str, ...]]  # cache -> nodes that must hold it, sorted


def layout(
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
    nodes: Iterable[Node],
    invalid_groups: Mapping[str, str] | None = None,
) -> Layout:
    """What :func:`localmodel.placement.place_node` gives for every node, computed per group and per
    combination of groups instead of per node: 5,000 nodes share a handful of combinations.
    ``invalid_groups``: stored groups whose spec is refused, name -> why (they hold nothing)."""
    caches = list(caches)
    groups = sorted(groups, key=lambda g: g.name)
    nodes = list(nodes)
    admission = admit(caches, groups, invalid_groups)
    by_name = {c.name: c for c in caches}
    members: dict[str, list[str]] = {g.name: [] for g in groups}
    node_groups: dict[str, tuple[str, ...]] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        mine = tuple(
            g.name
            for g in groups
            if g.spec.node_selector is not None and g.spec.node_selector.matches(node.name, node.labels)
        )
        if mine:
            node_groups[node.name] = mine
            for g in mine:
                members[g].append(node.name)
    per_combination: dict[tuple[str, ...], Mapping[str, LocalModelInfo]] = {}
    wanted: dict[str, Mapping[str, LocalModelInfo]] = {}
    holders: dict[str, list[str]] = {}
    for node_name, mine in node_groups.items():
        models = per_combination.get(mine)
        if models is None:
            found: dict[str, LocalModelInfo] = {}
            for g in mine:  # sorted: a model two of the node's groups list is held for the first
                for cache_name in admission.admitted.get(g, ()):
                    if cache_name not in found:
                        found[cache_name] = _info(by_name[cache_name], g)
            models = per_combination[mine] = {k: found[k] for k in sorted(found)}
        wanted[node_name] = models
        for cache_name in models:
            holders.setdefault(cache_name, []).append(node_name)
    return Layout(
        admission=admission,
        members={g: tuple(m) for g, m in members.items()},
        node_groups=node_groups,
        wanted=wanted,
        holders={c: tuple(n) for c, n in holders.items()},
    )


def _info(cache: LocalModelCache, group: str) -> LocalModelInfo:
    return LocalModelInfo(
        source_model_uri=cache.spec.source_model_uri,
        model_name=cache.name,
        node_group=group,
        service_account_name=cache.spec.service_account_name,
        storage=cache.spec.storage,
        model_size=cache.spec.model_size,
    )


# -- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeWrite:
    """Create, patch or delete one LocalModelNode (named after its node)."""

    name: str
    action: Literal["create", "patch", "delete"]
    models: tuple[LocalModelInfo, ...] = ()
    retained: tuple[str, ...] = ()  # cache names kept only because a running pod uses them
    node_uid: str | None = None  # for the owner reference on create


@dataclass(frozen=True)
class StatusWrite:
    kind: Literal["LocalModelCache", "LocalModelNodeGroup"]
    name: str
    patch: Mapping[str, Any]  # JSON merge patch of status (None deletes a key)
    # The status it makes, typed (caches): what the view takes after the write, unparsed.
    status: LocalModelCacheStatus | None = None


@dataclass(frozen=True)
class FinalizerWrite:
    cache: str
    add: bool  # False: remove it, the cache's models are gone from every node spec


@dataclass(frozen=True)
class Event:
    kind: Literal["LocalModelCache", "LocalModelNodeGroup"]
    name: str
    uid: str | None
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class LabelWrite:
    """Set (True) or remove (False) the ready label of each storage key on one Node."""

    node: str
    labels: Mapping[str, bool]  # storage key -> ready


@dataclass(frozen=True)
class VolumeWrite:
    """Create or delete one serving PersistentVolume or PersistentVolumeClaim."""

    kind: Literal["PersistentVolume", "PersistentVolumeClaim"]
    action: Literal["create", "delete"]
    name: str
    namespace: str | None = None  # PVCs only
    body: Mapping[str, Any] | None = None  # the object to create


@dataclass(frozen=True)
class Plan:
    nodes: tuple[NodeWrite, ...] = ()
    statuses: tuple[StatusWrite, ...] = ()
    finalizers: tuple[FinalizerWrite, ...] = ()
    events: tuple[Event, ...] = ()
    node_status: Mapping[str, Mapping[str, NodeState]] = field(default_factory=dict)  # cache -> node
    labels: tuple[LabelWrite, ...] = ()
    volumes: tuple[VolumeWrite, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.nodes or self.statuses or self.finalizers or self.labels or self.volumes)


@dataclass(frozen=True)
class Scope:
    """What an incremental reconcile looks at: these caches and these nodes (plus, for each cache,
    the nodes whose spec must change for it). A full reconcile passes no scope."""

    caches: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()  # nodes whose model labels to check (their status changed)


# -- the decision -------------------------------------------------------------------------------


def plan(
    snapshot: Snapshot,
    options: Options = Options(),
    *,
    placed: Layout | None = None,
    scope: Scope | None = None,
) -> Plan:
    placed = placed or layout(
        snapshot.caches.values(), snapshot.groups.values(), snapshot.nodes.values(), snapshot.invalid_groups
    )
    lmns = snapshot.local_model_nodes
    listed_now = snapshot.listed if snapshot.listed is not None else listing(lmns.values())
    nobody: frozenset[str] = frozenset()

    if scope is None:
        cache_scope: set[str] = set(snapshot.caches) | set(listed_now)
        node_scope: set[str] = set(snapshot.nodes) | set(lmns)
    else:
        node_scope = set(scope.nodes)
        cache_scope = set(scope.caches)
        for n in scope.nodes:  # a node in scope brings every model it holds or must hold
            cache_scope.update(placed.wanted.get(n, {}))
            if n in lmns:
                cache_scope.update(m.model_name for m in lmns[n].local_models)

    # Pacing, per cache in scope: which nodes' specs list it after this plan.
    listed_next: dict[str, set[str]] = {}
    limit = options.max_concurrent_downloads
    for c in sorted(cache_scope):
        cache = snapshot.caches.get(c)
        holders = placed.holders.get(c, ())
        if cache is None or not holders:
            listed_next[c] = set()
            continue
        current = listed_now.get(c, nobody)
        keep: set[str] = set()
        active = 0
        candidates: list[str] = []
        for n in holders:
            state = _model_state(lmns.get(n), c)
            if n in current:
                keep.add(n)
                if n not in snapshot.not_ready and state not in (ModelState.DOWNLOADED, ModelState.ERROR):
                    active += 1
            elif state is ModelState.DOWNLOADED:
                keep.add(n)  # already on disk (another cache with this URI): costs the origin nothing
            elif n not in snapshot.not_ready:
                candidates.append(n)
        slots = len(candidates) if limit <= 0 else max(0, limit - active)
        keep.update(candidates[:slots])
        listed_next[c] = keep
        node_scope.update(current ^ keep)

    node_writes, listed_after, retained_new = _node_writes(snapshot, placed, listed_next, node_scope)

    statuses: list[StatusWrite] = []
    finalizers: list[FinalizerWrite] = []
    events: list[Event] = []
    node_status: dict[str, Mapping[str, NodeState]] = {}
    problems = serving_problems(snapshot.caches, snapshot.groups)
    for c in sorted(cache_scope):
        cache = snapshot.caches.get(c)
        if cache is None:
            continue
        for n in sorted(retained_new.get(c, ())):
            events.append(
                Event(
                    "LocalModelCache",
                    c,
                    cache.metadata.uid,
                    "Normal",
                    "RetainedInUse",
                    f"kept on node {n}: a running pod there uses it; removed once the pod is gone",
                )
            )
        if cache.metadata.deletion_timestamp:
            # Who lists it after the writes: nodes out of scope keep what they list now.
            after = (set(listed_now.get(c, nobody)) - node_scope) | listed_after.get(c, set())
            if FINALIZER in cache.metadata.finalizers and not after:
                finalizers.append(FinalizerWrite(c, add=False))
            continue
        if FINALIZER not in cache.metadata.finalizers:
            finalizers.append(FinalizerWrite(c, add=True))
        states = _node_states(snapshot, placed, cache, listed_next.get(c, set()))
        node_status[c] = states
        write, evs = _cache_status(snapshot, placed, cache, states, options.now, problems.get(c, ()))
        if write is not None:
            statuses.append(write)
        events.extend(evs)

    if scope is None:  # group status changes only with caches, groups or nodes: full reconciles
        for g in sorted(snapshot.groups):
            write = _group_status(snapshot.groups[g], placed)
            if write is not None:
                statuses.append(write)

    label_scope = (set(snapshot.nodes) | set(lmns)) if scope is None else node_scope | set(scope.labels)
    return Plan(
        nodes=tuple(node_writes),
        statuses=tuple(statuses),
        finalizers=tuple(finalizers),
        events=tuple(events),
        node_status=node_status,
        labels=tuple(label_writes(snapshot, label_scope, node_writes)),
        volumes=tuple(volume_writes(snapshot, placed.admission.admitted)),
    )


def _model_state(lmn: LocalModelNode | None, name: str) -> ModelState | None:
    # modelStatus is keyed by modelName (the cache's name), as KServe's agent writes it.
    return None if lmn is None else lmn.status.model_status.get(name)


def _node_writes(
    snapshot: Snapshot,
    placed: Layout,
    listed_next: Mapping[str, set[str]],
    node_scope: set[str],
) -> tuple[list[NodeWrite], dict[str, set[str]], dict[str, set[str]]]:
    """Per node in scope, its spec after this plan. Returns the writes, cache -> nodes listing it
    (nodes in scope only), and cache -> nodes that newly retain it for a pod."""
    writes: list[NodeWrite] = []
    listed_after: dict[str, set[str]] = {}
    retained_new: dict[str, set[str]] = {}
    lmns = snapshot.local_model_nodes
    for n in sorted(node_scope):
        lmn = lmns.get(n)
        node = snapshot.nodes.get(n)
        if node is None:
            if lmn is not None:
                # The owner reference makes the API server's garbage collector do this too; the
                # embedded backend has none, and a pod cannot run on a deleted node anyway.
                writes.append(NodeWrite(n, "delete"))
            continue
        wanted = placed.wanted.get(n, {})
        models: dict[str, LocalModelInfo] = {}
        for c, info in wanted.items():
            nodes = listed_next.get(c)
            if nodes is None:  # out of scope: keep what the node lists now
                if lmn is not None and any(m.model_name == c for m in lmn.local_models):
                    models[c] = info
            elif n in nodes:
                models[c] = info
        retained: list[str] = []
        in_use = snapshot.in_use.get(n, frozenset())
        previously = _retained(lmn)
        if lmn is not None:
            for m in lmn.local_models:
                if m.model_name not in models and m.model_name in in_use:
                    models[m.model_name] = m
                    retained.append(m.model_name)
                    if m.model_name not in previously:
                        retained_new.setdefault(m.model_name, set()).add(n)
        final = tuple(models[k] for k in sorted(models))
        for c in models:
            listed_after.setdefault(c, set()).add(n)
        if lmn is None:
            if n in placed.node_groups or final:
                writes.append(NodeWrite(n, "create", final, tuple(sorted(retained)), node.uid))
        elif final != lmn.local_models or tuple(sorted(retained)) != previously:
            writes.append(NodeWrite(n, "patch", final, tuple(sorted(retained))))
    return writes, listed_after, retained_new


def _retained(lmn: LocalModelNode | None) -> tuple[str, ...]:
    if lmn is None:
        return ()
    raw = lmn.metadata.annotations.get(RETAINED_ANNOTATION, "")
    return tuple(sorted(x for x in raw.split(",") if x))


def _node_states(
    snapshot: Snapshot, placed: Layout, cache: LocalModelCache, listed: set[str]
) -> dict[str, NodeState]:
    states: dict[str, NodeState] = {}
    for n in placed.holders.get(cache.name, ()):
        if n in snapshot.not_ready:
            states[n] = NodeState.NOT_READY
        elif n not in listed:
            states[n] = NodeState.DOWNLOAD_PENDING  # waiting for a rollout slot
        else:
            state = _model_state(snapshot.local_model_nodes.get(n), cache.name)
            states[n] = NodeState.DOWNLOAD_PENDING if state is None else _MODEL_TO_NODE[state]
    return states


def _cache_status(
    snapshot: Snapshot,
    placed: Layout,
    cache: LocalModelCache,
    states: Mapping[str, NodeState],
    now: str,
    problems: Iterable[ServingProblem] = (),
) -> tuple[StatusWrite | None, list[Event]]:
    old = cache.status
    available = sum(1 for s in states.values() if s is NodeState.DOWNLOADED)
    failed = sum(1 for s in states.values() if s is NodeState.DOWNLOAD_ERROR)
    total = len(states)
    refusals = {r.group: r for r in placed.admission.refused if r.cache == cache.name}
    usage = placed.admission.usage
    conditions: list[Condition] = []
    events: list[Event] = []
    old_conditions = {(c.type, c.node_group): c for c in old.conditions}

    def condition(ctype: str, group: str | None, ok: bool, reason: str, message: str) -> Condition:
        status = "True" if ok else "False"
        before = old_conditions.get((ctype, group))
        since = before.last_transition_time if before is not None and before.status == status else None
        return Condition(ctype, status, reason, message, since or now, group)

    def event(kind: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        events.append(Event("LocalModelCache", cache.name, cache.metadata.uid, kind, reason, message))

    for g in dict.fromkeys(cache.spec.node_groups):
        refusal: Refusal | None = refusals.get(g)
        if refusal is None:
            u = usage[g]
            admitted = condition(
                ADMITTED,
                g,
                True,
                ADMITTED,
                f"admitted to node group {g}: {human(u.used)} of {human(u.limit)} per node in use",
            )
            members = placed.members.get(g, ())
            ready = sum(1 for n in members if states.get(n) is NodeState.DOWNLOADED)
            errors = sum(1 for n in members if states.get(n) is NodeState.DOWNLOAD_ERROR)
            if not members:
                ready_c = condition(READY, g, False, "NoNodes", f"node group {g} selects no nodes")
            elif ready == len(members):
                ready_c = condition(READY, g, True, "Downloaded", f"{ready} of {len(members)} nodes hold it")
            elif errors:
                ready_c = condition(
                    READY,
                    g,
                    False,
                    "DownloadError",
                    f"{ready} of {len(members)} nodes hold it, {errors} failed",
                )
            else:
                ready_c = condition(
                    READY, g, False, "Downloading", f"{ready} of {len(members)} nodes hold it"
                )
        else:
            admitted = condition(ADMITTED, g, False, refusal.reason, refusal.message)
            ready_c = condition(READY, g, False, refusal.reason, refusal.message)
        before = old_conditions.get((ADMITTED, g))
        if before is None or (before.status, before.reason) != (admitted.status, admitted.reason):
            if admitted.status == "True":
                event("Normal", ADMITTED, admitted.message)
            else:
                event("Warning", admitted.reason, admitted.message)
        conditions += [admitted, ready_c]

    new_holders = sorted(set(states) - set(old.node_status))
    if new_holders:
        shown = ", ".join(new_holders[:5]) + (
            f" (+{len(new_holders) - 5} more)" if len(new_holders) > 5 else ""
        )
        event("Normal", "Placed", f"placed on {len(new_holders)} node(s): {shown}")
    for n, s in sorted(states.items()):
        if s is NodeState.DOWNLOAD_ERROR and old.node_status.get(n) is not NodeState.DOWNLOAD_ERROR:
            event("Warning", "CopyFailed", f"copy on node {n} failed{_error_detail(snapshot, n, cache)}")
    if total and available == total and not (old.copies.total and old.copies.available == old.copies.total):
        event("Normal", "AllCopiesReady", f"all {total} node(s) hold the model")

    for problem in problems:
        served = condition(SERVING, problem.group, False, problem.reason, problem.message)
        before = old_conditions.get((SERVING, problem.group))
        if before is None or (before.status, before.reason, before.message) != (
            served.status,
            served.reason,
            served.message,
        ):
            event("Warning", problem.reason, problem.message)
        conditions.append(served)

    refs = snapshot.inference_services.get(cache.name, ())
    new_json: dict[str, Any] = {
        "nodeStatus": {n: s.value for n, s in sorted(states.items())},
        "copies": {"available": available, "total": total, "failed": failed},
        "inferenceServices": [{"name": r.name, "namespace": r.namespace} for r in refs],
        "conditions": [c.to_json() for c in conditions],
        "observedGeneration": cache.metadata.generation,
    }
    old_json = old.to_json()
    current = {
        "nodeStatus": old_json.get("nodeStatus", {}),
        "copies": old_json.get("copies"),
        "inferenceServices": old_json.get("inferenceServices") or [],
        "conditions": old_json.get("conditions", []),
        "observedGeneration": old.observed_generation,
    }
    if current == new_json:
        return None, events
    patch = dict(new_json)
    # A merge patch merges maps: prune the entries of nodes that no longer hold the model.
    patch["nodeStatus"] = {**dict.fromkeys(old.node_status), **new_json["nodeStatus"]}
    if not refs:
        patch["inferenceServices"] = None  # absent when none, as KServe writes it
    typed = LocalModelCacheStatus(
        node_status=dict(sorted(states.items())),
        copies=Copies(available=available, total=total, failed=failed),
        inference_services=tuple(InferenceServiceRef(r.name, r.namespace) for r in refs),
        observed_generation=cache.metadata.generation,
        conditions=tuple(conditions),
    )
    return StatusWrite("LocalModelCache", cache.name, patch, typed), events


def _error_detail(snapshot: Snapshot, node: str, cache: LocalModelCache) -> str:
    lmn = snapshot.local_model_nodes.get(node)
    progress = None if lmn is None else lmn.status.models.get(cache.spec.storage_key)
    if progress is None or not (progress.reason or progress.message):
        return ""
    return ": " + ": ".join(x for x in (progress.reason, progress.message) if x)


def _group_status(group: LocalModelNodeGroup, placed: Layout) -> StatusWrite | None:
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


# -- readers of raw objects the typed views leave out (pure) --------------------------------------


def node_ready(node: Mapping[str, Any]) -> bool:
    """A Node's Ready condition; a Node with no conditions at all (a standalone document) is ready."""
    for c in (node.get("status") or {}).get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            return c.get("status") == "True"
    return True


def models_in_use(
    pods: Iterable[Mapping[str, Any]],
    caches: Iterable[LocalModelCache],
    groups: Iterable[LocalModelNodeGroup],
) -> dict[str, frozenset[str]]:
    """node -> caches that a pod on it uses: a pod that is not finished, bound to a node, and that
    names the cache (KServe's localmodel label, or our annotation), mounts its PVC (``<cache>-<group>``,
    KServe's name) or mounts its folder on the node."""
    caches = list(caches)
    by_claim: dict[str, str] = {}
    by_path: dict[str, str] = {}
    paths = {g.name: g.spec.cache_path for g in groups}
    for c in caches:
        for g in c.spec.node_groups:
            by_claim[f"{c.name}-{g}"] = c.name
            if (root := paths.get(g)) is not None:
                by_path[node_model_folder(root, c.spec.storage_key)] = c.name
    used: dict[str, set[str]] = {}
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        meta = pod.get("metadata") or {}
        found: set[str] = set()
        named = (meta.get("labels") or {}).get(LOCALMODEL_LABEL) or (meta.get("annotations") or {}).get(
            MODEL_ANNOTATION
        )
        if isinstance(named, str) and named:
            found.add(named)  # even for a cache already deleted: its copy stays while the pod runs
        for volume in spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim in by_claim:
                found.add(by_claim[claim])
            path = (volume.get("hostPath") or {}).get("path")
            if isinstance(path, str):
                path = path.rstrip("/")
                for prefix, owner in by_path.items():
                    if path == prefix or path.startswith(prefix + "/"):
                        found.add(owner)
        if found:
            used.setdefault(node, set()).update(found)
    return {n: frozenset(c) for n, c in used.items()}


# -- node labels: which models each node holds, ready ----------------------------------------------


def model_label(key: str) -> str:
    """The Node label that marks the model with storage key ``key`` downloaded on that node."""
    return MODEL_LABEL_PREFIX + key


def model_labels(labels: Mapping[str, str]) -> frozenset[str]:
    """The storage keys a Node's labels mark ready."""
    n = len(MODEL_LABEL_PREFIX)
    return frozenset(k[n:] for k, v in labels.items() if k.startswith(MODEL_LABEL_PREFIX) and v)


def ready_keys(lmn: LocalModelNode | None, models: Iterable[LocalModelInfo] | None = None) -> frozenset[str]:
    """Storage keys a node holds ready: listed in its spec (``models``, when a plan changes it) and
    reported ModelDownloaded by its agent."""
    if lmn is None:
        return frozenset()
    listed = lmn.local_models if models is None else models
    status = lmn.status.model_status
    return frozenset(m.storage_key for m in listed if status.get(m.model_name) is ModelState.DOWNLOADED)


def label_writes(
    snapshot: Snapshot, nodes: AbstractSet[str], node_writes: Iterable[NodeWrite] = ()
) -> list[LabelWrite]:
    """For each node in ``nodes`` that exists: the label changes that make its model labels equal
    to what it holds ready (after ``node_writes``: a model leaving a spec loses its label now)."""
    next_models = {w.name: w.models for w in node_writes if w.action != "delete"}
    out: list[LabelWrite] = []
    for n in sorted(nodes):
        if n not in snapshot.nodes:
            continue
        want = ready_keys(snapshot.local_model_nodes.get(n), next_models.get(n))
        have = snapshot.node_models.get(n, frozenset())
        if want != have:
            changes = {k: True for k in want - have} | {k: False for k in have - want}
            out.append(LabelWrite(n, {k: changes[k] for k in sorted(changes)}))
    return out


# -- serving: KServe's PVs and PVCs --------------------------------------------------------------


def claim_name(cache: str, group: str) -> str:
    """KServe's PVC name for a cached model served from a node group (in each serving namespace)."""
    return f"{cache}-{group}"


def volume_name(cache: str, group: str, namespace: str) -> str:
    """The PV behind claim ``<cache>-<group>`` in ``namespace`` (PVs are cluster-wide: one per
    namespace), unique for every (claim, namespace) and at most 253 characters: KServe's
    ``<cache>-<group>-<namespace>`` when the namespace has no ``-`` and the name fits (then the last
    ``-`` separates the namespace, so no two claims and namespaces share it), else
    ``<cache>-<group>-<namespace>`` cut to fit, ``.`` and 10 hex digits of a SHA-256 of claim and
    namespace (after its last ``.`` such a name has no ``-``, which a plain one always has: the two
    forms never meet)."""
    plain = f"{claim_name(cache, group)}-{namespace}"
    if "-" not in namespace and len(plain) <= MAX_NAME:
        return plain
    digest = hashlib.sha256(f"{claim_name(cache, group)}/{namespace}".encode()).hexdigest()[:10]
    return f"{plain[: MAX_NAME - 11].rstrip('-.')}.{digest}"


@dataclass(frozen=True)
class ServingProblem:
    """Why a cache is not served from a group (``group``) or in a namespace (``group`` None)."""

    cache: str
    group: str | None
    reason: str
    message: str


def serving_owners(
    caches: Iterable[LocalModelCache],
) -> tuple[dict[str, tuple[str, str]], list[ServingProblem]]:
    """Claim name -> the (cache, group) it serves, and the pairs that get none. Claim names are
    KServe's ``<cache>-<group>`` (KServe's InferenceService webhook mounts that name), so cache ``a-b``
    in group ``c`` and cache ``a`` in group ``b-c`` would share ``a-b-c``: the older cache (creation
    time, then name) keeps it, the other is not served from that group (``NAME_COLLISION``, naming
    both). A name over 253 characters cannot be a claim's (``NAME_TOO_LONG``). Caches being deleted
    hold their names until they are gone."""
    owners: dict[str, tuple[str, str]] = {}
    problems: list[ServingProblem] = []
    for cache in sorted(caches, key=age_key):
        for g in cache.spec.node_groups:
            name = claim_name(cache.name, g)
            if len(name) > MAX_NAME:
                problems.append(
                    ServingProblem(
                        cache.name,
                        g,
                        NAME_TOO_LONG,
                        f"its serving claim name {name[:60]!r}... is {len(name)} characters, over "
                        f"{MAX_NAME}: shorten the cache's or node group {g}'s name",
                    )
                )
            elif name in owners:
                other, other_group = owners[name]
                problems.append(
                    ServingProblem(
                        cache.name,
                        g,
                        NAME_COLLISION,
                        f"its serving claim {name!r} (<cache>-<group>) from node group {g} is already "
                        f"that of LocalModelCache {other!r} from node group {other_group}, which is older: "
                        f"{cache.name!r} is not served from {g}; rename one of the caches or groups",
                    )
                )
            else:
                owners[name] = (cache.name, g)
    return owners, problems


def namespace_error(namespace: str) -> str | None:
    """Why the controller does not serve in ``namespace`` (a namespace name: a DNS-1123 label of at
    most 63 characters, not Kubernetes' own ``kube-system``, ``kube-public``, ``kube-node-lease``
    nor modelcache's ``modelcache-*``), or None when it does."""
    if not _DNS_LABEL.fullmatch(namespace):
        return (
            f"{namespace[:80]!r} is not a namespace name (lowercase letters, digits and '-', "
            "at most 63, starting and ending with a letter or digit)"
        )
    if namespace in RESERVED_NAMESPACES or namespace.startswith(RESERVED_NAMESPACE_PREFIX):
        return f"{namespace!r} is a namespace of Kubernetes or modelcache, never served in"
    return None


def serving_namespaces(cache: LocalModelCache) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The namespaces the cache's ``SERVING_NAMESPACES_ANNOTATION`` lists (comma-separated, spaces
    around names ignored), and one message per entry that is not a namespace it may serve in (an
    empty entry, as in ``a,,b``, included); an absent or empty annotation lists none."""
    raw = cache.metadata.annotations.get(SERVING_NAMESPACES_ANNOTATION, "")
    if not raw.strip():
        return (), ()
    good: list[str] = []
    bad: list[str] = []
    for i, entry in enumerate(x.strip() for x in raw.split(",")):
        why = "an empty entry" if not entry else namespace_error(entry)
        if why is None:
            good.append(entry)
        else:
            bad.append(f"metadata.annotations[{SERVING_NAMESPACES_ANNOTATION}] entry {i + 1}: {why}")
    return tuple(dict.fromkeys(good)), tuple(bad)


def serving_problems(
    caches: Mapping[str, LocalModelCache], groups: Mapping[str, LocalModelNodeGroup]
) -> dict[str, list[ServingProblem]]:
    """cache -> what keeps it from being served (:func:`serving_owners`, :func:`serving_namespaces`,
    a group that names no folder: its nodes hold the model, but no serving volume can be made)."""
    out: dict[str, list[ServingProblem]] = {}
    for problem in serving_owners(caches.values())[1]:
        out.setdefault(problem.cache, []).append(problem)
    for cache in caches.values():
        for g in cache.spec.node_groups:
            group = groups.get(g)
            if group is not None and group.spec.cache_path is None:
                message = (
                    f"node group {g} {NO_FOLDER}; its nodes hold the model, but no serving volume is made"
                )
                out.setdefault(cache.name, []).append(ServingProblem(cache.name, g, NO_CACHE_FOLDER, message))
    for cache in caches.values():
        bad = serving_namespaces(cache)[1]
        if bad:
            message = "; ".join(bad) + " (skipped; the others are served)"
            out.setdefault(cache.name, []).append(
                ServingProblem(cache.name, None, INVALID_NAMESPACE, message)
            )
    return out


def serving_demands(
    pods: Iterable[Mapping[str, Any]], caches: Mapping[str, LocalModelCache]
) -> set[ServingDemand]:
    """What pods ask to be served: a pod not finished that names a cache (KServe's localmodel label
    or our annotation; its group from ``serving.kserve.io/nodegroup``), or mounts a claim named
    ``<cache>-<group>`` of a cache that lists that group."""
    by_claim = serving_owners(caches.values())[0]
    out: set[ServingDemand] = set()
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        meta = pod.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        annotations = meta.get("annotations") or {}
        named = (meta.get("labels") or {}).get(LOCALMODEL_LABEL) or annotations.get(MODEL_ANNOTATION)
        if isinstance(named, str) and named:
            group = annotations.get(NODEGROUP_ANNOTATION)
            out.add(ServingDemand(named, group if isinstance(group, str) and group else None, ns))
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if isinstance(claim, str) and claim in by_claim:
                c, g = by_claim[claim]
                out.add(ServingDemand(c, g, ns))
    return out


def isvc_caches(isvc: Mapping[str, Any], caches: Mapping[str, LocalModelCache]) -> frozenset[str]:
    """The caches an InferenceService uses: the one KServe's webhook names in its
    ``internal.serving.kserve.io/localmodel`` label, and those whose ``sourceModelUri`` covers a
    predictor's ``storageUri`` (the same URI, or a path below it, as KServe matches them)."""
    meta = isvc.get("metadata") or {}
    out: set[str] = set()
    named = (meta.get("labels") or {}).get(LOCALMODEL_LABEL)
    if isinstance(named, str) and named in caches:
        out.add(named)
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    uris = [predictor.get("storageUri")] + [
        part.get("storageUri") for part in predictor.values() if isinstance(part, Mapping)
    ]
    for uri in uris:
        if not isinstance(uri, str) or not uri:
            continue
        for c in caches.values():
            base = c.spec.source_model_uri.rstrip("/")
            if uri == c.spec.source_model_uri or uri.startswith(base + "/"):
                out.add(c.name)
    return frozenset(out)


def volume_writes(snapshot: Snapshot, admitted: Mapping[str, tuple[str, ...]]) -> list[VolumeWrite]:
    """Create the serving PV and PVC of every (cache, group, namespace) that is served and whose
    group admits the cache; delete the controller's others (claims first)."""
    wanted: dict[tuple[str, str, str], None] = {}
    owners = serving_owners(snapshot.caches.values())[0]

    def want(cache_name: str, group: str | None, namespace: str) -> None:
        cache = snapshot.caches.get(cache_name)
        if cache is None or cache.metadata.deletion_timestamp:
            return
        if group is None:
            group = cache.spec.node_groups[0]
        if owners.get(claim_name(cache_name, group)) != (cache_name, group) or namespace_error(namespace):
            return  # a name another cache holds, or a namespace never served in
        folder = snapshot.groups.get(group)
        if folder is None or folder.spec.cache_path is None:
            return  # no folder on the node to serve from
        if group in cache.spec.node_groups and cache_name in admitted.get(group, ()):
            wanted[(cache_name, group, namespace)] = None

    for d in snapshot.serving:
        want(d.cache, d.group, d.namespace)
    for ref in (*snapshot.claims.values(), *snapshot.volumes.values()):
        if not ref.deleting:  # once made, kept while the cache is admitted to that group
            want(ref.cache, ref.group, ref.namespace)
    for cache in snapshot.caches.values():
        for ns in serving_namespaces(cache)[0]:
            for g in cache.spec.node_groups:
                want(cache.name, g, ns)

    out: list[VolumeWrite] = []
    wanted_claims = {(ns, claim_name(c, g)) for c, g, ns in wanted}
    wanted_volumes = {volume_name(c, g, ns) for c, g, ns in wanted}
    for (ns, name), ref in sorted(snapshot.claims.items()):
        if (ns, name) not in wanted_claims and not ref.deleting:
            out.append(VolumeWrite("PersistentVolumeClaim", "delete", name, ns))
    for name, ref in sorted(snapshot.volumes.items()):
        if name not in wanted_volumes and not ref.deleting:
            out.append(VolumeWrite("PersistentVolume", "delete", name))
    # A pair made from a group's volume specs that have changed since (its path, its affinity) is made
    # again: the claim and the volume go (the claim first), then the wanted ones are created anew.
    # Kubernetes keeps a claim that pods mount until they are gone, so this waits for them.
    digests = {g: _volume_digest(snapshot.groups[g]) for g in {g for _, g, _ in wanted}}
    for c, g, ns in sorted(wanted):
        pv = snapshot.volumes.get(volume_name(c, g, ns))
        pvc = snapshot.claims.get((ns, claim_name(c, g)))
        # A pair without a digest predates the fixed template (the group's whole folder, as KServe
        # makes it): made again too.
        # A claim bound to a volume of another name (made before PV names were unique) too.
        stale_claim = pvc is not None and pvc.volume is not None and pvc.volume != volume_name(c, g, ns)
        if stale_claim or any(ref is not None and ref.digest != digests[g] for ref in (pv, pvc)):
            if pvc is not None and not pvc.deleting:
                out.append(VolumeWrite("PersistentVolumeClaim", "delete", claim_name(c, g), ns))
            if pv is not None and not pv.deleting:
                out.append(VolumeWrite("PersistentVolume", "delete", volume_name(c, g, ns)))
    for c, g, ns in sorted(wanted):
        cache, group = snapshot.caches[c], snapshot.groups[g]
        pv_name = volume_name(c, g, ns)
        if pv_name not in snapshot.volumes:
            out.append(VolumeWrite("PersistentVolume", "create", pv_name, body=volume_body(cache, group, ns)))
        if (ns, claim_name(c, g)) not in snapshot.claims:
            out.append(
                VolumeWrite(
                    "PersistentVolumeClaim",
                    "create",
                    claim_name(c, g),
                    ns,
                    body=claim_body(cache, group, ns),
                )
            )
    return out


def _volume_meta(
    cache: LocalModelCache, group: LocalModelNodeGroup, namespace: str, name: str
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY},
        "annotations": {
            VOLUME_CACHE_ANNOTATION: cache.name,
            VOLUME_GROUP_ANNOTATION: group.name,
            VOLUME_NAMESPACE_ANNOTATION: namespace,
            VOLUME_SPEC_ANNOTATION: _volume_digest(group),
        },
    }
    if cache.metadata.uid:
        # Collected with the cache on a real cluster, as KServe's are; the controller also deletes
        # them itself when the group goes (a second owner would keep them alive, not end them).
        meta["ownerReferences"] = [
            {
                "apiVersion": cache.kind.api_version,
                "kind": cache.kind.kind,
                "name": cache.name,
                "uid": cache.metadata.uid,
                "blockOwnerDeletion": False,
            }
        ]
    return meta


# The serving PV's template: bump when it changes, so pairs made from an older one are made again.
VOLUME_TEMPLATE = "2"


def volume_body(cache: LocalModelCache, group: LocalModelNodeGroup, namespace: str) -> dict[str, Any]:
    """The serving PV ``<cache>-<group>-<namespace>``, from a fixed template: nothing of the group's
    ``persistentVolumeSpec`` is copied but the kind of folder (``hostPath`` or ``local``, checked by
    :class:`LocalModelNodeGroupSpec`), its path, which the volume narrows to this one model's folder
    ``<path>/models/<key>`` (``type: Directory``: never created by the kubelet), and the node
    affinity that places pods on the group's nodes. ``ReadOnlyMany``, reclaim policy Retain (the agent
    owns the folder), pre-bound to its claim.

    KServe's pod mutator mounts the claim with ``subPath: models/<key>[/<path>]``
    (pkg/webhook/admission/pod/storage_initializer_injector.go:744-746 and :551 at KServe v0.20),
    which under this volume's root would name ``<path>/models/<key>/models/<key>``: the pod webhook
    rewrites such a mount to the volume's root (:func:`controller.admission.serving_mounts`).

    Raises ValueError for a group without a folder (the plan never asks for one).
    """
    source, root = group.spec.volume_source, group.spec.cache_path
    if source is None or root is None:
        raise ValueError(f"node group {group.name!r} names no hostPath or local folder")
    path = node_model_folder(root, cache.spec.storage_key)
    spec: dict[str, Any] = {
        "capacity": {"storage": group.spec.storage_limit.to_json()},
        "accessModes": ["ReadOnlyMany"],
        "volumeMode": "Filesystem",
        "storageClassName": _storage_class(group),
        "persistentVolumeReclaimPolicy": "Retain",
        source: {"path": path, "type": "Directory"} if source == "hostPath" else {"path": path},
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": namespace,
            "name": claim_name(cache.name, group.name),
        },
    }
    required = (group.spec.persistent_volume_spec.get("nodeAffinity") or {}).get("required")
    if required is not None:
        spec["nodeAffinity"] = {"required": copy.deepcopy(required)}
    meta = _volume_meta(cache, group, namespace, volume_name(cache.name, group.name, namespace))
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": meta, "spec": spec}


def claim_body(cache: LocalModelCache, group: LocalModelNodeGroup, namespace: str) -> dict[str, Any]:
    """The PVC ``<cache>-<group>``, from a fixed template bound to its PV by name: ``ReadOnlyMany``,
    the PV's storage class and capacity (nothing else of the group's persistentVolumeClaimSpec: a
    ``dataSource`` or a ``selector`` there would ask for something the controller did not build)."""
    spec = {
        "accessModes": ["ReadOnlyMany"],
        "volumeMode": "Filesystem",
        "storageClassName": _storage_class(group),  # must equal the PV's for them to bind
        "resources": {"requests": {"storage": group.spec.storage_limit.to_json()}},
        "volumeName": volume_name(cache.name, group.name, namespace),
    }
    meta = _volume_meta(cache, group, namespace, claim_name(cache.name, group.name))
    meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def _storage_class(group: LocalModelNodeGroup) -> str:
    pvc, pv = group.spec.persistent_volume_claim_spec, group.spec.persistent_volume_spec
    name = pvc.get("storageClassName") or pv.get("storageClassName") or ""
    return name if isinstance(name, str) else ""


def _volume_digest(group: LocalModelNodeGroup) -> str:
    """What a serving PV and PVC are made from on the group's side (the cache's name and the
    namespace are in their names), with the template's version: a change means they are made again."""
    spec = group.spec
    made_from = [
        VOLUME_TEMPLATE,
        spec.volume_source,
        spec.cache_path,
        (spec.persistent_volume_spec.get("nodeAffinity") or {}).get("required"),
        _storage_class(group),
        spec.storage_limit.to_json(),
    ]
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]


def volume_ref(obj: Mapping[str, Any]) -> VolumeRef | None:
    """What a PV or PVC the controller made serves; None for any other."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
        return None
    a = meta.get("annotations") or {}
    cache, group, ns = (
        a.get(k) for k in (VOLUME_CACHE_ANNOTATION, VOLUME_GROUP_ANNOTATION, VOLUME_NAMESPACE_ANNOTATION)
    )
    if not (isinstance(cache, str) and isinstance(group, str) and isinstance(ns, str)):
        return None
    digest = a.get(VOLUME_SPEC_ANNOTATION)
    volume = (obj.get("spec") or {}).get("volumeName")  # claims only (list items carry no kind)
    return VolumeRef(
        cache,
        group,
        ns,
        deleting=bool(meta.get("deletionTimestamp")),
        digest=digest if isinstance(digest, str) else None,
        volume=volume if isinstance(volume, str) and volume else None,
    )
