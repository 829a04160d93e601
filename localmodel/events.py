"""Kubernetes Events, as the agent and the controller write them: one shape in one place."""

from __future__ import annotations

import secrets

from localmodel.kinds import JSON, ResourceKind

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
        "message": message[:1024],  # the API server refuses longer messages
        "source": source,
        "reportingComponent": component,
        **({"reportingInstance": host} if host else {}),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
