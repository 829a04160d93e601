"""A Kubernetes API emulator on 127.0.0.1: the REST surface and wire formats of a real API server.

Paths (``/api/v1/...``, ``/apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME[/status]]``), Status
bodies on errors, 201 on create, 409 AlreadyExists and 409 Conflict (a stale
``metadata.resourceVersion`` in a merge patch), 415 for patch types a real server refuses on custom
resources, ``/status`` isolation, label and field selectors, and watches as newline-delimited JSON
that resume from a resourceVersion and answer an expired one with an ERROR event carrying a 410
Status, as real servers do. Storage semantics (resourceVersions, finalizers, generation) come from
the embedded backend; ``expire_watches()`` makes every watch from now on answer 410 once.

CRD mode (:meth:`KubeAPI.install_crds`): a kind whose CustomResourceDefinition is installed is
served as the API server serves a custom resource with a structural schema: fields its
``openAPIV3Schema`` does not name are pruned on every write (create, update, patch, ``/status``),
``/status`` answers 404 when the CRD has no status subresource (and the main endpoint then writes
status, bumping ``metadata.generation``), create drops status when it has one, an update that
changes nothing after pruning stores nothing, and PUT needs a ``metadata.resourceVersion``. Kinds the
project does not know (a CRD's plural) are served too. Without a CRD, a kind keeps the lenient
behaviour above (nothing pruned).

Counting: every write request is logged in :attr:`KubeAPI.writes` (verb, resource, name, code, and
whether the stored object changed); :meth:`KubeAPI.write_counts` sums them per object, so a test can
assert that no write repeats once a controller has converged. Events are stored like any object,
core/v1 and events.k8s.io/v1 as two views of one storage (as a real server keeps them);
:meth:`KubeAPI.events` reads them back in the core/v1 view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
import yaml
from aiohttp import web

from localmodel.errors import AlreadyExists, ClusterStateError, Conflict, Gone, NotFound, SpecError
from localmodel.kinds import EVENT, JSON, KINDS, ResourceKind
from localmodel.mergepatch import clone, merge_patch, merge_patch_to
from localmodel.state.base import Selector
from localmodel.state.memory import MemoryState

BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}


def kubeconfig(path: Path, url: str, *, token: str = "test-token") -> Path:
    """Write a kubeconfig for the emulator at ``url`` (one cluster, one bearer-token user) to
    ``path``; returns ``path``."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


def _json(body: Any, status: int = 200) -> web.Response:
    # Bytes, so aiohttp adds no "; charset=utf-8": lightkube turns an error into ApiError only for
    # a Content-Type of exactly application/json, which is what a real server sends.
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return _json(body, status=code)


# -- CRD mode -------------------------------------------------------------------------------------

# What pruning never touches at the root of a resource, or of an x-kubernetes-embedded-resource.
_META_FIELDS = frozenset({"apiVersion", "kind", "metadata"})


def prune(value: Any, schema: JSON | None, *, root: bool = False) -> Any:
    """``value`` without the fields ``schema`` (an ``openAPIV3Schema``) does not specify: a copy.

    The rules of the API server's pruning of custom resources with structural schemas
    (kubernetes/apiextensions-apiserver, pkg/apiserver/schema/pruning/algorithm.go, ``prune`` and
    ``skipPrune`` at 1aa2717a552ee6ca1e2a18f1f8ffccde981db923, lines 57-149; applied to every object
    decoded from a request or from storage by ``unstructuredSchemaCoercer.apply`` in
    pkg/apiserver/customresource_handler.go, line 1434):

    - a map keeps the keys its ``properties`` name (each pruned by its own schema); with
      ``additionalProperties`` every key is kept and pruned by that schema; other keys are dropped,
      and a map with no schema at all loses every key;
    - ``x-kubernetes-preserve-unknown-fields: true`` keeps unknown keys, but known ones are still
      pruned by their schemas;
    - at the root (``root``) and in an ``x-kubernetes-embedded-resource``, ``apiVersion``, ``kind``
      and ``metadata`` are never pruned (ObjectMeta is coerced apart, to its known fields: all
      that this project writes);
    - list items are pruned by ``items``; scalars are kept (``anyOf``/``x-kubernetes-int-or-string``
      only validate values; structural schemas cannot add properties there).
    """
    if schema is not None and schema.get("x-kubernetes-preserve-unknown-fields") is True:
        return _prune_known(value, schema, root=root)
    if isinstance(value, dict):
        if schema is None:
            return {}
        embedded = root or schema.get("x-kubernetes-embedded-resource") is True
        props: JSON = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: JSON = {}
        for k, v in value.items():
            if embedded and k in _META_FIELDS:
                out[k] = clone(v)
            elif k in props:
                out[k] = prune(v, props[k])
            elif isinstance(extra, dict):
                out[k] = prune(v, extra)
            elif extra is True:  # not structural, but read as "anything goes"
                out[k] = clone(v)
        return out
    if isinstance(value, list):
        items = schema.get("items") if schema is not None else None
        return [prune(v, items if isinstance(items, dict) else None) for v in value]
    return value


def _prune_known(value: Any, schema: JSON, *, root: bool) -> Any:
    """``skipPrune``: unknown keys stay, known ones are pruned by their schemas."""
    if isinstance(value, dict):
        embedded = root or schema.get("x-kubernetes-embedded-resource") is True
        props: JSON = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: JSON = {}
        for k, v in value.items():
            if embedded and k in _META_FIELDS:
                out[k] = clone(v)
            elif k in props:
                out[k] = prune(v, props[k])
            elif isinstance(extra, dict):
                out[k] = prune(v, extra)
            else:
                out[k] = clone(v)
        return out
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            return [_prune_known(v, items, root=False) for v in value]
        return clone(value)
    return value


@dataclass(frozen=True)
class InstalledCRD:
    """One served version of an installed CustomResourceDefinition."""

    kind: ResourceKind  # has_status: whether the version has a status subresource
    schema: JSON | None  # its openAPIV3Schema; None: no schema (nothing pruned)
    group_resource: str  # "plural.group", as the server names it in messages


def load_crds(folder: Path) -> list[JSON]:
    """The CustomResourceDefinitions in the YAML files of ``folder`` (sorted by name)."""
    docs: list[JSON] = []
    for path in sorted(folder.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                docs.append(doc)
    return docs


def crd_versions(crd: JSON) -> list[InstalledCRD]:
    """The served versions of ``crd`` (an ``apiextensions.k8s.io/v1`` CustomResourceDefinition)."""
    spec = crd["spec"]
    group, names = spec["group"], spec["names"]
    out = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        kind = ResourceKind(
            group,
            version["name"],
            names["kind"],
            names["plural"],
            spec.get("scope", "Namespaced") == "Namespaced",
            has_status="status" in (version.get("subresources") or {}),
        )
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if spec.get("preserveUnknownFields") is True:
            schema = None  # apiextensions.k8s.io/v1beta1 leftovers: the server prunes nothing
        out.append(InstalledCRD(kind, schema, f"{names['plural']}.{group}"))
    return out


@dataclass(frozen=True)
class Write:
    """One write request, as the emulator answered it."""

    at: float  # time.monotonic()
    verb: str  # create | update | patch | delete (as the API server's audit log names them)
    resource: str  # the plural, with "/status" for the subresource
    namespace: str | None
    name: str
    code: int
    changed: bool  # the stored object changed (a new resourceVersion, or it was created or deleted)
    agent: str  # the client's User-Agent


# events.k8s.io/v1 is another view of the core/v1 Events (one storage): its fields renamed, as the
# API server converts them (kubernetes/kubernetes pkg/apis/events/v1/conversion.go,
# Convert_v1_Event_To_core_Event and back; the rest keep their names).
EVENTS_V1 = ResourceKind("events.k8s.io", "v1", "Event", "events", True, has_status=False)
_EVENT_FIELDS = {  # events.k8s.io/v1 -> core/v1
    "note": "message",
    "regarding": "involvedObject",
    "reportingController": "reportingComponent",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count",
}
_EVENT_FIELDS_BACK = {v: k for k, v in _EVENT_FIELDS.items()}
_EVENTS_V1_VIEW = web.RequestKey("events_v1_view", bool)  # the request came through events.k8s.io


def _event_to_core(body: JSON) -> JSON:
    out = {_EVENT_FIELDS.get(k, k): v for k, v in body.items()}
    out["apiVersion"] = "v1"
    return out


def _event_from_core(obj: JSON) -> JSON:
    out = {_EVENT_FIELDS_BACK.get(k, k): v for k, v in obj.items()}
    out["apiVersion"] = EVENTS_V1.api_version
    return out


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
    def __init__(self, *, without: frozenset[ResourceKind] = frozenset(), crds: Iterable[JSON] = ()) -> None:
        self.without = without  # kinds this cluster does not serve (a CRD not installed): 404
        self.store = MemoryState()
        self.served: dict[tuple[str, str, str], ResourceKind] = dict(BY_PATH)
        self.served[("events.k8s.io", "v1", "events")] = EVENTS_V1
        self.crds: dict[tuple[str, str, str], InstalledCRD] = {}  # (group, version, plural)
        self.writes: list[Write] = []
        self.install_crds(crds)
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self._expire = False
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Task[None]] = set()
        self.middlewares: list[Any] = []  # tests may add aiohttp middlewares before start()
        self.faults: list[Fault] = []
        self.calls: list[Call] = []
        self._watch_requests: dict[asyncio.Task[None], web.Request] = {}

    def install_crds(self, crds: Iterable[JSON]) -> None:
        """Serve each served version of these CustomResourceDefinitions in CRD mode (see the
        module's docstring), replacing what was installed for the same kind. Install before the
        objects are written: what is already stored is not pruned."""
        for crd in crds:
            for version in crd_versions(crd):
                key = (version.kind.group, version.kind.version, version.kind.plural)
                self.crds[key] = version
                self.served[key] = version.kind

    async def create(self, obj: JSON) -> JSON:
        """Create ``obj`` (its apiVersion and kind name the kind) as a POST would: pruned, and
        without status where its CRD has a status subresource. For seeding a test's objects."""
        group, _, version = obj["apiVersion"].rpartition("/")
        wanted = (group, version, obj["kind"])
        kinds = [k for k in self.served.values() if (k.group, k.version, k.kind) == wanted]
        if not kinds:
            raise LookupError(f"no served kind {obj['kind']} in {obj['apiVersion']}")
        kind = kinds[0]
        return await self.store.create(kind, self._admit_create(kind, obj))

    def write_counts(
        self, *, since: float = 0.0, changed: bool | None = None
    ) -> Counter[tuple[str, str, str]]:
        """How many write requests each object got since ``since`` (time.monotonic()), keyed
        ``(verb, resource, name)`` (resource: plural, "/status" appended for the subresource).
        ``changed``: only those that changed the stored object (True) or only those that did not
        (False, e.g. a patch whose fields were all pruned)."""
        return Counter(
            (w.verb, w.resource, w.name)
            for w in self.writes
            if w.at >= since and (changed is None or w.changed == changed)
        )

    async def events(self, *, reason: str | None = None, name: str | None = None) -> list[JSON]:
        """The stored Events (core/v1, every namespace), of one ``reason`` and one involved
        object's ``name`` if given."""
        return [
            e
            for e in (await self.store.list(EVENT)).items
            if (reason is None or e.get("reason") == reason)
            and (name is None or (e.get("involvedObject") or {}).get("name") == name)
        ]

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
        kind = self.served.get((m.get("group", ""), m["version"], m["plural"]))
        if kind is EVENTS_V1:
            request[_EVENTS_V1_VIEW] = True
            return EVENT  # one storage: the core view is what is stored
        gone = {(k.group, k.version, k.plural) for k in self.without}
        if kind is None or (kind.group, kind.version, kind.plural) in gone:
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

    def _crd(self, kind: ResourceKind) -> InstalledCRD | None:
        return self.crds.get((kind.group, kind.version, kind.plural))

    def _admit_create(self, kind: ResourceKind, obj: JSON) -> JSON:
        crd = self._crd(kind)
        if crd is None:
            return obj
        if crd.kind.has_status:
            # "create cannot set status": customResourceStrategy.PrepareForCreate,
            # kubernetes/apiextensions-apiserver pkg/registry/customresource/strategy.go:145-152.
            obj = {k: v for k, v in obj.items() if k != "status"}
        return prune(obj, crd.schema, root=True) if crd.schema is not None else obj

    def _log_write(
        self,
        request: web.Request,
        verb: str,
        kind: ResourceKind,
        name: str,
        code: int,
        changed: bool,
        *,
        status: bool = False,
    ) -> None:
        self.writes.append(
            Write(
                time.monotonic(),
                verb,
                kind.plural + ("/status" if status else ""),
                request.match_info.get("namespace"),
                name,
                code,
                changed,
                request.headers.get("User-Agent", ""),
            )
        )

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        kind = self._kind(request)
        ns = request.match_info.get("namespace")
        if request.method == "GET" and request.query.get("watch") in ("true", "True", "1"):
            return await self._watch(request, kind, ns)
        if request.method == "GET":
            listing = await self.store.list(kind, namespace=ns, selector=_selector(request))
            return _json(
                {
                    "kind": f"{kind.kind}List",
                    "apiVersion": EVENTS_V1.api_version if request.get(_EVENTS_V1_VIEW) else kind.api_version,
                    "metadata": {"resourceVersion": listing.resource_version},
                    "items": [_view(request, o) for o in listing.items],
                }
            )
        if request.method == "POST":
            obj = await _body(request)
            if ns:
                obj.setdefault("metadata", {})["namespace"] = ns
            name = str((obj.get("metadata") or {}).get("name") or "")
            try:
                stored = await self.store.create(
                    kind, self._admit_create(kind, obj), manager=_manager(request)
                )
                self._log_write(request, "create", kind, name, 201, True)
                return _json(_view(request, stored), status=201)
            except AlreadyExists as e:
                self._log_write(request, "create", kind, name, 409, False)
                return _status(409, "AlreadyExists", str(e))
            except SpecError as e:
                self._log_write(request, "create", kind, name, 422, False)
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
        crd = self._crd(kind)
        verb = {"PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(request.method)
        if status and crd is not None and not crd.kind.has_status:
            # A CRD without a status subresource serves no /status: NotFound, as
            # crdHandler.ServeHTTP answers a subresource it does not have
            # (kubernetes/apiextensions-apiserver pkg/apiserver/customresource_handler.go:346-357).
            if verb is not None:
                self._log_write(request, verb, kind, name, 404, False, status=True)
            return _status(404, "NotFound", f'{crd.group_resource} "{name}" not found')
        code, changed = 200, False
        try:
            if request.method == "GET":
                return _json(_view(request, await self.store.get(kind, name, namespace=ns)))
            if request.method == "DELETE":
                current = await self.store.get(kind, name, namespace=ns)
                await self.store.delete(kind, name, namespace=ns)
                changed = True
                return _json(_view(request, current))
            if request.method == "PATCH":
                ctype = request.content_type
                if ctype != "application/merge-patch+json" and not (
                    ctype == "application/strategic-merge-patch+json" and not kind.group
                ):
                    code = 415
                    return _status(
                        415,
                        "UnsupportedMediaType",
                        f"unsupported patch type {ctype}; use application/merge-patch+json",
                    )
                patch = await _body(request)
                rv = (patch.get("metadata") or {}).get("resourceVersion")
                if crd is not None:
                    stored, changed = await self._update(request, kind, crd, patch, status=status, put=False)
                    return _json(_view(request, stored))
                before = await self.store.get(kind, name, namespace=ns)
                if status:
                    stored = await self.store.patch_status(
                        kind, name, patch.get("status") or {}, namespace=ns, resource_version=rv
                    )
                else:
                    stored = await self.store.patch(
                        kind, name, patch, namespace=ns, resource_version=rv, manager=_manager(request)
                    )
                changed = _changed(before, stored)
                return _json(_view(request, stored))
            if request.method == "PUT":
                body = await _body(request)
                stored, changed = await self._update(request, kind, crd, body, status=status, put=True)
                return _json(_view(request, stored))
        except NotFound as e:
            code = 404
            return _status(404, "NotFound", str(e))
        except Conflict as e:
            code = 409
            return _status(409, "Conflict", f"Operation cannot be fulfilled: {e}")
        except SpecError as e:
            code = 422
            return _status(422, "Invalid", str(e))
        except ClusterStateError as e:
            code = 500
            return _status(500, "InternalError", str(e))
        finally:
            if verb is not None:
                self._log_write(request, verb, kind, name, code, changed, status=status)
        return _status(405, "MethodNotAllowed", request.method)

    async def _update(
        self,
        request: web.Request,
        kind: ResourceKind,
        crd: InstalledCRD | None,
        body: JSON,
        *,
        status: bool,
        put: bool,
    ) -> tuple[JSON, bool]:
        """A PATCH (merge ``body``) or PUT (replace by ``body``) as a real server runs it: the new
        object is computed whole, pruned by the CRD's schema, reduced to what the endpoint may
        change, and only the difference is stored: nothing at all when there is none, as etcd3's
        store skips a write whose bytes are unchanged (kubernetes/apiserver
        pkg/storage/etcd3/store.go:562, GuaranteedUpdate, at 24a394e516bfda066d7e2221d7d92c052de27c54)."""
        ns = request.match_info.get("namespace")
        name = request.match_info["name"]
        current = await self.store.get(kind, name, namespace=ns)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if put and rv is None and crd is not None:
            # customResourceStrategy.AllowUnconditionalUpdate is false for custom resources.
            raise SpecError("must be specified for an update", field="metadata.resourceVersion")
        has_status = crd.kind.has_status if crd is not None else kind.has_status
        if put:
            server_owned = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp")
            meta = dict(body.get("metadata") or {})
            meta.update({k: current["metadata"][k] for k in server_owned if k in current["metadata"]})
            target = {**body, "metadata": meta}
        else:
            target = merge_patch(current, body)
        if status:
            # Only status changes through /status (statusStrategy.PrepareForUpdate,
            # pkg/registry/customresource/status_strategy.go:67-91).
            target = {**current, "status": target.get("status")}
            if target["status"] is None:
                del target["status"]
        elif has_status:
            # The main endpoint cannot change status (customResourceStrategy.PrepareForUpdate,
            # pkg/registry/customresource/strategy.go:166-176).
            target = {k: v for k, v in target.items() if k != "status"}
            if "status" in current:
                target["status"] = current["status"]
        if crd is not None and crd.schema is not None:
            target = prune(target, crd.schema, root=True)
        diff = merge_patch_to(current, target)
        meta_diff = {
            k: v
            for k, v in (diff.pop("metadata", None) or {}).items()
            if k not in ("resourceVersion", "managedFields", "generation")
        }
        if meta_diff:
            diff["metadata"] = meta_diff
        if not diff:
            if rv is not None and rv != current["metadata"].get("resourceVersion"):
                raise Conflict(f"{kind.kind} {name!r} was modified; read it again")
            return current, False
        version = rv if rv is not None else current["metadata"].get("resourceVersion")
        if status:
            patch = diff.get("status")
            if patch is None:  # status removed: every key of it goes
                patch = {k: None for k in current.get("status") or {}}
            stored = await self.store.patch_status(kind, name, patch, namespace=ns, resource_version=version)
            return stored, _changed(current, stored)
        others = {k for k in diff if k not in ("metadata", "spec")}
        if crd is not None and others and "spec" not in diff:
            # Any change outside metadata bumps the generation of a custom resource
            # (customResourceStrategy.PrepareForUpdate, strategy.go:178-186); the store bumps it
            # for spec changes itself.
            diff.setdefault("metadata", {})["generation"] = current["metadata"].get("generation", 1) + 1
        writer = dataclasses.replace(kind, has_status=has_status)
        stored = await self.store.patch(
            writer, name, {**diff, "metadata": {**diff.get("metadata", {}), "resourceVersion": version}},
            namespace=ns, manager=_manager(request),
        )  # fmt: skip
        return stored, _changed(current, stored)

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
                    json.dumps({"type": event.type, "object": _view(request, event.object)}).encode() + b"\n"
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


async def _body(request: web.Request) -> JSON:
    body: JSON = await request.json()
    return _event_to_core(body) if request.get(_EVENTS_V1_VIEW) else body


def _view(request: web.Request, obj: JSON) -> JSON:
    return _event_from_core(obj) if request.get(_EVENTS_V1_VIEW) else obj


def _changed(before: JSON, after: JSON) -> bool:
    meta_before, meta_after = before.get("metadata") or {}, after.get("metadata") or {}
    return bool(meta_before.get("resourceVersion") != meta_after.get("resourceVersion"))


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
