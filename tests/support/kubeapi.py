"""A Kubernetes API emulator on 127.0.0.1: the REST surface and wire formats of a real API server.

Paths (``/api/v1/...``, ``/apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME[/status]]``), Status
bodies on errors, 201 on create, 409 AlreadyExists and 409 Conflict (a stale
``metadata.resourceVersion`` in a merge patch), 415 for patch types a real server refuses on custom
resources, ``/status`` isolation, label and field selectors, and watches as newline-delimited JSON
that resume from a resourceVersion and answer an expired one with an ERROR event carrying a 410
Status, as real servers do. Storage semantics (resourceVersions, finalizers, generation) come from
the embedded backend; ``expire_watches()`` makes every watch from now on answer 410 once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest_asyncio
from aiohttp import web

from localmodel.errors import AlreadyExists, ClusterStateError, Conflict, Gone, NotFound, SpecError
from localmodel.kinds import KINDS, ResourceKind
from localmodel.state.base import Selector
from localmodel.state.memory import MemoryState

BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


Match = Callable[[web.Request], bool]


def client(text: str) -> Match:
    """Requests whose User-Agent contains ``text`` (e.g. a process's ``pid 1234``)."""
    return lambda r: text in r.headers.get("User-Agent", "")


def writes(*methods: str) -> Match:
    """Requests that write (POST, PATCH, PUT, DELETE), or only those ``methods``."""
    wanted = set(methods or ("POST", "PATCH", "PUT", "DELETE"))
    return lambda r: r.method in wanted


def watches() -> Match:
    return lambda r: r.method == "GET" and r.query.get("watch") in ("true", "True", "1")


def path(text: str) -> Match:
    return lambda r: text in r.path


def every(*matches: Match) -> Match:
    return lambda r: all(m(r) for m in matches)


@dataclass
class Fault:
    """What requests that ``match`` get instead of (or before) their answer, while active: until
    ``until`` (time.monotonic) if given and at most ``times`` times if given."""

    match: Match
    status: int | None = None  # answered with this code and a Status body
    retry_after: float | str | None = None  # with status: a Retry-After header (a str as is)
    delay: float = 0.0  # seconds before the answer (or the fault)
    refuse: bool = False  # the connection is cut, no answer at all
    drop_watch: bool = False  # a watch is answered 200 and ends at once, without events
    expire_watch: bool = False  # a watch is answered with an ERROR event carrying 410
    until: float | None = None
    times: int | None = None
    hits: int = 0

    def active(self) -> bool:
        return (self.until is None or time.monotonic() < self.until) and (
            self.times is None or self.hits < self.times
        )


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic()
    method: str
    path_qs: str
    agent: str
    status: int | None = None  # None: refused or dropped
    watch: bool = False


def _manager(request: web.Request) -> str:
    return request.query.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]


def _selector(request: web.Request) -> Selector | None:
    def pairs(text: str) -> dict[str, str]:
        return dict(p.split("=", 1) for p in text.split(",") if "=" in p)

    labels = pairs(request.query.get("labelSelector", ""))
    fields = pairs(request.query.get("fieldSelector", ""))
    return Selector(labels, fields) if labels or fields else None


class KubeAPI:
    def __init__(self, *, without: frozenset[ResourceKind] = frozenset()) -> None:
        self.without = without  # kinds this cluster does not serve (a CRD not installed): 404
        self.store = MemoryState()
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self._expire = False
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Task[None]] = set()
        self.middlewares: list[Any] = []  # tests may add aiohttp middlewares before start()
        self.faults: list[Fault] = []
        self.calls: list[Call] = []
        self._watch_requests: dict[asyncio.Task[None], web.Request] = {}

    def inject(self, match: Match, *, seconds: float | None = None, **what: Any) -> Fault:
        """Start a fault (see :class:`Fault`) for ``seconds`` (None: until :meth:`heal`). A refused
        or dropped one also cuts the matching watches open now."""
        fault = Fault(match, until=None if seconds is None else time.monotonic() + seconds, **what)
        self.faults.append(fault)
        if fault.refuse or fault.drop_watch or fault.expire_watch:
            for task, request in list(self._watch_requests.items()):
                if match(request):
                    task.cancel()
        return fault

    def heal(self, fault: Fault | None = None) -> None:
        """End one fault, or all."""
        self.faults = [f for f in self.faults if fault is not None and f is not fault]

    def calls_by(self, text: str, *, since: float = 0.0) -> list[Call]:
        """The logged requests of the clients whose User-Agent contains ``text``."""
        return [c for c in self.calls if text in c.agent and c.at >= since]

    def expire_watches(self) -> None:
        """Like an etcd compaction: open watches end, and the next one answers 410 Gone."""
        self._expire = True
        for task in list(self._watches):
            task.cancel()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            for ns in ("", "/namespaces/{namespace}"):
                app.router.add_route("*", f"{prefix}{ns}/{{plural}}", self._collection)
                app.router.add_route("*", f"{prefix}{ns}/{{plural}}/{{name}}", self._item)
                app.router.add_route("*", f"{prefix}{ns}/{{plural}}/{{name}}/status", self._status_item)
        # A request a fault holds (a hung list) must not hold the test's teardown for aiohttp's
        # 60 s grace period: the server's shutdown cancels what is left after a second.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def close(self) -> None:
        # Open watch streams would otherwise hold the server's shutdown for its grace period.
        for task in list(self._watches):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        watch = request.method == "GET" and request.query.get("watch") in ("true", "True", "1")
        agent = request.headers.get("User-Agent", "")
        fault = next((f for f in self.faults if f.active() and f.match(request)), None)
        status: int | None = None
        try:
            if fault is not None:
                fault.hits += 1
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.refuse:
                    if request.transport is not None:
                        request.transport.abort()
                    raise asyncio.CancelledError  # nothing more is written on a cut connection
                if fault.status is not None:
                    response = _status(fault.status, "InjectedFault", f"injected fault {fault.status}")
                    if fault.retry_after is not None:
                        ra = fault.retry_after
                        response.headers["Retry-After"] = ra if isinstance(ra, str) else f"{ra:g}"
                    status = fault.status
                    return response
                if watch and (fault.drop_watch or fault.expire_watch):
                    stream = web.StreamResponse(headers={"Content-Type": "application/json"})
                    await stream.prepare(request)
                    if fault.expire_watch:
                        gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
                        await stream.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                    status = 200
                    return stream
            for extra in self.middlewares:
                handler = _bind(extra, handler)
            result: web.StreamResponse = await handler(request)
            status = result.status
            return result
        finally:
            self.calls.append(Call(time.monotonic(), request.method, request.path_qs, agent, status, watch))

    def _kind(self, request: web.Request) -> ResourceKind:
        m = request.match_info
        kind = BY_PATH.get((m.get("group", ""), m["version"], m["plural"]))
        if kind is None or kind in self.without:
            raise web.HTTPNotFound(
                text=json.dumps(
                    {
                        "kind": "Status",
                        "code": 404,
                        "message": "the server could not find the requested resource",
                    }
                )
            )
        return kind

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        kind = self._kind(request)
        ns = request.match_info.get("namespace")
        if request.method == "GET" and request.query.get("watch") in ("true", "True", "1"):
            return await self._watch(request, kind, ns)
        if request.method == "GET":
            listing = await self.store.list(kind, namespace=ns, selector=_selector(request))
            return web.json_response(
                {
                    "kind": f"{kind.kind}List",
                    "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": listing.resource_version},
                    "items": listing.items,
                }
            )
        if request.method == "POST":
            obj = await request.json()
            if ns:
                obj.setdefault("metadata", {})["namespace"] = ns
            try:
                stored = await self.store.create(kind, obj, manager=_manager(request))
                return web.json_response(stored, status=201)
            except AlreadyExists as e:
                return _status(409, "AlreadyExists", str(e))
            except SpecError as e:
                return _status(422, "Invalid", str(e))
        return _status(405, "MethodNotAllowed", request.method)

    async def _item(self, request: web.Request) -> web.StreamResponse:
        return await self._one(request, status=False)

    async def _status_item(self, request: web.Request) -> web.StreamResponse:
        return await self._one(request, status=True)

    async def _one(self, request: web.Request, *, status: bool) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        kind = self._kind(request)
        ns = request.match_info.get("namespace")
        name = request.match_info["name"]
        try:
            if request.method == "GET":
                return web.json_response(await self.store.get(kind, name, namespace=ns))
            if request.method == "DELETE":
                current = await self.store.get(kind, name, namespace=ns)
                await self.store.delete(kind, name, namespace=ns)
                return web.json_response(current)
            if request.method == "PATCH":
                ctype = request.content_type
                if ctype != "application/merge-patch+json" and not (
                    ctype == "application/strategic-merge-patch+json" and not kind.group
                ):
                    return _status(
                        415,
                        "UnsupportedMediaType",
                        f"unsupported patch type {ctype}; use application/merge-patch+json",
                    )
                patch: dict[str, Any] = await request.json()
                rv = (patch.get("metadata") or {}).get("resourceVersion")
                if status:
                    return web.json_response(
                        await self.store.patch_status(
                            kind, name, patch.get("status") or {}, namespace=ns, resource_version=rv
                        )
                    )
                stored = await self.store.patch(
                    kind, name, patch, namespace=ns, resource_version=rv, manager=_manager(request)
                )
                return web.json_response(stored)
        except NotFound as e:
            return _status(404, "NotFound", str(e))
        except Conflict as e:
            return _status(409, "Conflict", f"Operation cannot be fulfilled: {e}")
        except ClusterStateError as e:
            return _status(500, "InternalError", str(e))
        return _status(405, "MethodNotAllowed", request.method)

    async def _watch(self, request: web.Request, kind: ResourceKind, ns: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        rv = request.query.get("resourceVersion") or (await self.store.list(kind)).resource_version
        timeout = float(request.query.get("timeoutSeconds", "300"))
        if self._expire:
            self._expire = False
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": 410,
                "reason": "Expired",
                "message": f"too old resource version: {rv}",
            }
            await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
            return response

        async def stream() -> None:
            async for event in self.store.watch_raw(
                kind, resource_version=rv, namespace=ns, selector=_selector(request)
            ):
                await response.write(
                    json.dumps({"type": event.type, "object": event.object}).encode() + b"\n"
                )

        async def bounded() -> None:
            # stream() is made only once the task runs: one cancelled first leaves no coroutine behind.
            await asyncio.wait_for(stream(), timeout)

        task = asyncio.ensure_future(bounded())
        self._watches.add(task)
        self._watch_requests[task] = request
        try:
            await task
        except TimeoutError:
            pass  # timeoutSeconds reached: the stream ends, as a real server ends it
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # the request itself is going away
            # expire_watches() or inject() ended only this stream: the client reconnects
            if request.transport is not None and any(
                f.refuse and f.active() and f.match(request) for f in self.faults
            ):
                request.transport.abort()  # unreachable: the connection is cut, not ended
        except Gone as e:
            status = {"kind": "Status", "code": 410, "reason": "Expired", "message": str(e)}
            await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
        finally:
            self._watches.discard(task)
            self._watch_requests.pop(task, None)
        return response


def _bind(middleware: Any, handler: Any) -> Any:
    async def bound(request: web.Request) -> web.StreamResponse:
        result: web.StreamResponse = await middleware(request, handler)
        return result

    return bound


@pytest_asyncio.fixture
async def kube_api() -> AsyncIterator[KubeAPI]:
    api = KubeAPI()
    await api.start()
    try:
        yield api
    finally:
        await api.close()
