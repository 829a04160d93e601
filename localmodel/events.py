"""Kubernetes Events, as the agent and the controller write them: one shape in one place, and one
way to repeat them (:class:`EventLog`, :func:`record_event`): one object per Event, its count moved."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

from localmodel.errors import NotFound
from localmodel.kinds import EVENT, JSON, ResourceKind
from localmodel.logs import redact_message
from localmodel.state.base import ClusterState

# Cluster-scoped objects have their Events in "default", where kubectl describe looks for them.
EVENT_NAMESPACE = "default"


def event_body(
    *,
    involved: ResourceKind,
    name: str,
    uid: str | None,
    reason: str,
    message: str,
    type_: str,  # Normal | Warning
    component: str,
    now: str,
    host: str | None = None,
    namespace: str = EVENT_NAMESPACE,
) -> JSON:
    source: JSON = {"component": component}
    if host:
        source["host"] = host
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": involved.api_version,
            "kind": involved.kind,
            "name": name,
            # A namespaced object's Events live in its namespace and name it (a
            # LocalModelNamespaceCache's); a cluster-scoped one's carry no namespace.
            **({"namespace": namespace} if involved.namespaced else {}),
            **({"uid": uid} if uid else {}),
        },
        "type": type_,
        "reason": reason,
        # Redacted (a library's error may quote a presigned URL); the API server refuses >1024.
        "message": redact_message(message)[:1024],
        "source": source,
        "reportingComponent": component,
        **({"reportingInstance": host} if host else {}),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


# -- repeats, as client-go's event recorder counts them ---------------------------------------------

# client-go's EventCorrelator keeps this many Events it recorded (maxLruCacheEntries).
EVENT_LOG_SIZE = 4096


def event_key(body: JSON) -> tuple[str, ...]:
    """What makes two Events the same one: client-go's ``getEventKey`` (kubernetes/client-go
    tools/record/events_cache.go at 928244b13ad2eb19a8a910669ec0bbb498cb74c1): the source's
    component and host, the involved object's kind, namespace, name, field path, uid and apiVersion,
    the type, the reason and the message."""
    source = body.get("source") or {}
    involved = body.get("involvedObject") or {}
    return (
        str(source.get("component", "")),
        str(source.get("host", "")),
        *(str(involved.get(k, "")) for k in ("kind", "namespace", "name", "fieldPath", "uid", "apiVersion")),
        str(body.get("type", "")),
        str(body.get("reason", "")),
        str(body.get("message", "")),
    )


@dataclass(frozen=True)
class Occurrence:
    name: str  # the Event object's name
    count: int
    first: str  # firstTimestamp


class EventLog:
    """The Events a recorder wrote, as client-go's ``eventLogger`` keeps them (same file:
    ``eventObserve``): an Event seen again is the same object with ``count`` one more and
    ``lastTimestamp`` moved (a patch), not a new object. Least recently used entries go past
    ``size``; a process that starts again starts a new object, as client-go does. No I/O."""

    def __init__(self, size: int = EVENT_LOG_SIZE) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[str, ...], Occurrence] = OrderedDict()

    def correlate(self, body: JSON) -> tuple[JSON, JSON | None]:
        """The Event to record and, for a repeat, the merge patch that records it on the existing
        object (None: create ``body`` as it is)."""
        key = event_key(body)
        seen = self._seen.get(key)
        if seen is None:
            self._put(key, Occurrence(body["metadata"]["name"], 1, str(body.get("firstTimestamp"))))
            return body, None
        count = seen.count + 1
        self._put(key, Occurrence(seen.name, count, seen.first))
        event = {
            **body,
            "metadata": {**body["metadata"], "name": seen.name},
            "count": count,
            "firstTimestamp": seen.first,
        }
        patch = {"count": count, "lastTimestamp": body.get("lastTimestamp"), "message": body.get("message")}
        return event, patch

    def forget(self, body: JSON) -> None:
        """The Event object is gone (expired: an API server keeps Events an hour by default)."""
        self._seen.pop(event_key(body), None)

    def _put(self, key: tuple[str, ...], value: Occurrence) -> None:
        self._seen[key] = value
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)


async def record_event(state: ClusterState, events: EventLog, body: JSON) -> None:
    """Record ``body`` (:func:`event_body`): created the first time, a repeat patched onto the
    same object (``count``, ``lastTimestamp``); a repeat whose object is gone is created again with
    count 1, as client-go's ``recordToSink`` does. Raises what the state raises."""
    event, patch = events.correlate(body)
    meta = event["metadata"]
    if patch is not None:
        try:
            await state.patch(EVENT, meta["name"], patch, namespace=meta.get("namespace"))
            return
        except NotFound:
            events.forget(body)
            event, _ = events.correlate(body)
    await state.create(EVENT, event, handover=True)  # made for this write alone
