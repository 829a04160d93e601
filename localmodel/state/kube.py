"""The Kubernetes API backend of :class:`~localmodel.state.base.ClusterState`.

lightkube does what is hard to get right (kubeconfig and in-cluster service account loading,
exec/token auth, TLS) and hands us an authenticated ``httpx.AsyncClient``; the requests themselves
are plain JSON, because our objects already are the JSON Kubernetes stores (typed views live in
:mod:`localmodel.resources`), patches must be merge patches (a real server rejects other clients'
defaults for custom resources), and watches need their 410 handling to be ours.

All third-party errors are mapped into the project's tree in :func:`_error`; messages carry the
API's own reason and never a header.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import math
import os
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx  # the HTTP client lightkube is built on
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import KubeConfig
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_any
from tenacity.stop import stop_base

from localmodel.errors import (
    AlreadyExists,
    ClusterStateError,
    Conflict,
    Gone,
    InvalidName,
    NotFound,
    Unavailable,
)
from localmodel.k8snames import path_segment_error
from localmodel.kinds import JSON, ResourceKind
from localmodel.state.base import ObjectList, Selector, WatchEvent

MERGE_PATCH = "application/merge-patch+json"
# 429s are retried here, as client-go does, waiting the Retry-After asked: at most MAX_RETRY_AFTER
# seconds each, at most TOO_MANY_ATTEMPTS tries, and no wait that would end past MAX_RETRYING
# seconds after the first try (then the 429 is raised as Unavailable and the caller's loop retries).
TOO_MANY_ATTEMPTS = 5
MAX_RETRY_AFTER = 10.0
MAX_RETRYING = 30.0
# Every request but a watch must be answered in full within this many seconds (Unavailable else);
# a watch must send something within its server-side timeoutSeconds plus WATCH_GRACE.
REQUEST_TIMEOUT = 30.0
WATCH_GRACE = 15.0


def user_agent(component: str = "modelcache") -> str:
    """``COMPONENT/VERSION (POD; pid N)``: an API server names a writer's field manager after the
    part before the ``/``, and audit logs and tests tell replicas apart by the rest."""
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{component}/0.1.0 ({pod}; pid {os.getpid()})"


@dataclass
class _Liveness:
    """What readiness reads, shared by a client and its :meth:`KubeState.guarded` copies."""

    answered_at: float | None = None  # the API server's last answer that was not a 5xx or 429
    in_flight: dict[int, float] = field(default_factory=dict)  # request -> monotonic start
    stalled: dict[str, float] = field(default_factory=dict)  # path -> start of first unanswered


class KubeState:
    """``write_guard``: called before every attempt of every write (create, patch, patch_status,
    delete), 429 retries included; what it raises ends the write (the leader's fence).
    ``request_timeout``: seconds a request other than a watch may take in all."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        watch_timeout: int = 300,
        component: str = "modelcache",
        request_timeout: float = REQUEST_TIMEOUT,
        watch_grace: float = WATCH_GRACE,
        write_guard: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._client.headers["User-Agent"] = user_agent(component)
        self._watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.watch_grace = watch_grace
        self.write_guard = write_guard
        self._live = _Liveness()

    def guarded(self, write_guard: Callable[[], None]) -> KubeState:
        """This client with ``write_guard`` before every write attempt (its readiness shared)."""
        other = copy.copy(self)
        other.write_guard = write_guard
        return other

    @property
    def last_answer(self) -> float | None:
        """time.monotonic() since which the API server has answered (not 5xx/429) what was asked:
        its last answer, but no later than the start of a request still waiting or of the first
        request to a path whose requests have gone unanswered since (timeouts, cut connections).
        A hung list thus counts as no answer however many other requests are answered; readiness
        (controller and agent) reads this. None before the first answer."""
        live = self._live
        if live.answered_at is None:
            return None
        return min([live.answered_at, *live.in_flight.values(), *live.stalled.values()])

    @last_answer.setter
    def last_answer(self, value: float | None) -> None:
        self._live.answered_at = value

    @classmethod
    def from_environment(
        cls, kubeconfig: str | None = None, context: str | None = None, *, component: str = "modelcache"
    ) -> KubeState:
        """In-cluster service account when present, else ``kubeconfig`` / $KUBECONFIG / ~/.kube/config.
        ``component`` starts the User-Agent (see :func:`user_agent`)."""
        try:
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
            single = config.get(context_name=context)
            if single is None:
                raise Unavailable("the Kubernetes configuration names no current context; pass --context")
            params = client_adapter.ConnectionParams(timeout=_timeout())
            return cls(client_adapter.AsyncClient(single, params), component=component)
        except Exception as e:  # lightkube raises ConfigError and file errors alike
            raise Unavailable(f"cannot load a Kubernetes configuration: {e}") from e

    @classmethod
    def for_url(
        cls,
        url: str,
        *,
        watch_timeout: int = 300,
        component: str = "modelcache",
        request_timeout: float = REQUEST_TIMEOUT,
        watch_grace: float = WATCH_GRACE,
    ) -> KubeState:
        """An unauthenticated client for a given API URL (tests, kubectl proxy)."""
        return cls(
            httpx.AsyncClient(base_url=url, timeout=_timeout()),
            watch_timeout=watch_timeout,
            component=component,
            request_timeout=request_timeout,
            watch_grace=watch_grace,
        )

    # -- the interface -------------------------------------------------------------------------

    async def get(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> JSON:
        return _typed(kind, await self._json("GET", _url(kind, namespace, name)))

    async def list(
        self, kind: ResourceKind, *, namespace: str | None = None, selector: Selector | None = None
    ) -> ObjectList:
        body = await self._json("GET", _url(kind, namespace), params=_selector_params(selector))
        items = [_typed(kind, item) for item in body.get("items") or []]
        return ObjectList(items, str((body.get("metadata") or {}).get("resourceVersion", "")))

    async def watch_raw(
        self,
        kind: ResourceKind,
        *,
        resource_version: str,
        namespace: str | None = None,
        selector: Selector | None = None,
    ) -> AsyncIterator[WatchEvent]:
        params = {
            **_selector_params(selector),
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "false",
            "timeoutSeconds": str(self._watch_timeout),
        }
        # A watch the server accepted but never feeds ends after its own timeout plus a grace.
        timeout = httpx.Timeout(10.0, read=self._watch_timeout + self.watch_grace)
        try:
            async with self._client.stream(
                "GET",
                _url(kind, namespace),
                params=params,
                headers={"Accept": "application/json"},
                timeout=timeout,
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._answered(response.status_code)
                    raise _error(response)
                self._answered(response.status_code)
                async for line in response.aiter_lines():
                    self._answered(response.status_code)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        if status.get("code") == 410:
                            raise Gone(status.get("message") or "resourceVersion too old")
                        raise ClusterStateError(status.get("message") or "watch error")
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        yield WatchEvent(event["type"], _typed(kind, event["object"]))
        except httpx.HTTPError as e:
            raise Unavailable(f"watch {kind.plural}: {type(e).__name__}") from e

    async def create(self, kind: ResourceKind, obj: JSON, *, handover: bool = False) -> JSON:
        namespace = (obj.get("metadata") or {}).get("namespace") if kind.namespaced else None
        if kind.namespaced and namespace is None:
            namespace = "default"
        body = {**obj, "apiVersion": kind.api_version, "kind": kind.kind}
        return _typed(kind, await self._json("POST", _url(kind, namespace), json_body=body, creating=True))

    async def patch(
        self,
        kind: ResourceKind,
        name: str,
        patch: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        body = _with_version(patch, resource_version)
        return _typed(kind, await self._json("PATCH", _url(kind, namespace, name), json_body=body))

    async def patch_status(
        self,
        kind: ResourceKind,
        name: str,
        status: JSON,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        body = _with_version({"status": status}, resource_version)
        url = _url(kind, namespace, name) + "/status"
        return _typed(kind, await self._json("PATCH", url, json_body=body))

    async def delete(self, kind: ResourceKind, name: str, *, namespace: str | None = None) -> None:
        await self._json("DELETE", _url(kind, namespace, name))

    async def close(self) -> None:
        await self._client.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    def _answered(self, code: int) -> None:
        if code < 500 and code != 429:
            self._live.answered_at = time.monotonic()

    async def _json(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        json_body: JSON | None = None,
        creating: bool = False,
    ) -> JSON:
        """One request; a 429 is asked again after its Retry-After (see MAX_RETRYING). A write
        passes ``write_guard`` before each attempt."""
        guard = self.write_guard if method != "GET" else None
        retrying = AsyncRetrying(
            retry=retry_if_exception(_throttled),
            wait=_retry_after,
            stop=stop_any(stop_after_attempt(TOO_MANY_ATTEMPTS), _PastRetrying()),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if guard is not None:
                    guard()
                return await self._request(method, url, params, json_body, creating)
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def _request(
        self, method: str, url: str, params: dict[str, str] | None, json_body: JSON | None, creating: bool
    ) -> JSON:
        headers = {"Accept": "application/json"}
        content = None
        if json_body is not None:
            headers["Content-Type"] = MERGE_PATCH if method == "PATCH" else "application/json"
            content = json.dumps(json_body)
        live = self._live
        started = time.monotonic()
        key = object()
        live.in_flight[id(key)] = started
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await self._client.request(
                    method, url, params=params, content=content, headers=headers
                )
        except (httpx.HTTPError, TimeoutError) as e:
            live.stalled.setdefault(url, started)
            slow = isinstance(e, TimeoutError | httpx.TimeoutException)
            why = "no answer in time" if slow else "cannot reach"
            raise Unavailable(f"{method} {url}: {why} from the API server ({type(e).__name__})") from e
        finally:
            del live.in_flight[id(key)]
        live.stalled.pop(url, None)
        self._answered(response.status_code)
        if response.status_code >= 400:
            raise _error(response, creating=creating)
        try:
            result: JSON = response.json()
        except ValueError as e:
            raise Unavailable(f"{method} {url}: the API server answered with non-JSON") from e
        return result


def _url(kind: ResourceKind, namespace: str | None, name: str | None = None) -> str:
    """The API path of ``kind`` (in ``namespace``; of object ``name``). InvalidName, before any
    request, for a name or namespace that is no path segment (``..``, ``/``, ``%``); the rest is
    percent-quoted, so no name adds a query or fragment: a name never changes which object is meant."""
    base = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
    if kind.namespaced and namespace:
        base += f"/namespaces/{_segment(namespace, kind, 'namespace')}"
    base += f"/{kind.plural}"
    return base if name is None else f"{base}/{_segment(name, kind, 'name')}"


def _segment(value: str, kind: ResourceKind, what: str) -> str:
    if (why := path_segment_error(value)) is not None:
        raise InvalidName(f"{kind.kind} {what}: {why}")
    return urllib.parse.quote(value, safe="")


def _selector_params(selector: Selector | None) -> dict[str, str]:
    params = {}
    if selector is not None:
        if labels := selector.label_string():
            params["labelSelector"] = labels
        if fields := selector.field_string():
            params["fieldSelector"] = fields
    return params


def _with_version(patch: JSON, resource_version: str | None) -> JSON:
    if resource_version is None:
        return patch
    # A resourceVersion in a merge patch is a precondition: a stale one gets 409 Conflict.
    meta = dict(patch.get("metadata") or {}, resourceVersion=resource_version)
    return {**patch, "metadata": meta}


def _typed(kind: ResourceKind, obj: JSON) -> JSON:
    # Lists omit apiVersion/kind on items; callers rely on them.
    obj.setdefault("apiVersion", kind.api_version)
    obj.setdefault("kind", kind.kind)
    return obj


def _error(response: httpx.Response, *, creating: bool = False) -> ClusterStateError:
    """The one mapping of API errors into the project's tree (the Status body's message)."""
    try:
        status: dict[str, Any] = response.json()
        message = str(status.get("message") or status.get("reason") or response.reason_phrase)
    except ValueError:
        message = response.reason_phrase
    code = response.status_code
    if code == 404:
        return NotFound(message)
    if code == 409:
        return AlreadyExists(message) if creating else Conflict(message)
    if code == 410:
        return Gone(message)
    if code == 429 or code >= 500:
        busy = Unavailable(f"HTTP {code}: {message}")
        busy.status = code
        busy.retry_after = _retry_after_header(response)
        return busy
    error = ClusterStateError(f"HTTP {code}: {message}")
    error.status = code
    return error


def _timeout() -> httpx.Timeout:
    # Per phase; the whole of a request is bounded by request_timeout, a watch's read per stream.
    return httpx.Timeout(REQUEST_TIMEOUT)


def _retry_after_header(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"), now=time.time())


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 section 10.2.3): delta-seconds (a
    non-negative integer; a decimal is taken too) or an HTTP-date (``now``: time.time()). None
    when absent or invalid (negative, nan, infinite, unparsable): the caller's own backoff then."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; an unzoned one is read as such
            return None
        return max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _throttled(error: BaseException) -> bool:
    return isinstance(error, Unavailable) and error.status == 429


def _wait_asked(state: RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome is not None else None
    asked = getattr(error, "retry_after", None)
    return min(MAX_RETRY_AFTER, asked if isinstance(asked, float) else 1.0)


def _retry_after(state: RetryCallState) -> float:
    """tenacity's wait: the Retry-After the API asked, else 1 s (at most MAX_RETRY_AFTER)."""
    return _wait_asked(state)


class _PastRetrying(stop_base):
    """tenacity's stop: the next wait would end past MAX_RETRYING seconds after the first try."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        return (retry_state.seconds_since_start or 0.0) + _wait_asked(retry_state) > MAX_RETRYING
