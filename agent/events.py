"""Kubernetes Events on the node's LocalModelNode: what ``kubectl describe localmodelnode`` shows.

An Event is best effort: failing to write one is logged and never stops the agent's work.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from localmodel.errors import ModelcacheError
from localmodel.state.base import EVENT, LOCAL_MODEL_NODE, ClusterState

log = logging.getLogger("modelcache.agent")

COMPONENT = "modelcache-agent"
# Cluster-scoped objects have their Events in "default", as kubectl looks for them there.
EVENT_NAMESPACE = "default"


class EventRecorder:
    def __init__(self, state: ClusterState, *, node_name: str) -> None:
        self.state = state
        self.node_name = node_name
        self.uid: str | None = None  # the LocalModelNode's uid, once known

    async def emit(self, reason: str, message: str, *, warning: bool = False) -> None:
        log.log(logging.WARNING if warning else logging.INFO, "%s: %s", reason, message)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        involved = {"apiVersion": LOCAL_MODEL_NODE.api_version, "kind": LOCAL_MODEL_NODE.kind}
        involved["name"] = self.node_name
        if self.uid:
            involved["uid"] = self.uid
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{self.node_name}.{uuid.uuid4().hex[:16]}",
                "namespace": EVENT_NAMESPACE,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": self.node_name},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.state.create(EVENT, event)
        except ModelcacheError as e:
            log.warning("could not record event %s: %s", reason, e)
