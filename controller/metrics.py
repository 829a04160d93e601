"""The controller's Prometheus metrics, and the small aiohttp server that exposes them. They live in
a registry passed in (tests build a fresh one); docs/metrics.md lists every one of them.

``modelcache_controller_copies`` is the per node group view of each LocalModelCache's copies (and
each LocalModelNamespaceCache's: its ``namespace`` label names its namespace, empty for a cluster
cache, so two namespaces' caches of one name stay apart): set from every reconcile's plan, so it
is current in the leader only (a standby replica keeps no series; ``modelcache_controller_is_leader``
tells which replica leads). Series of caches and groups that are gone are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from localmodel.cliargs import parse_addr
from localmodel.errors import InvalidInput
from localmodel.resources import Copies, split_key

log = logging.getLogger("modelcache.controller")

# A reconcile takes milliseconds on a small cluster, seconds on thousands of nodes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RECONCILE_KINDS = ("full", "incremental")
COPY_STATES = ("available", "total", "failed")
DEFAULT_METRICS_ADDR = ":9091"


Role = Literal["leader", "standby", "single", "standalone"]


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` says: 200 when ``ready``, else 503; the body names the role and why."""

    ready: bool
    role: Role
    reason: str
    api_seconds_ago: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "role": self.role,
            "reason": self.reason,
            "apiSecondsAgo": None if self.api_seconds_ago is None else round(self.api_seconds_ago, 1),
        }


def readiness(*, role: Role, api_seconds_ago: float | None, window: float, fenced: bool) -> Readiness:
    """Whether this replica can do its job now.

    Rules: standalone (no API server) is always ready. Otherwise the API server must have answered
    (anything but a 5xx or 429) within ``window`` seconds; a leader must also hold its Lease
    fresh (``fenced`` False: renewed within the renew deadline, so its writes go out). A standby's
    job is to take over, for which a reachable API is all it needs.
    """
    if role == "standalone":
        return Readiness(True, role, "standalone: no API server to reach")
    if api_seconds_ago is None or api_seconds_ago > window:
        since = "never" if api_seconds_ago is None else f"not for {api_seconds_ago:.0f}s"
        return Readiness(False, role, f"the API server answered {since} (limit {window:g}s)", api_seconds_ago)
    if role == "leader" and fenced:
        return Readiness(False, role, "leader whose Lease is not renewed: writes are held", api_seconds_ago)
    return Readiness(True, role, f"API server reachable; {role}", api_seconds_ago)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "modelcache_controller_reconciles",
            "Reconcile passes, by kind (full: everything; incremental: only what changed). Failed "
            "passes count too (see modelcache_controller_write_errors_total).",
            ["kind"],
            registry=registry,
        )
        self.reconcile_seconds = Histogram(
            "modelcache_controller_reconcile_duration_seconds",
            "Wall time of a reconcile pass: planning plus the writes it makes.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.writes = Counter(
            "modelcache_controller_writes",
            "Objects written (created, patched, deleted), by kind (LocalModelNode, LocalModelCache, "
            "LocalModelNodeGroup, Node, PersistentVolume, PersistentVolumeClaim, Event).",
            ["kind"],
            registry=registry,
        )
        self.write_errors = Counter(
            "modelcache_controller_write_errors",
            "Writes that failed (the reconcile is retried; a lost Event is not).",
            registry=registry,
        )
        self.is_leader = Gauge(
            "modelcache_controller_is_leader",
            "1 while this replica leads (reconciles and writes), 0 while it waits.",
            registry=registry,
        )
        self.copies = Gauge(
            "modelcache_controller_copies",
            "Copies of each LocalModelCache (namespace empty) and LocalModelNamespaceCache per node "
            "group, by state: available (downloaded), total (nodes that must hold it), failed "
            "(download error).",
            ["cache", "namespace", "group", "state"],
            registry=registry,
        )
        for kind in RECONCILE_KINDS:
            self.reconciles.labels(kind=kind)  # both series exist from the start, at 0
        self._copies: dict[tuple[str, str], Copies] = {}

    def set_copies(self, copies: Mapping[tuple[str, str], Copies]) -> None:
        """The whole picture, (cache key, group) -> copies: series of pairs not in it are removed.
        A key is :func:`localmodel.resources.cache_key` (``<namespace>/<name>`` for a namespace
        cache: its labels ``namespace`` and ``cache``)."""
        for key, group in set(self._copies) - set(copies):
            namespace, cache = split_key(key)
            for state in COPY_STATES:
                self.copies.remove(cache, namespace or "", group, state)
        for (key, group), c in copies.items():
            if self._copies.get((key, group)) == c:
                continue
            namespace, cache = split_key(key)
            ns = namespace or ""
            self.copies.labels(cache, ns, group, "available").set(c.available)
            self.copies.labels(cache, ns, group, "total").set(c.total)
            self.copies.labels(cache, ns, group, "failed").set(c.failed)
        self._copies = dict(copies)


# Seconds a connection may take to send a request's whole headers, from its opening or its previous
# answer (also the idle keep-alive limit): a scrape sends them at once, a slow client holds nothing.
HEADER_TIMEOUT = 10.0


class MetricsServer:
    """Serves ``GET /metrics`` (the Prometheus text format) over plain HTTP, and ``GET /readyz``
    (200 or 503 with a :class:`Readiness` as JSON) when given ``ready``; a connection that has not
    sent whole headers within ``header_timeout`` seconds is closed (aiohttp's default is an hour)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        addr: str,
        ready: Callable[[], Readiness] | None = None,
        *,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.host, self.port = parse_addr(addr, flag="--metrics-addr")
        self.header_timeout = header_timeout
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            resp = web.Response(body=generate_latest(self.registry))
            resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return resp

        async def readyz(_: web.Request) -> web.Response:
            state = self.ready() if self.ready is not None else Readiness(True, "single", "no check")
            return web.json_response(state.to_json(), status=200 if state.ready else 503)

        app = web.Application(client_max_size=64 * 1024)  # a GET has no body to speak of
        app.add_routes([web.get("/metrics", metrics), web.get("/readyz", readyz)])
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=self.header_timeout)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise InvalidInput(f"--metrics-addr: cannot listen on {self.host}:{self.port}: {e}") from e
        self._runner = runner
        addresses = runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("metrics listening on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
