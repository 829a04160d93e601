"""The controller's I/O: keep a view of the cluster from watches (:mod:`controller.view`), run
:func:`controller.plan.plan` over it, apply the writes it returns.

Over 600 lines because each write keeps the view in step with what it wrote (the fast paths that
spare re-reading and re-parsing thousands of entries), so the writes stay beside the loop.

Level-triggered: every change only marks what is dirty; the loop then plans from the whole view, so
a missed or coalesced event loses nothing, and a periodic full resync repairs anything else. An
incremental pass re-plans only what changed, which is what keeps a status update from a 5,000-node
cluster cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from controller.labels import MODEL_LABEL_VALUE, model_label
from controller.metrics import ControllerMetrics
from controller.peertoken import PeerToken
from controller.plan import plan
from controller.serving import MANAGED_BY, MANAGED_BY_LABEL, volume_ref
from controller.snapshot import (
    DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    DEFAULT_ORIGIN_SEEDS,
    DEFAULT_PEERS_PER_MODEL,
    RETAINED_ANNOTATION,
    Event,
    LabelWrite,
    NodeWrite,
    Options,
    Plan,
    StatusWrite,
    VolumeWrite,
)
from controller.status import copies_by_group
from controller.view import CONTESTED, View, ViewKeeper, contest_message, contest_status, repointed_owners
from localmodel.errors import AlreadyExists, ClusterStateError, Conflict, NotFound
from localmodel.events import EventLog, event_body, record_event
from localmodel.kinds import (
    EVENT,
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
from localmodel.mergepatch import merge_patch
from localmodel.placement import Layout
from localmodel.resources import (
    FINALIZER,
    NAMESPACE_CACHE_FINALIZER,
    Copies,
    LocalModelCache,
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeGroup,
    LocalModelNodeStatus,
    ObjectMeta,
    split_key,
)
from localmodel.state.base import (
    ClusterState,
    Selector,
    WatchEvent,
    object_key,
    update_status,
    watch,
)
from localmodel.sticking import Sticking, section_of
from localmodel.timestamps import utc_now

log = logging.getLogger("modelcache.controller")

COMPONENT = "modelcache-controller"
# The field manager an API server names for our writes (our User-Agent starts with it).
FIELD_MANAGER = COMPONENT
# Objects listed at load() from which the view is kept out of the cyclic collector (a cluster of a few
# hundred objects gains nothing measurable from it).
FREEZE_AFTER_LOADING = 2000
WATCHED: tuple[ResourceKind, ...] = (
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    LOCAL_MODEL_NODE,
    POD,
    PERSISTENT_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    INFERENCE_SERVICE,
    LLM_INFERENCE_SERVICE,
)
# Watched where their API exists: without KServe there are no InferenceServices to report (and
# LLMInferenceServices only from KServe v0.19); LocalModelNamespaceCaches where the CRD is installed
# (ours, or KServe's from v0.18).
OPTIONAL: frozenset[ResourceKind] = frozenset(
    {INFERENCE_SERVICE, LLM_INFERENCE_SERVICE, LOCAL_MODEL_NAMESPACE_CACHE}
)
# Only the PVs and PVCs the controller made are its business: watched by their label.
SELECTORS: dict[ResourceKind, Selector] = {
    PERSISTENT_VOLUME: Selector(labels={MANAGED_BY_LABEL: MANAGED_BY}),
    PERSISTENT_VOLUME_CLAIM: Selector(labels={MANAGED_BY_LABEL: MANAGED_BY}),
}
_KINDS = {k.kind: k for k in (LOCAL_MODEL_CACHE, LOCAL_MODEL_NAMESPACE_CACHE, LOCAL_MODEL_NODE_GROUP)}
# The part of each object the controller writes (localmodel.sticking: what an API server prunes
# from it under another CRD, KServe's, is remembered as meant rather than written again).
_SECTIONS = {
    LOCAL_MODEL_NODE.kind: "spec",
    LOCAL_MODEL_CACHE.kind: "status",
    LOCAL_MODEL_NAMESPACE_CACHE.kind: "status",
    LOCAL_MODEL_NODE_GROUP.kind: "status",
}


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
    # A kind whose /status answers 404 while its objects exist (KServe's LocalModelNodeGroup CRD has
    # no status subresource): its status is not written, and tried again after this many seconds.
    status_retry: float = 3600.0
    # --admission warn: a cache over its group's storageLimit is placed anyway, with a Warning Event
    # and a StorageOvercommitted condition (localmodel.placement's overcommit rule).
    overcommit: bool = False
    # Peer fill (controller.peers): nodes that start a model no peer has bytes of, the most peers a
    # spec entry names, and the token Secret (namespace, name) made when missing (None: not managed).
    origin_seeds: int = DEFAULT_ORIGIN_SEEDS
    peers_per_model: int = DEFAULT_PEERS_PER_MODEL
    peer_token_secret: tuple[str, str] | None = None
    peer_token_recheck: float = 300.0  # seconds between looks for that Secret (at full reconciles)


class Controller(ViewKeeper):
    """One controller over one ClusterState. ``observe`` (:class:`controller.view.ViewKeeper`) takes
    watch events, ``reconcile`` plans and writes; ``run`` wires both to the watches with a periodic
    full resync."""

    def __init__(
        self,
        state: ClusterState,
        settings: Settings | None = None,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.settings = settings or Settings()
        self.metrics = metrics
        self._copies: dict[str, dict[str, Copies]] = {}  # cache -> group -> copies, for the metrics
        self._refresh = refresh  # standalone: reload the documents before each full resync
        self._missing: set[ResourceKind] = set()  # optional kinds whose API this cluster lacks
        # Each kind's objects as load() listed them, until its watch starts (_pump) and takes them.
        self._loaded: dict[ResourceKind, list[JSON]] = {}
        self._incomplete = False  # a write of the last reconcile gave up: retried on the timer
        self._reported: dict[tuple[str, str], float] = {}  # (node, writer) -> when last reported
        self._sticking = Sticking()  # what the API server does not keep of our writes
        self._no_status: dict[str, float] = {}  # kind -> when to try its /status again (monotonic)
        self._events = EventLog()  # Events as client-go's recorder repeats them: one object, a count
        self._peer_token = PeerToken(self.settings.peer_token_secret, self.settings.peer_token_recheck)
        self.reconciles = 0

    def observe(self, kind: ResourceKind, event: WatchEvent) -> None:
        """As :meth:`controller.view.ViewKeeper.observe`, with the section the controller writes
        taken as it was meant where the API server keeps all of it that can stick
        (:class:`localmodel.sticking.Sticking`)."""
        section = _SECTIONS.get(kind.kind)
        meta = event.object.get("metadata") or {}
        name = meta.get("name")
        if isinstance(name, str) and kind is LOCAL_MODEL_NAMESPACE_CACHE:
            name = f"{meta.get('namespace') or 'default'}/{name}"  # the cache's key
        if section is not None and isinstance(name, str):
            if event.type == "DELETED":
                self._sticking.forget(kind.kind, name)
            elif self._sticking.paths(kind.kind):
                stored = section_of(event.object, section)
                shown = self._sticking.take(kind.kind, name, stored)
                if shown is not stored:
                    event = WatchEvent(event.type, {**event.object, section: shown})
        super().observe(kind, event)

    # -- the view ------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read everything (a full list of each watched kind) into a fresh view."""
        self._view = View()
        self._invalidate()
        self._loaded = {}
        for kind in WATCHED:
            try:
                listing = await self.state.list(kind, selector=SELECTORS.get(kind))
            except NotFound:
                if kind not in OPTIONAL:
                    raise
                self._lacks(kind)
                continue
            self._loaded[kind] = listing.items
            for obj in listing.items:
                self.observe(kind, WatchEvent("ADDED", obj))
        self._full = True
        if sum(map(len, self._loaded.values())) >= FREEZE_AFTER_LOADING:
            # The view of a large cluster lives until the next resync: kept out of the cyclic
            # collector's full passes, each of which would walk all of it again (at 5,000 nodes one
            # such pass was 0.09 s in the middle of a full reconcile, bench/controller_reconcile.py).
            # Collected first, so no garbage is frozen; what the view drops later is still freed by
            # reference counting (it holds no cycles).
            gc.collect()
            gc.freeze()

    async def _write_owners(self) -> None:
        for name in sorted(self._stale_owners):
            lmn = self._view.lmns.get(name)
            refs = repointed_owners(lmn, self._view.nodes.get(name))
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

    def _lacks(self, kind: ResourceKind) -> None:
        if kind not in self._missing:
            self._missing.add(kind)
            log.info("%s: not served by this cluster; watched again later", kind.plural)

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile(self, *, full: bool | None = None) -> Plan:
        """Plan from the view and apply: everything when ``full`` (or when something placement reads
        changed), else only what changed since the last reconcile."""
        full = self._full if full is None else full or self._full
        started = time.monotonic()
        try:
            return await self._reconcile(full)
        finally:
            if self.metrics is not None:
                self.metrics.reconciles.labels(kind="full" if full else "incremental").inc()
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    async def _reconcile(self, full: bool) -> Plan:
        if full:
            await self._recheck_taken()
            await self._peer_token.check(self.state)
        result = self._plan(full)
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
        return self._plan(full or self._full)

    def _plan(self, full: bool) -> Plan:
        snapshot, placed, scope = self.take_snapshot(full)
        s = self.settings
        options = Options(s.max_concurrent_downloads, s.clock(), s.origin_seeds, s.peers_per_model)
        result = plan(snapshot, options, placed=placed, scope=scope)
        if self.metrics is not None:
            self._count_copies(result, placed, full=full)
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

        # Volumes made after the claims (a claim naming a volume not made yet waits Pending, then
        # binds): a claim of that name that is not ours (a 409) then keeps its volume from being made.
        def made_last(v: VolumeWrite) -> bool:
            return v.action == "create" and v.kind == "PersistentVolume"

        for volume in sorted(result.volumes, key=made_last):  # stable: the plan's order otherwise
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
        if write.action == "create" and kind is PERSISTENT_VOLUME and write.body is not None:
            ref = write.body["spec"].get("claimRef") or {}
            if (ref.get("namespace"), ref.get("name")) in self._view.taken_claims:
                return  # its claim turned out to be someone else's in this very pass
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
                self._taken(kind, write.name, write.namespace or "default", taken=True)
            self.observe(kind, WatchEvent("ADDED", stored))

    def _taken(self, kind: ResourceKind, name: str, namespace: str, *, taken: bool) -> None:
        """Remember (or forget) that another party's PV or PVC holds ``name``: the watches, selected
        by our label, never show it, and the plan must not try to create it on every pass (a 409 and
        a warning each time, forever, beside every KServe-made serving claim)."""
        view = self._view
        where: set[Any] = view.taken_volumes if kind is PERSISTENT_VOLUME else view.taken_claims
        key: Any = name if kind is PERSISTENT_VOLUME else (namespace, name)
        if taken and key not in where:
            log.warning(
                "%s %s exists and is not the controller's; left alone (it serves as it is)",
                kind.kind,
                name if kind is PERSISTENT_VOLUME else f"{namespace}/{name}",
            )
            where.add(key)
        elif not taken and key in where:
            log.info("%s %s of another party is gone; the controller may make its own", kind.kind, name)
            where.discard(key)
        else:
            return
        self._volumes_dirty = True

    async def _recheck_taken(self) -> None:
        """At a full resync: forget the names another party's PV or PVC held once it is gone (or
        carries our label now), so a serving pair is made again where it is still wanted. Reads
        only, one per name."""
        view = self._view
        held = [(PERSISTENT_VOLUME, n, "") for n in view.taken_volumes]
        held += [(PERSISTENT_VOLUME_CLAIM, n, ns) for ns, n in view.taken_claims]
        for kind, name, ns in held:
            try:
                stored = await self.state.get(kind, name, namespace=ns or None)
            except NotFound:
                self._taken(kind, name, ns, taken=False)
                continue
            if volume_ref(stored) is not None:
                self._taken(kind, name, ns, taken=False)
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
                current = self._view.lmns.get(write.name)
                kept = None if current is None else current.metadata.annotations.get(RETAINED_ANNOTATION)
                if kept == retained and self._sticking.futile(
                    LOCAL_MODEL_NODE.kind, write.name, {"localModels": models}
                ):
                    # Only fields the installed CRD drops would change: nothing to send.
                    assert current is not None
                    self._set_lmn(write.name, dataclasses.replace(current, local_models=write.models))
                    return
                stored = await self._patch_node(write.name, models, retained)
        except NotFound:
            self._dirty_nodes.add(write.name)  # gone meanwhile: the next pass sees why
            return
        if "spec" in stored:  # a whole answer (a handed-over create in memory answers without)
            self._learn(LOCAL_MODEL_NODE, write.name, {"localModels": models}, stored["spec"])
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

    def _learn(self, kind: ResourceKind, name: str, patch: JSON, stored: object) -> None:
        new = self._sticking.learn(kind.kind, name, patch, stored)
        if new:
            fields = ", ".join(".".join(p) for p in sorted(new))
            log.info(
                "%s: the API server does not keep %s (its CRD does not name them: KServe's?); "
                "they are not written again",
                kind.plural,
                fields,
            )

    async def _write_status(self, write: StatusWrite) -> None:
        kind = _KINDS[write.kind]
        retry = self._no_status.get(kind.kind)
        if retry is not None and time.monotonic() < retry:
            return  # no status subresource: looked at again later
        if self._sticking.futile(kind.kind, write.key, write.patch):
            # Only fields the installed CRD drops would change: nothing to send.
            known_cache = self._view.caches.get(write.key) if kind is not LOCAL_MODEL_NODE_GROUP else None
            if known_cache is not None and write.status is not None:
                self._observe_spec(
                    self._view.caches, write.key, dataclasses.replace(known_cache, status=write.status)
                )
            return
        is_cache = kind is not LOCAL_MODEL_NODE_GROUP
        known = (self._view.caches if is_cache else self._view.groups).get(write.key)
        try:
            stored, fast = await self._send_status(kind, write, known)
        except NotFound:
            await self._status_missing(kind, write.name, namespace=write.namespace)
            return
        if retry is not None:
            del self._no_status[kind.kind]
            log.info("%s: /status answers again; status is written", kind.plural)
        if stored is not None:
            self._status_written(kind, write, known, stored, fast=fast)

    async def _send_status(
        self, kind: ResourceKind, write: StatusWrite, known: LocalModelCache | LocalModelNodeGroup | None
    ) -> tuple[JSON | None, bool]:
        """The object as stored after the status write (None: nothing to change), and whether it was
        written over the view's resourceVersion. Raises NotFound."""
        ns = write.namespace
        if known is not None and known.metadata.resource_version:
            # The plan diffed against the view: written guarded by the view's resourceVersion,
            # no read first (a read copies a status of thousands of node entries). A stale view
            # costs a Conflict, then the read-compute-write below.
            try:
                stored = await self.state.patch_status(
                    kind,
                    write.name,
                    dict(write.patch),
                    namespace=ns,
                    resource_version=known.metadata.resource_version,
                )
                return stored, True
            except Conflict:
                pass

        def compute(current: JSON) -> JSON | None:
            status = current.get("status") or {}
            return None if merge_patch(status, write.patch) == status else dict(write.patch)

        return await update_status(self.state, kind, write.name, compute, namespace=ns), False

    def _status_written(
        self,
        kind: ResourceKind,
        write: StatusWrite,
        known: LocalModelCache | LocalModelNodeGroup | None,
        stored: JSON,
        *,
        fast: bool,
    ) -> None:
        """Keeps the view in step with a status the API server stored."""
        self._learn(kind, write.key, dict(write.patch), section_of(stored, "status"))
        if fast and write.status is not None and isinstance(known, LocalModelCache):
            # Written over the view's version: its spec is the view's and its status the plan's.
            # Taking both as they are spares parsing a status of thousands of node entries.
            self._wrote(kind.kind)
            meta = ObjectMeta.from_json(stored.get("metadata"))
            self._observe_spec(
                self._view.caches, write.key, dataclasses.replace(known, metadata=meta, status=write.status)
            )
            return
        self._wrote(kind.kind)
        self.observe(kind, WatchEvent("MODIFIED", stored))

    async def _status_missing(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> None:
        """A /status write answered 404: the object is gone (its DELETED event follows), or the
        installed CRD has no status subresource (KServe's LocalModelNodeGroup): then the kind's
        status is not written until ``settings.status_retry`` seconds have passed."""
        try:
            await self.state.get(kind, name, namespace=namespace)
        except NotFound:
            return
        if kind.kind not in self._no_status:
            log.info(
                "%s: the installed CRD has no status subresource (KServe's?); their status is not "
                "written (tried again in %.0fs)",
                kind.plural,
                self.settings.status_retry,
            )
        self._no_status[kind.kind] = time.monotonic() + self.settings.status_retry

    async def _write_finalizer(self, key: str, *, add: bool) -> None:
        """Add or remove the cache's finalizer (KServe's, per kind), guarded by resourceVersion."""
        namespace, name = split_key(key)
        kind = LOCAL_MODEL_CACHE if namespace is None else LOCAL_MODEL_NAMESPACE_CACHE
        finalizer = FINALIZER if namespace is None else NAMESPACE_CACHE_FINALIZER
        for attempt in range(5):
            known = self._view.caches.get(key) if attempt == 0 else None
            if known is not None and known.metadata.resource_version:
                # The view is as fresh as the last watch event or our own write: try it first, a
                # stale one costs a Conflict and a read (500 reads were a tenth of a full pass).
                m = known.metadata
                current: JSON = {
                    "metadata": {
                        "name": name,
                        **({"namespace": namespace} if namespace else {}),
                        "finalizers": list(m.finalizers),
                        "resourceVersion": m.resource_version,
                        **({"deletionTimestamp": m.deletion_timestamp} if m.deletion_timestamp else {}),
                    }
                }
            else:
                try:
                    current = await self.state.get(kind, name, namespace=namespace)
                except NotFound:
                    self._view.caches.pop(key, None)
                    return
            finalizers = list(current["metadata"].get("finalizers") or [])
            if (finalizer in finalizers) == add:
                return
            finalizers = [*finalizers, finalizer] if add else [f for f in finalizers if f != finalizer]
            try:
                # Lists replace whole in a merge patch: guard against another writer's finalizer.
                stored = await self.state.patch(
                    kind,
                    name,
                    {"metadata": {"finalizers": finalizers or None}},
                    namespace=namespace,
                    resource_version=current["metadata"]["resourceVersion"],
                )
            except Conflict:
                continue
            except NotFound:
                stored = None
            else:
                self._wrote(kind.kind)
            if stored is None or (not finalizers and current["metadata"].get("deletionTimestamp")):
                self.observe(kind, WatchEvent("DELETED", current))
            elif known is not None and known.status.to_json() == (stored.get("status") or {}):
                # Only metadata changed: no need to parse a status of thousands of node entries.
                meta = ObjectMeta.from_json(stored.get("metadata"))
                self._observe_spec(self._view.caches, key, dataclasses.replace(known, metadata=meta))
            else:
                self.observe(kind, WatchEvent("MODIFIED", stored))
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
            message = contest_message(
                len(self._foreign.get(name, ())),
                self.settings.contest_window,
                writer,
                self.settings.field_manager,
            )
            compute = functools.partial(
                contest_status, writer=writer, message=message, now=self.settings.clock()
            )
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
        await self._record(
            _KINDS[event.kind],
            event.name,
            event.uid,
            event.type,
            event.reason,
            event.message,
            namespace=event.namespace,
        )

    async def _record(
        self,
        kind: ResourceKind,
        name: str,
        uid: str | None,
        type_: str,
        reason: str,
        message: str,
        *,
        namespace: str | None = None,
    ) -> None:
        """``namespace``: a namespaced object's own (its Events live there)."""
        body = event_body(
            involved=kind,
            name=name,
            uid=uid,
            reason=reason,
            message=message,
            type_=type_,
            component=COMPONENT,
            now=self.settings.clock(),
            namespace=namespace or self.settings.event_namespace,
        )
        try:
            await record_event(self.state, self._events, body)
            self._wrote(EVENT.kind)
        except ClusterStateError as e:
            # An Event is best effort: losing one must not stop a reconcile.
            self._write_failed()
            log.warning("cannot record event %s on %s: %s", reason, name, e)

    # -- the loop ------------------------------------------------------------------------------

    async def run(  # noqa: C901 - the wait, the resync and the retry timer share the loop's state
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
        await self._first_pass(stop, retry_delay)
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
                delay = backoff(failures, retry_delay, self.settings.retry_max)
                retry_at = loop.time() + delay
                self._full = True
                log.warning("reconcile failed (%s); retrying in %.1fs", failed or "a write gave up", delay)
        finally:
            stopping.cancel()
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, stopping, return_exceptions=True)

    async def _first_pass(self, stop: asyncio.Event, retry_delay: float) -> None:
        """Load and reconcile everything until it succeeds or ``stop`` is set. The first pass fails
        like any other when the API server goes away meanwhile: retried on the same timer, never
        the end of the process."""
        failures = 0
        while not stop.is_set():
            try:
                await self.load()
                await self.reconcile(full=True)
                return
            except ClusterStateError as e:
                failures += 1
                delay = backoff(failures, retry_delay, self.settings.retry_max)
                log.warning("first reconcile failed (%s); retrying in %.1fs", e, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _pump(
        self,
        kind: ResourceKind,
        queue: asyncio.Queue[tuple[ResourceKind, WatchEvent]],
        retry_delay: float,
        resync: float,
    ) -> None:
        # What the view holds of this kind: load()'s list, then what came since. The watch's first
        # list is a difference against it, so an object deleted between load() and that list (or
        # while the watch was down) comes as DELETED, not left in the view until a resync.
        held = {object_key(o): o for o in self._loaded.pop(kind, ())}
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
                    known=list(held.values()),
                ):
                    if event.type == "DELETED":
                        held.pop(object_key(event.object), None)
                    else:
                        held[object_key(event.object)] = event.object
                    self._missing.discard(kind)
                    queue.put_nowait((kind, event))
            except ClusterStateError as e:
                if isinstance(e, NotFound) and kind in OPTIONAL:
                    self._lacks(kind)  # e.g. KServe not installed (yet): look again now and then
                    await asyncio.sleep(max(retry_delay, self.settings.optional_retry))
                    continue
                log.warning("watch of %s failed, restarting: %s", kind.plural, e)
                await asyncio.sleep(retry_delay)


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds before retry number ``failures`` (1, 2, ...): ``base`` doubling per failure up to
    ``cap``, less up to a fifth of it at random (jitter)."""
    delay = min(cap, base * 2.0 ** (failures - 1))
    return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not a secret
