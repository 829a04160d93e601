"""The embedded cluster state: in memory, with the API server's semantics, optionally persisted.

What standalone mode runs on (no Kubernetes): the same documents a user would ``kubectl apply`` are
loaded into it, and the agent and controller use it exactly as they use the API server, through
:class:`~localmodel.state.base.ClusterState`. It keeps a bounded history of changes so watches can
resume from a resourceVersion, and answers Gone for one older than that history, as etcd compaction
makes a real server do.

A stored object is never changed in place once stored (a write stores a new one, sharing the
subtrees it did not touch), so the store and the history share them; callers get deep copies
(reads, watch events, a write's answer), as they would get their own parse of a server's JSON.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from functools import partial
from pathlib import Path

from localmodel.errors import AlreadyExists, Conflict, Gone, InvalidName, NotFound, SpecError
from localmodel.k8snames import path_segment_error
from localmodel.kinds import JSON, KINDS_BY_NAME, ResourceKind
from localmodel.mergepatch import clone, merge_patch
from localmodel.state.base import ObjectList, Selector, WatchEvent
from localmodel.timestamps import utc_now

Key = tuple[str, str | None, str]  # (kind, namespace, name)


class MemoryState:
    """In-memory ClusterState. ``persist_to`` keeps a JSON snapshot after every write."""

    def __init__(self, *, persist_to: Path | None = None, history: int = 10_000) -> None:
        self._objects: dict[Key, JSON] = {}
        self._rv = 0
        self._history: deque[tuple[int, str, WatchEvent]] = deque()
        self._history_limit = history
        self._compacted = 0  # events up to this resourceVersion are no longer kept
        self._changed = asyncio.Condition()
        self._persist_to = persist_to
        if persist_to is not None and persist_to.exists():
            self._restore(persist_to)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> JSON:
        obj = self._objects.get(self._key(kind, name, namespace))
        if obj is None:
            raise NotFound(f"{kind.kind} {name!r} not found")
        return clone(obj)

    async def list(
        self, kind: ResourceKind, *, namespace: str | None = None, selector: Selector | None = None
    ) -> ObjectList:
        items = [
            clone(obj)
            for (k, ns, _), obj in sorted(self._objects.items(), key=lambda kv: _sort_key(kv[0]))
            if k == kind.kind
            and (namespace is None or ns == namespace)
            and (selector is None or selector.matches(obj))
        ]
        return ObjectList(items, str(self._rv))

    async def watch_raw(
        self,
        kind: ResourceKind,
        *,
        resource_version: str,
        namespace: str | None = None,
        selector: Selector | None = None,
    ) -> AsyncIterator[WatchEvent]:
        since = int(resource_version or 0)
        if since < self._compacted:
            raise Gone(f"resourceVersion {since} is too old (history kept from {self._compacted})")
        while True:
            for rv, k, event in list(self._history):
                if rv <= since:
                    continue
                # Past every event seen, whatever its kind: else writes to other kinds would make
                # the wait below return at once forever (a busy loop).
                since = rv
                if k != kind.kind:
                    continue
                meta = event.object["metadata"]
                if namespace is not None and meta.get("namespace") != namespace:
                    continue
                if selector is not None and not selector.matches(event.object):
                    continue
                yield WatchEvent(event.type, clone(event.object))
            async with self._changed:
                await self._changed.wait_for(partial(self._newer_than, since))
            if since < self._compacted:
                raise Gone(f"resourceVersion {since} was compacted; list again")

    def _newer_than(self, rv: int) -> bool:
        return self._rv > rv

    # -- writes --------------------------------------------------------------------------------

    async def create(
        self,
        kind: ResourceKind,
        obj: JSON,
        *,
        manager: str | None = None,
        handover: bool = False,
        created: str | None = None,
    ) -> JSON:
        """As the interface says; ``manager`` (what an API server takes from the writer's
        User-Agent) is recorded in ``metadata.managedFields`` as a real server records it. Handed
        over, ``obj`` is stored as it is (its top level and metadata are still our own copies).
        ``created``: the creationTimestamp to store (:meth:`apply`'s documents), else now."""
        obj = {**obj, "metadata": dict(obj.get("metadata") or {})} if handover else clone(obj)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError("is required", field="metadata.name")
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = self._key(kind, name, meta.get("namespace"))
        if key in self._objects:
            raise AlreadyExists(f"{kind.kind} {name!r} already exists")
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=created or utc_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if manager:
            _managed(obj, manager, kind, obj)
        stored = await self._store(kind, key, obj, "ADDED", answer=not handover)
        if handover:
            return {
                "metadata": clone(obj["metadata"]),
                **({"status": clone(obj["status"])} if "status" in obj else {}),
            }
        return stored

    async def patch(
        self,
        kind: ResourceKind,
        name: str,
        patch: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
        manager: str | None = None,
    ) -> JSON:
        key, current = self._current(kind, name, namespace, resource_version, patch)
        body = {k: v for k, v in patch.items() if k != "status" or not kind.has_status}
        updated = merge_patch(current, body)
        updated["metadata"] = dict(updated.get("metadata") or {})  # never the stored one's dict
        # Identity fields are the server's, whatever the patch says.
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"):
            if field in current["metadata"]:
                updated["metadata"][field] = current["metadata"][field]
        updated["apiVersion"], updated["kind"] = kind.api_version, kind.kind
        if updated.get("spec") != current.get("spec"):
            updated["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if updated["metadata"].get("deletionTimestamp") and not updated["metadata"].get("finalizers"):
            return await self._remove(kind, key, updated)
        if updated == current:
            return clone(current)
        if manager:
            _managed(updated, manager, kind, body)
        return await self._store(kind, key, updated, "MODIFIED")

    async def patch_status(
        self,
        kind: ResourceKind,
        name: str,
        status: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        key, current = self._current(kind, name, namespace, resource_version, None)
        updated = {**current, "metadata": dict(current["metadata"])}  # spec and others shared
        merged = merge_patch(current.get("status") or {}, status)
        if merged:
            updated["status"] = merged
        else:
            updated.pop("status", None)
        if updated == current:
            return clone(current)
        return await self._store(kind, key, updated, "MODIFIED")

    async def delete(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> None:
        key, current = self._current(kind, name, namespace, None, None)
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                updated = {**current, "metadata": dict(current["metadata"], deletionTimestamp=utc_now())}
                await self._store(kind, key, updated, "MODIFIED")
            return
        await self._remove(kind, key, current)

    async def close(self) -> None:
        return None

    async def restore(self, kind: ResourceKind, obj: JSON) -> None:
        """Store a copy of another store's object as it is (metadata kept): ``create`` would give
        it a new creationTimestamp, and admission goes by creation time, so a dry run of a real
        cluster must keep the real ones."""
        obj = clone(obj)
        meta = obj["metadata"]
        await self._store(kind, self._key(kind, meta["name"], meta.get("namespace")), obj, "ADDED")

    def compact(self) -> None:
        """Forget the change history, as etcd compaction does: every watch must relist (Gone)."""
        self._history.clear()
        self._compacted = self._rv + 1

    # -- bulk load (standalone) ----------------------------------------------------------------

    async def apply(self, kind: ResourceKind, objects: Iterable[JSON], *, prune: bool) -> None:
        """Make the specs of ``kind`` equal to ``objects`` (create or patch; delete others if
        ``prune``), keeping each object's status: what ``kubectl apply --prune`` does for a folder.
        A new object keeps the document's ``metadata.creationTimestamp`` when it gives one (the form
        :func:`localmodel.timestamps.utc_now` writes; :mod:`localmodel.documents` normalises it),
        as a dry run of a real cluster's objects must: admission goes oldest first."""
        # Keyed as stored: a namespaced kind's objects of one name in two namespaces are two
        # (LocalModelNamespaceCaches).
        wanted = {self._key(kind, o["metadata"]["name"], o["metadata"].get("namespace")): o for o in objects}
        for (_, ns, name), obj in wanted.items():
            try:
                current = await self.get(kind, name, namespace=ns)
            except NotFound:
                given = (obj.get("metadata") or {}).get("creationTimestamp")
                await self.create(kind, obj, created=given if isinstance(given, str) else None)
                continue
            patch = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
            # Keys the new document dropped must be removed, not kept by the merge.
            for k in current.get("spec") or {}:
                if k not in (obj.get("spec") or {}):
                    patch.setdefault("spec", {})[k] = None
            meta = obj.get("metadata") or {}
            patch["metadata"] = {
                "labels": meta.get("labels") or None,
                "annotations": meta.get("annotations") or None,
            }
            await self.patch(kind, name, patch, namespace=ns)
        if prune:
            for key in list(self._objects):
                if key[0] == kind.kind and key not in wanted:
                    await self.delete(kind, key[2], namespace=key[1])

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _key(kind: ResourceKind, name: str, namespace: str | None) -> Key:
        # What the API server refuses in a path is refused here too (InvalidName), so code that
        # passes here does not first fail against a real cluster.
        for what, value in (("name", name), ("namespace", namespace if kind.namespaced else None)):
            if value is not None and (why := path_segment_error(value)) is not None:
                raise InvalidName(f"{kind.kind} {what}: {why}")
        return (kind.kind, (namespace or "default") if kind.namespaced else None, name)

    def _current(
        self,
        kind: ResourceKind,
        name: str,
        namespace: str | None,
        resource_version: str | None,
        patch: JSON | None,
    ) -> tuple[Key, JSON]:
        key = self._key(kind, name, namespace)
        current = self._objects.get(key)
        if current is None:
            raise NotFound(f"{kind.kind} {name!r} not found")
        wanted = resource_version
        if wanted is None and patch is not None:
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise Conflict(
                f"{kind.kind} {name!r} was modified (resourceVersion "
                f"{current['metadata']['resourceVersion']}, not {wanted}); read it again"
            )
        return key, current

    async def _store(
        self, kind: ResourceKind, key: Key, obj: JSON, event: str, *, answer: bool = True
    ) -> JSON:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = obj
        return await self._emit(kind, event, obj, answer=answer)

    async def _remove(self, kind: ResourceKind, key: Key, obj: JSON) -> JSON:
        self._rv += 1
        obj = {**obj, "metadata": dict(obj["metadata"])}
        obj["metadata"]["resourceVersion"] = str(self._rv)
        del self._objects[key]
        return await self._emit(kind, "DELETED", obj)

    async def _emit(self, kind: ResourceKind, event: str, obj: JSON, *, answer: bool = True) -> JSON:
        # Shared with the store: stored objects are never changed in place (watchers get copies).
        self._history.append((self._rv, kind.kind, WatchEvent(event, obj)))  # type: ignore[arg-type]
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft()[0]
        self._persist()
        async with self._changed:
            self._changed.notify_all()
        return clone(obj) if answer else obj

    def _persist(self) -> None:
        if self._persist_to is None:
            return
        data = {"resourceVersion": self._rv, "objects": list(self._objects.values())}
        tmp = self._persist_to.with_name(self._persist_to.name + ".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(self._persist_to)  # atomic: a crash leaves the old snapshot or the new

    def _restore(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            self._rv = int(data["resourceVersion"])
            for obj in data["objects"]:
                kind = KINDS_BY_NAME[obj["kind"]]
                meta = obj["metadata"]
                self._objects[self._key(kind, meta["name"], meta.get("namespace"))] = obj
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SpecError(f"cannot restore the embedded state: {e}", where=str(path)) from e


def _managed(obj: JSON, manager: str, kind: ResourceKind, written: JSON) -> None:
    """Record ``manager``'s write in ``metadata.managedFields``, one Update entry per manager as an
    API server keeps them; the fields are the written top-level ones (a server lists every leaf)."""
    fields: JSON = {f"f:{k}": {} for k in written if k not in ("apiVersion", "kind", "status")}
    entry = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": kind.api_version,
        "time": utc_now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    meta = obj["metadata"]
    others = [e for e in meta.get("managedFields") or [] if e.get("manager") != manager]
    meta["managedFields"] = [*others, entry]


def _sort_key(key: Key) -> tuple[str, str, str]:
    return key[0], key[1] or "", key[2]
