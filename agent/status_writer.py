"""Where the agent's status goes: the state file in the cache folder (``GET /status`` and
``modelcache status`` read it) and the LocalModelNode's status subresource.

One write at a time, in order: a writer cancelled mid-write (the status loop, at shutdown) leaves
its file write running in a thread, which would otherwise land after the next write and put the
older status back. A status equal to the last one written is not written again. The state file
failing (a full disk, a link planted in its place) does not keep the status from the cluster: it is
logged once and shown in the ``CacheFolderClean`` condition (:attr:`StatusWriter.file_error`).
What the API server does not keep of the status (KServe's CRD names only ``modelStatus``) is learnt
from each write's answer: a change in those fields alone is not written (:mod:`localmodel.sticking`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from agent.download.staging import LinkRefused, write_atomic
from agent.status import status_patch
from localmodel.kinds import JSON, LOCAL_MODEL_NODE
from localmodel.layout import CacheLayout
from localmodel.state.base import ClusterState, update_status
from localmodel.sticking import Sticking, section_of

log = logging.getLogger("modelcache.agent")


class StatusWriter:
    def __init__(
        self, state: ClusterState, *, node_name: str, layout: CacheLayout, now: Callable[[], str]
    ) -> None:
        """``now``: the time to stamp each state file with (RFC 3339, UTC)."""
        self.state = state
        self.now = now
        self.node_name = node_name
        self.layout = layout
        self.file_error: str | None = None  # why the state file was not written, until it is
        self.last_status: JSON | None = None
        self.pending: asyncio.Future[None] | None = None  # the last write, until it has landed
        self.sticking = Sticking()

    async def write(self, snapshot: Callable[[], JSON], *, node_known: Callable[[], bool]) -> None:
        """Write ``snapshot()`` (taken once the previous write has landed; its ``status`` is the
        LocalModelNode's) to the state file, and its status to the LocalModelNode when
        ``node_known()``."""
        if self.pending is not None and not self.pending.done():
            await asyncio.wait([self.pending])
        taken = snapshot()
        status = taken["status"]
        if status == self.last_status:
            return
        file_error = self.file_error
        self.pending = asyncio.ensure_future(self._write(taken, status, node_known))
        self.pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen below
        await asyncio.shield(self.pending)
        # A state file that failed (or recovered) just now changes the condition: written next time.
        self.last_status = status if self.file_error == file_error else None

    async def _write(self, snapshot: JSON, status: JSON, node_known: Callable[[], bool]) -> None:
        try:
            await asyncio.to_thread(
                write_atomic,
                self.layout.state_file,
                json.dumps({**snapshot, "updated": self.now()}, indent=1).encode(),
                below=self.layout.root,
            )
            self.file_error = None
        except (LinkRefused, OSError) as e:
            error = f"the state file {self.layout.state_file} was not written: {one_line(e)}"
            if error != self.file_error:
                log.warning("%s", error)
            self.file_error = error
        if node_known():
            await self._write_node(status)

    async def _write_node(self, status: JSON) -> None:
        name = self.node_name
        sent: list[JSON] = []

        def compute(current: JSON) -> JSON | None:
            patch = status_patch(current, status)
            self.sticking.take(LOCAL_MODEL_NODE.kind, name, section_of(current, "status"))
            if patch is None or self.sticking.futile(LOCAL_MODEL_NODE.kind, name, patch):
                return None
            sent.append(patch)
            return patch

        stored = await update_status(self.state, LOCAL_MODEL_NODE, name, compute)
        if stored is not None and sent:
            new = self.sticking.learn(LOCAL_MODEL_NODE.kind, name, sent[-1], section_of(stored, "status"))
            if new:
                log.info(
                    "the API server does not keep %s of the LocalModelNode status (its CRD does "
                    "not name them: KServe's?); a change in them alone is not written",
                    ", ".join(".".join(p) for p in sorted(new)),
                )


def one_line(e: BaseException) -> str:
    """An exception as one line: its type when it says nothing, control characters escaped."""
    text = str(e) or type(e).__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:500]
