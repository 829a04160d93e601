"""The admission webhooks over HTTPS (AdmissionReview v1): the I/O around :mod:`controller.admission`.

Served by every replica of the controller, leader or not (the API server calls whichever the
Service picks), so each request reads what it needs from the cluster state itself rather than from
the leader's view: for a pod, its cache and group (two GETs) and the nodes labelled ready for that
model (one list by label selector) and the controller's serving claims in its namespace (one list by
label selector) and, for each of its cache's claim names that is not one of them, whether KServe made
it (one GET each); for a cache, the caches and groups. Certificates come from a
folder holding ``tls.crt`` and ``tls.key`` (a mounted Secret, as cert-manager writes it) and are
reloaded when they change, so a renewed certificate needs no restart.

Paths: ``POST /mutate/pods``, ``POST /mutate/localmodelcaches``, ``POST /validate/localmodelcaches``
(LocalModelNamespaceCaches too, by the review's kind),
``POST /validate/localmodelnodegroups``, ``GET /healthz``.

Bounds (with ``failurePolicy: Fail`` a few slow clients must not hold the endpoint): a connection
must end its TLS handshake within ``Limits.handshake_timeout`` of opening, send a request's headers
within ``Limits.header_timeout`` of the handshake or of its previous response (the same timer closes
an idle keep-alive connection), the body within ``Limits.body_timeout``, at most ``Limits.max_body``
bytes of it (a larger ``Content-Length`` is a 413 at once), and serves at most
``Limits.max_requests`` requests. A body that is not JSON, or nested too deep to parse, is a 400;
an object of the wrong shape is an AdmissionReview answer ``allowed: false`` naming the field,
never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from controller.admission import (
    Verdict,
    place_pod,
    pod_ask,
    review_response,
    shape_error,
    validate_cache,
    validate_group,
)
from controller.defaults import default_cache
from controller.demand import deletion_verdict
from controller.labels import MODEL_LABEL_VALUE, model_label
from controller.serving import MANAGED_BY, MANAGED_BY_LABEL, claim_name
from controller.views import named_cache
from localmodel import cliargs
from localmodel.errors import ClusterStateError, InvalidInput, NotFound, SpecError
from localmodel.kinds import (
    INFERENCE_SERVICE,
    JSON,
    LLM_INFERENCE_SERVICE,
    LOCAL_MODEL_CACHE,
    LOCAL_MODEL_NAMESPACE_CACHE,
    LOCAL_MODEL_NODE_GROUP,
    NODE,
    PERSISTENT_VOLUME_CLAIM,
)
from localmodel.resources import (
    LOCALMODEL_LABEL,
    LocalModelCache,
    LocalModelNamespaceCache,
    LocalModelNodeGroup,
    Node,
    cache_key,
    cluster_group,
    split_key,
)
from localmodel.state.base import ClusterState, Selector

log = logging.getLogger("modelcache.controller.webhook")

MUTATE_PODS = "/mutate/pods"
VALIDATE_CACHES = "/validate/localmodelcaches"
MUTATE_CACHES = "/mutate/localmodelcaches"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
VALIDATE_GROUPS = "/validate/localmodelnodegroups"
MAX_BODY = 8 * 1024 * 1024  # a pod with large inline env or a big cache spec still fits


@dataclass(frozen=True)
class Limits:
    """What one connection may take. The API server's own call gives up after the webhook's
    timeoutSeconds (5 s in webhook.yaml), so a request slower than the timeouts is not its.

    handshake_timeout: seconds from a connection's opening to the end of its TLS handshake;
    header_timeout: seconds from the handshake, or the connection's previous response, to a request's
    whole headers (also the idle keep-alive limit); body_timeout: seconds to read the body;
    max_body: bytes (413 above); max_requests: per connection, then it is closed."""

    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_body: int = MAX_BODY
    max_requests: int = 1000


def parse_addr(text: str) -> tuple[str, int]:
    return cliargs.parse_addr(text, flag="--webhook-addr")


def ssl_context(cert_dir: Path) -> ssl.SSLContext:
    cert, key = cert_dir / CERT_FILE, cert_dir / KEY_FILE
    for f in (cert, key):
        if not f.is_file():
            raise InvalidInput(f"--webhook-cert-dir: {f} is missing (a Secret with tls.crt and tls.key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise InvalidInput(f"--webhook-cert-dir: cannot load {cert} and {key}: {e}") from e
    return context


class Webhook:
    """The two handlers over one ClusterState."""

    def __init__(self, state: ClusterState, *, overcommit: bool = False) -> None:
        self.state = state
        self.overcommit = overcommit  # --admission warn: capacity is not a reason to refuse

    # -- decisions with their reads ---------------------------------------------------------------

    async def review_pod(self, request: JSON) -> Verdict:
        if request.get("operation") != "CREATE":
            return Verdict(True)
        pod = request.get("object")
        if (shape := shape_error(pod)) is not None:
            return shape
        assert isinstance(pod, dict)
        ask = pod_ask(pod)
        if not ask.any:
            return Verdict(True)
        ns = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
        ns = str(ns) if ns else "default"
        owner = split_key(ask.cache)[0] if ask.cache is not None else None
        # Another namespace's LocalModelNamespaceCache is not read: place_pod refuses the pod.
        mine = ask.cache is not None and owner in (None, ns)
        cache = await self._get_cache(ask.cache) if ask.cache is not None and mine else None
        group_name = ask.group or (cache.spec.node_groups[0] if cache is not None else None)
        group = await self._get_group(group_name) if group_name is not None else None
        ready: list[Node] = []
        if cache is not None and group is not None:
            label = model_label(cache.spec.storage_key)
            nodes = await self.state.list(NODE, selector=Selector(labels={label: MODEL_LABEL_VALUE}))
            ready = [Node.from_json(n) for n in nodes.items]
        # The controller's serving claims in the pod's namespace: every mount of one is made read-only
        # (or refused), whichever cache the pod names.
        claims = await self.state.list(
            PERSISTENT_VOLUME_CLAIM,
            namespace=ns,
            selector=Selector(labels={MANAGED_BY_LABEL: MANAGED_BY}),
        )
        ours = frozenset(str((c.get("metadata") or {}).get("name")) for c in claims.items)
        # A claim of the cache's name that is not ours (KServe made it): one GET per group listed.
        names = [claim_name(cache.name, g) for g in cache.spec.node_groups] if cache is not None else []
        foreign: set[str] = set()
        for name in names:
            if name in ours:
                continue
            try:
                await self.state.get(PERSISTENT_VOLUME_CLAIM, name, namespace=ns)
            except NotFound:
                continue
            foreign.add(name)
        return place_pod(
            pod,
            cache=cache,
            group=group,
            ready_nodes=ready,
            our_claims=ours,
            foreign_claims=frozenset(foreign),
            namespace=ns,
        )

    async def review_cache(self, request: JSON) -> Verdict:
        operation = str(request.get("operation") or "")
        if operation == "DELETE":
            return await self._review_deletion(request)
        if operation not in ("CREATE", "UPDATE"):
            return Verdict(True)
        caches = [_typed(LocalModelCache, o) for o in (await self.state.list(LOCAL_MODEL_CACHE)).items]
        caches += [_typed(LocalModelNamespaceCache, o) for o in await self._namespace_caches()]
        groups: list[LocalModelNodeGroup] = []
        invalid: dict[str, str] = {}
        for o in (await self.state.list(LOCAL_MODEL_NODE_GROUP)).items:
            try:
                groups.append(cluster_group(o))
            except SpecError as e:
                invalid[str((o.get("metadata") or {}).get("name"))] = str(e)
        obj, old = request.get("object"), request.get("oldObject")
        if (request.get("kind") or {}).get("kind") == LOCAL_MODEL_NAMESPACE_CACHE.kind:
            obj, old = _in_namespace(obj, request), _in_namespace(old, request)
        return validate_cache(
            operation,
            obj,
            old,
            caches=[c for c in caches if c is not None],
            groups=groups,
            invalid_groups=invalid,
            overcommit=self.overcommit,
        )

    async def _review_deletion(self, request: JSON) -> Verdict:
        """A cache an (LLM)InferenceService's localmodel label names is kept (one list per kind, by
        label; a kind the cluster does not serve has none); who counts: :func:`deletion_verdict`."""
        old = request.get("oldObject")
        meta = old.get("metadata") if isinstance(old, dict) else None
        name = request.get("name") or (meta.get("name") if isinstance(meta, dict) else None)
        if not isinstance(name, str) or not name:
            return Verdict(True)
        namespace: str | None = None
        if (request.get("kind") or {}).get("kind") == LOCAL_MODEL_NAMESPACE_CACHE.kind:
            ns = request.get("namespace") or (meta.get("namespace") if isinstance(meta, dict) else None)
            namespace = str(ns) if ns else "default"
        users: list[tuple[str, str, str, str | None]] = []
        for kind in (INFERENCE_SERVICE, LLM_INFERENCE_SERVICE):
            try:
                found = await self.state.list(
                    kind, namespace=namespace, selector=Selector(labels={LOCALMODEL_LABEL: name})
                )
            except NotFound:
                continue
            for obj in found.items:
                m = obj.get("metadata") or {}
                labels = m.get("labels")
                labels = labels if isinstance(labels, dict) else {}
                ns_of = str(m.get("namespace") or "default")
                users.append((kind.kind, ns_of, str(m.get("name")), named_cache(labels, {})))
        return deletion_verdict(cache_key(name, namespace), users)

    async def default_cache(self, request: JSON) -> Verdict:
        """The alias ``nodeGroup`` stored as ``nodeGroups`` (:mod:`controller.defaults`); no reads."""
        return default_cache(str(request.get("operation") or ""), request.get("object"))

    async def review_group(self, request: JSON) -> Verdict:
        return validate_group(
            str(request.get("operation") or ""), request.get("object"), request.get("oldObject")
        )

    async def _get_cache(self, key: str) -> LocalModelCache | None:
        """The cache of key ``key`` (a LocalModelNamespaceCache's is ``<namespace>/<name>``)."""
        namespace, name = split_key(key)
        try:
            if namespace is None:
                return _typed(LocalModelCache, await self.state.get(LOCAL_MODEL_CACHE, name))
            obj = await self.state.get(LOCAL_MODEL_NAMESPACE_CACHE, name, namespace=namespace)
            return _typed(LocalModelNamespaceCache, obj)
        except NotFound:
            return None

    async def _namespace_caches(self) -> list[JSON]:
        """Every LocalModelNamespaceCache (none where its CRD is not installed)."""
        try:
            return (await self.state.list(LOCAL_MODEL_NAMESPACE_CACHE)).items
        except NotFound:
            return []

    async def _get_group(self, name: str) -> LocalModelNodeGroup | None:
        try:
            return _typed(LocalModelNodeGroup, await self.state.get(LOCAL_MODEL_NODE_GROUP, name))
        except NotFound:
            return None

    # -- HTTP -------------------------------------------------------------------------------------

    def app(self, limits: Limits = Limits()) -> web.Application:
        app = web.Application(client_max_size=limits.max_body)
        app.router.add_post(MUTATE_PODS, self._handler(self.review_pod, "pod", limits))
        app.router.add_post(VALIDATE_CACHES, self._handler(self.review_cache, "LocalModelCache", limits))
        app.router.add_post(MUTATE_CACHES, self._handler(self.default_cache, "LocalModelCache", limits))
        app.router.add_post(VALIDATE_GROUPS, self._handler(self.review_group, "LocalModelNodeGroup", limits))
        app.router.add_get("/healthz", _healthz)
        return app

    def _handler(
        self, review: Callable[[JSON], Awaitable[Verdict]], what: str, limits: Limits
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            response = await answer(request)
            if _served(request) >= limits.max_requests:
                response.force_close()
            return response

        async def answer(request: web.Request) -> web.Response:
            req = await _admission_request(request, limits)
            if isinstance(req, web.Response):
                return req
            try:
                verdict = await review(req)
            except ClusterStateError as e:
                # Refused rather than let through unchecked: the pod's owner retries.
                log.warning("cannot review %s %s: %s", what, _name(req), e)
                verdict = Verdict.refuse(f"modelcache cannot check this {what} now: {e}", code=503)
            except RecursionError:
                verdict = Verdict.refuse("request.object: nested too deep", code=400)
            except (TypeError, AttributeError, KeyError, ValueError) as e:
                # A field of a shape no API server sends; the checks above name the common ones.
                log.warning("malformed %s %s: %s: %s", what, _name(req), type(e).__name__, e)
                verdict = Verdict.refuse(f"request.object: a field has the wrong type ({e})", code=400)
            if not verdict.allowed:
                log.info("refused %s %s: %s", what, _name(req), verdict.message)
            return web.json_response(review_response(req["uid"], verdict))

        return handle


async def _admission_request(request: web.Request, limits: Limits) -> JSON | web.Response:
    """The AdmissionReview's ``request`` (an object with a string ``uid``), or the error response:
    413 for a body over the limit (told by its header), 408 for one that does not arrive in time,
    400 for one that is not such a review."""
    if request.content_length is not None and request.content_length > limits.max_body:
        # Refused on the header: waiting for a body that will be refused anyway would hold
        # the connection until body_timeout.
        response = web.json_response({"error": f"the body is over {limits.max_body} bytes"}, status=413)
        response.force_close()
        return response
    try:
        async with asyncio.timeout(limits.body_timeout):
            raw = await request.read()
    except TimeoutError:
        response = web.json_response(
            {"error": f"the body did not arrive in {limits.body_timeout:g} s"}, status=408
        )
        response.force_close()
        return response
    try:
        body = json.loads(raw)
    except RecursionError:
        return web.json_response({"error": "the JSON is nested too deep"}, status=400)
    except ValueError:
        return web.json_response({"error": "expected an AdmissionReview (JSON)"}, status=400)
    req = body.get("request") if isinstance(body, dict) else None
    if not isinstance(req, dict) or not isinstance(req.get("uid"), str):
        return web.json_response({"error": "expected an AdmissionReview with request.uid"}, status=400)
    return req


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


_T = TypeVar("_T", LocalModelCache, LocalModelNamespaceCache, LocalModelNodeGroup)


def _in_namespace(obj: object, request: JSON) -> object:
    """A namespaced object of a review with its namespace set (from the request when the object
    names none, as it may at CREATE)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return obj
    if obj["metadata"].get("namespace") or not request.get("namespace"):
        return obj
    return {**obj, "metadata": {**obj["metadata"], "namespace": request["namespace"]}}


def _typed(cls: type[_T], obj: JSON) -> _T | None:
    try:
        return cls.from_json(obj)
    except SpecError as e:
        log.warning("ignoring invalid %s %s: %s", cls.__name__, obj.get("metadata", {}).get("name"), e)
        return None


_SERVED: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()


def _served(request: web.Request) -> int:
    """Requests served on this request's connection, this one included."""
    transport = request.transport
    if transport is None:
        return 0
    _SERVED[transport] = _SERVED.get(transport, 0) + 1
    return _SERVED[transport]


def _name(req: JSON) -> str:
    obj = req.get("object") or req.get("oldObject") or {}
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = req.get("name") or meta.get("name") or meta.get("generateName") or "?"
    ns = req.get("namespace")
    return f"{ns}/{name}"[:300] if ns else str(name)[:300]


class WebhookServer:
    """The HTTPS server: ``start`` listens, ``stop`` closes; certificates reload while it runs."""

    def __init__(
        self,
        state: ClusterState,
        addr: str,
        cert_dir: Path,
        *,
        reload_every: float = 30.0,
        limits: Limits = Limits(),
        overcommit: bool = False,
    ) -> None:
        self.host, self.port = parse_addr(addr)
        self.limits = limits
        self.cert_dir = cert_dir
        self.context = ssl_context(cert_dir)
        self.webhook = Webhook(state, overcommit=overcommit)
        self.reload_every = reload_every
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._reloader: asyncio.Task[None] | None = None
        self._stamp = self._cert_stamp()

    async def start(self) -> None:
        # keepalive_timeout is aiohttp's one timer on a connection waiting for a request: armed when
        # it opens and after each response, it closes one that has not sent whole headers by then.
        self._runner = web.AppRunner(
            self.webhook.app(self.limits), access_log=None, keepalive_timeout=self.limits.header_timeout
        )
        await self._runner.setup()
        assert self._runner.server is not None
        # Served by asyncio directly, not aiohttp's TCPSite, for ssl_handshake_timeout: the keep-alive
        # timer starts only once the handshake is done, so a client that never sends a ClientHello
        # would otherwise hold the connection for asyncio's default 60 s.
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server,
            self.host,
            self.port,
            ssl=self.context,
            ssl_handshake_timeout=self.limits.handshake_timeout,
        )
        if self._server.sockets:
            self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("webhooks listening on https://%s:%d", self.host, self.port)
        self._reloader = asyncio.create_task(self._reload_loop())

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _cert_stamp(self) -> tuple[float, float]:
        try:
            return ((self.cert_dir / CERT_FILE).stat().st_mtime, (self.cert_dir / KEY_FILE).stat().st_mtime)
        except OSError:
            return (0.0, 0.0)

    def reload_if_changed(self) -> bool:
        """Load the certificate again when its files changed; new connections get the new one."""
        stamp = self._cert_stamp()
        if stamp == self._stamp:
            return False
        try:
            self.context.load_cert_chain(self.cert_dir / CERT_FILE, self.cert_dir / KEY_FILE)
        except (ssl.SSLError, OSError) as e:
            log.warning("cannot reload the webhook certificate (keeping the old one): %s", e)
            return False
        self._stamp = stamp
        log.info("reloaded the webhook certificate")
        return True

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reload_every)
            self.reload_if_changed()
