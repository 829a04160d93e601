"""The agent's reconcile loop: one per node, the same for both backends.

Level-triggered: watch events on the node's LocalModelNode and on the node groups, the end of a
download and a periodic resync all wake one ``reconcile()``, which reads only in-memory state and the
disk, asks the pure planner (:mod:`agent.planner`) what to keep, fetch, delete and refuse, and acts.
Downloads run as tasks, at most ``max_downloads`` at once; the status is written by its own task at
most every ``status_interval`` seconds and only when it changed.

Safety: nothing is deleted until the node's LocalModelNode has been seen (no object is not "hold
nothing"); deletes go through :class:`agent.disk.CacheDir`, which only builds paths from storage keys,
deletes only folders a manifest of ours names and follows no link. Every failure of a download ends in
``ModelDownloadError`` with a reason, a log line, the failure metric and a retry with backoff: an
exception nobody foresaw too (reason ``DownloadFailed``), so no model stays ``ModelDownloading``.

Over 600 lines because one object owns the node's state for the reconcile, the downloads and the
deletes; its decisions live in agent.planner, agent.records and agent.status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from agent import records
from agent.credential_reader import CredentialReader, own_client, settings_for
from agent.credentials import JOB_NAMESPACE
from agent.desired import Desired, desired, retry_delay
from agent.disk import CacheDir, CompileCacheKept, Scan
from agent.download.adoption import AdoptResult, adopt, adopted_words, needs_adoption
from agent.download.client import HttpClient
from agent.download.listing import Listing
from agent.download.peers import Peer, PeerSettings
from agent.download.pull import http_client, pull
from agent.download.source_settings import SourceSettings
from agent.download.staging import Destination, LinkRefused, refuse_links
from agent.download.transfer import PullResult, TransferSettings
from agent.events import EventRecorder
from agent.metrics import AgentMetrics
from agent.peerfill import dropped_words, peer_source
from agent.planner import Disk, Plan, Refused, Want, plan
from agent.records import Record
from agent.status import CacheFindings, PeerState, node_limit, node_status
from agent.status_writer import StatusWriter, one_line
from agent.threads import BoundedExecutor
from localmodel.errors import (
    DiskFull,
    DownloadError,
    ForeignFolder,
    IntegrityError,
    InvalidInput,
    ModelcacheError,
    SpecError,
    URIError,
    from_os_error,
)
from localmodel.kinds import JSON, LOCAL_MODEL_NODE, LOCAL_MODEL_NODE_GROUP, ResourceKind
from localmodel.layout import STATE_FILE_VERSION
from localmodel.peering import manifest_digest
from localmodel.placement import Refusal
from localmodel.quantity import readable
from localmodel.resources import (
    DroppedPeer,
    LocalModelInfo,
    LocalModelNode,
    LocalModelNodeGroup,
    LocalModelNodeStatus,
    ModelState,
)
from localmodel.state.base import ClusterState, Selector, watch
from localmodel.timestamps import utc_now
from localmodel.uri import SourceURI, parse_uri, redact

# How long a stop (SIGTERM) waits for downloads to record their progress and for blocking work to
# end; the kubelet's default grace period is 30 s.
SHUTDOWN_GRACE = 10.0

log = logging.getLogger("modelcache.agent")


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    cache_dir: Path
    max_downloads: int = 2  # models fetched at once; connections are shared (transfer.concurrency)
    resync: float = 60.0
    status_interval: float = 2.0
    retry_base: float = 300.0  # a failed model is retried after 5 min, doubling to an hour
    retry_cap: float = 3600.0
    verify_on_start: bool = False
    # A model that leaves the spec is deleted only after this many seconds (another writer that
    # keeps rewriting the spec must not cause a delete and a fresh download each time).
    eviction_grace: float = 0.0
    # /readyz: not ready once the API server has not answered for this many seconds.
    ready_window: float = 60.0
    # --admission warn: a model over its node group's storageLimit is fetched while the filesystem
    # has room (agent.planner's overcommit rule), as the controller placed it in warn mode.
    overcommit: bool = False
    transfer: TransferSettings = field(default_factory=TransferSettings)
    sources: SourceSettings = field(default_factory=SourceSettings)
    # Where a cache's serviceAccountName and storage.key are looked up (KServe's jobNamespace).
    credentials_namespace: str = JOB_NAMESPACE
    # Peer fill, receiving side: on with --peer-token-file; ``peers`` is --peers (standalone).
    peer_fill: PeerSettings | None = None
    peers: tuple[Peer, ...] = ()


class _Progress:
    """The engine's progress sink, feeding a record and the byte counter."""

    def __init__(self, record: Record, metrics: AgentMetrics) -> None:
        self.record = record
        self.metrics = metrics

    def start(self, *, total_bytes: int, done_bytes: int, files: int) -> None:
        self.record.progress = records.sized(
            self.record.progress, total=total_bytes, done=done_bytes, files=files
        )

    def advance(self, nbytes: int) -> None:
        self.record.progress = records.advanced(self.record.progress, nbytes)
        self.metrics.bytes_downloaded.inc(nbytes)


class Kept(NamedTuple):
    """A deletion that was refused: ``what`` was left (the model's folder, or only its compile cache
    behind a link) and the line reported for it. Kept compile caches are re-checked each reconcile."""

    what: Literal["model", "compile-cache"]
    message: str


class _RefusedBySize(Exception):
    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.message)
        self.refused = refused


class Agent:
    def __init__(
        self,
        *,
        state: ClusterState,
        settings: AgentSettings,
        metrics: AgentMetrics,
        source_error: Callable[[], str | None] = lambda: None,
        refused: Callable[[], Sequence[Refusal]] = lambda: (),
        peer: Callable[[], PeerState | None] = lambda: None,
    ) -> None:
        self.state = state
        self.peer = peer  # --peer-addr: the peer server's address or why it serves nothing
        self.settings = settings
        self.metrics = metrics
        self.source_error = source_error  # standalone: why the documents could not be loaded
        # Standalone: caches the placement refused this node (no room in its group, a group that does
        # not exist). They never reach the LocalModelNode's spec, so the agent reports them itself.
        self.refused = refused
        self.reported_refusals: dict[str, str] = {}  # cache -> the message logged and sent as an Event
        self.cache = CacheDir(settings.cache_dir)
        self.events = EventRecorder(state, node_name=settings.node_name)
        self.records: dict[str, Record] = {}
        self.published: dict[str, int] = {}  # key -> bytes, trusted
        self.untrusted: set[str] = set()  # folders our manifest names that do not match it
        self.foreign: set[str] = set()  # models/<key> folders no manifest of ours names: never deleted
        self.links: set[str] = set()  # links found in the cache folder: never followed
        self.unwanted_since: dict[str, float] = {}  # key -> monotonic time it left the spec
        self.kept: dict[str, Kept] = {}  # key -> what of it was not deleted (reported, not retried)
        self.writer = StatusWriter(state, node_name=settings.node_name, layout=self.cache.layout, now=utc_now)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.removing: set[str] = set()  # keys cancelled because no longer wanted
        self.node: LocalModelNode | None = None
        # Kinds whose first list answered (exists or not): ready needs both.
        self.listed: set[str] = set()
        self.groups: dict[str, LocalModelNodeGroup] = {}
        self.desired = Desired((), None, False, {})
        self.config_error: str | None = None
        self.reported_config: str | None = None  # the group configuration error last sent as an Event
        self.once = False  # --once: a configuration that cannot settle ends the run (InvalidInput)
        self.last_plan: Plan | None = None
        self.scanned = False
        self.wake = asyncio.Event()
        self.slots = asyncio.Semaphore(max(1, settings.max_downloads))
        self.client: HttpClient | None = None
        self.credentials = CredentialReader(state, settings.credentials_namespace)
        self.stopping = False
        self.notices: set[asyncio.Task[None]] = set()  # Events sent from callbacks, held until sent

    # -- readiness -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.scanned and {LOCAL_MODEL_NODE.kind, LOCAL_MODEL_NODE_GROUP.kind} <= self.listed

    def readiness(self) -> tuple[bool, str]:
        """What ``/readyz`` says: ready once the disk is scanned and the node's objects were listed,
        and, against an API server, while it answered within ``ready_window`` seconds."""
        if not self.ready:
            return False, "cluster state not reached or disk not scanned"
        last = getattr(self.state, "last_answer", None)
        if last is not None and (ago := time.monotonic() - last) > self.settings.ready_window:
            return False, f"the API server has not answered for {ago:.0f} s"
        return True, "ok"

    async def _keep_api_answer_fresh(self) -> None:
        """A quiet agent's watches may say nothing for minutes: ask for its own LocalModelNode when
        the API server's last answer is half the readiness window old, so ``/readyz`` tells a
        quiet API server from a gone one (one small GET per node at most every 30 s by default)."""
        last = getattr(self.state, "last_answer", None)
        if last is None or time.monotonic() - last <= self.settings.ready_window / 2:
            return
        with contextlib.suppress(ModelcacheError):
            await self.state.get(LOCAL_MODEL_NODE, self.settings.node_name)

    def settled(self) -> bool:
        """Every desired model is published or failed/refused, and nothing runs: ``--once`` ends."""
        if not self.ready or not self.desired.known or self.tasks:
            return False
        return all(
            self.records.get(m.storage_key) is not None
            and self.records[m.storage_key].state in (ModelState.DOWNLOADED, ModelState.ERROR)
            for m in self.desired.models
        )

    def all_downloaded(self) -> bool:
        """Every desired model is published and the placement refused none (``--once``: exit 0)."""
        if self.refused():
            return False
        return all(
            (r := self.records.get(m.storage_key)) is not None and r.state is ModelState.DOWNLOADED
            for m in self.desired.models
        )

    # -- the whole life ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> int:
        """Until ``stop`` is set (SIGTERM) or, with ``once``, until every model is settled.
        Returns the exit code: 0, or 1 when ``once`` ends with a model not downloaded."""
        self.once = once
        self.cache.open()  # raises CacheLocked when another agent holds the folder
        # Blocking work runs where a stop waits for it a bounded time (agent.threads).
        asyncio.get_running_loop().set_default_executor(BoundedExecutor(grace=SHUTDOWN_GRACE))
        background: list[asyncio.Task[Any]] = []
        try:
            started = time.monotonic()
            scan = await asyncio.to_thread(self.cache.scan, verify=self.settings.verify_on_start)
            self._load_scan(scan)
            log.info(
                "scanned %s: %d published model(s), %d partial, %d untrusted, in %.3fs",
                self.settings.cache_dir,
                len(scan.published),
                len(scan.staged),
                len(scan.untrusted),
                time.monotonic() - started,
            )
            self.scanned = True
            self.client = http_client(self.settings.transfer)
            background = [
                asyncio.create_task(self._watch_node(), name="watch-node"),
                asyncio.create_task(self._watch_groups(), name="watch-groups"),
                asyncio.create_task(self._status_loop(), name="status"),
            ]
            stopper = asyncio.create_task(stop.wait())
            while not stop.is_set():
                if self.ready:
                    await self.reconcile()
                if once and self.settled():
                    break
                self.wake.clear()
                waker = asyncio.create_task(self.wake.wait())
                await asyncio.wait(
                    {waker, stopper}, timeout=self._next_wakeup(), return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
            stopper.cancel()
            return 0 if self.all_downloaded() else 1
        finally:
            self.stopping = True
            await self._shutdown(background)

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        # Downloads stop where they are: the engine syncs and records durable chunks on cancel,
        # so the next start resumes them.
        tasks = [*self.tasks.values(), *background]
        for task in tasks:
            task.cancel()
        if tasks:
            # A download whose cancel waits on a copy blocked in the kernel is not waited for long.
            await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the stop is what ended it
        with contextlib.suppress(ModelcacheError, OSError):
            await self.write_status(force=True)
        if self.client is not None:
            self.client.close()
        self.cache.close()

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        waits = [self.settings.resync]
        waits += [r.retry_at - now for r in self.records.values() if r.retry_at is not None]
        grace = self.settings.eviction_grace
        waits += [since + grace - now for since in self.unwanted_since.values()]
        return max(0.05, min(waits))

    def _load_scan(self, scan: Scan) -> None:
        for key, pub in scan.published.items():
            self.published[key] = pub.size
            rec = self.records.setdefault(key, records.new_record(key, pub.manifest.source_model_uri))
            rec.progress = records.published(
                rec.progress, size=pub.size, files=len(pub.manifest.files), revision=pub.manifest.revision
            )
        self.untrusted = set(scan.untrusted)
        self.foreign = set(scan.foreign)
        self.links = set(scan.links)
        for key in scan.untrusted:
            log.warning("models/%s does not match its manifest: not served, fetched again if wanted", key)
        for key in scan.foreign:
            log.warning(
                "models/%s has no manifest of modelcache: not served and never deleted; remove it by "
                "hand if it is not needed",
                key,
            )
        for path in scan.links:
            log.warning("%s is a symbolic link: not followed, not deleted; remove it", path)
        self._update_disk_metrics()

    # -- inputs --------------------------------------------------------------------------------

    async def _watch_node(self) -> None:
        selector = Selector(fields={"metadata.name": self.settings.node_name})
        await self._watch_forever(LOCAL_MODEL_NODE, selector, self._on_node)

    async def _watch_groups(self) -> None:
        await self._watch_forever(LOCAL_MODEL_NODE_GROUP, None, self._on_group)

    async def _watch_forever(
        self,
        kind: ResourceKind,
        selector: Selector | None,
        handle: Callable[[str, JSON], None],
    ) -> None:
        def listed() -> None:
            # The list answers "exists or not": an empty one is a real answer too.
            self.listed.add(kind.kind)
            self.wake.set()

        delay = 1.0
        while True:
            try:
                async for event in watch(
                    self.state, kind, selector=selector, on_list=listed, relist_every=self.settings.resync
                ):
                    handle(event.type, event.object)
                    self.wake.set()
                    delay = 1.0
            except ModelcacheError as e:
                log.warning("watching %s failed (%s); retrying in %.0fs", kind.plural, e, delay)
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)

    def _on_node(self, kind: str, obj: JSON) -> None:
        if obj.get("metadata", {}).get("name") != self.settings.node_name:
            return  # a server that ignores the field selector: never act on another node's object
        if kind == "DELETED":
            self.node = None
            return
        try:
            self.node = LocalModelNode.from_json(obj)
            self.events.uid = self.node.metadata.uid
            self.config_error = None
        except SpecError as e:
            # Keep acting on the last good object; say why in the status.
            self.config_error = f"LocalModelNode {self.settings.node_name}: {e}"
            log.warning("%s", self.config_error)

    def _on_group(self, kind: str, obj: JSON) -> None:
        name = obj.get("metadata", {}).get("name", "")
        if kind == "DELETED":
            self.groups.pop(name, None)
            return
        try:
            self.groups[name] = LocalModelNodeGroup.from_json(obj)
        except SpecError as e:
            log.warning("LocalModelNodeGroup %s ignored: %s", name, e)

    # -- reconcile -----------------------------------------------------------------------------

    async def reconcile(self) -> None:  # noqa: C901 - one pass in order; split with the adoption rework now changing it
        try:
            self.desired = desired(self.node, self.groups, cache_dir=self.settings.cache_dir)
        except SpecError as e:
            # A mismatched cache folder would make every model look missing: change nothing.
            if self.once:
                # Nothing can settle until the configuration changes, which --once never waits for.
                raise InvalidInput(str(e)) from None
            # Remembered apart from config_error: a node event clears that one (its own status
            # write is one), and the same message must not be logged and sent again.
            if self.reported_config != str(e):
                await self.events.emit("InvalidConfiguration", str(e), warning=True)
            self.reported_config = self.config_error = str(e)
            return
        if self.reported_config is not None:
            if self.config_error == self.reported_config:
                self.config_error = None
            self.reported_config = None
        d = self.desired
        wanted = {m.storage_key: m for m in d.models}
        await self._report_refusals()
        self._forget_what_was_cleared()
        if d.known:
            for key in list(self.tasks):
                if key not in wanted:
                    self.removing.add(key)
                    self.tasks[key].cancel()
        result = self._plan()
        self.last_plan = result
        for key in result.delete if d.known else ():
            if key in self.tasks:
                continue  # its cancellation finishes first; the next reconcile deletes it
            await self._delete(key)
        now = time.monotonic()
        by_name = {m.status_key: m for m in d.models}
        for r in result.refuse:
            model = by_name[r.name]
            rec = self._record(model.storage_key, model.source_model_uri)
            if rec.progress.reason != r.reason or rec.state is not ModelState.ERROR:
                self.metrics.refusals.labels(r.reason).inc()
                await self.events.emit("Refused", f"{r.name}: {r.message}", warning=True)
            rec.progress = records.failed(rec.progress, r.reason, r.message)
            if (task := self.tasks.get(model.storage_key)) is not None:
                task.cancel()  # staging is kept: it resumes if room appears
        for name in result.download:
            model = by_name[name]
            key = model.storage_key
            rec = self._record(key, model.source_model_uri)
            rec.warning = result.warnings.get(name, rec.warning)
            if key in self.tasks or (rec.retry_at is not None and rec.retry_at > now):
                continue
            try:
                parse_uri(model.source_model_uri)
            except URIError as e:
                # This model only: the node's other models go on (no retry mends the spec).
                if rec.progress.reason != "InvalidSourceURI" or rec.progress.message != str(e):
                    await self.events.emit("DownloadFailed", f"{name}: {e}", warning=True)
                    self.metrics.failures.labels("InvalidSourceURI").inc()
                rec.progress = records.failed(rec.progress, "InvalidSourceURI", str(e))
                continue
            rec.progress = records.queued(rec.progress)  # until a download slot is free
            self.tasks[key] = asyncio.create_task(
                self._download(
                    model.status_key,
                    key,
                    model.source_model_uri,
                    model.model_size.bytes if model.model_size else None,
                )
            )
        for name in result.keep:
            rec = self._record(by_name[name].storage_key, by_name[name].source_model_uri)
            rec.progress = records.kept(rec.progress)
        self.metrics.pending.set(
            sum(
                1
                for k in wanted
                if k not in self.published and self.records[k].state is not ModelState.DOWNLOADING
            )
        )
        self.metrics.limit_bytes.set(d.limit or 0)

    async def _report_refusals(self) -> None:
        """Each cache the placement refused this node: logged and sent as an Event once per reason."""
        current = {r.cache: r for r in self.refused()}
        for name in sorted(current):
            r = current[name]
            if self.reported_refusals.get(name) == r.message:
                continue
            self.reported_refusals[name] = r.message
            self.metrics.refusals.labels(r.reason).inc()
            # The Event's log line is the one log line.
            await self.events.emit(
                "Refused", f"{name}: not placed on this node ({r.reason}): {r.message}", warning=True
            )
        for name in set(self.reported_refusals) - set(current):
            del self.reported_refusals[name]
            log.info("%s: no longer refused", name)

    def _forget_what_was_cleared(self) -> None:
        """Links and foreign folders the user has removed since they were reported (a few lstat)."""
        root = self.settings.cache_dir
        self.links = {p for p in self.links if os.path.lexists(root / p)}
        self.foreign = {k for k in self.foreign if os.path.lexists(self.cache.layout.models / k)}
        for key in [k for k, why in self.kept.items() if why.what == "compile-cache"]:
            try:
                refuse_links(self.cache.layout.compile_cache_dir(key), below=root)
            except LinkRefused:
                continue
            del self.kept[key]  # the link is gone: nothing of ours is left behind it

    def _plan(self) -> Plan:
        wants = tuple(
            Want(
                name=m.status_key,
                key=m.storage_key,
                declared=m.model_size.bytes if m.model_size else None,
                real=rec.real_size if (rec := self.records.get(m.storage_key)) else None,
            )
            for m in self.desired.models
        )
        staged = {k: self.cache.staged_bytes(k) for k in self.cache.staged_keys() if k not in self.kept}
        for key in self.untrusted - set(self.kept):
            staged.setdefault(key, 0)
        for key in (self.foreign & {w.key for w in wants}) - set(self.kept):
            # A folder to adopt: what is in it already takes no new room.
            staged[key] = max(staged.get(key, 0), self.cache.folder_bytes(key))
        disk = Disk(published=dict(self.published), staged=staged, free=self.cache.free_bytes())
        return plan(
            wants,
            disk,
            limit=self.desired.limit,
            in_flight=frozenset(self.tasks),
            held=self._held({w.key for w in wants}, set(disk.published) | set(disk.staged)),
            overcommit=self.settings.overcommit,
        )

    def _held(self, wanted: set[str], on_disk: set[str]) -> frozenset[str]:
        """The models not wanted any more that are still in their grace period (see AgentSettings)."""
        now = time.monotonic()
        unwanted = on_disk - wanted
        for key in set(self.unwanted_since) - unwanted:
            del self.unwanted_since[key]  # wanted again, or gone
        for key in unwanted:
            self.unwanted_since.setdefault(key, now)
        grace = self.settings.eviction_grace
        return frozenset(k for k in unwanted if now - self.unwanted_since[k] < grace)

    def _record(self, key: str, uri: str) -> Record:
        rec = self.records.get(key)
        if rec is None:
            # redact() is SourceURI.redacted()'s rule on the text: a URI that does not parse still
            # gets a record, which carries its refusal (InvalidSourceURI).
            rec = self.records[key] = records.new_record(key, redact(uri))
        return rec

    async def _delete(self, key: str) -> None:
        was_published = key in self.published
        try:
            removed = await asyncio.to_thread(self.cache.delete, key)
        except CompileCacheKept as e:
            # The model is gone; only its compile cache, behind a link, is left: say exactly that.
            where = self.cache.layout.compile_cache_dir(key).relative_to(self.cache.layout.root)
            self.kept[key] = Kept("compile-cache", f"{where} was not deleted: {e}")
            log.warning("%s", self.kept[key].message)
            removed = e.removed
            await self._deleted(key, was_published, removed, keep=True)
            return
        except (LinkRefused, OSError) as e:
            # Not retried on every reconcile: reported until the agent restarts or the key is wanted.
            where = self.cache.layout.model_dir(key).relative_to(self.cache.layout.root)
            self.kept[key] = Kept("model", f"{where} was not deleted: {e}")
            log.warning("%s", self.kept[key].message)
            self.published.pop(key, None)
            self.untrusted.discard(key)
            return
        await self._deleted(key, was_published, removed, keep=False)

    async def _deleted(self, key: str, was_published: bool, removed: bool, *, keep: bool) -> None:
        """Record a delete that went through; ``keep``: leave the report in ``kept`` (its compile
        cache was not deleted)."""
        if not removed:
            self.foreign.add(key)
            log.warning("models/%s is no longer wanted but has no manifest of modelcache: kept", key)
        if not keep:
            self.kept.pop(key, None)
        self.published.pop(key, None)
        self.untrusted.discard(key)
        rec = self.records.pop(key, None)
        self.removing.discard(key)
        self._update_disk_metrics()
        if was_published:
            self.metrics.evictions.inc()
            what = rec.uri if rec else key
            await self.events.emit("Deleted", f"{what} (models/{key}) is no longer wanted on this node")

    # -- one download ----------------------------------------------------------------------------

    async def _download(self, name: str, key: str, uri_text: str, declared: int | None) -> None:
        rec = self.records[key]
        try:
            async with self.slots:
                await self._fetch(name, rec, uri_text, declared)
        except Exception as e:
            # The last resort: whatever went wrong (a bug included) ends as a failure that is shown,
            # counted and retried, never as a task that vanished with the model "downloading".
            log.error("%s: download failed unexpectedly: %s", name, one_line(e))
            log.debug("%s: the unexpected failure", name, exc_info=e)
            with contextlib.suppress(Exception):
                await self._failed(name, rec, DownloadError(f"{rec.uri}: {one_line(e)}"))
            if rec.state is not ModelState.ERROR:
                rec.progress = records.failed(rec.progress, "DownloadFailed", one_line(e))
        except asyncio.CancelledError:
            if key in self.removing:
                log.info("%s: no longer wanted; download cancelled", name)
            else:
                rec.progress = records.interrupted(rec.progress)
            if not self.stopping:
                self.tasks.pop(key, None)
                self.wake.set()
            raise
        self.tasks.pop(key, None)
        self.wake.set()

    async def _fetch(self, name: str, rec: Record, uri_text: str, declared: int | None) -> None:
        uri = parse_uri(uri_text)
        rec.progress = records.started(rec.progress, now=utc_now())
        rec.retry_at = None
        await self.events.emit("DownloadStarted", f"{name}: fetching {rec.uri} into models/{rec.key}")
        started = time.monotonic()
        dest = self.cache.destination(rec.key)
        self.metrics.in_flight.inc()
        try:
            if await asyncio.to_thread(needs_adoption, dest, rec.key):
                # Someone else's files at this key (KServe's agent's): checked and kept, not fetched.
                await self._adopted(name, rec, await self._adopt(name, rec, uri, dest))
                return
            if rec.key in self.untrusted:
                # The folder (ours: its manifest names it) no longer matches the manifest: without this
                # the pull would find the manifest up to date with the source and fetch nothing.
                await asyncio.to_thread(self.cache.delete, rec.key)
                self.untrusted.discard(rec.key)
            result = await self._pull(name, rec, uri, dest, declared)
        except _RefusedBySize as e:
            rec.progress = records.failed(rec.progress, e.refused.reason, e.refused.message)
            return
        except DownloadError as e:
            if isinstance(e, ForeignFolder):
                self.foreign.add(rec.key)
            await self._failed(name, rec, e)
            return
        except OSError as e:  # from the agent's own steps around the pull (the pull maps its own)
            await self._failed(name, rec, from_os_error(e))
            return
        finally:
            self.metrics.in_flight.dec()
        self.published[rec.key] = result.bytes_total
        self.untrusted.discard(rec.key)
        self.foreign.discard(rec.key)
        await self._sourced(rec, dest, result)  # before the state says Downloaded: shown together
        rec.progress = records.completed(
            rec.progress,
            size=result.bytes_total,
            files=result.files,
            revision=result.revision,
            # An up-to-date result checked nothing: the last counts stand.
            checked=None if result.up_to_date else (sum(result.hash_checked.values()), result.size_only),
            now=utc_now(),
        )
        rec.failures = 0
        self.metrics.completed.inc()
        self.metrics.download_seconds.observe(time.monotonic() - started)
        self._update_disk_metrics()
        how = (
            "already up to date"
            if result.up_to_date
            else f"{readable(result.bytes_total)} in {result.seconds:.1f}s"
        )
        await self.events.emit("DownloadCompleted", f"{name}: {rec.uri} is ready in models/{rec.key} ({how})")

    def _desired(self, rec: Record) -> LocalModelInfo | None:
        """The spec entry of the record's model (None: no longer wanted)."""
        return next((m for m in self.desired.models if m.storage_key == rec.key), None)

    @contextlib.asynccontextmanager
    async def _access(self, rec: Record) -> AsyncIterator[tuple[SourceSettings, HttpClient | None]]:
        """The source settings and client of the credentials the model's cache names, read at each
        attempt (a Secret created or rotated meanwhile is used by the next one); a client of their
        own where they need one, closed after."""
        info = self._desired(rec)
        found = await self.credentials.credentials(info) if info is not None else None
        client = own_client(found, self.settings.transfer)
        try:
            yield settings_for(self.settings.sources, found), client or self.client
        finally:
            if client is not None:
                client.close()

    async def _adopt(self, name: str, rec: Record, uri: SourceURI, dest: Destination) -> AdoptResult:
        """The adoption of one folder, with the credentials its cache names."""
        async with self._access(rec) as (sources, client):
            return await adopt(
                uri,
                dest,
                sources=sources,
                transfer=self.settings.transfer,
                progress=_Progress(rec, self.metrics),
                client=client,
                admit=lambda listing: self._admit(name, rec, listing),
                recheck=True,  # only what is not published (trusted) comes here
            )

    async def _pull(
        self, name: str, rec: Record, uri: SourceURI, dest: Destination, declared: int | None
    ) -> PullResult:
        """The pull of one model, with the credentials its cache names and, with peer fill on,
        the peers the controller lists for it (or --peers)."""
        info = self._desired(rec)
        rec.progress = records.peers_cleared(rec.progress)
        peers = peer_source(
            self.settings.peer_fill,
            self.settings.peers,
            info,
            lambda d: self._peer_dropped(name, rec, d, peers.peers if peers else ()),
        )
        async with self._access(rec) as (sources, client):
            return await pull(
                uri,
                dest,
                sources=sources,
                transfer=self.settings.transfer,
                progress=_Progress(rec, self.metrics),
                client=client,
                admit=lambda listing: self._admit(name, rec, listing),
                max_bytes=declared,
                peers=peers,
            )

    def _peer_dropped(self, name: str, rec: Record, dropped: DroppedPeer, peers: tuple[Peer, ...]) -> None:
        """A peer the download stopped using: in the status at once, counted, and an Event
        (PeerDropped) when it sent bad bytes."""
        rec.progress = records.peer_dropped(rec.progress, dropped)
        words = dropped_words(name, dropped, peers)
        self.metrics.peers_dropped.labels("failed" if words is None else "bad_bytes").inc()
        if words is not None:
            task = asyncio.get_running_loop().create_task(
                self.events.emit("PeerDropped", words, warning=True)
            )
            self.notices.add(task)
            task.add_done_callback(self.notices.discard)

    async def _sourced(self, rec: Record, dest: Destination, result: PullResult) -> None:
        """Where a completed download's bytes came from (status and counters), and the digest of
        the published manifest (what the controller passes to the next nodes as manifestSha256)."""
        published = await asyncio.to_thread(dest.published)
        digest = manifest_digest(published) if published is not None else None
        p = rec.progress
        if result.up_to_date:  # nothing moved: the last download's counts stand
            rec.progress = records.sourced(
                p,
                origin=p.bytes_from_origin,
                peers=p.bytes_from_peers,
                manifest_sha256=digest,
                dropped=p.peers_dropped,
            )
            return
        self.metrics.bytes_by_source.labels("origin").inc(result.bytes_from_origin)
        self.metrics.bytes_by_source.labels("peer").inc(result.bytes_from_peers)
        rec.progress = records.sourced(
            p,
            origin=result.bytes_from_origin,
            peers=result.bytes_from_peers,
            manifest_sha256=digest,
            dropped=result.peers_dropped,
        )

    async def _adopted(self, name: str, rec: Record, result: AdoptResult) -> None:
        """A folder someone else filled is ours now (:mod:`agent.download.adoption`): shown, counted
        and told like a completed download, with what was kept and fetched."""
        self.published[rec.key] = result.bytes_total
        self.untrusted.discard(rec.key)
        self.foreign.discard(rec.key)
        rec.progress = records.completed(
            rec.progress,
            size=result.bytes_total,
            files=result.files,
            revision=result.revision,
            checked=(result.verified, result.size_only),
            now=utc_now(),
        )
        rec.failures = 0
        self.metrics.completed.inc()
        if not result.up_to_date:
            self.metrics.bytes_adopted.inc(result.bytes_kept)
        self._update_disk_metrics()
        await self.events.emit("Adopted", f"{name}: {adopted_words(rec.uri, f'models/{rec.key}', result)}")

    def _admit(self, name: str, rec: Record, listing: Listing) -> None:
        """Called with the source's listing before any byte moves: the real size must fit too."""
        rec.real_size = listing.total_bytes
        rec.progress = records.listed(rec.progress, revision=listing.revision)
        result = self._plan()
        for refused in result.refuse:
            if refused.name == name:
                raise _RefusedBySize(refused)
        rec.warning = result.warnings.get(name)

    async def _failed(self, name: str, rec: Record, e: DownloadError) -> None:
        rec.failures += 1
        delay = retry_delay(rec.failures, base=self.settings.retry_base, cap=self.settings.retry_cap)
        rec.retry_at = time.monotonic() + delay
        retry_after = utc_now(after_s=delay)
        rec.progress = records.failed(rec.progress, e.reason, str(e), retry_after=retry_after)
        self.metrics.failures.labels(e.reason).inc()
        # Under --once the run ends once every model is settled: a failed one is not retried.
        retry = "not retried (--once)" if self.once else f"retry in {delay:.0f} s"
        log.warning("%s: download failed (%s): %s; %s", name, e.reason, one_line(e), retry)
        if isinstance(e, IntegrityError):
            self.metrics.verification_failures.inc()
        if isinstance(e, DiskFull) and rec.key not in self.published:
            # A download that cannot complete must not keep the space it took from the others.
            try:
                await asyncio.to_thread(self.cache.delete, rec.key)
            except (LinkRefused, OSError) as gone:
                log.warning("%s: its staging could not be removed: %s", name, one_line(gone))
        later = "not retried: --once" if self.once else f"retry in {_duration(delay)}"
        await self.events.emit("DownloadFailed", f"{name}: {e} ({later})", warning=True)

    # -- status --------------------------------------------------------------------------------

    def _update_disk_metrics(self) -> None:
        self.metrics.models_cached.set(len(self.published))
        self.metrics.bytes_cached.set(sum(self.published.values()))
        try:
            usage = shutil.disk_usage(self.settings.cache_dir)
        except OSError:
            return
        self.metrics.disk_capacity.set(usage.total)
        self.metrics.disk_available.set(usage.free)
        self.metrics.disk_used.set(usage.used)

    def node_status(self) -> LocalModelNodeStatus:
        """The status body, from what the loop knows (:func:`agent.status.node_status`)."""
        refused = self.refused()
        return node_status(
            desired=self.desired,
            progress={key: rec.shown() for key, rec in self.records.items()},
            refused=refused,
            limit=node_limit(self.desired, self.groups, refused),
            used=self.last_plan.used if self.last_plan else sum(self.published.values()),
            found=CacheFindings(
                links=frozenset(self.links),
                foreign=frozenset(self.foreign),
                kept={key: why.message for key, why in self.kept.items()},
                state_file_error=self.writer.file_error,
            ),
            config_problem=self.config_error or self.source_error(),
            generation=self.node.metadata.generation if self.node else None,
            peer=self.peer(),
        )

    async def _status_loop(self) -> None:
        while True:
            try:
                await self._keep_api_answer_fresh()
                await self.write_status()
            except (ModelcacheError, OSError) as e:
                log.warning("could not write the LocalModelNode status: %s", one_line(e))
            await asyncio.sleep(self.settings.status_interval)

    def snapshot(self) -> JSON:
        """What the state file, ``GET /status`` and ``modelcache status`` show."""
        return {
            "version": STATE_FILE_VERSION,
            "node": self.settings.node_name,
            "cacheDir": str(self.settings.cache_dir),
            "ready": self.ready,
            "status": self.node_status().to_json(),
        }

    async def write_status(self, *, force: bool = False) -> None:
        """The state file and the LocalModelNode's status (:class:`agent.status_writer.StatusWriter`),
        once ready (``force``: at shutdown too)."""
        if not self.ready and not force:
            return
        await self.writer.write(self.snapshot, node_known=lambda: self.node is not None)


def _duration(seconds: float) -> str:
    """A wait in words for an Event: '45 s', '5 min', '2 h' (never "0 min" for seconds)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
