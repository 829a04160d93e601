"""What the controller's planner reads and writes, frozen: the :class:`Snapshot` of the cluster, the
:class:`Options`, the :class:`Scope` of an incremental pass, and the :class:`Plan` of writes with
its parts. No I/O and no decisions beyond building these (``controller.plan`` decides).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

from localmodel.resources import (
    InferenceServiceRef,
    LocalModelCache,
    LocalModelCacheStatus,
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeGroup,
    ModelState,
    Node,
    NodeState,
    cache_key,
)

RETAINED_ANNOTATION = "modelcache.io/retained-in-use"  # on a LocalModelNode: models kept for a pod
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 8
DEFAULT_ORIGIN_SEEDS = 1
DEFAULT_PEERS_PER_MODEL = 4


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS  # 0: no limit
    now: str = "1970-01-01T00:00:00Z"  # for condition transition times
    # Peer fill (controller.peers): nodes that start a model no peer has bytes of, and the most
    # peers one spec entry names.
    origin_seeds: int = DEFAULT_ORIGIN_SEEDS
    peers_per_model: int = DEFAULT_PEERS_PER_MODEL


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
    """The cluster as the controller sees it, keyed by name; caches (LocalModelCaches and
    LocalModelNamespaceCaches alike) by :attr:`LocalModelCache.key`, and every "cache" below is
    such a key."""

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
    # Names another party's PV or PVC holds (KServe's serving claims, learnt from a create answered
    # 409): a serving pair that would take one is not made, so it is not tried again every pass.
    taken_volumes: frozenset[str] = frozenset()  # PV names
    taken_claims: frozenset[tuple[str, str]] = frozenset()  # (namespace, PVC name)
    # cache -> the InferenceServices that use it (KServe's status.inferenceServices), sorted
    inference_services: Mapping[str, tuple[InferenceServiceRef, ...]] = field(default_factory=dict)
    # cache -> the LLMInferenceServices that use it (KServe's status.llmInferenceServices), sorted
    llm_inference_services: Mapping[str, tuple[InferenceServiceRef, ...]] = field(default_factory=dict)
    # stored groups whose spec is refused (KServe's CRDs have no rules), name -> why: left out of
    # ``groups``, and a cache that lists one is told so
    invalid_groups: Mapping[str, str] = field(default_factory=dict)


def listing(lmns: Iterable[LocalModelNode]) -> dict[str, set[str]]:
    """cache key -> nodes whose LocalModelNode spec lists it."""
    out: dict[str, set[str]] = {}
    for lmn in lmns:
        for m in lmn.local_models:
            out.setdefault(m.status_key, set()).add(lmn.name)
    return out


# -- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeWrite:
    """Create, patch or delete one LocalModelNode (named after its node)."""

    name: str
    action: Literal["create", "patch", "delete"]
    models: tuple[LocalModelInfo, ...] = ()
    retained: tuple[str, ...] = ()  # cache names kept only because a running pod uses them
    node_uid: str | None = None  # for the owner reference on create


CacheKind = Literal["LocalModelCache", "LocalModelNamespaceCache", "LocalModelNodeGroup"]


@dataclass(frozen=True)
class StatusWrite:
    kind: CacheKind
    name: str
    patch: Mapping[str, Any]  # JSON merge patch of status (None deletes a key)
    # The status it makes, typed (caches): what the view takes after the write, unparsed.
    status: LocalModelCacheStatus | None = None
    namespace: str | None = None  # a LocalModelNamespaceCache's

    @property
    def key(self) -> str:
        """The view's key of the object (:func:`localmodel.resources.cache_key`)."""
        return cache_key(self.name, self.namespace)


@dataclass(frozen=True)
class FinalizerWrite:
    cache: str  # its key
    add: bool  # False: remove it, the cache's models are gone from every node spec


@dataclass(frozen=True)
class Event:
    kind: CacheKind
    name: str
    uid: str | None
    type: Literal["Normal", "Warning"]
    reason: str
    message: str
    namespace: str | None = None  # a LocalModelNamespaceCache's: its Events live there


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


def model_state(lmn: LocalModelNode | None, name: str) -> ModelState | None:
    """The state a node's agent reports for cache key ``name`` (None: none yet, or no such node)."""
    # modelStatus is keyed by modelName, or <namespace>/<modelName> for a namespace cache, as
    # KServe's agent writes it (LocalModelInfo.GetStatusKey, local_model_node_types.go:41-49 at v0.20).
    return None if lmn is None else lmn.status.model_status.get(name)


def merged_use(pod_use: Iterable[tuple[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    """node -> caches pods use there, from (node, caches) per pod (``Snapshot.in_use``)."""
    merged: dict[str, set[str]] = {}
    for node, caches in pod_use:
        merged.setdefault(node, set()).update(caches)
    return {n: frozenset(c) for n, c in merged.items()}


def isvc_refs(
    isvc_use: Mapping[tuple[str, str], AbstractSet[str]],
) -> dict[str, tuple[InferenceServiceRef, ...]]:
    """cache -> the InferenceServices that use it, sorted by (namespace, name), from (namespace,
    name) -> caches per InferenceService (``Snapshot.inference_services``)."""
    refs: dict[str, list[InferenceServiceRef]] = {}
    for (namespace, name), used in sorted(isvc_use.items()):
        for c in used:
            refs.setdefault(c, []).append(InferenceServiceRef(name, namespace))
    return {c: tuple(r) for c, r in refs.items()}
