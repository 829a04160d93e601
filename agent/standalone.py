"""Standalone mode's source of truth: LocalModelCache and LocalModelNodeGroup documents in a file or
folder, loaded into the embedded cluster state, with this node's LocalModelNode computed from them.
Secret and ServiceAccount documents (of ``--credentials-namespace``, or of no namespace) give a
cache's own credentials exactly as in a cluster (:mod:`agent.credentials`); they stay in memory.

The reconcile loop then watches the embedded state exactly as it watches an API server. The path is
polled (cheap: a stat per file) so an edit is picked up within ``interval`` seconds; a file that fails
to parse leaves the last good state in force and :attr:`error` says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from agent.credentials import JOB_NAMESPACE
from agent.desired import node_object, standalone_placement
from localmodel.documents import document_files, load_documents
from localmodel.errors import InvalidInput, NotFound
from localmodel.kinds import (
    JSON,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE,
    LOCAL_MODEL_NODE_GROUP,
    SECRET,
    SERVICE_ACCOUNT,
)
from localmodel.placement import Refusal
from localmodel.resources import LocalModelNodeGroup, parse_cache
from localmodel.state.memory import MemoryState

log = logging.getLogger("modelcache.agent")

KINDS = ("LocalModelCache", "LocalModelNamespaceCache", "LocalModelNodeGroup", "Secret", "ServiceAccount")


def _fingerprint(path: Path, exclude: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    """What the documents are now: only the files :func:`load_documents` reads, so the agent's own
    writes (a cache folder inside the documents' folder) never look like edits."""
    try:
        files = document_files(path, exclude=exclude)
    except InvalidInput:
        return ()
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


class StandaloneSource:
    def __init__(
        self,
        path: Path,
        *,
        node_name: str,
        labels: Mapping[str, str],
        state: MemoryState,
        interval: float = 1.0,
        exclude: tuple[Path, ...] = (),
        credentials_namespace: str = JOB_NAMESPACE,
        overcommit: bool = False,
    ) -> None:
        self.path = path
        # Secret and ServiceAccount documents of this namespace (or of none) are a cache's own
        # credentials; those of any other namespace are not read.
        self.credentials_namespace = credentials_namespace
        self.overcommit = overcommit  # --admission warn: placement admits over the limit
        self.exclude = exclude  # the cache folder, when it sits inside the documents' folder
        self.node_name = node_name
        self.labels = dict(labels)
        self.state = state
        self.interval = interval
        self.error: str | None = None
        self.loaded = False
        self.refused: tuple[Refusal, ...] = ()  # caches the placement refused this node, with why
        self._seen: tuple[tuple[str, int, int], ...] | None = None

    async def load(self, *, report: bool = True) -> bool:
        """Load the documents once; on a bad file keep the last good state and record why (logged
        unless ``report`` is off: a caller that exits on it says it once itself)."""
        if not self.path.exists():
            self._fail(f"{self.path} does not exist; pass a YAML file or folder to --standalone", report)
            return False
        self._seen = await asyncio.to_thread(_fingerprint, self.path, self.exclude)
        try:
            docs = await asyncio.to_thread(load_documents, self.path, kinds=KINDS, exclude=self.exclude)
            caches = [
                parse_cache(d.object)
                for d in docs
                if d.kind in (LOCAL_MODEL_CACHE, LOCAL_MODEL_NAMESPACE_CACHE)
            ]
            groups = [
                LocalModelNodeGroup.from_json(d.object) for d in docs if d.kind is LOCAL_MODEL_NODE_GROUP
            ]
        except InvalidInput as e:
            self._fail(f"{e} (the last good documents stay in force)" if self.loaded else str(e), report)
            return False
        for kind in (SECRET, SERVICE_ACCOUNT):
            objs = [self._in_namespace(d.object) for d in docs if d.kind is kind]
            await self.state.apply(kind, [o for o in objs if o is not None], prune=True)
        await self.state.apply(LOCAL_MODEL_NODE_GROUP, [g.to_json() for g in groups], prune=True)
        for kind in (LOCAL_MODEL_CACHE, LOCAL_MODEL_NAMESPACE_CACHE):
            await self.state.apply(kind, [c.to_json() for c in caches if c.kind is kind], prune=True)
        placement = standalone_placement(
            node_name=self.node_name,
            labels=self.labels,
            caches=caches,
            groups=groups,
            overcommit=self.overcommit,
        )
        node = node_object(placement)
        self.refused = placement.refused
        try:
            await self.state.get(LOCAL_MODEL_NODE, self.node_name)
        except NotFound:
            await self.state.create(LOCAL_MODEL_NODE, node)
        else:
            await self.state.patch(LOCAL_MODEL_NODE, self.node_name, {"spec": node["spec"]})
        if self.error is not None:
            log.info("%s loaded again; the error is gone", self.path)
        self.error = None
        self.loaded = True
        log.info(
            "standalone: %d cache(s), %d group(s); this node holds %d model(s)",
            len(caches),
            len(groups),
            len(node["spec"]["localModels"]),
        )
        return True

    def _in_namespace(self, obj: JSON) -> JSON | None:
        namespace = obj["metadata"].get("namespace") or self.credentials_namespace
        if namespace != self.credentials_namespace:
            return None
        return {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}

    def _fail(self, message: str, report: bool = True) -> None:
        if message != self.error and report:
            log.error("%s", message)
        self.error = message

    async def run(self) -> None:
        """Reload whenever a file under the path changes (added, removed, edited)."""
        while True:
            await asyncio.sleep(self.interval)
            current = await asyncio.to_thread(_fingerprint, self.path, self.exclude)
            if current != self._seen:
                await self.load()
