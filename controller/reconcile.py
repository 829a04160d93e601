"""The controller's I/O: keep a view of the cluster from watches, run :func:`controller.plan.plan`
over it, apply the writes it returns.

Level-triggered: every change only marks what is dirty; the loop then plans from the whole view, so
a missed or coalesced event loses nothing, and a periodic full resync repairs anything else. A
change of caches, groups or node labels re-plans everything (placement depends on all of them); a
change of one LocalModelNode or pod re-plans only that node and the models it holds, which is what
keeps a status update from a 5,000-node cluster cheap. Status-only echoes of the controller's own
writes, and Node heartbeats, change nothing the plan reads and are dropped on arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.labels import MODEL_LABEL_VALUE, model_label
from controller.metrics import ControllerMetrics
from controller.plan import plan
from controller.rollout import models_in_use
from controller.serving import MANAGED_BY, MANAGED_BY_LABEL, serving_demands, volume_ref
from controller.snapshot import (
    DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    RETAINED_ANNOTATION,
    Event,
    LabelWrite,
    NodeWrite,
    Options,
    Plan,
    Scope,
    ServingDemand,
    Snapshot,
    StatusWrite,
    VolumeRef,
    VolumeWrite,
    isvc_refs,
    merged_use,
)
from controller.status import copies_by_group, isvc_caches
from controller.views import InferenceService, NodeView, Pod
from localmodel.errors import AlreadyExists, ClusterStateError, Conflict, NotFound, SpecError
from localmodel.events import event_body
from localmodel.placement import Layout, layout
from localmodel.resources import (
    FINALIZER,
    Copies,
    InferenceServiceRef,
    LocalModelCache,
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeGroup,
    LocalModelNodeStatus,
    Node,
    ObjectMeta,
    cluster_group,
)
from localmodel.state.base import (
    EVENT,
    INFERENCE_SERVICE,
    JSON,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    ClusterState,
    ResourceKind,
    Selector,
    WatchEvent,
    merge_patch,
    update_status,
    watch,
)

log = logging.getLogger("modelcache.controller")

COMPONENT = "modelcache-controller"
# The field manager an API server names for our writes (our User-Agent starts with it).
FIELD_MANAGER = COMPONENT
CONTESTED = "SpecContested"  # the LocalModelNode condition and Event reason of item "another writer"
WATCHED: tuple[ResourceKind, ...] = (
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    LOCAL_MODEL_NODE,
    POD,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    INFERENCE_SERVICE,
)
# Watched where their API exists: without KServe there are no InferenceServices to report.
OPTIONAL: frozenset[ResourceKind] = frozenset({INFERENCE_SERVICE})
# Only the PVs and PVCs the controller made are its business: watched by their label.
SELECTORS: dict[ResourceKind, Selector] = {
    PERSISTENT_VOLUME: Selector(labels={MANAGED_BY_LABEL: MANAGED_BY}),
    PERSISTENT_VOLUME_CLAIM: Selector(labels={MANAGED_BY_LABEL: MANAGED_BY}),
}
_KINDS = {LOCAL_MODEL_CACHE.kind: LOCAL_MODEL_CACHE, LOCAL_MODEL_NODE_GROUP.kind: LOCAL_MODEL_NODE_GROUP}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Settings:
    max_concurrent_downloads: int = DEFAULT_MAX_CONCURRENT_DOWNLOADS
    event_namespace: str = "default"  # where Kubernetes keeps Events of cluster-scoped objects
    optional_retry: float = 60.0  # seconds between looks for an API the cluster lacks (KServe's)
    retry_max: float = 30.0  # seconds: the cap of a failed reconcile's (and a watch's) doubling retry
    field_manager: str = FIELD_MANAGER
    # Another writer changing a LocalModelNode's spec this many times within this many seconds is
    # a fight, not an edit: a condition and a Warning Event on the LocalModelNode name it.
    contest_count: int = 3
    contest_window: float = 600.0
    clock: Callable[[], str] = utc_now
    # Standalone (--standalone): scratch folders (/tmp) may hold a group's cache, as in the agent's.
    standalone: bool = False


@dataclass
class _View:
    """The controller's picture of the cluster: typed objects by name, fed by lists and watches."""

    caches: dict[str, LocalModelCache] = field(default_factory=dict)
    groups: dict[str, LocalModelNodeGroup] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    not_ready: set[str] = field(default_factory=set)
    lmns: dict[str, LocalModelNode] = field(default_factory=dict)
    listed: dict[str, set[str]] = field(default_factory=dict)  # cache -> nodes whose spec lists it
    pods: dict[tuple[str, str], Pod] = field(default_factory=dict)
    pod_use: dict[tuple[str, str], tuple[str, frozenset[str]]] = field(default_factory=dict)
    pod_serving: dict[tuple[str, str], frozenset[ServingDemand]] = field(default_factory=dict)
    node_models: dict[str, frozenset[str]] = field(default_factory=dict)  # node -> keys labelled ready
    volumes: dict[str, VolumeRef] = field(default_factory=dict)  # the PVs we made, by name
    claims: dict[tuple[str, str], VolumeRef] = field(default_factory=dict)  # our PVCs, (namespace, name)
    isvcs: dict[tuple[str, str], InferenceService] = field(default_factory=dict)  # (namespace, name) ->
    invalid_groups: dict[str, str] = field(default_factory=dict)  # stored, spec refused: name -> why
    isvc_use: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)  # -> caches it uses


def _repointed_owners(lmn: LocalModelNode | None, node: Node | None) -> list[JSON] | None:
    """The LocalModelNode's ownerReferences with its Node's entry (same name, kind Node) given the
    Node's current uid, or None when nothing is to change (no such entry, or it is current)."""
    if lmn is None or node is None or not node.uid:
        return None
    refs = lmn.metadata.raw.get("ownerReferences")
    if not isinstance(refs, list):
        return None
    changed = False
    out: list[JSON] = []
    for ref in refs:
        if (
            isinstance(ref, dict)
            and ref.get("kind") == "Node"
            and ref.get("name") == lmn.metadata.name
            and ref.get("uid") != node.uid
        ):
            ref, changed = {**ref, "uid": node.uid}, True
        out.append(ref)
    return out if changed else None


class Controller:
    """One controller over one ClusterState. ``observe`` takes watch events, ``reconcile`` plans and
    writes; ``run`` wires both to the watches with a periodic full resync."""

    def __init__(
        self,
        state: ClusterState,
        settings: Settings | None = None,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.state = state
        self.settings = settings or Settings()
        self.metrics = metrics
        self._copies: dict[str, dict[str, Copies]] = {}  # cache -> group -> copies, for the metrics
        self._refresh = refresh  # standalone: reload the documents before each full resync
        self._view = _View()
        self._layout: Layout | None = None
        self._in_use: dict[str, frozenset[str]] | None = None
        self._serving: frozenset[ServingDemand] | None = None
        self._isvc_refs: dict[str, tuple[InferenceServiceRef, ...]] | None = None  # cache ->
        self._missing: set[ResourceKind] = set()  # optional kinds whose API this cluster lacks
        self._full = True
        self._dirty_nodes: set[str] = set()
        # LocalModelNodes whose Node owner reference names another uid than the Node's (the Node
        # was re-created under the same name): re-pointed, lest the garbage collector delete them.
        self._stale_owners: set[str] = set()
        self._dirty_caches: set[str] = set()
        self._dirty_labels: set[str] = set()
        self._volumes_dirty = False
        self._incomplete = False  # a write of the last reconcile gave up: retried on the timer
        self._ours: dict[str, int] = {}  # LocalModelNode -> generation of our last spec write
        self._foreign: dict[str, deque[float]] = {}  # LocalModelNode -> when others rewrote its spec
        self._contested: dict[str, str] = {}  # LocalModelNode -> the other writer, to be reported
        self._reported: dict[tuple[str, str], float] = {}  # (node, writer) -> when last reported
        self.reconciles = 0

    # -- the view ------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read everything (a full list of each watched kind) into a fresh view."""
        self._view = _View()
        self._invalidate()
        for kind in WATCHED:
            try:
                listing = await self.state.list(kind, selector=SELECTORS.get(kind))
            except NotFound:
                if kind not in OPTIONAL:
                    raise
                self._lacks(kind)
                continue
            for obj in listing.items:
                self.observe(kind, WatchEvent("ADDED", obj))
        self._full = True

    def observe(self, kind: ResourceKind, event: WatchEvent) -> None:
        """Take one change into the view, and mark what the next reconcile must look at."""
        obj = event.object
        name = obj.get("metadata", {}).get("name")
        if not isinstance(name, str):
            return
        deleted = event.type == "DELETED"
        try:
            if kind is LOCAL_MODEL_CACHE:
                self._observe_spec(
                    self._view.caches, name, None if deleted else LocalModelCache.from_json(obj)
                )
            elif kind is LOCAL_MODEL_NODE_GROUP:
                self._observe_group(name, None if deleted else obj)
            elif kind is NODE:
                self._observe_node(name, None if deleted else obj)
            elif kind is LOCAL_MODEL_NODE:
                lmn = None if deleted else LocalModelNode.from_json(obj)
                if lmn is not None:
                    self._check_writer(name, self._view.lmns.get(name), lmn, obj)
                self._observe_lmn(name, lmn)
                self._check_owner(name)
            elif kind is POD:
                self._observe_pod(obj, deleted)
            elif kind is PERSISTENT_VOLUME or kind is PERSISTENT_VOLUME_CLAIM:
                self._observe_volume(kind, obj, deleted)
            elif kind is INFERENCE_SERVICE:
                self._observe_isvc(obj, deleted)
        except SpecError as e:
            # One bad object must not stop the controller for everyone else; it is left out.
            log.warning("ignoring %s %s: %s", kind.kind, name, e)

    def _observe_group(self, name: str, obj: JSON | None) -> None:
        """A group whose spec is refused (stored past admission: KServe's CRDs have no rules) holds
        nothing, and the caches that list it say why (not that it does not exist)."""
        group, why = None, None
        if obj is not None:
            try:
                group = cluster_group(obj, cluster=not self.settings.standalone)
            except SpecError as e:
                group, why = None, str(e)
                log.warning("ignoring LocalModelNodeGroup %s: %s", name, e)
        invalid = self._view.invalid_groups
        if invalid.get(name) != why:
            if why is None:
                invalid.pop(name, None)
            else:
                invalid[name] = why
            self._invalidate()
        self._observe_spec(self._view.groups, name, group)

    def _observe_lmn(self, name: str, new: LocalModelNode | None) -> None:
        old = self._view.lmns.get(name)
        self._set_lmn(name, new)
        if old is None or new is None or old.status.model_status != new.status.model_status:
            self._dirty_labels.add(name)  # which models it holds ready: its node labels
        if (
            old is None
            or new is None
            or old.local_models != new.local_models
            or old.metadata.annotations != new.metadata.annotations
        ):
            self._dirty_nodes.add(name)  # not our own write's echo: re-plan the whole node
            return
        # An agent's report: only the models whose state changed need a look (pacing and status).
        before, after = old.status.model_status, new.status.model_status
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        for m in new.local_models:
            if m.model_name in changed:
                self._dirty_caches.add(m.model_name)

    def _check_writer(self, name: str, old: LocalModelNode | None, new: LocalModelNode, obj: JSON) -> None:
        """Count spec changes of a LocalModelNode that are not ours: a generation past the one our
        last write made, with other models than we left there. Enough of them within the window
        mark the node for a condition and a Warning Event naming the writer (from managedFields)."""
        ours = self._ours.get(name)
        generation = new.metadata.generation
        if ours is None or generation is None or generation <= ours:
            return
        if old is not None and old.local_models == new.local_models:
            return
        now = time.monotonic()
        times = self._foreign.setdefault(name, deque())
        times.append(now)
        while times and times[0] < now - self.settings.contest_window:
            times.popleft()
        writer = other_writer(obj, self.settings.field_manager)
        log.info("LocalModelNode %s: spec changed by %s (generation %d)", name, writer, generation)
        if len(times) >= self.settings.contest_count:
            self._contested[name] = writer

    def _check_owner(self, name: str) -> None:
        if _repointed_owners(self._view.lmns.get(name), self._view.nodes.get(name)) is not None:
            self._stale_owners.add(name)
        else:
            self._stale_owners.discard(name)

    async def _write_owners(self) -> None:
        for name in sorted(self._stale_owners):
            lmn = self._view.lmns.get(name)
            refs = _repointed_owners(lmn, self._view.nodes.get(name))
            if lmn is None or refs is None:
                self._stale_owners.discard(name)
                continue
            try:
                # Guarded by the version the refs were read from: a merge patch replaces the list.
                stored = await self.state.patch(
                    LOCAL_MODEL_NODE,
                    name,
                    {"metadata": {"ownerReferences": refs}},
                    resource_version=lmn.metadata.resource_version,
                )
            except (NotFound, Conflict):
                continue  # its watch event brings the newer object, and the check again
            self._stale_owners.discard(name)
            log.info("LocalModelNode %s: owner reference moved to the re-created Node", name)
            self._wrote(LOCAL_MODEL_NODE.kind)
            self.observe(LOCAL_MODEL_NODE, WatchEvent("MODIFIED", stored))

    def _set_lmn(self, name: str, lmn: LocalModelNode | None) -> None:
        """Keep the view and its cache -> nodes index in step."""
        view = self._view
        old = view.lmns.pop(name, None)
        if old is not None:
            for m in old.local_models:
                nodes = view.listed.get(m.model_name)
                if nodes is not None:
                    nodes.discard(name)
                    if not nodes:
                        del view.listed[m.model_name]
        if lmn is not None:
            view.lmns[name] = lmn
            for m in lmn.local_models:
                view.listed.setdefault(m.model_name, set()).add(name)

    def _observe_spec(self, store: dict[str, Any], name: str, new: Any) -> None:
        old = store.get(name)
        if new is None:
            if store.pop(name, None) is not None:
                self._invalidate()
            return
        store[name] = new
        # Our own status writes come back as MODIFIED: only what placement reads re-plans.
        if old is None or old.spec != new.spec or _meta_key(old) != _meta_key(new):
            self._invalidate()
        elif isinstance(new, LocalModelCache) and (
            old.status != new.status or old.metadata.finalizers != new.metadata.finalizers
        ):
            self._dirty_caches.add(name)  # e.g. someone else changed its status: put ours back
        if (
            isinstance(new, LocalModelCache)
            and old is not None
            and old.metadata.annotations != new.metadata.annotations
        ):
            self._volumes_dirty = True  # its serving namespaces

    def _observe_node(self, name: str, obj: JSON | None) -> None:
        view = self._view
        if obj is None:
            view.node_models.pop(name, None)
            if view.nodes.pop(name, None) is not None:
                view.not_ready.discard(name)
                self._invalidate()
            return
        parsed = NodeView.from_json(obj)
        node, models, ready = parsed.node, parsed.models, parsed.ready
        if view.node_models.get(name, frozenset()) != models:
            view.node_models[name] = models
            self._dirty_labels.add(name)  # someone else changed them: put ours back
        old = view.nodes.get(name)
        view.nodes[name] = node
        if old is None or old.labels != node.labels or old.uid != node.uid:
            self._invalidate()
            self._check_owner(name)
        if ready == (name in view.not_ready):
            (view.not_ready.discard if ready else view.not_ready.add)(name)
            self._full = True  # readiness changes pacing and nodeStatus of every model on it

    def _observe_pod(self, obj: JSON, deleted: bool) -> None:
        pod = Pod.from_json(obj)
        key = (pod.namespace, pod.name)
        view = self._view
        before = view.pod_use.pop(key, None)
        serving_before = view.pod_serving.pop(key, None)
        view.pods.pop(key, None)
        if not deleted:
            view.pods[key] = pod
            use = models_in_use([pod], view.caches.values(), view.groups.values())
            if use:
                ((node, caches),) = use.items()
                view.pod_use[key] = (node, caches)
            demands = frozenset(serving_demands([pod], view.caches))
            if demands:
                view.pod_serving[key] = demands
        if serving_before != view.pod_serving.get(key):
            self._serving = None
            self._volumes_dirty = True
        after = view.pod_use.get(key)
        if before != after:
            self._in_use = None
            for item in (before, after):
                if item is not None:
                    self._dirty_nodes.add(item[0])

    def _observe_volume(self, kind: ResourceKind, obj: JSON, deleted: bool) -> None:
        meta = obj.get("metadata") or {}
        ref = None if deleted else volume_ref(obj)
        if kind is PERSISTENT_VOLUME:
            store: dict[Any, VolumeRef] = self._view.volumes
            key: Any = meta["name"]
        else:
            store = self._view.claims
            key = (meta.get("namespace") or "default", meta["name"])
        if store.get(key) != ref:
            if ref is None:
                store.pop(key, None)
            else:
                store[key] = ref
            self._volumes_dirty = True  # e.g. deleted by someone: made again if still wanted

    def _observe_isvc(self, obj: JSON, deleted: bool) -> None:
        isvc = InferenceService.from_json(obj)
        key = (isvc.namespace, isvc.name)
        view = self._view
        before = view.isvc_use.pop(key, frozenset())
        view.isvcs.pop(key, None)
        after: frozenset[str] = frozenset()
        if not deleted:
            view.isvcs[key] = isvc
            after = isvc_caches(isvc, view.caches)
            if after:
                view.isvc_use[key] = after
        if before != after:
            self._dirty_caches.update(before ^ after)
            self._isvc_refs = None

    def _lacks(self, kind: ResourceKind) -> None:
        if kind not in self._missing:
            self._missing.add(kind)
            log.info("%s: not served by this cluster; watched again later", kind.plural)

    def _invalidate(self) -> None:
        self._layout = None
        self._in_use = None
        self._serving = None
        self._isvc_refs = None
        self._full = True

    @property
    def pending(self) -> bool:
        return (
            self._full
            or self._volumes_dirty
            or bool(self._dirty_nodes or self._dirty_caches or self._dirty_labels)
        )

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, *, full: bool | None = None) -> Plan:
        """Plan from the view and apply: everything when ``full`` (or when something placement reads
        changed), else only what changed since the last reconcile."""
        view = self._view
        full = self._full if full is None else full or self._full
        started = time.monotonic()
        try:
            return await self._reconcile(view, full)
        finally:
            if self.metrics is not None:
                self.metrics.reconciles.labels(kind="full" if full else "incremental").inc()
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    async def _reconcile(self, view: _View, full: bool) -> Plan:
        result = self._plan(view, full)
        self._incomplete = False
        try:
            await self._apply(result)
            await self._report_contests()
        except ClusterStateError:
            self._full = True  # retry everything on the next pass
            self._write_failed()
            raise
        self.reconciles += 1
        return result

    def plan_only(self, *, full: bool = True) -> Plan:
        """What the next reconcile would write, planned from the view, without writing it (the
        view's pending marks are consumed as by a reconcile). For benchmarks and dry runs."""
        return self._plan(self._view, full or self._full)

    def _plan(self, view: _View, full: bool) -> Plan:
        scope = (
            None
            if full
            else Scope(
                frozenset(self._dirty_caches), frozenset(self._dirty_nodes), frozenset(self._dirty_labels)
            )
        )
        self._full = False
        self._dirty_nodes = set()
        self._dirty_caches = set()
        self._dirty_labels = set()
        self._volumes_dirty = False
        if self._layout is None:
            self._layout = layout(
                view.caches.values(), view.groups.values(), view.nodes.values(), view.invalid_groups
            )
        if self._in_use is None:
            if full:  # claim names and paths depend on caches and groups: recompute from the pods
                self._in_use = models_in_use(view.pods.values(), view.caches.values(), view.groups.values())
            else:
                self._in_use = merged_use(view.pod_use.values())
        if self._serving is None:
            if full:  # claim names depend on caches: recompute from the pods
                for key, pod in view.pods.items():
                    demands = frozenset(serving_demands([pod], view.caches))
                    if demands:
                        view.pod_serving[key] = demands
                    else:
                        view.pod_serving.pop(key, None)
            self._serving = frozenset(d for ds in view.pod_serving.values() for d in ds)
        if self._isvc_refs is None:
            if full:  # which caches an InferenceService uses depends on the caches
                view.isvc_use = {
                    k: use for k, obj in view.isvcs.items() if (use := isvc_caches(obj, view.caches))
                }
            self._isvc_refs = isvc_refs(view.isvc_use)
        snapshot = Snapshot(
            caches=view.caches,
            groups=view.groups,
            nodes=view.nodes,
            local_model_nodes=view.lmns,
            in_use=self._in_use,
            not_ready=frozenset(view.not_ready),
            listed=view.listed,
            node_models=view.node_models,
            serving=self._serving,
            volumes=view.volumes,
            claims=view.claims,
            inference_services=self._isvc_refs,
            invalid_groups=view.invalid_groups,
        )
        options = Options(self.settings.max_concurrent_downloads, self.settings.clock())
        result = plan(snapshot, options, placed=self._layout, scope=scope)
        if self.metrics is not None:
            self._count_copies(result, self._layout, full=full)
        return result

    @property
    def incomplete(self) -> bool:
        """The last reconcile gave up on a write without raising (e.g. a finalizer kept changing)."""
        return self._incomplete

    def _count_copies(self, result: Plan, placed: Layout, *, full: bool) -> None:
        """Copies per cache and node group (:func:`controller.status.copies_by_group`): all caches
        after a full reconcile, the caches it looked at after an incremental one."""
        assert self.metrics is not None
        view = self._view
        if full:
            self._copies = {}
        else:  # deleted caches re-plan fully; this only keeps the picture right if one did not
            for c in [c for c in self._copies if c not in result.node_status and c not in view.caches]:
                del self._copies[c]
        for c, groups in copies_by_group(result.node_status, view.caches, view.groups.keys(), placed).items():
            if groups is None:
                self._copies.pop(c, None)
            else:
                self._copies[c] = groups
        self.metrics.set_copies({(c, g): n for c, gs in self._copies.items() for g, n in gs.items()})

    def _wrote(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.writes.labels(kind=kind).inc()

    def _write_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.write_errors.inc()

    async def _apply(self, result: Plan) -> None:
        # Node specs first: a finalizer comes off only once no node spec lists the model.
        # The plan gives every node of a group the same entry objects: each is made JSON once
        # (176,000 entries on 5,000 nodes were a third of a full pass).
        bodies: dict[int, tuple[LocalModelInfo, JSON]] = {}
        for write in result.nodes:
            await self._write_node(write, bodies)
        if self._stale_owners:
            await self._write_owners()
        for status in result.statuses:
            await self._write_status(status)
        for fin in result.finalizers:
            await self._write_finalizer(fin.cache, add=fin.add)
        for labels in result.labels:
            await self._write_labels(labels)
        for volume in result.volumes:
            await self._write_volume(volume)
        for event in result.events:
            await self._emit(event)

    async def _write_labels(self, write: LabelWrite) -> None:
        labels = {model_label(k): MODEL_LABEL_VALUE if ready else None for k, ready in write.labels.items()}
        try:
            stored = await self.state.patch(NODE, write.node, {"metadata": {"labels": labels}})
        except NotFound:
            return  # the node is gone; so is its label
        self._wrote(NODE.kind)
        self.observe(NODE, WatchEvent("MODIFIED", stored))

    async def _write_volume(self, write: VolumeWrite) -> None:
        kind = PERSISTENT_VOLUME if write.kind == "PersistentVolume" else PERSISTENT_VOLUME_CLAIM
        try:
            if write.action == "delete":
                await self.state.delete(kind, write.name, namespace=write.namespace)
                self._wrote(kind.kind)
                stored = await self.state.get(kind, write.name, namespace=write.namespace)
                self.observe(kind, WatchEvent("MODIFIED", stored))  # still there: pvc-protection
            else:
                assert write.body is not None
                stored = await self.state.create(kind, dict(write.body))
                self._wrote(kind.kind)
                self.observe(kind, WatchEvent("ADDED", stored))
        except NotFound:
            gone = {"metadata": {"name": write.name, "namespace": write.namespace}}
            self.observe(kind, WatchEvent("DELETED", gone))
        except AlreadyExists:
            # Someone's object of that name: ours only if it carries our label; never overwritten.
            stored = await self.state.get(kind, write.name, namespace=write.namespace)
            if volume_ref(stored) is None:
                log.warning("%s %s exists and is not the controller's; left alone", write.kind, write.name)
            self.observe(kind, WatchEvent("ADDED", stored))

    async def _write_node(self, write: NodeWrite, bodies: dict[int, tuple[LocalModelInfo, JSON]]) -> None:
        retained = ",".join(write.retained) or None
        models = []
        for m in write.models:
            known = bodies.get(id(m))
            if known is None or known[0] is not m:
                known = bodies[id(m)] = (m, m.to_json())
            models.append(known[1])
        try:
            if write.action == "delete":
                with contextlib.suppress(NotFound):
                    await self.state.delete(LOCAL_MODEL_NODE, write.name)
                    self._wrote(LOCAL_MODEL_NODE.kind)
                self._set_lmn(write.name, None)
                self._ours.pop(write.name, None)
                self._foreign.pop(write.name, None)
                return
            if write.action == "create":
                meta: JSON = {"name": write.name}
                if write.node_uid:
                    # Garbage-collected with its Node on a real cluster.
                    meta["ownerReferences"] = [
                        {"apiVersion": "v1", "kind": "Node", "name": write.name, "uid": write.node_uid}
                    ]
                if retained:
                    meta["annotations"] = {RETAINED_ANNOTATION: retained}
                body = {
                    "apiVersion": LOCAL_MODEL_NODE.api_version,
                    "kind": LOCAL_MODEL_NODE.kind,
                    "metadata": meta,
                    "spec": {"localModels": models},
                }
                try:
                    # Built for this write, its model entries by to_json for this pass, never changed
                    # again: handed over, a store in memory keeps it without copies (they were most
                    # of a full pass's write cost).
                    stored = await self.state.create(LOCAL_MODEL_NODE, body, handover=True)
                except AlreadyExists:
                    stored = await self._patch_node(write.name, models, retained)
            else:
                stored = await self._patch_node(write.name, models, retained)
        except NotFound:
            self._dirty_nodes.add(write.name)  # gone meanwhile: the next pass sees why
            return
        self._wrote(LOCAL_MODEL_NODE.kind)
        # The spec is what we just wrote: parsing it back (thousands of entries, each size a
        # Quantity) was most of a full reconcile's CPU.
        lmn = LocalModelNode(
            metadata=ObjectMeta.from_json(stored.get("metadata")),
            local_models=write.models,
            status=LocalModelNodeStatus.from_json(stored.get("status")),
        )
        if lmn.metadata.generation is not None:
            self._ours[write.name] = lmn.metadata.generation
        self._set_lmn(write.name, lmn)

    async def _patch_node(self, name: str, models: list[JSON], retained: str | None) -> JSON:
        # The controller owns the spec and this annotation; the agent owns the status.
        patch = {
            "metadata": {"annotations": {RETAINED_ANNOTATION: retained}},
            "spec": {"localModels": models},
        }
        return await self.state.patch(LOCAL_MODEL_NODE, name, patch)

    async def _write_status(self, write: StatusWrite) -> None:
        kind = _KINDS[write.kind]

        def compute(current: JSON) -> JSON | None:
            status = current.get("status") or {}
            return None if merge_patch(status, write.patch) == status else dict(write.patch)

        known = (self._view.caches if kind is LOCAL_MODEL_CACHE else self._view.groups).get(write.name)
        stored: JSON | None = None
        fast = False
        try:
            if known is not None and known.metadata.resource_version:
                # The plan diffed against the view: written guarded by the view's resourceVersion,
                # no read first (a read copies a status of thousands of node entries). A stale view
                # costs a Conflict, then the read-compute-write below.
                try:
                    stored = await self.state.patch_status(
                        kind, write.name, dict(write.patch), resource_version=known.metadata.resource_version
                    )
                    fast = True
                except Conflict:
                    stored = None
            if stored is None:
                stored = await update_status(self.state, kind, write.name, compute)
        except NotFound:
            return
        if fast and stored is not None and write.status is not None and isinstance(known, LocalModelCache):
            # Written over the view's version: its spec is the view's and its status the plan's.
            # Taking both as they are spares parsing a status of thousands of node entries.
            self._wrote(kind.kind)
            meta = ObjectMeta.from_json(stored.get("metadata"))
            self._observe_spec(
                self._view.caches, write.name, dataclasses.replace(known, metadata=meta, status=write.status)
            )
            return
        if stored is not None:
            self._wrote(kind.kind)
            self.observe(kind, WatchEvent("MODIFIED", stored))

    async def _write_finalizer(self, name: str, *, add: bool) -> None:
        for attempt in range(5):
            known = self._view.caches.get(name) if attempt == 0 else None
            if known is not None and known.metadata.resource_version:
                # The view is as fresh as the last watch event or our own write: try it first, a
                # stale one costs a Conflict and a read (500 reads were a tenth of a full pass).
                m = known.metadata
                current: JSON = {
                    "metadata": {
                        "name": name,
                        "finalizers": list(m.finalizers),
                        "resourceVersion": m.resource_version,
                        **({"deletionTimestamp": m.deletion_timestamp} if m.deletion_timestamp else {}),
                    }
                }
            else:
                try:
                    current = await self.state.get(LOCAL_MODEL_CACHE, name)
                except NotFound:
                    self._view.caches.pop(name, None)
                    return
            finalizers = list(current["metadata"].get("finalizers") or [])
            if (FINALIZER in finalizers) == add:
                return
            finalizers = [*finalizers, FINALIZER] if add else [f for f in finalizers if f != FINALIZER]
            try:
                # Lists replace whole in a merge patch: guard against another writer's finalizer.
                stored = await self.state.patch(
                    LOCAL_MODEL_CACHE,
                    name,
                    {"metadata": {"finalizers": finalizers or None}},
                    resource_version=current["metadata"]["resourceVersion"],
                )
            except Conflict:
                continue
            except NotFound:
                stored = None
            else:
                self._wrote(LOCAL_MODEL_CACHE.kind)
            if stored is None or (not finalizers and current["metadata"].get("deletionTimestamp")):
                self.observe(LOCAL_MODEL_CACHE, WatchEvent("DELETED", current))
            elif known is not None and known.status.to_json() == (stored.get("status") or {}):
                # Only metadata changed: no need to parse a status of thousands of node entries.
                meta = ObjectMeta.from_json(stored.get("metadata"))
                self._observe_spec(self._view.caches, name, dataclasses.replace(known, metadata=meta))
            else:
                self.observe(LOCAL_MODEL_CACHE, WatchEvent("MODIFIED", stored))
            return
        self._full = True  # another writer kept changing it: the next pass tries again
        self._incomplete = True
        self._write_failed()

    async def _report_contests(self) -> None:
        """A condition and a Warning Event on each LocalModelNode another writer keeps rewriting:
        the condition written when missing or naming another writer, the Event at most once per
        window per (node, writer)."""
        contested, self._contested = self._contested, {}
        for name, writer in contested.items():
            lmn = self._view.lmns.get(name)
            if lmn is None:
                continue
            count = len(self._foreign.get(name, ()))
            minutes = self.settings.contest_window / 60
            message = (
                f"spec.localModels was changed {count} times in {minutes:g} minutes by {writer!r}, "
                f"and put back each time by {self.settings.field_manager}: two controllers manage this "
                "LocalModelNode (KServe's localmodel controller still running?); stop the other one"
            )
            condition = {
                "type": CONTESTED,
                "status": "True",
                "reason": "OtherWriter",
                "message": message,
                "lastTransitionTime": self.settings.clock(),
            }

            def compute(current: JSON, condition: JSON = condition, writer: str = writer) -> JSON | None:
                conditions = list((current.get("status") or {}).get("conditions") or [])
                mine = [c for c in conditions if c.get("type") == CONTESTED]
                if mine and repr(writer) in str(mine[0].get("message", "")):
                    return None
                others = [c for c in conditions if c.get("type") != CONTESTED]
                return {"conditions": [*others, condition]}

            try:
                if await update_status(self.state, LOCAL_MODEL_NODE, name, compute) is not None:
                    self._wrote(LOCAL_MODEL_NODE.kind)
            except NotFound:
                continue
            now = time.monotonic()
            last = self._reported.get((name, writer))
            if last is not None and now - last < self.settings.contest_window:
                continue
            self._reported[(name, writer)] = now
            log.warning("LocalModelNode %s: %s", name, message)
            await self._record(LOCAL_MODEL_NODE, name, lmn.metadata.uid, "Warning", CONTESTED, message)

    async def _emit(self, event: Event) -> None:
        await self._record(_KINDS[event.kind], event.name, event.uid, event.type, event.reason, event.message)

    async def _record(
        self, kind: ResourceKind, name: str, uid: str | None, type_: str, reason: str, message: str
    ) -> None:
        body = event_body(
            involved=kind,
            name=name,
            uid=uid,
            reason=reason,
            message=message,
            type_=type_,
            component=COMPONENT,
            now=self.settings.clock(),
            namespace=self.settings.event_namespace,
        )
        try:
            await self.state.create(EVENT, body, handover=True)  # made for this write alone
            self._wrote(EVENT.kind)
        except ClusterStateError as e:
            # An Event is best effort: losing one must not stop a reconcile.
            self._write_failed()
            log.warning("cannot record event %s on %s: %s", reason, name, e)

    # -- the loop ------------------------------------------------------------------------------

    async def run(
        self,
        *,
        once: bool = False,
        resync: float = 300.0,
        retry_delay: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Reconcile until ``stop`` is set (or once). Watches feed the view; each batch of changes
        triggers one reconcile; every ``resync`` seconds the watches list again (reporting what
        vanished) and a full reconcile runs anyway.

        A reconcile that fails (or gives up on a write) is retried on a timer, whether or not
        anything else happens: after ``retry_delay`` seconds, doubling up to
        ``settings.retry_max``, with jitter; changes that arrive meanwhile wait for that retry
        rather than hammering an API that is failing."""
        if self._refresh is not None:
            await self._refresh()
        if once:
            await self.load()
            await self.reconcile(full=True)
            return
        stop = stop or asyncio.Event()
        # The first pass fails like any other when the API server goes away meanwhile: retried on
        # the same timer, never the end of the process.
        failures = 0
        while not stop.is_set():
            try:
                await self.load()
                await self.reconcile(full=True)
                break
            except ClusterStateError as e:
                failures += 1
                delay = min(self.settings.retry_max, retry_delay * 2 ** (failures - 1))
                delay *= random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not a secret
                log.warning("first reconcile failed (%s); retrying in %.1fs", e, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        queue: asyncio.Queue[tuple[ResourceKind, WatchEvent]] = asyncio.Queue()
        pumps = [asyncio.create_task(self._pump(kind, queue, retry_delay, resync)) for kind in WATCHED]
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + resync
        retry_at: float | None = None
        failures = 0
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.create_task(queue.get())
                wake = next_resync if retry_at is None else min(next_resync, retry_at)
                timeout = max(0.0, wake - loop.time())
                done, _ = await asyncio.wait(
                    {getter, stopping}, timeout=timeout, return_when="FIRST_COMPLETED"
                )
                if getter in done:
                    self.observe(*getter.result())
                    while not queue.empty():  # a burst of changes is one reconcile
                        self.observe(*queue.get_nowait())
                else:
                    getter.cancel()
                if stopping in done:
                    break
                now = loop.time()
                if now >= next_resync:
                    next_resync = now + resync
                    self._full = True
                    if self._refresh is not None:
                        await self._refresh()
                if retry_at is not None and now < retry_at:
                    continue  # backing off: what arrived is in the view, reconciled at the retry
                if not self.pending and retry_at is None:
                    continue
                try:
                    await self.reconcile()
                except ClusterStateError as e:
                    failed: ClusterStateError | None = e
                else:
                    failed = None
                if failed is None and not self.incomplete:
                    if failures:
                        log.info("reconcile succeeded after %d failed attempts", failures)
                    failures, retry_at = 0, None
                    continue
                failures += 1
                delay = min(self.settings.retry_max, retry_delay * 2 ** (failures - 1))
                delay *= random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not a secret
                retry_at = loop.time() + delay
                self._full = True
                log.warning("reconcile failed (%s); retrying in %.1fs", failed or "a write gave up", delay)
        finally:
            stopping.cancel()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, stopping, return_exceptions=True)

    async def _pump(
        self,
        kind: ResourceKind,
        queue: asyncio.Queue[tuple[ResourceKind, WatchEvent]],
        retry_delay: float,
        resync: float,
    ) -> None:
        while True:
            try:
                # watch() itself retries (with backoff) and re-lists, reporting deletions; only
                # NotFound (the kind is not served) and bugs come out of it.
                async for event in watch(
                    self.state,
                    kind,
                    selector=SELECTORS.get(kind),
                    retry_delay=retry_delay,
                    max_delay=self.settings.retry_max,
                    relist_every=resync,
                ):
                    self._missing.discard(kind)
                    queue.put_nowait((kind, event))
            except ClusterStateError as e:
                if isinstance(e, NotFound) and kind in OPTIONAL:
                    self._lacks(kind)  # e.g. KServe not installed (yet): look again now and then
                    await asyncio.sleep(max(retry_delay, self.settings.optional_retry))
                    continue
                log.warning("watch of %s failed, restarting: %s", kind.plural, e)
                await asyncio.sleep(retry_delay)


def other_writer(obj: JSON, ours: str) -> str:
    """The field manager that last wrote the object's spec, other than ``ours``, from
    ``metadata.managedFields`` (the latest entry owning ``f:spec``); "an unknown writer" when the
    server keeps none."""
    entries = [
        e
        for e in (obj.get("metadata") or {}).get("managedFields") or []
        if isinstance(e, dict)
        and e.get("manager") != ours
        and not e.get("subresource")
        and "f:spec" in (e.get("fieldsV1") or {})
    ]
    if not entries:
        return "an unknown writer"
    latest = max(entries, key=lambda e: str(e.get("time") or ""))
    return str(latest.get("manager") or "an unknown writer")


def _meta_key(obj: Any) -> tuple[Any, ...]:
    m = obj.metadata
    return (m.generation, m.creation_timestamp, m.deletion_timestamp, m.uid)
