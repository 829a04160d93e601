"""The controller's view of the cluster, kept from watch events, with no I/O: typed objects by name
(parsed once, at the edge, into :mod:`controller.views` and :mod:`localmodel.resources` types) and
the marks of what the next reconcile must look at. :class:`controller.reconcile.Controller` extends
:class:`ViewKeeper` with the reads and writes.

Level-triggered: every change only marks what is dirty. A change of caches, groups or node labels
marks everything (placement depends on all of them); a change of one LocalModelNode or pod marks
only that node and the models it holds. Status-only echoes of the controller's own writes, and Node
heartbeats, change nothing the plan reads and mark nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controller.demand import service_demands
from controller.peers import peer_facts_changed
from controller.rollout import models_in_use
from controller.serving import serving_demands, volume_ref
from controller.snapshot import Scope, ServingDemand, Snapshot, VolumeRef, isvc_refs, merged_use
from controller.status import isvc_caches
from controller.views import InferenceService, NodeView, Pod
from localmodel.errors import SpecError
from localmodel.kinds import (
    INFERENCE_SERVICE,
    JSON,
    LLM_INFERENCE_SERVICE,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    POD,
    ResourceKind,
)
from localmodel.placement import Layout, layout
from localmodel.resources import (
    InferenceServiceRef,
    LocalModelCache,
    LocalModelNamespaceCache,
    LocalModelNode,
    LocalModelNodeGroup,
    Node,
    cache_key,
    cluster_group,
)
from localmodel.state.base import WatchEvent

if TYPE_CHECKING:
    from controller.reconcile import Settings

log = logging.getLogger("modelcache.controller")

CONTESTED = "SpecContested"  # the LocalModelNode condition and Event reason of item "another writer"


@dataclass
class View:
    """The controller's picture of the cluster: typed objects by name, fed by lists and watches."""

    # LocalModelCaches and LocalModelNamespaceCaches, by key (LocalModelCache.key)
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
    # PVs and PVCs of those names that are not ours (the watches see only ours: learnt from a 409)
    taken_volumes: set[str] = field(default_factory=set)
    taken_claims: set[tuple[str, str]] = field(default_factory=set)
    isvcs: dict[tuple[str, str], InferenceService] = field(default_factory=dict)  # (namespace, name) ->
    invalid_groups: dict[str, str] = field(default_factory=dict)  # stored, spec refused: name -> why
    isvc_use: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)  # -> caches it uses
    llm_isvcs: dict[tuple[str, str], InferenceService] = field(default_factory=dict)  # LLMInferenceServices
    llm_use: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)  # -> caches it uses


def repointed_owners(lmn: LocalModelNode | None, node: Node | None) -> list[JSON] | None:
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


class ViewKeeper:
    """The view and its marks. ``observe`` takes watch events; :meth:`take_snapshot` hands the
    planner a :class:`Snapshot` of the view and the :class:`Scope` of what changed, and clears the
    marks."""

    settings: Settings

    def __init__(self) -> None:
        self._view = View()
        self._layout: Layout | None = None
        self._in_use: dict[str, frozenset[str]] | None = None
        self._serving: frozenset[ServingDemand] | None = None
        self._isvc_refs: dict[str, tuple[InferenceServiceRef, ...]] | None = None  # cache ->
        self._llm_refs: dict[str, tuple[InferenceServiceRef, ...]] | None = None  # cache ->
        self._full = True
        self._dirty_nodes: set[str] = set()
        # LocalModelNodes whose Node owner reference names another uid than the Node's (the Node
        # was re-created under the same name): re-pointed, lest the garbage collector delete them.
        self._stale_owners: set[str] = set()
        self._dirty_caches: set[str] = set()
        self._dirty_labels: set[str] = set()
        self._volumes_dirty = False
        self._ours: dict[str, int] = {}  # LocalModelNode -> generation of our last spec write
        self._foreign: dict[str, deque[float]] = {}  # LocalModelNode -> when others rewrote its spec
        self._contested: dict[str, str] = {}  # LocalModelNode -> the other writer, to be reported

    @property
    def view(self) -> View:
        return self._view

    def observe(self, kind: ResourceKind, event: WatchEvent) -> None:
        """Take one change into the view, and mark what the next reconcile must look at."""
        obj = event.object
        name = obj.get("metadata", {}).get("name")
        if not isinstance(name, str):
            return
        deleted = event.type == "DELETED"
        try:
            if kind is LOCAL_MODEL_CACHE or kind is LOCAL_MODEL_NAMESPACE_CACHE:
                self._observe_cache(kind, name, obj, deleted)
            elif kind is LOCAL_MODEL_NODE_GROUP:
                self._observe_group(name, None if deleted else obj)
            elif kind is NODE:
                self._observe_node(name, None if deleted else obj)
            elif kind is LOCAL_MODEL_NODE:
                self._observe_lmn_event(name, obj, deleted)
            elif kind is POD:
                self._observe_pod(obj, deleted)
            elif kind is PERSISTENT_VOLUME or kind is PERSISTENT_VOLUME_CLAIM:
                self._observe_volume(kind, obj, deleted)
            elif kind is INFERENCE_SERVICE:
                self._observe_isvc(obj, deleted)
            elif kind is LLM_INFERENCE_SERVICE:
                self._observe_llm(obj, deleted)
        except SpecError as e:
            # One bad object must not stop the controller for everyone else; it is left out.
            log.warning("ignoring %s %s: %s", kind.kind, name, e)

    def _observe_cache(self, kind: ResourceKind, name: str, obj: JSON, deleted: bool) -> None:
        """A LocalModelCache, under its name, or a LocalModelNamespaceCache, under ``<ns>/<name>``.
        Raises SpecError."""
        if kind is LOCAL_MODEL_CACHE:
            self._observe_spec(self._view.caches, name, None if deleted else LocalModelCache.from_json(obj))
            return
        key = cache_key(name, obj.get("metadata", {}).get("namespace") or "default")
        self._observe_spec(
            self._view.caches, key, None if deleted else LocalModelNamespaceCache.from_json(obj)
        )

    def _observe_lmn_event(self, name: str, obj: JSON, deleted: bool) -> None:
        """A LocalModelNode: its writer checked, then taken in, then its owner checked. Raises SpecError."""
        lmn = None if deleted else LocalModelNode.from_json(obj)
        if lmn is not None:
            self._check_writer(name, self._view.lmns.get(name), lmn, obj)
        self._observe_lmn(name, lmn)
        self._check_owner(name)

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
        changed |= peer_facts_changed(old.status, new.status)  # a seed's first bytes, a peer address
        for m in new.local_models:
            if m.status_key in changed:
                self._dirty_caches.add(m.status_key)

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
        if repointed_owners(self._view.lmns.get(name), self._view.nodes.get(name)) is not None:
            self._stale_owners.add(name)
        else:
            self._stale_owners.discard(name)

    def _set_lmn(self, name: str, lmn: LocalModelNode | None) -> None:
        """Keep the view and its cache -> nodes index in step."""
        view = self._view
        old = view.lmns.pop(name, None)
        if old is not None:
            for m in old.local_models:
                nodes = view.listed.get(m.status_key)
                if nodes is not None:
                    nodes.discard(name)
                    if not nodes:
                        del view.listed[m.status_key]
        if lmn is not None:
            view.lmns[name] = lmn
            for m in lmn.local_models:
                view.listed.setdefault(m.status_key, set()).add(name)

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
        view = self._view
        if self._observe_service(InferenceService.from_json(obj), deleted, view.isvcs, view.isvc_use):
            self._isvc_refs = None

    def _observe_llm(self, obj: JSON, deleted: bool) -> None:
        view = self._view
        if self._observe_service(InferenceService.from_llm_json(obj), deleted, view.llm_isvcs, view.llm_use):
            self._llm_refs = None

    def _observe_service(
        self,
        svc: InferenceService,
        deleted: bool,
        services: dict[tuple[str, str], InferenceService],
        use: dict[tuple[str, str], frozenset[str]],
    ) -> bool:
        """An InferenceService or LLMInferenceService into its view (``services``, and ``use``: the
        caches it uses); True when the caches it uses changed (their references are made again)."""
        key = (svc.namespace, svc.name)
        before = use.pop(key, frozenset())
        old = services.pop(key, None)
        after: frozenset[str] = frozenset()
        if not deleted:
            services[key] = svc
            after = isvc_caches(svc, self._view.caches)
            if after:
                use[key] = after
        if before != after:
            self._dirty_caches.update(before ^ after)
        self._service_changed(old, None if deleted else svc)
        return before != after

    def _service_changed(self, old: InferenceService | None, new: InferenceService | None) -> None:
        """A labelled (LLM)InferenceService came, went or changed: its serving demand
        (:mod:`controller.demand`) is planned again."""
        if old != new and ((old is not None and old.named) or (new is not None and new.named)):
            self._serving = None
            self._volumes_dirty = True

    def _invalidate(self) -> None:
        self._layout = None
        self._in_use = None
        self._serving = None
        self._isvc_refs = None
        self._llm_refs = None
        self._full = True

    @property
    def pending(self) -> bool:
        return (
            self._full
            or self._volumes_dirty
            or bool(self._dirty_nodes or self._dirty_caches or self._dirty_labels)
        )

    def take_snapshot(self, full: bool) -> tuple[Snapshot, Layout, Scope | None]:
        """The view as the planner takes it (the placement and pod-derived parts recomputed only
        where a change invalidated them), and the scope of an incremental pass (None when ``full``);
        the marks are consumed."""
        view = self._view
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
                view.caches.values(),
                view.groups.values(),
                view.nodes.values(),
                view.invalid_groups,
                overcommit=self.settings.overcommit,
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
            self._serving = frozenset(d for ds in view.pod_serving.values() for d in ds) | frozenset(
                service_demands([*view.isvcs.values(), *view.llm_isvcs.values()], view.caches)
            )
        if self._isvc_refs is None:
            if full:  # which caches an InferenceService uses depends on the caches
                view.isvc_use = {
                    k: use for k, obj in view.isvcs.items() if (use := isvc_caches(obj, view.caches))
                }
            self._isvc_refs = isvc_refs(view.isvc_use)
        if self._llm_refs is None:
            if full:
                view.llm_use = {
                    k: use for k, obj in view.llm_isvcs.items() if (use := isvc_caches(obj, view.caches))
                }
            self._llm_refs = isvc_refs(view.llm_use)
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
            taken_volumes=frozenset(view.taken_volumes),
            taken_claims=frozenset(view.taken_claims),
            inference_services=self._isvc_refs,
            llm_inference_services=self._llm_refs,
            invalid_groups=view.invalid_groups,
        )
        return snapshot, self._layout, scope


def contest_message(count: int, window: float, writer: str, ours: str) -> str:
    """What the SpecContested condition and Event say: ``writer`` changed the spec ``count`` times
    within ``window`` seconds, ``ours`` (our field manager) put it back."""
    return (
        f"spec.localModels was changed {count} times in {window / 60:g} minutes by {writer!r}, "
        f"and put back each time by {ours}: two controllers manage this "
        "LocalModelNode (KServe's localmodel controller still running?); stop the other one"
    )


def contest_status(current: JSON, *, writer: str, message: str, now: str) -> JSON | None:
    """The LocalModelNode status patch that sets the SpecContested condition (``message``, at
    ``now``), keeping the others; None when one already names ``writer``."""
    conditions = list((current.get("status") or {}).get("conditions") or [])
    mine = [c for c in conditions if c.get("type") == CONTESTED]
    if mine and repr(writer) in str(mine[0].get("message", "")):
        return None
    others = [c for c in conditions if c.get("type") != CONTESTED]
    condition = {
        "type": CONTESTED,
        "status": "True",
        "reason": "OtherWriter",
        "message": message,
        "lastTransitionTime": now,
    }
    return {"conditions": [*others, condition]}


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
