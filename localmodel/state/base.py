"""The one small interface the agent and the controller use to read and write cluster state.

Two backends implement it: :mod:`localmodel.state.kube` (a Kubernetes API server) and
:mod:`localmodel.state.memory` (embedded, in memory, loaded from YAML). Objects cross this
interface as the plain JSON dicts Kubernetes stores (``apiVersion``, ``kind``, ``metadata``,
``spec``, ``status``); the kinds they name are in :mod:`localmodel.kinds`, typed views in
:mod:`localmodel.resources`.

Semantics both backends share (the behavioural tests in ``tests/test_state_backends.py`` run on both):

- ``metadata.resourceVersion`` changes on every write; a write that carries a stale one raises
  :class:`~localmodel.errors.Conflict`.
- ``patch`` merges (RFC 7386 JSON merge patch) into everything but ``status``; ``patch_status``
  merges into ``status`` only. ``None`` values delete keys.
- ``delete`` of an object with finalizers sets ``metadata.deletionTimestamp`` and keeps it until a
  patch empties ``metadata.finalizers``; then it is gone (a DELETED watch event).
- ``watch_raw`` streams changes after a resourceVersion and raises :class:`~localmodel.errors.Gone`
  when that version is too old; :func:`watch` on top of it lists, streams, and on any failure (and
  periodically) lists again and reports the difference, deletions included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from localmodel.errors import ClusterStateError, Conflict, NotFound
from localmodel.kinds import JSON, ResourceKind

log = logging.getLogger("modelcache.state")

_T = TypeVar("_T")
EventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    object: JSON


@dataclass(frozen=True)
class ObjectList:
    items: list[JSON]
    resource_version: str


@dataclass(frozen=True)
class Selector:
    """Label and field selectors, as the API takes them (``a=b,c!=d``; fields: ``metadata.name=x``)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)

    def label_string(self) -> str | None:
        return ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())) or None

    def field_string(self) -> str | None:
        return ",".join(f"{k}={v}" for k, v in sorted(self.fields.items())) or None

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata", {})
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in self.labels.items()):
            return False
        for path, want in self.fields.items():
            cur: Any = obj
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            if str(cur if cur is not None else "") != want:
                return False
        return True


class ClusterState(Protocol):
    """Get, list, watch, create, patch, patch status and delete objects of the kinds above."""

    async def get(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> JSON:
        """The object; raises NotFound."""
        ...

    async def list(
        self, kind: ResourceKind, *, namespace: str | None = None, selector: Selector | None = None
    ) -> ObjectList:
        """Every object of the kind (in ``namespace`` if given), with the list's resourceVersion."""
        ...

    def watch_raw(
        self,
        kind: ResourceKind,
        *,
        resource_version: str,
        namespace: str | None = None,
        selector: Selector | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Changes after ``resource_version``; may end (reconnect) and raises Gone when too old."""
        ...

    async def create(self, kind: ResourceKind, obj: JSON, *, handover: bool = False) -> JSON:
        """The created object; raises AlreadyExists. ``handover``: the caller never changes ``obj``
        (nor anything it holds) again, so a store in memory may keep it without a copy, and answer
        with the created object's ``metadata`` and ``status`` only (an API server answers whole)."""
        ...

    async def patch(
        self,
        kind: ResourceKind,
        name: str,
        patch: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        """Merge-patch metadata and spec; with ``resource_version`` raises Conflict when stale."""
        ...

    async def patch_status(
        self,
        kind: ResourceKind,
        name: str,
        status: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        """Merge-patch ``status`` only; with ``resource_version`` raises Conflict when stale."""
        ...

    async def delete(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> None:
        """Delete, or mark for deletion while finalizers remain; raises NotFound."""
        ...

    async def close(self) -> None: ...


async def watch(  # noqa: C901 - list, stream and retry share one loop's state (see docstring)
    state: ClusterState,
    kind: ResourceKind,
    *,
    namespace: str | None = None,
    selector: Selector | None = None,
    retry_delay: float = 1.0,
    max_delay: float = 60.0,
    relist_every: float | None = None,
    on_list: Callable[[], None] | None = None,
    known: Iterable[JSON] = (),
) -> AsyncGenerator[WatchEvent]:
    """List then watch, forever: the informer pattern without a cache of its own. (Over 80 lines
    because the list, the stream and the retry share one loop's state: the known set and the delay.)

    Starts with an ADDED event per existing object. When the stream ends it resumes from the last
    resourceVersion seen. On any error but NotFound (Gone, the API unreachable, a 5xx or 429, an
    ERROR event) it waits, lists again and reports the difference against the last known set:
    DELETED for objects that vanished meanwhile, ADDED for new ones, MODIFIED for the rest; so a
    level-triggered consumer never misses a state, a deletion included. Every ``relist_every``
    seconds (None: never) it lists and reports the difference the same way, whether or not the
    stream is healthy: the periodic resync that repairs anything a stream lost.

    Waits between failures grow per watch (this client, this kind): ``retry_delay`` seconds
    doubling up to ``max_delay``, each drawn from [half, all] of that (jitter, so that thousands of
    agents told 410 at once do not re-list in step); an API's ``Retry-After`` (on
    :class:`~localmodel.errors.Unavailable` as ``retry_after``) is waited at least. A stream that
    delivers an event resets them. NotFound (the kind is not served) is raised to the caller.
    ``on_list`` is called after each list: an empty list yields no event but is an answer too.
    ``known``: the objects the caller already holds (read by a list of its own before this watch
    started): the first list is reported as a difference against them, like a re-list, so an object
    deleted between the caller's list and this one comes out as DELETED rather than not at all.
    """
    # Without ``known`` the first list is all ADDED: the difference against nothing.
    last: dict[tuple[str | None, str], JSON] = {object_key(o): o for o in known}
    failures = 0
    loop = asyncio.get_running_loop()
    while True:
        try:
            listing = await state.list(kind, namespace=namespace, selector=selector)
        except NotFound:
            raise
        except ClusterStateError as e:
            failures += 1
            await _pause(kind, e, failures, retry_delay, max_delay)
            continue
        if on_list is not None:
            on_list()
        current = {object_key(o): o for o in listing.items}
        for key, obj in last.items():
            if key not in current:
                yield WatchEvent("DELETED", obj)
        for key, obj in current.items():
            yield WatchEvent("MODIFIED" if key in last else "ADDED", obj)
        last = current
        rv = listing.resource_version
        relist_at = None if relist_every is None else loop.time() + relist_every
        try:
            while True:
                started = loop.time()
                delivered = False
                stream = state.watch_raw(kind, resource_version=rv, namespace=namespace, selector=selector)
                try:
                    while True:
                        # The deadline bounds the wait for the next event only: never the consumer.
                        left = None if relist_at is None else relist_at - loop.time()
                        if left is not None and left <= 0:
                            raise TimeoutError
                        try:
                            async with asyncio.timeout(left):  # exited before the yield below
                                event = await anext(stream)
                        except StopAsyncIteration:
                            break
                        rv = event.object.get("metadata", {}).get("resourceVersion", rv)
                        if event.type == "DELETED":
                            last.pop(object_key(event.object), None)
                        else:
                            last[object_key(event.object)] = event.object
                        delivered = True
                        failures = 0
                        yield event
                finally:
                    await _close(stream)
                if not delivered and loop.time() - started < retry_delay:
                    # A stream the server ends at once, again and again: no reconnect storm.
                    failures += 1
                    await asyncio.sleep(_delay(failures, retry_delay, max_delay))
        except TimeoutError:
            continue  # the periodic re-list
        except NotFound:
            raise
        except ClusterStateError as e:
            failures += 1
            await _pause(kind, e, failures, retry_delay, max_delay)


def _delay(failures: int, retry_delay: float, max_delay: float) -> float:
    base: float = min(max_delay, retry_delay * 2.0 ** max(0, failures - 1))
    return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


async def _pause(
    kind: ResourceKind, error: ClusterStateError, failures: int, retry: float, cap: float
) -> None:
    delay = _delay(failures, retry, cap)
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, (int, float)):
        delay = max(delay, min(float(retry_after), cap))
    # The first of a run at WARNING; a storm of them must not flood the log.
    level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.INFO
    log.log(level, "watch of %s: %s; listing again in %.1fs", kind.plural, error, delay)
    await asyncio.sleep(delay)


async def _close(stream: AsyncIterator[WatchEvent]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def object_key(obj: JSON) -> tuple[str | None, str]:
    """(namespace or None, name): what tells two objects of one kind apart."""
    meta = obj.get("metadata", {})
    return meta.get("namespace"), meta["name"]


async def update_status(
    state: ClusterState,
    kind: ResourceKind,
    name: str,
    compute: Callable[[JSON], JSON | None] | Callable[[JSON], Awaitable[JSON | None]],
    *,
    namespace: str | None = None,
    attempts: int = 5,
) -> JSON | None:
    """Read, compute a status patch, write it guarded by resourceVersion; retry on Conflict.

    ``compute`` gets the current object (its own copy) and returns the merge patch for its status,
    or None when nothing needs writing (so no write happens at all).
    """
    for attempt in range(attempts):
        current = await state.get(kind, name, namespace=namespace)  # a copy of our own
        version = current["metadata"].get("resourceVersion")
        result = compute(current)
        patch = await result if isinstance(result, Awaitable) else result
        if patch is None:
            return None
        try:
            return await state.patch_status(kind, name, patch, namespace=namespace, resource_version=version)
        except Conflict:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05 * (2**attempt) * random.uniform(0.5, 1.5))  # noqa: S311
    return None  # pragma: no cover - the loop either returns or raises
