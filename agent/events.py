"""Kubernetes Events on the node's LocalModelNode: what ``kubectl describe localmodelnode`` shows.

An Event is best effort: failing to write one is logged and never stops the agent's work.
"""

from __future__ import annotations

import logging

from localmodel.errors import ModelcacheError
from localmodel.events import EventLog, event_body, record_event
from localmodel.kinds import LOCAL_MODEL_NODE
from localmodel.state.base import ClusterState
from localmodel.timestamps import utc_now

log = logging.getLogger("modelcache.agent")

COMPONENT = "modelcache-agent"


class EventRecorder:
    def __init__(self, state: ClusterState, *, node_name: str) -> None:
        self.state = state
        self.node_name = node_name
        self.uid: str | None = None  # the LocalModelNode's uid, once known
        self.log = EventLog()  # a repeat moves the count of its Event, as client-go's recorder does

    async def emit(self, reason: str, message: str, *, warning: bool = False) -> None:
        log.log(logging.WARNING if warning else logging.INFO, "%s: %s", reason, message)
        event = event_body(
            involved=LOCAL_MODEL_NODE,
            name=self.node_name,
            uid=self.uid,
            reason=reason,
            message=message,
            type_="Warning" if warning else "Normal",
            component=COMPONENT,
            now=utc_now(),
            host=self.node_name,
        )
        try:
            await record_event(self.state, self.log, event)
        except ModelcacheError as e:
            log.warning("could not record event %s: %s", reason, e)
