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

import json
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx  # the HTTP client lightkube is built on
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import KubeConfig
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from localmodel.errors import (
    AlreadyExists,
    ClusterStateError,
    Conflict,
    Gone,
    NotFound,
    Unavailable,
)
from localmodel.state.base import JSON, ObjectList, ResourceKind, Selector, WatchEvent

MERGE_PATCH = "application/merge-patch+json"
# 429s are retried here, as client-go does, waiting the Retry-After asked (at most this long each).
TOO_MANY_ATTEMPTS = 5
MAX_RETRY_AFTER = 60.0


def user_agent(component: str = "modelcache") -> str:
    """``COMPONENT/VERSION (POD; pid N)``: an API server names a writer's field manager after the
    part before the ``/``, and audit logs and tests tell replicas apart by the rest."""
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{component}/0.1.0 ({pod}; pid {os.getpid()})"


class KubeState:
    def __init__(
        self, client: httpx.AsyncClient, *, watch_timeout: int = 300, component: str = "modelcache"
    ) -> None:
        self._client = client
        self._client.headers["User-Agent"] = user_agent(component)
        self._watch_timeout = watch_timeout
        # time.monotonic() of the API server's last answer that was not a 5xx or 429 (readiness).
        self.last_answer: float | None = None

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
            params = client_adapter.ConnectionParams(timeout=httpx.Timeout(30.0, read=None))
            return cls(client_adapter.AsyncClient(single, params), component=component)
        except Exception as e:  # lightkube raises ConfigError and file errors alike
            raise Unavailable(f"cannot load a Kubernetes configuration: {e}") from e

    @classmethod
    def for_url(cls, url: str, *, watch_timeout: int = 300, component: str = "modelcache") -> KubeState:
        """An unauthenticated client for a given API URL (tests, kubectl proxy)."""
        return cls(
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0, read=None)),
            watch_timeout=watch_timeout,
            component=component,
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
        try:
            async with self._client.stream(
                "GET", _url(kind, namespace), params=params, headers={"Accept": "application/json"}
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
            self.last_answer = time.monotonic()

    async def _json(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        json_body: JSON | None = None,
        creating: bool = False,
    ) -> JSON:
        """One request; a 429 is asked again after its Retry-After (up to TOO_MANY_ATTEMPTS)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_throttled),
            wait=_retry_after,
            stop=stop_after_attempt(TOO_MANY_ATTEMPTS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
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
        try:
            response = await self._client.request(
                method, url, params=params, content=content, headers=headers
            )
        except httpx.HTTPError as e:
            raise Unavailable(f"{method} {url}: cannot reach the API server ({type(e).__name__})") from e
        self._answered(response.status_code)
        if response.status_code >= 400:
            raise _error(response, creating=creating)
        try:
            result: JSON = response.json()
        except ValueError as e:
            raise Unavailable(f"{method} {url}: the API server answered with non-JSON") from e
        return result


def _url(kind: ResourceKind, namespace: str | None, name: str | None = None) -> str:
    base = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
    if kind.namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{kind.plural}"
    return f"{base}/{name}" if name else base


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


def _retry_after_header(response: httpx.Response) -> float | None:
    """Retry-After in seconds (RFC 9110 also allows an HTTP date; the API server sends seconds)."""
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _throttled(error: BaseException) -> bool:
    return isinstance(error, Unavailable) and error.status == 429


def _retry_after(state: Any) -> float:
    """tenacity's wait: the Retry-After the API asked, else 1 s (capped at MAX_RETRY_AFTER)."""
    error = state.outcome.exception() if state.outcome is not None else None
    asked = getattr(error, "retry_after", None)
    return min(MAX_RETRY_AFTER, asked if isinstance(asked, float) else 1.0)
