"""Leader election over a coordination.k8s.io/v1 Lease, as client-go does it, so that two replicas
of the controller never both write.

Every write to the Lease carries the resourceVersion it read, so of two candidates that saw it free
only one wins (the other gets Conflict). The leader renews every ``renew_every`` seconds; when it
cannot renew for ``renew_deadline`` seconds it stops its work and exits with 1 (the pod restarts as
a candidate) rather than risk a second writer, and a candidate takes a Lease over only when it
has seen no change to the Lease for ``lease_duration`` seconds on its own monotonic clock (client-go's
observedTime: the holder's written ``renewTime`` is never compared with our wall clock, so a skewed
clock cannot take a healthy leader's Lease). A renewal that gets no answer is abandoned at the
deadline, so a leader whose renewals hang stops and exits 1 too.

Every write of the leader is fenced (:class:`FencedState`): none goes out when more than
``renew_deadline`` seconds have passed on the monotonic clock since the start of the last successful
renewal. A process that was paused (SIGSTOP, a long GC or swap, a frozen VM) sees the jump at once,
before it has had a chance to notice a new holder, and the Lease's duration (longer than the
deadline) keeps a new holder out until then: client-go's rule, enforced per write rather than per
loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from localmodel.errors import AlreadyExists, ClusterStateError, Conflict, NotFound
from localmodel.kinds import JSON, LEASE, ResourceKind
from localmodel.state.base import ClusterState, ObjectList, Selector, WatchEvent
from localmodel.state.kube import KubeState

log = logging.getLogger("modelcache.controller.leader")

LEASE_NAME = "modelcache-controller"


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a MicroTime, as the API stores it


def _parse(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


class Fenced(ClusterStateError):
    """A write refused by this process itself: it cannot know it still holds the Lease."""

    status = 503


class LeaderElector:
    """Holds the Lease ``name`` in ``namespace`` as ``identity`` (default: ``pod_name``, which the
    entry point reads from $POD_NAME, else the host name, then 8 random hex digits)."""

    def __init__(
        self,
        state: ClusterState,
        *,
        namespace: str = "default",
        name: str = LEASE_NAME,
        identity: str | None = None,
        pod_name: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        renew_every: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.state = state
        self.namespace = namespace
        self.name = name
        host = pod_name or socket.gethostname()
        self.identity = identity or f"{host}_{secrets.token_hex(4)}"
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.renew_every = renew_every
        self.clock = clock
        self.monotonic = time.monotonic
        self.renewed_at: float | None = None  # monotonic start of the last successful renewal
        # The Lease record as last seen and the monotonic time it was first seen so (client-go's
        # observedRecord/observedTime): expiry is timed on our own clock, never the holder's.
        self._observed: JSON | None = None
        self._observed_at = 0.0
        self._fenced_logged = False

    def fence(self) -> None:
        """Raise :class:`Fenced` unless the Lease was renewed (by us) within ``renew_deadline``
        seconds, measured from the start of that renewal on the monotonic clock."""
        renewed = self.renewed_at
        if renewed is not None and self.monotonic() - renewed <= self.renew_deadline:
            self._fenced_logged = False
            return
        since = "never renewed" if renewed is None else f"last renewed {self.monotonic() - renewed:.1f}s ago"
        if not self._fenced_logged:
            self._fenced_logged = True
            log.error("not writing: the leader lease was %s (deadline %gs)", since, self.renew_deadline)
        raise Fenced(f"the leader lease was {since}; not writing")

    @property
    def leading(self) -> bool:
        """Whether writes may go out now (see :meth:`fence`)."""
        renewed = self.renewed_at
        return renewed is not None and self.monotonic() - renewed <= self.renew_deadline

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this identity holds the Lease afterwards (and ``renewed_at`` is
        the monotonic time the attempt started)."""
        started = self.monotonic()
        held = await self._acquire_or_renew()
        if held:
            self.renewed_at = started
        return held

    async def _acquire_or_renew(self) -> bool:
        now = self.clock()
        try:
            lease = await self.state.get(LEASE, self.name, namespace=self.namespace)
        except NotFound:
            body: JSON = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, transitions=0, acquired=now),
            }
            try:
                await self.state.create(LEASE, body)
            except AlreadyExists:
                return False
            self._observed, self._observed_at = body["spec"], self.monotonic()
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if spec != self._observed:
            self._observed, self._observed_at = spec, self.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = self.monotonic() > self._observed_at + duration
        if holder and holder != self.identity and not expired:
            return False
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        acquired = _parse(spec.get("acquireTime")) if mine else now
        written = self._spec(now, transitions=transitions, acquired=acquired or now)
        try:
            await self.state.patch(
                LEASE,
                self.name,
                {"spec": written},
                namespace=self.namespace,
                resource_version=lease["metadata"].get("resourceVersion"),
            )
        except Conflict:
            return False
        self._observed, self._observed_at = written, self.monotonic()
        return True

    def _spec(self, now: datetime, *, transitions: int, acquired: datetime) -> JSON:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": _fmt(acquired),
            "renewTime": _fmt(now),
            "leaseTransitions": transitions,
        }

    async def release(self) -> None:
        """Let the next candidate in at once instead of after the lease duration (only while the
        Lease is surely still ours: a fenced leader lets it expire)."""
        if not self.leading:
            return
        self.renewed_at = None  # no write of ours after this one
        try:
            lease = await self.state.get(LEASE, self.name, namespace=self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            await self.state.patch(
                LEASE,
                self.name,
                {"spec": {"holderIdentity": None, "leaseDurationSeconds": 1}},
                namespace=self.namespace,
                resource_version=lease["metadata"].get("resourceVersion"),
            )
        except ClusterStateError as e:
            log.warning("cannot release the leader lease: %s", e)

    async def run_while_leader(self, work: Callable[[asyncio.Event], Awaitable[int]]) -> int:
        """Wait to lead, then run ``work(stop)``; ``stop`` is set when leadership is lost. Returns
        the work's exit code, or 1 when leadership was lost."""
        while True:
            try:
                if await self.try_acquire_or_renew():
                    break
            except ClusterStateError as e:
                log.warning("leader election: %s", e)
            await asyncio.sleep(self.renew_every)
        log.info("leading as %s", self.identity)
        stop = asyncio.Event()
        task = asyncio.ensure_future(work(stop))
        last = self.renewed_at if self.renewed_at is not None else self.monotonic()
        lost = False
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.renew_every)
                if task.done():
                    break
                # A renewal the API server never answers must not outlast the deadline.
                left = max(0.1, last + self.renew_deadline - self.monotonic())
                try:
                    async with asyncio.timeout(left):
                        ok = await self.try_acquire_or_renew()
                except ClusterStateError as e:
                    log.warning("cannot renew the leader lease: %s", e)
                    ok = False
                except TimeoutError:
                    log.warning("cannot renew the leader lease: no answer within %.1fs", left)
                    ok = False
                now = self.monotonic()
                if ok and self.renewed_at is not None:
                    last = self.renewed_at
                elif now - last > self.renew_deadline or (not ok and await self._taken()):
                    log.error("lost the leader lease; stopping")
                    lost = True
                    stop.set()
                    await task
                    break
            code = task.result()
        finally:
            if not task.done():
                stop.set()
                task.cancel()
            if not lost:
                await self.release()
        return 1 if lost else code

    async def _taken(self) -> bool:
        try:
            async with asyncio.timeout(self.renew_every):
                lease = await self.state.get(LEASE, self.name, namespace=self.namespace)
        except (ClusterStateError, TimeoutError):
            return False
        holder = (lease.get("spec") or {}).get("holderIdentity")
        return bool(holder) and holder != self.identity


class FencedState:
    """A ClusterState whose writes (create, patch, patch_status, delete) pass ``elector.fence()``
    before every attempt; reads and watches go straight through."""

    def __init__(self, state: ClusterState, elector: LeaderElector) -> None:
        # A KubeState checks the fence again before every attempt (a 429's retry comes after a
        # wait that may outlast the lease); the check here covers the other backends.
        self.state: ClusterState = state.guarded(elector.fence) if isinstance(state, KubeState) else state
        self.elector = elector

    async def get(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> JSON:
        return await self.state.get(kind, name, namespace=namespace)

    async def list(
        self, kind: ResourceKind, *, namespace: str | None = None, selector: Selector | None = None
    ) -> ObjectList:
        return await self.state.list(kind, namespace=namespace, selector=selector)

    def watch_raw(
        self,
        kind: ResourceKind,
        *,
        resource_version: str,
        namespace: str | None = None,
        selector: Selector | None = None,
    ) -> AsyncIterator[WatchEvent]:
        return self.state.watch_raw(
            kind, resource_version=resource_version, namespace=namespace, selector=selector
        )

    async def create(self, kind: ResourceKind, obj: JSON, *, handover: bool = False) -> JSON:
        self.elector.fence()
        return await self.state.create(kind, obj, handover=handover)

    async def patch(
        self,
        kind: ResourceKind,
        name: str,
        patch: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        self.elector.fence()
        return await self.state.patch(
            kind, name, patch, namespace=namespace, resource_version=resource_version
        )

    async def patch_status(
        self,
        kind: ResourceKind,
        name: str,
        status: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        self.elector.fence()
        return await self.state.patch_status(
            kind, name, status, namespace=namespace, resource_version=resource_version
        )

    async def delete(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> None:
        self.elector.fence()
        await self.state.delete(kind, name, namespace=namespace)

    async def close(self) -> None:
        await self.state.close()
